"""The ProLIP loss written out for autograd and minimised by torch.optim: the reference the fast
training loop is tested (tests/test_training.py) and benchmarked (benchmarks/bench_training.py)
against. Plain module, no test dependencies."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prolip.training.engine import TrainResult


def reference_logits(x, weight, bias, classifier, logit_scale, residual=None):
    """s · (xW + b + r) / ‖xW + b + r‖ · Tᵀ, written out here rather than taken from the code under test."""
    z = x @ weight
    if bias is not None:
        z = z + bias
    if residual is not None:
        z = z + residual
    return logit_scale * (z / z.norm(dim=-1, keepdim=True)) @ classifier.T


def reference_train(
    features, labels, classifier, w0, bias, *, logit_scale, lr, reg_lambda, epochs, d_in=None
) -> TrainResult:
    """The loss written out for autograd, minimised by torch.optim.Adam with CosineAnnealingLR.

    With ``d_in``, each feature row is x (its first ``d_in`` columns) followed by a residual r
    added to xW + b.
    """
    w0, bias = w0.detach().float(), None if bias is None else bias.detach().float()
    weight = w0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weight], lr=lr, betas=(0.9, 0.999), eps=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    losses = torch.empty(epochs)
    for step in range(epochs):
        row = features[step % features.shape[0]]
        x, residual = (row, None) if d_in is None or row.shape[-1] == d_in else (row[:, :d_in], row[:, d_in:])
        loss = F.cross_entropy(reference_logits(x, weight, bias, classifier, logit_scale, residual), labels)
        if reg_lambda:
            loss = loss + reg_lambda * (weight - w0).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses[step] = loss.detach()
    return TrainResult(weight=weight.detach(), losses=losses)


def reference_train_fp16(features, labels, classifier, w0, bias, *, logit_scale, lr, reg_lambda, epochs) -> TrainResult:
    """The official code's loop (``methods/ProLIP.py`` on a CUDA fp16 model), written out on the CPU.

    W is an fp16 ``nn.Parameter``, the regularisation target an fp16 copy of W0, the features, bias
    and classifier fp16 as the fp16 model gives them; the loss is CE + λ·MSELoss(sum)(W0, W) in
    fp16 under autograd (no autocast, no loss scaling), minimised by ``torch.optim.Adam(eps=1e-4)``
    (so its moments are fp16) under CosineAnnealingLR, one step per view.
    """
    half = torch.float16
    weight = torch.nn.Parameter(w0.detach().to(half).clone())
    target = w0.detach().to(half).clone()
    bias = None if bias is None else bias.detach().to(half)
    classifier = classifier.detach().to(half)
    optimizer = torch.optim.Adam([weight], lr=lr, eps=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    mse = torch.nn.MSELoss(reduction="sum")
    losses = torch.empty(epochs)
    for step in range(epochs):
        x = features[step % features.shape[0]].to(half)
        loss = F.cross_entropy(reference_logits(x, weight, bias, classifier, logit_scale), labels)
        loss = loss + reg_lambda * mse(target, weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses[step] = loss.detach().float()
    assert weight.dtype == weight.grad.dtype == optimizer.state[weight]["exp_avg_sq"].dtype == half
    return TrainResult(weight=weight.detach().float(), losses=losses)
