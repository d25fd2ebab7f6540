"""Every benchmark script runs, at toy sizes, and prints its table (timings themselves are never asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SMALL = ["--model", "ViT-S-32", "--repeats", "1"]  # open_clip's smallest ViT config, random weights
TINY = {
    "bench_training.py": (["--classes", "10", "--steps", "2", "--repeats", "1"], "prolip/(floor+adam)"),
    "bench_variants.py": (["--classes", "10", "--steps", "2", "--repeats", "1", "--templates", "2"], "img+txt/prolip"),
    "bench_combinations.py": (["--classes", "10", "--epochs", "2", "--repeats", "1", "--test", "4"], "library taskres"),
    "bench_search.py": (["--classes", "3", "--shots", "2", "--epochs", "2", "--repeats", "1"], "search / fits:"),
    "bench_test_time.py": (["--images", "1", "--views", "2", "--classes", "3", *SMALL], "test-time / views:"),
    "bench_extraction.py": (["--images", "1", "--views", "1", *SMALL], "extract_features views=1"),
    # The stand-in's tiny ViT: ONNX export takes most of the time, and grows with the model.
    "bench_export.py": (
        ["--model", "prolip-standin-vit", "--batches", "1", "2", "--classes", "3", "--repeats", "1"],
        "onnx",
    ),
    "bench_multitask.py": (["--tasks", "1", "2", "--classes", "3", "--images", "2", *SMALL], "heads ms"),
    "bench_suite_memory.py": (
        [
            "--counts",
            "1",
            "2",
            "--shots",
            "1",
            "--views",
            "2",
            "--epochs",
            "2",
            "--train",
            "2",
            "--val",
            "2",
            "--test",
            "2",
        ],
        "peak RSS MB",
    ),
    "bench_protocol.py": (["--models", "ViT-S-32", "--probe-images", "1", "--seeds", "1"], "hours P=8"),
}
# bench_memory.py extracts 30 and 300 views per image in child processes whatever the sizes: too slow here.
SLOW = {"bench_memory.py"}


def test_every_benchmark_is_covered():
    assert {p.name for p in BENCHMARKS.glob("bench_*.py")} - SLOW == set(TINY)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TINY))
def test_the_benchmark_runs(script):
    args, expected = TINY[script]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--threads", "1"],
        capture_output=True, text=True, cwd=BENCHMARKS, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout
