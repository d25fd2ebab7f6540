"""``clap``: CLAP (Silva-Rodríguez et al., CVPR 2024), a zero-shot-initialised linear probe with a
class-adaptive constraint toward the zero-shot prototypes; validation-free.

Scores ``s · f̂·p̂_kᵀ`` with prototypes p initialised at the text prototypes t (the zero-shot
classifier at the scale of the unnormalised text embeddings). Loss on a minibatch: cross-entropy +
``mean_k λ_k ‖p_k − t_k‖²``, the multiplier λ_k being the zero-shot model's mean probability of class
k over class k's training views (the public code's ``l2`` constraint, used in all its experiments).
Training as the public code: 20 augmented views of each image pooled; 300 epochs of max(1, n // 256)
minibatches of 256 from that pool (n images); SGD (lr 0.1, momentum 0.9); Dassl's cosine schedule
with one warm-up epoch.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from prolip.bench.method_tools import (
    check_classes,
    dassl_batches,
    embed_view,
    epoch_batches,
    plain_embeddings,
    set_lr,
    text_prototypes,
    warmup_cosine_lr,
)
from prolip.bench.methods.interface import FittedMethod, Method, register
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.model.head import LinearHead

AUGMENT_VIEWS = 20
"""Augmented views of each training image in the training pool (the original's ``epochs_aumentation``)."""


class PrototypeModel(FittedMethod):
    """A cosine classifier over learned class prototypes: ``s · f̂·p̂ᵀ`` (training classes only)."""

    def __init__(self, problem: Problem, prototypes: torch.Tensor, method: str) -> None:
        super().__init__()
        self.head: LinearHead = problem.image_head
        self.names, self.logit_scale, self.method = list(problem.classes.names), problem.logit_scale, method
        self.prototypes = F.normalize(prototypes.detach(), dim=-1)

    def logits(self, test: FeatureSet, classes: Classes) -> torch.Tensor:
        check_classes(classes, self.names, self.method)
        return self.logit_scale * plain_embeddings(self.head, test) @ self.prototypes.t()


def class_multipliers(zero_shot: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """λ ``[K]``: the mean zero-shot probability of each class over that class's samples."""
    target = F.one_hot(labels, zero_shot.shape[1]).float()
    return (torch.softmax(zero_shot, dim=1) * target).sum(dim=0) / target.sum(dim=0)


@register
class CLAP(Method):
    """CLAP: linear probe from the zero-shot prototypes, penalised class-wise toward them.

    Args:
        epochs: training epochs (``0`` returns the zero-shot classifier).
        lr: SGD's learning rate.
        batch_size: samples per minibatch.
    """

    name = "clap"
    transfers: ClassVar[bool] = False  # one prototype per training class

    def __init__(self, epochs: int = 300, lr: float = 0.1, batch_size: int = 256) -> None:
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size

    def fit(self, problem: Problem) -> FittedMethod:
        train, s = problem.train, problem.logit_scale
        with torch.no_grad():
            x = torch.cat([embed_view(problem.image_head, train, v, normalize=True) for v in range(AUGMENT_VIEWS)])
        y = train.labels.repeat(AUGMENT_VIEWS)
        base = text_prototypes(problem.classes)
        multipliers = class_multipliers(s * x @ problem.classes.classifier.t(), y)
        prototypes = base.clone().requires_grad_(True)
        optimizer = torch.optim.SGD([prototypes], lr=self.lr, momentum=0.9, fused=True)
        generator = problem.generator()
        batches = dassl_batches(train.labels.numel(), self.batch_size)
        for epoch in range(self.epochs):
            set_lr(optimizer, warmup_cosine_lr(self.lr, epoch, self.epochs))
            for batch in epoch_batches(x.shape[0], self.batch_size, generator, limit=batches):
                scores = s * x[batch] @ F.normalize(prototypes, dim=-1).t()
                penalty = (multipliers * (prototypes - base).square().sum(dim=-1)).mean()
                loss = F.cross_entropy(scores, y[batch]) + penalty
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model = PrototypeModel(problem, prototypes, self.name)
        model.info = {"mean_multiplier": float(multipliers.mean())}
        return model
