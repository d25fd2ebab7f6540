"""ProLIP inside the bench: its trained projector, problems seen through it, and joint training with more tensors.

Methods that build on ProLIP (``prolip+tip-adapter``, ``prolip+taskres``, ``test-time-prolip`` from a
fit) train W as :func:`prolip.training.loop.train_projector` does, on the problem's views. A baseline
applied to :func:`adapted_problem` then sees the adapted image embeddings wherever it would have
seen the frozen ones, with no change to its code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from prolip.bench.method_tools import set_lr
from prolip.bench.problem import ImageHead, Problem
from prolip.params import check_params, resolve_reg_lambda
from prolip.training.loop import ADAM_EPS, train_projector

PROLIP_LR = 1e-3
"""ProLIP's learning rate in the bench's validation-free setting (with λ = 1/N any lr in 1e-5…1e-2 does)."""


def reg_lambda_of(problem: Problem, reg_lambda: float | str | None) -> float:
    """λ: the number given, or a rule applied to N (None or "auto": the validation-free 1/N; "1/N^2": 1/N²)."""
    return resolve_reg_lambda(reg_lambda, problem.shots)


def prolip_weight(
    problem: Problem, lr: float = PROLIP_LR, reg_lambda: float | str | None = None, train_dtype: str = "fp32"
) -> torch.Tensor:
    """ProLIP's trained projector W ``[d_in, d_out]`` on the problem's views (λ = 1/N unless given;
    ``train_dtype="fp16"``: the official code's fp16 numerics, :mod:`prolip.training.half`)."""
    head = problem.image_head
    return train_projector(
        problem.train.features,
        problem.train.labels,
        problem.classes.classifier,
        head.w0,
        head.bias,
        logit_scale=problem.logit_scale,
        lr=lr,
        reg_lambda=reg_lambda_of(problem, reg_lambda),
        epochs=problem.epochs,
        device=problem.device,
        verbose=False,
        train_dtype=train_dtype,
    ).weight.to(head.w0)


def adapted_problem(problem: Problem, weight: torch.Tensor) -> Problem:
    """The same problem with the image head's projector replaced by ``weight`` (bias unchanged)."""
    return dataclasses.replace(problem, image_head=ImageHead(weight.detach(), problem.image_head.bias))


Scores = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""``scores(W, x, r)``: a method's logits ``[n, K]`` of one view's features under projector W."""


def train_jointly(
    problem: Problem,
    extra: Sequence[torch.Tensor],
    scores: Scores,
    *,
    lr: float,
    reg_lambda: float | str | None = None,
    optimizer: type[torch.optim.Optimizer] = torch.optim.Adam,
    train_dtype: str = "fp32",
) -> torch.Tensor:
    """ProLIP's recipe with more trained tensors: returns W; the ``extra`` tensors are trained in place.

    Minimises ``CE(scores(W, x, r), y) + λ‖W − W0‖²_F`` (λ = 1/N unless given) over W (from W0)
    and ``extra`` (leaf tensors with ``requires_grad``) jointly, as ProLIP trains W alone:
    ``problem.epochs`` full-batch steps, step t on view t mod V, one ``optimizer`` (eps 1e-4, its
    other settings torch's defaults) with the learning rate of step t at ``lr · (1 + cos(π t / epochs)) / 2``.

    ``train_dtype="fp16"`` stores the trained tensors, their gradients and the optimiser's state
    in fp16, as the official code does: the optimiser steps fp16 copies (W0 rounded to fp16
    too), each gradient is rounded to fp16 before its step, and the fp32 tensors the scores
    read hold the fp16 values (the products themselves run in fp32).
    """
    check_params({"train_dtype": train_dtype})
    head, train = problem.image_head, problem.train
    lam = reg_lambda_of(problem, reg_lambda)
    half = train_dtype == "fp16"
    w0 = head.w0.detach().half().to(head.w0) if half else head.w0.detach()
    weight = w0.clone().requires_grad_(True)
    trained = [weight, *extra]
    stored = [t.detach().half().requires_grad_(True) for t in trained] if half else trained
    opt = optimizer(stored, lr=lr, eps=ADAM_EPS)
    _copy_values(stored, trained)
    for step in range(problem.epochs):
        set_lr(opt, lr * (1 + math.cos(math.pi * step / problem.epochs)) / 2)
        x, residual = train.view(step % train.n_views)
        loss = F.cross_entropy(scores(weight, x, residual), train.labels)
        if lam:
            loss = loss + lam * (weight - w0).pow(2).sum()
        for t in trained:
            t.grad = None
        opt.zero_grad()
        loss.backward()
        if half:
            for s, t in zip(stored, trained, strict=True):
                s.grad = t.grad.half()
        opt.step()
        _copy_values(stored, trained)
    return weight.detach()


def _copy_values(sources: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> None:
    """Write each source's values into its target (no-op where they are the same tensor)."""
    with torch.no_grad():
        for s, t in zip(sources, targets, strict=True):
            if s is not t:
                t.copy_(s)
