"""``lp++``: LP++ (Huang et al., CVPR 2024), a linear probe blended with the text classifier.

Scores ``l_ik = f_i·w_k + b_k + α_k f_i·t_k`` on normalised embeddings f, with visual prototypes W,
a bias b and class-wise blending weights α, trained by full-batch cross-entropy with step sizes from
the data alone (no validation):

- init: ``w_k`` the *sum* of class k's embeddings, b = 0, every ``α_k = 250 · mean_k(mean over
  class k's images of f·t_k)``;
- W and b: SGD with momentum 0.9 at ``lr_W = 4n / λ_max(FᵀF)`` (from the loss's Lipschitz bound);
- α: every 10 epochs a gradient step of ``lr_α = n / (4 max_k Σ_i (f_i·t_k)²)`` along α's gradient
  accumulated since the start (the public code never clears it);
- 300 epochs on one augmented view of each training image (the original extracts one).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from prolip.bench.method_tools import check_classes, embed_view, plain_embeddings
from prolip.bench.methods.interface import FittedMethod, Method, register
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.model.head import LinearHead

ALPHA_EVERY = 10
"""Epochs between two updates of the blending weights."""
ALPHA_INIT_SCALE = 250.0
"""The original's constant in the initial blending weight."""
MOMENTUM = 0.9


class _LPPlusPlusModel(FittedMethod):
    def __init__(
        self, head: LinearHead, classes: Classes, weight: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor
    ) -> None:
        super().__init__()
        self.head, self.names, self.classifier = head, list(classes.names), classes.classifier
        self.weight, self.bias, self.alpha = weight, bias, alpha

    def logits(self, test: FeatureSet, classes: Classes) -> torch.Tensor:
        check_classes(classes, self.names, LPPlusPlus.name)
        return lp_plus_plus_logits(
            plain_embeddings(self.head, test), self.weight, self.bias, self.alpha, self.classifier
        )


def lp_plus_plus_logits(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor, classifier: torch.Tensor
) -> torch.Tensor:
    """``f·Wᵀ + b + α ⊙ f·Tᵀ`` ``[n, K]`` of normalised embeddings ``[n, d]`` (W and T ``[K, d]``)."""
    return features @ weight.t() + bias + alpha * (features @ classifier.t())


@register
class LPPlusPlus(Method):
    """LP++: text-blended linear probe with data-driven step sizes; validation-free.

    Args:
        epochs: full-batch iterations (``0`` returns the initialisation).
    """

    name = "lp++"
    transfers: ClassVar[bool] = False  # W and α are per training class

    def __init__(self, epochs: int = 300) -> None:
        self.epochs = epochs

    def fit(self, problem: Problem) -> FittedMethod:
        classes = problem.classes
        f = embed_view(problem.image_head, problem.train, 0, normalize=True)
        target = F.one_hot(problem.train.labels, len(classes)).float()
        n = f.shape[0]
        text = f @ classes.classifier.t()  # [n, K]
        weight = target.t() @ f  # class sums, as the original's "centroids"
        bias = torch.zeros(len(classes))
        own_class = (text * target).sum(dim=0) / target.sum(dim=0)  # mean of f·t_k over class k's images
        alpha = torch.full((len(classes),), ALPHA_INIT_SCALE * float(own_class.mean()))
        lr_w = 4 * n / float(torch.linalg.eigvalsh(f.t().double() @ f.double()).max())
        lr_alpha = n / (4 * float(text.square().sum(dim=0).max()))
        info = {"alpha_init": float(alpha[0]), "lr_w": lr_w, "lr_alpha": lr_alpha}
        velocity_w, velocity_b = torch.zeros_like(weight), torch.zeros_like(bias)
        alpha_grad = torch.zeros_like(alpha)
        for epoch in range(self.epochs):
            scores = lp_plus_plus_logits(f, weight, bias, alpha, classes.classifier)
            g = (torch.softmax(scores, dim=1) - target) / n  # d mean-CE / d scores
            alpha_grad += (g * text).sum(dim=0)
            # torch.optim.SGD's momentum: v ← μ v + g, p ← p − lr v.
            velocity_w.mul_(MOMENTUM).add_(g.t() @ f)
            velocity_b.mul_(MOMENTUM).add_(g.sum(dim=0))
            weight -= lr_w * velocity_w
            bias -= lr_w * velocity_b
            if (epoch + 1) % ALPHA_EVERY == 0:
                alpha -= lr_alpha * alpha_grad
        model = _LPPlusPlusModel(problem.image_head, classes, weight, bias, alpha)
        model.info = info
        return model
