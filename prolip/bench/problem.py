"""What every ``prolip bench`` method sees: features computed once, the frozen heads, and the classes.

The bench extracts the pre-projection features of each image set once (per dataset, split, draw
and view setting) and hands them to every method. Nothing here holds a model: the vision and text
towers' last linear maps are copied out as :class:`~prolip.model.head.LinearHead` tensors, so methods are
pure functions of tensors and never run a tower again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prolip.features.cache import CachedFeatures
from prolip.model.head import LinearHead
from prolip.training.sides import TextSide

CPU = torch.device("cpu")


@dataclass(frozen=True)
class FeatureSet:
    """Pre-projection features of one set of images under one view setting, with their labels.

    Attributes:
        features: float32 ``[V, n, width]``: view ``v`` of image ``i`` at ``features[v, i]``. ``V = 1``
            for the plain test-time view. May be lazy :class:`~prolip.features.cache.CachedFeatures` (index
            it one view at a time) for augmented training views. Each row is x (``d_in`` columns)
            and, for towers that add a per-image residual after their last linear map (SigLIP's
            attention-pool head), the residual r beside it (:meth:`prolip.model.head.LinearHead.split`).
        labels: int64 ``[n]``, indices into the classes the set was drawn with.
    """

    features: torch.Tensor | CachedFeatures
    labels: torch.Tensor

    @property
    def n_views(self) -> int:
        """V, the number of views per image."""
        return int(self.features.shape[0])


@dataclass(frozen=True)
class Classes:
    """The classes a method is trained on or evaluated on.

    Attributes:
        names: class names, in label order.
        classifier: the zero-shot classifier T, float32 ``[K, d_out]``, unit rows.
        text: the classes' prompts as pre-projection text features with the text projection (the
            :class:`~prolip.training.sides.TextSide` ProLIP-text trains), or None where the text tower's
            projection cannot be trained (methods that need it then refuse the problem).
    """

    names: list[str]
    classifier: torch.Tensor
    text: TextSide | None = None

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
        image_head: the frozen vision projector W0 (and bias), float32 on the CPU.
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
    image_head: LinearHead
    logit_scale: float
    shots: int
    seed: int
    epochs: int = 300
    device: torch.device = CPU

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from the draw's seed (and ``salt``), for a method's own randomness."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)
