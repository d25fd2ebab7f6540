"""The variants' training cost against plain ProLIP on the same features: time ÷ ProLIP's time.

For K classes at 16 shots (n = 16K images), d_in=768, d_out=512, d_t=512 (ViT-B's projectors) and
M prompt templates, times in one run, interleaved, best of ``--repeats``:

* prolip: :func:`prolip.training.engine.train_projector` (the vision projector, hand-written gradient);
* text: :func:`prolip.training.engine.train_projector` with a text side and the image side frozen;
* image+text: the same training both projectors;
* rla: :func:`prolip.training.engine.train_projector` on the embeddings ``[V, n, d_out]`` with W0 = I
  (the regularised linear adapter; the embeddings are computed once, outside the timing).

A step costs the same whichever view it uses, so 4 views stand in for the paper's 300. K=1000 runs 5
steps by default; the ratio is per step.

Run: ``.venv/bin/python benchmarks/bench_variants.py [--threads 1] [--templates 1 7]``.
"""

from __future__ import annotations

import argparse
import math

import torch
from timing import best_of

from prolip.model.head import LinearHead
from prolip.training.engine import TrainConfig, train_projector
from prolip.training.sides import TextSide

D_IN, D_OUT, D_TEXT, SHOTS, VIEWS = 768, 512, 512, 16, 4


def bench(k: int, templates: int, steps: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Best-of-``repeats`` seconds of each method for K=k classes and ``templates`` prompts per class."""
    gen = torch.Generator().manual_seed(k)
    n = SHOTS * k
    features = torch.randn(VIEWS, n, D_IN, generator=gen).to(device)
    labels = (torch.arange(n) % k).to(device)
    w0 = (torch.randn(D_IN, D_OUT, generator=gen) / math.sqrt(D_IN)).to(device)
    prompts = torch.randn(k, templates, D_TEXT, generator=gen).to(device)
    text_w0 = (torch.randn(D_TEXT, D_OUT, generator=gen) / math.sqrt(D_TEXT)).to(device)
    text = TextSide(prompts, LinearHead(text_w0))
    classifier = text.classifier()
    embeddings = features @ w0
    head, identity = LinearHead(w0), LinearHead(torch.eye(D_OUT, device=device))
    config = TrainConfig(logit_scale=100.0, lr=1e-3, reg_lambda=1 / SHOTS, epochs=steps, device=device)
    methods = {
        "prolip": lambda: train_projector(features, labels, head, classifier, config),
        "text": lambda: train_projector(features, labels, head, text, config, train_image=False),
        "image+text": lambda: train_projector(features, labels, head, text, config),
        "rla": lambda: train_projector(embeddings, labels, identity, classifier, config),
    }
    return best_of(methods, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 300, 5], help="steps per size")
    parser.add_argument("--repeats", type=int, nargs="+", default=[5, 3, 3], help="repetitions per size")
    parser.add_argument("--templates", type=int, nargs="+", default=[1, 7], help="prompt templates M per class")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(
        f"{'K':>5} {'M':>2} {'n':>6} {'steps':>5} {'prolip s':>9} {'text s':>8} {'img+txt s':>9} {'rla s':>7} "
        f"{'text/prolip':>11} {'img+txt/prolip':>14} {'rla/prolip':>10}"
    )
    for k, steps, repeats in zip(args.classes, args.steps, args.repeats, strict=True):
        for m in args.templates:
            t = bench(k, m, steps, repeats, device)
            print(
                f"{k:>5} {m:>2} {SHOTS * k:>6} {steps:>5} {t['prolip']:>9.3f} {t['text']:>8.3f} "
                f"{t['image+text']:>9.3f} {t['rla']:>7.3f} {t['text'] / t['prolip']:>11.2f} "
                f"{t['image+text'] / t['prolip']:>14.2f} {t['rla'] / t['prolip']:>10.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
