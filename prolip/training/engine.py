"""The training engine: every ProLIP fit, variant and grid point, in one loop, under one schedule and optimiser.

Loss = CE(s · normalize(x W + b + r) · Tᵀ [+ E], y) + λ‖W − W0‖²_F, minimised by full-batch Adam
(betas (0.9, 0.999), eps 1e-4; AdamW for ProLIP + Tip-Adapter's joint recipe) from W = W0, the learning
rate of step t at ``lr · (1 + cos(π t / epochs)) / 2``, step t on view ``t mod V``. Beside W (or instead of
it) a *classifier side* may train (:mod:`prolip.training.sides`: the text projection, T rebuilt from it at
every step, or TaskRes's residual), and a *score term* E with a trained tensor of its own (the bench's
joint ProLIP + Tip-Adapter and the public code's ProLIP + TaskRes), in the same optimiser.

Two numerics, one loop (:func:`_train`):

* ``train_dtype="fp32"`` (the default): W's gradient in closed form, so a step is four matrix products and
  a few passes over ``[n, d_out]`` and ``[n, K]`` buffers allocated once, plus one fused Adam step (a
  single pass over W, its gradient and both moments; ``foreach`` where a device lacks the fused kernel),
  called after the first step through its public functional form ``torch.optim.adam.adam`` on the state
  torch built. That keeps a fit close to the cost of its matrix products even when they are small (few
  shots, few classes). G grid points train side by side, every step reading one view once. A classifier
  side's and a score term's gradients come from autograd on their own small graphs.
* ``train_dtype="fp16"``: the official code's numerics — W, its gradient and Adam's moments in fp16, the
  loss computed in fp16 under autograd, a plain (non-fused) Adam on fp16 parameters, so updates below half
  an fp16 step of an entry are lost, as the reference code trains on the GPU.

Both check for divergence once, at the end, so the loop never waits on the device.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch.optim.adam import adam as adam_update

from prolip.errors import InputError, TrainingDivergedError, TrainingWarning, warn
from prolip.model.head import LinearHead
from prolip.params import (
    BOOLEAN,
    DEVICE,
    EPOCHS,
    LOGIT_SCALE,
    LR,
    REG_LAMBDA,
    TRAIN_DTYPE,
    Constrained,
    Constraint,
    one_of,
    resolve_reg_lambda,
)
from prolip.progress import progress
from prolip.training.sides import ClassifierSide

logger = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-4  # the paper's value (torch's default is 1e-8)
OPTIMIZERS = ("adam", "adamw")
"""The optimisers a ProLIP training uses: the paper's Adam, or AdamW (torch's weight decay 0.01) for the public
code's joint ProLIP + Tip-Adapter recipe."""
_NORM_EPS = 1e-12  # F.normalize's floor on the norm
# From this many classes torch.log_softmax beats logsumexp-and-subtract on CPU (measured: 0.5x at
# 12 classes, 2-3x at 16, 4.5x at 1000). Chosen by K alone, so a grid point and a lone fit agree.
_FUSED_SOFTMAX_CLASSES = 16
DIVERGENCE_RATIO = 2.0  # a final loss above this multiple of the first one means training went wrong
HALF = torch.float16


