"""ProLIPAdapter: the scikit-learn-style estimator users fit, predict with, save and load."""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import secrets
import sys
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from prolip._version import __version__
from prolip.cache import CachedFeatures, CacheKey, FeatureCache, check_storage, tower_fingerprint
from prolip.delta_file import read_delta, write_delta
from prolip.errors import (
    DeltaFileError,
    FingerprintMismatchError,
    ImageLoadError,
    InputError,
    InputTypeError,
    NotFittedError,
    SkippedImagesWarning,
)
from prolip.features import extract_features, fill_cache, image_hash, select_device
from prolip.images import ON_ERROR, ImageLike, SkippedImage, load_images_skipping
from prolip.models import Backbone, build_backbone, dtype_of, fingerprint
from prolip.projector import Projector, find_projector
from prolip.training import TrainResult, logits, train_projector
from prolip.zeroshot import DEFAULT_TEMPLATES, check_templates, zero_shot_classifier

logger = logging.getLogger(__name__)

_FITTED = ("classes_", "class_names_", "classifier_", "delta_", "n_shots_", "reg_lambda_", "logit_scale_")
# Hyperparameters stored in a delta file and restored by load (model objects and callables are not).
_SAVED_PARAMS = ("templates", "lr", "reg_lambda", "epochs", "views", "logit_scale", "random_state")


