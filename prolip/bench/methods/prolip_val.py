"""``prolip-val``: ProLIP with few-shot validation — (lr, λ) chosen on the N-shot validation draw.

The paper's main setting: lr ∈ {1e-2 … 1e-8} × λ ∈ {10, 1, 0.1, 0.01, 1e-3, 1e-4, 0}, the point
with the best accuracy on ``problem.val`` (never the test set), ties as :mod:`prolip.variants.search`.
"""

from __future__ import annotations

from prolip.bench.adapted import train_config
from prolip.bench.method_tools import check_val
from prolip.bench.methods.interface import FittedMethod, Method, register
from prolip.bench.methods.prolip import AdaptedProjector
from prolip.bench.problem import Problem
from prolip.variants.search import PAPER_LAMBDAS, PAPER_LRS, search_projector


@register
class ProLIPVal(Method):
    """ProLIP, (lr, λ) searched on the validation draw (49 trainings on features extracted once).

    Args:
        lrs, reg_lambdas: the grid (default: the paper's).
        train_dtype: "fp32", or "fp16" to train in the official code's fp16 numerics (docs/results.md).
    """

    name = "prolip-val"

    def __init__(
        self,
        lrs: tuple[float, ...] = PAPER_LRS,
        reg_lambdas: tuple[float, ...] = PAPER_LAMBDAS,
        train_dtype: str = "fp32",
    ) -> None:
        self.lrs, self.reg_lambdas, self.train_dtype = lrs, reg_lambdas, train_dtype

    def fit(self, problem: Problem) -> FittedMethod:
        head = problem.image_head
        check_val(problem.val, self.name, "lrs and reg_lambdas (use the method prolip)")
        config = train_config(problem, train_dtype=self.train_dtype)
        found = search_projector(
            problem.train.features, problem.train.labels, problem.val.features, problem.val.labels, head,
            problem.classes.classifier, config, self.lrs, self.reg_lambdas,
        )  # fmt: skip
        fitted = AdaptedProjector(head, found.result.weight, problem.logit_scale)
        fitted.info = found.as_dict()
        return fitted