@dataclass(frozen=True)
class TrainConfig(Constrained):
    """How one training runs: built once per fit and passed whole (its fields checked when it is built).

    Attributes:
        lr: Adam's learning rate (of the first step; the cosine schedule takes it to 0).
        reg_lambda: λ: a number >= 0, or a rule of :data:`prolip.params.REG_LAMBDA_RULES` ("auto" = 1/N,
            "1/N^2") that :meth:`resolved` turns into one.
        epochs: full-batch steps (0: W stays W0).
        logit_scale: s, or None for the model's own (:meth:`resolved`).
        train_dtype: "fp32", or "fp16" for the official code's numerics.
        optimizer: "adam" (the paper's), or "adamw".
        device: where training runs (a torch device or its name; features stay where they are and are moved
            one view at a time).
        verbose: a progress bar over the steps.
    """

    lr: float = 1e-3
    reg_lambda: float | str = "auto"
    epochs: int = 300
    logit_scale: float | None = None
    train_dtype: str = "fp32"
    optimizer: str = "adam"
    device: torch.device | str = "cpu"
    verbose: bool = False

    _parameter_constraints: ClassVar[dict[str, Constraint]] = {
        "lr": LR, "reg_lambda": REG_LAMBDA, "epochs": EPOCHS, "logit_scale": LOGIT_SCALE, "train_dtype": TRAIN_DTYPE,
        "optimizer": one_of(OPTIMIZERS), "device": DEVICE, "verbose": BOOLEAN,
    }  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "device", torch.device(self.device))

    def resolved(self, n_shots: float, logit_scale: float) -> TrainConfig:
        """The same settings with numbers for λ (its rule applied to N shots) and for s (``logit_scale`` if unset)."""
        scale = logit_scale if self.logit_scale is None else self.logit_scale
        return dataclasses.replace(
            self, reg_lambda=resolve_reg_lambda(self.reg_lambda, n_shots), logit_scale=float(scale)
        )

    def at(self, lr: float, reg_lambda: float) -> TrainConfig:
        """The same settings at another (lr, λ) point."""
        return dataclasses.replace(self, lr=float(lr), reg_lambda=float(reg_lambda))


class ScoreTerm(Protocol):
    """A term E added to the logits, with one trained tensor of its own (trained beside W, no penalty).

    ``scores(rows, weight, param)`` gives E ``[n, K]`` for one view's stored features ``rows`` under the current
    projector ``weight`` (detached: no gradient flows from E to W) and the trained tensor ``param``, which
    starts at ``start``. ``to(device, dtype)`` gives the same term there (its own tensors moved).
    """

    start: torch.Tensor

    def scores(self, rows: torch.Tensor, weight: torch.Tensor, param: torch.Tensor) -> torch.Tensor: ...

    def to(self, device: torch.device, dtype: torch.dtype) -> ScoreTerm: ...


@dataclass
class TrainResult:
    """What training returns (fp32, CPU; float64 for a float64 head).

    Attributes:
        weight: the trained projector ``[d_in, d_out]``, or None when it stayed frozen (a side alone trained).
        losses: the loss of every step.
        classifier_weight: the trained tensor of the classifier side (W_t ``[d_t, d_out]`` or TaskRes's R
            ``[K, d_out]``), or None.
        classifier: T rebuilt from ``classifier_weight`` ``[K, d_out]``, or None.
        extra: the score term's trained tensor, or None.
    """

    weight: torch.Tensor | None
    losses: torch.Tensor
    classifier_weight: torch.Tensor | None = None
    classifier: torch.Tensor | None = None
    extra: torch.Tensor | None = None


def cosine_lr(lr: float, step: int, steps: int) -> float:
    """The learning rate of ``step`` of ``steps``: torch's CosineAnnealingLR(T_max=steps) in closed form."""
    return lr * (1 + math.cos(math.pi * step / steps)) / 2


def build_optimizer(
    name: str,
    params: list[torch.Tensor] | list[dict[str, Any]],
    *,
    lr: float,
    eps: float | None = None,
    weight_decay: float | None = None,
    kernel: str = "fused",
) -> torch.optim.Optimizer:
    """The one place prolip builds an optimiser: ``name`` in "adam", "adamw" or "sgd", torch's defaults otherwise.

    ``kernel``: "fused" (falling back to ``foreach`` on a device without the fused kernel), "foreach",
    "single" (one tensor at a time: what an fp16 parameter's official training uses, moments in fp16), or
    "default" (torch's own choice for the device).
    """
    options: dict[str, Any] = {"lr": lr}
    if eps is not None:
        options["eps"] = eps
    if weight_decay is not None:
        options["weight_decay"] = weight_decay
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
    if name != "sgd":
        options["betas"] = ADAM_BETAS
    if kernel == "fused" and name != "sgd":
        try:
            return cls(params, fused=True, **options)
        except RuntimeError:  # e.g. a device without the fused kernel
            kernel = "foreach"
    if kernel == "default":
        return cls(params, **options)
    return cls(params, foreach=kernel == "foreach", **options)


