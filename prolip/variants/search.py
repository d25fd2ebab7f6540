"""``ProLIPSearch``, the grid search as an estimator (the images half of :mod:`prolip.training.search`).

The search itself (grid, tie rule) is :mod:`prolip.training.search`; this module wires it to images, the
estimator and the delta file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from prolip.adapter import ProLIPAdapter
from prolip.errors import InputError
from prolip.features.cache import CachedFeatures, check_features
from prolip.features.dataset_objects import labelled
from prolip.features.images import kept
from prolip.training.fit import fitted_state, prepare
from prolip.training.fitted import FittedState
from prolip.training.labels import check_lengths, label_indices, label_list
from prolip.training.search import PAPER_LAMBDAS, PAPER_LRS, check_grid, search_projector


def adapter_from_state(template: ProLIPAdapter, state: FittedState, **changes: Any) -> ProLIPAdapter:
    """A new adapter with ``template``'s parameters (and ``changes``), fitted with ``state``.

    It shares ``template``'s model object, so no second copy of the backbone is loaded; ``template``
    itself is left as it was (scikit-learn's meta-estimators never fit the estimator they are given).
    """
    params = {**template.get_params(), **changes}
    params.pop("model"), params.pop("pretrained")
    return ProLIPAdapter.from_state(state, template.backbone.model, template.pretrained, **params)


class ProLIPSearch:
    """Few-shot validation around a :class:`~prolip.ProLIPAdapter`: fit at every (lr, λ), keep the best.

    A meta-estimator in the spirit of scikit-learn's ``GridSearchCV``, with the validation set given
    explicitly (the paper's N-shot validation draw) instead of cross-validation folds.

    Args:
        adapter: the (unfitted) adapter whose other parameters (model, views, epochs, ...) every
            grid point uses; its ``lr`` and ``reg_lambda`` are what the search chooses.
        lrs, reg_lambdas: the grid (default: the paper's).

    Attributes (after fit):
        best_estimator_: a fitted ProLIPAdapter at the chosen point (its delta file records the
            grid and every validation accuracy under ``selection``).
        best_params_: ``{"lr": ..., "reg_lambda": ...}``.
        cv_results_: the grid and validation accuracies (:meth:`prolip.training.search.SearchResult.as_dict`).
    """

    def __init__(
        self, adapter: ProLIPAdapter, *, lrs: Sequence[float] = PAPER_LRS, reg_lambdas: Sequence[float] = PAPER_LAMBDAS
    ) -> None:
        self.adapter = adapter
        self.lrs = lrs
        self.reg_lambdas = reg_lambdas

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, as scikit-learn's ``get_params``."""
        return {"adapter": self.adapter, "lrs": self.lrs, "reg_lambdas": self.reg_lambdas}

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
        on_error = self.adapter.on_error
        images, labels, class_names = labelled(images, labels, class_names, on_error, self.adapter.verbose)
        val_images, val_labels, _ = labelled(val_images, val_labels, on_error=on_error)
        check_lengths(val_images, val_labels)
        features = self.adapter.extract_features(images)
        labels = kept(label_list(labels), self.adapter.skipped_)
        val_features = self.adapter.extract_features(val_images, views=0)
        val_labels = kept(label_list(val_labels), self.adapter.skipped_)
        return self.fit_features(features, labels, val_features, val_labels, class_names)

    def fit_features(
        self,
        features: torch.Tensor | CachedFeatures,
        labels: Sequence[Hashable],
        val_features: torch.Tensor,
        val_labels: Sequence[Hashable],
        class_names: Mapping[Hashable, str] | Sequence[str] | None = None,
    ) -> ProLIPSearch:
        """Search on features from ``adapter.extract_features`` (training views; validation ``views=0``); returns self."""
        lrs, reg_lambdas = check_grid(self.lrs, self.reg_lambdas)
        adapter = self.adapter
        params, backbone = adapter.get_params(), adapter.backbone
        alpha = params["taskres_alpha"]
        if params["target"] != "image" or alpha is not None:
            chosen = f"target={params['target']!r}" if alpha is None else f"taskres_alpha={alpha!r}"
            raise InputError(f"the validation search trains the image projector alone, not with {chosen}.")
        task = prepare(backbone, features, labels, class_names, params)
        classifier = backbone.classifier(task.class_names, task.templates)
        val_features = check_features(val_features, backbone.projector.feature_width, "val_features")
        val_y = label_indices(val_labels, task.classes, "val_labels")
        found = search_projector(
            task.features, task.labels, val_features, val_y, backbone.projector.head, classifier, task.config,
            lrs, reg_lambdas,
        )  # fmt: skip
        self.best_params_ = {"lr": found.lr, "reg_lambda": found.reg_lambda}
        task = dataclasses.replace(task, config=task.config.at(found.lr, found.reg_lambda))
        state = fitted_state(
            backbone, task, found.result, classifier, {**params, **self.best_params_}, selection=found.as_dict()
        )
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

    def save(self, path: Any) -> None:
        """``best_estimator_.save``: the chosen delta, with the grid in its metadata."""
        self.best_estimator_.save(path)
