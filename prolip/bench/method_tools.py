"""Pieces the baseline methods' fits share: embeddings of views, minibatches, schedules, checks.

The baselines (:mod:`prolip.bench.methods`) all work on post-projection image embeddings, which
they compute from the bench's pre-projection features with the frozen image head, one view at a
time (so lazy cached features stay on disk). Several of them were written on top of Dassl (CoOp's
trainer library); :func:`epoch_batches` and :func:`warmup_cosine_lr` reproduce the minibatching and
learning-rate schedule of those trainers.
"""

from __future__ import annotations

import torch

from prolip.bench.problem import Classes, FeatureSet
from prolip.errors import InputError
from prolip.model import zeroshot
from prolip.model.head import LinearHead
from prolip.training.engine import cosine_lr

WARMUP_LR = 1e-5
"""Learning rate of the one constant warm-up epoch in the Dassl configurations the originals use."""


def embed_view(head: LinearHead, features: FeatureSet, view: int, normalize: bool = False) -> torch.Tensor:
    """Image embeddings ``[n, d_out]`` of one view (``view`` taken modulo the number of views).

    Unnormalised (what ``encode_image`` returns) unless ``normalize``.
    """
    rows = features.features[view % features.n_views]
    return head.embed(rows) if normalize else head.project(rows)


def plain_embeddings(head: LinearHead, features: FeatureSet) -> torch.Tensor:
    """L2-normalised embeddings ``[n, d_out]`` of view 0 (the plain view of a test or validation set)."""
    return embed_view(head, features, 0, normalize=True)


def check_classes(classes: Classes, trained: list[str], method: str) -> None:
    """Refuse to score classes other than the training ones, for methods that do not transfer."""
    if list(classes.names) != list(trained):
        raise InputError(
            f"{method} was trained on {len(trained)} classes and can only score those (its parameters are per "
            f"training class), but was asked to score {len(classes)} classes {list(classes.names)[:5]}...; "
            "pass the training classes, or use a method that transfers to unseen classes."
        )


class EmptyValidationError(InputError):
    """A method selects a hyperparameter on the validation draw, and the draw is empty: the bench skips that cell."""


def check_val(val: FeatureSet, method: str, fixed: str) -> None:
    """Refuse a selection on an empty validation draw; ``fixed`` names the argument that avoids it."""
    if val.labels.numel() == 0:
        raise EmptyValidationError(
            f"{method} selects {fixed} on the validation draw, but problem.val holds no images; "
            f"give the problem a validation draw or fix {fixed} when creating the method."
        )


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy (a fraction) of scores ``[..., n, K]``, over their last two dimensions: shape ``[...]``."""
    return (logits.argmax(dim=-1) == labels).float().mean(dim=-1)


def text_prototypes(classes: Classes) -> torch.Tensor:
    """The class prototypes CLAP and TaskRes start from, ``[K, d_out]``
    (:func:`prolip.model.zeroshot.text_prototypes`); T itself where the problem carries no text side."""
    if classes.text is None:
        return classes.classifier.clone()
    return zeroshot.text_prototypes(classes.classifier, classes.text.embeddings())


def dassl_batches(n: int, batch_size: int) -> int:
    """Batches per epoch of a Dassl training loader over ``n`` images (the last partial batch is
    dropped when there is at least one full one)."""
    return n // batch_size if n >= batch_size else 1


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, limit: int | None = None) -> list[torch.Tensor]:
    """Index batches of one epoch: a fresh random order of ``range(n)`` cut into ``batch_size`` pieces.

    ``limit`` keeps only the first ``limit`` batches (Dassl's loaders drop the last partial batch:
    pass :func:`dassl_batches`); by default every index is used once.
    """
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    return batches if limit is None else batches[:limit]


def warmup_cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """Learning rate of ``epoch`` under Dassl's "cosine" schedule with one constant warm-up epoch.

    Epoch 0 runs at :data:`WARMUP_LR`; epoch e ≥ 1 at ``base_lr · (1 + cos(π (e − 1) / epochs)) / 2``
    (the cosine restarts after the warm-up, as Dassl's ``WARMUP_RECOUNT`` default does).
    """
    if epoch == 0:
        return WARMUP_LR
    return cosine_lr(base_lr, epoch - 1, epochs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
