"""The ProLIP training loop: full-batch Adam on a copy of the projector, regularised toward W0.

The loss has a closed-form gradient, so the loop does without autograd: a step is four matrix
products, a few passes over [n, d_out] and [n, K] arrays into preallocated buffers, and one
``torch.optim.Adam(fused=True)`` step (a single pass over W, its gradient and both moments; CPU
support since torch 2.4; ``foreach`` where a device lacks the fused kernel). That keeps a fit
close to the cost of its matrix products even when they are small (few shots, few classes),
where per-op overhead and passes over the [d_in, d_out] matrix would otherwise dominate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prolip.errors import InputError, TrainingDivergedError, TrainingWarning, warn

logger = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-4  # the paper's value (torch's default is 1e-8)
_NORM_EPS = 1e-12  # F.normalize's floor on the norm
DIVERGENCE_RATIO = 2.0  # a final loss above this multiple of the first one means training went wrong


@dataclass
class TrainResult:
    """What training returns: the trained matrix ``[d_in, d_out]`` (fp32, CPU) and per-step losses."""

    weight: torch.Tensor
    losses: torch.Tensor


def split_features(features: torch.Tensor, d_in: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, r)`` from stored features ``[..., d_in]`` or ``[..., d_in + d_out]`` (x, then the residual r).

    Towers whose embedding is x W + b + r with a per-image residual r (SigLIP's attention-pool
    head) store r beside x (:meth:`prolip.towers.Projector.pack`); the others store x alone.
    """
    if features.shape[-1] == d_in:
        return features, None
    return features[..., :d_in], features[..., d_in:]


def logits(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    classifier: torch.Tensor,
    logit_scale: float,
) -> torch.Tensor:
    """``s · normalize(x W + b + r) · Tᵀ``: class logits of stored pre-projection features ``[n, d_in (+ d_out)]``."""
    x, residual = split_features(features, weight.shape[0])
    z = x @ weight
    if bias is not None:
        z = z + bias
    if residual is not None:
        z = z + residual
    return logit_scale * F.normalize(z, dim=-1) @ classifier.t()


class _Classifier(NamedTuple):
    """T scaled for the forward product (s·Tᵀ) and for the backward one (s·T / n)."""

    forward: torch.Tensor
    backward: torch.Tensor


class _State:
    """Every array one training step writes, allocated once, and Adam's state."""

    def __init__(self, n: int, k: int, weight: torch.Tensor) -> None:
        d_out = weight.shape[1]
        opts = {"device": weight.device, "dtype": torch.float32}
        self.z = torch.empty(n, d_out, **opts)  # xW + b, then scratch
        self.u = torch.empty(n, d_out, **opts)  # z / ‖z‖
        self.du = torch.empty(n, d_out, **opts)  # dL/du, then dL/dz in place
        self.norm = torch.empty(n, 1, **opts)
        self.dot = torch.empty(n, 1, **opts)
        self.scores = torch.empty(n, k, **opts)  # logits, log-probabilities, then n · dL/dlogits
        self.minus_one = torch.full((n, 1), -1.0, **opts)
        self.offset = torch.empty(n, d_out, **opts)  # b + r, for towers with a per-image residual
        self.grad = torch.empty_like(weight)  # holds W − W0 first when regularised


