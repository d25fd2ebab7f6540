"""The ProLIP training loop: full-batch Adam on a copy of the projector, regularised toward W0."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prolip.errors import TrainingDivergedError

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What training returns: the trained matrix ``[d_in, d_out]`` (fp32, CPU) and per-step losses."""

    weight: torch.Tensor
    losses: torch.Tensor


def logits(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    classifier: torch.Tensor,
    logit_scale: float,
) -> torch.Tensor:
    """``s · normalize(x W + b) · Tᵀ``: class logits of pre-projection features ``[n, d_in]``."""
    z = features @ weight
    if bias is not None:
        z = z + bias
    return logit_scale * F.normalize(z, dim=-1) @ classifier.t()


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

    Loss = CE(s · normalize(xW + b) · Tᵀ, y) + λ‖W − W0‖²_F with Adam(lr, eps=1e-4) and cosine
    annealing over ``epochs``. W, its gradient and Adam's state are fp32 whatever the backbone's
    precision; ``w0`` itself is only read.

    Raises:
        TrainingDivergedError: the loss or W became NaN/Inf.
    """
    w0 = w0.detach().to(device, torch.float32)
    weight = w0.clone().requires_grad_(True)  # a copy: the model's own W0 is never touched
    b = None if bias is None else bias.detach().to(device, torch.float32)
    t = classifier.to(device, torch.float32)
    y = labels.to(device)
    optimizer = torch.optim.Adam([weight], lr=lr, eps=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    losses = torch.empty(epochs, device=device)
    n_views = features.shape[0]
    for step in tqdm(range(epochs), desc="training", unit="step", disable=not verbose, leave=False):
        x = features[step % n_views].to(device, torch.float32, non_blocking=True)
        loss = F.cross_entropy(logits(x, weight, b, t, logit_scale), y)
        if reg_lambda:
            loss = loss + reg_lambda * (weight - w0).pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses[step] = loss.detach()
    # One check at the end keeps the loop free of device synchronisations.
    if not (torch.isfinite(losses).all() and torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(losses)).nonzero()[0]) if not torch.isfinite(losses).all() else epochs - 1
        raise TrainingDivergedError(
            f"training diverged (loss became NaN/Inf at step {bad}) with lr={lr} and reg_lambda={reg_lambda}; "
            "lower the learning rate or check the features for extreme values."
        )
    logger.debug("trained %d steps, final loss %.4f", epochs, float(losses[-1]) if epochs else float("nan"))
    return TrainResult(weight=weight.detach().cpu(), losses=losses.cpu())
