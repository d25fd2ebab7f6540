"""The fitted state of a ProLIP adapter: what training learned, and the base model it belongs to.

:class:`FittedState` is what ``fit_features`` produces, what a delta file stores
(:mod:`prolip.delta_file`), what ``load`` restores and what the Hub module shares. It holds no
model: it is checked against one (:meth:`FittedState.check_base`) and merged into one
(:meth:`FittedState.merge_into`).
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from prolip.backbone import Backbone, file_may_choose
from prolip.errors import DeltaFileError, FingerprintMismatchError, PrecisionWarning, warn
from prolip.fingerprint import Fingerprint, legacy_projector_hash
from prolip.labels import class_array
from prolip.params import PRECISIONS, check_params
from prolip.towers import Projector, find_projector


@dataclass(frozen=True, eq=False)
class FittedState:
    """Everything a fitted adapter needs to predict, save and be checked against its base model.

    Attributes:
        delta: W − W0, float32 CPU, in the projector parameter's own orientation.
        classifier: the zero-shot classifier T, float32 CPU ``[K, d_out]``.
        classes: the labels, in column order.
        class_names: the text put into the templates for each class.
        templates: the prompt templates T was built with.
        n_shots: N, training images per class (n / K).
        reg_lambda: the λ training used.
        logit_scale: the s training used.
        projector_key: the state-dict key of the projector parameter (e.g. "visual.proj").
        projector_family: the tower family (:mod:`prolip.towers`).
        model_name: the open_clip model name, or "" for a model object.
        pretrained: the pretrained tag or checkpoint, or "".
        hyperparameters: the estimator's hyperparameters at fit time (JSON-able values only).
        fingerprint: sketches of the base model's W0 and vision tower; None only for files of
            delta format 1, which record ``legacy_hash`` instead.
        legacy_hash: format 1's SHA-256 of W0 cast to fp16, or None.
        loss_history: training loss per step (empty for a loaded delta).
        selection: how ``lr`` and ``reg_lambda`` were chosen on a validation draw (the grid and
            every point's validation accuracy, :meth:`prolip.search.SearchResult.as_dict`), or None.
    """

    delta: torch.Tensor
    classifier: torch.Tensor
    classes: tuple[Hashable, ...]
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    n_shots: float
    reg_lambda: float
    logit_scale: float
    projector_key: str
    projector_family: str
    model_name: str
    pretrained: str
    hyperparameters: Mapping[str, Any]
    fingerprint: Fingerprint | None
    legacy_hash: str | None = None
    loss_history: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float32))
    selection: Mapping[str, Any] | None = None

    def check_base(self, backbone: Backbone, *, strict: bool = True, source: str = "this delta") -> None:
        """Refuse (or with ``strict=False``, warn about) a base model this state was not trained on.

        Raises:
            DeltaFileError: the projector's key or shape, or the embedding width, differ: the
                delta cannot be applied at all.
            FingerprintMismatchError: the base model's W0 or vision tower differ (``strict``).
        """
        projector = backbone.projector
        if tuple(self.delta.shape) != tuple(projector.parameter.shape) or self.projector_key != projector.key:
            raise DeltaFileError(
                f"{source} holds a delta for {self.projector_key} of shape {tuple(self.delta.shape)}, "
                f"but the base model's projector is {projector.key} of shape {tuple(projector.parameter.shape)}."
            )
        if self.classifier.shape[1] != projector.out_features:
            raise DeltaFileError(
                f"{source} holds a classifier of width {self.classifier.shape[1]}, "
                f"but the model's embedding width is {projector.out_features}."
            )
        if self.fingerprint is not None:
            problem = self.fingerprint.mismatch(backbone.fingerprint)
            recorded, found = self.fingerprint.summary(), backbone.fingerprint.summary()
        else:
            found = legacy_projector_hash(projector.parameter)
            problem = None if found == self.legacy_hash else "its projector W0 differs"
            recorded = self.legacy_hash
        if problem is None:
            return
        message = (
            f"{source} was trained on a different base model: {problem}. Recorded: {recorded}; "
            f"given model: {found}. Load it onto the base model it was made for, or pass strict=False "
            "to apply it anyway."
        )
        if strict:
            raise FingerprintMismatchError(message)
        warn(message)

    def base_model(self, pretrained: str | None, *, trust_file_model: bool, source: str) -> tuple[str, str | None]:
        """The base model name and pretrained weights this state names, if a file may choose them.

        ``pretrained`` (the caller's choice) overrides the recorded one.

        Raises:
            DeltaFileError: the state was fitted on a model object (no name), or it names a model
                a file may not choose (:func:`prolip.backbone.file_may_choose`) and
                ``trust_file_model`` is False.
        """
        if not self.model_name:
            raise DeltaFileError(f"{source} was fitted on a model object, not a named model; pass model= to load it.")
        # The caller's own pretrained choice leaves the file only the architecture to pick.
        recorded = self.pretrained if pretrained is None else ""
        if not (trust_file_model or file_may_choose(self.model_name, recorded)):
            raise DeltaFileError(
                f"{source} names base model {self.model_name!r} with pretrained {self.pretrained!r}, which is not one "
                "of open_clip's own models and tags: prolip does not let a file choose what to download or read. "
                "Pass model= and pretrained= yourself, or trust_file_model=True if you trust the file."
            )
        return self.model_name, pretrained if pretrained is not None else (self.pretrained or None)

    def adapted_weight(self, projector: Projector) -> torch.Tensor:
        """W0 + delta as a float32 ``[d_in, d_out]`` matrix on the projector's device."""
        w0 = projector.to_in_out(projector.parameter).detach().float()
        return w0 + projector.to_in_out(self.delta).to(w0.device)

    def merged_copy(self, model: nn.Module, precision: str) -> nn.Module:
        """A copy of ``model`` in ``precision`` whose projector is W0 + delta (``model`` is untouched).

        Warns (PrecisionWarning) with the measured relative error of the merged update when the
        precision rounds it (fp16, bf16); fp32 keeps it exact.
        """
        check_params({"precision": precision})
        merged = copy.deepcopy(model).to(PRECISIONS[precision])
        lost = self.merge_into(merged)
        if lost > 0:
            warn(
                f"merging into {precision} rounded the trained update: its relative error is {lost:.2%}. "
                "Use merged_model(precision='fp32') to keep it exact.",
                PrecisionWarning,
            )
        return merged

    def merge_into(self, model: nn.Module) -> float:
        """Write W0 + delta into ``model``'s own projector parameter, in that parameter's dtype.

        Returns:
            The relative error of the merged update, ‖(W0 + delta) rounded − W0 − delta‖ / ‖delta‖:
            0 for an fp32 model, and what fp16 or bf16 rounding lost otherwise.
        """
        param = find_projector(model, verify=False).parameter  # the same architecture as the checked base
        with torch.no_grad():
            w0 = param.detach().float().clone()
            param.copy_((w0 + self.delta.to(param.device)).to(param.dtype))
            delta = self.delta.to(param.device)
            lost = (param.detach().float() - w0 - delta).norm()
            norm = delta.norm()
        return float(lost / norm) if norm > 0 else 0.0


class LearnedAttributes:
    """The learned attributes (``name_``) of an estimator holding a :class:`FittedState`, read from it.

    Each raises the estimator's NotFittedError (an AttributeError, so ``hasattr`` is False) before fit.
    """

    def _fitted(self) -> FittedState:
        raise NotImplementedError

    fitted_ = property(lambda self: self._fitted(), doc="The fitted state (:class:`FittedState`).")
    classes_ = property(lambda self: class_array(self._fitted().classes), doc="Labels, in predict_proba's column order.")
    class_names_ = property(lambda self: list(self._fitted().class_names), doc="The text put into the templates per class.")
    classifier_ = property(lambda self: self._fitted().classifier, doc="The zero-shot classifier T, float32 [K, d_out].")
    delta_ = property(lambda self: self._fitted().delta, doc="W − W0, float32, in the parameter's own orientation.")
    n_shots_ = property(lambda self: self._fitted().n_shots, doc="N, training images per class.")
    reg_lambda_ = property(lambda self: self._fitted().reg_lambda, doc="The λ training used.")
    logit_scale_ = property(lambda self: self._fitted().logit_scale, doc="The logit scale s training used.")
    loss_history_ = property(lambda self: self._fitted().loss_history, doc="Training loss per step (empty after load).")
    base_fingerprint_ = property(
        lambda self: self._fitted().fingerprint or self._fitted().legacy_hash, doc="The base model's fingerprint."
    )
