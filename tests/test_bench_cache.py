"""What the bench's feature store and the feature cache guarantee: features follow the image file's bytes,
damaged entries, packs and indexes are detected and recomputed, never used."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from prolip import standin
from prolip.bench.data import Item
from prolip.bench.store import INDEX_NAME, FeatureStore
from prolip.model.backbone import build_backbone


@pytest.fixture(scope="module")
def backbone():
    return build_backbone(standin.MODEL_NAME, standin.PRETRAINED_TAG, device="cpu")


def images(folder, colours):
    items = []
    for i, colour in enumerate(colours):
        path = folder / f"{i}.bmp"  # BMP: the file size depends only on the image size
        Image.new("RGB", (32, 32), colour).save(path)
        items.append(Item(str(path), i, f"c{i}"))
    return items


def fresh(backbone, tmp_path, items, views=2):
    return FeatureStore(backbone, tmp_path / "fresh-cache", verbose=False).features(items, views, seed=1).features


def test_an_image_rewritten_with_the_same_size_and_mtime_gets_new_features(backbone, tmp_path):
    items = images(tmp_path, [(255, 0, 0), (0, 0, 255)])
    store = FeatureStore(backbone, tmp_path / "cache", verbose=False)
    before = store.features(items, 0).features
    stat = os.stat(items[0].path)
    Image.new("RGB", (32, 32), (0, 255, 0)).save(items[0].path)
    os.utime(items[0].path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(items[0].path).st_size == stat.st_size
    after = FeatureStore(backbone, tmp_path / "cache", verbose=False).features(items, 0).features
    # Same operations on the same shapes: the features of unchanged images are bit-for-bit equal.
    assert torch.equal(after[:, 1], before[:, 1]) and not torch.equal(after[:, 0], before[:, 0])
    assert torch.equal(after, fresh(backbone, tmp_path, items, views=0))


def _flip_last_bit(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a low mantissa bit of an fp16 value: the value stays finite
    path.write_bytes(bytes(data))


def test_damaged_entries_and_packs_are_recomputed_never_used(backbone, tmp_path, caplog):
    items = images(tmp_path, [(255, 0, 0), (0, 0, 255), (0, 200, 0)])
    root = tmp_path / "cache"
    expected = FeatureStore(backbone, root, verbose=False).features(items, 2, seed=1).features
    entries = sorted(root.rglob("entries/*/*.safetensors"))
    packs = sorted(root.rglob("packs/*.safetensors"))
    assert len(entries) == 3 and len(packs) == 1
    _flip_last_bit(packs[0])
    with caplog.at_level(logging.WARNING):
        got = FeatureStore(backbone, root, verbose=False).features(items, 2, seed=1).features
    assert torch.equal(got, expected) and "fails its checksum" in caplog.text
    for entry in entries:
        _flip_last_bit(entry)
    packs[0].unlink()  # the pack is rebuilt from the entries: each is checked, the damaged ones recomputed
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        got = FeatureStore(backbone, root, verbose=False).features(items, 2, seed=1).features
    assert torch.equal(got, expected) and caplog.text.count("recomputing it") == 3


@pytest.mark.parametrize("damage", ["shuffle", "nest", "garbage"])
def test_a_damaged_image_index_is_rebuilt_not_used(backbone, tmp_path, caplog, damage):
    items = images(tmp_path, [(255, 0, 0), (0, 0, 255)])
    root = tmp_path / "cache"
    expected = FeatureStore(backbone, root, verbose=False).features(items, 0).features
    index = root / INDEX_NAME
    if damage == "shuffle":
        data = json.loads(index.read_text())
        keys = list(data["entries"])
        data["entries"] = dict(zip(keys, reversed(list(data["entries"].values())), strict=True))
        index.write_text(json.dumps(data))
    else:
        index.write_text("[" * 100_000 + "]" * 100_000 if damage == "nest" else "{\x00")
    with caplog.at_level(logging.WARNING):
        got = FeatureStore(backbone, root, verbose=False).features(items, 0).features
    assert torch.equal(got, expected) and "rebuilding it" in caplog.text
    assert np.isfinite(got.numpy()).all()
