"""``tip-adapter-f``: Tip-Adapter-F (Zhang et al., ECCV 2022), the cache model with trained keys.

The keys start as Tip-Adapter's and are trained with cross-entropy on the cache model's scores: 20
epochs, one new augmented view of every training image per epoch, minibatches of 256, AdamW
(lr 1e-3, eps 1e-4), cosine schedule over all iterations. α and β are then searched on the
validation draw, as for Tip-Adapter.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from prolip.bench.cache_model import cache_keys
from prolip.bench.method_tools import embed_view
from prolip.bench.methods.base import FittedMethod, Method, register
from prolip.bench.methods.tip_adapter import CacheModel, select_alpha_beta
from prolip.bench.problem import Problem
from prolip.training.tip_cache import AUGMENT_VIEWS, KEY_BATCH_SIZE, KEY_EPOCHS, KEY_LR, train_keys


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
        head, train = problem.image_head, problem.train
        with torch.no_grad():
            keys = cache_keys(head, train)
        # The original trains with hand-set per-dataset α and β; ours are Tip-Adapter's, chosen on val.
        alpha, beta = select_alpha_beta(problem, keys, self.name)
        keys = train_keys(
            keys,
            # Fresh views, not the ones averaged into the keys (the original draws new augmentations).
            lambda epoch: embed_view(head, train, AUGMENT_VIEWS + epoch, normalize=True),
            train.labels, problem.classes.classifier, alpha=alpha, beta=beta, logit_scale=problem.logit_scale,
            generator=problem.generator(), epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
        )  # fmt: skip
        alpha, beta = select_alpha_beta(problem, keys, self.name)
        return CacheModel(problem, keys, alpha, beta, self.name)
