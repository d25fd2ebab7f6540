"""Test-time ProLIP: TPT's per-image entropy step on the projector, on features, and ``TestTimeProLIP`` on images.

TPT's protocol (Shu et al., NeurIPS 2022) with the projector in place of the prompt, as in the
ProLIP paper. Per test image, from its V views (view 0 the plain view, the others augmented):

1. score every view with the starting projector W_s (W0, or a fitted adapter's W0 + delta) and
   keep the ``int(V·ρ)`` views with the lowest prediction entropy (at least one);
2. minimise the entropy of the kept views' averaged prediction, ``H(mean_v softmax(s·ẑ_v·Tᵀ))``
   (plus ``λ‖W − W_s‖²_F`` when ``reg_lambda`` is set), for ``steps`` optimiser steps on that
   image's copy of W, starting from fresh optimiser state (TPT: one AdamW step, lr 5e-3);
3. predict the plain view with the updated copy; the next image starts again from W_s.

Only the projector moves, so the trunk runs once per view and all of this works on stored
pre-projection features. Images are independent (entropy, optimiser and weight decay act per
image and per element), so a chunk of images is adapted at once: one ``[B, d_in, d_out]``
parameter holding one copy per image, one optimiser over it.

:class:`TestTimeProLIP` sees each image in ``views`` views (the plain test view and ``views − 1`` random crops),
runs the trunk once per view and adapts as above; ``prolip bench``'s ``test-time-prolip`` runs
:func:`tta_logits` on its problems.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from prolip.adapter import ProLIPAdapter
from prolip.errors import InputError
from prolip.estimator import Estimator
from prolip.features.cache import CachedFeatures, check_features
from prolip.features.extract import extract_features
from prolip.features.images import ImageLike, load_for_model, report_skipped
from prolip.model.backbone import Backbone
from prolip.model.head import LinearHead
from prolip.model.zeroshot import check_templates
from prolip.params import (
    BATCH_SIZE,
    BOOLEAN,
    CLASS_NAMES,
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    NONE,
    SEED,
    STEPS,
    TEMPLATES,
    Constrained,
    Constraint,
    one_of,
)
from prolip.training.engine import build_optimizer

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adam", "sgd")
"""The optimisers test-time adaptation can use, by name (:func:`prolip.training.engine.build_optimizer`; each acts
element by element, so a batch of images adapts exactly as each image would alone)."""
CHUNK_BYTES = 256 * 2**20
"""Memory budget of one chunk's projector copies, gradients and optimiser state when ``chunk_size`` is None."""


@dataclass(frozen=True)
class TestTimeSettings(Constrained):
    """How each test image adapts its projector.

    Attributes:
        rho: fraction of views kept, by lowest entropy: ``int(V·rho)`` of V, at least 1 (TPT: 0.1).
        steps: optimiser steps per image (TPT: 1); 0 predicts with the starting projector.
        lr: learning rate (TPT: 5e-3); 0 leaves the projector unchanged.
        optimizer: "adamw" (TPT), "adam" or "sgd", with torch's defaults otherwise.
        weight_decay: the optimiser's weight decay; None keeps torch's default (AdamW: 0.01, which
            TPT's and ProLIP's test-time code use; Adam, SGD: 0).
        reg_lambda: λ of a ProLIP penalty ``λ‖W − W_s‖²_F`` toward the starting projector; its
            gradient is zero at the first step, so it only matters with ``steps > 1``.
    """

    __test__ = False  # not a pytest test class, despite its name

    rho: float = 0.1
    steps: int = 1
    lr: float = 5e-3
    optimizer: str = "adamw"
    weight_decay: float | None = None
    reg_lambda: float = 0.0

    # TPT's: a learning rate of 0 (the starting projector, unchanged) is allowed here, unlike a fit's.
    _parameter_constraints: ClassVar[dict[str, Constraint]] = {
        "rho": FRACTION, "steps": STEPS, "lr": NON_NEGATIVE, "optimizer": one_of(OPTIMIZERS),
        "weight_decay": NONE | NON_NEGATIVE, "reg_lambda": NON_NEGATIVE,
    }  # fmt: skip

    def kept(self, n_views: int) -> int:
        """How many of ``n_views`` views are kept: TPT's ``int(V·ρ)``, at least 1."""
        return max(1, int(n_views * self.rho))

    def optimizer_for(self, weight: torch.Tensor) -> torch.optim.Optimizer:
        """A fresh optimiser over ``weight`` (every copy starts from zero state), torch's defaults otherwise."""
        return build_optimizer(self.optimizer, [weight], lr=self.lr, weight_decay=self.weight_decay, kernel="default")


