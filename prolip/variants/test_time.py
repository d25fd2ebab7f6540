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

import numpy as np
import torch
import torch.nn.functional as F

from prolip.adapter import ProLIPAdapter
from prolip.errors import InputError, InputTypeError
from prolip.features.cache import CachedFeatures, check_features
from prolip.features.extract import extract_features
from prolip.features.images import ImageLike, load_for_model, report_skipped
from prolip.model.backbone import Backbone
from prolip.model.head import LinearHead
from prolip.model.zeroshot import check_templates
from prolip.params import CONSTRAINTS, check_params
from prolip.training.engine import build_optimizer

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adam", "sgd")
"""The optimisers test-time adaptation can use, by name (:func:`prolip.training.engine.build_optimizer`; each acts
element by element, so a batch of images adapts exactly as each image would alone)."""
CHUNK_BYTES = 256 * 2**20
"""Memory budget of one chunk's projector copies, gradients and optimiser state when ``chunk_size`` is None."""


@dataclass(frozen=True)
class TestTimeSettings:
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

    def __post_init__(self) -> None:
        def number(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        problems = [
            (number(self.rho) and 0 < self.rho <= 1, f"rho={self.rho!r} must be a fraction in (0, 1]"),
            (
                isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 0,
                f"steps={self.steps!r} must be an integer >= 0",
            ),
            (number(self.lr) and self.lr >= 0, f"lr={self.lr!r} must be a number >= 0"),
            (self.optimizer in OPTIMIZERS, f"optimizer={self.optimizer!r} must be one of {list(OPTIMIZERS)}"),
            (
                self.weight_decay is None or (number(self.weight_decay) and self.weight_decay >= 0),
                f"weight_decay={self.weight_decay!r} must be None or a number >= 0",
            ),
            (number(self.reg_lambda) and self.reg_lambda >= 0, f"reg_lambda={self.reg_lambda!r} must be a number >= 0"),
        ]
        for ok, message in problems:
            if not ok:
                raise InputError(f"test-time setting {message}.")

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
        settings: the adaptation (:class:`TestTimeSettings`).
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