def train_projector(
    features: Any,
    labels: torch.Tensor,
    head: LinearHead,
    classifier: torch.Tensor | ClassifierSide,
    config: TrainConfig,
    *,
    train_image: bool = True,
    extra: ScoreTerm | None = None,
) -> TrainResult:
    """Train W from the head's W0 on stored features ``[V, n, d_in (+ d_out)]`` (step t on view ``t mod V``).

    Args:
        features: a tensor, lazy cached features or anything indexable by view with a ``shape``; rows of width
            ``d_in + d_out`` hold each image's residual r beside x (it enters like the bias).
        labels: class indices ``[n]``.
        head: the projector: W0 ``[d_in, d_out]`` (only read; the model's own tensor is never written) and b.
        classifier: the fixed classifier T ``[K, d_out]``, or a classifier side T is rebuilt from at every step.
        config: the settings, resolved (:meth:`TrainConfig.resolved`: λ and s numbers).
        train_image: False keeps W at W0 (a classifier side alone trains); the step then skips W's
            gradient, penalty and update.
        extra: a score term trained beside W.

    Raises:
        InputError: shapes that do not fit, nothing to train, or an unresolved config.
        TrainingDivergedError: the loss or a trained tensor became NaN/Inf.

    Warns:
        TrainingWarning: the final loss is more than :data:`DIVERGENCE_RATIO` times the first (the learning
            rate was far too high).
    """
    (result,) = _train(features, labels, head, classifier, config, [(config.lr, config.reg_lambda)], train_image, extra)
    if result is None:
        raise TrainingDivergedError(
            f"training diverged (the loss or a trained tensor became NaN/Inf) with lr={config.lr} and "
            f"reg_lambda={config.reg_lambda}; lower the learning rate or check the features for extreme values."
        )
    _warn_if_grew(result.losses, config)
    return result


def train_grid(
    features: Any,
    labels: torch.Tensor,
    head: LinearHead,
    classifier: torch.Tensor,
    config: TrainConfig,
    points: Sequence[tuple[float, float]],
) -> list[TrainResult | None]:
    """:func:`train_projector` at every ``(lr, reg_lambda)`` of ``points`` (``config`` gives the rest), on one set of features.

    The trainings are independent (each its own W, optimiser state and schedule) but, in fp32, run side by
    side: every step reads one view once and does batched products for all of them, which is what makes a
    learning-rate × λ grid cheap. In fp16 the points train one after the other. Returns one result per
    point, None where training diverged.
    """
    if config.train_dtype == "fp16":
        return [_train(features, labels, head, classifier, config, [point], True, None)[0] for point in points]
    return _train(features, labels, head, classifier, config, points, True, None)


def _train(
    features: Any,
    labels: torch.Tensor,
    head: LinearHead,
    classifier: torch.Tensor | ClassifierSide,
    config: TrainConfig,
    points: Sequence[tuple[float, float]],
    train_image: bool,
    extra: ScoreTerm | None,
) -> list[TrainResult | None]:
    """The one loop: G points of one problem; None for a point whose training diverged."""
    _check(features, labels, head, classifier, config, points, train_image, extra)
    fp16 = config.train_dtype == "fp16" and config.epochs > 0  # with no step, every tensor stays its fp32 start
    kernel = _Autograd if fp16 else _ClosedForm
    step = kernel(features, labels, head, classifier, config, points, train_image, extra)
    optimizer = _Optimizer(step.groups, config, kernel="single" if fp16 else "fused")
    history = torch.empty(config.epochs, len(points), device=config.device)  # preallocated: no per-step allocations
    n_views = features.shape[0]
    with torch.no_grad():  # the steps compute their gradients themselves (autograd where they need it)
        for t in progress(range(config.epochs), desc="training", unit="step", verbose=config.verbose, leave=False):
            step(features[t % n_views], history[t])
            optimizer.step(t)
    return step.results(history)


