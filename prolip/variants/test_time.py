"""``TestTimeProLIP``, test-time ProLIP on images (the estimator half of :mod:`prolip.training.test_time`).

Each image is seen in ``views`` views (the plain test view and ``views − 1`` random crops), the
trunk runs once per view, and the image's own copy of the projector takes TPT's entropy step
(:mod:`prolip.training.test_time`) before its plain view is predicted. Nothing is learned or kept between images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from prolip.adapter import ProLIPAdapter
from prolip.errors import InputError, InputTypeError
from prolip.features.cache import CachedFeatures, check_features
from prolip.features.extract import extract_features
from prolip.features.images import ImageLike, load_for_model, report_skipped
from prolip.model.backbone import Backbone
from prolip.model.head import LinearHead
from prolip.model.zeroshot import check_templates
from prolip.params import CONSTRAINTS, check_params
from prolip.training.test_time import TestTimeSettings, tta_logits

logger = logging.getLogger(__name__)

STARTS = ("adapted", "pretrained")
"""Where each image's projector copy starts: a fitted adapter's W0 + delta, or the base model's W0."""
_IMAGES_AT_ONCE = 64  # images whose views are held in memory together by predict


class TestTimeProLIP:
    """Test-time ProLIP (TPT's protocol on the vision projector): one entropy step per image, then reset.

    Args:
        model: a fitted :class:`~prolip.ProLIPAdapter` (its fit as of now: classes, T, logit scale, delta), or
            a :class:`~prolip.model.backbone.Backbone` (``prolip.model.backbone.build_backbone("ViT-B-32",
            "openai")``) for zero-shot CLIP plus test-time adaptation, with ``class_names``.
        class_names: with a backbone, the text of each class (they are also the predicted labels).
        templates: prompt templates with one "{}" each, T built as the zero-shot classifier (each
            prompt's embedding normalised, averaged, normalised: the official ``clip_classifier``),
            e.g. the 7 ImageNet templates of :data:`prolip.bench.data.IMAGENET_TEMPLATES`. With a
            backbone, None means "a photo of a {}."; with an adapter, None keeps the adapter's own
            T, and templates rebuild T from its class names (adapters whose T is the zero-shot
            classifier only: ``target="image"``, no ``taskres_alpha``).
        start: "adapted" (W0 + delta, the default for an adapter) or "pretrained" (W0: zero-shot CLIP
            plus test-time adaptation, the paper's setting; the only choice for a backbone).
        views: views per image: the plain view and ``views − 1`` random resized crops with flips
            (prolip's training views: scale (0.5, 1), bicubic; TPT's ImageNet views are torchvision's
            RandomResizedCrop at scale (0.08, 1) with flips, AugMix only on its fine-grained sets).
        rho: fraction of views kept by lowest entropy (``int(views·rho)``, at least one).
        steps: optimiser steps per image.
        lr: learning rate.
        optimizer: "adamw", "adam" or "sgd".
        weight_decay: None for torch's default (AdamW's 0.01, as TPT's and ProLIP's code use).
        reg_lambda: λ of ``λ‖W − W_start‖²_F``; matters only with ``steps > 1``.
        batch_size: views per forward pass of the trunk.
        chunk_size: images adapted at once (None: as many as 256 MiB of projector copies hold).
        random_state: seed of the crops and flips (per image, from its content: see
            :func:`prolip.features.extract.image_seed`), so results are deterministic.
        verbose: show progress bars.

    Attributes:
        classes_: the labels, in the column order of :meth:`predict_proba`.
        settings: the adaptation (:class:`~prolip.training.test_time.TestTimeSettings`).
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(
        self,
        model: ProLIPAdapter | Backbone,
        class_names: Sequence[str] | None = None,
        *,
        templates: Sequence[str] | None = None,
        start: str | None = None,
        views: int = 64,
        rho: float = 0.1,
        steps: int = 1,
        lr: float = 5e-3,
        optimizer: str = "adamw",
        weight_decay: float | None = None,
        reg_lambda: float = 0.0,
        batch_size: int = 64,
        chunk_size: int | None = None,
        random_state: int = 0,
        verbose: bool = False,
    ) -> None:
        self.settings = TestTimeSettings(
            rho=rho, steps=steps, lr=lr, optimizer=optimizer, weight_decay=weight_decay, reg_lambda=reg_lambda
        )
        if not (isinstance(views, int) and views >= 1):
            raise InputError(f"views={views!r} must be an integer >= 1 (the plain view and views - 1 crops).")
        check_params({"batch_size": batch_size, "random_state": random_state, "verbose": verbose})
        if random_state is None:  # the crops are seeded per image from it: there is no unseeded mode
            raise InputError("random_state=None is invalid: it must be an integer (the seed of the crops and flips).")
        if chunk_size is not None and not (CONSTRAINTS["batch_size"].check(chunk_size)):
            raise InputError(f"chunk_size={chunk_size!r} is invalid: it must be None or an integer >= 1.")
        self.views, self.batch_size, self.chunk_size = views, batch_size, chunk_size
        self.random_state, self.verbose = random_state, verbose
        if isinstance(model, ProLIPAdapter):
            if class_names is not None:
                raise InputError("class_names come from the fitted adapter; pass them only with a backbone.")
            self.backbone = model.backbone
            state = model.fitted_  # NotFittedError if it is not fitted
            start = "adapted" if start is None else start
            self.classes_ = model.classes_
            self.classifier, self.logit_scale = state.classifier, state.logit_scale
            if templates is not None:
                if model.target != "image" or model.taskres_alpha is not None:
                    raise InputError(
                        f"templates rebuild T from the text tower, but this adapter's T was trained "
                        f"(target={model.target!r}, taskres_alpha={model.taskres_alpha!r}); leave templates=None."
                    )
                self.classifier = self.backbone.classifier(list(state.class_names), check_templates(templates))
            adapted = state.adapted_weight(self.backbone.projector) if start == "adapted" else None
        elif isinstance(model, Backbone):
            if class_names is None:
                raise InputError("class_names are needed with a backbone: the text of each class, e.g. ['cat', 'dog'].")
            if start == "adapted":
                raise InputError(
                    "start='adapted' needs a fitted ProLIPAdapter; a backbone starts from W0 ('pretrained')."
                )
            if (
                isinstance(class_names, (str, bytes))
                or not isinstance(class_names, Sequence)
                or not class_names
                or not all(isinstance(n, str) and n for n in class_names)
                or len(set(class_names)) != len(class_names)
            ):  # a string is a sequence of characters, not of class names
                raise InputError(
                    f"class_names={class_names!r} must be a non-empty list of distinct non-empty strings, "
                    "e.g. ['cat', 'dog']."
                )
            self.backbone, start, adapted = model, "pretrained", None
            self.classes_ = np.asarray(list(class_names))
            self.classifier = model.classifier(list(class_names), check_templates(templates))
            self.logit_scale = model.logit_scale
        else:
            raise InputTypeError(
                f"model must be a fitted ProLIPAdapter or a prolip Backbone, not {type(model).__name__}."
            )
        if start not in STARTS:
            raise InputError(f"start={start!r} must be one of {list(STARTS)}.")
        self.start = start
        projector = self.backbone.projector
        self.weight = adapted if adapted is not None else projector.to_in_out(projector.parameter).detach().float()

    def extract_features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Pre-projection features of every view ``[views, n, width]``: view 0 plain, then the crops."""
        loaded = load_for_model(images, on_error="raise", draft_size=self.backbone.draft_size)
        report_skipped(loaded)
        return self._features(loaded.images)

    def _features(self, images: list[torch.Tensor]) -> torch.Tensor:
        common = {"seed": self.random_state, "batch_size": self.batch_size, "verbose": self.verbose}
        plain = extract_features(self.backbone, images, 0, **common)
        if self.views == 1:
            return plain
        return torch.cat([plain, extract_features(self.backbone, images, self.views - 1, **common)])

    def logits_from_features(self, features: torch.Tensor | CachedFeatures) -> torch.Tensor:
        """Class logits ``[n, K]`` (CPU, fp32) of views ``[V, n, width]`` (view 0 plain), from :meth:`extract_features`."""
        projector = self.backbone.projector
        features = check_features(features, projector.feature_width)
        head = LinearHead(self.weight, None if projector.bias is None else projector.bias.float())
        classifier = self.classifier.to(self.backbone.device)
        return tta_logits(features, head, classifier, self.logit_scale, self.settings, chunk_size=self.chunk_size)

    def predict_proba_features(self, features: torch.Tensor | CachedFeatures) -> np.ndarray:
        """Class probabilities ``(n, K)`` from view features; columns follow ``classes_``."""
        return torch.softmax(self.logits_from_features(features), dim=-1).numpy()

    def predict_features(self, features: torch.Tensor | CachedFeatures) -> np.ndarray:
        """Predicted labels from view features (:meth:`extract_features`)."""
        return self.classes_[self.logits_from_features(features).argmax(dim=1).numpy()]

    def logits(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Class logits ``[n, K]`` of images, a group at a time (only one group's views are held in memory)."""
        loaded = load_for_model(images, on_error="raise", draft_size=self.backbone.draft_size)
        report_skipped(loaded)
        groups = [loaded.images[i : i + _IMAGES_AT_ONCE] for i in range(0, len(loaded.images), _IMAGES_AT_ONCE)]
        return torch.cat([self.logits_from_features(self._features(group)) for group in groups])

    def predict_proba(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Class probabilities ``(n, K)`` of images; columns follow ``classes_``."""
        return torch.softmax(self.logits(images), dim=-1).numpy()

    def predict(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Predicted label of each image, as a numpy array of values from ``classes_``."""
        return self.classes_[self.logits(images).argmax(dim=1).numpy()]
