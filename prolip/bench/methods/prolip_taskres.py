"""``prolip+taskres``: ProLIP's projector and TaskRes's text-classifier residual, trained jointly.

Default (``form="taskres"``), with f̂_W the normalised adapted embedding ``normalize(xW + b)``, t the
text prototypes TaskRes starts from (:func:`~prolip.bench.method_tools.text_prototypes`) and R a
residual per class, from zero::

    minimise over W, R:  CE(s · f̂_W · normalize(t + α R)ᵀ, y) + λ ‖W − W0‖²_F     (λ = 1/N, α = 0.5)

No penalty on R (TaskRes has none but the optimiser's weight decay, and ProLIP's public code adds
none): the library's ProLIP + TaskRes (``ProLIPAdapter(taskres_alpha=...)``), trained by the one engine
(:func:`prolip.training.engine.train_projector` with a :class:`~prolip.training.sides.ClassifierResidual`):
``problem.epochs`` full-batch steps on view t mod V, Adam (eps 1e-4), cosine schedule, one learning rate for both.

``form="prolip-code"`` is the objective of ProLIP's public code (``methods/ProLIP_TaskRes.py``)
instead: the residual scores the *frozen* embedding and T is not renormalised (a score term of the engine)::

    CE(s · f̂_W · Tᵀ + α · s · f̂_W0 · Rᵀ, y) + λ ‖W − W0‖²_F                       (α = 0.1, lr 1e-4)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from prolip.bench.adapted import PROLIP_LR, adapted_problem, train_config
from prolip.bench.method_tools import check_classes, plain_embeddings, text_prototypes
from prolip.bench.methods.clap import PrototypeModel
from prolip.bench.methods.interface import FittedMethod, Method, register
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.model.head import LinearHead
from prolip.params import Constraint, one_of
from prolip.training.engine import train_projector
from prolip.training.sides import ClassifierResidual

FORMS = {"taskres": {"alpha": 0.5, "lr": PROLIP_LR}, "prolip-code": {"alpha": 0.1, "lr": 1e-4}}
"""Each objective's default α and learning rate (TaskRes's α with ProLIP's lr; the public code's config)."""


@dataclass(frozen=True)
class _FrozenResidualTerm:
    """The public code's residual term ``α · s · f̂_W0 · Rᵀ`` (a score term of the engine: R trains, W0 is frozen)."""

    head: LinearHead
    start: torch.Tensor
    alpha: float
    logit_scale: float

    def scores(self, rows: torch.Tensor, weight: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.logit_scale * self.head.embed(rows) @ param.t()

    def to(self, device: torch.device, dtype: torch.dtype) -> _FrozenResidualTerm:
        return _FrozenResidualTerm(
            self.head.frozen(device, dtype), self.start.to(device, dtype), self.alpha, self.logit_scale
        )


class _FrozenResidual(FittedMethod):
    """Scores ``s · f̂_W·Tᵀ + α · s · f̂_W0·Rᵀ`` (the public code's form)."""

    def __init__(self, problem: Problem, weight: torch.Tensor, residual: torch.Tensor, alpha: float) -> None:
        super().__init__()
        self.problem, self.weight, self.residual, self.alpha = problem, weight, residual.detach(), alpha

    def logits(self, test: FeatureSet, classes: Classes) -> torch.Tensor:
        problem = self.problem
        check_classes(classes, list(problem.classes.names), ProLIPTaskRes.name)
        adapted = plain_embeddings(adapted_problem(problem, self.weight).image_head, test)
        frozen = plain_embeddings(problem.image_head, test)
        s = problem.logit_scale
        return s * adapted @ classes.classifier.t() + self.alpha * s * frozen @ self.residual.t()


@register
class ProLIPTaskRes(Method):
    """ProLIP + TaskRes: the projector and a residual on the text classifier, trained together.

    Args:
        form: "taskres" (``normalize(t + αR)`` scores the adapted embedding) or "prolip-code" (the
            public code's ``T`` on the adapted embedding plus ``αR`` on the frozen one).
        alpha: the residual's scale (default: 0.5, TaskRes's; 0.1 with "prolip-code").
        lr: Adam's learning rate for W and R (default: 1e-3; 1e-4 with "prolip-code").
        reg_lambda: λ of the penalty on W − W0 (default: 1/N).
        train_dtype: "fp32", or "fp16": W, R, their gradients and Adam's state stored in fp16 (the official code's).
    """

    name = "prolip+taskres"
    transfers: ClassVar[bool] = False  # one residual per training class
    _parameter_constraints: ClassVar[dict[str, Constraint]] = {"form": one_of(sorted(FORMS))}

    def __init__(
        self,
        form: str = "taskres",
        alpha: float | None = None,
        lr: float | None = None,
        reg_lambda: float | str | None = None,
        train_dtype: str = "fp32",
    ) -> None:
        self.form, self.reg_lambda, self.train_dtype = form, reg_lambda, train_dtype
        self.alpha = FORMS[form]["alpha"] if alpha is None else alpha
        self.lr = FORMS[form]["lr"] if lr is None else lr

    def fit(self, problem: Problem) -> FittedMethod:
        head, train, alpha = problem.image_head, problem.train, self.alpha
        config = train_config(problem, self.lr, self.reg_lambda, self.train_dtype)
        classifier = problem.classes.classifier
        if self.form == "taskres":
            base = text_prototypes(problem.classes)
            result = train_projector(train.features, train.labels, head, ClassifierResidual(base, alpha), config)
            residual = result.classifier_weight
            fitted = PrototypeModel(adapted_problem(problem, result.weight), base + alpha * residual, self.name)
        else:
            term = _FrozenResidualTerm(head, torch.zeros_like(classifier), alpha, problem.logit_scale)
            result = train_projector(train.features, train.labels, head, classifier, config, extra=term)
            fitted = _FrozenResidual(problem, result.weight, result.extra, alpha)
        fitted.info = {"form": self.form, "alpha": alpha, "lr": self.lr, "reg_lambda": config.reg_lambda}
        return fitted
