"""The bench's features: every (image set, view setting) extracted once, into the feature cache.

All methods and settings read the same cached features: training draws (augmented views), their
plain views, validation draws and test splits (plain views), and the augmented test views of
test-time methods. The cache is keyed per image content (:mod:`prolip.features.cache`), so nested draws,
overlapping seeds and a resumed run reuse what is already there; images are decoded and hashed
in chunks, so memory holds one chunk of images, never a whole test split. Feature sets small
enough are read into memory once; larger ones (ImageNet's training views) stay on disk and are
read one view at a time. A small index from
(path, size, mtime) to content hash lets a rerun skip decoding images whose features are cached.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prolip.atomic import atomic_write
from prolip.bench.problem import FeatureSet
from prolip.datasets import Item
from prolip.features.cache import CachedFeatures, FeatureCache
from prolip.features.extract import feature_cache, fill_cache, image_hash
from prolip.features.images import load_image
from prolip.model.backbone import Backbone

logger = logging.getLogger(__name__)

INDEX_NAME = "bench-image-index.json"
CHUNK = 256  # images decoded and held at once
IN_MEMORY_BYTES = 256 << 20  # feature sets up to this size (as float32) are read into memory once


class StackedViews:
    """View 0 from one feature set and views 1.. from another, read one view at a time (lazily).

    What test-time methods see: the plain view first, then ``V`` augmented views.
    """

    def __init__(self, first: torch.Tensor | CachedFeatures, rest: torch.Tensor | CachedFeatures) -> None:
        self.first, self.rest = first, rest
        self.shape = torch.Size((1 + rest.shape[0], *rest.shape[1:]))

    def __getitem__(self, view: int) -> torch.Tensor:
        return self.first[0] if view == 0 else self.rest[view - 1]


class FeatureStore:
    """Cached pre-projection features of dataset items for one backbone.

    Args:
        backbone: the model.
        cache_dir: the feature cache folder (shared by every run that uses this backbone).
        batch_size: images per forward pass.
        storage: "fp16" or "fp32" cache storage.
        verbose: progress bars.
    """

    def __init__(
        self, backbone: Backbone, cache_dir: str | os.PathLike, *, batch_size: int = 64, storage: str = "fp16",
        verbose: bool = True,
    ) -> None:  # fmt: skip
        self.backbone, self.cache_dir = backbone, Path(cache_dir)
        self.batch_size, self.storage, self.verbose = batch_size, storage, verbose
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._index_path = self.cache_dir / INDEX_NAME
        self._index: dict[str, str] = self._read_index()
        projector = backbone.projector
        self.d_in = projector.in_features if projector.has_residual else None

    def _read_index(self) -> dict[str, str]:
        try:
            index = json.loads(self._index_path.read_text())
        except (OSError, ValueError):
            return {}
        return index if isinstance(index, dict) and all(isinstance(v, str) for v in index.values()) else {}

    def _write_index(self) -> None:
        atomic_write(self._index_path, [json.dumps(self._index).encode()])

    @staticmethod
    def _index_key(path: str) -> str:
        stat = os.stat(path)
        return f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"

    def cache(self, views: int, seed: int = 0) -> FeatureCache:
        """The feature cache of one view setting (``views=0``: the plain view)."""
        cache = feature_cache(self.backbone, self.cache_dir, views=views, seed=seed, storage=self.storage)
        cache.open()
        return cache

    def known_hash(self, path: str) -> str | None:
        """The content hash of the image at ``path`` if this cache's index knows it (without reading the image)."""
        return self._index.get(self._index_key(path))

    def missing(self, items: Sequence[Item], views: int, seed: int = 0) -> list[Item]:
        """The items whose features for ``views`` and ``seed`` the cache lacks (or whose content is not indexed yet).

        Only looks: nothing is read but the cache's entries' headers, nothing written.
        """
        cache = feature_cache(self.backbone, self.cache_dir, views=views, seed=seed, storage=self.storage)
        return [item for item in items if (h := self.known_hash(item.path)) is None or not cache.has(h)]

    def extract(
        self, items: Sequence[Item], views: int, seed: int = 0, what: str = "images", *, rank: int = 0,
        world_size: int = 1,
    ) -> int:  # fmt: skip
        """Compute this process's share of the features of ``items`` into the cache; return how many it computed.

        Every item is read and hashed (pass :meth:`missing`'s list). With ``world_size > 1`` this
        process computes only its share of the images not cached yet
        (:func:`~prolip.features.extract.fill_cache`'s ``rank``): every process of the job calls
        this with the same items, and together they fill the cache.
        """
        return self._fill(self.cache(views, seed), items, what, rank, world_size, check=False)[1]

    def _fill(
        self, cache: FeatureCache, items: Sequence[Item], what: str, rank: int, world_size: int, check: bool = True
    ) -> tuple[list[str], int]:
        """Every item's content hash, and the number of images computed into ``cache``.

        ``check``: skip reading the items the index and the cache already have (a decision that
        depends on what other processes have written so far, so not for a shared extraction).
        """
        views = cache.key.views
        keys = [self._index_key(item.path) for item in items]
        hashes: list[str | None] = [self._index.get(k) for k in keys]
        todo = [i for i, h in enumerate(hashes) if not check or h is None or not cache.has(h)]
        desc = f"{what} ({views} views)" if views else f"{what} (test view)"
        computed = 0
        for start in tqdm(range(0, len(todo), CHUNK), desc=desc, unit="chunk", disable=not self.verbose or not todo):
            chunk = todo[start : start + CHUNK]
            images = [load_image(items[i].path, i, self.backbone.draft_size) for i in chunk]
            chunk_hashes = [image_hash(im) for im in images]
            for i, h in zip(chunk, chunk_hashes, strict=True):
                hashes[i] = self._index[keys[i]] = h
            done = fill_cache(
                self.backbone, images, cache, batch_size=self.batch_size, verbose=False, hashes=chunk_hashes,
                rank=rank, world_size=world_size,
            )  # fmt: skip
            computed += len(done)
        if todo:
            self._write_index()
        logger.debug("rank %d of %d computed %d of %d images (%s)", rank, world_size, computed, len(items), desc)
        return hashes, computed  # type: ignore[return-value]  # every hash is set above

    def features(self, items: Sequence[Item], views: int, seed: int = 0, what: str = "images") -> FeatureSet:
        """Features of ``items``: ``views`` augmented views (seeded by ``seed``), or the plain view for 0."""
        cache = self.cache(views, seed)
        hashes, _ = self._fill(cache, items, what, 0, 1)
        labels = torch.tensor([item.label for item in items], dtype=torch.long)
        features = cache.features(hashes)
        if 4 * features.shape.numel() <= IN_MEMORY_BYTES:  # small sets: one read, not one per training step
            features = features.to_tensor()
        return FeatureSet(features, labels, self.d_in)

    def test_views(self, items: Sequence[Item], views: int, seed: int, what: str = "test") -> FeatureSet:
        """The plain view then ``views`` augmented views of each item: ``[1 + views, n, width]``."""
        plain = self.features(items, 0, what=what)
        augmented = self.features(items, views, seed, what=what)
        return FeatureSet(StackedViews(plain.features, augmented.features), plain.labels, self.d_in)
