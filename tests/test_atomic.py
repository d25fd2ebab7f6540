"""Atomic delta writes: a writer killed at any moment leaves the old file or the complete new one."""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import time
from pathlib import Path

import pytest
import torch

from prolip import DeltaFileError
from prolip.atomic import STALE_TEMP_SECONDS, TEMP_PREFIX
from prolip.files.delta import read_state, write_delta
from prolip.model.fingerprint import Fingerprint
from prolip.training.fitted import FittedState

SHAPE = (1024, 2048)  # 8 MB per write: long enough for kills to land mid-write


_FINGERPRINT = Fingerprint.of("visual.proj", torch.zeros(2, 2), torch.nn.Linear(2, 2), "fp32")


def _state(delta: torch.Tensor, classifier: torch.Tensor, version: int) -> FittedState:
    """A delta file's contents whose every value, and N, record ``version``."""
    return FittedState(
        delta=delta,
        classifier=classifier,
        classes=("a", "b", "c"),
        class_names=("a", "b", "c"),
        templates=("a photo of a {}.",),
        n_shots=version + 1,  # the version is recorded twice: in metadata and in every value
        reg_lambda=0.5,
        logit_scale=100.0,
        projector_key="visual.proj",
        projector_family="vit",
        model_name="m",
        pretrained="",
        hyperparameters={},
        fingerprint=_FINGERPRINT,
    )


def _version(path: Path) -> int:
    """The version a delta file holds, after checking it is complete and self-consistent."""
    contents = read_state(path)
    version = int(contents.n_shots) - 1
    assert contents.delta.shape == SHAPE
    assert bool((contents.delta == version).all()) and bool((contents.classifier == version).all())  # stored values
    return version


def _writer(target: Path, first: int, delta: torch.Tensor, classifier: torch.Tensor, report: int) -> None:
    """Child process: save versions first, first+1, ... forever, reporting each completed one."""
    try:
        version = first
        while True:
            # numpy, not torch, fills the tensors: torch's thread pool is not safe to use after fork.
            delta.numpy().fill(version)
            classifier.numpy().fill(version)
            write_delta(target, _state(delta, classifier, version))
            os.write(report, f"{version}\n".encode())
            version += 1
    finally:
        os._exit(1)


def _completed(report: int) -> list[int]:
    data = b""
    while select.select([report], [], [], 0)[0]:
        chunk = os.read(report, 65536)
        if not chunk:
            break
        data += chunk
    return [int(line) for line in data.split()]


def _kill(pid: int) -> None:
    """SIGKILL a forked writer and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _run_and_kill(child, rng: random.Random, longest: float) -> list[int]:
    """Fork ``child(write_end)``, let it finish at least one write, SIGKILL it at a random moment
    within ``longest`` seconds, and return the versions it reported complete."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        os.close(read_end)
        child(write_end)
    os.close(write_end)
    try:
        assert select.select([read_end], [], [], 60)[0], "writer made no progress"
        time.sleep(rng.uniform(0.0, longest))
    finally:
        _kill(pid)  # also when the assertion failed: a stuck child must not outlive the test
        done = _completed(read_end)
        os.close(read_end)
    return done


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to kill a writer mid-save")
def test_sigkill_during_save_leaves_old_or_new_file(tmp_path):
    target = tmp_path / "delta.safetensors"
    delta, classifier = torch.zeros(SHAPE), torch.zeros(3, SHAPE[1])
    write_delta(target, _state(delta, classifier, 0))
    current, rng = 0, random.Random(0)
    for kill in range(8):
        first = (kill + 1) * 1000
        # Let at least one save finish, then kill at a random moment of a later one.
        done = _run_and_kill(lambda report, first=first: _writer(target, first, delta, classifier, report), rng, 0.08)
        assert done and done == list(range(first, first + len(done)))
        found = _version(target)
        # The last reported save, or the one in flight if the kill came after its rename.
        assert found in (done[-1], done[-1] + 1), (found, done[-1])
        assert found != current
        current = found

    # Temp files of killed writers are never taken for the delta, and hold nothing half-written.
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["delta.safetensors"]
    temps = list(tmp_path.glob(f"{TEMP_PREFIX}*"))
    for temp in temps:
        assert temp.name.startswith(f"{TEMP_PREFIX}delta.safetensors.") and temp.name.endswith(".tmp")
        # Killed after writing everything but before the rename: complete, and never used. Otherwise partial: refused.
        with contextlib.suppress(DeltaFileError):
            _version(temp)
    # The next save removes stale ones (old enough that no live writer can own them).
    for temp in temps:
        os.utime(temp, (time.time() - STALE_TEMP_SECONDS - 60,) * 2)
    fresh = tmp_path / f"{TEMP_PREFIX}delta.safetensors.0123456789abcdef.tmp"
    fresh.write_bytes(b"a concurrent writer's file in progress")
    delta.numpy().fill(7)
    classifier.numpy().fill(7)
    write_delta(target, _state(delta, classifier, 7))
    assert _version(target) == 7
    assert list(tmp_path.glob(f"{TEMP_PREFIX}*")) == [fresh]


def test_a_failed_save_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "delta.safetensors"
    delta, classifier = torch.full(SHAPE, 1.0), torch.full((3, SHAPE[1]), 1.0)
    write_delta(target, _state(delta, classifier, 1))
    before = target.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(DeltaFileError, match=r"cannot write delta file .*delta\.safetensors.*No space left"):
        write_delta(target, _state(delta * 2, classifier * 2, 2))
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["delta.safetensors"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_delta(target, _state(delta * 2, classifier * 2, 2))
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["delta.safetensors"]


def _cache_writer(root: Path, first: int, report: int) -> None:
    """Child process: write cache entries of version first, first+1, ... forever, reporting each.

    fp32 storage keeps the child free of torch's parallel kernels, which can deadlock after fork.
    """
    from prolip.features.cache import CacheKey, FeatureCache
    from prolip.model.preprocessing import ViewConfig

    try:
        config = ViewConfig(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        cache = FeatureCache(
            root, CacheKey(model="m", precision="fp32", config=config, seed=0, views=64, storage="fp32"), 4096
        )
        features = torch.empty(64, 4096)
        version = first
        while True:
            features.numpy().fill(version)  # numpy: torch's thread pool is not safe after fork
            cache.write(f"{version:064x}", features)
            os.write(report, f"{version}\n".encode())
            version += 1
    finally:
        os._exit(1)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to kill a writer mid-write")
def test_sigkill_during_cache_writes_leaves_only_complete_entries(tmp_path):
    from prolip.features.cache import CacheKey, FeatureCache
    from prolip.model.preprocessing import ViewConfig

    root, rng, written = tmp_path / "cache", random.Random(1), []
    for kill in range(6):
        first = (kill + 1) * 1000
        done = _run_and_kill(lambda report, first=first: _cache_writer(root, first, report), rng, 0.05)
        assert done
        written += done

    config = ViewConfig(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    cache = FeatureCache(
        root, CacheKey(model="m", precision="fp32", config=config, seed=0, views=64, storage="fp32"), 4096
    )
    published = sorted(p for p in root.rglob("*.safetensors"))
    # Every reported write is there; at most one more per kill (killed after its rename).
    assert len(written) <= len(published) <= len(written) + 6
    for path in published:
        version = int(path.stem, 16)
        assert cache.has(path.stem), path
        assert bool((cache.read(path.stem).float() == version).all()), path  # complete, never torn
    assert all(cache.has(f"{v:064x}") for v in written)