def _class_array(classes: list[Hashable]) -> np.ndarray:
    arr = np.asarray(classes) if classes else np.empty(0)
    if arr.ndim != 1 or arr.dtype.kind not in "biufU":
        arr = np.empty(len(classes), dtype=object)
        arr[:] = classes
    return arr


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside prolip."""
    frame, level = sys._getframe(2), 2  # 1 would be the function that calls warnings.warn
    while frame is not None and frame.f_globals.get("__name__", "").startswith("prolip."):
        frame, level = frame.f_back, level + 1
    return level


def _plain_label(label: Any) -> Any:
    """numpy scalars to Python scalars, so labels compare, hash and serialise as users expect."""
    return label.item() if isinstance(label, np.generic) else label


class ProLIPAdapter:
    """Few-shot adaptation of an open_clip model by fine-tuning only its vision projector (ProLIP).

    Pre-projection features of ``views`` augmented views per training image are computed once;
    then a copy W of the projector W0 is trained for ``epochs`` full-batch Adam steps on
    CE(s · normalize(xW + b) · Tᵀ, y) + λ‖W − W0‖²_F, where T is the zero-shot text classifier.
    Only ``delta_ = W − W0`` is learned, saved and shared; the base model is never modified.

    Args:
        model: an open_clip model name (e.g. "ViT-B-32") or an already-built open_clip model.
        pretrained: open_clip pretrained tag, local checkpoint path, or None for random weights.
            Ignored when ``model`` is a model object.
        templates: prompt templates with one "{}" each; None means ["a photo of a {}."].
        lr: Adam learning rate.
        reg_lambda: λ; "auto" means 1/N with N the number of training images per class.
        epochs: number of full-batch training steps; 0 gives the zero-shot classifier (delta = 0).
        views: augmented views extracted per training image (step t uses view t mod views).
        batch_size: images per forward pass during feature extraction.
        device: "cuda", "mps", "cpu", ...; None picks CUDA, then MPS, then CPU.
        precision: backbone precision, "fp32", "fp16" or "bf16" (training is always fp32).
        logit_scale: s in the loss; None uses the model's own ``logit_scale.exp()``.
        random_state: seed of the view augmentation (the only randomness); None draws one.
        verbose: show progress bars.
        preprocess: for a model object, optional test-time transform (PIL image → tensor);
            None uses prolip's tensor port of open_clip's resize + centre crop + normalise.
        tokenizer: for a model object, optional tokenizer; None uses open_clip's default.
        on_error: what fit, predict, predict_proba, score and extract_features do with an image
            that cannot be read or used: "raise" (default) raises ImageLoadError naming it;
            "skip" leaves it out, warns (SkippedImagesWarning) and records it in ``skipped_``.
            With "skip", fit drops the labels of skipped images; predict, predict_proba and
            extract_features return results for the kept images only, in order (``skipped_``
            says which inputs are missing); score is the accuracy on the kept images. If every
            image is unreadable, ImageLoadError is raised either way.
        cache_dir: folder of an on-disk feature cache (see :mod:`prolip.cache`), or None. When
            set, extract_features (views > 0) stores each image's views there, reuses what is
            already stored (across runs, processes and machines sharing the folder, keyed by the
            vision tower's weights, precision, view settings, ``random_state`` and ``views``),
            and returns lazy :class:`prolip.cache.CachedFeatures`; fit then streams one view at
            a time from disk, so its memory grows with n·d_in, not views·n·d_in. Reuse needs a
            fixed ``random_state``. Test-time features (views=0) are never cached.
        cache_dtype: "fp16" (default; half the disk, features rounded to fp16) or "fp32".

    Attributes (after fit):
        classes_: labels, in the column order of ``predict_proba``.
        class_names_: the text put into the templates for each class.
        classifier_: the zero-shot classifier T, float32 ``[K, d_out]``.
        delta_: W − W0, float32, in the model parameter's own orientation.
        n_shots_: N, training images per class (n / K).
        reg_lambda_: the λ actually used.
        logit_scale_: the s actually used.
        loss_history_: training loss per step.
        base_fingerprint_: SHA-256 of W0 (see :func:`prolip.models.fingerprint`).

    Attributes (after any call that loads images):
        skipped_: ``(index, path or type, reason)`` of each image the last such call left out
            (:class:`prolip.images.SkippedImage`); empty when none was.
    """

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

    # ------------------------------------------------------------------ scikit-learn contract
    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, as scikit-learn's ``get_params``."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> ProLIPAdapter:
        """Set constructor arguments by name, as scikit-learn's ``set_params``; returns self."""
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise InputError(f"unknown parameter {name!r} for ProLIPAdapter; valid parameters: {valid}.")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        shown = [
            f"{k}={v!r}" if not isinstance(v, nn.Module) else f"{k}=<{type(v).__name__}>"
            for k, v in self.get_params().items()
            if not (
                isinstance(v, (str, int, float, bool, type(None))) and v == defaults[k] and type(v) is type(defaults[k])
            )
        ]
        return f"ProLIPAdapter({', '.join(shown)})"

    _estimator_type = "classifier"  # what scikit-learn < 1.6 reads

    def __sklearn_tags__(self) -> Any:
        """scikit-learn's estimator tags: a classifier whose inputs are images, validated by prolip.

        Only called by scikit-learn (e.g. ``cross_val_score``), so importing it here adds no dependency.
        """
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags

        return Tags(
            estimator_type="classifier",
            target_tags=TargetTags(required=True),
            classifier_tags=ClassifierTags(),
            input_tags=InputTags(one_d_array=True, two_d_array=False),
            no_validation=True,
        )

    # ------------------------------------------------------------------ backbone
    def _validate_params(self) -> None:
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"lr={self.lr!r} must be a positive number, e.g. 1e-3.")
        if self.reg_lambda != "auto" and not (
            isinstance(self.reg_lambda, (int, float)) and self.reg_lambda >= 0 and math.isfinite(self.reg_lambda)
        ):
            raise InputError(f"reg_lambda={self.reg_lambda!r} must be 'auto' or a number >= 0.")
        for name in ("epochs", "views", "batch_size"):
            value = getattr(self, name)
            low = 1 if name == "batch_size" else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"{name}={value!r} must be an integer >= {low}.")
        if self.logit_scale is not None and not (isinstance(self.logit_scale, (int, float)) and self.logit_scale > 0):
            raise InputError(f"logit_scale={self.logit_scale!r} must be None or a positive number.")
        dtype_of(self.precision)
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise InputError(f"cache_dir={self.cache_dir!r} must be None or a folder path.")
        check_storage(self.cache_dtype)
        if not (isinstance(self.on_error, str) and self.on_error in ON_ERROR):
            raise InputError(f"on_error={self.on_error!r} must be one of {list(ON_ERROR)}.")

    def _get_backbone(self) -> Backbone:
        """Build the open_clip model once and reuse it while the parameters that define it stay."""
        key = (
            id(self.model),
            self.model if isinstance(self.model, str) else None,
            self.pretrained,
            self.precision,
            str(self.device),
            id(self.tokenizer),
        )
        cached = getattr(self, "_backbone", None)
        if cached is None or self._backbone_key != key:
            device = select_device(self.device)
            cached = build_backbone(
                self.model, self.pretrained, precision=self.precision, device=device, tokenizer=self.tokenizer
            )
            self._backbone, self._backbone_key = cached, key
            self._projector_cache = find_projector(cached.model)
        return cached

    @property
    def _projector(self) -> Projector:
        self._get_backbone()
        return self._projector_cache

    @property
    def _device(self) -> torch.device:
        return next(self._get_backbone().model.parameters()).device

    def _seed(self) -> int:
        if self.random_state is None:
            return secrets.randbits(63)
        if not isinstance(self.random_state, (int, np.integer)) or isinstance(self.random_state, bool):
            raise InputError(f"random_state={self.random_state!r} must be an int or None.")
        return int(self.random_state)

    # ------------------------------------------------------------------ features
    def extract_features(self, images: Sequence[ImageLike], views: int | None = None) -> torch.Tensor | CachedFeatures:
        """Pre-projection features of augmented views of ``images``: float32 ``[V, n, d_in]``.

        ``views=None`` uses ``self.views``; ``views=0`` gives one plain test-time view,
        ``[1, n, d_in]``. The same ``random_state`` gives the same views. Features can be
        passed to :meth:`fit_features` any number of times. With ``on_error="skip"``, ``n``
        counts the readable images only and ``skipped_`` lists the others. With ``cache_dir``
        set and ``views > 0``, the result is a lazy :class:`prolip.cache.CachedFeatures` over
        the on-disk cache, and only images not cached yet are computed.
        """
        self._validate_params()
        views = self.views if views is None else views
        if not isinstance(views, int) or views < 0:
            raise InputError(f"views={views!r} must be an integer >= 0.")
        if self.cache_dir is not None and views > 0:
            cache, hashes, _ = self._fill_cache(images, views)
            return cache.features(hashes)
        backbone = self._get_backbone()
        cfg = backbone.view_config
        loaded = self._load_images(images, max_short_side=2 * cfg.size)
        return extract_features(
            self._projector,
            loaded,
            views,
            cfg,
            seed=self._seed(),
            batch_size=self.batch_size,
            device=self._device,
            dtype=dtype_of(self.precision),
            verbose=self.verbose,
            preprocess=self.preprocess,
        )

    def _tower_fingerprint(self) -> str:
        """:func:`prolip.cache.tower_fingerprint` of the frozen tower, hashed once per backbone."""
        backbone = self._get_backbone()
        if backbone.tower_fingerprint is None:
            backbone.tower_fingerprint = tower_fingerprint(self._projector.visual)
        return backbone.tower_fingerprint

    def _feature_cache(self, views: int, seed: int) -> FeatureCache:
        """The on-disk cache for this model, precision, view settings, seed and number of views."""
        projector = self._projector
        key = CacheKey(
            model=self._tower_fingerprint(),
            precision=self.precision,
            config=self._get_backbone().view_config,
            seed=seed,
            views=views,
            storage=self.cache_dtype,
        )
        return FeatureCache(self.cache_dir, key, projector.in_features)

    def _fill_cache(
        self, images: Sequence[ImageLike], views: int, rank: int = 0, world_size: int = 1
    ) -> tuple[FeatureCache, list[str], list[str]]:
        """Load ``images`` and store the features of those the cache lacks (this rank's share).

        Returns the cache, the hashes of the loaded images, and the hashes this call computed.
        """
        if self.random_state is None:
            logger.warning("random_state=None draws a new seed per call, so cached features are never reused")
        cfg = self._get_backbone().view_config
        loaded = self._load_images(images, max_short_side=2 * cfg.size)
        cache = self._feature_cache(views, self._seed())
        hashes = [image_hash(im) for im in loaded]
        computed = fill_cache(
            self._projector,
            loaded,
            cache,
            cfg,
            batch_size=self.batch_size,
            device=self._device,
            dtype=dtype_of(self.precision),
            verbose=self.verbose,
            hashes=hashes,
            rank=rank,
            world_size=world_size,
        )
        return cache, hashes, computed

    def _load_images(self, images: Sequence[ImageLike], max_short_side: int) -> list[torch.Tensor]:
        """Load images under ``on_error``, recording and reporting the skipped ones in ``skipped_``."""
        self.skipped_: list[SkippedImage] = []
        result = load_images_skipping(images, max_short_side, on_error=self.on_error)
        self.skipped_ = result.skipped
        if result.skipped:
            shown = "; ".join(f"image {s.index} ({s.item!r})" for s in result.skipped[:10])
            more = f" and {len(result.skipped) - 10} more" if len(result.skipped) > 10 else ""
            if not result.images:
                raise ImageLoadError(
                    f"all {len(result.skipped)} images were unreadable: {shown}{more}. "
                    f"First reason: {result.skipped[0].reason} See skipped_ for every reason."
                )
            warnings.warn(
                f"skipped {len(result.skipped)} of {len(result.skipped) + len(result.images)} unreadable images "
                f"(on_error='skip'): {shown}{more}; see skipped_ for the reasons.",
                SkippedImagesWarning,
                stacklevel=_caller_stacklevel(),
            )
        if not result.images:
            raise InputError("images is empty; pass at least one image.")
        return result.images

    def _kept(self, labels: Sequence[Hashable]) -> list[Hashable]:
        """``labels`` without those of the images the last load skipped."""
        dropped = {s.index for s in getattr(self, "skipped_", [])}
        return [lab for i, lab in enumerate(labels) if i not in dropped] if dropped else list(labels)

    def _check_features(
        self, features: torch.Tensor | CachedFeatures, what: str = "features"
    ) -> torch.Tensor | CachedFeatures:
        if isinstance(features, CachedFeatures):
            d_in = self._projector.in_features
            if features.shape[-1] != d_in:
                raise InputError(
                    f"{what} has shape {tuple(features.shape)}; this model needs [V, n, {d_in}] "
                    "pre-projection features, as returned by extract_features."
                )
            return features  # NaN/Inf are checked view by view as training reads them
        if not isinstance(features, torch.Tensor):
            raise InputTypeError(
                f"{what} must be a torch.Tensor [V, n, d_in] from extract_features, not {type(features).__name__}."
            )
        if features.ndim == 2:
            features = features.unsqueeze(0)
        d_in = self._projector.in_features
        if features.ndim != 3 or features.shape[-1] != d_in or features.shape[0] == 0 or features.shape[1] == 0:
            raise InputError(
                f"{what} has shape {tuple(features.shape)}; this model needs [V, n, {d_in}] (or [n, {d_in}]) "
                "pre-projection features, as returned by extract_features."
            )
        if not features.is_floating_point():
            raise InputTypeError(f"{what} has dtype {features.dtype}; expected floating point.")
        # View by view: isfinite's temporaries over all of [V, n, d] would cost more than the features.
        for view in range(features.shape[0]):
            if torch.isfinite(features[view]).all():
                continue
            image, column = (~torch.isfinite(features[view])).nonzero()[0].tolist()
            raise InputError(
                f"{what} contains NaN or Inf (first at view {view}, image {image}, column {column}); "
                "re-extract them with extract_features, or drop that image."
            )
        return features

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        images: Sequence[ImageLike],
        labels: Sequence[Hashable],
        class_names: Mapping[Hashable, str] | Sequence[str] | None = None,
    ) -> ProLIPAdapter:
        """Fit on labelled images; returns self.

        Args:
            images: file paths, PIL images, numpy arrays or CHW tensors.
            labels: one hashable label per image. String labels double as class names.
            class_names: text for each class in the prompts: a mapping label → text, or a
                sequence indexed by integer labels. Default: the labels themselves.
        """
        self._check_lengths(images, labels)
        self._encode_labels(self._label_list(labels))  # bad labels fail before the slow feature extraction
        features = self.extract_features(images)
        return self.fit_features(features, self._kept(self._label_list(labels)), class_names)

    @staticmethod
    def _label_list(labels: Sequence[Hashable]) -> list[Hashable]:
        """``labels`` as a list, refusing a bare string or a non-sequence."""
        if isinstance(labels, torch.Tensor):
            labels = labels.tolist()  # tensor elements hash by identity, which would make every label unique
        # Any sized iterable (list, array, pandas Series) works; strings, mappings and sets do not.
        if isinstance(labels, (str, bytes, Mapping, set, frozenset)) or not (
            hasattr(labels, "__len__") and hasattr(labels, "__iter__")
        ):
            raise InputTypeError(
                f"labels must be a sequence with one label per image (a list, array or tensor), "
                f"not {type(labels).__name__}."
            )
        return list(labels)

    @staticmethod
    def _check_lengths(images: Sequence[Any], labels: Sequence[Any]) -> None:
        if isinstance(images, (str, bytes, os.PathLike)) or not hasattr(images, "__len__"):
            raise InputTypeError(
                f"images must be a sequence of images (a list of paths, PIL images or tensors), "
                f"not {type(images).__name__}."
            )
        n_images, n_labels = len(images), len(ProLIPAdapter._label_list(labels))
        if n_images == 0:
            raise InputError("images is empty; pass at least one image per class.")
        if n_images != n_labels:
            raise InputError(f"got {n_images} images but {n_labels} labels; pass exactly one label per image.")

    def _encode_labels(self, labels: Sequence[Hashable]) -> tuple[list[Hashable], torch.Tensor]:
        labels = [_plain_label(lab) for lab in labels]
        for i, lab in enumerate(labels):
            if not isinstance(lab, Hashable) or isinstance(lab, (list, dict, set)):
                raise InputTypeError(f"label {i} ({lab!r}) is not hashable; use strings or integers as labels.")
            try:
                hash(lab)
            except TypeError:
                raise InputTypeError(
                    f"label {i} ({lab!r}) is not hashable; use strings or integers as labels."
                ) from None
        unique = list(dict.fromkeys(labels))
        try:
            classes = sorted(unique)
        except TypeError:  # mixed label types: keep first-appearance order
            classes = unique
        if len(classes) < 2:
            raise InputError(f"all labels are {classes[0]!r}; ProLIP needs at least two classes.")
        index = {c: k for k, c in enumerate(classes)}
        return classes, torch.tensor([index[lab] for lab in labels], dtype=torch.long)

    @staticmethod
    def _class_names(classes: list[Hashable], class_names: Mapping[Hashable, str] | Sequence[str] | None) -> list[str]:
        if class_names is None:
            if not all(isinstance(c, str) for c in classes):
                warnings.warn(
                    "labels are not strings and no class_names were given; prompts use str(label). "
                    "Pass class_names={label: 'text'} for meaningful prompts.",
                    stacklevel=3,
                )
            return [str(c) for c in classes]
        names = []
        for c in classes:
            try:
                name = class_names[c]
            except (KeyError, IndexError, TypeError):
                raise InputError(f"class_names has no entry for label {c!r}; give a name for every label.") from None
            if not isinstance(name, str) or not name:
                raise InputError(f"class_names[{c!r}] = {name!r} must be a non-empty string.")
            names.append(name)
        return names

    def fit_features(
        self,
        features: torch.Tensor | CachedFeatures,
        labels: Sequence[Hashable],
        class_names: Mapping[Hashable, str] | Sequence[str] | None = None,
    ) -> ProLIPAdapter:
        """Fit on features from :meth:`extract_features` (``[V, n, d_in]``); returns self.

        ``features`` may be an in-memory tensor or lazy :class:`prolip.cache.CachedFeatures`,
        which training reads one view at a time.
        """
        self._validate_params()
        for name in (*_FITTED, "loss_history_", "base_fingerprint_", "n_features_in_"):
            self.__dict__.pop(name, None)  # a failed fit leaves the adapter unfitted
        self._weight_cache = None
        features = self._check_features(features)
        labels = self._label_list(labels)
        if features.shape[1] != len(labels):
            raise InputError(f"features hold {features.shape[1]} images but {len(labels)} labels were given.")
        classes, y = self._encode_labels(labels)
        names = self._class_names(classes, class_names)
        backbone, projector = self._get_backbone(), self._projector
        templates = check_templates(self.templates or DEFAULT_TEMPLATES)
        classifier = zero_shot_classifier(backbone.model, backbone.tokenizer, names, templates, device=self._device)
        n_shots = len(y) / len(classes)
        reg_lambda = 1.0 / n_shots if self.reg_lambda == "auto" else float(self.reg_lambda)
        logit_scale = float(self.logit_scale) if self.logit_scale is not None else self._model_logit_scale()
        w0 = projector.to_in_out(projector.parameter)
        if self.epochs:
            result = train_projector(
                features,
                y,
                classifier,
                w0,
                projector.bias,
                logit_scale=logit_scale,
                lr=float(self.lr),
                reg_lambda=reg_lambda,
                epochs=self.epochs,
                device=self._device,
                verbose=self.verbose,
            )
        else:  # zero-shot: W stays W0
            result = TrainResult(weight=w0.detach().float().cpu(), losses=torch.empty(0))
        self.classes_ = _class_array(classes)
        self.class_names_ = names
        self.classifier_ = classifier
        self.delta_ = projector.from_in_out(result.weight - w0.detach().float().cpu()).contiguous()
        self.n_shots_ = n_shots
        self.reg_lambda_ = reg_lambda
        self.logit_scale_ = logit_scale
        self.loss_history_ = result.losses.numpy()
        self.base_fingerprint_ = fingerprint(projector.parameter)
        self.n_features_in_ = projector.in_features
        logger.info("fitted %d classes, N=%.3g, lambda=%.3g, %d steps", len(classes), n_shots, reg_lambda, self.epochs)
        return self

    def _model_logit_scale(self) -> float:
        scale = getattr(self._get_backbone().model, "logit_scale", None)
        return float(scale.detach().float().exp()) if isinstance(scale, torch.Tensor) else 100.0

    # ------------------------------------------------------------------ inference
    def _check_fitted(self) -> None:
        if any(not hasattr(self, name) for name in _FITTED):
            raise NotFittedError(
                "This ProLIPAdapter is not fitted yet; call fit(images, labels), fit_features(features, labels) "
                "or ProLIPAdapter.load(path) first."
            )

    def _adapted_weight(self) -> torch.Tensor:
        """W0 + delta as ``[d_in, d_out]`` fp32 on the model's device (cached)."""
        if getattr(self, "_weight_cache", None) is None:
            p = self._projector
            w = p.to_in_out(p.parameter).detach().float() + p.to_in_out(self.delta_).to(self._device)
            self._weight_cache = w
        return self._weight_cache

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``[n, K]`` (CPU, fp32) of pre-projection test features ``[n, d_in]`` or ``[1, n, d_in]``."""
        self._check_fitted()
        x = self._check_features(features)
        if x.shape[0] != 1:
            raise InputError(f"features hold {x.shape[0]} views; pass test-time features [1, n, d] (views=0).")
        bias = self._projector.bias
        with torch.inference_mode():
            out = logits(
                x[0].to(self._device, torch.float32),
                self._adapted_weight(),
                None if bias is None else bias.float(),
                self.classifier_.to(self._device),
                self.logit_scale_,
            )
        return out.cpu()

    def predict_features(self, features: torch.Tensor) -> np.ndarray:
        """Predicted labels from test-time features (``extract_features(images, views=0)``)."""
        self._check_fitted()
        return self.classes_[self.logits_from_features(features).argmax(dim=1).numpy()]

    def score_features(self, features: torch.Tensor, labels: Sequence[Hashable]) -> float:
        """Accuracy of :meth:`predict_features` against ``labels``."""
        labels = self._label_list(labels)
        predicted = self.predict_features(features)
        if len(predicted) != len(labels):
            raise InputError(f"features hold {len(predicted)} images but {len(labels)} labels were given.")
        return float(np.mean([_plain_label(p) == _plain_label(t) for p, t in zip(predicted, labels, strict=True)]))

    def predict_proba(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Class probabilities ``(n, K)``; columns follow ``classes_``.

        With ``on_error="skip"``, rows are for the readable images only, in input order, and
        ``skipped_`` lists the images left out.
        """
        self._check_fitted()
        return torch.softmax(self.logits_from_features(self.extract_features(images, views=0)), dim=-1).numpy()

    def predict(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Predicted label of each image, as a numpy array of values from ``classes_``.

        With ``on_error="skip"``, labels are for the readable images only, in input order, and
        ``skipped_`` lists the images left out.
        """
        self._check_fitted()
        return self.predict_features(self.extract_features(images, views=0))

    def score(self, images: Sequence[ImageLike], labels: Sequence[Hashable]) -> float:
        """Accuracy of :meth:`predict` on ``images`` against ``labels``.

        With ``on_error="skip"``, the accuracy on the readable images (see ``skipped_``).
        """
        self._check_fitted()
        self._check_lengths(images, labels)
        labels = self._label_list(labels)
        features = self.extract_features(images, views=0)
        return self.score_features(features, self._kept(labels))

    # ------------------------------------------------------------------ the adapted model
    def merged_model(self) -> nn.Module:
        """A copy of the open_clip model whose projector is W0 + delta (the base model is untouched)."""
        self._check_fitted()
        merged = copy.deepcopy(self._get_backbone().model)
        param = find_projector(merged).parameter
        with torch.no_grad():
            param.copy_((param.float() + self.delta_.to(param.device)).to(param.dtype))
        return merged

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Save the delta, T and metadata as one ``.safetensors`` file (written atomically)."""
        self._check_fitted()
        projector = self._projector
        for c in self.classes_.tolist():
            if not isinstance(c, (str, int, float, bool)):
                raise InputTypeError(f"label {c!r} cannot be saved; use str, int, float or bool labels.")
        hyper = {k: getattr(self, k) for k in _SAVED_PARAMS}
        hyper["templates"] = list(self.templates) if self.templates else None
        hyper["precision"] = self.precision
        write_delta(
            path,
            self.delta_,
            self.classifier_,
            {
                "prolip_version": __version__,
                "model_name": self._get_backbone().name or "",
                "pretrained": self.pretrained if isinstance(self.model, str) and self.pretrained else "",
                "projector_family": projector.family,
                "projector_key": projector.key,
                "base_fingerprint": self.base_fingerprint_,
                "classes": self.classes_.tolist(),
                "class_names": self.class_names_,
                "templates": check_templates(self.templates or DEFAULT_TEMPLATES),
                "hyperparameters": hyper,
                "n_shots": repr(self.n_shots_),
                "logit_scale": repr(self.logit_scale_),
            },
        )
        logger.info("saved delta to %s", os.fspath(path))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: str | nn.Module | None = None,
        pretrained: str | None = None,
        *,
        strict: bool = True,
        **overrides: Any,
    ) -> ProLIPAdapter:
        """Rebuild a fitted adapter from a delta file written by :meth:`save`.

        Args:
            path: the ``.safetensors`` delta file.
            model: base model name or object; None uses the model name stored in the file.
            pretrained: pretrained tag or checkpoint path; None uses the one stored in the file.
            strict: refuse (FingerprintMismatchError) when the base model's W0 is not the one the
                delta was trained on. ``strict=False`` loads anyway, with a warning.
            **overrides: constructor parameters to change (e.g. ``device="cpu"``, ``verbose=False``).
        """
        contents = read_delta(path)
        meta = contents.metadata
        unknown = set(overrides) - set(cls._param_names())
        if unknown:
            raise InputError(f"unknown parameter(s) {sorted(unknown)} for ProLIPAdapter; valid: {cls._param_names()}.")
        # Only what save() writes is restored: a file never chooses the device, callables or the model.
        params = {k: v for k, v in meta["hyperparameters"].items() if k in (*_SAVED_PARAMS, "precision")}
        try:
            stored = cls(**params)
            stored._validate_params()
            if stored.random_state is not None:
                stored._seed()
            if stored.templates is not None:
                check_templates(stored.templates)
        except InputError as exc:
            raise DeltaFileError(
                f"{os.fspath(path)!r} holds invalid hyperparameters ({exc}); the file is damaged or was edited."
            ) from None
        params.update(overrides)
        if model is None:
            if not meta["model_name"]:
                raise DeltaFileError(
                    f"{os.fspath(path)!r} was fitted on a model object, not a named model; pass model= to load it."
                )
            model = meta["model_name"]
            pretrained = pretrained if pretrained is not None else (meta["pretrained"] or None)
        adapter = cls(model=model, pretrained=pretrained, **params)
        projector = adapter._projector
        if tuple(contents.delta.shape) != tuple(projector.parameter.shape) or meta["projector_key"] != projector.key:
            raise DeltaFileError(
                f"{os.fspath(path)!r} holds a delta for {meta['projector_key']} of shape {tuple(contents.delta.shape)}, "
                f"but the base model's projector is {projector.key} of shape {tuple(projector.parameter.shape)}."
            )
        if contents.classifier.shape[1] != projector.out_features:
            raise DeltaFileError(
                f"{os.fspath(path)!r} holds a classifier of width {contents.classifier.shape[1]}, "
                f"but the model's embedding width is {projector.out_features}."
            )
        found = fingerprint(projector.parameter)
        if found != meta["base_fingerprint"]:
            message = (
                f"{os.fspath(path)!r} was trained on a different base model: its W0 fingerprint is "
                f"{meta['base_fingerprint']}, the given model's is {found}. Load it onto the base model it was "
                "made for, or pass strict=False to apply it anyway."
            )
            if strict:
                raise FingerprintMismatchError(message)
            warnings.warn(message, stacklevel=2)
        adapter.classes_ = _class_array(meta["classes"])
        adapter.class_names_ = list(meta["class_names"])
        adapter.classifier_ = contents.classifier
        adapter.delta_ = contents.delta
        adapter.n_shots_ = meta["n_shots"]
        adapter.reg_lambda_ = (
            1.0 / meta["n_shots"] if params.get("reg_lambda", "auto") == "auto" else float(params["reg_lambda"])
        )
        adapter.logit_scale_ = meta["logit_scale"]
        adapter.base_fingerprint_ = meta["base_fingerprint"]
        adapter.n_features_in_ = projector.in_features
        return adapter

    # ------------------------------------------------------------------ sharing
    def push_to_hub(
        self,
        repo_id: str,
        private: bool = False,
        token: str | None = None,
        metrics: dict[str, float] | None = None,
    ) -> str:
        """Upload the delta and a generated model card to a Hugging Face Hub repository; returns its URL.

        Needs ``huggingface_hub`` (imported only here). ``metrics`` (e.g. ``{"accuracy": 0.91}``)
        are added to the model card.
        """
        from prolip import hub

        self._check_fitted()
        return hub.push_to_hub(self, repo_id, private=private, token=token, metrics=metrics)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, **kwargs: Any) -> ProLIPAdapter:
        """Load from ``"hf-hub:user/repo"``, a folder holding ``prolip_delta.safetensors``, or a delta file.

        Keyword arguments go to :meth:`load` (``model``, ``pretrained``, ``strict``, overrides).
        """
        from prolip import hub

        return cls.load(hub.resolve(source), **kwargs)
