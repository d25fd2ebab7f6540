"""``clip-adapter``: CLIP-Adapter (Gao et al., 2021), a residual MLP on the image embedding.

``f' = ρ · MLP(f) + (1 − ρ) · f`` on the unnormalised embedding f, MLP = Linear(d, d/4, no bias) →
ReLU → Linear(d/4, d, no bias) → ReLU (the public code's adapter), scores ``s · normalize(f')·Tᵀ``.
Trained with cross-entropy under CoOp's recipe, which the public code plugs into: minibatches of 32,
one new augmented view of every image per epoch, SGD (lr 2e-3, momentum 0.9, weight decay 5e-4),
Dassl's cosine schedule with a warm-up epoch, 50 / 100 / 200 epochs for N = 1 / 2–4 / 8+ shots.
One adapter is trained per ρ in :data:`RATIOS` (in one batched run: same initialisation, same
minibatches) and ρ is chosen on the validation draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from prolip.bench.method_tools import (
    accuracy,
    check_val,
    dassl_batches,
    embed_view,
    epoch_batches,
    set_lr,
    warmup_cosine_lr,
)
from prolip.bench.methods.interface import FittedMethod, Method, register
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.model.head import LinearHead

RATIOS = (0.2, 0.4, 0.6, 0.8)
"""Residual ratios ρ tried; on a validation tie the smallest (closest to zero-shot) wins."""
REDUCTION = 4
"""Bottleneck width of the MLP: d_out / REDUCTION."""


def coop_epochs(shots: int) -> int:
    """CoOp's epochs for N shots: 50 for 1, 100 for 2 and 4, 200 beyond."""
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


def adapt(features: torch.Tensor, down: torch.Tensor, up: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``ρ · MLP(f) + (1 − ρ) · f`` for embeddings ``[n, d]`` and R stacked adapters: ``[R, n, d]``.

    ``down`` is ``[R, d, h]``, ``up`` ``[R, h, d]``, ``ratio`` ``[R]``.
    """
    residual = torch.relu(torch.relu(features @ down) @ up)
    ratio = ratio[:, None, None]
    return ratio * residual + (1 - ratio) * features


class _AdapterModel(FittedMethod):
    def __init__(
        self, head: LinearHead, down: torch.Tensor, up: torch.Tensor, ratio: float, logit_scale: float
    ) -> None:
        super().__init__()
        self.head, self.down, self.up, self.logit_scale = head, down[None], up[None], logit_scale
        self.ratio = torch.tensor([ratio])

    def logits(self, test: FeatureSet, classes: Classes) -> torch.Tensor:
        # Any classes: the adapter acts on the image side only.
        f = adapt(embed_view(self.head, test, 0), self.down, self.up, self.ratio)[0]
        return self.logit_scale * F.normalize(f, dim=-1) @ classes.classifier.t()


@register
class ClipAdapter(Method):
    """CLIP-Adapter: residual bottleneck MLP on the image embedding, ρ chosen on val.

    Args:
        ratio: ρ; fixes it instead of choosing among :data:`RATIOS` on val.
        epochs: training epochs; CoOp's count for the problem's shots by default.
        lr: SGD's learning rate.
        batch_size: images per minibatch.
    """

    name = "clip-adapter"
    transfers: ClassVar[bool] = True  # acts on the image embedding; new classes use their own T

    def __init__(
        self, ratio: float | None = None, epochs: int | None = None, lr: float = 2e-3, batch_size: int = 32
    ) -> None:
        self.ratio, self.epochs, self.lr, self.batch_size = ratio, epochs, lr, batch_size

    def fit(self, problem: Problem) -> FittedMethod:
        ratios: Sequence[float] = RATIOS if self.ratio is None else (self.ratio,)
        if len(ratios) > 1:
            check_val(problem.val, self.name, "ratio")
        head, train, classifier, s = problem.image_head, problem.train, problem.classes.classifier, problem.logit_scale
        epochs = coop_epochs(problem.shots) if self.epochs is None else self.epochs
        down, up = _initial_weights(head.out_features, len(ratios), problem.generator())
        ratio = torch.tensor(ratios)
        optimizer = torch.optim.SGD([down, up], lr=self.lr, momentum=0.9, weight_decay=5e-4, fused=True)
        generator = problem.generator(1)
        batches = dassl_batches(train.labels.numel(), self.batch_size)
        for epoch in range(epochs):
            set_lr(optimizer, warmup_cosine_lr(self.lr, epoch, epochs))
            with torch.no_grad():
                x = embed_view(head, train, epoch)
            for batch in epoch_batches(x.shape[0], self.batch_size, generator, limit=batches):
                scores = s * F.normalize(adapt(x[batch], down, up, ratio), dim=-1) @ classifier.t()  # [R, B, K]
                y = train.labels[batch].repeat(len(ratios))
                # Summed over the R adapters: each gets the gradient of its own mean cross-entropy.
                loss = F.cross_entropy(scores.flatten(0, 1), y, reduction="sum") / len(batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        best = 0
        if len(ratios) > 1:
            with torch.no_grad():
                val = adapt(embed_view(head, problem.val, 0), down, up, ratio)
                per_ratio = accuracy(s * F.normalize(val, dim=-1) @ classifier.t(), problem.val.labels)
            best = int(per_ratio.argmax())  # the first maximum: the smallest ρ on a tie
        model = _AdapterModel(head, down[best].detach(), up[best].detach(), ratios[best], s)
        model.info = {"ratio": ratios[best], "epochs": epochs}
        return model


def _initial_weights(d: int, copies: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's default initialisation (uniform, bound 1/√fan_in) of both layers, one copy per ρ."""
    h = d // REDUCTION
    down = (torch.rand(d, h, generator=generator) * 2 - 1) / d**0.5
    up = (torch.rand(h, d, generator=generator) * 2 - 1) / h**0.5
    return (
        down.expand(copies, d, h).clone().requires_grad_(True),
        up.expand(copies, h, d).clone().requires_grad_(True),
    )
