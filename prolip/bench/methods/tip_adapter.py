"""``tip-adapter``: Tip-Adapter (Zhang et al., ECCV 2022), the training-free cache model.

Keys: each training image's embedding averaged over 10 augmented views, normalised; values: one-hot
labels; scores ``s · f·Tᵀ + α · exp(−β (1 − f·Kᵀ)) · L`` (:mod:`prolip.bench.cache_model`), with α
and β searched on the validation draw (never on test data).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from prolip.bench.cache_model import cache_keys
from prolip.bench.method_tools import check_classes, check_val, plain_embeddings
from prolip.bench.methods.base import FittedMethod, Method, register
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.errors import InputError
from prolip.model.head import LinearHead
from prolip.training.tip_cache import search_alpha_beta, tip_logits

_CHUNK = 4096  # test images scored at once: the affinity matrix is [chunk, cache size]


class CacheModel(FittedMethod):
    """A fitted Tip-Adapter (either variant): scores the training classes with the cache model."""

    def __init__(self, problem: Problem, keys: torch.Tensor, alpha: float, beta: float, method: str) -> None:
        super().__init__()
        self.head: LinearHead = problem.image_head
        self.names = list(problem.classes.names)
        self.classifier = problem.classes.classifier
        self.keys = keys.detach()
        self.key_labels = problem.train.labels
        self.alpha, self.beta, self.logit_scale, self.method = alpha, beta, problem.logit_scale, method
        self.info = {"alpha": alpha, "beta": beta}

    def logits(self, test: FeatureSet, classes: Classes) -> torch.Tensor:
        check_classes(classes, self.names, self.method)
        f = plain_embeddings(self.head, test)
        args = (self.classifier, self.keys, self.key_labels, self.alpha, self.beta, self.logit_scale)
        with torch.no_grad():
            return torch.cat([tip_logits(chunk, *args) for chunk in f.split(_CHUNK)])


def select_alpha_beta(problem: Problem, keys: torch.Tensor, method: str) -> tuple[float, float]:
    """α and β of the cache model with ``keys``, chosen on ``problem.val``."""
    check_val(problem.val, method, "alpha and beta")
    val = plain_embeddings(problem.image_head, problem.val)
    alpha, beta, _ = search_alpha_beta(
        val, problem.val.labels, problem.classes.classifier, keys.detach(), problem.train.labels, problem.logit_scale
    )
    return alpha, beta


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
        with torch.no_grad():
            keys = cache_keys(problem.image_head, problem.train)
        if self.alpha is None:
            alpha, beta = select_alpha_beta(problem, keys, self.name)
        else:
            alpha, beta = self.alpha, self.beta
        return CacheModel(problem, keys, alpha, beta, self.name)