def view_entropies(
    features: torch.Tensor | CachedFeatures, head: LinearHead, classifier: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """Prediction entropy ``[V, n]`` of every view of every image under ``head`` (W ``[d_in, d_out]`` and b).

    ``features`` are ``[V, n, width]`` (a tensor, or lazy cached features read one view at a time).
    """
    rows = []
    for v in range(features.shape[0]):
        log_p = torch.log_softmax(head.logits(features[v].to(head.weight), classifier, logit_scale), dim=-1)
        rows.append(-(log_p.exp() * log_p).sum(dim=-1))
    return torch.stack(rows)


def select_views(entropies: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices ``[keep, n]`` of each image's ``keep`` lowest-entropy views, lowest first (ties: lower view first)."""
    return torch.sort(entropies, dim=0, stable=True).indices[:keep]


def _gather_views(
    features: torch.Tensor | CachedFeatures, selected: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The selected views' features ``[n, keep, width]``: row ``[i, j]`` is view ``selected[j, i]`` of image i.

    One pass over the views, so lazy cached features are read once, one view at a time.
    """
    keep, n = selected.shape
    out = torch.empty(n, keep, features.shape[-1], dtype=dtype)
    for v in range(features.shape[0]):
        slot, image = (selected == v).nonzero(as_tuple=True)
        if image.numel():
            out[image, slot] = features[v][image].to(dtype)
    return out


def _average_entropy(log_p: torch.Tensor) -> torch.Tensor:
    """Entropy ``[B]`` of the mean of the distributions ``exp(log_p)`` ``[B, k, K]``, computed in log space."""
    mean = torch.logsumexp(log_p, dim=1) - math.log(log_p.shape[1])
    mean = mean.clamp_min(torch.finfo(mean.dtype).min)  # exp(-inf)·(-inf) would be NaN; 0·finite is 0
    return -(mean.exp() * mean).sum(dim=-1)


def _adapt_chunk(
    selected: torch.Tensor,
    plain: torch.Tensor,
    head: LinearHead,
    classifier: torch.Tensor,
    logit_scale: float,
    settings: TestTimeSettings,
) -> torch.Tensor:
    """Adapt one projector copy per image and return the plain views' logits ``[B, K]``.

    Args:
        selected: the kept views' features ``[B, k, width]`` of B images.
        plain: the plain views' features ``[B, width]``.
        head: the starting projector W_s ``[d_in, d_out]`` (its dtype and device are used throughout) and the
            frozen bias.
        classifier: T ``[K, d_out]``.
        logit_scale: s.
        settings: the adaptation (:class:`TestTimeSettings`).
    """
    weight, bias = head.weight, head.bias
    x, residual = head.split(selected.to(weight))
    offset = residual if bias is None else (bias if residual is None else residual + bias)
    copies = weight.expand(x.shape[0], *weight.shape).clone().requires_grad_(True)
    optimizer = settings.optimizer_for(copies)
    with torch.enable_grad():
        for _ in range(settings.steps):
            z = x @ copies if offset is None else torch.baddbmm(offset, x, copies)
            log_p = torch.log_softmax(logit_scale * F.normalize(z, dim=-1) @ classifier.t(), dim=-1)
            loss = _average_entropy(log_p).sum()  # a sum: each copy gets its own image's gradient
            if settings.reg_lambda:
                loss = loss + settings.reg_lambda * (copies - weight).pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    # W_s's own embedding plus the change's: with no change, exactly the starting projector's logits.
    plain = plain.to(weight)
    change = (head.split(plain)[0].unsqueeze(1) @ (copies.detach() - weight)).squeeze(1)
    return logit_scale * F.normalize(head.project(plain) + change, dim=-1) @ classifier.t()


def _chunk_images(weight: torch.Tensor, chunk_size: int | None) -> int:
    """Images adapted at once: ``chunk_size``, or as many as :data:`CHUNK_BYTES` holds (4 copies of W each)."""
    if chunk_size is not None:
        return chunk_size
    return max(1, CHUNK_BYTES // (4 * weight.numel() * weight.element_size()))


def tta_logits(
    features: torch.Tensor | CachedFeatures,
    head: LinearHead,
    classifier: torch.Tensor,
    logit_scale: float,
    settings: TestTimeSettings = TestTimeSettings(),
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Test-time ProLIP's logits ``[n, K]`` (CPU) of images given as views ``[V, n, width]``, view 0 plain.

    Args:
        features: pre-projection features of every view (x, and the residual beside it for towers
            that have one; see :meth:`prolip.model.head.LinearHead.split`); a tensor or lazy
            :class:`~prolip.features.cache.CachedFeatures`.
        head: the starting projector W_s ``[d_in, d_out]`` and the frozen bias; computation runs in W_s's
            dtype, on its device.
        classifier: the text classifier T ``[K, d_out]``.
        logit_scale: s.
        settings: the adaptation (:class:`TestTimeSettings`).
        chunk_size: images adapted at once (memory: 4 copies of W each); None fits
            :data:`CHUNK_BYTES`. Results do not depend on it.
    """
    step = _chunk_images(head.weight, chunk_size)
    if step < 1:
        raise InputError(f"chunk_size={chunk_size} must be None or an integer >= 1.")
    weight = head.weight.detach()
    head = LinearHead(weight, None if head.bias is None else head.bias.detach().to(weight))
    classifier = classifier.detach().to(weight)
    with torch.no_grad():
        entropies = view_entropies(features, head, classifier, logit_scale)
        selected = select_views(entropies, settings.kept(features.shape[0])).cpu()
        kept = _gather_views(features, selected, weight.dtype)
        plain = features[0]
    out = [
        _adapt_chunk(kept[i : i + step], plain[i : i + step], head, classifier, logit_scale, settings).detach()
        for i in range(0, kept.shape[0], step)
    ]
    return torch.cat(out).cpu()


STARTS = ("adapted", "pretrained")
"""Where each image's projector copy starts: a fitted adapter's W0 + delta, or the base model's W0."""
_IMAGES_AT_ONCE = 64  # images whose views are held in memory together by predict


class TestTimeProLIP(Estimator):
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

    As a scikit-learn estimator, the constructor only stores its arguments; they are checked, and T built, when
    the adaptation is first used (and again after ``set_params``).

    Attributes:
        classes_: the labels, in the column order of :meth:`predict_proba`.
        classifier_: T ``[K, d_out]``.
        settings: the adaptation (:class:`TestTimeSettings`).
    """

    __test__ = False  # not a pytest test class, despite its name

    _parameter_constraints: ClassVar[dict[str, Constraint]] = {
        "model": Constraint(
            "a fitted ProLIPAdapter or a prolip Backbone", lambda v: isinstance(v, (ProLIPAdapter, Backbone))
        ),
        "class_names": NONE | CLASS_NAMES,
        "templates": TEMPLATES,
        "start": NONE | one_of(STARTS),
        "views": Constraint("an integer >= 1 (the plain view and views - 1 crops)", COUNT.check),
        "batch_size": BATCH_SIZE,
        "chunk_size": NONE | COUNT,
        "random_state": Constraint("an integer (the seed of the crops and flips)", SEED.check),
        "verbose": BOOLEAN,
        **TestTimeSettings._parameter_constraints,
    }

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
        self.model = model
        self.class_names = class_names
        self.templates = templates
        self.start = start
        self.views = views
        self.rho = rho
        self.steps = steps
        self.lr = lr
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.reg_lambda = reg_lambda
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.random_state = random_state
        self.verbose = verbose

    @property
    def settings(self) -> TestTimeSettings:
        """The adaptation each image takes, from this estimator's parameters."""
        return TestTimeSettings(
            rho=self.rho, steps=self.steps, lr=self.lr, optimizer=self.optimizer, weight_decay=self.weight_decay,
            reg_lambda=self.reg_lambda,
        )  # fmt: skip

    def _prepared(self) -> _Prepared:
        """What the parameters make: the backbone, the classes, T, s and the starting projector (checked, then cached
        until a parameter changes)."""
        key = tuple((k, id(v)) for k, v in self.get_params(deep=False).items())
        cached = self.__dict__.get("_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        self.check_params()
        prepared = _prepare(self.model, self.class_names, self.templates, self.start)
        self.__dict__["_cache"] = (key, prepared)
        return prepared

    @property
    def backbone(self) -> Backbone:
        """The model the views go through."""
        return self._prepared().backbone

    @property
    def classes_(self) -> np.ndarray:
        """The labels, in the column order of :meth:`predict_proba`."""
        return self._prepared().classes

    @property
    def classifier_(self) -> torch.Tensor:
        """T ``[K, d_out]``: the adapter's own, or built from the templates."""
        return self._prepared().classifier

    def extract_features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Pre-projection features of every view ``[views, n, width]``: view 0 plain, then the crops."""
        backbone = self.backbone
        loaded = load_for_model(images, on_error="raise", draft_size=backbone.draft_size)
        report_skipped(loaded)
        return self._features(backbone, loaded.images)

    def _features(self, backbone: Backbone, images: list[torch.Tensor]) -> torch.Tensor:
        common = {"seed": self.random_state, "batch_size": self.batch_size, "verbose": self.verbose}
        plain = extract_features(backbone, images, 0, **common)
        if self.views == 1:
            return plain
        return torch.cat([plain, extract_features(backbone, images, self.views - 1, **common)])

    def logits_from_features(self, features: torch.Tensor | CachedFeatures) -> torch.Tensor:
        """Class logits ``[n, K]`` (CPU, fp32) of views ``[V, n, width]`` (view 0 plain), from :meth:`extract_features`."""
        prepared = self._prepared()
        features = check_features(features, prepared.backbone.projector.feature_width)
        classifier = prepared.classifier.to(prepared.backbone.device)
        return tta_logits(
            features, prepared.head, classifier, prepared.logit_scale, self.settings, chunk_size=self.chunk_size
        )

    def predict_proba_features(self, features: torch.Tensor | CachedFeatures) -> np.ndarray:
        """Class probabilities ``(n, K)`` from view features; columns follow ``classes_``."""
        return torch.softmax(self.logits_from_features(features), dim=-1).numpy()

    def predict_features(self, features: torch.Tensor | CachedFeatures) -> np.ndarray:
        """Predicted labels from view features (:meth:`extract_features`)."""
        return self.classes_[self.logits_from_features(features).argmax(dim=1).numpy()]

    def logits(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Class logits ``[n, K]`` of images, a group at a time (only one group's views are held in memory)."""
        backbone = self.backbone
        loaded = load_for_model(images, on_error="raise", draft_size=backbone.draft_size)
        report_skipped(loaded)
        groups = [loaded.images[i : i + _IMAGES_AT_ONCE] for i in range(0, len(loaded.images), _IMAGES_AT_ONCE)]
        return torch.cat([self.logits_from_features(self._features(backbone, group)) for group in groups])

    def predict_proba(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Class probabilities ``(n, K)`` of images; columns follow ``classes_``."""
        return torch.softmax(self.logits(images), dim=-1).numpy()

    def predict(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Predicted label of each image, as a numpy array of values from ``classes_``."""
        return self.classes_[self.logits(images).argmax(dim=1).numpy()]


class _Prepared(NamedTuple):
    backbone: Backbone
    classes: np.ndarray
    classifier: torch.Tensor
    logit_scale: float
    head: LinearHead  # the starting projector W_s and the frozen bias


def _prepare(
    model: ProLIPAdapter | Backbone,
    class_names: Sequence[str] | None,
    templates: Sequence[str] | None,
    start: str | None,
) -> _Prepared:
    """The backbone, classes, T, s and starting projector of a TestTimeProLIP's (checked) parameters.

    Raises:
        InputError: class names with an adapter, none with a backbone, start="adapted" with a backbone, or
            templates for an adapter whose T was trained.
        NotFittedError: the adapter is not fitted.
    """
    if isinstance(model, ProLIPAdapter):
        if class_names is not None:
            raise InputError("class_names come from the fitted adapter; pass them only with a backbone.")
        backbone, state = model.backbone, model.fitted_  # NotFittedError if it is not fitted
        classes, classifier, logit_scale = model.classes_, state.classifier, state.logit_scale
        if templates is not None:
            if model.target != "image" or model.taskres_alpha is not None:
                raise InputError(
                    f"templates rebuild T from the text tower, but this adapter's T was trained "
                    f"(target={model.target!r}, taskres_alpha={model.taskres_alpha!r}); leave templates=None."
                )
            classifier = backbone.classifier(list(state.class_names), check_templates(templates))
        adapted = state.adapted_weight(backbone.projector) if start in (None, "adapted") else None
    else:
        if class_names is None:
            raise InputError("class_names are needed with a backbone: the text of each class, e.g. ['cat', 'dog'].")
        if start == "adapted":
            raise InputError("start='adapted' needs a fitted ProLIPAdapter; a backbone starts from W0 ('pretrained').")
        backbone, adapted = model, None
        classes = np.asarray(list(class_names))
        classifier = model.classifier(list(class_names), check_templates(templates))
        logit_scale = model.logit_scale
    projector = backbone.projector
    weight = adapted if adapted is not None else projector.to_in_out(projector.parameter).detach().float()
    head = LinearHead(weight, None if projector.bias is None else projector.bias.float())
    return _Prepared(backbone, classes, classifier, logit_scale, head)
