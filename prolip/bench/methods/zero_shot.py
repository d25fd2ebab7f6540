"""``zero-shot``: CLIP's own classifier, s · normalize(f) · Tᵀ, with nothing trained."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prolip.bench.methods.base import FittedMethod, Method, register
from prolip.bench.problem import Classes, FeatureSet, ImageHead, Problem


class _ZeroShot(FittedMethod):
    def __init__(self, head: ImageHead, logit_scale: float) -> None:
        super().__init__()
        self.head, self.logit_scale = head, logit_scale

    def logits(self, test: FeatureSet, classes: Classes) -> torch.Tensor:
        x, residual = test.view(0)
        return self.logit_scale * F.normalize(self.head.embed(x, residual), dim=-1) @ classes.classifier.t()


@register
class ZeroShot(Method):
    """Zero-shot CLIP: the text classifier T on the plain view."""

    name = "zero-shot"

    def fit(self, problem: Problem) -> FittedMethod:
        return _ZeroShot(problem.image_head, problem.logit_scale)
