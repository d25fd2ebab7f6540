"""Training cost at the matmul floor: fit time ÷ the time of the fit's own matrix products.

For K classes at 16 shots (n = 16K images), d_in=768, d_out=512 (ViT-B's projector), times
in one run, interleaved, best of ``--repeats``:

* floor: the four products of a step — x·W, u·Tᵀ, dlogits·T and xᵀ·dz — alone, for every step;
* floor+adam: the same plus one ``torch.optim.Adam(fused=True)`` step each: the least any Adam fit costs;
* prolip: :func:`prolip.training.engine.train_projector` (hand-written gradient, torch.optim.Adam(fused=True));
* autograd: the plain autograd + ``torch.optim.Adam`` + ``CosineAnnealingLR`` loop that the
  tests use as the reference (``tests/reference_training.py``).

* baseline (with ``--baseline FILE``): ``train_projector`` of the training loop before the one engine,
  ``prolip/training/loop.py`` of commit f8a78c0 (``git show f8a78c0:prolip/training/loop.py >
  /tmp/loop_before.py``; it imports only modules prolip still has), called with its own signature and
  timed interleaved with the others, so a before/after ratio comes from one run.

A step costs the same whichever view it uses, so 4 views stand in for the paper's 300. K=1000
runs 5 steps by default (a step there is ~60 GFLOP; 300 would take minutes per method); the
ratio is per step, so it does not depend on the step count.

Run: ``.venv/bin/python benchmarks/bench_training.py [--threads 1]`` (2–4 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from timing import best_of

from prolip.model.head import LinearHead
from prolip.training.engine import TrainConfig, train_projector

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_training import reference_train  # the reference loop the tests use too

D_IN, D_OUT, SHOTS, VIEWS = 768, 512, 16, 4


def floor_step(
    n: int, classifier: torch.Tensor, w0: torch.Tensor, adam: bool = False, capturable: bool = False
) -> tuple[Callable[[torch.Tensor], None], tuple[torch.Tensor, ...]]:
    """One training step's matrix products on ``n`` rows, into preallocated outputs (and, with ``adam``, one
    ``torch.optim.Adam(fused=True)`` step after them: what any Adam fit must do), and the buffers it writes.
    ``capturable`` keeps Adam's state on the device, as a CUDA graph needs."""
    k = classifier.shape[0]
    z = torch.empty(n, D_OUT, device=w0.device)
    scores = torch.empty(n, k, device=w0.device)
    weight = torch.nn.Parameter(w0.clone())
    weight.grad = grad = torch.empty_like(w0)
    optimizer = torch.optim.Adam([weight], lr=1e-9, fused=True, capturable=capturable) if adam else None

    def step(x: torch.Tensor) -> None:
        torch.mm(x, weight.detach(), out=z)
        torch.mm(z, classifier.t(), out=scores)
        torch.mm(scores, classifier, out=z)
        torch.mm(x.t(), z, out=grad)
        if optimizer is not None:
            optimizer.step()

    return step, (z, scores, weight, grad)


def matmul_floor(
    features: torch.Tensor, classifier: torch.Tensor, w0: torch.Tensor, steps: int, adam: bool = False
) -> None:
    """``steps`` of :func:`floor_step`, step t on view t mod V."""
    step, _ = floor_step(features.shape[1], classifier, w0, adam)
    for t in range(steps):
        step(features[t % features.shape[0]])


def load_loop(path: str) -> ModuleType:
    """The training loop of another version (``prolip/training/loop.py``), as a module of its own (it imports the
    rest of prolip)."""
    spec = importlib.util.spec_from_file_location("baseline_loop", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def bench(
    k: int, steps: int, repeats: int, device: torch.device, baseline: ModuleType | None = None
) -> dict[str, float]:
    """Best-of-``repeats`` seconds of each method for K=k classes."""
    gen = torch.Generator().manual_seed(k)
    n = SHOTS * k
    features = torch.randn(VIEWS, n, D_IN, generator=gen).to(device)
    labels = (torch.arange(n) % k).to(device)
    classifier = F.normalize(torch.randn(k, D_OUT, generator=gen), dim=-1).to(device)
    w0 = (torch.randn(D_IN, D_OUT, generator=gen) / math.sqrt(D_IN)).to(device)
    train = {"logit_scale": 100.0, "lr": 1e-3, "reg_lambda": 1 / SHOTS, "epochs": steps}
    config = TrainConfig(**train, device=device)
    methods = {
        "floor": lambda: matmul_floor(features, classifier, w0, steps),
        "floor+adam": lambda: matmul_floor(features, classifier, w0, steps, adam=True),
        "prolip": lambda: train_projector(features, labels, LinearHead(w0), classifier, config),
        "autograd": lambda: reference_train(features, labels, classifier, w0, None, **train),
    }
    if baseline is not None:
        methods["baseline"] = lambda: baseline.train_projector(
            features, labels, classifier, w0, None, device=device, verbose=False, **train
        )
    return best_of(methods, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 300, 5], help="steps per size")
    parser.add_argument("--repeats", type=int, nargs="+", default=[5, 3, 3], help="repetitions per size")
    parser.add_argument(
        "--baseline", default=None, help="the training loop of another version (prolip/training/loop.py) to compare"
    )
    args = parser.parse_args()
    baseline = load_loop(args.baseline) if args.baseline else None
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(
        f"{'K':>5} {'n':>6} {'steps':>5} {'floor s':>8} {'+adam s':>8} {'prolip s':>9} {'autograd s':>10} "
        f"{'prolip/floor':>12} {'prolip/(floor+adam)':>19} {'autograd/floor':>14}"
    )
    for k, steps, repeats in zip(args.classes, args.steps, args.repeats, strict=True):
        t = bench(k, steps, repeats, device, baseline)
        compared = (
            f" baseline {t['baseline']:.3f} s, baseline/floor {t['baseline'] / t['floor']:.2f}, "
            f"baseline/(floor+adam) {t['baseline'] / t['floor+adam']:.2f}, prolip/baseline {t['prolip'] / t['baseline']:.3f}"
            if baseline
            else ""
        )
        print(
            f"{k:>5} {SHOTS * k:>6} {steps:>5} {t['floor']:>8.3f} {t['floor+adam']:>8.3f} {t['prolip']:>9.3f} "
            f"{t['autograd']:>10.3f} {t['prolip'] / t['floor']:>12.2f} {t['prolip'] / t['floor+adam']:>19.2f} "
            f"{t['autograd'] / t['floor']:>14.2f}{compared}",
            flush=True,
        )


if __name__ == "__main__":
    main()
