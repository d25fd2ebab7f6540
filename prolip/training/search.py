"""The grid search on features (the tensor half; :mod:`prolip.variants.search` is the estimator): (lr, λ) by validation.

The paper's main results choose (lr, λ) per dataset and draw from lr ∈ {1e-2 … 1e-8} ×
λ ∈ {10, 1, 0.1, 0.01, 1e-3, 1e-4, 0} by accuracy on an N-shot validation draw. Here the training
and validation features are extracted once and every grid point only trains (the reference code
recomputes the validation features at every point), and the points train side by side
(:func:`prolip.training.engine.train_grid`: every step reads one view once for all of them); validation
accuracy is one small matrix product per point.

Tie rule, as the reference code's loop: learning rates outer, λ inner, each in the order given,
and a point replaces the best only if strictly more accurate — so among equally accurate points
the first in grid order wins; with the paper's grids (largest first) that is the largest learning
rate, then the largest λ. A point whose training diverges is never chosen.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from prolip.errors import InputError, TrainingDivergedError
from prolip.features.cache import CachedFeatures
from prolip.model.head import LinearHead
from prolip.training.engine import TrainConfig, TrainResult, train_grid

logger = logging.getLogger(__name__)

PAPER_LRS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
"""The paper's learning-rate grid."""

PAPER_LAMBDAS = (10.0, 1.0, 0.1, 0.01, 1e-3, 1e-4, 0.0)
"""The paper's λ grid."""

GRID_MEMORY_BYTES = 24 << 20
"""Per-step working set the search keeps for points trained side by side (about a CPU's last-level
cache): small problems train many points at once, where per-step overhead dominates; large ones
few, where side by side would only evict each other's matrices from the cache."""


@dataclass(frozen=True)
class SearchResult:
    """The outcome of :func:`search_projector`.

    Attributes:
        lr, reg_lambda: the chosen point.
        result: its training result (trained ``[d_in, d_out]`` weight and losses).
        lrs, reg_lambdas: the grid, in search order.
        accuracy: validation accuracy (fraction) ``[len(lrs), len(reg_lambdas)]``; NaN where training diverged.
    """

    lr: float
    reg_lambda: float
    result: TrainResult
    lrs: tuple[float, ...]
    reg_lambdas: tuple[float, ...]
    accuracy: torch.Tensor

    def as_dict(self) -> dict[str, Any]:
        """The chosen point and the whole grid of validation accuracies, as JSON values (NaN as None)."""
        grid = [[None if math.isnan(a) else a for a in row] for row in self.accuracy.tolist()]
        return {
            "lr": self.lr,
            "reg_lambda": self.reg_lambda,
            "lrs": list(self.lrs),
            "reg_lambdas": list(self.reg_lambdas),
            "val_accuracy": grid,
        }


def check_grid(lrs: Sequence[float], reg_lambdas: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The grid as tuples of floats, after checking it is non-empty, positive (lr) and non-negative (λ)."""
    try:
        lrs, reg_lambdas = tuple(float(v) for v in lrs), tuple(float(v) for v in reg_lambdas)
    except (TypeError, ValueError):
        raise InputError(f"lrs={lrs!r} and reg_lambdas={reg_lambdas!r} must be sequences of numbers.") from None
    if not lrs or not all(math.isfinite(v) and v > 0 for v in lrs):
        raise InputError(f"lrs={list(lrs)} must be a non-empty list of positive numbers, e.g. {list(PAPER_LRS)}.")
    if not reg_lambdas or not all(math.isfinite(v) and v >= 0 for v in reg_lambdas):
        raise InputError(
            f"reg_lambdas={list(reg_lambdas)} must be a non-empty list of numbers >= 0, e.g. {list(PAPER_LAMBDAS)}."
        )
    return lrs, reg_lambdas


def search_projector(
    features: torch.Tensor | CachedFeatures,
    labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    head: LinearHead,
    classifier: torch.Tensor,
    config: TrainConfig,
    lrs: Sequence[float] = PAPER_LRS,
    reg_lambdas: Sequence[float] = PAPER_LAMBDAS,
) -> SearchResult:
    """Train ProLIP at every (lr, λ) of the grid and keep the most accurate on the validation draw.

    Args:
        features, labels: training features ``[V, n, width]`` and class indices ``[n]``, as for
            :func:`prolip.training.engine.train_grid`, which trains every grid point.
        val_features, val_labels: the validation draw's plain-view features ``[m, width]`` (or
            ``[1, m, width]``) and class indices ``[m]``.
        head, classifier: the projector (W0, b) and T, as for ``train_projector``.
        config: the rest of the settings (epochs, s, numerics, device; ``verbose`` shows a bar over the grid).
        lrs, reg_lambdas: the grid (default: the paper's 7 × 7).

    Returns:
        The chosen point (tie rule in the module docstring), its training result and every
        point's validation accuracy.

    Raises:
        InputError: an empty or invalid grid, or an empty validation draw.
        TrainingDivergedError: training diverged at every grid point.
    """
    lrs, reg_lambdas = check_grid(lrs, reg_lambdas)
    val = val_features[0] if val_features.ndim == 3 else val_features
    if val.shape[0] == 0 or val.shape[0] != len(val_labels):
        raise InputError(
            f"the validation draw holds {val.shape[0]} images and {len(val_labels)} labels; "
            "it needs at least one image per class, with one label each."
        )
    device = config.device
    val, val_y = val.to(device, torch.float32), val_labels.to(device)
    val_head = head.frozen(device)
    accuracy = torch.full((len(lrs), len(reg_lambdas)), float("nan"))
    grid = [(i, j) for i in range(len(lrs)) for j in range(len(reg_lambdas))]
    # As many points side by side as fit in GRID_MEMORY_BYTES: W, its gradient, Adam's two moments
    # and the step's [n, d_out] and [n, K] buffers, per point.
    width, d_out = max(features.shape[-1], head.in_features), head.out_features
    per_point = 4 * (4 * len(labels) * d_out + len(labels) * classifier.shape[0] + 5 * width * d_out)
    chunk = max(1, min(len(grid), GRID_MEMORY_BYTES // per_point))
    quiet = dataclasses.replace(config, verbose=False)
    best: tuple[float, float, float, TrainResult] | None = None
    with tqdm(total=len(grid), desc="validation grid", unit="fit", disable=not config.verbose, leave=False) as bar:
        for start in range(0, len(grid), chunk):
            part = grid[start : start + chunk]
            points = [(lrs[i], reg_lambdas[j]) for i, j in part]
            results = train_grid(features, labels, head, classifier, quiet, points)
            for (i, j), result in zip(part, results, strict=True):
                if result is None:
                    logger.info("validation grid: lr=%g, lambda=%g diverged", lrs[i], reg_lambdas[j])
                    continue
                weight = result.weight.to(device)
                predicted = val_head.logits(val, classifier.to(device), config.logit_scale, weight).argmax(dim=1)
                accuracy[i, j] = float((predicted == val_y).float().mean())
                if best is None or accuracy[i, j] > best[0]:  # grid order: the first of equals stays
                    best = (float(accuracy[i, j]), lrs[i], reg_lambdas[j], result)
            bar.update(len(part))
    if best is None:
        raise TrainingDivergedError(
            f"training diverged at every point of the grid lrs={lrs}, reg_lambdas={reg_lambdas}."
        )
    logger.info("validation grid: chose lr=%g, lambda=%g (val accuracy %.4f)", best[1], best[2], best[0])
    return SearchResult(best[1], best[2], best[3], lrs, reg_lambdas, accuracy)
