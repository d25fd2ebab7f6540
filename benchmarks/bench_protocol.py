"""The paper's full protocol, planned: trunk passes, cache size on disk and extraction hours, per model.

The protocol: few-shot on the 11 datasets at N = 1, 2, 4, 8, 16 with ``--seeds`` seeds, 300
augmented views per training image; base-to-new, cross-dataset and domain generalisation read the
same 16-shot draws (a base-class draw is the few-shot draw restricted to those classes: draws rank
images per class) and add only ImageNet's 4 variants' test splits. The figures are the
:class:`prolip.bench.estimate.BenchPlan` of that run, computed from the split sizes of CoOp's files
(no data needed), and its trunk throughput is measured here by
:func:`prolip.bench.estimate.probe_throughput` on the model with random weights (the speed does
not depend on them):

* augmented views: one cache folder per seed (the seed is part of the key), K·16 images in each;
* plain view (one folder): every test split, and the training and validation draws' images,
  counted once per image (at most the split's size); ImageNet's validation draw comes from its
  train split (ranks N..2N−1 per class: 32 per class per seed for N up to 16, the training ranks included);
* packs: every feature set read (each problem's training views, plain views and validation draw,
  and each test split) is also written view-major once (:class:`prolip.features.cache.CachedFeatures`).

Hours are extraction only, ``passes / (P × throughput)`` for P devices like the one probed.

Run: ``.venv/bin/python benchmarks/bench_protocol.py [--threads 1]`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse

import torch

from prolip.bench.estimate import BenchPlan, ViewSetting, probe_throughput
from prolip.model.backbone import build_backbone

# name: (classes, train, val, test) images in CoOp's split files; ImageNet has no val split.
DATASETS = {
    "imagenet": (1000, 1_281_167, 0, 50_000),
    "caltech101": (100, 4_128, 1_649, 2_465),
    "oxford_pets": (37, 2_944, 736, 3_669),
    "stanford_cars": (196, 6_509, 1_635, 8_041),
    "oxford_flowers": (102, 4_093, 1_633, 2_463),
    "food101": (101, 50_500, 20_200, 30_300),
    "fgvc_aircraft": (100, 3_334, 3_333, 3_333),
    "sun397": (397, 15_880, 3_970, 19_850),
    "dtd": (47, 2_820, 1_128, 1_692),
    "eurosat": (10, 13_500, 5_400, 8_100),
    "ucf101": (101, 7_639, 1_898, 3_783),
}
VARIANT_TESTS = {"imagenetv2": 10_000, "imagenet_sketch": 50_889, "imagenet_a": 7_500, "imagenet_r": 30_000}
SHOTS = (1, 2, 4, 8, 16)


def protocol_plan(width: int, seeds: int, views: int) -> BenchPlan:
    """The plan of the full protocol for a trunk of output ``width`` (nothing cached yet)."""
    settings = [
        ViewSetting(views, seed, sum(k * max(SHOTS) for k, *_ in DATASETS.values()), 0) for seed in range(seeds)
    ]
    plain = sum(VARIANT_TESTS.values())
    pack_rows = sum(VARIANT_TESTS.values())
    for k, train, val, test in DATASETS.values():
        if val:
            plain += min(train, k * max(SHOTS) * seeds) + min(val, k * max(SHOTS) * seeds) + test
        else:  # validation ranks N..2N-1 of train: ranks 0..2·16-1 per class and seed, training ranks included
            plain += min(train, 2 * k * max(SHOTS) * seeds) + test
        per_seed = sum(SHOTS) * k  # images in the draws of one seed, summed over N
        pack_rows += seeds * per_seed * (views + 2) + test  # training views, their plain view, validation
    settings.append(ViewSetting(0, 0, plain, 0))
    return BenchPlan(settings=settings, pack_rows=pack_rows, width=width, value_bytes=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["RN50", "ViT-B-16"], help="open_clip configs (random weights)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--views", type=int, default=300)
    parser.add_argument("--probe-images", type=int, default=4, help="images in the throughput probe (4 views each)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--processes", type=int, nargs="+", default=[8, 64], help="P values to print hours for")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; {args.seeds} seeds, {args.views} views")
    print(
        f"{'model':>10} {'width':>5} {'images':>9} {'passes':>12} {'disk GB':>8} {'(entries':>9} {'packs)':>7} "
        f"{'passes/s':>8} {'hours P=1':>10} " + " ".join(f"{f'hours P={p}':>11}" for p in args.processes)
    )
    for name in args.models:
        backbone = build_backbone(name, None, device="cpu")
        found = protocol_plan(backbone.projector.feature_width, args.seeds, args.views)
        found.passes_per_second = probe_throughput(backbone, images=args.probe_images)
        entries = sum(s.images * s.rows for s in found.settings) * found.width * found.value_bytes
        hours = [found.seconds(p) / 3600 for p in (1, *args.processes)]
        print(
            f"{name:>10} {found.width:>5} {found.images:>9} {found.passes:>12} {found.cache_bytes / 1e9:>8.0f} "
            f"{entries / 1e9:>9.0f} {(found.cache_bytes - entries) / 1e9:>7.0f} {found.passes_per_second:>8.2f} "
            + " ".join(f"{h:>10.1f}" if i == 0 else f"{h:>11.1f}" for i, h in enumerate(hours)),
            flush=True,
        )


if __name__ == "__main__":
    main()
