"""The device check: everything a GPU user of prolip depends on, measured in one command, in one table and one JSON.

Six parts, each timed against its budget (seconds on one H100-class GPU; ``--tiny`` has its own, for 2 CPU cores),
random weights throughout (``pretrained=None``: speed does not depend on the weights, and none can be downloaded):

* **extraction**: ``ProLIPAdapter.extract_features`` at 300 views, images per second, against open_clip's
  ``encode_image`` on as many ready-made pixels at the same precision (ratio), for fp32, fp16 and bf16, on
  ViT-B-16 and RN50 at 224 px; peak GPU memory; each precision's features against fp32's (relative error).
* **training**: one 300-step fit (``train_projector``) at K = 10, 100 and 1000 (n = 16K, ViT-B's 768 × 512
  projector) against its floor (the step's four matrix products, ``benchmarks/bench_training.py``'s
  ``matmul_floor``) and the floor plus one fused Adam pass; the floor captured in CUDA graphs (public
  ``torch.cuda.graph``, a capturable fused Adam); the fit with its features in pageable and in pinned host memory.
* **grid**: the paper's 49-point validation search (``search_projector``) against the 49 fits one by one.
* **test_time**: test-time ProLIP per image (``TestTimeProLIP.predict``, 64 views, 1000 classes) against one
  trunk pass over the same number of views.
* **correctness**: a fit on the device equals the same fit on the CPU (W, probabilities, labels);
  ``merged_model()`` on the device reproduces the adapter; ONNX and pt2 files exported from the device's adapter
  give its ``predict_proba``. Each with its measured maximum difference, its tolerance and pass/fail.
* **torchrun**: a tiny ``prolip bench few-shot`` on the miniature suite under ``torchrun --nproc_per_node=1``
  (NCCL on CUDA, Gloo otherwise) gives the cells of the single-process run.

Timings are best of a few interleaved rounds after one untimed warm-up (``benchmarks/timing.py``); every ratio
comes from one run. What cannot run on the device (CUDA graphs, pinned memory and peak GPU memory on a CPU) is
recorded as null with a ``skipped`` reason, never as a number. The JSON is rewritten after every part, so a run
cut short keeps what it measured. The exit status is 1 if a part failed or a check did not pass.

Run (docs/performance.md, "GPU", says what each figure means and what to expect):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/device_check.py --device cuda --json build/device_check.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/device_check.py --device cpu --tiny --json out.json  # tiny sizes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from bench_search import contenders, grid_problem
from bench_training import D_IN, D_OUT, floor_step, matmul_floor
from timing import best_of

import prolip
from prolip import ProLIPAdapter, standin
from prolip.errors import TrainingWarning
from prolip.features.views import plain_views
from prolip.model.backbone import build_backbone
from prolip.model.head import LinearHead
from prolip.training.engine import TrainConfig, train_projector
from prolip.variants.search import PAPER_LAMBDAS, PAPER_LRS
from prolip.variants.test_time import TestTimeProLIP

REPO = Path(__file__).resolve().parents[1]
PARTS = ("extraction", "training", "grid", "test_time", "correctness", "torchrun")
LOGIT_SCALE = 100.0  # the training benchmarks' s (bench_training.py, bench_search.py)
# Tolerances of the correctness checks. On this CPU an fp32 fit of ViT-B's projector (300 steps) differs from
# the same fit in float64 by 1.2e-7 in W and 1e-6 in probabilities: another device's fp32 kernels (other
# reduction orders) should stay within these, 80x and 100x that; TF32 is switched off for the checks.
WEIGHT_TOLERANCE = 1e-5
PROBABILITY_TOLERANCE = 1e-4  # as tests/test_export.py: the exported graph reorders fp32 ops


@dataclass(frozen=True)
class Sizes:
    """What each part runs: the real sizes (default) or ``--tiny`` ones that prove the script runs on a CPU."""

    extraction_models: tuple[tuple[str, int], ...]  # open_clip config and image size (force_image_size)
    extraction_images: int
    extraction_views: int
    extraction_batch: int
    image_shape: tuple[int, int]  # of the random uint8 images the views are rendered from
    classes: tuple[int, ...]
    shots: int
    train_views: int
    steps: int
    grid_classes: int
    grid_shots: int
    grid_steps: int
    grid_repeats: int
    test_time_model: tuple[str, int]
    test_time_precision: str
    test_time_images: int
    test_time_views: int
    test_time_classes: int
    check_model: tuple[str, str | None]  # name and pretrained tag
    check_classes: int
    check_shots: int
    check_views: int
    check_epochs: int
    check_images: int
    repeats: int
    budgets: dict[str, float]  # seconds per part: one H100-class GPU (real sizes), 2 CPU cores (tiny)


FULL = Sizes(
    extraction_models=(("ViT-B-16", 224), ("RN50", 224)),
    extraction_images=4, extraction_views=300, extraction_batch=256, image_shape=(256, 320),
    classes=(10, 100, 1000), shots=16, train_views=4, steps=300,
    grid_classes=10, grid_shots=16, grid_steps=300, grid_repeats=2,
    test_time_model=("ViT-B-16", 224), test_time_precision="fp16", test_time_images=8, test_time_views=64,
    test_time_classes=1000,
    check_model=("ViT-B-16", None), check_classes=10, check_shots=16, check_views=4, check_epochs=300, check_images=4,
    repeats=3,
    budgets={"extraction": 60, "training": 35, "grid": 20, "test_time": 15, "correctness": 60, "torchrun": 40},
)  # fmt: skip
TINY = Sizes(
    extraction_models=(("ViT-S-32", 64), ("RN50", 32)),
    extraction_images=1, extraction_views=2, extraction_batch=2, image_shape=(80, 100),
    classes=(10, 100, 1000), shots=1, train_views=2, steps=3,
    grid_classes=3, grid_shots=2, grid_steps=2, grid_repeats=1,
    test_time_model=("ViT-S-32", 64), test_time_precision="fp32", test_time_images=1, test_time_views=4,
    test_time_classes=3,
    check_model=(standin.MODEL_NAME, standin.PRETRAINED_TAG), check_classes=3, check_shots=2, check_views=2,
    check_epochs=5, check_images=2,
    repeats=1,
    budgets={"extraction": 30, "training": 10, "grid": 10, "test_time": 15, "correctness": 30, "torchrun": 40},
)  # fmt: skip


class Table:
    """The printed table: one row per figure, in the order the parts measure them."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, part: str, figure: str, value: str, note: str = "") -> None:
        """Add a row and print it at once, so a long run shows progress."""
        self.rows.append((part, figure, value, note))
        print(f"  {figure}: {value}  {note}".rstrip(), flush=True)

    def render(self) -> str:
        """The whole table as fixed-width text."""
        header = ("part", "figure", "value", "note")
        widths = [max(len(r[i]) for r in [header, *self.rows]) for i in range(3)]
        lines = [
            f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip()
            for r in [header, *self.rows]
        ]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators for a block (random model weights), restoring them after: a caller running
    this script in its own process keeps its random state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off for matrix products and cuDNN convolutions in a block (restored after): the correctness checks
    compare fp32 on two devices, which TF32's 10-bit mantissa would blur."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def random_images(count: int, shape: tuple[int, int], seed: int) -> list[torch.Tensor]:
    """``count`` random uint8 RGB images ``[3, H, W]`` (content does not change speed)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, *shape), dtype=torch.uint8, generator=gen) for _ in range(count)]


def random_model(name: str, size: int, device: torch.device) -> torch.nn.Module:
    """An open_clip model with seeded random weights at ``size`` px, on the CPU in fp32."""
    with seeded(0, device):
        return open_clip.create_model(name, pretrained=None, force_image_size=size)


def peak_bytes(device: torch.device, run: Callable[[], object]) -> tuple[Any, int | None]:
    """``run()``'s result and the peak GPU memory allocated while it ran (None on a CPU: no such counter)."""
    if device.type != "cuda":
        return run(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = run()
    torch.cuda.synchronize(device)
    return out, torch.cuda.max_memory_allocated(device)


def release(device: torch.device) -> None:
    """Return cached GPU blocks between models, so each part's peak is its own."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def max_difference(a: Any, b: Any) -> float:
    """max |a − b| over two arrays or tensors, in float64."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def check(difference: float, tolerance: float, what: str, **extra: Any) -> dict[str, Any]:
    """One correctness check's record: its measured maximum difference, its tolerance, pass/fail."""
    return {"what": what, "max_abs_difference": difference, "tolerance": tolerance,
            "passed": bool(difference <= tolerance), **extra}  # fmt: skip


def gigabytes(value: int | None) -> str:
    """Bytes as GB text, or a dash."""
    return "-" if value is None else f"{value / 1e9:.2f} GB"


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, numpy scalars as Python ones and non-finite floats as None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------- extraction
def extraction(device: torch.device, sizes: Sizes, table: Table) -> dict[str, Any]:
    """extract_features against encode_image at each precision, for each model."""
    images = random_images(sizes.extraction_images, sizes.image_shape, seed=0)
    passes = len(images) * sizes.extraction_views
    section: dict[str, Any] = {
        "views": sizes.extraction_views, "images": len(images), "passes": passes,
        "batch_size": sizes.extraction_batch, "image_shape": [3, *sizes.image_shape], "models": {},
    }  # fmt: skip
    for name, size in sizes.extraction_models:
        base = random_model(name, size, device)
        entries, reference = {}, None
        for precision in ("fp32", "fp16", "bf16"):
            try:
                entry, features = _extraction_at(base, precision, images, sizes, device)
                release(device)  # the copy's blocks, so that the next precision's peak is its own
            except RuntimeError as exc:
                if device.type == "cuda" or precision == "fp32":
                    raise
                # Some CPU kernels lack half-precision versions: a CPU fact, not a GPU one.
                entries[precision] = {"skipped": f"{type(exc).__name__} on the CPU: {str(exc)[:200]}"}
                table.add("extraction", f"{name} {precision}", "skipped", entries[precision]["skipped"])
                continue
            if reference is None:
                reference = features.double()
            entry["feature_relative_error_vs_fp32"] = float(
                torch.linalg.vector_norm(features.double() - reference) / torch.linalg.vector_norm(reference)
            )
            entries[precision] = entry
            peak = entry["peak_memory"]
            table.add(
                "extraction", f"{name}@{size} {precision} extract_features", f"{entry['extract_images_per_s']:.1f} img/s",
                f"{entry['ratio']:.2f} x encode_image ({entry['encode_images_per_s']:.1f} img/s); peak "
                f"{gigabytes(peak['extract_features_bytes'])}; features vs fp32 "
                f"{entry['feature_relative_error_vs_fp32']:.1e}",
            )  # fmt: skip
        section["models"][name] = {"image_size": size, "precisions": entries}
    return section


def _extraction_at(
    base: torch.nn.Module, precision: str, images: list[torch.Tensor], sizes: Sizes, device: torch.device
) -> tuple[dict[str, Any], torch.Tensor]:
    """One precision's figures and the features it extracted (a copy of ``base`` cast and moved)."""
    adapter = ProLIPAdapter(
        copy.deepcopy(base), None, views=sizes.extraction_views, batch_size=sizes.extraction_batch, device=device,
        precision=precision, random_state=0, verbose=False,
    )  # fmt: skip
    backbone = adapter.backbone
    model_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    # The first call is the warm-up, its peak the extraction's memory; its features are compared across precisions.
    features, extract_peak = peak_bytes(device, lambda: adapter.extract_features(images))
    # As many ready-made pixels as extract_features renders views (the same count and shape; content is irrelevant).
    pixels = plain_views([im.to(device) for im in images], backbone.view_config).to(backbone.dtype)
    pixels = pixels.repeat(sizes.extraction_views, 1, 1, 1)

    def encode() -> None:
        with torch.inference_mode():
            for start in range(0, len(pixels), sizes.extraction_batch):
                backbone.model.encode_image(pixels[start : start + sizes.extraction_batch])

    _, encode_peak = peak_bytes(device, encode)
    runs = {"encode_image": encode, "extract_features": lambda: adapter.extract_features(images)}
    seconds = best_of(runs, sizes.repeats, device)
    rate = {name: len(pixels) / s for name, s in seconds.items()}
    entry = {
        "extract_images_per_s": rate["extract_features"], "encode_images_per_s": rate["encode_image"],
        "ratio": rate["extract_features"] / rate["encode_image"], "seconds": seconds,
        "peak_memory": {
            "model_bytes": model_bytes, "extract_features_bytes": extract_peak, "encode_image_bytes": encode_peak,
            "skipped": None if device.type == "cuda" else "the CPU has no peak-memory counter in torch",
        },
    }  # fmt: skip
    return entry, features


# ---------------------------------------------------------------------------- training
class GraphedSteps:
    """``steps`` replays of CUDA graphs captured one per view, holding every tensor the graphs read or write: memory
    allocated outside a capture is the caching allocator's, and would be reused by others once freed."""

    def __init__(self, graphs: list[torch.cuda.CUDAGraph], steps: int, tensors: tuple[Any, ...]) -> None:
        self.graphs, self.steps, self.tensors = graphs, steps, tensors

    def __call__(self) -> None:
        """Replay the steps (step t on view t mod V)."""
        for t in range(self.steps):
            self.graphs[t % len(self.graphs)].replay()


def graphed_floor(
    features: torch.Tensor, classifier: torch.Tensor, w0: torch.Tensor, steps: int, adam: bool
) -> GraphedSteps:
    """:func:`matmul_floor`'s ``steps`` steps replayed from CUDA graphs, one captured per view.

    CUDA graphs need every buffer, and an optimiser whose state lives on the device (``capturable=True``), to exist
    before capture, so the step is built and warmed up here (untimed, on a side stream, as torch's documentation
    prescribes) and the result only replays. The learning rate is constant, as in ``matmul_floor``.
    """
    dev = w0.device
    step, buffers = floor_step(features.shape[1], classifier, w0, adam, capturable=True)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for x in features:  # Adam's state and cuBLAS's workspaces exist before capture
            step(x)
    torch.cuda.current_stream(dev).wait_stream(side)
    pool = torch.cuda.graph_pool_handle()
    graphs = []
    for x in features:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step(x)
        graphs.append(graph)
    return GraphedSteps(graphs, steps, (features, classifier, step, *buffers))  # kept alive for the replays


def step_flops(n: int, k: int) -> int:
    """FLOPs of a step's four products: x·W and xᵀ·dz (2·n·d_in·d_out each), u·Tᵀ and dlogits·T (2·n·d_out·K each)."""
    return 4 * n * D_OUT * (D_IN + k)


ADAM_BYTES = 7 * D_IN * D_OUT * 4  # fused Adam reads W, grad, m, v and writes W, m, v: seven fp32 passes over W


def training(device: torch.device, sizes: Sizes, table: Table) -> dict[str, Any]:
    """A fit against its floor at each K, eager and graph-captured, features on the device and in host memory."""
    section: dict[str, Any] = {"d_in": D_IN, "d_out": D_OUT, "shots": sizes.shots, "views": sizes.train_views,
                               "steps": sizes.steps, "sizes": {}}  # fmt: skip
    for k in sizes.classes:
        section["sizes"][str(k)] = entry = _training_at(k, device, sizes)
        release(device)
        s, steps = entry["seconds"], sizes.steps
        table.add(
            "training", f"K={k} n={entry['n']} prolip", f"{s['prolip']:.4f} s",
            f"{entry['prolip_over_floor']:.2f} x floor, {entry['prolip_over_floor_adam']:.2f} x floor+adam; "
            f"floor {entry['floor_tflops']:.3g} TFLOP/s; {entry['overhead_us_per_step']:.0f} us/step above floor+adam",
        )  # fmt: skip
        graph = entry["graph"]
        if graph["skipped"]:
            table.add("training", f"K={k} CUDA graph", "skipped", graph["skipped"])
        else:
            table.add(
                "training", f"K={k} floor+adam graphed", f"{graph['floor_adam_seconds']:.4f} s",
                f"eager/graphed {graph['eager_over_graphed_floor_adam']:.2f}; prolip / graphed floor+adam "
                f"{graph['prolip_over_graphed_floor_adam']:.2f}; floor eager/graphed {graph['eager_over_graphed_floor']:.2f}",
            )  # fmt: skip
        host = entry["host_features"]
        if host["skipped"]:
            table.add("training", f"K={k} host features", "skipped", host["skipped"])
        else:
            table.add(
                "training", f"K={k} features in host memory", f"{host['pageable_over_device']:.2f} x",
                f"pageable / on device; pinned / on device {host['pinned_over_device']:.2f} x ({steps} views of "
                f"{gigabytes(host['view_bytes'])} copied)",
            )  # fmt: skip
    return section


def _training_at(k: int, device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """One K's timings and ratios."""
    gen = torch.Generator().manual_seed(k)
    n, steps = sizes.shots * k, sizes.steps
    features = torch.randn(sizes.train_views, n, D_IN, generator=gen).to(device)
    labels = (torch.arange(n) % k).to(device)
    classifier = F.normalize(torch.randn(k, D_OUT, generator=gen), dim=-1).to(device)
    w0 = (torch.randn(D_IN, D_OUT, generator=gen) / math.sqrt(D_IN)).to(device)
    config = TrainConfig(logit_scale=LOGIT_SCALE, lr=1e-3, reg_lambda=1 / sizes.shots, epochs=steps, device=device)
    runs: dict[str, Callable[[], object]] = {
        "floor": lambda: matmul_floor(features, classifier, w0, steps),
        "floor+adam": lambda: matmul_floor(features, classifier, w0, steps, adam=True),
        "prolip": lambda: train_projector(features, labels, LinearHead(w0), classifier, config),
    }
    graph_skipped = host_skipped = None
    if device.type != "cuda":
        graph_skipped = "CUDA graphs need a CUDA device"
        host_skipped = "the features are already in host memory, where training runs"
    else:
        try:
            runs["floor graphed"] = graphed_floor(features, classifier, w0, steps, adam=False)
            runs["floor+adam graphed"] = graphed_floor(features, classifier, w0, steps, adam=True)
        except Exception as exc:  # capture may fail on some driver/torch pairs: that is the finding
            graph_skipped = f"capture failed: {type(exc).__name__}: {str(exc)[:300]}"
        # What ProLIPAdapter.fit on a GPU does: features extracted into (pageable) CPU memory, one view copied per step.
        pageable, pinned = features.cpu(), features.cpu().pin_memory()
        runs["prolip host pageable"] = lambda: train_projector(pageable, labels, LinearHead(w0), classifier, config)
        runs["prolip host pinned"] = lambda: train_projector(pinned, labels, LinearHead(w0), classifier, config)
    for run in runs.values():  # warm-up: cuBLAS handles, allocator, the fused kernels' first launch
        run()
    s = best_of(runs, sizes.repeats, device)
    flops = step_flops(n, k)
    adam_seconds = (s["floor+adam"] - s["floor"]) / steps
    entry: dict[str, Any] = {
        "n": n, "steps": steps, "step_gflop": flops / 1e9, "seconds": s,
        "prolip_over_floor": s["prolip"] / s["floor"], "prolip_over_floor_adam": s["prolip"] / s["floor+adam"],
        "floor_tflops": flops * steps / s["floor"] / 1e12,
        "adam_us_per_step": 1e6 * adam_seconds,
        "adam_gbytes_per_s": ADAM_BYTES / adam_seconds / 1e9 if adam_seconds > 0 else None,
        "overhead_us_per_step": 1e6 * (s["prolip"] - s["floor+adam"]) / steps,
    }  # fmt: skip
    graphed = not graph_skipped
    entry["graph"] = {
        "floor_seconds": s["floor graphed"] if graphed else None,
        "floor_adam_seconds": s["floor+adam graphed"] if graphed else None,
        "eager_over_graphed_floor": s["floor"] / s["floor graphed"] if graphed else None,
        "eager_over_graphed_floor_adam": s["floor+adam"] / s["floor+adam graphed"] if graphed else None,
        "prolip_over_graphed_floor_adam": s["prolip"] / s["floor+adam graphed"] if graphed else None,
        # The engine's own step cannot be captured through its public API: its learning rate is a Python float per
        # step and its first step builds the optimiser's state on the host. The captured floor is what capture could
        # reach.
        "prolip_graphed": None,
        "prolip_graphed_skipped": "train_projector has no capturable step (per-step Python learning rate)",
        "skipped": graph_skipped,
    }  # fmt: skip
    hosted = not host_skipped
    entry["host_features"] = {
        "view_bytes": n * D_IN * 4,
        "pageable_over_device": s["prolip host pageable"] / s["prolip"] if hosted else None,
        "pinned_over_device": s["prolip host pinned"] / s["prolip"] if hosted else None,
        "skipped": host_skipped,
    }  # fmt: skip
    return entry


# ---------------------------------------------------------------------------- grid
def grid(device: torch.device, sizes: Sizes, table: Table) -> dict[str, Any]:
    """The 49-point search against the 49 fits one by one, on the same features (bench_search.py's comparison)."""
    k = sizes.grid_classes
    problem = grid_problem(k, sizes.grid_shots, sizes.train_views, device)
    fits, search = contenders(*problem, TrainConfig(logit_scale=LOGIT_SCALE, epochs=sizes.grid_steps, device=device))
    search()  # warm-up
    s = best_of({"fits": fits, "search": search}, sizes.grid_repeats, device)
    points = len(PAPER_LRS) * len(PAPER_LAMBDAS)
    section = {"classes": k, "shots": sizes.grid_shots, "steps": sizes.grid_steps, "points": points,
               "fits_seconds": s["fits"], "search_seconds": s["search"], "ratio": s["search"] / s["fits"]}  # fmt: skip
    table.add("grid", f"{points}-point search, K={k} N={sizes.grid_shots}", f"{s['search']:.3f} s",
              f"{section['ratio']:.3f} x the {points} single fits ({s['fits']:.3f} s)")  # fmt: skip
    return section


# ---------------------------------------------------------------------------- test-time
def test_time(device: torch.device, sizes: Sizes, table: Table) -> dict[str, Any]:
    """Test-time ProLIP per image against the trunk on the same number of views (bench_test_time.py's comparison)."""
    name, size = sizes.test_time_model
    backbone = build_backbone(
        random_model(name, size, device), None, precision=sizes.test_time_precision, device=device
    )
    views, batch = sizes.test_time_views, 64
    names = [f"class {i}" for i in range(sizes.test_time_classes)]
    tt = TestTimeProLIP(backbone, names, views=views, batch_size=batch)
    images = random_images(sizes.test_time_images, sizes.image_shape, seed=1)
    pixels = plain_views([im.to(device) for im in images], backbone.view_config).to(backbone.dtype)
    pixels = pixels.repeat(views, 1, 1, 1)
    features = tt.extract_features(images)  # stored for "adapt" (and a warm-up)

    def trunk() -> None:
        with torch.inference_mode():
            for start in range(0, len(pixels), batch):
                backbone.projector.features(pixels[start : start + batch])

    runs = {
        "trunk": trunk,
        "views": lambda: tt.extract_features(images),
        "test-time": lambda: tt.predict(images),
        "adapt": lambda: tt.logits_from_features(features),
    }
    for run in runs.values():
        run()
    s = best_of(runs, sizes.repeats, device)
    per_image_ms = {what: 1e3 * seconds / len(images) for what, seconds in s.items()}
    section = {
        "model": name, "image_size": size, "precision": sizes.test_time_precision, "images": len(images),
        "views": views, "classes": len(names), "per_image_ms": per_image_ms,
        "throughput_vs_trunk": s["trunk"] / s["test-time"], "throughput_vs_views": s["views"] / s["test-time"],
        "trunk_share": s["trunk"] / (s["trunk"] + s["adapt"]),
    }  # fmt: skip
    table.add(
        "test_time", f"{name}@{size} {sizes.test_time_precision}, {views} views, K={len(names)}",
        f"{per_image_ms['test-time']:.1f} ms/image",
        f"trunk {per_image_ms['trunk']:.1f} ms/image: throughput {section['throughput_vs_trunk']:.3f} x trunk, "
        f"{section['throughput_vs_views']:.3f} x views; adapt {per_image_ms['adapt']:.2f} ms/image",
    )  # fmt: skip
    return section


# ---------------------------------------------------------------------------- correctness
def correctness(device: torch.device, sizes: Sizes, table: Table) -> dict[str, Any]:
    """The device's fit against the CPU's, the merged model against the adapter, exported files against predict_proba."""
    name, pretrained = sizes.check_model
    with strict_fp32(), warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        with seeded(0, device):  # random weights for a model without a tag
            base = build_backbone(name, pretrained, device="cpu").model
        common = {"epochs": sizes.check_epochs, "views": sizes.check_views, "random_state": 0, "verbose": False}
        cpu = ProLIPAdapter(copy.deepcopy(base), None, device="cpu", **common)
        dev = ProLIPAdapter(copy.deepcopy(base), None, device=device, **common)
        section = {"model": name, "pretrained": pretrained, "tf32": "off during the checks",
                   "fit_device_vs_cpu": _fit_check(cpu, dev, sizes)}  # fmt: skip
        images = random_images(sizes.check_images, sizes.image_shape, seed=2)
        expected = dev.predict_proba(images)
        pixels = plain_views([im.to(device) for im in images], dev.backbone.view_config)  # what predict_proba sees
        section["merged_model"] = _merged_check(dev, pixels, expected)
        for fmt in ("onnx", "pt2"):
            section[f"export_{fmt}"] = _export_check(dev, fmt, pixels.cpu(), expected)
    for what in ("fit_device_vs_cpu", "merged_model", "export_onnx", "export_pt2"):
        entry = section[what]
        if entry.get("skipped"):
            table.add("correctness", what, "skipped", entry["skipped"])
            continue
        note = f"max |diff| {entry['max_abs_difference']:.2e} (tolerance {entry['tolerance']:.0e}) {entry['what']}"
        if what == "fit_device_vs_cpu":
            p = entry["probabilities"]
            note += f"; probabilities {p['max_abs_difference']:.2e} ({p['tolerance']:.0e}); labels equal {entry['labels_equal']}"
        table.add("correctness", what, "pass" if entry["passed"] else "FAIL", note)
    return section


def _fit_check(cpu: ProLIPAdapter, dev: ProLIPAdapter, sizes: Sizes) -> dict[str, Any]:
    """The same fit on both adapters (the same features): W, then probabilities and labels on test features."""
    gen = torch.Generator().manual_seed(3)
    k, n = sizes.check_classes, sizes.check_classes * sizes.check_shots
    width = cpu.backbone.projector.feature_width
    features = torch.randn(sizes.check_views, n, width, generator=gen)
    labels = [f"class {i % k}" for i in range(n)]
    test = torch.randn(1, 4 * n, width, generator=gen)
    cpu.fit_features(features, labels)
    dev.fit_features(features, labels)
    weight = max_difference(dev.delta_.cpu(), cpu.delta_.cpu())
    probabilities = max_difference(
        torch.softmax(dev.logits_from_features(test), -1), torch.softmax(cpu.logits_from_features(test), -1)
    )
    labels_equal = bool((dev.predict_features(test) == cpu.predict_features(test)).all())
    entry = check(weight, WEIGHT_TOLERANCE, "W - W0 on the device vs the CPU")
    entry["probabilities"] = check(probabilities, PROBABILITY_TOLERANCE, "test probabilities")
    entry |= {"labels_equal": labels_equal, "max_abs_delta": float(dev.delta_.abs().max()),
              "devices": [str(dev.backbone.device), str(cpu.backbone.device)]}  # fmt: skip
    entry["passed"] = entry["passed"] and entry["probabilities"]["passed"] and labels_equal
    return entry


def _merged_check(dev: ProLIPAdapter, pixels: torch.Tensor, expected: np.ndarray) -> dict[str, Any]:
    """merged_model()'s encode_image through the fitted classifier, against predict_proba; and W0's, for scale."""
    state = dev.fitted_
    classes = torch.as_tensor(state.classifier).to(pixels.device, torch.float32)

    def probabilities(model: torch.nn.Module) -> np.ndarray:
        with torch.inference_mode():
            z = F.normalize(model.encode_image(pixels).float(), dim=-1)
            return torch.softmax(state.logit_scale * z @ classes.t(), dim=-1).cpu().numpy()

    merged = dev.merged_model()
    entry = check(max_difference(probabilities(merged), expected), PROBABILITY_TOLERANCE,
                  "merged_model() probabilities vs predict_proba")  # fmt: skip
    # How far W0 alone is from the adapter: a check that passes with W0 would prove nothing.
    entry["adaptation_effect"] = max_difference(probabilities(dev.backbone.model), expected)
    entry["device"] = str(next(merged.parameters()).device)
    return entry


def _export_check(dev: ProLIPAdapter, fmt: str, pixels: torch.Tensor, expected: np.ndarray) -> dict[str, Any]:
    """The file exported from the device's adapter, run on the CPU (onnxruntime, or the torch.export program)."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError as exc:
            return {"skipped": f"onnxruntime is not installed ({exc}); pip install 'prolip[export]'", "passed": None}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path, _ = dev.export(Path(tmp) / f"classifier.{fmt}", fmt)
        seconds = time.perf_counter() - start
        size = path.stat().st_size
        if fmt == "onnx":
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            (name,) = [i.name for i in session.get_inputs()]
            out = session.run(None, {name: pixels.numpy()})[0]
        else:  # a file this script has just written
            program = torch.export.load(path).module()
            with torch.no_grad():
                out = program(pixels).numpy()
    entry = check(max_difference(out, expected), PROBABILITY_TOLERANCE, f"{fmt} on the CPU vs predict_proba")
    return entry | {"export_seconds": seconds, "file_bytes": size}


# ---------------------------------------------------------------------------- torchrun
def torchrun(device: torch.device, sizes: Sizes, table: Table) -> dict[str, Any]:
    """A tiny ``prolip bench`` in one process and under torchrun (one process), and whether their cells agree."""
    from prolip.bench.data import mini_suite

    backend = "nccl" if torch.cuda.is_available() else "gloo"  # prolip.variants.distributed.init_distributed's rule
    section: dict[str, Any] = {"backend": backend, "nproc_per_node": 1, "device": device.type}
    try:
        mini_suite.load_fashion_mnist("test")
    except FileNotFoundError as exc:
        section |= {"skipped": f"the miniature suite needs Fashion-MNIST: {str(exc)[:300]}", "passed": None}
        table.add("torchrun", f"{backend}, 1 process", "skipped", section["skipped"])
        return section
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mini_suite.make_suite(root / "suite", seed=0, train=4, val=3, test=3)
        (root / "templates.txt").write_text("a photo of a {}.\n")
        args = ["bench", "few-shot", "--data-root", str(root / "suite"), "--datasets", "dtd", "eurosat",
                "--shots", "1", "--seeds", "1", "--methods", "zero-shot", "prolip", "linear-probe",
                "--model", standin.MODEL_NAME, "--pretrained", standin.PRETRAINED_TAG, "--views", "2",
                "--epochs", "5", "--templates", str(root / "templates.txt"), "--device", device.type]  # fmt: skip
        # prolip from this checkout, installed or not; one thread per process; NCCL says when it starts.
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "NCCL_DEBUG": "VERSION"}
        one, single_seconds, _ = _bench([sys.executable, "-m", "prolip", *args], root / "one", env)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        two, torchrun_seconds, log = _bench([*launcher, "-m", "prolip", *args], root / "two", env)
    joined = re.search(r"joined process group: rank 0 of 1 on (\S+)", log)
    confirmed = joined is not None and (backend != "nccl" or "NCCL version" in log)
    differences = [abs(two[key]["accuracy"][d] - cell["accuracy"][d]) for key, cell in one.items() if key in two
                   for d in cell["accuracy"]]  # fmt: skip
    equal = set(one) == set(two) and all(two[key]["info"] == cell["info"] for key, cell in one.items())
    equal = equal and all(d <= 1e-9 for d in differences)
    section |= {
        "joined_on": joined.group(1) if joined else None, "backend_confirmed": confirmed, "cells": len(one),
        "cells_equal": equal, "max_accuracy_difference": max(differences, default=None),
        "single_process_seconds": single_seconds, "torchrun_seconds": torchrun_seconds,
        "passed": bool(equal and confirmed and len(one) > 0), "skipped": None,
    }  # fmt: skip
    table.add(
        "torchrun", f"{backend}, 1 process, {len(one)} cells", "pass" if section["passed"] else "FAIL",
        f"cells equal to one process: {equal}; joined on {section['joined_on']}; backend seen in the log: {confirmed}",
    )  # fmt: skip
    return section


def _bench(command: list[str], out: Path, env: dict[str, str]) -> tuple[dict[tuple, dict], float, str]:
    """Run one ``prolip bench`` into ``out``: its cells by (dataset, shots, seed, method), seconds and log."""
    start = time.perf_counter()
    done = subprocess.run([*command, "--out-dir", str(out)], env=env, capture_output=True, text=True, timeout=150)
    seconds = time.perf_counter() - start
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... exited with {done.returncode}:\n{log[-3000:]}")
    cells = json.loads((out / "results.json").read_text())["cells"]
    return {(c["dataset"], c["shots"], c["seed"], c["method"]): c for c in cells}, seconds, log


# ---------------------------------------------------------------------------- the run
RUNNERS: dict[str, Callable[[torch.device, Sizes, Table], dict[str, Any]]] = {
    "extraction": extraction, "training": training, "grid": grid, "test_time": test_time,
    "correctness": correctness, "torchrun": torchrun,
}  # fmt: skip


def environment(device: torch.device, tiny: bool, argv: Sequence[str]) -> dict[str, Any]:
    """What the figures were measured on."""
    meta: dict[str, Any] = {
        "argv": list(argv), "tiny": tiny, "device": str(device),
        "torch": torch.__version__, "open_clip": open_clip.__version__, "prolip": prolip.__version__,
        "python": sys.version.split()[0], "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
    }  # fmt: skip
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        meta |= {"gpu": properties.name, "gpu_memory_bytes": properties.total_memory,
                 "capability": list(torch.cuda.get_device_capability(device)), "cuda": torch.version.cuda,
                 "cudnn": torch.backends.cudnn.version()}  # fmt: skip
    return meta


def write_json(path: Path | None, report: dict[str, Any]) -> None:
    """The report as strict JSON at ``path`` (replaced whole, so a reader never sees half a file)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(jsonable(report), indent=2, allow_nan=False) + "\n")
    os.replace(temporary, path)


def failures(report: dict[str, Any]) -> list[str]:
    """Parts that raised and checks that did not pass."""
    found = [f"{part}: {report[part]['error']}" for part in PARTS if report.get(part, {}).get("error")]
    checks = report.get("correctness", {})
    found += [f"correctness {k}" for k, v in checks.items() if isinstance(v, dict) and v.get("passed") is False]
    if report.get("torchrun", {}).get("passed") is False:
        found.append("torchrun: cells differ from one process")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Run the requested parts, print the table and write the JSON; 0 if every part ran and every check passed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="(default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: proves the script runs (CPU, tests)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here as JSON")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="(default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (use --device cpu --tiny for the CPU run)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = TINY if args.tiny else FULL
    report: dict[str, Any] = {"environment": environment(device, args.tiny, sys.argv[1:] if argv is None else argv)}
    table, started = Table(), time.perf_counter()
    print(
        f"device check: {device}, torch {torch.__version__}, {'tiny sizes' if args.tiny else 'real sizes'}", flush=True
    )
    for part in PARTS:
        if part not in args.parts:
            report[part] = {"skipped": "not requested (--parts)"}
            continue
        budget = sizes.budgets[part]
        print(f"[{part}] budget {budget:.0f} s", flush=True)
        start = time.perf_counter()
        try:
            section = RUNNERS[part](device, sizes, table)
        except Exception as exc:  # one part's failure must not cost the others' figures on a rare GPU
            traceback.print_exc()
            section = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
            table.add(part, "error", "ERROR", section["error"][:200])
        release(device)
        elapsed = time.perf_counter() - start
        section |= {"elapsed_seconds": elapsed, "budget_seconds": budget, "over_budget": elapsed > budget}
        report[part] = section
        table.rows.append(
            (part, "elapsed", f"{elapsed:.1f} s", f"budget {budget:.0f} s" + (" OVER" * (elapsed > budget)))
        )
        print(
            f"[{part}] {elapsed:.1f} s (budget {budget:.0f} s){' OVER BUDGET' if elapsed > budget else ''}", flush=True
        )
        report["environment"]["total_seconds"] = time.perf_counter() - started
        write_json(args.json, report)
    failed = failures(report)
    report["passed"], report["failures"] = not failed, failed
    report["environment"]["total_seconds"] = total = time.perf_counter() - started
    write_json(args.json, report)
    print()
    print(table.render())
    print(f"total {total:.1f} s; " + ("every check passed" if not failed else "FAILED: " + "; ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
