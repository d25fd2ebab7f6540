"""``prolip+tip-adapter``: the bench half of ProLIP + Tip-Adapter (:mod:`prolip.variants.tip_cache` holds the estimator and the cache model both use).

ProLIP is trained first (:func:`~prolip.bench.adapted.prolip_weight`, λ = 1/N); Tip-Adapter then
runs unchanged on the problem seen through the adapted projector W (:func:`~prolip.bench.adapted.adapted_problem`):
scores ``s · f′·Tᵀ + α · exp(−β (1 − f′·K′ᵀ)) · L``, f′ the normalised adapted embedding of the test
image, K′ the adapted training embeddings (mean of 10 augmented views, normalised), L one-hot labels,
α and β searched on the validation draw. With ``keys="trained"`` the keys are then fine-tuned as
Tip-Adapter-F does (W fixed). With α = 0 the scores are ProLIP's exactly.

``keys="joint"`` is the recipe of ProLIP's public code instead (``methods/ProLIP_Tip.py``): W and
Tip-Adapter-F's keys trained together by the engine (the cache a score term, :class:`_CacheTerm`), on ProLIP's
schedule (AdamW, eps 1e-4, weight decay 0.01,
cosine, ``problem.epochs`` full-batch steps, lr 1e-4) with CE + λ‖W − W0‖²; the keys are frozen-W0
embeddings of one augmented view, the affinity uses the frozen embedding f̂₀ of the image:
``s · f̂_W·Tᵀ + α · exp(−β (1 − f̂₀·Kᵀ)) · L``, α = β = 1 fixed (no validation).

``keys="official"`` is what that code actually computes: its "frozen" projection wraps the same
tensor as the trained one, so the affinities (in training, without a gradient through them, and at
test time) use the *trained* W, ``s · f̂_W·Tᵀ + α · exp(−β (1 − f̂_W·Kᵀ)) · L``; the keys are still
built once from W0 before training and then trained as Tip-Adapter-F's adapter weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from prolip.bench.adapted import PROLIP_LR, adapted_problem, prolip_weight, train_config
from prolip.bench.method_tools import check_classes, plain_embeddings
from prolip.bench.methods.interface import FittedMethod, Method, register
from prolip.bench.methods.tip_adapter import fit_cache_model
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.errors import InputError
from prolip.model.head import LinearHead
from prolip.params import Constraint, one_of
from prolip.training.engine import train_projector
from prolip.variants.tip_cache import cache_keys, cache_scores

KEYS = ("cache", "trained", "joint", "official")
JOINT_KEYS = ("joint", "official")
"""The recipes of ProLIP's public code (W and the keys trained together)."""
JOINT_LR = 1e-4
"""The learning rate of ProLIP's public code for the joint recipe (``configs/experiments/prolip_tip.yaml``)."""
_CHUNK = 4096  # test images scored at once: the affinity matrix is [chunk, cache size]


class _JointCache(FittedMethod):
    """Scores ``s · f̂_W·Tᵀ + α · exp(−β (1 − f̂·Kᵀ)) · L``: adapted embedding for T; for the cache the
    frozen one f̂₀ ("joint") or the adapted one f̂_W ("official")."""

    def __init__(
        self, problem: Problem, weight: torch.Tensor, keys: torch.Tensor, alpha: float, beta: float, adapted: bool
    ) -> None:
        super().__init__()
        self.problem, self.weight, self.keys = problem, weight, keys.detach()
        self.alpha, self.beta, self.adapted = alpha, beta, adapted
        self.info = {"alpha": alpha, "beta": beta}

    def logits(self, test: FeatureSet, classes: Classes) -> torch.Tensor:
        problem = self.problem
        check_classes(classes, list(problem.classes.names), ProLIPTipAdapter.name)
        adapted = plain_embeddings(adapted_problem(problem, self.weight).image_head, test)
        frozen = adapted if self.adapted else plain_embeddings(problem.image_head, test)
        labels, k = problem.train.labels, len(classes)
        with torch.no_grad():
            return torch.cat(
                [
                    problem.logit_scale * f @ classes.classifier.t()
                    + self.alpha * cache_scores(f0 @ self.keys.t(), labels, k, self.beta)
                    for f, f0 in zip(adapted.split(_CHUNK), frozen.split(_CHUNK), strict=True)
                ]
            )


