"""Few-shot validation's cost: the whole 7 × 7 search ÷ the sum of its 49 trainings on the same features.

The search (:func:`prolip.variants.search.search_projector`) trains at every grid point on features
extracted once and scores each point on the validation draw's features, also extracted once; the
reference code re-extracts the validation features at every point. The ratio measures everything
the search adds to its 49 fits (validation scoring, bookkeeping). Timed in one run, interleaved,
best of ``--repeats``; K classes at N shots, d_in = 768, d_out = 512 (ViT-B's projector).

Run: ``.venv/bin/python benchmarks/bench_search.py [--threads 1]``
"""

from __future__ import annotations

import argparse
import contextlib
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timing import best_of

from prolip.errors import TrainingDivergedError, TrainingWarning
from prolip.model.head import LinearHead
from prolip.training.engine import TrainConfig, train_projector
from prolip.variants.search import PAPER_LAMBDAS, PAPER_LRS, search_projector

D_IN, D_OUT, VIEWS = 768, 512, 4


def grid_problem(
    classes: int, shots: int, views: int = VIEWS, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, LinearHead, torch.Tensor]:
    """Random features (``views`` x K·N x 768), labels, validation features, ViT-B's head and T (seed 0)."""
    gen = torch.Generator().manual_seed(0)
    n = classes * shots
    features = torch.randn(views, n, D_IN, generator=gen).to(device)
    labels = (torch.arange(n) % classes).to(device)
    val = torch.randn(n, D_IN, generator=gen).to(device)
    classifier = F.normalize(torch.randn(classes, D_OUT, generator=gen), dim=-1).to(device)
    head = LinearHead((torch.randn(D_IN, D_OUT, generator=gen) / math.sqrt(D_IN)).to(device))
    return features, labels, val, head, classifier


def contenders(
    features: torch.Tensor,
    labels: torch.Tensor,
    val: torch.Tensor,
    head: LinearHead,
    classifier: torch.Tensor,
    config: TrainConfig,
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The two ways to cover the paper's 7 x 7 grid: its 49 fits one by one, and one ``search_projector``."""

    def fits() -> None:
        for lr in PAPER_LRS:
            for reg_lambda in PAPER_LAMBDAS:
                # A diverging point costs its steps all the same; hopeless points warn, as a lone fit should.
                with contextlib.suppress(TrainingDivergedError), warnings.catch_warnings():
                    warnings.simplefilter("ignore", TrainingWarning)
                    train_projector(features, labels, head, classifier, config.at(lr, reg_lambda))

    def search() -> None:
        search_projector(features, labels, val, labels, head, classifier, config)

    return fits, search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=10, help="K (default: %(default)s)")
    parser.add_argument("--shots", type=int, default=16, help="N, training and validation images per class")
    parser.add_argument("--epochs", type=int, default=100, help="steps per training (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fits, search = contenders(
        *grid_problem(args.classes, args.shots), TrainConfig(logit_scale=100.0, epochs=args.epochs)
    )
    best = best_of({"fits": fits, "search": search}, args.repeats)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, K={args.classes}, N={args.shots}, "
          f"{args.epochs} steps")  # fmt: skip
    print(
        f"49 fits: {best['fits']:.2f} s; search: {best['search']:.2f} s; search / fits: {best['search'] / best['fits']:.3f}"
    )


if __name__ == "__main__":
    main()
