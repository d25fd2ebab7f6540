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
from prolip.training.loop import ADAM_EPS, train_projector

PROLIP_LR = 1e-3
"""ProLIP's learning rate in the bench's validation-free setting (with λ = 1/N any lr in 1e-5…1e-2 does)."""


def reg_lambda_of(problem: Problem, reg_lambda: float | None) -> float:
    """λ: the one given, or the validation-free 1/N."""
    return 1.0 / problem.shots if reg_lambda is None else float(reg_lambda)


def prolip_weight(problem: Problem, lr: float = PROLIP_LR, reg_lambda: float | None = None) -> torch.Tensor:
    """ProLIP's trained projector W ``[d_in, d_out]`` on the problem's views (λ = 1/N unless given)."""
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
    reg_lambda: float | None = None,
    optimizer: type[torch.optim.Optimizer] = torch.optim.Adam,
) -> torch.Tensor:
    """ProLIP's recipe with more trained tensors: returns W; the ``extra`` tensors are trained in place.

    Minimises ``CE(scores(W, x, r), y) + λ‖W − W0‖²_F`` (λ = 1/N unless given) over W (from W0)
    and ``extra`` (leaf tensors with ``requires_grad``) jointly, as ProLIP trains W alone:
    ``problem.epochs`` full-batch steps, step t on view t mod V, one ``optimizer`` (eps 1e-4, its
    other settings torch's defaults) with the learning rate of step t at ``lr · (1 + cos(π t / epochs)) / 2``.
    """
    head, train = problem.image_head, problem.train
    lam = reg_lambda_of(problem, reg_lambda)
    weight = head.w0.detach().clone().requires_grad_(True)
    opt = optimizer([weight, *extra], lr=lr, eps=ADAM_EPS)
    for step in range(problem.epochs):
        set_lr(opt, lr * (1 + math.cos(math.pi * step / problem.epochs)) / 2)
        x, residual = train.view(step % train.n_views)
        loss = F.cross_entropy(scores(weight, x, residual), train.labels)
        if lam:
            loss = loss + lam * (weight - head.w0).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return weight.detach()
