"""``zero-shot``: CLIP's own classifier, s · normalize(f) · Tᵀ, with nothing trained."""

from __future__ import annotations

import torch

from prolip.bench.methods.interface import FittedMethod, Method, register
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.model.head import LinearHead


class _ZeroShot(FittedMethod):
    def __init__(self, head: LinearHead, logit_scale: float) -> None:
        super().__init__()
        self.head, self.logit_scale = head, logit_scale

    def logits(self, test: FeatureSet, classes: Classes) -> torch.Tensor:
        return self.head.logits(test.features[0], classes.classifier, self.logit_scale)


@register
class ZeroShot(Method):
    """Zero-shot CLIP: the text classifier T on the plain view."""

    name = "zero-shot"

    def fit(self, problem: Problem) -> FittedMethod:
        return _ZeroShot(problem.image_head, problem.logit_scale)
