"""ProLIP inside the bench: its training settings on a problem, its trained projector, problems seen through it.

Methods that build on ProLIP (``prolip``, ``prolip-val``, ``prolip-text``, ``rla``, ``prolip+tip-adapter``,
``prolip+taskres``, ``test-time-prolip`` from a fit) train with the library's one engine
(:mod:`prolip.training.engine`), configured here from the problem. A baseline applied to
:func:`adapted_problem` then sees the adapted image embeddings wherever it would have seen the frozen ones,
with no change to its code.
"""

from __future__ import annotations

import dataclasses

import torch

from prolip.bench.problem import Problem
from prolip.model.head import LinearHead
from prolip.training.engine import TrainConfig, train_projector

PROLIP_LR = 1e-3
"""ProLIP's learning rate in the bench's validation-free setting (with λ = 1/N any lr in 1e-5…1e-2 does)."""


def train_config(
    problem: Problem,
    lr: float = PROLIP_LR,
    reg_lambda: float | str | None = None,
    train_dtype: str = "fp32",
    optimizer: str = "adam",
) -> TrainConfig:
    """The engine's settings on ``problem``: its epochs, logit scale and device, λ = 1/N unless given (a number, or
    "auto" / "1/N^2"), resolved for its N."""
    return TrainConfig(
        lr=lr, reg_lambda="auto" if reg_lambda is None else reg_lambda, epochs=problem.epochs,
        logit_scale=problem.logit_scale, train_dtype=train_dtype, optimizer=optimizer, device=problem.device,
    ).resolved(problem.shots, problem.logit_scale)  # fmt: skip


def prolip_weight(problem: Problem, config: TrainConfig) -> torch.Tensor:
    """ProLIP's trained projector W ``[d_in, d_out]`` (CPU) on the problem's views and classes, under ``config``
    (:func:`train_config`)."""
    train = problem.train
    return train_projector(train.features, train.labels, problem.image_head, problem.classes.classifier, config).weight


def adapted_problem(problem: Problem, weight: torch.Tensor) -> Problem:
    """The same problem with the image head's projector replaced by ``weight`` (bias unchanged)."""
    return dataclasses.replace(problem, image_head=LinearHead(weight.detach(), problem.image_head.bias))
