"""The regularised linear adapter (RLA): a square A on a black-box model's image embeddings, as an estimator.

When the model is a service that returns image embeddings f (what ``encode_image`` returns, before
normalisation) and text embeddings, its projector cannot be touched. RLA learns a square matrix A
on top of f, initialised at the identity and regularised toward it:

    CE(s · normalize(f A) · Tᵀ, y) + λ‖A − I‖²_F,  λ = 1/N by default,

with ProLIP's optimiser, schedule and views (embeddings of augmented views of each image). That is
ProLIP's training with the embeddings as features, W0 = I and no bias, so it runs
:func:`prolip.training.engine.train_projector`. :class:`RegularizedLinearAdapter` needs only embeddings
and a text classifier (or a text encoder to build one); :class:`ModelRLA` computes the embeddings
with an open_clip model, for the command line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prolip.adapter import ProLIPAdapter
from prolip.errors import InputError, InputTypeError, NotFittedError
from prolip.estimator import Estimator, Learned
from prolip.features.cache import check_features
from prolip.features.dataset_objects import labelled
from prolip.features.images import ImageLike, SkippedImage, kept
from prolip.files.hub import HubMixin
from prolip.model.backbone import select_device
from prolip.model.fingerprint import Fingerprint
from prolip.model.head import LinearHead
from prolip.model.zeroshot import average_prompts, check_templates, prompts
from prolip.params import BOOLEAN, DEVICE, EPOCHS, LOGIT_SCALE, LR, REG_LAMBDA, TEMPLATES, Constraint
from prolip.training.engine import TrainConfig, train_projector
from prolip.training.fitted import LINEAR_ADAPTER_KEY, FittedState
from prolip.training.labels import accuracy, class_array, encode_labels, label_list, names_of_classes, plain_label

logger = logging.getLogger(__name__)

DEFAULT_LOGIT_SCALE = 100.0
"""s when none is given: the logit scale of the released CLIP models."""

_EMBEDDINGS = "image embeddings (what encode_image returns)"
_SAVED_PARAMS = ("lr", "reg_lambda", "epochs", "logit_scale", "templates")

TextEncoder = Callable[[list[str]], Any]
"""A text encoder: a list of prompts in, their embeddings ``[len, d]`` (tensor or array) out."""


class RegularizedLinearAdapter(HubMixin, Estimator):
    """A regularised linear adapter A on image embeddings, for models whose weights cannot be touched.

    Trained on embeddings f ``[V, n, d]`` (V augmented views of n images; ``[n, d]`` for one) with
    CE(s · normalize(f A) · Tᵀ, y) + λ‖A − I‖²_F from A = I: full-batch Adam (eps 1e-4) for
    ``epochs`` steps under a cosine schedule, step t on view t mod V, exactly as ProLIP trains
    its projector. Only ``delta_ = A − I`` and T are learned, saved and shared.

    Args:
        lr: Adam learning rate.
        reg_lambda: λ; "auto" means 1/N with N the number of training images per class, "1/N^2" 1/N².
        epochs: number of full-batch training steps; 0 keeps A = I (zero-shot).
        logit_scale: s in the loss; None uses 100, the released CLIP models' value.
        templates: prompt templates (one "{}" each) used when T is built with a text encoder;
            None means ["a photo of a {}."].
        device: where training runs; None picks CUDA, then MPS, then CPU.
        verbose: show a progress bar while training.

    Attributes (after fit_embeddings or load):
        fitted_: the :class:`~prolip.training.fitted.FittedState` (kind ``linear_adapter``) the attributes
            below are read from.
        classes_: labels, in the column order of ``predict_proba``.
        class_names_: the text put into the templates for each class.
        classifier_: the text classifier T, float32 ``[K, d]``, unit rows.
        delta_: A − I, float32 ``[d, d]``.
        n_shots_, reg_lambda_, logit_scale_, loss_history_: N, the λ and s training used, and the
            loss of every step (empty after load).
    """

    _parameter_constraints: ClassVar[dict[str, Constraint]] = {
        "lr": LR, "reg_lambda": REG_LAMBDA, "epochs": EPOCHS, "logit_scale": LOGIT_SCALE, "templates": TEMPLATES,
        "device": DEVICE, "verbose": BOOLEAN,
    }  # fmt: skip
    kind: ClassVar[str] = "linear_adapter"

    def __init__(
        self,
        *,
        lr: float = 1e-3,
        reg_lambda: float | str = "auto",
        epochs: int = 300,
        logit_scale: float | None = None,
        templates: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        verbose: bool = True,
    ) -> None:
        self.lr = lr
        self.reg_lambda = reg_lambda
        self.epochs = epochs
        self.logit_scale = logit_scale
        self.templates = templates
        self.device = device
        self.verbose = verbose

    fitted_ = Learned(lambda s: s, "The fitted state (:class:`~prolip.training.fitted.FittedState`).")
    classes_ = Learned(lambda s: class_array(s.classes), "Labels, in the column order of predict_proba.")
    class_names_ = Learned(lambda s: list(s.class_names), "The text put into the templates for each class.")
    classifier_ = Learned(lambda s: s.classifier, "The text classifier T, float32 [K, d], unit rows.")
    delta_ = Learned(lambda s: s.delta, "A − I, float32 [d, d].")
    n_shots_ = Learned(lambda s: s.n_shots, "N, training images per class.")
    reg_lambda_ = Learned(lambda s: s.reg_lambda, "The λ training used.")
    logit_scale_ = Learned(lambda s: s.logit_scale, "The logit scale s training used.")
    loss_history_ = Learned(lambda s: s.loss_history, "Training loss per step (empty after load).")
    n_features_in_ = Learned(lambda s: s.delta.shape[0], "d, the width of the embeddings.")

    def _fitted(self) -> FittedState:
        state = self.__dict__.get("_state")
        if state is None:
            raise NotFittedError(
                "This RegularizedLinearAdapter is not fitted yet; call fit_embeddings(embeddings, labels, ...) or "
                "RegularizedLinearAdapter.load(path) first."
            )
        return state

    # ------------------------------------------------------------------ fitting
    def fit_embeddings(
        self,
        embeddings: torch.Tensor | np.ndarray,
        labels: Sequence[Hashable],
        classifier: torch.Tensor | np.ndarray | Mapping[Hashable, Any] | None = None,
        *,
        class_names: Mapping[Hashable, str] | Sequence[str] | None = None,
        text_encoder: TextEncoder | None = None,
        source: tuple[str, str] | None = None,
        fingerprint: Fingerprint | None = None,
    ) -> RegularizedLinearAdapter:
        """Fit A on image embeddings and labels; returns self.

        Args:
            embeddings: ``[V, n, d]`` embeddings of V views of n images, or ``[n, d]``; unnormalised
                (as ``encode_image`` returns them); a tensor or an array.
            labels: one hashable label per image. String labels double as class names.
            classifier: the text classifier T, ``[K, d]`` with rows in the order of ``classes_``
                (the sorted labels), or a mapping label → row; rows are L2-normalised here.
            class_names: text for each class in the prompts (a mapping label → text, or a sequence
                indexed by integer labels); default: the labels themselves.
            text_encoder: builds T when ``classifier`` is not given: called with each class's
                prompts (``templates`` filled with its name), it returns their text embeddings; T is
                then built as the zero-shot classifier is (normalise, average, normalise).
            source: ``(model name, pretrained)`` of the open_clip model whose ``encode_image``
                made the embeddings, recorded in the saved file so that ``prolip predict`` can
                embed new images; None for embeddings from elsewhere.
            fingerprint: that model's :attr:`~prolip.model.backbone.Backbone.fingerprint`, recorded
                with ``source`` so that loading checks the embedding model's weights.

        Raises:
            InputError: neither or both of ``classifier`` and ``text_encoder``; shapes that do not fit.
        """
        self.check_params()
        self.__dict__.pop("_state", None)  # a failed fit leaves the estimator unfitted
        embeddings = _as_tensor(embeddings, "embeddings")
        d = embeddings.shape[-1] if embeddings.ndim else 0  # a 0-d input is refused by the shape check
        embeddings = check_features(embeddings, d, "embeddings", _EMBEDDINGS)
        labels = label_list(labels)
        if embeddings.shape[1] != len(labels):
            raise InputError(f"embeddings hold {embeddings.shape[1]} images but {len(labels)} labels were given.")
        classes, y = encode_labels(labels)
        if (classifier is None) == (text_encoder is None):
            raise InputError("give the text classifier as classifier=T, or a text_encoder to build it (not both).")
        if classifier is not None:
            names = [str(c) for c in classes] if class_names is None else names_of_classes(classes, class_names)
            templates: list[str] = []
            t = _classifier_rows(classifier, classes)
        else:
            names, templates = names_of_classes(classes, class_names), check_templates(self.templates)
            t = _encode_classes(text_encoder, names, templates)
        if t.shape != (len(classes), d) or not torch.isfinite(t).all() or (t.norm(dim=-1) == 0).any():
            raise InputError(
                f"the classifier has shape {tuple(t.shape)}; {len(classes)} classes of width {d} need a finite "
                f"({len(classes)}, {d}) matrix with non-zero rows."
            )
        t = F.normalize(t, dim=-1)
        n_shots = len(y) / len(classes)
        config = TrainConfig(
            lr=float(self.lr), reg_lambda=self.reg_lambda, epochs=self.epochs, logit_scale=self.logit_scale,
            device=select_device(self.device), verbose=self.verbose,
        ).resolved(n_shots, DEFAULT_LOGIT_SCALE)  # fmt: skip
        reg_lambda, scale = config.reg_lambda, config.logit_scale
        identity = LinearHead(torch.eye(d))  # ProLIP's training with the embeddings as features and W0 = I
        result = train_projector(embeddings, y, identity, t, config)
        delta, losses = result.weight - identity.weight, result.losses
        model_name, pretrained = source or ("", "")
        fingerprint = fingerprint if model_name else None
        self._state = FittedState(
            delta=delta.contiguous(),
            classifier=t,
            classes=tuple(classes),
            class_names=tuple(names),
            templates=tuple(templates),
            n_shots=n_shots,
            reg_lambda=reg_lambda,
            logit_scale=scale,
            hyperparameters={k: self.get_params(deep=False)[k] for k in _SAVED_PARAMS}
            | {"templates": templates or None},
            projector_key=LINEAR_ADAPTER_KEY,
            projector_family="linear_adapter",
            model_name=model_name,
            pretrained=pretrained,
            loss_history=losses.numpy(),
            fingerprint=fingerprint,
        )
        logger.info("fitted a linear adapter: %d classes, N=%.3g, lambda=%.3g", len(classes), n_shots, reg_lambda)
        return self

    # ------------------------------------------------------------------ inference
    def _plain(self, embeddings: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Test embeddings ``[n, d]`` (from ``[n, d]`` or ``[1, n, d]``), checked."""
        f = check_features(_as_tensor(embeddings, "embeddings"), self.n_features_in_, "embeddings", _EMBEDDINGS)
        if f.shape[0] != 1:
            raise InputError(f"embeddings hold {f.shape[0]} views; pass one embedding per image, [n, d].")
        return f[0].to("cpu", torch.float32)

    def transform(self, embeddings: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The adapted embeddings f A ``[n, d]`` (unnormalised, CPU float32) of embeddings ``[n, d]``."""
        state = self._fitted()
        return self._plain(embeddings) @ state.adapter_matrix()

    def logits_from_embeddings(self, embeddings: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Class logits s · normalize(f A) · Tᵀ, ``[n, K]`` (CPU float32)."""
        state = self._fitted()
        return LinearHead(state.adapter_matrix()).logits(self._plain(embeddings), state.classifier, state.logit_scale)

    def predict_proba(self, embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, K)``; columns follow ``classes_``."""
        return torch.softmax(self.logits_from_embeddings(embeddings), dim=-1).numpy()

    def predict(self, embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
        """Predicted label of each embedding, as values from ``classes_``."""
        return self.classes_[self.logits_from_embeddings(embeddings).argmax(dim=1).numpy()]

    def score(self, embeddings: torch.Tensor | np.ndarray, labels: Sequence[Hashable]) -> float:
        """Accuracy of :meth:`predict` against ``labels``."""
        return accuracy(self.predict(embeddings), labels)

    # ------------------------------------------------------------------ files (save, load, save_pretrained,
    # from_pretrained and push_to_hub come from HubMixin)
    def _fitted_state(self) -> FittedState:
        return self._fitted()

    @classmethod
    def _from_state(cls, state: FittedState, source: str, **overrides: Any) -> RegularizedLinearAdapter:
        """Loading options, for :meth:`load` and :meth:`from_pretrained`: ``overrides`` change parameters (``device``)."""
        loaded = cls(**cls._restored(state.hyperparameters, _SAVED_PARAMS, overrides, source))
        loaded._state = state
        return loaded


def _as_tensor(values: Any, what: str) -> torch.Tensor:
    """A tensor or array as a tensor (arrays from embedding services are common)."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind != "f":
            raise InputTypeError(f"{what} has dtype {values.dtype}; expected floating point.")
        return torch.from_numpy(values)
    if not isinstance(values, torch.Tensor):
        raise InputTypeError(f"{what} must be a torch.Tensor or numpy array, not {type(values).__name__}.")
    return values


def _classifier_rows(classifier: Any, classes: Sequence[Hashable]) -> torch.Tensor:
    """T ``[K, d]`` float32 from a matrix (rows in class order) or a mapping label → row."""
    if isinstance(classifier, Mapping):
        rows = {plain_label(k): v for k, v in classifier.items()}
        missing = [c for c in classes if c not in rows]
        if missing:
            raise InputError(f"classifier has no row for label(s) {missing[:5]}; give one for every label.")
        classifier = torch.stack([_as_tensor(rows[c], f"classifier[{c!r}]").reshape(-1) for c in classes])
    return _as_tensor(classifier, "classifier").detach().float().cpu()


def _encode_classes(text_encoder: TextEncoder, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """T from a text encoder: each class's prompts encoded (one call per class), then averaged as zero-shot T is."""
    if not callable(text_encoder):
        raise InputTypeError(
            f"text_encoder must be a callable (list of prompts -> embeddings), not {type(text_encoder).__name__}."
        )
    per_class = []
    for name in names:
        out = _as_tensor(text_encoder(prompts([name], templates)), "text_encoder's output").detach().float().cpu()
        if out.ndim != 2 or out.shape[0] != len(templates) or not torch.isfinite(out).all():
            raise InputError(
                f"text_encoder returned {tuple(out.shape)} for {len(templates)} prompts; it must return one finite "
                "embedding per prompt, [len(prompts), d]."
            )
        per_class.append(out)
    return average_prompts(torch.stack(per_class))


def _model_embeddings(
    extractor: ProLIPAdapter, images: Sequence[ImageLike], views: int | None = None
) -> tuple[torch.Tensor, list[SkippedImage]]:
    """What ``encode_image`` returns for views of ``images``: float32 CPU ``[V, n, d]`` (``views=0``: the plain view),
    and the images left out.

    ``extractor`` (a ProLIPAdapter, fitted or not) loads the images and computes the views'
    pre-projection features (:meth:`~prolip.ProLIPAdapter.extract`, with its views,
    seed and cache); the model's own last linear map then gives the embeddings, one view at a time.
    """
    features, skipped = extractor.extract(images, views)
    backbone = extractor.backbone
    projector = backbone.projector
    views = (features[v].to(backbone.device, torch.float32) for v in range(features.shape[0]))
    with torch.inference_mode():
        return torch.stack([projector.head.project(x).cpu() for x in views]), skipped


class ModelRLA:
    """A regularised linear adapter on the embeddings of an open_clip model: labels images (the command line's RLA).

    The model stands in for an embedding service: a :class:`~prolip.ProLIPAdapter` (never fitted)
    loads the images and computes the views' pre-projection features, and the model's own last
    linear map turns them into what ``encode_image`` returns.

    Attributes:
        rla: the fitted :class:`RegularizedLinearAdapter`.
        extractor: the unfitted :class:`~prolip.ProLIPAdapter` that embeds images.
    """

    def __init__(self, rla: RegularizedLinearAdapter, extractor: ProLIPAdapter) -> None:
        self.rla, self.extractor = rla, extractor

    @property
    def classes_(self) -> np.ndarray:
        """Labels, in the column order of :meth:`predict_proba`."""
        return self.rla.classes_

    def predict_proba(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Class probabilities ``(n, K)`` of images."""
        return self.rla.predict_proba(_model_embeddings(self.extractor, images, views=0)[0])

    def predict(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Predicted label of each image."""
        return self.rla.predict(_model_embeddings(self.extractor, images, views=0)[0])

    @classmethod
    def fit(
        cls,
        extractor: ProLIPAdapter,
        images: Sequence[ImageLike],
        labels: Sequence[Hashable] | None = None,
        class_names: Mapping[Hashable, str] | Sequence[str] | None = None,
    ) -> ModelRLA:
        """Fit an RLA on the embeddings of ``extractor.views`` views of each image, with T from the model's text tower.

        The extractor's ``lr``, ``reg_lambda``, ``epochs``, ``templates``, ``device`` and
        ``verbose`` are the adapter's; s is the model's own logit scale.
        """
        images, labels, class_names, _ = labelled(images, labels, class_names, extractor.on_error, extractor.verbose)
        labels = label_list(labels)
        embeddings, skipped = _model_embeddings(extractor, images)
        kept_labels = kept(labels, skipped)
        backbone = extractor.backbone
        params = extractor.get_params(deep=False)
        rla = RegularizedLinearAdapter(
            **{k: params[k] for k in ("lr", "reg_lambda", "epochs", "templates", "device", "verbose")},
            logit_scale=backbone.logit_scale,
        )

        def encode_text(texts: list[str]) -> torch.Tensor:
            with torch.inference_mode():
                return backbone.model.encode_text(backbone.tokenizer(texts).to(backbone.device)).float().cpu()

        source = backbone.recorded
        rla.fit_embeddings(
            embeddings, kept_labels, class_names=class_names, text_encoder=encode_text, source=source,
            fingerprint=backbone.fingerprint if source[0] else None,
        )  # fmt: skip
        return cls(rla, extractor)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: str | nn.Module | None = None,
        pretrained: str | None = None,
        *,
        trust_file_model: bool = False,
        **extractor_params: Any,
    ) -> ModelRLA:
        """Load an RLA file with the open_clip model it records (or ``model``) to embed images.

        ``trust_file_model`` is as in :meth:`prolip.ProLIPAdapter.load`; ``extractor_params`` go
        to the extracting ProLIPAdapter (e.g. ``device``, ``verbose``).
        """
        rla = RegularizedLinearAdapter.load(path)  # the kind is checked before a model is built
        if model is None:
            model, pretrained = rla.fitted_.base_model(
                pretrained, trust_file_model=trust_file_model, source=repr(os.fspath(path))
            )
        extractor = ProLIPAdapter(model, pretrained, **extractor_params)
        rla.fitted_.check_base(extractor.backbone, source=repr(os.fspath(path)))  # before it embeds any image
        return cls(rla, extractor)
