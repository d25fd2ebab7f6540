"""``rla``: the bench half of the regularised linear adapter (:mod:`prolip.variants.linear_adapter` is the estimator).

A square A on the frozen image embeddings f, initialised at the identity: CE(s · normalize(f A) · Tᵀ, y)
+ λ‖A − I‖²_F with λ = 1/N, Adam (lr 1e-3, eps 1e-4) for ``problem.epochs`` full-batch steps under a
cosine schedule, step t on view t mod V. That is ProLIP's training with the embeddings as features
and W0 = I, so it runs :func:`prolip.training.engine.train_projector` (the estimator is
:class:`prolip.variants.linear_adapter.RegularizedLinearAdapter`). Validation-free; A acts on the image side only, so
it scores any classes with their own text classifier.
"""

from __future__ import annotations

import torch

from prolip.bench.adapted import train_config
from prolip.bench.method_tools import embed_view
from prolip.bench.methods.interface import FittedMethod, Method, register
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.model.head import LinearHead
from prolip.training.engine import train_projector


class EmbeddedViews:
    """The image embeddings of a feature set's views, each computed when training reads it.

    Training indexes one view per step (``views[t]``), so lazy cached features stay on disk and the
    ``[V, n, d_out]`` embeddings are never held at once.
    """

    def __init__(self, head: LinearHead, features: FeatureSet) -> None:
        self.head, self.features = head, features

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(V, n, d_out)``."""
        return (self.features.n_views, int(self.features.labels.numel()), self.head.out_features)

    def __getitem__(self, view: int) -> torch.Tensor:
        return embed_view(self.head, self.features, view)


class _Adapted(FittedMethod):
    def __init__(self, head: LinearHead, adapter: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.head, self.adapter, self.logit_scale = head, LinearHead(adapter), logit_scale

    def logits(self, test: FeatureSet, classes: Classes) -> torch.Tensor:
        return self.adapter.logits(embed_view(self.head, test, 0), classes.classifier, self.logit_scale)


@register
class RLA(Method):
    """Regularised linear adapter: A on the image embeddings, regularised toward the identity.

    Args:
        lr: Adam's learning rate.
        reg_lambda: λ; None or "auto" means 1/N, "1/N^2" 1/N².
        train_dtype: "fp32", or "fp16" to train in the official code's fp16 numerics (docs/results.md).
    """

    name = "rla"

    def __init__(self, lr: float = 1e-3, reg_lambda: float | str | None = None, train_dtype: str = "fp32") -> None:
        self.lr, self.reg_lambda, self.train_dtype = lr, reg_lambda, train_dtype

    def fit(self, problem: Problem) -> FittedMethod:
        head = problem.image_head
        identity = LinearHead(torch.eye(head.out_features))
        config = train_config(problem, self.lr, self.reg_lambda, self.train_dtype)
        views = EmbeddedViews(head, problem.train)
        result = train_projector(views, problem.train.labels, identity, problem.classes.classifier, config)
        fitted = _Adapted(head, result.weight, problem.logit_scale)
        fitted.info = {
            "lr": self.lr,
            "reg_lambda": config.reg_lambda,
            "delta_norm": float((result.weight - identity.weight).norm()),
        }
        return fitted
