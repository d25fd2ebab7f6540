"""Cost of ProLIP's combinations and of test-time ProLIP ÷ plain ProLIP's, on the same features.

A synthetic bench problem shaped like ViT-B's projector (d_in = 768, d_out = 512), K classes at 16
shots, 4 views (a step costs the same whichever view it uses), ``--epochs`` full-batch steps, a
validation draw of 16 per class; every method is fitted with ``prolip bench``'s method interface,
so the times include what each fit does besides training (the α/β search, building keys):

* prolip: :func:`prolip.bench.adapted.prolip_weight` (``train_projector``), the baseline of every ratio;
* prolip+tip-adapter (cache / trained / joint) and prolip+taskres (taskres / prolip-code);
* library taskres: what ``ProLIPAdapter(taskres_alpha=0.5)`` trains, ``train_projector`` with a
  :class:`prolip.training.sides.ClassifierResidual` (W's closed-form gradient, R through autograd): the
  engine prolip+taskres's ``taskres`` form runs too, without the bench method around it;
* test-time-prolip: scoring ``--test`` test images with 64 views each, against ProLIP scoring their
  plain views (the cost of ``logits``, not of a fit).

Best of ``--repeats``, interleaved.

Run: ``.venv/bin/python benchmarks/bench_combinations.py --threads 1`` (about 2–4 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from timing import best_of

from prolip.bench.adapted import prolip_weight, train_config
from prolip.bench.method_tools import text_prototypes
from prolip.bench.methods.prolip_taskres import ProLIPTaskRes
from prolip.bench.methods.prolip_tip_adapter import ProLIPTipAdapter
from prolip.bench.methods.test_time_prolip import ProLIPTestTime
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.model.head import LinearHead
from prolip.training.engine import train_projector
from prolip.training.sides import ClassifierResidual, TextSide

D_IN, D_OUT, D_TEXT, SHOTS, VIEWS = 768, 512, 512, 16, 4


def problem_of(k: int, epochs: int, test: int) -> tuple[Problem, FeatureSet]:
    """A K-class problem of random features (speed does not depend on their values) and a 64-view test set."""
    gen = torch.Generator().manual_seed(k)
    labels = torch.arange(k).repeat_interleave(SHOTS)

    def features(views: int, n: int) -> torch.Tensor:
        return torch.randn(views, n, D_IN, generator=gen)

    text_w0 = torch.randn(D_TEXT, D_OUT, generator=gen) / D_TEXT**0.5
    text = TextSide(torch.randn(k, 2, D_TEXT, generator=gen), LinearHead(text_w0))
    train = FeatureSet(features(VIEWS, len(labels)), labels)
    problem = Problem(
        train=train,
        train_plain=FeatureSet(train.features[:1], labels),
        val=FeatureSet(features(1, len(labels)), labels),
        classes=Classes(
            [f"class {i}" for i in range(k)], F.normalize(torch.randn(k, D_OUT, generator=gen), dim=-1), text
        ),
        image_head=LinearHead(torch.randn(D_IN, D_OUT, generator=gen) / math.sqrt(D_IN)),
        logit_scale=100.0,
        shots=SHOTS,
        seed=k,
        epochs=epochs,
    )
    return problem, FeatureSet(features(64, test), torch.arange(test) % k)


def bench(k: int, epochs: int, test_images: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds of each fit (and of scoring the test set) for K=k classes."""
    problem, test = problem_of(k, epochs, test_images)
    config = train_config(problem)
    weight, plain = prolip_weight(problem, config), test.features[0]
    classifier, fitted_tt = problem.classes.classifier, ProLIPTestTime().fit(problem)
    head, train = problem.image_head, problem.train
    residual = ClassifierResidual(text_prototypes(problem.classes), 0.5)
    adapted = LinearHead(weight, head.bias)

    runs = {
        "prolip": lambda: prolip_weight(problem, config),
        "prolip+tip-adapter cache": lambda: ProLIPTipAdapter().fit(problem),
        "prolip+tip-adapter trained": lambda: ProLIPTipAdapter(keys="trained").fit(problem),
        "prolip+tip-adapter joint": lambda: ProLIPTipAdapter(keys="joint").fit(problem),
        "prolip+taskres taskres": lambda: ProLIPTaskRes().fit(problem),
        "prolip+taskres prolip-code": lambda: ProLIPTaskRes(form="prolip-code").fit(problem),
        "library taskres": lambda: train_projector(train.features, train.labels, head, residual, config),
        "prolip logits (plain view)": lambda: adapted.logits(plain, classifier, problem.logit_scale),
        "test-time-prolip logits": lambda: fitted_tt.logits(test, problem.classes),
    }
    return best_of(runs, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--test", type=int, default=256, help="test images for test-time-prolip (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}, {args.epochs} steps, 16 shots")
    for k in args.classes:
        best = bench(k, args.epochs, args.test, args.repeats)
        print(f"K={k} (n={k * SHOTS} training images, {args.test} test images with 64 views)")
        for name, seconds in best.items():
            base = best["prolip logits (plain view)"] if "logits" in name else best["prolip"]
            print(f"  {name:<28} {seconds:9.4f} s  {seconds / base:7.2f} x")


if __name__ == "__main__":
    main()
