"""``tip-adapter``: Tip-Adapter (Zhang et al., ECCV 2022), the training-free cache model.

Keys: each training image's embedding averaged over 10 augmented views, normalised; values: one-hot
labels; scores ``s · f·Tᵀ + α · exp(−β (1 − f·Kᵀ)) · L``, with α and β searched on the validation draw
(never on test data): :func:`prolip.variants.tip_cache.fit_cache` on the frozen projector, the cache model
ProLIP + Tip-Adapter runs on the trained one.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from prolip.bench.method_tools import check_classes, check_val, plain_embeddings
from prolip.bench.methods.interface import FittedMethod, Method, register
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.errors import InputError
from prolip.training.fitted import TipCache
from prolip.variants.tip_cache import cache_logits, fit_cache


class CacheModel(FittedMethod):
    """A fitted cache model (Tip-Adapter or Tip-Adapter-F): scores the training classes."""

    def __init__(self, problem: Problem, cache: TipCache, method: str) -> None:
        super().__init__()
        self.head, self.cache, self.method = problem.image_head, cache, method
        self.names, self.classifier = list(problem.classes.names), problem.classes.classifier
        self.logit_scale = problem.logit_scale
        self.info = {"alpha": cache.alpha, "beta": cache.beta}

    def logits(self, test: FeatureSet, classes: Classes) -> torch.Tensor:
        check_classes(classes, self.names, self.method)
        return cache_logits(plain_embeddings(self.head, test), self.classifier, self.cache, self.logit_scale)


def fit_cache_model(
    problem: Problem, method: str, alpha: float | None = None, beta: float | None = None, **options
) -> CacheModel:
    """The cache model on ``problem``'s projector, α and β chosen on ``problem.val`` unless given."""
    val = None
    if alpha is None:
        check_val(problem.val, method, "alpha and beta")
        val = (plain_embeddings(problem.image_head, problem.val), problem.val.labels)
    train = problem.train
    cache = fit_cache(
        problem.image_head, train.features, train.labels, problem.classes.classifier, problem.logit_scale,
        val=val, alpha=alpha, beta=beta, **options,
    )  # fmt: skip
    return CacheModel(problem, cache, method)


@register
class TipAdapter(Method):
    """Tip-Adapter: zero-shot scores plus a cache of the training images' embeddings, α and β chosen on val.

    Args:
        alpha: cache weight; with ``beta``, fixes both instead of searching them on val.
        beta: sharpness of the affinity.
    """

    name = "tip-adapter"
    transfers: ClassVar[bool] = False  # the cache's values are one-hot over the training classes

    def __init__(self, alpha: float | None = None, beta: float | None = None) -> None:
        if (alpha is None) != (beta is None):
            raise InputError(f"TipAdapter takes both alpha and beta or neither (got alpha={alpha}, beta={beta}).")
        self.alpha, self.beta = alpha, beta

    def fit(self, problem: Problem) -> FittedMethod:
        return fit_cache_model(problem, self.name, self.alpha, self.beta)
