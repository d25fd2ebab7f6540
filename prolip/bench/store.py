"""The bench's features: every (image set, view setting) extracted once, into the feature cache.

All methods and settings read the same cached features: training draws (augmented views), their
plain views, validation draws and test splits (plain views), and the augmented test views of
test-time methods. The cache is keyed per image content (:mod:`prolip.features.cache`), so nested draws,
overlapping seeds and a resumed run reuse what is already there; images are decoded and hashed
in chunks, so memory holds one chunk of images, never a whole test split. Feature sets small
enough are read into memory once; larger ones (ImageNet's training views) stay on disk and are
read one view at a time. A small index from the SHA-256 of each image *file* to the hash of its
decoded pixels lets a rerun skip decoding images whose features are cached: a file rewritten with
other bytes (whatever its size and mtime) is decoded again. The index carries a checksum of its
entries; an index that fails it (damaged, edited, shuffled, nested too deeply) is dropped with a
warning and rebuilt by decoding the images again, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from prolip.atomic import atomic_write, read_json
from prolip.bench.data import Item
from prolip.bench.problem import FeatureSet
from prolip.errors import FeatureCacheError, InputError
from prolip.features.cache import CachedFeatures, FeatureCache
from prolip.features.extract import feature_cache, fill_cache, image_hash
from prolip.features.images import load_image
from prolip.model.backbone import Backbone
from prolip.progress import progress

logger = logging.getLogger(__name__)

INDEX_NAME = "bench-image-index-v2.json"
INDEX_FORMAT = "prolip-bench-image-index"
FILE_HASH_BLOCK = 1 << 20
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
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(
                f"cannot use {str(self.cache_dir)!r} as the feature cache folder ({exc.strerror or exc}); give a "
                "writable folder with --cache-dir."
            ) from None
        self._index_path = self.cache_dir / INDEX_NAME
        self._index: dict[str, str] = self._read_index()
        self._file_hashes: dict[str, str] = {}

    @staticmethod
    def _index_checksum(entries: dict[str, str]) -> str:
        return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()

    def _read_index(self) -> dict[str, str]:
        if not self._index_path.exists():
            return {}
        try:
            data = read_json(self._index_path, FeatureCacheError, "bench image index")
        except FeatureCacheError as exc:
            logger.warning("%s; rebuilding it", exc)
            return {}
        entries = data.get("entries") if isinstance(data, dict) and data.get("format") == INDEX_FORMAT else None
        if (
            not isinstance(entries, dict)
            or not all(isinstance(v, str) for v in entries.values())
            or data.get("sha256") != self._index_checksum(entries)
        ):
            logger.warning("the bench image index %s is damaged (its checksum fails); rebuilding it", self._index_path)
            return {}
        return entries

    def _write_index(self) -> None:
        data = {"format": INDEX_FORMAT, "entries": self._index, "sha256": self._index_checksum(self._index)}
        try:
            atomic_write(self._index_path, [json.dumps(data).encode()])
        except OSError as exc:
            raise FeatureCacheError(
                f"cannot write {str(self._index_path)!r} ({exc.strerror or exc}); check that the cache folder is "
                "writable and the disk has free space."
            ) from None

    def file_hash(self, path: str) -> str:
        """SHA-256 of the bytes of the image file ``path`` (once per run and path)."""
        if path not in self._file_hashes:
            digest = hashlib.sha256()
            try:
                with open(path, "rb") as f:
                    while block := f.read(FILE_HASH_BLOCK):
                        digest.update(block)
            except OSError as exc:
                raise InputError(f"cannot read image file {path!r} ({exc.strerror or exc}).") from None
            self._file_hashes[path] = digest.hexdigest()
        return self._file_hashes[path]

    def _index_key(self, path: str) -> str:
        # The decoded pixels depend on the file's bytes and on the draft size the backbone decodes at.
        return f"{self.file_hash(path)}|{self.backbone.draft_size}"

    def draw_digest(self, items: Sequence[Item], root: str | os.PathLike) -> str:
        """SHA-256 identifying a draw's data: each item's path (relative to ``root``), label and file bytes."""
        digest = hashlib.sha256()
        for item in items:
            relative = os.path.relpath(item.path, root).replace(os.sep, "/")
            digest.update(f"{relative}\0{item.label}\0{self.file_hash(item.path)}\n".encode())
        return digest.hexdigest()

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
        computed = self._extract(items, todo, keys, hashes, cache, desc, rank, world_size)
        logger.debug("rank %d of %d computed %d of %d images (%s)", rank, world_size, computed, len(items), desc)
        return hashes, computed  # type: ignore[return-value]  # every hash is set above

    def _extract(
        self, items: Sequence[Item], todo: list[int], keys: list[str], hashes: list[str | None], cache: FeatureCache,
        what: str, rank: int = 0, world_size: int = 1,
    ) -> int:  # fmt: skip
        """Decode and hash the images ``todo``, and cache this rank's share of their features: a chunk at a time."""
        computed = 0
        for start in progress(range(0, len(todo), CHUNK), desc=what, unit="chunk", verbose=self.verbose and bool(todo)):
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
        return computed

    def features(self, items: Sequence[Item], views: int, seed: int = 0, what: str = "images") -> FeatureSet:
        """Features of ``items``: ``views`` augmented views (seeded by ``seed``), or the plain view for 0."""
        if not items:  # an empty validation draw: the methods that need one are skipped by the runner
            empty = torch.zeros(max(views, 1), 0, self.backbone.projector.feature_width)
            return FeatureSet(empty, torch.zeros(0, dtype=torch.long))
        cache = self.cache(views, seed)
        hashes, _ = self._fill(cache, items, what, 0, 1)

        def recompute(damaged: list[str]) -> None:  # entries that failed their checksum were deleted
            bad = set(damaged)
            keys = [self._index_key(item.path) for item in items]
            self._extract(items, [i for i, h in enumerate(hashes) if h in bad], keys, hashes, cache, what)

        labels = torch.tensor([item.label for item in items], dtype=torch.long)
        features = cache.features(hashes, recompute)
        if 4 * features.shape.numel() <= IN_MEMORY_BYTES:  # small sets: one read, not one per training step
            features = features.to_tensor()
        return FeatureSet(features, labels)

    def test_views(self, items: Sequence[Item], views: int, seed: int, what: str = "test") -> FeatureSet:
        """The plain view then ``views`` augmented views of each item: ``[1 + views, n, width]``."""
        plain = self.features(items, 0, what=what)
        augmented = self.features(items, views, seed, what=what)
        return FeatureSet(StackedViews(plain.features, augmented.features), plain.labels)
