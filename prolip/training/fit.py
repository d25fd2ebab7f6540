"""From features and labels to a :class:`~prolip.training.fitted.FittedState`: one ProLIP fit, end to end.

The estimator's ``fit_features`` is :func:`fit_projector` plus bookkeeping. What decides what is trained
(classes, prompts, N, λ, the logit scale: :func:`prepare`) and what is recorded about it
(:func:`fitted_state`) is here, so that every way of fitting a projector (one fit, or the validation
search of :mod:`prolip.variants.search`) trains and records the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prolip.errors import InputError
from prolip.features.cache import CachedFeatures, check_features
from prolip.model.backbone import Backbone
from prolip.model.zeroshot import average_prompts, check_templates, text_prototypes
from prolip.training.engine import TrainConfig, TrainResult, train_projector
from prolip.training.fitted import FittedState
from prolip.training.labels import encode_labels, label_list, names_of_classes
from prolip.training.sides import ClassifierResidual, TextSide

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


@dataclass(frozen=True)
class FitSettings:
    """Everything a projector fit takes besides the data, typed and built once per fit
    (:meth:`prolip.ProLIPAdapter.fit_settings`) and passed whole.

    Attributes:
        config: the training run (lr, the λ rule, epochs, s, dtype, device, verbosity); :func:`prepare` resolves
            λ and s against the task's N and the model's own scale.
        templates: the prompt templates (None: the default).
        target: which projectors train: "image", "text" or "image+text".
        taskres_alpha: None, or α of a TaskRes residual on T trained beside the image projector (ProLIP + TaskRes).
        hyperparameters: what the fitted state records (:data:`SAVED_PARAMS`, JSON values).
    """

    config: TrainConfig
    templates: tuple[str, ...] | None
    target: str
    taskres_alpha: float | None
    hyperparameters: Mapping[str, Any]


@dataclass(frozen=True)
class FitTask:
    """One few-shot task, ready to train: checked features, class indices, names, prompts and the resolved settings.

    Attributes:
        features: ``[V, n, width]`` (a tensor or lazy cached features).
        classes: the labels, in column order.
        labels: each image's class index ``[n]``.
        class_names: the text put into the templates for each class.
        templates: the prompt templates.
        n_shots: N, images per class (n / K).
        config: the training settings, λ and s resolved to numbers.
    """

    features: torch.Tensor | CachedFeatures
    classes: list[Hashable]
    labels: torch.Tensor
    class_names: list[str]
    templates: list[str]
    n_shots: float
    config: TrainConfig


def prepare(
    backbone: Backbone,
    features: torch.Tensor | CachedFeatures,
    labels: Sequence[Hashable],
    class_names: Mapping[Hashable, str] | Sequence[str] | None,
    settings: FitSettings,
) -> FitTask:
    """The task of fitting ``backbone``'s projector on ``features [V, n, width]`` and ``labels`` with ``settings``.

    Raises:
        InputError: features and labels do not fit, fewer than two classes, or malformed templates or names.
    """
    features = check_features(features, backbone.projector.feature_width)
    labels = label_list(labels)
    if features.shape[1] != len(labels):
        raise InputError(f"features hold {features.shape[1]} images but {len(labels)} labels were given.")
    classes, y = encode_labels(labels)
    n_shots = len(y) / len(classes)
    config = settings.config.resolved(n_shots, backbone.logit_scale)
    names = names_of_classes(classes, class_names)
    return FitTask(features, classes, y, names, check_templates(settings.templates), n_shots, config)


def fit_projector(
    backbone: Backbone,
    features: torch.Tensor | CachedFeatures,
    labels: Sequence[Hashable],
    class_names: Mapping[Hashable, str] | Sequence[str] | None,
    settings: FitSettings,
) -> FittedState:
    """Train the projector(s) of ``backbone`` on pre-projection ``features [V, n, d_in]`` and ``labels``.

    ``settings.target`` says which projectors train ("image"; "text" or "image+text": T from the trained text
    projection), ``settings.taskres_alpha`` adds TaskRes's residual; epochs 0 leaves W = W0 (zero-shot).
    """
    task = prepare(backbone, features, labels, class_names, settings)
    alpha, target = settings.taskres_alpha, settings.target
    if alpha is not None and target != "image":
        raise InputError(f"taskres_alpha trains a residual beside the image projector only; got target={target!r}.")
    head = backbone.projector.head
    text: dict[str, Any] = {}
    if target != "image":  # ProLIP-text: T from the text projection, trained (with W, for "image+text")
        text_projector = backbone.text_projector
        side = TextSide(backbone.prompt_features(task.class_names, task.templates), text_projector.head.frozen())
        # With epochs=0 the loop leaves W_t = W_t0 (and W = W0): T is the prompts' zero-shot classifier.
        result = train_projector(task.features, task.labels, head, side, task.config, train_image=target != "text")
        text = {
            "text_delta": text_projector.from_in_out(result.classifier_weight - side.start).contiguous(),
            "text_projector_key": text_projector.key,
            "text_projector_family": text_projector.family,
            "text_fingerprint": backbone.text_fingerprint,
        }
        classifier = result.classifier
    elif alpha is not None and task.config.epochs:  # ProLIP + TaskRes: T = normalize(t + αR), R trained with W
        embeddings = backbone.prompt_embeddings(task.class_names, task.templates)
        side = ClassifierResidual(text_prototypes(average_prompts(embeddings), embeddings), float(alpha))
        result = train_projector(task.features, task.labels, head, side, task.config)
        classifier = result.classifier
    else:
        classifier = backbone.classifier(task.class_names, task.templates)
        result = train_projector(task.features, task.labels, head, classifier, task.config)
    return fitted_state(backbone, task, result, classifier, settings.hyperparameters, **text)


def fitted_state(
    backbone: Backbone,
    task: FitTask,
    result: TrainResult,
    classifier: torch.Tensor,
    hyperparameters: Mapping[str, Any],
    **fields: Any,
) -> FittedState:
    """The :class:`FittedState` of ``result`` on ``task``: the vision delta, T, and what the fit records.

    ``hyperparameters`` are recorded as given (:attr:`FitSettings.hyperparameters`, with the lr and λ a search
    chose); ``fields`` are further :class:`FittedState` fields (a text delta, a selection).
    """
    config, projector = task.config, backbone.projector
    logger.info(
        "fitted %d classes, N=%.3g, lambda=%.3g, %d steps", len(task.classes), task.n_shots, config.reg_lambda,
        config.epochs,
    )  # fmt: skip
    delta = None  # the vision projector did not train
    if result.weight is not None:
        w0 = projector.to_in_out(projector.parameter).detach().float().cpu()
        delta = projector.from_in_out(result.weight - w0).contiguous()
    return FittedState(
        delta=delta,
        classifier=classifier,
        classes=tuple(task.classes),
        class_names=tuple(task.class_names),
        templates=tuple(task.templates),
        n_shots=task.n_shots,
        reg_lambda=config.reg_lambda,
        logit_scale=config.logit_scale,
        projector_key=projector.key,
        projector_family=projector.family,
        model_name=backbone.recorded[0],
        pretrained=backbone.recorded[1],
        hyperparameters=dict(hyperparameters),
        fingerprint=backbone.fingerprint,
        loss_history=result.losses.numpy(),
        **fields,
    )
