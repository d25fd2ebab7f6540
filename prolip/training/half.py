"""ProLIP's training in fp16, as the official code runs it on the GPU (``train_dtype="fp16"``).

The official code keeps CLIP in fp16 on CUDA (``clip.load`` converts the weights) and trains that
tensor under autograd with ``torch.optim.Adam(eps=1e-4)``, with no autocast and no loss scaling:
the forward and backward passes run in fp16, the gradient is fp16, Adam's moments are fp16 (they
take the parameter's dtype) and every update is rounded to fp16. Updates smaller than half an
fp16 step of an entry leave it unchanged, which at small learning rates freezes many entries of W.
This module reproduces that on request; prolip's default is the fp32 loop of
:mod:`prolip.training.loop` (a closed-form gradient and a fused Adam), which it otherwise matches:
the same loss, views, schedule and optimiser settings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prolip.training.loop import (
    ADAM_BETAS,
    ADAM_EPS,
    ClassifierSide,
    TrainResult,
    check_training,
    cosine_lr,
    logits,
)

HALF = torch.float16


def train_half(
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
) -> TrainResult:
    """:func:`prolip.training.loop.train_projector` with fp16 numerics: same arguments, same result fields (fp32 copies).

    Loss = CE(s · normalize(xW + b + r) · Tᵀ, y) + λ‖W − W0‖²_F (plus λ‖W_t − W_t0‖²_F for a text
    side), every tensor in fp16; minimised by a plain (non-fused) ``torch.optim.Adam`` on fp16
    parameters, so that the gradient and both moments are fp16 too, with the learning rate of
    step t at ``lr · (1 + cos(π t / epochs)) / 2``; step t uses view ``t mod V``.

    Raises:
        TrainingDivergedError: the loss or a trained matrix became NaN/Inf (fp16 overflows at 65504).
    """
    w0 = w0.detach().to(device, HALF).contiguous()
    weight = w0.clone().requires_grad_(train_image)
    b = None if bias is None else bias.detach().to(device, HALF)
    y = labels.to(device, torch.long)
    fixed = None if classifier is None else classifier.detach().to(device, HALF)
    side = None if side is None else side.to(device, HALF)
    side_weight = None if side is None else side.w0.clone().requires_grad_(True)
    trained = ([weight] if train_image else []) + ([] if side_weight is None else [side_weight])
    # Not fused: the official code's torch.optim.Adam on fp16 parameters keeps its moments in fp16.
    optimizer = torch.optim.Adam(trained, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, foreach=False)
    history = torch.empty(epochs, device=device)
    for step in tqdm(range(epochs), desc="training (fp16)", unit="step", disable=not verbose, leave=False):
        x = features[step % features.shape[0]].to(device, HALF)
        t = fixed if side is None else side.classifier(side_weight)
        loss = F.cross_entropy(logits(x, weight, b, t, logit_scale), y)
        if reg_lambda and train_image:
            loss = loss + reg_lambda * (weight - w0).pow(2).sum()
        if reg_lambda and side is not None and side.penalised:
            loss = loss + reg_lambda * (side_weight - side.w0).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, step, epochs)
        optimizer.step()
        history[step] = loss.detach()
    losses = check_training(history, trained, lr=lr, reg_lambda=reg_lambda)
    final = None if side is None else side.classifier(side_weight.detach())
    return TrainResult(
        weight=weight.detach().float().cpu() if train_image else None,
        losses=losses.float(),
        classifier_weight=None if side_weight is None else side_weight.detach().float().cpu(),
        classifier=None if final is None else final.float().cpu(),
    )
