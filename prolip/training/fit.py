"""From features and labels to a :class:`~prolip.training.fitted.FittedState`: one ProLIP fit, end to end.

The estimator's ``fit_features`` is this function plus bookkeeping; everything that decides what
is trained (classes, prompts, N, λ, the logit scale) and what is recorded about it is here.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from prolip.errors import InputError
from prolip.features.cache import CachedFeatures, check_features
from prolip.model.backbone import Backbone
from prolip.model.zeroshot import average_prompts, check_templates, text_prototypes
from prolip.params import resolve_reg_lambda
from prolip.training.fitted import FittedState
from prolip.training.labels import encode_labels, label_indices, label_list, names_of_classes
from prolip.training.loop import ClassifierResidual, TextSide, TrainResult, train_projector
from prolip.training.search import SearchResult, search_projector

logger = logging.getLogger(__name__)

SAVED_PARAMS = (
    "templates",
    "lr",
    "reg_lambda",
    "epochs",
    "views",
    "logit_scale",
    "random_state",
    "precision",
    "target",
    "taskres_alpha",
    "train_dtype",
)
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
    ("auto" = 1/N, "1/N^2" = 1/N²), epochs (0: zero-shot, W = W0), logit_scale (None: the model's), target
    (which projectors train: "image", "text" or "image+text"), train_dtype ("fp32", or "fp16" as
    the official code: :mod:`prolip.training.half`), taskres_alpha (None, or α of a
    TaskRes residual on T trained with the image projector: ProLIP + TaskRes), verbose, and what
    :data:`SAVED_PARAMS` records.

    With ``validation = (val_features, val_labels, lrs, reg_lambdas)`` (``target="image"`` only),
    ``lr`` and ``reg_lambda`` are chosen on the validation draw instead
    (:func:`prolip.training.search.search_projector`), and the state records the grid and every
    validation accuracy as its ``selection``.
    """
    projector = backbone.projector
    features = check_features(features, projector.feature_width)
    labels = label_list(labels)
    if features.shape[1] != len(labels):
        raise InputError(f"features hold {features.shape[1]} images but {len(labels)} labels were given.")
    classes, y = encode_labels(labels)
    names = names_of_classes(classes, class_names)
    templates = check_templates(params["templates"])
    n_shots = len(y) / len(classes)
    reg_lambda = resolve_reg_lambda(params["reg_lambda"], n_shots)
    logit_scale = float(params["logit_scale"]) if params["logit_scale"] is not None else backbone.logit_scale
    w0 = projector.to_in_out(projector.parameter)
    train = {
        "logit_scale": logit_scale,
        "lr": float(params["lr"]),
        "reg_lambda": reg_lambda,
        "epochs": params["epochs"],
        "device": backbone.device,
        "verbose": params["verbose"],
        "train_dtype": params["train_dtype"],
    }
    text: dict[str, Any] = {}
    selection = None
    alpha = params["taskres_alpha"]
    if alpha is not None and params["target"] != "image":
        raise InputError(
            f"taskres_alpha trains a residual beside the image projector only; got target={params['target']!r}."
        )
    if validation is not None and (params["target"] != "image" or alpha is not None):
        chosen = f"target={params['target']!r}" if alpha is None else f"taskres_alpha={alpha!r}"
        raise InputError(f"the validation search trains the image projector alone, not with {chosen}.")
    if validation is not None:
        classifier = backbone.classifier(names, templates)
        searched = _search(features, y, classes, classifier, w0, projector.bias, validation, backbone, train)
        result, selection = searched.result, searched.as_dict()
        params = {**params, "lr": searched.lr, "reg_lambda": searched.reg_lambda}
        reg_lambda = searched.reg_lambda
    elif params["target"] != "image":
        result, text = _fit_text(
            backbone, features, y, names, templates, train_image=params["target"] != "text", **train
        )
        classifier = text.pop("classifier")
    elif alpha is not None and params["epochs"]:
        embeddings = backbone.prompt_embeddings(names, templates)
        side = ClassifierResidual(text_prototypes(average_prompts(embeddings), embeddings), float(alpha))
        result = train_projector(features, y, None, w0, projector.bias, side=side, **train)
        classifier = result.classifier
    else:
        classifier = backbone.classifier(names, templates)
        if params["epochs"]:
            result = train_projector(features, y, classifier, w0, projector.bias, **train)
        else:  # zero-shot: W stays W0
            result = TrainResult(weight=w0.detach().float().cpu(), losses=torch.empty(0))
    hyperparameters = {k: params[k] for k in SAVED_PARAMS}
    hyperparameters.update(
        templates=list(params["templates"]) if params["templates"] else None,
        random_state=None if params["random_state"] is None else int(params["random_state"]),
    )
    logger.info("fitted %d classes, N=%.3g, lambda=%.3g, %d steps", len(classes), n_shots, reg_lambda, params["epochs"])
    delta = None  # the vision projector did not train
    if result.weight is not None:
        delta = projector.from_in_out(result.weight - w0.detach().float().cpu()).contiguous()
    return FittedState(
        delta=delta,
        classifier=classifier,
        classes=tuple(classes),
        class_names=tuple(names),
        templates=tuple(templates),
        n_shots=n_shots,
        reg_lambda=reg_lambda,
        logit_scale=logit_scale,
        projector_key=projector.key,
        projector_family=projector.family,
        model_name=backbone.recorded[0],
        pretrained=backbone.recorded[1],
        hyperparameters=hyperparameters,
        fingerprint=backbone.fingerprint,
        loss_history=result.losses.numpy(),
        selection=selection,
        **text,
    )