@register
class ProLIPTipAdapter(Method):
    """ProLIP, then Tip-Adapter's cache on the adapted embeddings (α, β chosen on val).

    Args:
        keys: "cache" (Tip-Adapter: keys are the adapted training embeddings), "trained"
            (Tip-Adapter-F on the adapted embeddings: keys fine-tuned, W fixed), "joint" (ProLIP's
            public code as intended: W and keys trained together, α = β = 1, affinities of the
            frozen embedding) or "official" (that code as it runs: affinities of the trained W;
            see the module docstring).
        alpha, beta: with "cache", fix both instead of searching them on val.
        lr: ProLIP's learning rate (default: 1e-3; with "joint" and "official", the public code's 1e-4).
        train_dtype: "fp32", or "fp16" for the official code's fp16 storage of W (and of the keys
            with "joint" and "official"), their gradients and the optimiser's state.
    """

    name = "prolip+tip-adapter"
    transfers: ClassVar[bool] = False  # the cache's values are one-hot over the training classes
    _parameter_constraints: ClassVar[dict[str, Constraint]] = {"keys": one_of(KEYS)}

    def __init__(
        self,
        keys: str = "cache",
        alpha: float | None = None,
        beta: float | None = None,
        lr: float | None = None,
        train_dtype: str = "fp32",
    ) -> None:
        if (alpha is not None or beta is not None) and keys != "cache":
            raise InputError(f"alpha and beta can be fixed with keys='cache' only (got keys={keys!r}).")
        self.keys, self.alpha, self.beta = keys, alpha, beta
        self.lr = (JOINT_LR if keys in JOINT_KEYS else PROLIP_LR) if lr is None else lr
        self.train_dtype = train_dtype

    def fit(self, problem: Problem) -> FittedMethod:
        if self.keys in JOINT_KEYS:
            fitted = self._fit_joint(problem, official=self.keys == "official")
        else:
            config = train_config(problem, self.lr, train_dtype=self.train_dtype)
            adapted = adapted_problem(problem, prolip_weight(problem, config))
            if self.keys == "cache":
                fitted = fit_cache_model(adapted, self.name, self.alpha, self.beta)
            else:  # Tip-Adapter-F's keys, trained as the baseline trains them
                fitted = fit_cache_model(adapted, self.name, trained=True, generator=adapted.generator())
        fitted.info.update(keys=self.keys, lr=self.lr, reg_lambda=train_config(problem).reg_lambda)
        return fitted

    def _fit_joint(self, problem: Problem, official: bool, alpha: float = 1.0, beta: float = 1.0) -> FittedMethod:
        head, train = problem.image_head, problem.train
        keys = cache_keys(head, train.features, views=1)
        term = _CacheTerm(head, keys, train.labels, len(problem.classes), alpha, beta, official)
        config = train_config(problem, self.lr, train_dtype=self.train_dtype, optimizer="adamw")
        result = train_projector(train.features, train.labels, head, problem.classes.classifier, config, extra=term)
        return _JointCache(problem, result.weight, result.extra, alpha, beta, official)


@dataclass(frozen=True)
class _CacheTerm:
    """The cache's scores ``α · exp(−β (1 − f̂·Kᵀ)) · L`` as a score term of the engine: the keys K train beside W.

    f̂ is the frozen embedding (W0: "joint") or, as the public code computes it, the current W's without a
    gradient through it ("official").
    """

    head: LinearHead
    start: torch.Tensor
    labels: torch.Tensor
    classes: int
    alpha: float
    beta: float
    official: bool

    def scores(self, rows: torch.Tensor, weight: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the official code's "frozen" projection is the trained W itself
            frozen = self.head.embed(rows, weight if self.official else None)
        return self.alpha * cache_scores(frozen @ param.t(), self.labels, self.classes, self.beta)

    def to(self, device: torch.device, dtype: torch.dtype) -> _CacheTerm:
        return dataclasses.replace(
            self,
            head=self.head.frozen(device, dtype),
            start=self.start.to(device, dtype),
            labels=self.labels.to(device),
        )
