"""``test-time-prolip``: test-time ProLIP (TPT's protocol on the vision projector), per test image.

Each test image comes with 64 views (view 0 plain, 63 augmented); its own copy of the projector
keeps the 10% lowest-entropy views and takes one AdamW step (lr 5e-3) on the entropy of their
averaged prediction, then predicts the plain view (:mod:`prolip.variants.test_time`). The copy starts from W0
(zero-shot CLIP plus test-time adaptation: the paper's test-time table) or, with
``start="prolip"``, from ProLIP trained on the problem (λ = 1/N).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from prolip.bench.adapted import PROLIP_LR, prolip_weight, train_config
from prolip.bench.methods.interface import FittedMethod, Method, register
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.model.head import LinearHead
from prolip.params import Constraint, one_of
from prolip.variants.test_time import TestTimeSettings, tta_logits

STARTS = ("zero-shot", "prolip")


class _TestTime(FittedMethod):
    def __init__(self, weight: torch.Tensor, problem: Problem, settings: TestTimeSettings) -> None:
        super().__init__()
        self.head, self.logit_scale = LinearHead(weight, problem.image_head.bias), problem.logit_scale
        self.settings = settings

    def logits(self, test: FeatureSet, classes: Classes) -> torch.Tensor:
        return tta_logits(test.features, self.head, classes.classifier, self.logit_scale, self.settings)


@register
class ProLIPTestTime(Method):
    """Test-time ProLIP from W0 (default) or from a ProLIP fit.

    Args:
        start: "zero-shot" (each copy starts at W0; the training draw is not used) or "prolip"
            (at ProLIP's W, trained with ``prolip_lr`` and λ = 1/N).
        rho, steps, lr, optimizer, weight_decay, reg_lambda: the adaptation
            (:class:`~prolip.variants.test_time.TestTimeSettings`; defaults: TPT's).
        prolip_lr: ProLIP's learning rate with ``start="prolip"``.
    """

    name = "test-time-prolip"
    test_views: ClassVar[int] = 63
    # The adaptation's own constraints (TPT's lr may be 0), and where each copy starts.
    _parameter_constraints: ClassVar[dict[str, Constraint]] = {
        **TestTimeSettings._parameter_constraints,
        "start": one_of(STARTS),
    }
    transfers: ClassVar[bool] = True  # only the image side adapts; any classes' T can score

    def __init__(
        self,
        start: str = "zero-shot",
        rho: float = 0.1,
        steps: int = 1,
        lr: float = 5e-3,
        optimizer: str = "adamw",
        weight_decay: float | None = None,
        reg_lambda: float = 0.0,
        prolip_lr: float = PROLIP_LR,
    ) -> None:
        self.start, self.prolip_lr = start, prolip_lr
        self.settings = TestTimeSettings(
            rho=rho, steps=steps, lr=lr, optimizer=optimizer, weight_decay=weight_decay, reg_lambda=reg_lambda
        )

    def fit(self, problem: Problem) -> FittedMethod:
        w0 = problem.image_head.weight
        weight = prolip_weight(problem, train_config(problem, self.prolip_lr)) if self.start == "prolip" else w0
        fitted = _TestTime(weight, problem, self.settings)
        fitted.info = {"start": self.start}
        return fitted
