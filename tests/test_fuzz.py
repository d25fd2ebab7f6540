"""Fuzzing: random and mutated bytes at the delta loader and the image loader.

Whatever the bytes, the only exceptions allowed out are prolip's own (ProLIPError subclasses).
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import colour_images, tiny_adapter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from prolip import ProLIPAdapter, ProLIPError, ProLIPWarning
from prolip.features.images import load_image
from prolip.files.delta import read_state

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@st.composite
def mutations(draw: st.DrawFn, seed: bytes, hot: int) -> bytes:
    """``seed`` with a few byte flips, insertions, deletions or a truncation; most hit the first ``hot`` bytes."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        limit = min(hot, len(data)) if draw(st.booleans()) else len(data)
        at = draw(st.integers(0, limit - 1))
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, ord("{"), ord('"'), ord("9"), ord("-")]))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


def _run(path: str, data: bytes, call: Callable[[str], object], outcomes: Counter) -> None:
    with open(path, "wb") as f:
        f.write(data)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(path)
    except ProLIPError as exc:
        outcomes[type(exc).__name__] += 1
    else:
        # A renamed configuration key reads as one from a newer prolip: warned about (a ProLIPWarning), ignored.
        assert all(issubclass(w.category, ProLIPWarning) for w in caught), [str(w.message) for w in caught]
        outcomes["warned" if caught else "ok"] += 1


@pytest.fixture(scope="module")
def delta_bytes(checkpoints) -> tuple[bytes, ProLIPAdapter]:
    images, labels = colour_images(2)
    adapter = tiny_adapter(checkpoints["vit"], epochs=2).fit(images, labels)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "d.safetensors")
        adapter.save(path)
        with open(path, "rb") as f:
            return f.read(), adapter


def test_fuzz_delta_reader(delta_bytes):
    seed, _ = delta_bytes
    header_end = 8 + int.from_bytes(seed[:8], "little")
    outcomes: Counter = Counter()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fuzz.safetensors")

        @FUZZ
        @given(st.one_of(st.binary(max_size=2048), mutations(seed, header_end)))
        def fuzz(data: bytes) -> None:
            _run(path, data, read_state, outcomes)

        fuzz()
    assert outcomes["DeltaFileError"] > 0, outcomes


def test_fuzz_adapter_load(delta_bytes):
    seed, adapter = delta_bytes
    base = adapter.backbone.model
    header_end = 8 + int.from_bytes(seed[:8], "little")
    outcomes: Counter = Counter()

    def load(path: str) -> None:
        loaded = ProLIPAdapter.load(path, model=base, verbose=False)
        # Whatever loaded must also be usable: predictions come out, or a prolip error does.
        loaded.predict_features(torch.zeros(1, 2, loaded.n_features_in_))

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fuzz.safetensors")

        @FUZZ
        @given(mutations(seed, header_end))
        def fuzz(data: bytes) -> None:
            _run(path, data, load, outcomes)

        fuzz()
    # Both sides were reached: damaged files refused, and mutated tensor values loaded.
    assert outcomes["ok"] > 0 and sum(v for k, v in outcomes.items() if k != "ok") > 0, outcomes


def _image_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    seeds = []
    for fmt, img, kw in [
        ("PNG", rgb, {}),
        ("JPEG", rgb, {"quality": 80}),
        ("GIF", rgb.convert("P"), {}),
        ("BMP", rgb, {}),
        ("TIFF", rgb, {}),
        ("WEBP", rgb, {}),
        ("PNG", Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16)), {}),
    ]:
        buffer = io.BytesIO()
        img.save(buffer, format=fmt, **kw)
        seeds.append(buffer.getvalue())
    return seeds


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the damage it tolerates
def test_fuzz_image_loader():
    seeds = _image_seeds()
    outcomes: Counter = Counter()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fuzz.jpg")

        @FUZZ
        @given(st.one_of(st.binary(max_size=1024), st.sampled_from(seeds).flatmap(lambda s: mutations(s, 64))))
        def fuzz(data: bytes) -> None:
            _run(path, data, lambda p: load_image(p, draft_size=64), outcomes)

        fuzz()
    assert outcomes["ok"] > 0 and outcomes["ImageLoadError"] > 0, outcomes