def _check(
    features: Any,
    labels: torch.Tensor,
    head: LinearHead,
    classifier: torch.Tensor | ClassifierSide,
    config: TrainConfig,
    points: Sequence[tuple[float, float]],
    train_image: bool,
    extra: ScoreTerm | None,
) -> None:
    """Refuse inputs that do not fit together, before any work."""
    d_in, d_out = head.in_features, head.out_features
    width = features.shape[-1]
    if width not in (d_in, d_in + d_out):
        raise InputError(f"features have width {width}; W0 needs {d_in} (or {d_in + d_out} with residuals).")
    if len(features.shape) != 3 or features.shape[1] != labels.numel():
        raise InputError(f"features {tuple(features.shape)} and {labels.numel()} labels do not fit [V, n, d].")
    if not all(isinstance(v, (int, float)) for point in points for v in point) or not isinstance(
        config.logit_scale, (int, float)
    ):
        raise InputError("the training config holds a λ rule or no logit scale: pass config.resolved(n_shots, s).")
    if isinstance(classifier, torch.Tensor):
        if classifier.ndim != 2 or classifier.shape[1] != d_out:
            raise InputError(f"the classifier has shape {tuple(classifier.shape)}; it must be [K, {d_out}].")
        if not train_image:
            raise InputError("train_image=False trains nothing without a classifier side.")
    else:
        classifier.check(d_out)
    if (extra is not None or not isinstance(classifier, torch.Tensor)) and len(points) != 1:
        raise InputError("a classifier side or a score term trains one point at a time, not a grid.")


class _Optimizer:
    """Adam (or AdamW) with the paper's settings over fixed groups ``(params, lr)``, its cosine schedule computed once.

    ``torch.optim.Adam`` builds the state (and picks its kernel) on the first step; later steps call its public
    functional form, ``torch.optim.adam.adam``, on that state with the group's own settings: the same kernel on
    the same tensors, so the same numbers, without ``Optimizer.step``'s bookkeeping per call. Gradients are read
    from each parameter's ``.grad`` at every step (autograd may replace it).
    """

    def __init__(self, groups: Sequence[tuple[list[torch.Tensor], float]], config: TrainConfig, kernel: str) -> None:
        self.optimizer = build_optimizer(
            config.optimizer, [{"params": p, "lr": lr} for p, lr in groups], lr=groups[0][1], eps=ADAM_EPS,
            kernel=kernel,
        )  # fmt: skip
        self.schedules = [[cosine_lr(lr, t, config.epochs) for t in range(config.epochs)] for _, lr in groups]
        self._calls: list[tuple[list[torch.Tensor], ...]] = []  # per group: params, moments, steps
        self._settings: list[dict[str, Any]] = []  # per group: the rest of the functional form's arguments

    def step(self, t: int) -> None:
        """The update of every parameter from its ``.grad``, at the learning rate of step ``t`` (under no_grad)."""
        if not self._calls:  # the first step: torch's own optimizer, which creates the state
            for group, schedule in zip(self.optimizer.param_groups, self.schedules, strict=True):
                group["lr"] = schedule[t]
            self.optimizer.step()
            for group in self.optimizer.param_groups:
                states = [self.optimizer.state[p] for p in group["params"]]
                beta1, beta2 = group["betas"]
                self._settings.append({
                    "amsgrad": group["amsgrad"], "has_complex": False, "beta1": beta1, "beta2": beta2,
                    "weight_decay": group["weight_decay"], "eps": group["eps"], "maximize": group["maximize"],
                    "foreach": group["foreach"], "capturable": group["capturable"],
                    "differentiable": group["differentiable"], "fused": group["fused"],
                    "decoupled_weight_decay": group["decoupled_weight_decay"],
                })  # fmt: skip
                moments = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
                self._calls.append((group["params"], *moments, [s["step"] for s in states]))
            return
        for (params, avgs, squares, steps), settings, schedule in zip(
            self._calls, self._settings, self.schedules, strict=True
        ):
            adam_update(params, [p.grad for p in params], avgs, squares, [], steps, lr=schedule[t], **settings)


class _Classifier(NamedTuple):
    """T scaled for the forward product (s·Tᵀ) and for the backward one (s·T / n)."""

    forward: torch.Tensor
    backward: torch.Tensor

    @classmethod
    def of(cls, classifier: torch.Tensor, logit_scale: float, n: int) -> _Classifier:
        """The two scaled forms of T ``[K, d_out]`` for n images."""
        scaled = classifier * logit_scale
        return cls(forward=scaled.t(), backward=scaled / n)


