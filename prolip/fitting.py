"""From features and labels to a :class:`~prolip.fitted.FittedState`: one ProLIP fit, end to end.

The estimator's ``fit_features`` is this function plus bookkeeping; everything that decides what
is trained (classes, prompts, N, λ, the logit scale) and what is recorded about it is here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from prolip.backbone import Backbone
from prolip.cache import CachedFeatures
from prolip.errors import InputError
from prolip.features import check_features
from prolip.fitted import FittedState
from prolip.labels import encode_labels, label_list, names_of_classes, plain_label
from prolip.search import search_projector
from prolip.training import TrainResult, train_projector
from prolip.zeroshot import check_templates

logger = logging.getLogger(__name__)

SAVED_PARAMS = ("templates", "lr", "reg_lambda", "epochs", "views", "logit_scale", "random_state", "precision")
"""The hyperparameters a fitted state records (JSON values; model objects and callables are not)."""


def fit_projector(
    backbone: Backbone,
    features: torch.Tensor | CachedFeatures,
    labels: Sequence[Hashable],
    class_names: Mapping[Hashable, str] | Sequence[str] | None,
    params: Mapping[str, Any],
    *,
    validation: tuple[torch.Tensor, Sequence[Hashable], Sequence[float], Sequence[float]] | None = None,
) -> FittedState:
    """Train the projector of ``backbone`` on pre-projection ``features [V, n, d_in]`` and ``labels``.

    ``params`` are a ProLIPAdapter's (already checked) parameters: templates, lr, reg_lambda
    ("auto" = 1/N), epochs (0: zero-shot, W = W0), logit_scale (None: the model's), verbose,
    and what :data:`SAVED_PARAMS` records.

    With ``validation = (val_features, val_labels, lrs, reg_lambdas)``, ``lr`` and ``reg_lambda``
    are chosen on the validation draw instead (:func:`prolip.search.search_projector`), and the
    state records the grid and every validation accuracy as its ``selection``.
    """
    projector = backbone.projector
    features = check_features(features, projector.feature_width)
    labels = label_list(labels)
    if features.shape[1] != len(labels):
        raise InputError(f"features hold {features.shape[1]} images but {len(labels)} labels were given.")
    classes, y = encode_labels(labels)
    names = names_of_classes(classes, class_names)
    templates = check_templates(params["templates"])
    classifier = backbone.classifier(names, templates)
    n_shots = len(y) / len(classes)
    reg_lambda = 1.0 / n_shots if params["reg_lambda"] == "auto" else float(params["reg_lambda"])
    logit_scale = float(params["logit_scale"]) if params["logit_scale"] is not None else backbone.logit_scale
    w0 = projector.to_in_out(projector.parameter)
    selection = None
    if validation is not None:
        val_features, val_labels, lrs, reg_lambdas = validation
        val_features = check_features(val_features, projector.feature_width, "val_features")
        index = {c: k for k, c in enumerate(classes)}
        unknown = [lab for lab in label_list(val_labels) if plain_label(lab) not in index]
        if unknown:
            raise InputError(f"val_labels hold labels the training labels do not: {unknown[:5]}.")
        searched = search_projector(
            features, y, val_features, torch.tensor([index[plain_label(v)] for v in label_list(val_labels)]),
            classifier, w0, projector.bias, logit_scale=logit_scale, epochs=params["epochs"], device=backbone.device,
            lrs=lrs, reg_lambdas=reg_lambdas, verbose=params["verbose"],
        )  # fmt: skip
        result, selection = searched.result, searched.as_dict()
        params = {**params, "lr": searched.lr, "reg_lambda": searched.reg_lambda}
        reg_lambda = searched.reg_lambda
    elif params["epochs"]:
        result = train_projector(
            features,
            y,
            classifier,
            w0,
            projector.bias,
            logit_scale=logit_scale,
            lr=float(params["lr"]),
            reg_lambda=reg_lambda,
            epochs=params["epochs"],
            device=backbone.device,
            verbose=params["verbose"],
        )
    else:  # zero-shot: W stays W0
        result = TrainResult(weight=w0.detach().float().cpu(), losses=torch.empty(0))
    hyperparameters = {k: params[k] for k in SAVED_PARAMS}
    hyperparameters.update(
        templates=list(params["templates"]) if params["templates"] else None,
        random_state=None if params["random_state"] is None else int(params["random_state"]),
    )
    logger.info("fitted %d classes, N=%.3g, lambda=%.3g, %d steps", len(classes), n_shots, reg_lambda, params["epochs"])
    return FittedState(
        delta=projector.from_in_out(result.weight - w0.detach().float().cpu()).contiguous(),
        classifier=classifier,
        classes=tuple(classes),
        class_names=tuple(names),
        templates=tuple(templates),
        n_shots=n_shots,
        reg_lambda=reg_lambda,
        logit_scale=logit_scale,
        projector_key=projector.key,
        projector_family=projector.family,
        model_name=backbone.name or "",
        pretrained=os.fspath(backbone.pretrained) if backbone.name and backbone.pretrained else "",
        hyperparameters=hyperparameters,
        fingerprint=backbone.fingerprint,
        loss_history=result.losses.numpy(),
        selection=selection,
    )
