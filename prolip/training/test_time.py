"""Test-time ProLIP on features (the tensor half; :mod:`prolip.variants.test_time` is the estimator).

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prolip.errors import InputError
from prolip.features.cache import CachedFeatures
from prolip.model.head import LinearHead
from prolip.training.engine import build_optimizer

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


def gather_views(
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


def adapt_chunk(
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


def chunk_images(weight: torch.Tensor, chunk_size: int | None) -> int:
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
    step = chunk_images(head.weight, chunk_size)
    if step < 1:
        raise InputError(f"chunk_size={chunk_size} must be None or an integer >= 1.")
    weight = head.weight.detach()
    head = LinearHead(weight, None if head.bias is None else head.bias.detach().to(weight))
    classifier = classifier.detach().to(weight)
    with torch.no_grad():
        entropies = view_entropies(features, head, classifier, logit_scale)
        selected = select_views(entropies, settings.kept(features.shape[0])).cpu()
        kept = gather_views(features, selected, weight.dtype)
        plain = features[0]
    out = [
        adapt_chunk(kept[i : i + step], plain[i : i + step], head, classifier, logit_scale, settings).detach()
        for i in range(0, kept.shape[0], step)
    ]
    return torch.cat(out).cpu()
