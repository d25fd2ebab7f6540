"""``prolip-text``: ProLIP on the text side, the text tower's final projection fine-tuned, image side frozen.

The classifier is rebuilt at every step from the fixed pre-projection text features of every
(class, template) prompt, T = normalize(mean_m normalize(P W_t)), and W_t is trained with
CE(s · normalize(x W0 + b) · Tᵀ, y) + λ‖W_t − W_t0‖²_F, λ = 1/N, Adam (lr 1e-3, eps 1e-4), cosine
schedule, ``problem.epochs`` full-batch steps on the augmented views
(:func:`prolip.training.engine.train_projector` with a text side, as ``ProLIPAdapter(target="text")`` trains).
Validation-free. W_t is shared by all classes, so any classes with their own text features are
scored with T built from them and the trained W_t.
"""

from __future__ import annotations

import torch

from prolip.bench.adapted import train_config
from prolip.bench.methods.interface import FittedMethod, Method, register
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.errors import InputError
from prolip.model.head import LinearHead
from prolip.training.engine import train_projector
from prolip.training.sides import TextSide


def text_side(classes: Classes) -> TextSide:
    """The classes' pre-projection text features and projection, or InputError where the bench has none."""
    if classes.text is None:
        raise InputError(
            f"prolip-text needs the pre-projection text features of the classes ({list(classes.names)[:3]}...), "
            "but this problem has none (the model's text projection could not be found); run another method."
        )
    return classes.text


class _TextAdapted(FittedMethod):
    def __init__(self, head: LinearHead, text_weight: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.head, self.text_weight, self.logit_scale = head, text_weight, logit_scale

    def logits(self, test: FeatureSet, classes: Classes) -> torch.Tensor:
        return self.head.logits(test.features[0], text_side(classes).classifier(self.text_weight), self.logit_scale)


@register
class ProLIPText(Method):
    """ProLIP on the text projection: W_t trained from W_t0 with λ‖W_t − W_t0‖², image side frozen.

    Args:
        lr: Adam's learning rate.
        reg_lambda: λ; None or "auto" means 1/N, "1/N^2" 1/N².
        train_dtype: "fp32", or "fp16" to train in the official code's fp16 numerics (docs/results.md).
    """

    name = "prolip-text"

    def __init__(self, lr: float = 1e-3, reg_lambda: float | str | None = None, train_dtype: str = "fp32") -> None:
        self.lr, self.reg_lambda, self.train_dtype = lr, reg_lambda, train_dtype

    def fit(self, problem: Problem) -> FittedMethod:
        head, side, train = problem.image_head, text_side(problem.classes), problem.train
        config = train_config(problem, self.lr, self.reg_lambda, self.train_dtype)
        result = train_projector(train.features, train.labels, head, side, config, train_image=False)
        fitted = _TextAdapted(head, result.classifier_weight, problem.logit_scale)
        fitted.info = {
            "lr": self.lr,
            "reg_lambda": config.reg_lambda,
            "text_delta_norm": float((result.classifier_weight - side.start).norm()),
        }
        return fitted
