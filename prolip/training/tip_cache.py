"""Tip-Adapter's cache model: scores, the α / β search, and the cache a fitted ProLIP + Tip-Adapter keeps.

Scores are ``s · f·Tᵀ + α · exp(−β (1 − f·Kᵀ)) · L`` for an L2-normalised image embedding f, the
classifier T, cache keys K (one per training image) and values L, the one-hot labels of the keys
(Zhang et al., ECCV 2022). α and β are chosen on a validation set over one fixed grid
(:data:`BETAS` × :data:`ALPHAS`), never on test data. The bench's ``tip-adapter`` baselines
(:mod:`prolip.bench.cache_model`) and the library's :class:`~prolip.variants.prolip_tip_adapter.ProLIPTipAdapter`
share this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from prolip.training.engine import ADAM_EPS, build_optimizer, cosine_lr

BETAS = torch.logspace(-1, math.log10(50), 40, dtype=torch.float64).tolist()
"""β grid: 40 log-spaced values from 0.1 to 50 (covering the original's per-dataset ranges)."""
ALPHAS = torch.logspace(-1, math.log10(50), 25, dtype=torch.float64).tolist()
"""α grid: 25 log-spaced values from 0.1 to 50."""
AUGMENT_VIEWS = 10
"""Augmented views averaged into each cache key (the original's ``augment_epoch``)."""
KEY_EPOCHS, KEY_LR, KEY_BATCH_SIZE = 20, 1e-3, 256
"""Tip-Adapter-F's key training: epochs (one augmented view of every image each), AdamW's lr, minibatch size."""


_SEARCH_BLOCK = 1024  # validation images scored at once in the search


@dataclass(frozen=True, eq=False)
class TipCache:
    """The cache of a fitted ProLIP + Tip-Adapter: keys, their labels, α and β.

    Attributes:
        keys: K, float32 CPU ``[n, d_out]``, unit rows: each training image's adapted embedding
            (averaged over ``key_views`` augmented views, then normalised).
        labels: the keys' class indices, int64 CPU ``[n]`` (columns of the classifier).
        alpha: α, the cache's weight (0: the cache is off and the scores are ProLIP's).
        beta: β, the sharpness of the affinities.
        key_views: augmented views averaged into each key.
        trained_keys: whether the keys were then fine-tuned (Tip-Adapter-F, :func:`train_keys`).
        selection: how α and β were chosen on a validation set (``alphas``, ``betas``,
            ``val_accuracy`` of the chosen point), or None when they were given.
    """

    keys: torch.Tensor
    labels: torch.Tensor
    alpha: float
    beta: float
    key_views: int
    trained_keys: bool = False
    selection: Mapping[str, Any] | None = None

    def scores(self, embeddings: torch.Tensor, n_classes: int) -> torch.Tensor:
        """The cache term ``α · exp(−β (1 − f·Kᵀ)) · L`` ``[n, K]`` of normalised ``embeddings`` ``[n, d_out]``."""
        keys = self.keys.to(embeddings.device, embeddings.dtype)
        return self.alpha * cache_scores(embeddings @ keys.t(), self.labels.to(embeddings.device), n_classes, self.beta)


def cache_scores(affinity: torch.Tensor, labels: torch.Tensor, classes: int, beta: float) -> torch.Tensor:
    """The cache term ``exp(−β (1 − A)) · L`` ``[n, K]`` from the affinities ``A = f·Kᵀ`` ``[n, cache]``.

    L is the one-hot matrix of the cache's ``labels``; adding each column into its class costs
    n·cache operations where the product with L would cost n·cache·K.
    """
    weights = torch.exp(-beta * (1 - affinity))
    return weights.new_zeros(affinity.shape[0], classes).index_add(1, labels, weights)


def tip_logits(
    features: torch.Tensor,
    classifier: torch.Tensor,
    keys: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    logit_scale: float,
) -> torch.Tensor:
    """Tip-Adapter's scores ``s · f·Tᵀ + α · cache`` ``[n, K]`` of normalised embeddings ``[n, d]``.

    ``keys`` ``[cache, d]`` and their ``labels`` ``[cache]`` make the cache; T is ``[K, d]``.
    """
    cache = cache_scores(features @ keys.t(), labels, classifier.shape[0], beta)
    return logit_scale * features @ classifier.t() + alpha * cache


def search_alpha_beta(
    features: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.Tensor,
    keys: torch.Tensor,
    key_labels: torch.Tensor,
    logit_scale: float,
    betas: Sequence[float] = BETAS,
    alphas: Sequence[float] = ALPHAS,
) -> tuple[float, float, float]:
    """``(alpha, beta, accuracy)`` with the best accuracy on ``features`` (the validation draw).

    Ties go to the first in the order the original searches: β ascending, then α ascending.
    """
    alpha_grid = torch.tensor(alphas, dtype=features.dtype)[:, None, None]
    correct = torch.zeros(len(betas), len(alphas))
    with torch.no_grad():
        # A block of images at a time bounds the memory of the [α, images, K] scores.
        for rows in torch.arange(len(labels)).split(_SEARCH_BLOCK):
            f, y = features[rows], labels[rows]
            zero_shot, affinity = logit_scale * f @ classifier.t(), f @ keys.t()
            for i, beta in enumerate(betas):
                scores = zero_shot + alpha_grid * cache_scores(affinity, key_labels, classifier.shape[0], beta)
                correct[i] += (scores.argmax(dim=-1) == y).sum(dim=-1)
    best = int(correct.argmax())  # the first maximum in row-major, i.e. the original's, order
    b, a = divmod(best, len(alphas))
    return alphas[a], betas[b], float(correct.flatten()[best]) / len(labels)


def train_keys(
    keys: torch.Tensor,
    views: Callable[[int], torch.Tensor],
    labels: torch.Tensor,
    classifier: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    logit_scale: float,
    generator: torch.Generator,
    epochs: int = KEY_EPOCHS,
    lr: float = KEY_LR,
    batch_size: int = KEY_BATCH_SIZE,
) -> torch.Tensor:
    """Tip-Adapter-F: the cache keys fine-tuned with cross-entropy on the cache model's scores; returns them.

    Epoch e scores ``views(e)`` (normalised embeddings ``[n, d]`` of one augmented view of every
    training image, in ``labels`` order) in minibatches of a fresh random order drawn from
    ``generator``; AdamW (``lr``, eps 1e-4) with a cosine schedule over all iterations, as the
    original. ``keys`` itself is not modified.
    """
    keys = keys.detach().clone().requires_grad_(True)
    optimizer = build_optimizer("adamw", [keys], lr=lr, eps=ADAM_EPS)
    n = labels.numel()
    steps, step = epochs * math.ceil(n / batch_size), 0
    for epoch in range(epochs):
        with torch.no_grad():
            x = views(epoch)
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, step, steps)
            scores = tip_logits(x[batch], classifier, keys, labels, alpha, beta, logit_scale)
            loss = F.cross_entropy(scores, labels[batch.to(labels.device)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return keys.detach()
