"""Tip-Adapter's cache model, shared by ``tip-adapter`` and ``tip-adapter-f``.

Scores are ``s · f·Tᵀ + α · exp(−β (1 − f·Kᵀ)) · L`` for an L2-normalised image embedding f, the
zero-shot classifier T, cache keys K (one per training image) and values L, the one-hot labels
of the keys. α and β are
chosen on the validation draw over one fixed grid (:data:`BETAS` × :data:`ALPHAS`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from prolip.bench.fitting import embed_view
from prolip.bench.problem import FeatureSet, ImageHead

BETAS = torch.logspace(-1, math.log10(50), 40, dtype=torch.float64).tolist()
"""β grid: 40 log-spaced values from 0.1 to 50 (covering the original's per-dataset ranges)."""
ALPHAS = torch.logspace(-1, math.log10(50), 25, dtype=torch.float64).tolist()
"""α grid: 25 log-spaced values from 0.1 to 50."""
AUGMENT_VIEWS = 10
"""Augmented views averaged into each cache key (the original's ``augment_epoch``)."""
_SEARCH_BLOCK = 1024  # validation images scored at once in the search


def cache_keys(head: ImageHead, train: FeatureSet, views: int = AUGMENT_VIEWS) -> torch.Tensor:
    """Keys ``[n, d_out]``: the mean over the first ``views`` augmented views of each training
    image's unnormalised embedding, L2-normalised (as the original builds them)."""
    total = sum(embed_view(head, train, v) for v in range(views))
    return F.normalize(total, dim=-1)


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