def _search(
    features: torch.Tensor | CachedFeatures,
    y: torch.Tensor,
    classes: Sequence[Hashable],
    classifier: torch.Tensor,
    w0: torch.Tensor,
    bias: torch.Tensor | None,
    validation: tuple[torch.Tensor, Sequence[Hashable], Sequence[float], Sequence[float]],
    backbone: Backbone,
    train: Mapping[str, Any],
) -> SearchResult:
    """The validation search of :func:`fit_projector` (labels mapped onto the training classes)."""
    val_features, val_labels, lrs, reg_lambdas = validation
    val_features = check_features(val_features, backbone.projector.feature_width, "val_features")
    val_y = label_indices(val_labels, classes, "val_labels")
    return search_projector(
        features, y, val_features, val_y, classifier, w0, bias, logit_scale=train["logit_scale"],
        epochs=train["epochs"], device=train["device"], lrs=lrs, reg_lambdas=reg_lambdas, verbose=train["verbose"],
        train_dtype=train["train_dtype"],
    )  # fmt: skip


def _fit_text(
    backbone: Backbone,
    features: torch.Tensor | CachedFeatures,
    labels: torch.Tensor,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    train_image: bool,
    **train: Any,
) -> tuple[TrainResult, dict[str, Any]]:
    """ProLIP-text: train the text projection (and, with ``train_image``, the vision projector) on the prompts.

    Returns the training result and the :class:`FittedState` fields of the text side (with the
    ``classifier`` the trained projection gives).
    """
    projector, text_projector = backbone.projector, backbone.text_projector
    text_w0 = text_projector.to_in_out(text_projector.parameter).detach().float().cpu()
    text = TextSide(backbone.prompt_features(class_names, templates), text_w0)
    w0 = projector.to_in_out(projector.parameter)
    # With epochs=0 the loop leaves W_t = W_t0 (and W = W0): T is the prompts' zero-shot classifier.
    result = train_projector(features, labels, None, w0, projector.bias, side=text, train_image=train_image, **train)
    fields = {
        "classifier": result.classifier,
        "text_delta": text_projector.from_in_out(result.classifier_weight - text_w0).contiguous(),
        "text_projector_key": text_projector.key,
        "text_projector_family": text_projector.family,
        "text_fingerprint": backbone.text_fingerprint,
    }
    return result, fields
