"""The ProLIP training loop: full-batch Adam on a copy of the projector, regularised toward W0.

The loss has a closed-form gradient, so the loop does without autograd: a step is four matrix
products, a few passes over [n, d_out] and [n, K] arrays into preallocated buffers, and one
``torch.optim.Adam(fused=True)`` step (a single pass over W, its gradient and both moments; CPU
support since torch 2.4; ``foreach`` where a device lacks the fused kernel), after the first
called through its public functional form ``torch.optim.adam.adam`` on the state torch built. That keeps a fit
close to the cost of its matrix products even when they are small (few shots, few classes),
where per-op overhead and passes over the [d_in, d_out] matrix would otherwise dominate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch.optim.adam import adam as adam_update
from tqdm.auto import tqdm

from prolip.errors import InputError, TrainingDivergedError, TrainingWarning, warn
from prolip.model.zeroshot import average_prompts
from prolip.params import TRAIN_DTYPES

logger = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-4  # the paper's value (torch's default is 1e-8)
_NORM_EPS = 1e-12  # F.normalize's floor on the norm
# From this many classes torch.log_softmax beats logsumexp-and-subtract on CPU (measured: 0.5x at
# 12 classes, 2-3x at 16, 4.5x at 1000). Chosen by K alone, so a grid point and a lone fit agree.
_FUSED_SOFTMAX_CLASSES = 16
DIVERGENCE_RATIO = 2.0  # a final loss above this multiple of the first one means training went wrong


@dataclass
class TrainResult:
    """What training returns (fp32, CPU).

    Attributes:
        weight: the trained projector ``[d_in, d_out]``, or None when it stayed frozen (text only).
        losses: the loss of every step.
        classifier_weight: the trained tensor of the classifier side (the text projection W_t
            ``[d_t, d_out]``, or TaskRes's residual R ``[K, d_out]``) when one trained, else None.
        classifier: T rebuilt from ``classifier_weight`` ``[K, d_out]`` when a classifier side trained, else None.
    """

    weight: torch.Tensor | None
    losses: torch.Tensor
    classifier_weight: torch.Tensor | None = None
    classifier: torch.Tensor | None = None


@dataclass(frozen=True)
class TextSide:
    """The text projection, trained with (or instead of) the vision projector: ProLIP-text.

    T is rebuilt at every step from the fixed pre-projection text features of every (class,
    template) prompt, exactly as the zero-shot classifier is built:
    T = normalize(mean_m normalize(P W_t)) (:func:`prolip.model.zeroshot.average_prompts`). W_t is
    regularised toward W_t0 with the same λ as W.

    Attributes:
        prompts: pre-projection text features P ``[K, M, d_t]`` of class k under template m.
        w0: the pretrained text projection W_t0 ``[d_t, d_out]`` (only read).
    """

    prompts: torch.Tensor
    w0: torch.Tensor
    penalised: ClassVar[bool] = True

    def classifier(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """T ``[K, d_out]`` built with ``weight`` (W_t0 by default)."""
        return average_prompts(self.prompts @ (self.w0 if weight is None else weight))

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> TextSide:
        """The same side on ``device``, in ``dtype`` (fp32 unless training in fp16)."""
        return TextSide(self.prompts.detach().to(device, dtype), self.w0.detach().to(device, dtype))

    def check(self, d_out: int) -> None:
        """Refuse prompt features and a text projection that do not fit each other and W's width.

        Raises:
            InputError: naming both shapes.
        """
        p, w = self.prompts, self.w0
        if p.ndim != 3 or w.ndim != 2 or p.shape[-1] != w.shape[0] or w.shape[1] != d_out:
            raise InputError(
                f"prompt features {tuple(p.shape)} and text projection {tuple(w.shape)} do not fit "
                f"[K, M, d_t] × [d_t, {d_out}]."
            )


@dataclass(frozen=True)
class ClassifierResidual:
    """TaskRes's residual on the classifier, trained with the vision projector: ProLIP + TaskRes.

    T = normalize(t + α R) row by row, R ``[K, d_out]`` from zero and not regularised (TaskRes has
    no penalty on it); with R = 0 it is the zero-shot classifier.

    Attributes:
        prototypes: the class prototypes t ``[K, d_out]`` (:func:`prolip.model.zeroshot.text_prototypes`).
        alpha: α, the residual's scale (TaskRes's default is 0.5).
    """

    prototypes: torch.Tensor
    alpha: float
    penalised: ClassVar[bool] = False

    @property
    def w0(self) -> torch.Tensor:
        """R's starting value: zeros ``[K, d_out]``."""
        return torch.zeros_like(self.prototypes)

    def classifier(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """T ``[K, d_out]`` with the residual ``weight`` (zero by default)."""
        return F.normalize(self.prototypes if weight is None else self.prototypes + self.alpha * weight, dim=-1)

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> ClassifierResidual:
        """The same side on ``device``, in ``dtype`` (fp32 unless training in fp16)."""
        return ClassifierResidual(self.prototypes.detach().to(device, dtype), float(self.alpha))

    def check(self, d_out: int) -> None:
        """Refuse prototypes that are not ``[K, d_out]``, or an α that is not a finite number.

        Raises:
            InputError: naming the shape or the value.
        """
        if self.prototypes.ndim != 2 or self.prototypes.shape[1] != d_out:
            raise InputError(f"class prototypes {tuple(self.prototypes.shape)} do not fit [K, {d_out}].")
        if not math.isfinite(self.alpha):
            raise InputError(f"the residual's scale alpha={self.alpha!r} must be a finite number.")


ClassifierSide = TextSide | ClassifierResidual
"""What can train on the classifier's side of the loss, with T rebuilt from it at every step."""


def split_features(features: torch.Tensor, d_in: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, r)`` from stored features ``[..., d_in]`` or ``[..., d_in + d_out]`` (x, then the residual r).

    Towers whose embedding is x W + b + r with a per-image residual r (SigLIP's attention-pool
    head) store r beside x (:meth:`prolip.model.towers.Projector.pack`); the others store x alone.
    """
    if features.shape[-1] == d_in:
        return features, None
    return features[..., :d_in], features[..., d_in:]


def project(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W + b + r``: image embeddings ``[n, d_out]`` (before normalisation) of stored features ``[n, d_in (+ d_out)]``."""
    x, residual = split_features(features, weight.shape[0])
    z = x @ weight
    if bias is not None:
        z = z + bias
    if residual is not None:
        z = z + residual
    return z


def embed(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``normalize(x W + b + r)``: unit image embeddings ``[n, d_out]`` of stored features ``[n, d_in (+ d_out)]``."""
    return F.normalize(project(features, weight, bias), dim=-1)


def logits(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    classifier: torch.Tensor,
    logit_scale: float,
) -> torch.Tensor:
    """``s · normalize(x W + b + r) · Tᵀ``: class logits of stored pre-projection features ``[n, d_in (+ d_out)]``."""
    return logit_scale * embed(features, weight, bias) @ classifier.t()


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
    """Every array one training step writes, allocated once: a leading dimension G for the grid points."""

    def __init__(self, g: int, n: int, k: int, weight: torch.Tensor) -> None:
        d_out = weight.shape[-1]
        opts = {"device": weight.device, "dtype": torch.float32}
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
        self.picked: torch.Tensor | None = None  # the labels as gather/scatter indices, set once by the loop


def train_projector(
    features: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.Tensor | None,
    w0: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    logit_scale: float,
    lr: float,
    reg_lambda: float,
    epochs: int,
    device: torch.device,
    verbose: bool = True,
    side: ClassifierSide | None = None,
    train_image: bool = True,
    train_dtype: str = "fp32",
) -> TrainResult:
    """Train W from W0 on features ``[V, n, d_in]``; step t uses view ``t mod V``.

    Features ``[V, n, d_in + d_out]`` hold each image's residual r beside x (see
    :func:`split_features`); it enters like the bias: z = xW + b + r, and the gradient is unchanged.

    Loss = CE(s · normalize(xW + b) · Tᵀ, y) + λ‖W − W0‖²_F (cross-entropy averaged, penalty
    summed), minimised by Adam(lr, betas=(0.9, 0.999), eps=1e-4) with the learning rate of step t
    set to ``lr · (1 + cos(π t / epochs)) / 2`` (torch's CosineAnnealingLR with T_max=epochs).
    Results match autograd with ``torch.optim.Adam`` up to float rounding. W, its gradient and
    Adam's state are fp32 whatever the backbone's precision; ``w0`` itself is only read. The loop
    never waits on the device: divergence is checked once, at the end.

    With ``side`` (and ``classifier=None``), a classifier side trains too, in the same Adam
    with the same schedule: T is rebuilt from it at every step, and its gradient flows from
    dL/dT = s/n · (softmax − onehot)ᵀ u (u the normalised image embeddings) back through T's
    construction by autograd (small: ``[K·M, d_t] × [d_t, d_out]`` at most). A :class:`TextSide`
    trains the text projection W_t (ProLIP-text; the loss gains λ‖W_t − W_t0‖²_F); a
    :class:`ClassifierResidual` trains TaskRes's residual R (ProLIP + TaskRes; no penalty).
    ``train_image=False`` keeps W at W0 (the image side frozen); the step then skips W's
    gradient, its penalty and its Adam update.

    ``train_dtype="fp16"`` trains as the official code does on the GPU instead: W, its gradient
    and Adam's moments in fp16 (:func:`prolip.training.half.train_half`).

    Raises:
        InputError: neither or both of ``classifier`` and ``side``, nothing to train, or shapes
            that do not fit.
        TrainingDivergedError: the loss or a trained matrix became NaN/Inf.

    Warns:
        TrainingWarning: the final loss is more than :data:`DIVERGENCE_RATIO` times the first
            (the learning rate was far too high).
    """
    n_views, d_in, d_out = features.shape[0], w0.shape[0], w0.shape[1]
    _check_shapes(features.shape[-1], classifier, side, train_image, d_in, d_out)
    if _half(train_dtype):
        from prolip.training.half import train_half  # built on this module's pieces: imported on use

        return train_half(
            features, labels, classifier, w0, bias, logit_scale=logit_scale, lr=lr, reg_lambda=reg_lambda,
            epochs=epochs, device=device, verbose=verbose, side=side, train_image=train_image,
        )  # fmt: skip
    if side is None:  # the usual fit: one point of the grid loop
        (result,) = train_grid(
            features, labels, classifier, w0, bias,
            logit_scale=logit_scale, points=[(lr, reg_lambda)], epochs=epochs, device=device, verbose=verbose,
        )  # fmt: skip
        if result is None:
            raise TrainingDivergedError(
                f"training diverged (the loss or W became NaN/Inf) with lr={lr} and reg_lambda={reg_lambda}; "
                "lower the learning rate or check the features for extreme values."
            )
        _warn_if_grew(result.losses, lr=lr, reg_lambda=reg_lambda)
        return result
    # Contiguous, so that W, its gradient and Adam's moments share one layout (nn.Linear's W0 is
    # a transposed view); w0 may still be the model's own tensor, and is only read.
    w0 = w0.detach().to(device, torch.float32).contiguous()
    weight = w0.clone()[None]  # a copy (the model's own W0 is never touched), as a grid of one
    b = None if bias is None else bias.detach().to(device, torch.float32)
    y = labels.to(device, torch.long)
    side = side.to(device)
    side_weight = side.w0.clone().requires_grad_(True)
    n, k = y.numel(), side_weight.shape[0] if isinstance(side, ClassifierResidual) else side.prompts.shape[0]
    state = _State(1, n, k, weight)
    image = weight[0]
    image.grad = state.grad[0]  # the loop writes the gradient there; Adam reads it
    trained = ([image] if train_image else []) + [side_weight]
    optimizer = _Adam([(trained, lr)], epochs)
    lambdas = torch.full((1, 1, 1), float(reg_lambda), device=device)
    history = torch.empty(epochs, 1, device=device)  # preallocated: no per-step allocations
    with torch.no_grad():
        for step in tqdm(range(epochs), desc="training", unit="step", disable=not verbose, leave=False):
            x, residual = split_features(features[step % n_views].to(device, torch.float32, non_blocking=True), d_in)
            offset = b
            if residual is not None:  # b + r: a per-image bias
                offset = torch.add(residual, b, out=state.offset) if b is not None else residual
            with torch.enable_grad():
                classifier = side.classifier(side_weight)
            classes = _Classifier.of(classifier.detach(), logit_scale, n)
            _loss_and_gradient(
                x, weight, w0, offset, classes, y, lambdas if reg_lambda else None,
                2 * float(reg_lambda), state, history[step], frozen=not train_image,
            )  # fmt: skip
            history[step] += _side_gradient(side, side_weight, classifier, logit_scale / n, reg_lambda, state)
            optimizer.step(step)
    losses = check_training(history[:, 0], trained, lr=lr, reg_lambda=reg_lambda)
    return TrainResult(
        weight=image.detach().cpu() if train_image else None,
        losses=losses,
        classifier_weight=side_weight.detach().cpu(),
        classifier=side.classifier(side_weight.detach()).cpu(),
    )


def train_grid(
    features: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.Tensor,
    w0: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    logit_scale: float,
    points: Sequence[tuple[float, float]],
    epochs: int,
    device: torch.device,
    verbose: bool = True,
    train_dtype: str = "fp32",
) -> list[TrainResult | None]:
    """:func:`train_projector` at every ``(lr, reg_lambda)`` of ``points`` at once, on the same features.

    The G trainings are independent (each its own W, Adam state and schedule) but run side by side:
    every step reads one view once and does batched products for all of them, which is what makes
    a learning-rate × λ grid cheap. Returns one result per point, None where training diverged.
    With ``train_dtype="fp16"`` the points are trained one after the other by the fp16 loop.
    """
    if _half(train_dtype):
        from prolip.training.half import train_half  # built on this module's pieces: imported on use

        common = {"logit_scale": logit_scale, "epochs": epochs, "device": device, "verbose": False}
        results: list[TrainResult | None] = []
        for lr, reg_lambda in points:
            try:
                results.append(
                    train_half(features, labels, classifier, w0, bias, lr=lr, reg_lambda=reg_lambda, **common)
                )
            except TrainingDivergedError:  # as the fp32 grid: None for a diverged point
                results.append(None)
        return results
    g = len(points)
    lrs = [float(lr) for lr, _ in points]
    lambdas = torch.tensor([float(lam) for _, lam in points], device=device).view(g, 1, 1)
    # Contiguous, so that W, its gradient and Adam's moments share one layout (nn.Linear's W0 is
    # a transposed view); w0 may still be the model's own tensor, and is only read.
    w0 = w0.detach().to(device, torch.float32).contiguous()
    weight = w0.expand(g, *w0.shape).clone()  # copies: the model's own W0 is never touched
    b = None if bias is None else bias.detach().to(device, torch.float32)
    y = labels.to(device, torch.long)
    n, k = y.numel(), classifier.shape[0]
    # s (and the mean's 1/n, for the backward product) folded into T once, not into every step.
    scaled = classifier.detach().to(device, torch.float32) * logit_scale
    classes = _Classifier(forward=scaled.t(), backward=scaled / n)
    state = _State(g, n, k, weight)
    state.picked = y.view(1, -1, 1).expand(g, -1, 1)
    optimizer = _adam(weight, state.grad, lrs, epochs)
    history = torch.empty(epochs, g, device=device)  # preallocated: no per-step allocations
    n_views, d_in, d_out = features.shape[0], w0.shape[0], w0.shape[1]
    if features.shape[-1] not in (d_in, d_in + d_out):
        raise InputError(
            f"features have width {features.shape[-1]}; W0 needs {d_in} (or {d_in + d_out} with residuals)."
        )
    regularised = any(lam for _, lam in points)
    # One λ for every point: 2λ folds into the gradient's product as its beta (a pass saved).
    uniform = 2 * float(points[0][1]) if len({float(lam) for _, lam in points}) == 1 else None
    with torch.no_grad():
        for step in tqdm(range(epochs), desc="training", unit="step", disable=not verbose, leave=False):
            x, residual = split_features(features[step % n_views].to(device, torch.float32, non_blocking=True), d_in)
            offset = b
            if residual is not None:  # b + r: a per-image bias
                offset = torch.add(residual, b, out=state.offset) if b is not None else residual
            _loss_and_gradient(
                x, weight, w0, offset, classes, y, lambdas if regularised else None, uniform, state, history[step]
            )
            optimizer.step(step)
    # One check at the end keeps the loop free of device synchronisations.
    finite = torch.isfinite(history).all(dim=0) & torch.isfinite(weight).flatten(1).all(dim=1)
    history, weight, finite = history.cpu(), weight.cpu(), finite.tolist()
    logger.debug("trained %d points for %d steps", g, epochs)
    return [
        TrainResult(weight=weight[i].clone(), losses=history[:, i].clone()) if finite[i] else None for i in range(g)
    ]


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
) -> None:
    """The loss of every grid point, into ``out [G]``; their gradients are left in ``state.grad``.

    ``weight`` is ``[G, d_in, d_out]``; ``lambdas`` ``[G, 1, 1]``, or None when no point is
    regularised; ``uniform`` is 2λ when every point has the same λ (Python floats, so the loop
    never waits on the device); ``bias`` is ``[d_out]`` or, for towers with a residual, the
    per-image ``b + r`` ``[n, d_out]``. ``frozen``: W does not train, so only the cross-entropy is
    computed. Either way ``state.scores`` is left holding n · dL/dlogits and ``state.u`` the
    normalised embeddings (what a classifier side's gradient needs).
    """
    g = weight.shape[0]
    # Forward: z = xW + b, u = z / ‖z‖, logits = u (sT)ᵀ.
    _product(x, weight, state.z, add=bias)
    torch.linalg.vector_norm(state.z, dim=2, keepdim=True, out=state.norm).clamp_min_(_NORM_EPS)
    torch.div(state.z, state.norm, out=state.u)
    k, d_out = state.scores.shape[2], state.u.shape[2]
    # T is shared by every grid point: one plain product over all G·n rows (what matmul would do, without its dispatch).
    torch.mm(state.u.view(-1, d_out), classes.forward, out=state.scores.view(-1, k))
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


def _half(train_dtype: str) -> bool:
    """Whether ``train_dtype`` asks for the fp16 loop (InputError for an unknown name)."""
    if train_dtype not in TRAIN_DTYPES:
        raise InputError(f"train_dtype={train_dtype!r} must be one of {list(TRAIN_DTYPES)}.")
    return train_dtype == "fp16"


def _product(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, add: torch.Tensor | None = None, beta: float = 1.0
) -> None:
    """``out = beta · add + a @ b`` for a 2-D ``a`` shared by every grid point and a batch ``b`` ``[G, ., .]``.

    One point (the usual fit) runs the plain matrix product on its own slices: a batched product
    over a stride-0 copy of ``a`` is slower there.
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


def _check_shapes(
    width: int, classifier: torch.Tensor | None, side: ClassifierSide | None, train_image: bool, d_in: int, d_out: int
) -> None:
    """Refuse inputs that do not fit together, before any work."""
    if width not in (d_in, d_in + d_out):
        raise InputError(f"features have width {width}; W0 needs {d_in} (or {d_in + d_out} with residuals).")
    if (classifier is None) == (side is None):
        raise InputError("give the classifier T, or the classifier side to rebuild it from at every step (not both).")
    if side is None and not train_image:
        raise InputError("train_image=False trains nothing without a classifier side.")
    if side is not None:
        side.check(d_out)


def _side_gradient(
    side: ClassifierSide, weight: torch.Tensor, classifier: torch.Tensor, scale: float, reg_lambda: float, state: _State
) -> torch.Tensor:
    """The classifier side's gradient (accumulated into ``weight.grad``) and its penalty (returned).

    The penalty is λ‖W_t − W_t0‖² for the text projection, zero for TaskRes's residual.
    ``state.scores`` holds n · dL/dlogits and ``state.u`` the normalised image embeddings, as the
    image step left them; ``classifier`` is T with its autograd graph back to ``weight``. ``scale`` is s/n.
    """
    grad_t = torch.mm(state.scores[0].t(), state.u[0]).mul_(scale)  # dL/dT: logits = s u Tᵀ
    weight.grad = None
    if not side.penalised:
        classifier.backward(grad_t)
        return grad_t.new_zeros(())
    with torch.enable_grad():
        penalty = reg_lambda * (weight - side.w0).square().sum()
        torch.autograd.backward([classifier, penalty], [grad_t, torch.ones_like(penalty)])
    return penalty.detach()


def cosine_lr(lr: float, step: int, epochs: int) -> float:
    """The learning rate of ``step``: torch's CosineAnnealingLR(T_max=epochs) in closed form, without bookkeeping."""
    return lr * (1 + math.cos(math.pi * step / epochs)) / 2


def check_training(history: torch.Tensor, trained: list[torch.Tensor], *, lr: float, reg_lambda: float) -> torch.Tensor:
    """The per-step losses on the CPU, once training ended: refused if anything diverged, warned if they grew.

    One check at the end keeps a training loop free of device synchronisations.

    Raises:
        TrainingDivergedError: a loss or a trained matrix is NaN/Inf.

    Warns:
        TrainingWarning: the final loss is more than :data:`DIVERGENCE_RATIO` times the first
            (the learning rate was far too high).
    """
    finite = torch.isfinite(history)
    if not (finite.all() and all(torch.isfinite(t).all() for t in trained)):
        bad = int((~finite).nonzero()[0]) if not finite.all() else history.numel() - 1
        raise TrainingDivergedError(
            f"training diverged (loss became NaN/Inf at step {bad}) with lr={lr} and reg_lambda={reg_lambda}; "
            "lower the learning rate or check the features for extreme values."
        )
    losses = history.cpu()
    _warn_if_grew(losses, lr=lr, reg_lambda=reg_lambda)
    return losses


def _warn_if_grew(losses: torch.Tensor, *, lr: float, reg_lambda: float) -> None:
    """Warn (TrainingWarning) when the final loss is more than :data:`DIVERGENCE_RATIO` times the first."""
    if losses.numel() > 1 and losses[-1] > DIVERGENCE_RATIO * losses[0]:
        warn(
            f"training ended with loss {float(losses[-1]):.4g}, {float(losses[-1] / losses[0]):.3g} times its start "
            f"({float(losses[0]):.4g}), with lr={lr} and reg_lambda={reg_lambda}: the result is likely useless. "
            "Lower the learning rate.",
            TrainingWarning,
        )


def _adam_for(params: list[torch.Tensor] | list[dict], lr: float) -> torch.optim.Adam:
    """Adam with the paper's settings over ``params``, fused where the device has the kernel, else ``foreach``."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)
    except RuntimeError:  # e.g. a device without the fused kernel
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, foreach=True)


def _adam(weight: torch.Tensor, grad: torch.Tensor, lrs: Sequence[float], epochs: int) -> _Adam:
    """Adam with the paper's settings and the cosine schedule on each point's W.

    One parameter group per distinct learning rate (its points' W side by side in one kernel call).
    """
    groups: dict[float, list[torch.Tensor]] = {}
    for i, lr in enumerate(lrs):
        point = weight[i]
        point.grad = grad[i]  # the loop writes the gradient there; Adam reads it
        groups.setdefault(lr, []).append(point)
    return _Adam([(params, lr) for lr, params in groups.items()], epochs)


class _Adam:
    """The paper's Adam over fixed parameter groups ``(params, lr)``, with its cosine schedule computed once.

    ``torch.optim.Adam`` builds the state (and picks the fused kernel, or ``foreach`` where the device
    lacks it) on the first step; later steps call its public functional form, ``torch.optim.adam.adam``,
    on that state with the group's own settings: the same kernel on the same tensors, so the same numbers,
    without ``Optimizer.step``'s bookkeeping per call (hooks, profiler records, state look-ups).
    Gradients are read from each parameter's ``.grad`` at every step (autograd may replace it).
    """

    def __init__(self, groups: Sequence[tuple[list[torch.Tensor], float]], epochs: int) -> None:
        self.optimizer = _adam_for([{"params": params, "lr": lr} for params, lr in groups], groups[0][1])
        self.schedules = [[cosine_lr(lr, step, epochs) for step in range(epochs)] for _, lr in groups]
        self._calls: list[tuple[list[torch.Tensor], ...]] = []  # per group: params, moments, steps
        self._settings: list[dict] = []  # per group: the rest of the functional form's arguments

    def step(self, step: int) -> None:
        """Adam's update of every parameter from its ``.grad``, at the learning rate of ``step``."""
        if not self._calls:  # the first step: torch.optim.Adam itself, which creates the state
            for group, schedule in zip(self.optimizer.param_groups, self.schedules, strict=True):
                group["lr"] = schedule[step]
            self.optimizer.step()
            for group in self.optimizer.param_groups:
                params, states = group["params"], [self.optimizer.state[p] for p in group["params"]]
                beta1, beta2 = group["betas"]
                settings = {
                    "amsgrad": group["amsgrad"], "has_complex": False, "beta1": beta1, "beta2": beta2,
                    "weight_decay": group["weight_decay"], "eps": group["eps"], "maximize": group["maximize"],
                    "foreach": group["foreach"], "capturable": group["capturable"],
                    "differentiable": group["differentiable"], "fused": group["fused"],
                    "decoupled_weight_decay": group["decoupled_weight_decay"],
                }  # fmt: skip
                avgs, squares = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
                self._calls.append((params, avgs, squares, [s["step"] for s in states]))
                self._settings.append(settings)
            return
        for (params, avgs, squares, steps), settings, schedule in zip(
            self._calls, self._settings, self.schedules, strict=True
        ):
            adam_update(params, [p.grad for p in params], avgs, squares, [], steps, lr=schedule[step], **settings)
