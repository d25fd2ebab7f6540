"""``linear-probe``: CLIP's linear probe, multinomial logistic regression on normalised embeddings.

The objective is scikit-learn's ``LogisticRegression(penalty="l2", C=C)`` with an unpenalised
intercept, ``mean CE(f·W + b, y) + ‖W‖² / (2 C n)``, minimised by L-BFGS (torch, float64). C is
chosen on the validation draw as CoOp's linear-probe script does: the best of 1e6, 1e4, …, 1e-6,
then 8 steps of a bisection in log10(C) between a tenth and ten times it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F

from prolip.bench.method_tools import accuracy, check_classes, check_val, plain_embeddings
from prolip.bench.methods.interface import FittedMethod, Method, register
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.model.head import LinearHead

C_START = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)
"""The first C values tried (CoOp's order: on a tie the first, i.e. the weakest penalty, wins)."""
SEARCH_STEPS = 8
"""Bisection steps in log10(C) after the first sweep."""


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, classes: int, c: float, max_iter: int = 1000, tol: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [d, K], b [K])`` minimising ``mean CE(x W + b, y) + ‖W‖² / (2 C n)`` (float64 L-BFGS).

    Stops when every gradient entry is below ``tol`` or after ``max_iter`` iterations, like
    scikit-learn's ``lbfgs`` solver with its defaults.
    """
    n, d = x.shape
    x1 = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    target = F.one_hot(y, classes).double()
    penalty = torch.ones(d + 1, 1, dtype=torch.float64) / (c * n)
    penalty[-1] = 0  # the intercept is not penalised
    params = torch.zeros(d + 1, classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [params], max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def loss_and_gradient() -> torch.Tensor:
        # Closed form: cheaper than autograd for the many small evaluations L-BFGS makes.
        with torch.no_grad():
            scores = x1 @ params
            log_p = torch.log_softmax(scores, dim=1)
            loss = -(log_p * target).sum() / n + 0.5 * (penalty * params.square()).sum()
            params.grad = x1.t() @ (log_p.exp() - target) / n + penalty * params
        return loss

    optimizer.step(loss_and_gradient)
    weight = params.detach().float()
    return weight[:-1], weight[-1]


def search_c(score: Callable[[float], float]) -> float:
    """CoOp's search for C given ``score(C)``, the validation accuracy of a fit with C: a sweep over
    :data:`C_START`, then a bisection in log10(C) keeping the better end (the lower C on a tie)."""
    scores = [score(c) for c in C_START]
    peak = C_START[scores.index(max(scores))]
    left, right = peak / 10, peak * 10
    chosen = peak
    for _ in range(SEARCH_STEPS):
        middle = 10 ** ((math.log10(left) + math.log10(right)) / 2)
        if score(left) < score(right):
            chosen, left = right, middle
        else:
            chosen, right = left, middle
    return chosen


class _LinearModel(FittedMethod):
    def __init__(self, head: LinearHead, names: list[str], weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.head, self.names, self.weight, self.bias = head, names, weight, bias

    def logits(self, test: FeatureSet, classes: Classes) -> torch.Tensor:
        check_classes(classes, self.names, LinearProbe.name)
        return plain_embeddings(self.head, test) @ self.weight + self.bias


@register
class LinearProbe(Method):
    """Logistic regression on the plain view's normalised embeddings, C chosen on val.

    Args:
        c: inverse L2 strength; fixes it instead of searching it on val.
        max_iter: L-BFGS iterations per fit.
    """

    name = "linear-probe"
    transfers: ClassVar[bool] = False  # one weight vector per training class, nothing from the text

    def __init__(self, c: float | None = None, max_iter: int = 1000) -> None:
        self.c, self.max_iter = c, max_iter

    def fit(self, problem: Problem) -> FittedMethod:
        head, k = problem.image_head, len(problem.classes)
        x, y = plain_embeddings(head, problem.train_plain), problem.train_plain.labels
        fits: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

        def fitted(c: float) -> tuple[torch.Tensor, torch.Tensor]:
            if c not in fits:
                fits[c] = fit_logistic(x, y, k, c, self.max_iter)
            return fits[c]

        if self.c is None:
            check_val(problem.val, self.name, "c")
            val, val_y = plain_embeddings(head, problem.val), problem.val.labels

            def score(c: float) -> float:
                weight, bias = fitted(c)
                return float(accuracy(val @ weight + bias, val_y))

            c = search_c(score)
        else:
            c = self.c
        model = _LinearModel(head, list(problem.classes.names), *fitted(c))
        model.info = {"C": c}
        return model
