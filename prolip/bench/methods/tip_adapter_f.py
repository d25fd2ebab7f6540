"""``tip-adapter-f``: Tip-Adapter-F (Zhang et al., ECCV 2022), the cache model with trained keys.

The keys start as Tip-Adapter's and are trained with cross-entropy on the cache model's scores: 20
epochs, one new augmented view of every training image per epoch, minibatches of 256, AdamW
(lr 1e-3, eps 1e-4), cosine schedule over all iterations. α and β are searched on the validation draw
before and after, as for Tip-Adapter (:func:`prolip.variants.tip_cache.fit_cache` with ``trained=True``).
"""

from __future__ import annotations

from typing import ClassVar

from prolip.bench.methods.interface import FittedMethod, Method, register
from prolip.bench.methods.tip_adapter import fit_cache_model
from prolip.bench.problem import Problem
from prolip.variants.tip_cache import KEY_BATCH_SIZE, KEY_EPOCHS, KEY_LR


@register
class TipAdapterF(Method):
    """Tip-Adapter-F: Tip-Adapter whose cache keys are fine-tuned on the training views.

    Args:
        epochs: training epochs (one augmented view of every image each).
        lr: AdamW's learning rate.
        batch_size: images per minibatch.
    """

    name = "tip-adapter-f"
    transfers: ClassVar[bool] = False  # the cache's values are one-hot over the training classes

    def __init__(self, epochs: int = KEY_EPOCHS, lr: float = KEY_LR, batch_size: int = KEY_BATCH_SIZE) -> None:
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size

    def fit(self, problem: Problem) -> FittedMethod:
        # The original trains with hand-set per-dataset α and β; ours are Tip-Adapter's, chosen on val. Fresh views
        # train the keys, not the ones averaged into them (the original draws new augmentations).
        return fit_cache_model(
            problem, self.name, trained=True, generator=problem.generator(), epochs=self.epochs, lr=self.lr,
            batch_size=self.batch_size,
        )  # fmt: skip
