"""``prolip``: ProLIP validation-free — λ = 1/N, a fixed learning rate, the paper's 300 steps.

The projector W (from W0) trained by :func:`prolip.training.engine.train_projector` on the problem's
augmented views; scores ``s · normalize(x W + b + r) · Tᵀ`` with any classes' T, so it transfers
to classes it was not trained on (base-to-new, cross-dataset, domain generalisation).
"""

from __future__ import annotations

import torch

from prolip.bench.adapted import PROLIP_LR, prolip_weight, train_config
from prolip.bench.methods.interface import FittedMethod, Method, register
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.model.head import LinearHead


class AdaptedProjector(FittedMethod):
    """A trained projector W ``[d_in, d_out]`` in place of W0: ProLIP's scores for any classes."""

    def __init__(self, head: LinearHead, weight: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.head, self.weight, self.logit_scale = head, weight, logit_scale

    def logits(self, test: FeatureSet, classes: Classes) -> torch.Tensor:
        return self.head.logits(test.features[0], classes.classifier, self.logit_scale, self.weight)


@register
class ProLIP(Method):
    """ProLIP with λ = 1/N (the paper's validation-free setting).

    Args:
        lr: Adam's learning rate (the paper: any of 1e-5 … 1e-2; prolip's default 1e-3).
        reg_lambda: λ, or "auto" for 1/N, "1/N^2" for 1/N².
        train_dtype: "fp32", or "fp16" to train in the official code's fp16 numerics (docs/results.md).
    """

    name = "prolip"

    def __init__(self, lr: float = PROLIP_LR, reg_lambda: float | str = "auto", train_dtype: str = "fp32") -> None:
        self.lr, self.reg_lambda, self.train_dtype = lr, reg_lambda, train_dtype

    def fit(self, problem: Problem) -> FittedMethod:
        head = problem.image_head
        config = train_config(problem, self.lr, self.reg_lambda, self.train_dtype)
        weight = prolip_weight(problem, config)
        fitted = AdaptedProjector(head, weight, problem.logit_scale)
        # W0 as the training stored it: fp16 rounds it first, and updates below half a step are lost.
        start = head.weight.half().float() if self.train_dtype == "fp16" else head.weight
        unchanged = float((weight == start).float().mean())
        fitted.info = {"lr": self.lr, "reg_lambda": config.reg_lambda, "w_unchanged": unchanged}
        return fitted
