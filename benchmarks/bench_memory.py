"""Peak memory of a fit: all views in memory vs views streamed from the feature cache, at V=30 and V=300.

Each measurement runs in a fresh subprocess and reports its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and its baseline, the peak just before the
features exist (Python, torch, open_clip and the model). What the fit adds on top of the
baseline is the part that depends on V:

* in memory: ``fit_features`` on a float32 ``[V, n, d]`` tensor, as ``extract_features`` returns
  without a cache; grows with V·n·d;
* cached: ``fit_features`` on :class:`prolip.features.cache.CachedFeatures`, one ``[n, d]`` view read per
  step; should not grow with V.

The features are synthetic (seeded Gaussian noise written straight into a cache, and the same
shape generated in memory): extracting V=300 views of enough images for the V·n·d term to
dominate would take far longer than the fit on 2 CPU cores, and memory does not depend on the
values. The cache's view-major pack is built during setup, outside the measured processes. The
model is open_clip ViT-B-32 with random weights (d = 768), no download needed.

Run: ``.venv/bin/python benchmarks/bench_memory.py`` (about 2 minutes on 2 CPU cores, ~1 GB of
temporary disk).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import torch

CLASSES = [f"class {k}" for k in range(10)]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def adapter(args: argparse.Namespace, cache_dir: str | None = None):
    """The adapter every measurement uses (fixed seed, CPU, the paper's 300 steps by default)."""
    from prolip import ProLIPAdapter

    torch.manual_seed(0)  # the same random weights in every process, so the cache key matches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no pretrained weights": random weights are intended
        model = ProLIPAdapter(
            args.model, None, epochs=args.epochs, device="cpu", verbose=False, random_state=0, cache_dir=cache_dir
        )
        model.backbone  # build it now, outside any measurement  # noqa: B018
    return model


def cached_features(args: argparse.Namespace, views: int, cache_dir: str, build: bool):
    """Synthetic features of ``args.images`` images in the cache (written if ``build``), as CachedFeatures."""
    from prolip.features.extract import feature_cache

    model = adapter(args, cache_dir)
    cache = feature_cache(model.backbone, cache_dir, views=views, seed=0)
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(args.images)]  # as if image hashes
    if build:
        gen = torch.Generator().manual_seed(views)
        for h in hashes:
            if not cache.has(h):
                cache.write(h, torch.randn(views, cache.width, generator=gen))
    return model, cache.features(hashes)


def child(args: argparse.Namespace) -> None:
    """One measurement: print a JSON line with the baseline and peak RSS of one fit."""
    labels = [CLASSES[i % len(CLASSES)] for i in range(args.images)]
    if args.mode == "setup":
        _, features = cached_features(args, args.views, args.cache_dir, build=True)
        features[0]  # builds the view-major pack now, not in a measured run
        return
    if args.mode == "cached":
        model, features = cached_features(args, args.views, args.cache_dir, build=False)
        baseline = peak_rss_mb()
    else:
        model = adapter(args)
        baseline = peak_rss_mb()
        d = model.backbone.projector.in_features
        features = torch.randn(args.views, args.images, d, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    model.fit_features(features, labels)
    seconds = time.perf_counter() - start
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak_rss_mb(), "fit_s": seconds, "d": features.shape[-1]}))


def run_child(args: argparse.Namespace, mode: str, views: int, cache_dir: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", mode, "--views-child", str(views), "--cache-dir", cache_dir]
    command += ["--images", str(args.images), "--epochs", str(args.epochs), "--model", args.model]
    # One thread: fit times stay comparable on a shared machine (memory does not depend on it).
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{mode} V={views} failed:\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="training images n (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=300, help="training steps (default: %(default)s)")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model, random weights (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default: %(default)s)")
    parser.add_argument("--child", choices=["setup", "memory", "cached"], help=argparse.SUPPRESS)
    parser.add_argument("--views-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode, args.views = args.child, args.views_child
        child(args)
        return

    results: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="prolip-bench-memory-") as cache_dir:
        for views in (30, 300):
            run_child(args, "setup", views, cache_dir)
        for views in (30, 300):
            for mode in ("memory", "cached"):
                results[mode, views] = run_child(args, mode, views, cache_dir)
    d = int(results["memory", 30]["d"])
    print(
        f"fit of n={args.images} images, d={d}, {args.epochs} steps, {args.model} (random weights), "
        f"CPU, {args.threads} thread(s); synthetic features"
    )
    print(f"{'features':<10} {'V':>4} {'baseline MiB':>13} {'peak MiB':>9} {'added MiB':>10} {'fit s':>6}")
    for (mode, views), r in results.items():
        added = r["peak_mb"] - r["baseline_mb"]
        print(f"{mode:<10} {views:>4} {r['baseline_mb']:>13.0f} {r['peak_mb']:>9.0f} {added:>10.0f} {r['fit_s']:>6.1f}")
    for mode in ("memory", "cached"):
        lo, hi = results[mode, 30], results[mode, 300]
        ratio = hi["peak_mb"] / lo["peak_mb"]
        added = (hi["peak_mb"] - hi["baseline_mb"]) / max(lo["peak_mb"] - lo["baseline_mb"], 1.0)
        print(f"{mode}: peak RSS V=300 / V=30 = {ratio:.2f}x; memory added by the fit, V=300 / V=30 = {added:.1f}x")


if __name__ == "__main__":
    main()
