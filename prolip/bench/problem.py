"""What every ``prolip bench`` method sees: features computed once, the frozen heads, and the classes.

The bench extracts the pre-projection features of each image set once (per dataset, split, draw
and view setting) and hands them to every method. Nothing here holds a model: the vision and text
towers' last linear maps are copied out as plain tensors, so methods are pure functions of tensors
and never run a tower again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prolip.features.cache import CachedFeatures
from prolip.model.zeroshot import average_prompts
from prolip.training.loop import split_features

CPU = torch.device("cpu")


@dataclass(frozen=True)
class FeatureSet:
    """Pre-projection features of one set of images under one view setting, with their labels.

    Attributes:
        features: float32 ``[V, n, width]``: view ``v`` of image ``i`` at ``features[v, i]``. ``V = 1``
            for the plain test-time view. May be lazy :class:`~prolip.features.cache.CachedFeatures` (index
            it one view at a time) for augmented training views. Each row is x (``d_in`` columns)
            and, for towers that add a per-image residual after their last linear map (SigLIP's
            attention-pool head), the residual r beside it (:func:`prolip.training.loop.split_features`).
        labels: int64 ``[n]``, indices into the classes the set was drawn with.
        d_in: the width of x; None when rows hold x alone (``width == d_in``).
    """

    features: torch.Tensor | CachedFeatures
    labels: torch.Tensor
    d_in: int | None = None

    @property
    def n_views(self) -> int:
        """V, the number of views per image."""
        return int(self.features.shape[0])

    def view(self, v: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x, r)`` of view ``v`` of every image: ``[n, d_in]`` and ``[n, d_out]`` or None."""
        rows = self.features[v]
        return split_features(rows, rows.shape[-1] if self.d_in is None else self.d_in)


@dataclass(frozen=True)
class ImageHead:
    """The vision tower's frozen last linear map: image embedding = x W + b + r, W = W0 unless given.

    Attributes:
        w0: float32 ``[d_in, d_out]``, the pretrained projector as a ``x @ W`` matrix.
        bias: float32 ``[d_out]`` (frozen), or None.
    """

    w0: torch.Tensor
    bias: torch.Tensor | None = None

    def embed(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Unnormalised image embeddings ``[..., d_out]`` (what ``encode_image`` returns) of ``x [..., d_in]``."""
        z = x @ (self.w0 if weight is None else weight)
        if self.bias is not None:
            z = z + self.bias
        if residual is not None:
            z = z + residual
        return z


@dataclass(frozen=True)
class TextHead:
    """The text tower's final projection and the pre-projection features of every (class, template) prompt.

    Attributes:
        features: float32 ``[K, M, d_t]``: the text tower's output just before its projection, for
            template ``m`` filled with class ``k``'s name.
        w0: float32 ``[d_t, d_out]``, the pretrained text projection as a ``x @ W`` matrix.
        bias: float32 ``[d_out]``, the projection's frozen bias (SigLIP's text tower), or None.
    """

    features: torch.Tensor
    w0: torch.Tensor
    bias: torch.Tensor | None = None

    def classifier(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The zero-shot classifier T ``[K, d_out]`` built with ``weight`` (W0 by default).

        Exactly as the zero-shot classifier is built: each prompt's embedding L2-normalised,
        averaged over templates, normalised again.
        """
        z = self.features @ (self.w0 if weight is None else weight)
        return average_prompts(z if self.bias is None else z + self.bias)


@dataclass(frozen=True)
class Classes:
    """The classes a method is trained on or evaluated on.

    Attributes:
        names: class names, in label order.
        classifier: the zero-shot classifier T, float32 ``[K, d_out]``, unit rows.
        text: pre-projection text features and text projection, or None where the text tower's
            projection cannot be trained (methods that need it then refuse the problem).
    """

    names: list[str]
    classifier: torch.Tensor
    text: TextHead | None = None

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Problem:
    """One few-shot training problem: a draw of one dataset at one N and seed.

    Attributes:
        train: the ``shots`` images per class, ``V`` augmented views each (the paper: 300).
        train_plain: the same images, one plain (test-time) view each.
        val: the validation draw (N per class from the val split), one plain view each; used for
            hyperparameter selection only, never the test set.
        classes: the training classes.
        image_head: the frozen vision projector (and bias).
        logit_scale: s, the model's logit scale (100 for released CLIP models).
        shots: N, images per class.
        seed: the draw's seed; methods with randomness of their own seed it from this.
        epochs: full-batch training steps for methods trained like ProLIP (the paper: 300).
        device: where methods that can should train (the backbone's device); features stay on the CPU.
    """

    train: FeatureSet
    train_plain: FeatureSet
    val: FeatureSet
    classes: Classes
    image_head: ImageHead
    logit_scale: float
    shots: int
    seed: int
    epochs: int = 300
    device: torch.device = CPU

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from the draw's seed (and ``salt``), for a method's own randomness."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)