class _State:
    """Every array one closed-form step writes, allocated once: a leading dimension G for the grid points."""

    def __init__(self, g: int, n: int, k: int, weight: torch.Tensor) -> None:
        d_out = weight.shape[-1]
        opts = {"device": weight.device, "dtype": weight.dtype}
        self.z = torch.empty(g, n, d_out, **opts)  # xW + b, then scratch
        self.u = torch.empty(g, n, d_out, **opts)  # z / ‖z‖
        self.du = torch.empty(g, n, d_out, **opts)  # dL/du, then dL/dz in place
        self.norm = torch.empty(g, n, 1, **opts)
        self.dot = torch.empty(g, n, 1, **opts)
        self.scores = torch.empty(g, n, k, **opts)  # logits, log-probabilities, then n · dL/dlogits
        self.minus_one = torch.full((g, n, 1), -1.0, **opts)
        self.offset = torch.empty(n, d_out, **opts)  # b + r, for towers with a per-image residual
        self.grad = torch.empty_like(weight)  # holds W − W0 first when regularised
        self.shifted = torch.empty(g, n, 1, **opts)  # each row's max, then its logsumexp (few classes)
        self.exp = torch.empty(g, n, k if k < _FUSED_SOFTMAX_CLASSES else 0, **opts)  # exp(logit − max) (few classes)
        self.penalty = torch.empty(g, **opts)  # ‖W − W0‖² per point
        self.picked: torch.Tensor | None = None  # the labels as gather/scatter indices


