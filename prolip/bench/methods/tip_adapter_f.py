"""``tip-adapter-f``: Tip-Adapter-F (Zhang et al., ECCV 2022), the cache model with trained keys.

The keys start as Tip-Adapter's and are trained with cross-entropy on the cache model's scores: 20
epochs, one new augmented view of every training image per epoch, minibatches of 256, AdamW
(lr 1e-3, eps 1e-4), cosine schedule over all iterations. α and β are then searched on the
validation draw, as for Tip-Adapter.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from prolip.bench.cache_model import AUGMENT_VIEWS, cache_keys, tip_logits
from prolip.bench.fitting import embed_view, epoch_batches, set_lr
from prolip.bench.methods.base import FittedMethod, Method, register
from prolip.bench.methods.tip_adapter import CacheModel, select_alpha_beta
from prolip.bench.problem import Problem


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

    def __init__(self, epochs: int = 20, lr: float = 1e-3, batch_size: int = 256) -> None:
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size

    def fit(self, problem: Problem) -> FittedMethod:
        head, train = problem.image_head, problem.train
        with torch.no_grad():
            keys = cache_keys(head, train)
        # The original trains with hand-set per-dataset α and β; ours are Tip-Adapter's, chosen on val.
        alpha, beta = select_alpha_beta(problem, keys, self.name)
        keys.requires_grad_(True)
        optimizer = torch.optim.AdamW([keys], lr=self.lr, eps=1e-4, fused=True)
        generator = problem.generator()
        steps = self.epochs * math.ceil(train.labels.numel() / self.batch_size)
        step = 0
        for epoch in range(self.epochs):
            # Fresh views, not the ones averaged into the keys (the original draws new augmentations).
            with torch.no_grad():
                x = embed_view(head, train, AUGMENT_VIEWS + epoch, normalize=True)
            for batch in epoch_batches(x.shape[0], self.batch_size, generator):
                set_lr(optimizer, self.lr * (1 + math.cos(math.pi * step / steps)) / 2)
                scores = tip_logits(
                    x[batch], problem.classes.classifier, keys, train.labels, alpha, beta, problem.logit_scale
                )
                loss = F.cross_entropy(scores, train.labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
        alpha, beta = select_alpha_beta(problem, keys, self.name)
        return CacheModel(problem, keys, alpha, beta, self.name)
