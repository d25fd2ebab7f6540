"""What can train on the classifier's side of ProLIP's loss, with T rebuilt from it at every step.

* :class:`TextSide` is ProLIP on the text tower's projection (``target="text"`` / ``"image+text"``): T is
  built from the prompts' fixed pre-projection text features through the trained projection W_t, exactly
  as the zero-shot classifier is built, and W_t is regularised toward W_t0 with the same λ as W.
* :class:`ClassifierResidual` is TaskRes's residual on the classifier (``taskres_alpha``): T = normalize(t + αR),
  R from zero and not regularised.

The engine (:func:`prolip.training.engine.train_projector`) trains either beside (or instead of) the vision
projector, in the same optimiser under the same schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from prolip.errors import InputError
from prolip.model.head import LinearHead
from prolip.model.zeroshot import average_prompts


@dataclass(frozen=True)
class TextSide:
    """The text projection and the prompts it projects: T = normalize(mean_m normalize(P W_t + b_t)).

    Attributes:
        prompts: pre-projection text features P ``[K, M, d_t]`` of class k under template m.
        head: the text projection (W_t0 ``[d_t, d_out]`` and its frozen bias, e.g. SigLIP's), only read.
    """

    prompts: torch.Tensor
    head: LinearHead
    penalised: ClassVar[bool] = True

    @property
    def start(self) -> torch.Tensor:
        """Where the trained tensor starts: W_t0."""
        return self.head.weight

    @property
    def classes(self) -> int:
        """K, the number of classes."""
        return self.prompts.shape[0]

    def embeddings(self) -> torch.Tensor:
        """The prompts' text embeddings ``[K, M, d_out]`` (what ``encode_text`` returns) under W_t0."""
        return self.head.project(self.prompts)

    def classifier(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """T ``[K, d_out]`` built with ``weight`` (W_t0 by default), as the zero-shot classifier is built."""
        return average_prompts(self.head.project(self.prompts, weight))

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> TextSide:
        """The same side on ``device``, in ``dtype``."""
        return TextSide(self.prompts.detach().to(device, dtype), self.head.frozen(device, dtype))

    def check(self, d_out: int) -> None:
        """Refuse prompt features and a text projection that do not fit each other and W's width.

        Raises:
            InputError: naming both shapes.
        """
        p, w = self.prompts, self.head.weight
        if p.ndim != 3 or w.ndim != 2 or p.shape[-1] != w.shape[0] or w.shape[1] != d_out:
            raise InputError(
                f"prompt features {tuple(p.shape)} and text projection {tuple(w.shape)} do not fit "
                f"[K, M, d_t] × [d_t, {d_out}]."
            )


@dataclass(frozen=True)
class ClassifierResidual:
    """TaskRes's residual on the classifier: T = normalize(t + α R) row by row, R ``[K, d_out]`` from zero.

    With R = 0 it is the zero-shot classifier's direction. TaskRes puts no penalty on R.

    Attributes:
        prototypes: the class prototypes t ``[K, d_out]`` (:func:`prolip.model.zeroshot.text_prototypes`).
        alpha: α, the residual's scale (TaskRes's default is 0.5).
    """

    prototypes: torch.Tensor
    alpha: float
    penalised: ClassVar[bool] = False

    @property
    def start(self) -> torch.Tensor:
        """Where the trained tensor starts: R = 0 ``[K, d_out]``."""
        return torch.zeros_like(self.prototypes)

    @property
    def classes(self) -> int:
        """K, the number of classes."""
        return self.prototypes.shape[0]

    def classifier(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """T ``[K, d_out]`` with the residual ``weight`` (zero by default)."""
        return F.normalize(self.prototypes if weight is None else self.prototypes + self.alpha * weight, dim=-1)

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> ClassifierResidual:
        """The same side on ``device``, in ``dtype``."""
        return ClassifierResidual(self.prototypes.detach().to(device, dtype), float(self.alpha))

    def check(self, d_out: int) -> None:
        """Refuse prototypes that are not ``[K, d_out]``, or an α that is not a finite number.

        Raises:
            InputError: naming the shape or the value.
        """
        if self.prototypes.ndim != 2 or self.prototypes.shape[1] != d_out:
            raise InputError(f"class prototypes {tuple(self.prototypes.shape)} do not fit [K, {d_out}].")
        if not math.isfinite(self.alpha):
            raise InputError(f"the residual's scale alpha={self.alpha!r} must be a finite number.")


ClassifierSide = TextSide | ClassifierResidual
"""What can train on the classifier's side of the loss."""