class _ClosedForm:
    """One fp32 step of G points: W's gradient in closed form; a side's and a score term's by autograd."""

    def __init__(
        self,
        features: Any,
        labels: torch.Tensor,
        head: LinearHead,
        classifier: torch.Tensor | ClassifierSide,
        config: TrainConfig,
        points: Sequence[tuple[float, float]],
        train_image: bool,
        extra: ScoreTerm | None,
    ) -> None:
        device, g = config.device, len(points)
        # fp32 whatever the model's precision (float64 only for a float64 head: reference computations).
        self.dtype = dtype = torch.float64 if head.weight.dtype == torch.float64 else torch.float32
        # Contiguous, so that W, its gradient and Adam's moments share one layout (nn.Linear's W0 is a
        # transposed view); the model's own W0 is only read, the copies are trained.
        self.head = head.frozen(device, dtype)
        self.w0, self.device = self.head.weight, self.head.weight.device
        self.weight = self.w0.expand(g, *self.w0.shape).clone()
        self.y = labels.to(device, torch.long)
        self.n = n = self.y.numel()
        self.scale, self.train_image = float(config.logit_scale), train_image
        self.side = None if isinstance(classifier, torch.Tensor) else classifier.to(device, dtype)
        if self.side is None:
            self.classes = _Classifier.of(classifier.detach().to(device, dtype), self.scale, n)
            k = classifier.shape[0]
        else:
            self.side_weight = self.side.start.clone().requires_grad_(True)
            k = self.side.classes
        self.extra = None if extra is None else extra.to(device, dtype)
        if self.extra is not None:
            self.extra_param = self.extra.start.clone().requires_grad_(True)
        self.state = _State(g, n, k, self.weight)
        self.state.picked = self.y.view(1, -1, 1).expand(g, -1, 1)
        lambdas = [float(lam) for _, lam in points]
        self.reg_lambda = lambdas[0]
        self.lambdas = torch.tensor(lambdas, device=device, dtype=dtype).view(g, 1, 1) if any(lambdas) else None
        # One λ for every point: 2λ folds into the gradient's product as its beta (a pass saved).
        self.uniform = 2 * lambdas[0] if len(set(lambdas)) == 1 else None
        groups: dict[float, list[torch.Tensor]] = {}
        for i, (lr, _) in enumerate(points):
            if train_image:
                point = self.weight[i]
                point.grad = self.state.grad[i]  # the step writes the gradient there; the optimiser reads it
                groups.setdefault(float(lr), []).append(point)
        also = ([self.side_weight] if self.side is not None else []) + ([self.extra_param] if self.extra else [])
        if also:
            groups.setdefault(float(points[0][0]), []).extend(also)
        self.groups = [(params, lr) for lr, params in groups.items()]

    def __call__(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        """One step on one view's stored features (under no_grad): the loss of each point into ``out [G]``, gradients
        into ``.grad``."""
        state = self.state
        rows = rows.to(self.device, self.dtype, non_blocking=True)
        x, residual = self.head.split(rows)
        offset = self.head.bias
        if residual is not None:  # b + r: a per-image bias
            offset = torch.add(residual, offset, out=state.offset) if offset is not None else residual
        classifier = None
        if self.side is not None:
            with torch.enable_grad():
                classifier = self.side.classifier(self.side_weight)
            classes = _Classifier.of(classifier.detach(), self.scale, self.n)
        else:
            classes = self.classes
        term = None
        if self.extra is not None:
            with torch.enable_grad():
                term = self.extra.scores(rows, self.weight[0], self.extra_param)
        _loss_and_gradient(
            x, self.weight, self.w0, offset, classes, self.y, self.lambdas, self.uniform, state, out,
            frozen=not self.train_image, extra=None if term is None else term.detach(),
        )  # fmt: skip
        if self.side is not None:
            out += _side_gradient(self.side, self.side_weight, classifier, self.scale / self.n, self.reg_lambda, state)
        if term is not None:  # dL/dE = (softmax − onehot) / n, which state.scores holds times n
            self.extra_param.grad = None
            term.backward(state.scores[0] / self.n)

    def results(self, history: torch.Tensor) -> list[TrainResult | None]:
        """Each point's result (CPU), None where the loss or a trained tensor is not finite."""
        trained = [t for t in (getattr(self, "side_weight", None), getattr(self, "extra_param", None)) if t is not None]
        finite = torch.isfinite(history).all(dim=0) & torch.isfinite(self.weight).flatten(1).all(dim=1)
        finite &= all(bool(torch.isfinite(t).all()) for t in trained)
        history, weight, finite = history.cpu(), self.weight.cpu(), finite.tolist()
        results: list[TrainResult | None] = []
        for i, ok in enumerate(finite):
            if not ok:
                results.append(None)
                continue
            result = TrainResult(weight=weight[i].clone() if self.train_image else None, losses=history[:, i].clone())
            if self.side is not None:
                result.classifier_weight = self.side_weight.detach().cpu()
                result.classifier = self.side.classifier(self.side_weight.detach()).cpu()
            if self.extra is not None:
                result.extra = self.extra_param.detach().cpu()
            results.append(result)
        logger.debug("trained %d points for %d steps", len(finite), history.shape[0])
        return results


class _Autograd:
    """One step in the official code's fp16 numerics: every tensor fp16, the loss under autograd (one point)."""

    def __init__(
        self,
        features: Any,
        labels: torch.Tensor,
        head: LinearHead,
        classifier: torch.Tensor | ClassifierSide,
        config: TrainConfig,
        points: Sequence[tuple[float, float]],
        train_image: bool,
        extra: ScoreTerm | None,
    ) -> None:
        (lr, self.reg_lambda), device = points[0], config.device
        self.head = head.frozen(device, HALF)
        self.w0 = self.head.weight
        self.weight = self.w0.clone().requires_grad_(train_image)
        self.y = labels.to(device, torch.long)
        self.scale, self.train_image = float(config.logit_scale), train_image
        self.side = None if isinstance(classifier, torch.Tensor) else classifier.to(device, HALF)
        self.fixed = classifier.detach().to(device, HALF) if self.side is None else None
        self.side_weight = None if self.side is None else self.side.start.clone().requires_grad_(True)
        self.extra = None if extra is None else extra.to(device, HALF)
        self.extra_param = None if self.extra is None else self.extra.start.clone().requires_grad_(True)
        trained = [self.weight] if train_image else []
        trained += [t for t in (self.side_weight, self.extra_param) if t is not None]
        self.trained = trained
        self.groups = [(trained, float(lr))]

    @torch.enable_grad()
    def __call__(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        """One step: the loss into ``out [1]``, every trained tensor's fp16 gradient into its ``.grad``."""
        rows = rows.to(self.w0.device, HALF)
        t = self.fixed if self.side is None else self.side.classifier(self.side_weight)
        logits = self.head.logits(rows, t, self.scale, self.weight)
        if self.extra is not None:
            logits = logits + self.extra.scores(rows, self.weight.detach(), self.extra_param)
        loss = F.cross_entropy(logits, self.y)
        if self.reg_lambda and self.train_image:
            loss = loss + self.reg_lambda * (self.weight - self.w0).pow(2).sum()
        if self.reg_lambda and self.side is not None and self.side.penalised:
            loss = loss + self.reg_lambda * (self.side_weight - self.side.start).pow(2).sum()
        for tensor in self.trained:
            tensor.grad = None
        loss.backward()
        out[0] = loss.detach()

    def results(self, history: torch.Tensor) -> list[TrainResult | None]:
        """The point's result as fp32 CPU copies, or None where the loss or a trained tensor is not finite."""
        if not (torch.isfinite(history).all() and all(bool(torch.isfinite(t).all()) for t in self.trained)):
            return [None]
        result = TrainResult(
            weight=self.weight.detach().float().cpu() if self.train_image else None,
            losses=history[:, 0].float().cpu(),
        )
        if self.side is not None:
            result.classifier_weight = self.side_weight.detach().float().cpu()
            result.classifier = self.side.classifier(self.side_weight.detach()).float().cpu()
        if self.extra is not None:
            result.extra = self.extra_param.detach().float().cpu()
        return [result]


def _loss_and_gradient(
    x: torch.Tensor,
    weight: torch.Tensor,
    w0: torch.Tensor,
    bias: torch.Tensor | None,
    classes: _Classifier,
    labels: torch.Tensor,
    lambdas: torch.Tensor | None,
    uniform: float | None,
    state: _State,
    out: torch.Tensor,
    frozen: bool = False,
    extra: torch.Tensor | None = None,
) -> None:
    """The loss of every grid point, into ``out [G]``; their gradients are left in ``state.grad``.

    ``weight`` is ``[G, d_in, d_out]``; ``lambdas`` ``[G, 1, 1]``, or None when no point is regularised;
    ``uniform`` is 2λ when every point has the same λ (Python floats, so the loop never waits on the device);
    ``bias`` is ``[d_out]`` or, for towers with a residual, the per-image ``b + r`` ``[n, d_out]``; ``extra`` a
    score term's logits ``[n, K]``, added before the softmax. ``frozen``: W does not train, so only the
    cross-entropy is computed. Either way ``state.scores`` is left holding n · dL/dlogits and ``state.u`` the
    normalised embeddings (what a classifier side's and a score term's gradients need).
    """
    g = weight.shape[0]
    # Forward: z = xW + b, u = z / ‖z‖, logits = u (sT)ᵀ.
    _product(x, weight, state.z, add=bias)
    torch.linalg.vector_norm(state.z, dim=2, keepdim=True, out=state.norm).clamp_min_(_NORM_EPS)
    torch.div(state.z, state.norm, out=state.u)
    k, d_out = state.scores.shape[2], state.u.shape[2]
    # T is shared by every grid point: one plain product over all G·n rows (what matmul would do, without its dispatch).
    torch.mm(state.u.view(-1, d_out), classes.forward, out=state.scores.view(-1, k))
    if extra is not None:
        state.scores.add_(extra)
    if k >= _FUSED_SOFTMAX_CLASSES:  # torch's fused kernel: one pass, 2-5x faster on wide rows
        rows = state.scores.view(-1, k)
        torch.log_softmax(rows, dim=1, out=rows)
    else:  # written out into buffers: the fused kernel is slow on rows shorter than its vector width
        torch.amax(state.scores, dim=2, keepdim=True, out=state.shifted)
        state.scores.sub_(state.shifted)  # ≤ 0, so exp cannot overflow; logits are finite here
        torch.sum(torch.exp(state.scores, out=state.exp), dim=2, keepdim=True, out=state.shifted)
        state.scores.sub_(state.shifted.log_())
    picked = state.picked if state.picked is not None else labels.view(1, -1, 1).expand(g, -1, 1)
    torch.gather(state.scores, 2, picked, out=state.dot)  # dot is free until the backward pass
    torch.mean(state.dot, dim=(1, 2), out=out).neg_()  # cross-entropy, averaged
    # n · dCE/dlogits = softmax − onehot; the 1/n is in classes.backward.
    state.scores.exp_().scatter_add_(2, picked, state.minus_one)
    if frozen:
        return
    torch.mm(state.scores.view(-1, k), classes.backward, out=state.du.view(-1, d_out))
    # Through the normalisation: dL/dz = (du − u (u·du)) / ‖z‖.
    torch.sum(torch.mul(state.u, state.du, out=state.z), dim=2, keepdim=True, out=state.dot)
    state.du.addcmul_(state.u, state.dot, value=-1).div_(state.norm)
    if lambdas is None:
        _product(x.t(), state.du, state.grad)
        return
    # dL/dW = xᵀ dz + 2λ(W − W0): W − W0 goes into grad, and the product adds onto it in place.
    torch.sub(weight, w0, out=state.grad)
    norms = torch.linalg.vector_norm(state.grad.view(g, -1), dim=1, out=state.penalty)
    out.addcmul_(norms.square_(), lambdas.view(-1))  # λ‖W − W0‖² per point
    if uniform is None:
        state.grad.mul_(2 * lambdas)
    _product(x.t(), state.du, state.grad, add=state.grad, beta=1.0 if uniform is None else uniform)


def _product(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, add: torch.Tensor | None = None, beta: float = 1.0
) -> None:
    """``out = beta · add + a @ b`` for a 2-D ``a`` shared by every grid point and a batch ``b`` ``[G, ., .]``.

    One point (the usual fit) runs the plain matrix product on its own slices: a batched product over a
    stride-0 copy of ``a`` is slower there.
    """
    g = b.shape[0]
    if g == 1:
        if add is None:
            torch.mm(a, b[0], out=out[0])
        else:
            torch.addmm(add if add.ndim < 3 else add[0], a, b[0], beta=beta, out=out[0])
        return
    batched = a.expand(g, *a.shape)
    if add is None:
        torch.bmm(batched, b, out=out)
    else:
        torch.baddbmm(add, batched, b, beta=beta, out=out)


def _side_gradient(
    side: ClassifierSide, weight: torch.Tensor, classifier: torch.Tensor, scale: float, reg_lambda: float, state: _State
) -> torch.Tensor:
    """The classifier side's gradient (into ``weight.grad``) and its penalty (returned).

    The penalty is λ‖W_t − W_t0‖² for the text projection, zero for TaskRes's residual. ``state.scores`` holds
    n · dL/dlogits and ``state.u`` the normalised image embeddings, as the image step left them; ``classifier`` is
    T with its autograd graph back to ``weight``. ``scale`` is s/n.
    """
    grad_t = torch.mm(state.scores[0].t(), state.u[0]).mul_(scale)  # dL/dT: logits = s u Tᵀ
    weight.grad = None
    if not side.penalised:
        classifier.backward(grad_t)
        return grad_t.new_zeros(())
    with torch.enable_grad():
        penalty = reg_lambda * (weight - side.start).square().sum()
        torch.autograd.backward([classifier, penalty], [grad_t, torch.ones_like(penalty)])
    return penalty.detach()


def _warn_if_grew(losses: torch.Tensor, config: TrainConfig) -> None:
    """Warn (TrainingWarning) when the final loss is more than :data:`DIVERGENCE_RATIO` times the first."""
    if losses.numel() > 1 and losses[-1] > DIVERGENCE_RATIO * losses[0]:
        warn(
            f"training ended with loss {float(losses[-1]):.4g}, {float(losses[-1] / losses[0]):.3g} times its start "
            f"({float(losses[0]):.4g}), with lr={config.lr} and reg_lambda={config.reg_lambda}: the result is likely "
            "useless. Lower the learning rate.",
            TrainingWarning,
        )
