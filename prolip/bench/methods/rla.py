"""``rla``: the bench half of the regularised linear adapter (:mod:`prolip.variants.rla` is the estimator).

A square A on the frozen image embeddings f, initialised at the identity: CE(s · normalize(f A) · Tᵀ, y)
+ λ‖A − I‖²_F with λ = 1/N, Adam (lr 1e-3, eps 1e-4) for ``problem.epochs`` full-batch steps under a
cosine schedule, step t on view t mod V. That is ProLIP's training with the embeddings as features
and W0 = I, so it runs :func:`prolip.training.loop.train_projector` (the estimator is
:class:`prolip.variants.rla.RegularizedLinearAdapter`). Validation-free; A acts on the image side only, so
it scores any classes with their own text classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prolip.bench.adapted import reg_lambda_of
from prolip.bench.method_tools import embed_view
from prolip.bench.methods.base import FittedMethod, Method, register
from prolip.bench.problem import Classes, FeatureSet, ImageHead, Problem
from prolip.training.loop import train_projector


class EmbeddedViews:
    """The image embeddings of a feature set's views, each computed when training reads it.

    Training indexes one view per step (``views[t]``), so lazy cached features stay on disk and the
    ``[V, n, d_out]`` embeddings are never held at once.
    """

    def __init__(self, head: ImageHead, features: FeatureSet) -> None:
        self.head, self.features = head, features

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(V, n, d_out)``."""
        return (self.features.n_views, int(self.features.labels.numel()), int(self.head.w0.shape[1]))

    def __getitem__(self, view: int) -> torch.Tensor:
        return embed_view(self.head, self.features, view)


class _Adapted(FittedMethod):
    def __init__(self, head: ImageHead, adapter: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.head, self.adapter, self.logit_scale = head, adapter, logit_scale

    def logits(self, test: FeatureSet, classes: Classes) -> torch.Tensor:
        f = embed_view(self.head, test, 0) @ self.adapter
        return self.logit_scale * F.normalize(f, dim=-1) @ classes.classifier.t()


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
        d = head.w0.shape[1]
        reg_lambda = reg_lambda_of(problem, self.reg_lambda)
        result = train_projector(
            EmbeddedViews(head, problem.train),
            problem.train.labels,
            problem.classes.classifier,
            torch.eye(d, device=head.w0.device),
            None,
            logit_scale=problem.logit_scale,
            lr=self.lr,
            reg_lambda=reg_lambda,
            epochs=problem.epochs,
            device=head.w0.device,
            verbose=False,
            train_dtype=self.train_dtype,
        )
        fitted = _Adapted(head, result.weight.to(head.w0.device), problem.logit_scale)
        fitted.info = {
            "lr": self.lr,
            "reg_lambda": reg_lambda,
            "delta_norm": float((result.weight - torch.eye(d)).norm()),
        }
        return fitted
