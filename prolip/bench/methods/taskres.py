"""``taskres``: TaskRes (Yu et al., CVPR 2023), a learned residual on the text classifier.

Prototypes ``t_k + α · r_k`` with t the text prototypes (the zero-shot classifier at the scale of
the unnormalised text embeddings, as the public code's base), r trained from 0, α = 0.5 fixed (the
public code's value for every dataset but Flowers102), scores ``s · f̂·normalize(t + α r)ᵀ``.
Trained with cross-entropy under the public code's recipe: minibatches of 256, one new augmented
view of every image per epoch, Adam (lr 2e-3, weight decay 5e-4), Dassl's cosine schedule with a
warm-up epoch, 100 epochs for N ≤ 4 shots and 200 beyond.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from prolip.bench.method_tools import (
    dassl_batches,
    embed_view,
    epoch_batches,
    set_lr,
    text_prototypes,
    warmup_cosine_lr,
)
from prolip.bench.methods.clap import PrototypeModel
from prolip.bench.methods.interface import FittedMethod, Method, register
from prolip.bench.problem import Problem


@register
class TaskRes(Method):
    """TaskRes: zero-shot classifier plus a trained, scaled residual per class.

    Args:
        alpha: the residual's scale α.
        epochs: training epochs; 100 for N ≤ 4 shots and 200 beyond by default.
        lr: Adam's learning rate.
        batch_size: images per minibatch.
    """

    name = "taskres"
    transfers: ClassVar[bool] = False  # one residual per training class

    def __init__(self, alpha: float = 0.5, epochs: int | None = None, lr: float = 2e-3, batch_size: int = 256) -> None:
        self.alpha, self.epochs, self.lr, self.batch_size = alpha, epochs, lr, batch_size

    def fit(self, problem: Problem) -> FittedMethod:
        train, s = problem.train, problem.logit_scale
        epochs = (100 if problem.shots <= 4 else 200) if self.epochs is None else self.epochs
        base = text_prototypes(problem.classes)
        residual = torch.zeros_like(base, requires_grad=True)
        optimizer = torch.optim.Adam([residual], lr=self.lr, weight_decay=5e-4, fused=True)
        generator = problem.generator()
        batches = dassl_batches(train.labels.numel(), self.batch_size)
        for epoch in range(epochs):
            set_lr(optimizer, warmup_cosine_lr(self.lr, epoch, epochs))
            with torch.no_grad():
                x = embed_view(problem.image_head, train, epoch, normalize=True)
            for batch in epoch_batches(x.shape[0], self.batch_size, generator, limit=batches):
                prototypes = F.normalize(base + self.alpha * residual, dim=-1)
                loss = F.cross_entropy(s * x[batch] @ prototypes.t(), train.labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model = PrototypeModel(problem, base + self.alpha * residual, self.name)
        model.info = {"epochs": epochs}  # the number chosen from N when not given
        return model