def train_projector(
    features: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.Tensor,
    w0: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    logit_scale: float,
    lr: float,
    reg_lambda: float,
    epochs: int,
    device: torch.device,
    verbose: bool = True,
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

    Raises:
        TrainingDivergedError: the loss or W became NaN/Inf.

    Warns:
        TrainingWarning: the final loss is more than :data:`DIVERGENCE_RATIO` times the first
            (the learning rate was far too high).
    """
    # Contiguous, so that W, its gradient and Adam's moments share one layout (nn.Linear's W0 is
    # a transposed view); w0 may still be the model's own tensor, and is only read.
    w0 = w0.detach().to(device, torch.float32).contiguous()
    weight = w0.clone()  # a copy: the model's own W0 is never touched
    b = None if bias is None else bias.detach().to(device, torch.float32)
    y = labels.to(device, torch.long)
    n, k = y.numel(), classifier.shape[0]
    # s (and the mean's 1/n, for the backward product) folded into T once, not into every step.
    scaled = classifier.detach().to(device, torch.float32) * logit_scale
    classes = _Classifier(forward=scaled.t(), backward=scaled / n)
    state = _State(n, k, weight)
    weight.grad = state.grad  # the loop writes the gradient there; Adam reads it
    optimizer = _adam(weight, lr)
    history = torch.empty(epochs, device=device)  # preallocated: no per-step allocations
    n_views, d_in, d_out = features.shape[0], w0.shape[0], w0.shape[1]
    if features.shape[-1] not in (d_in, d_in + d_out):
        raise InputError(f"features have width {features.shape[-1]}; W0 needs {d_in} (or {d_in + d_out} with residuals).")
    with torch.no_grad():
        for step in tqdm(range(epochs), desc="training", unit="step", disable=not verbose, leave=False):
            x, residual = split_features(features[step % n_views].to(device, torch.float32, non_blocking=True), d_in)
            offset = b
            if residual is not None:  # b + r: a per-image bias
                offset = torch.add(residual, b, out=state.offset) if b is not None else residual
            history[step] = _loss_and_gradient(x, weight, w0, offset, classes, y, reg_lambda, state)
            # torch's CosineAnnealingLR(T_max=epochs) in closed form, without its per-step bookkeeping.
            optimizer.param_groups[0]["lr"] = lr * (1 + math.cos(math.pi * step / epochs)) / 2
            optimizer.step()
    # One check at the end keeps the loop free of device synchronisations.
    finite = torch.isfinite(history)
    if not (finite.all() and torch.isfinite(weight).all()):
        bad = int((~finite).nonzero()[0]) if not finite.all() else epochs - 1
        raise TrainingDivergedError(
            f"training diverged (loss became NaN/Inf at step {bad}) with lr={lr} and reg_lambda={reg_lambda}; "
            "lower the learning rate or check the features for extreme values."
        )
    losses = history.cpu()
    if epochs > 1 and losses[-1] > DIVERGENCE_RATIO * losses[0]:
        warn(
            f"training ended with loss {float(losses[-1]):.4g}, {float(losses[-1] / losses[0]):.3g} times its start "
            f"({float(losses[0]):.4g}), with lr={lr} and reg_lambda={reg_lambda}: the result is likely useless. "
            "Lower the learning rate.",
            TrainingWarning,
        )
    logger.debug("trained %d steps, final loss %.4f", epochs, float(losses[-1]) if epochs else float("nan"))
    return TrainResult(weight=weight.detach().cpu(), losses=losses)


def _loss_and_gradient(
    x: torch.Tensor,
    weight: torch.Tensor,
    w0: torch.Tensor,
    bias: torch.Tensor | None,
    classes: _Classifier,
    labels: torch.Tensor,
    reg_lambda: float,
    state: _State,
) -> torch.Tensor:
    """The loss at ``weight`` (a 0-d tensor); its gradient is left in ``state.grad``.

    ``bias`` is ``[d_out]`` or, for towers with a residual, the per-image ``b + r`` ``[n, d_out]``.
    """
    # Forward: z = xW + b, u = z / ‖z‖, logits = u (sT)ᵀ.
    if bias is None:
        torch.mm(x, weight, out=state.z)
    else:
        torch.addmm(bias, x, weight, out=state.z)
    torch.linalg.vector_norm(state.z, dim=1, keepdim=True, out=state.norm).clamp_min_(_NORM_EPS)
    torch.div(state.z, state.norm, out=state.u)
    torch.mm(state.u, classes.forward, out=state.scores)
    torch.log_softmax(state.scores, dim=1, out=state.scores)
    loss = F.nll_loss(state.scores, labels)
    # n · dCE/dlogits = softmax − onehot; the 1/n is in classes.backward.
    state.scores.exp_().scatter_add_(1, labels[:, None], state.minus_one)
    torch.mm(state.scores, classes.backward, out=state.du)
    # Through the normalisation: dL/dz = (du − u (u·du)) / ‖z‖.
    torch.sum(torch.mul(state.u, state.du, out=state.z), dim=1, keepdim=True, out=state.dot)
    state.du.addcmul_(state.u, state.dot, value=-1).div_(state.norm)
    if not reg_lambda:
        torch.mm(x.t(), state.du, out=state.grad)
        return loss
    # dL/dW = xᵀ dz + 2λ(W − W0): W − W0 goes into grad, and the product adds onto it in place.
    flat = torch.sub(weight, w0, out=state.grad).view(-1)
    loss.add_(torch.dot(flat, flat), alpha=reg_lambda)
    torch.addmm(state.grad, x.t(), state.du, beta=2 * reg_lambda, out=state.grad)
    return loss


def _adam(weight: torch.Tensor, lr: float) -> torch.optim.Adam:
    """Adam with the paper's settings, fused where the device has the kernel, else ``foreach``."""
    try:
        return torch.optim.Adam([weight], lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)
    except RuntimeError:  # e.g. a device without the fused kernel
        return torch.optim.Adam([weight], lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, foreach=True)
