"""Peak memory of ``prolip bench`` over 1, 5 and 11 miniature datasets: it should not grow with their number.

The run holds one problem's features (one dataset, N and seed) and one test split's at a time, and
reads the rest from the feature cache; so its peak resident set size (``ru_maxrss`` of a fresh
``python -m prolip bench few-shot`` process, measured with ``os.wait4``) should be the same for 1,
5 and 11 datasets, while the features the run reads in all grow with the number of datasets.

The datasets are the miniature suite of :mod:`prolip.bench.data.mini_suite` (Fashion-MNIST under a
shift per dataset, 10 classes each) and the model is the packaged stand-in CLIP (width 128). The
stand-in extracts ~20 augmented views a second on 2 shared CPU cores, far too slow for 300 views of
every training image, so the setup writes seeded Gaussian noise into the feature cache for every
feature set the runs read (what extraction would write; memory does not depend on the values),
outside the measured processes. The measured runs then find every feature cached and train and
score every cell.

Run: ``.venv/bin/python benchmarks/bench_suite_memory.py`` (about 5 minutes on 2 CPU cores, ~1 GB
of temporary disk; needs Fashion-MNIST, which ``bash scripts/setup.sh`` installs).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import prolip.bench.store as store_module
from prolip import standin
from prolip.bench.data import PAPER_DATASETS
from prolip.bench.settings import plan
from prolip.bench.shards import extract_share
from prolip.bench.store import FeatureStore
from prolip.bench.workload import feature_requests
from prolip.model.backbone import build_backbone

METHODS = ["zero-shot", "prolip", "linear-probe"]


def make_suite(root: Path, train: int, val: int, test: int) -> None:
    """The miniature suite (:mod:`prolip.bench.data.mini_suite`) under ``root``."""
    from prolip.bench.data.mini_suite import make_suite as write_suite

    write_suite(root, seed=0, train=train, val=val, test=test)


def noise_fill(backbone, images, cache, *, hashes, rank=0, world_size=1, **_) -> list[str]:
    """Stands in for :func:`prolip.features.extract.fill_cache`: seeded noise for the images the cache lacks."""
    todo = [h for h in dict.fromkeys(hashes) if not cache.has(h)]
    for h in todo:
        gen = torch.Generator().manual_seed(int(h[:12], 16))
        cache.write(h, torch.randn(cache.rows, cache.width, generator=gen))
    return todo


def fill_with_noise(suite: Path, cache_dir: Path, shots: list[int], seeds: list[int], views: int) -> None:
    """Every feature set a few-shot run over all 11 datasets reads, as noise in the cache."""
    backbone = build_backbone(standin.MODEL_NAME, standin.PRETRAINED_TAG, device="cpu")
    store = FeatureStore(backbone, cache_dir, verbose=False)
    original, store_module.fill_cache = store_module.fill_cache, noise_fill
    try:
        jobs = plan("few-shot", suite, PAPER_DATASETS)
        extract_share(store, (r for job in jobs for r in feature_requests(job, shots, seeds, views, [0])), 0, 1)
    finally:
        store_module.fill_cache = original


def peak_rss_mb(command: list[str]) -> float:
    """Peak resident set size (MB) of a fresh process running ``command``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr.decode()[-2000:]}")
    return usage.ru_maxrss / 1024  # KB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 5, 11], help="numbers of datasets")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--views", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=20, help="training steps per fit")
    parser.add_argument(
        "--train", type=int, default=32, help="train images per class (ImageNet draws validation from them)"
    )
    parser.add_argument("--val", type=int, default=4, help="val images per class")
    parser.add_argument("--test", type=int, default=10, help="test images per class")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of the runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        suite, cache = Path(tmp) / "suite", Path(tmp) / "cache"
        make_suite(suite, args.train, args.val, args.test)
        fill_with_noise(suite, cache, args.shots, args.seeds, args.views)
        one = max(args.shots) * 10 * args.views * 128 * 4  # the largest training draw's views, float32
        print(f"{args.views} views, N = {args.shots}, seeds {args.seeds}, {len(METHODS)} methods, {args.epochs} steps")
        print(f"one dataset's largest training set in memory: {one / 2**20:.1f} MB")
        print(f"{'datasets':>8} {'cells':>6} {'features read MB':>16} {'peak RSS MB':>11}")
        for count in args.counts:
            names = list(PAPER_DATASETS[:count])
            command = [sys.executable, "-m", "prolip", "bench", "few-shot", "--data-root", str(suite), "--datasets",
                       *names, "--shots", *map(str, args.shots), "--seeds", *map(str, args.seeds), "--methods",
                       *METHODS, "--model", standin.MODEL_NAME, "--pretrained", standin.PRETRAINED_TAG, "--out-dir",
                       str(Path(tmp) / f"out-{count}"), "--cache-dir", str(cache), "--views", str(args.views),
                       "--epochs", str(args.epochs), "-q"]  # fmt: skip
            if args.threads:
                os.environ["OMP_NUM_THREADS"] = str(args.threads)
            rss = peak_rss_mb(command)
            read = count * len(args.seeds) * sum(args.shots) * 10 * args.views * 128 * 4
            cells = count * len(args.seeds) * len(args.shots) * len(METHODS)
            print(f"{count:>8} {cells:>6} {read / 2**20:>16.1f} {rss:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
