"""Few-shot validation: (lr, λ) chosen on a validation draw — the grid search on features and ``ProLIPSearch``.

The paper's main results choose (lr, λ) per dataset and draw from lr ∈ {1e-2 … 1e-8} ×
λ ∈ {10, 1, 0.1, 0.01, 1e-3, 1e-4, 0} by accuracy on an N-shot validation draw. Here the training
and validation features are extracted once and every grid point only trains (the reference code
recomputes the validation features at every point), and the points train side by side
(:func:`prolip.training.engine.train_grid`: every step reads one view once for all of them); validation
accuracy is one small matrix product per point (:func:`search_projector`). :class:`ProLIPSearch` is the
search as an estimator around a :class:`~prolip.ProLIPAdapter`; ``prolip bench``'s ``prolip-val`` runs
:func:`search_projector` on its problems.

Tie rule, as the reference code's loop: learning rates outer, λ inner, each in the order given,
and a point replaces the best only if strictly more accurate — so among equally accurate points
the first in grid order wins; with the paper's grids (largest first) that is the largest learning
rate, then the largest λ. A point whose training diverges is never chosen.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from prolip.adapter import ProLIPAdapter
from prolip.errors import DeltaFileError, InputError, NotFittedError, TrainingDivergedError
from prolip.estimator import Estimator
from prolip.features.cache import CachedFeatures, check_features
from prolip.features.dataset_objects import labelled
from prolip.features.images import kept
from prolip.files.hub import HubMixin
from prolip.model.head import LinearHead
from prolip.params import LRS, REG_LAMBDAS, Constraint, validate_params
from prolip.progress import progress
from prolip.training.engine import TrainConfig, TrainResult, train_grid
from prolip.training.fit import fitted_state, prepare
from prolip.training.fitted import FittedState
from prolip.training.labels import check_lengths, label_indices, label_list

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
    validate_params({"lrs": lrs, "reg_lambdas": reg_lambdas}, _GRID)
    lrs, reg_lambdas = tuple(float(v) for v in lrs), tuple(float(v) for v in reg_lambdas)
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
    with progress(total=len(grid), desc="validation grid", unit="fit", verbose=config.verbose, leave=False) as bar:
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


def adapter_from_state(template: ProLIPAdapter, state: FittedState, **changes: Any) -> ProLIPAdapter:
    """A new adapter with ``template``'s parameters (and ``changes``), fitted with ``state``.

    It shares ``template``'s model object, so no second copy of the backbone is loaded; ``template``
    itself is left as it was (scikit-learn's meta-estimators never fit the estimator they are given).
    """
    params = {**template.get_params(deep=False), **changes}
    params.pop("model"), params.pop("pretrained")
    return ProLIPAdapter.from_state(state, template.backbone.model, template.pretrained, **params)


_GRID = {"lrs": LRS, "reg_lambdas": REG_LAMBDAS}


class ProLIPSearch(HubMixin, Estimator):
    """Few-shot validation around a :class:`~prolip.ProLIPAdapter`: fit at every (lr, λ), keep the best.

    A meta-estimator in the spirit of scikit-learn's ``GridSearchCV``, with the validation set given
    explicitly (the paper's N-shot validation draw) instead of cross-validation folds.

    Args:
        adapter: the (unfitted) adapter whose other parameters (model, views, epochs, ...) every
            grid point uses; its ``lr`` and ``reg_lambda`` are what the search chooses.
        lrs: the learning rates of the grid (default: the paper's).
        reg_lambdas: the λ of the grid (default: the paper's).

    Attributes (after fit, or load of a file it saved):
        best_estimator_: a fitted ProLIPAdapter at the chosen point (its delta file records the
            grid and every validation accuracy under ``selection``).
        best_params_: ``{"lr": ..., "reg_lambda": ...}``.
        cv_results_: the grid and validation accuracies (:meth:`SearchResult.as_dict`).

    ``save`` / ``save_pretrained`` / ``push_to_hub`` share ``best_estimator_``'s delta (kind ``projector``), which
    ``ProLIPAdapter.load`` reads as any other; ``ProLIPSearch.load`` also restores the search's results.
    """

    _parameter_constraints: ClassVar[dict[str, Constraint]] = {
        "adapter": Constraint("a ProLIPAdapter", lambda v: isinstance(v, ProLIPAdapter)),
        **_GRID,
    }
    kind: ClassVar[str] = "projector"

    def __init__(
        self, adapter: ProLIPAdapter, *, lrs: Sequence[float] = PAPER_LRS, reg_lambdas: Sequence[float] = PAPER_LAMBDAS
    ) -> None:
        self.adapter = adapter
        self.lrs = lrs
        self.reg_lambdas = reg_lambdas

    def fit(
        self,
        images: Sequence[Any],
        labels: Sequence[Hashable] | None,
        val_images: Sequence[Any],
        val_labels: Sequence[Hashable] | None = None,
        class_names: Mapping[Hashable, str] | Sequence[str] | None = None,
    ) -> ProLIPSearch:
        """Extract the training views and the validation images' plain views once, then search; returns self.

        ``images`` and ``val_images`` may be dataset objects, whose labels are used when ``labels`` /
        ``val_labels`` is None (see :func:`prolip.features.dataset_objects.labelled`).
        """
        self._check()  # once, before any image is read
        on_error = self.adapter.on_error
        images, labels, class_names, _ = labelled(images, labels, class_names, on_error, self.adapter.verbose)
        val_images, val_labels, *_ = labelled(val_images, val_labels, on_error=on_error)
        check_lengths(val_images, val_labels)
        train, val = self.adapter.extract(images), self.adapter.extract(val_images, views=0)
        labels, val_labels = kept(label_list(labels), train.skipped), kept(label_list(val_labels), val.skipped)
        return self._search(train.features, labels, val.features, val_labels, class_names)

    def _check(self) -> None:
        """This search's parameters and its adapter's, each against its class's constraints."""
        self.check_params()
        self.adapter.check_params()

    def fit_features(
        self,
        features: torch.Tensor | CachedFeatures,
        labels: Sequence[Hashable],
        val_features: torch.Tensor,
        val_labels: Sequence[Hashable],
        class_names: Mapping[Hashable, str] | Sequence[str] | None = None,
    ) -> ProLIPSearch:
        """Search on features from ``adapter.extract_features`` (training views; validation ``views=0``); returns self."""
        self._check()
        return self._search(features, labels, val_features, val_labels, class_names)

    def _search(
        self,
        features: torch.Tensor | CachedFeatures,
        labels: Sequence[Hashable],
        val_features: torch.Tensor,
        val_labels: Sequence[Hashable],
        class_names: Mapping[Hashable, str] | Sequence[str] | None,
    ) -> ProLIPSearch:
        adapter = self.adapter
        settings, backbone = adapter.fit_settings(), adapter.backbone
        alpha = settings.taskres_alpha
        if settings.target != "image" or alpha is not None:
            chosen = f"target={settings.target!r}" if alpha is None else f"taskres_alpha={alpha!r}"
            raise InputError(f"the validation search trains the image projector alone, not with {chosen}.")
        task = prepare(backbone, features, labels, class_names, settings)
        classifier = backbone.classifier(task.class_names, task.templates)
        val_features = check_features(val_features, backbone.projector.feature_width, "val_features")
        val_y = label_indices(val_labels, task.classes, "val_labels")
        found = search_projector(
            task.features, task.labels, val_features, val_y, backbone.projector.head, classifier, task.config,
            self.lrs, self.reg_lambdas,
        )  # fmt: skip
        self.best_params_ = {"lr": found.lr, "reg_lambda": found.reg_lambda}
        task = dataclasses.replace(task, config=task.config.at(found.lr, found.reg_lambda))
        recorded = {**settings.hyperparameters, **self.best_params_}
        state = fitted_state(backbone, task, found.result, classifier, recorded, selection=found.as_dict())
        self.best_estimator_ = adapter_from_state(adapter, state, **self.best_params_)
        self.cv_results_ = found.as_dict()
        return self

    def predict(self, images: Sequence[Any]) -> Any:
        """``best_estimator_.predict``."""
        return self.best_estimator_.predict(images)

    def predict_proba(self, images: Sequence[Any]) -> Any:
        """``best_estimator_.predict_proba``."""
        return self.best_estimator_.predict_proba(images)

    def score(self, images: Sequence[Any], labels: Sequence[Hashable] | None = None) -> float:
        """``best_estimator_.score``."""
        return self.best_estimator_.score(images, labels)

    # ------------------------------------------------------------------ files (HubMixin: best_estimator_'s delta)
    def _fitted_state(self) -> FittedState:
        if "best_estimator_" not in self.__dict__:
            raise NotFittedError("This ProLIPSearch is not fitted yet; call fit(...) or fit_features(...) first.")
        return self.best_estimator_.fitted_

    @classmethod
    def _from_state(cls, state: FittedState, source: str, *args: Any, **kwargs: Any) -> ProLIPSearch:
        """Loading options as :meth:`prolip.ProLIPAdapter.load`; the file must record a search (``selection``)."""
        found = state.selection
        if found is None:
            raise DeltaFileError(
                f"{source} holds a fit without a validation search (no 'selection'); load it with "
                "prolip.ProLIPAdapter.load."
            )
        best = ProLIPAdapter.from_state(state, *args, source=source, **kwargs)
        template = ProLIPAdapter(**best.get_params(deep=False))  # unfitted, as fit leaves the adapter it is given
        search = cls(template, lrs=found["lrs"], reg_lambdas=found["reg_lambdas"])
        search.best_estimator_ = best
        search.best_params_ = {"lr": found["lr"], "reg_lambda": found["reg_lambda"]}
        search.cv_results_ = dict(found)
        return search
