"""ProLIPAdapter: the scikit-learn-style estimator users fit, predict with, save and load.

A thin front wiring the wings' modules (backbone, images, features, labels, training, fitted state, delta
file, hub; see docs/architecture.md) to the estimator contract.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from prolip.errors import InputError, NotFittedError
from prolip.estimator import Estimator
from prolip.features.cache import CachedFeatures, check_features
from prolip.features.dataset_objects import labelled
from prolip.features.extract import Extracted, features_of
from prolip.features.images import ImageLike, kept, load_for_model, report_skipped
from prolip.files.hub import HubMixin
from prolip.model.backbone import Backbone, build_backbone
from prolip.model.transformers_clip import is_image_processor
from prolip.params import (
    BATCH_SIZE,
    BOOLEAN,
    CACHE_DTYPE,
    DEVICE,
    EPOCHS,
    FOLDER,
    LOGIT_SCALE,
    LR,
    MODEL,
    ON_ERROR_RULE,
    PRECISION,
    PREPROCESS,
    PRETRAINED,
    RANDOM_STATE,
    REG_LAMBDA,
    TARGET,
    TASKRES_ALPHA,
    TEMPLATES,
    TOKENIZER,
    TRAIN_DTYPE,
    VIEWS,
    Constraint,
    validate_params,
)
from prolip.training.engine import TrainConfig
from prolip.training.fit import SAVED_PARAMS, FitSettings, fit_projector
from prolip.training.fitted import FittedAttributes, FittedState
from prolip.training.labels import accuracy, check_lengths, encode_labels, label_list

logger = logging.getLogger(__name__)

# Parameters that define the backbone: changing one rebuilds it (and re-checks a fitted delta).
_BACKBONE_PARAMS = ("model", "pretrained", "precision", "device", "tokenizer")


class ProLIPAdapter(HubMixin, Estimator, FittedAttributes):
    """Few-shot adaptation of an open_clip model by fine-tuning only its vision projector (ProLIP).

    Pre-projection features of ``views`` augmented views per training image are computed once;
    then a copy W of the projector W0 is trained for ``epochs`` full-batch Adam steps on
    CE(s · normalize(xW + b) · Tᵀ, y) + λ‖W − W0‖²_F, where T is the zero-shot text classifier.
    Only ``delta_ = W − W0`` is learned, saved and shared; the base model is never modified.

    Args:
        model: an open_clip model name (e.g. "ViT-B-32") or model, or a transformers CLIP / SigLIP (docs/models.md).
        pretrained: open_clip pretrained tag, local checkpoint path, or None for random weights.
            Ignored when ``model`` is a model object.
        templates: prompt templates with one "{}" each; None means ["a photo of a {}."].
        lr: Adam learning rate.
        reg_lambda: λ; "auto" means 1/N with N the number of training images per class, "1/N^2" 1/N².
        epochs: number of full-batch training steps; 0 gives the zero-shot classifier (delta = 0).
        views: augmented views extracted per training image (step t uses view t mod views);
            0 trains on the plain view.
        batch_size: images per forward pass during feature extraction.
        device: "cuda", "mps", "cpu", ...; None picks CUDA, then MPS, then CPU.
        precision: backbone precision, "fp32", "fp16" or "bf16" (training's is ``train_dtype``).
        logit_scale: s in the loss; None uses the model's own ``logit_scale.exp()``.
        random_state: seed of the view augmentation (the only randomness); None draws one.
        verbose: show progress bars.
        preprocess: optional test-time transform (full-resolution PIL image → tensor); None: open_clip's own.
            For a transformers model, its image processor (e.g. ``CLIPImageProcessor``), whose resizing and
            normalisation prolip's views then follow (with its tokenizer as ``tokenizer``).
        tokenizer: for a model object, optional tokenizer; None uses open_clip's default.
        on_error: for an image that cannot be read or used, "raise" (ImageLoadError naming it) or
            "skip": leave it out (and fit its label), warn (SkippedImagesWarning), list it in
            ``skipped_``. If every image is unreadable, ImageLoadError either way.
        cache_dir: folder of an on-disk feature cache (:mod:`prolip.features.cache`), or None: training
            views (views > 0) are stored there and reused (keyed by the tower, precision, view
            settings, ``random_state`` and ``views``), as lazy :class:`~prolip.features.cache.CachedFeatures`.
        cache_dtype: "fp16" (default; half the disk, features rounded to fp16) or "fp32".
        target: the projector(s) to train: "image" (ProLIP), "text" (the text tower's projection
            W_t, regularised toward W_t0, T rebuilt from it; see docs/variants.md) or "image+text".
        taskres_alpha: None, or α > 0 to train TaskRes's residual R on the classifier beside the
            image projector, T = normalize(t + αR) (ProLIP + TaskRes; target="image" only).
        train_dtype: "fp32", or "fp16" to keep W, its gradient and Adam's moments in fp16 as the official code.

    Attributes (after fit or load):
        fitted_: the :class:`~prolip.training.fitted.FittedState` all the attributes below are read from.
        classes_: labels, in the column order of ``predict_proba``.
        class_names_: the text put into the templates for each class.
        classifier_: the classifier T, float32 ``[K, d_out]`` (zero-shot, from W_t, or with R).
        delta_: W − W0, float32, in the model parameter's own orientation (None for target="text").
        text_delta_: W_t − W_t0 of the text projection, or None for target="image".
        n_shots_: N, training images per class (n / K).
        reg_lambda_: the λ training used.
        logit_scale_: the s training used.
        loss_history_: training loss per step (empty after load).
        base_fingerprint_: sketches of the base model's W0 and vision tower (a ``Fingerprint``).

    Attributes (after any call that loads images):
        skipped_: the images the last such call left out (:class:`prolip.features.images.SkippedImage`).
    """

    _parameter_constraints: ClassVar[dict[str, Constraint]] = {
        "model": MODEL, "pretrained": PRETRAINED, "templates": TEMPLATES, "lr": LR, "reg_lambda": REG_LAMBDA,
        "epochs": EPOCHS, "views": VIEWS, "batch_size": BATCH_SIZE, "device": DEVICE, "precision": PRECISION,
        "logit_scale": LOGIT_SCALE, "random_state": RANDOM_STATE, "verbose": BOOLEAN, "preprocess": PREPROCESS,
        "tokenizer": TOKENIZER, "on_error": ON_ERROR_RULE, "cache_dir": FOLDER, "cache_dtype": CACHE_DTYPE,
        "target": TARGET, "taskres_alpha": TASKRES_ALPHA, "train_dtype": TRAIN_DTYPE,
    }  # fmt: skip
    kind: ClassVar[str] = "projector"

    def __init__(
        self,
        model: str | nn.Module = "ViT-B-32",
        pretrained: str | None = "openai",
        *,
        templates: Sequence[str] | None = None,
        lr: float = 1e-3,
        reg_lambda: float | str = "auto",
        epochs: int = 300,
        views: int = 300,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        logit_scale: float | None = None,
        random_state: int | None = 0,
        verbose: bool = True,
        preprocess: Callable[[Any], torch.Tensor] | None = None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        on_error: str = "raise",
        cache_dir: str | os.PathLike | None = None,
        cache_dtype: str = "fp16",
        target: str = "image",
        taskres_alpha: float | None = None,
        train_dtype: str = "fp32",
    ) -> None:
        self.model = model
        self.pretrained = pretrained
        self.templates = templates
        self.lr = lr
        self.reg_lambda = reg_lambda
        self.epochs = epochs
        self.views = views
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.logit_scale = logit_scale
        self.random_state = random_state
        self.verbose = verbose
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.on_error = on_error
        self.cache_dir = cache_dir
        self.cache_dtype = cache_dtype
        self.target = target
        self.taskres_alpha = taskres_alpha
        self.train_dtype = train_dtype

    # ------------------------------------------------------------------ learned attributes (FittedAttributes)
    def _fitted(self) -> FittedState:
        state = self.__dict__.get("_state")
        if state is None:
            raise NotFittedError(
                "This ProLIPAdapter is not fitted yet; call fit(images, labels), fit_features(features, labels) "
                "or ProLIPAdapter.load(path) first."
            )
        return state

    def _set_fitted(self, state: FittedState, *, strict: bool = True, source: str = "this delta") -> None:
        """The one place a fitted state is adopted: checked against the backbone, then set."""
        self.__dict__.pop("_state", None)  # a failed check leaves the adapter unfitted
        state.check_base(self.backbone, strict=strict, source=source)
        self._state, self._strict_base = state, strict
        self._adapted_weight()  # computed now, so predict leaves the estimator as it finds it

    # ------------------------------------------------------------------ backbone
    @property
    def backbone(self) -> Backbone:
        """The open_clip model and what prolip derives from it, built once per model setting (read-only).

        Changing a parameter that defines it (``model``, ``pretrained``, ``precision``,
        ``device``, ``tokenizer``, a transformers image processor as ``preprocess``) rebuilds it on next use, and a fitted delta is checked against
        the new base model (FingerprintMismatchError if it is not the one it was trained on).
        """
        processor = self.preprocess if is_image_processor(self.preprocess) else None
        params = [(name, getattr(self, name)) for name in _BACKBONE_PARAMS] + [("image_processor", processor)]
        key = tuple((name, id(v) if not isinstance(v, (str, type(None))) else v) for name, v in params)
        cached = self.__dict__.get("_backbone")
        if cached is None or cached[0] != key:
            backbone = build_backbone(
                self.model, self.pretrained, precision=self.precision, device=self.device, tokenizer=self.tokenizer,
                image_processor=processor,
            )  # fmt: skip
            self._backbone = (key, backbone)
            state = self.__dict__.get("_state")
            if state is not None:
                state.check_base(backbone, strict=self.__dict__.get("_strict_base", True), source="the fitted delta")
        return self._backbone[1]

    def _seed(self) -> int:
        return secrets.randbits(63) if self.random_state is None else int(self.random_state)

    # ------------------------------------------------------------------ features
    def extract(self, images: Sequence[ImageLike], views: int | None = None) -> Extracted:
        """Pre-projection features of ``views`` views of ``images`` and the images left out; the adapter is unchanged.

        What :meth:`extract_features` computes (see there), with the skipped images returned rather than recorded:
        what the variants, which only read an adapter, use.
        """
        self.check_params()
        views = self.views if views is None else views
        validate_params({"views": views}, {"views": VIEWS})
        return self._extract(images, views)

    def _extract(self, images: Sequence[ImageLike], views: int, record: bool = False) -> Extracted:
        """``record``: keep the skipped images as ``skipped_`` (fit, extract_features), even if none is readable."""
        backbone = self.backbone
        # A transformers image processor is the model's preprocessing, which the test view follows; not a transform.
        plain_preprocess = self.preprocess if views == 0 and not is_image_processor(self.preprocess) else None
        loaded = load_for_model(images, self.on_error, backbone.draft_size, plain_preprocess is not None, self.verbose)
        if record:
            self.skipped_ = loaded.skipped
        report_skipped(loaded)
        if self.cache_dir is not None and views and self.random_state is None:
            logger.warning("random_state=None draws a new seed per call, so cached features are never reused")
        features = features_of(
            backbone, loaded.images, views, seed=self._seed(), batch_size=self.batch_size, verbose=self.verbose,
            preprocess=plain_preprocess, cache_dir=self.cache_dir, cache_dtype=self.cache_dtype,
        )  # fmt: skip
        return Extracted(features, loaded.skipped)

    def extract_features(self, images: Sequence[ImageLike], views: int | None = None) -> torch.Tensor | CachedFeatures:
        """Pre-projection features of augmented views of ``images``: float32 ``[V, n, d_in]``.

        ``views=None`` uses ``self.views``; ``views=0`` gives one plain test-time view,
        ``[1, n, d_in]``. The same ``random_state`` gives the same views. Features can be
        passed to :meth:`fit_features` any number of times. With ``on_error="skip"``, ``n``
        counts the readable images only and ``skipped_`` lists the others (:meth:`extract` returns them
        instead). With ``cache_dir`` set and ``views > 0``, the result is a lazy
        :class:`prolip.features.cache.CachedFeatures` over the on-disk cache, and only images not cached yet
        are computed.
        """
        self.check_params()
        views = self.views if views is None else views
        validate_params({"views": views}, {"views": VIEWS})
        return self._extract(images, views, record=True).features

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        images: Sequence[ImageLike],
        labels: Sequence[Hashable] | None = None,
        class_names: Mapping[Hashable, str] | Sequence[str] | None = None,
    ) -> ProLIPAdapter:
        """Fit on labelled images; returns self.

        Args:
            images: file paths, PIL images, numpy arrays or CHW tensors, or a dataset object (docs/datasets.md).
            labels: one hashable label per image (None: a dataset's own). String labels double as class names.
            class_names: text for each class in the prompts: a mapping label → text, or a
                sequence indexed by integer labels. Default: the labels themselves (a dataset's ClassLabel names).
        """
        self.check_params()  # once, before any image is read
        images, labels, class_names, label_ids = labelled(images, labels, class_names, self.on_error, self.verbose)
        check_lengths(images, labels)
        labels = label_list(labels)
        encode_labels(labels)  # bad labels fail before the slow feature extraction
        extracted = self._extract(images, self.views, record=True)
        return self._fit_features(extracted.features, kept(labels, extracted.skipped), class_names, label_ids)

    def fit_features(
        self,
        features: torch.Tensor | CachedFeatures,
        labels: Sequence[Hashable],
        class_names: Mapping[Hashable, str] | Sequence[str] | None = None,
    ) -> ProLIPAdapter:
        """Fit on features from :meth:`extract_features` (``[V, n, d_in]``); returns self.

        ``features`` may be an in-memory tensor or lazy :class:`prolip.features.cache.CachedFeatures`,
        which training reads one view at a time.
        """
        self.check_params()
        return self._fit_features(features, labels, class_names)

    def _fit_features(
        self,
        features: torch.Tensor | CachedFeatures,
        labels: Sequence[Hashable],
        class_names: Mapping[Hashable, str] | Sequence[str] | None,
        label_ids: Mapping[str, int] | None = None,
    ) -> ProLIPAdapter:
        self.__dict__.pop("_state", None)  # a failed fit leaves the adapter unfitted
        state = fit_projector(self.backbone, features, labels, class_names, self.fit_settings())
        self._set_fitted(state if label_ids is None else dataclasses.replace(state, label_ids=dict(label_ids)))
        return self

    def fit_settings(self) -> FitSettings:
        """The typed settings a fit of this adapter trains with (its checked parameters, on its backbone's device).

        Built once per fit and passed whole to the training code; what the variants that fit a projector
        (:class:`~prolip.ProLIPSearch`, :class:`~prolip.ProLIPTipAdapter`) train with too.
        """
        config = TrainConfig(
            lr=float(self.lr), reg_lambda=self.reg_lambda, epochs=self.epochs, logit_scale=self.logit_scale,
            train_dtype=self.train_dtype, device=self.backbone.device, verbose=self.verbose,
        )  # fmt: skip
        recorded = {name: getattr(self, name) for name in SAVED_PARAMS}
        recorded.update(
            templates=list(self.templates) if self.templates else None,
            random_state=None if self.random_state is None else int(self.random_state),
        )
        templates = None if self.templates is None else tuple(self.templates)
        return FitSettings(config, templates, self.target, self.taskres_alpha, recorded)

    # ------------------------------------------------------------------ inference
    def _adapted_weight(self) -> torch.Tensor:
        """W0 + delta as ``[d_in, d_out]`` fp32 on the model's device, cached per backbone and fit."""
        backbone, state = self.backbone, self._fitted()
        cached = self.__dict__.get("_weight")
        if cached is None or cached[0] is not backbone or cached[1] is not state:
            self._weight = (backbone, state, state.adapted_weight(backbone.projector))
        return self._weight[2]

    def logits_from_features(self, features: torch.Tensor, classifier: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[n, K]`` (CPU, fp32) of test features ``[n, d_in]`` or ``[1, n, d_in]`` (T: ``classifier_`` or given)."""
        state, projector = self._fitted(), self.backbone.projector
        x = check_features(features, projector.feature_width)
        if x.shape[0] != 1:
            raise InputError(f"features hold {x.shape[0]} views; pass test-time features [1, n, d] (views=0).")
        classifier = state.classifier if classifier is None else classifier
        with torch.inference_mode():
            rows = x[0].to(self.backbone.device, torch.float32)
            out = projector.head.logits(rows, classifier, state.logit_scale, weight=self._adapted_weight())
        return out.cpu()

    def predict_features(self, features: torch.Tensor) -> np.ndarray:
        """Predicted labels from test-time features (``extract_features(images, views=0)``)."""
        return self.classes_[self.logits_from_features(features).argmax(dim=1).numpy()]

    def score_features(self, features: torch.Tensor, labels: Sequence[Hashable]) -> float:
        """Accuracy of :meth:`predict_features` against ``labels``."""
        return accuracy(self.predict_features(features), labels)

    def predict_proba(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Class probabilities ``(n, K)``; columns follow ``classes_`` (readable images only, see ``on_error``)."""
        self._fitted()
        return torch.softmax(self.logits_from_features(self.extract(images, views=0).features), dim=-1).numpy()

    def predict(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Predicted label of each image, values from ``classes_`` (readable images only, see ``on_error``)."""
        self._fitted()
        return self.predict_features(self.extract(images, views=0).features)

    def score(self, images: Sequence[ImageLike], labels: Sequence[Hashable] | None = None) -> float:
        """Accuracy of :meth:`predict` on ``images`` against ``labels`` (readable images only, see ``on_error``)."""
        self._fitted()
        images, labels, *_ = labelled(images, labels, on_error=self.on_error)
        check_lengths(images, labels)
        extracted = self.extract(images, views=0)
        return self.score_features(extracted.features, kept(label_list(labels), extracted.skipped))

    # ------------------------------------------------------------------ the adapted model
    def merged_model(self, precision: str | None = "fp32") -> nn.Module:
        """A copy of the open_clip model with W0 + delta and W_t0 + text delta, where trained (the base is untouched).

        Args:
            precision: the copy's precision: "fp32" (default: the merged update is exact), "fp16",
                "bf16", or None for the base model's own. Rounding W0 + delta to fp16 or bf16
                loses part of a small delta; a PrecisionWarning then gives the measured relative
                error of the merged update.
        """
        return self._fitted().merged_copy(self.backbone.model, precision if precision is not None else self.precision)

    def export(self, path: str | os.PathLike, format: str = "onnx") -> tuple[os.PathLike, os.PathLike]:
        """Write a standalone classifier (``onnx`` or ``pt2``) and its JSON; see :func:`prolip.files.export.export_classifier`."""
        from prolip.files.export import export_classifier  # torch.export and the ONNX exporter: loaded on use

        return export_classifier(self._fitted(), self.backbone, path, format)

    # ------------------------------------------------------------------ files (save, load, save_pretrained,
    # from_pretrained and push_to_hub come from HubMixin)
    def _fitted_state(self) -> FittedState:
        return self._fitted()

    @classmethod
    def _from_state(
        cls,
        state: FittedState,
        source: str,
        model: str | nn.Module | None = None,
        pretrained: str | None = None,
        *,
        strict: bool = True,
        trust_file_model: bool = False,
        **overrides: Any,
    ) -> ProLIPAdapter:
        """Loading options, for :meth:`load` and :meth:`from_pretrained`:

        Args:
            model: base model name or object; None uses the model name stored in the file.
            pretrained: pretrained tag or checkpoint path; None uses the one stored in the file.
            strict: refuse (FingerprintMismatchError) when the base model is not the one the
                delta was trained on. ``strict=False`` loads anyway, with a warning.
            trust_file_model: let the file alone choose a base model that is not one of
                open_clip's own configurations with one of its own pretrained tags (a Hub model,
                a checkpoint path): see docs/security.md. Not needed when ``model`` is given.
            **overrides: constructor parameters to change (e.g. ``device="cpu"``, ``verbose=False``).
        """
        params = cls._restored(state.hyperparameters, SAVED_PARAMS, overrides, source)
        if model is None:
            model, pretrained = state.base_model(pretrained, trust_file_model=trust_file_model, source=source)
        adapter = cls(model=model, pretrained=pretrained, **params)
        adapter._set_fitted(state, strict=strict, source=source)
        return adapter

    @classmethod
    def from_state(
        cls,
        state: FittedState,
        model: str | nn.Module | None = None,
        pretrained: str | None = None,
        *,
        source: str = "the fitted state",
        **kwargs: Any,
    ) -> ProLIPAdapter:
        """An adapter fitted with ``state`` (read with :func:`prolip.files.delta.read_state`, or made by a variant).

        Arguments as :meth:`load` (``strict``, ``trust_file_model``, overrides); the state's stored
        hyperparameters are restored first.
        """
        return cls._from_state(state, source, model, pretrained, **kwargs)
