"""Distributed extraction: torchrun with two Gloo processes on CPU equals one process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prolip import InputError, ProLIPAdapter, standin
from prolip.datasets import FASHION_MNIST_CLASSES
from prolip.files.delta import read_state
from prolip.variants.distributed import extract_distributed, rank_and_world_size

EXAMPLE = Path(__file__).parents[1] / "examples" / "distributed_extract.py"
SHOTS, VIEWS, EPOCHS = 3, 4, 10


def _synthetic():
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        from distributed_extract import synthetic
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    return synthetic(SHOTS, 0)


def _adapter(**params) -> ProLIPAdapter:
    """The adapter the example builds, on the CPU."""
    return ProLIPAdapter(
        standin.MODEL_NAME,
        standin.PRETRAINED_TAG,
        templates=standin.TEMPLATES,
        views=VIEWS,
        epochs=EPOCHS,
        device="cpu",
        random_state=0,
        verbose=False,
        **params,
    )


@pytest.mark.slow
def test_torchrun_two_gloo_processes_equal_one_process(tmp_path):
    cache, delta = tmp_path / "cache", tmp_path / "delta.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE)]
    command += ["--cache-dir", str(cache), "--out", str(delta), "--synthetic", "--shots", str(SHOTS)]
    command += ["--views", str(VIEWS), "--epochs", str(EPOCHS), "--test-size", "20"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    # Each rank computed its own half of the 30 images; rank 0 trained and saved.
    computed = {int(r): int(k) for r, k in re.findall(r"rank (\d) of 2 computed (\d+) of 30 images", log)}
    assert computed == {0: 15, 1: 15}, log[-3000:]
    assert "2 processes; features (4, 30, 128)" in done.stdout

    images, labels = _synthetic()
    single = _adapter()
    reference = single.extract_features(list(images))  # one process, in memory
    cached = _adapter(cache_dir=cache).extract_features(list(images))
    assert not list(cache.glob("v1/*/entries/*/.prolip-*"))
    # Features of the distributed run equal the single-process ones up to fp16 storage (and thread-count rounding).
    torch.testing.assert_close(cached.to_tensor(), reference.half().float(), rtol=2e-3, atol=2e-3)
    single.fit_features(reference.half().float(), labels.tolist(), class_names=FASHION_MNIST_CLASSES)
    saved = read_state(delta)
    torch.testing.assert_close(saved.delta, single.delta_, rtol=1e-3, atol=1e-5)
    assert list(saved.classes) == single.classes_.tolist()


def test_without_a_process_group_it_is_a_cached_extraction(tmp_path):
    assert rank_and_world_size() == (0, 1)
    images, _ = _synthetic()
    adapter = _adapter()
    features = extract_distributed(adapter, list(images[:4]), cache_dir=tmp_path)
    assert adapter.cache_dir == tmp_path and tuple(features.shape) == (VIEWS, 4, 128)
    # bit-for-bit: the second call computes nothing; both read the same cache entries back
    assert torch.equal(
        features.to_tensor(), _adapter(cache_dir=tmp_path).extract_features(list(images[:4])).to_tensor()
    )
    with pytest.raises(InputError, match="random_state"):
        extract_distributed(_adapter().set_params(random_state=None), list(images[:2]), cache_dir=tmp_path)
    with pytest.raises(InputError, match="cache_dir"):
        extract_distributed(_adapter(), list(images[:2]))
    plain = extract_distributed(_adapter(), list(images[:2]), cache_dir=tmp_path, views=0)  # the test view, cached
    torch.testing.assert_close(plain.to_tensor(), _adapter().extract_features(list(images[:2]), views=0).half().float())
