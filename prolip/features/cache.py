"""On-disk cache of pre-projection features, reused across runs, processes and machines.

Layout under the cache root (format version 1)::

    <root>/v1/<settings digest>/settings.json            the key, readable (model, views, seed, ...)
    <root>/v1/<settings digest>/entries/<hh>/<sha>.safetensors
        one file per distinct image: tensor "features" [V, d_in] (fp16 or fp32); <sha> is the
        SHA-256 of the decoded image (see :func:`prolip.features.extract.image_hash`)
    <root>/v1/<settings digest>/packs/<set digest>.safetensors
        one file per ordered image list: tensor "features" [V, n, d_in], view-major

The *settings digest* covers everything the features depend on besides the image: the vision
tower's weights (:attr:`prolip.model.backbone.Backbone.tower_hash`), the backbone precision, the view
settings (:class:`~prolip.features.views.ViewConfig`), the seed, the number of views, the storage dtype and
the version of prolip's view rendering (:data:`prolip.features.views.VIEWS_VERSION`). Each
entry holds all views of one image, so extraction resumes image by image and an image is
computed once whatever image lists it appears in. Packs are derived from entries (safe to delete)
and make reading one view of all ``n`` images a single contiguous read, so training holds one
``[n, d_in]`` view at a time (:class:`CachedFeatures`).

Every file is written with :func:`prolip.atomic.atomic_write` in first-writer-wins mode: a file,
once in place, never changes. Readers therefore see complete files or none, and any number of
processes can fill one cache at once.

What the cache guarantees: an entry's header records the SHA-256 of its feature bytes, checked
whenever the entry is read; a pack records one SHA-256 per view, checked whenever that view is
read. Damage (a truncated file, a flipped bit, finite or not, a file of another key) is therefore
detected, the damaged entry deleted and recomputed (:meth:`FeatureCache.features` with
``recompute``), and a damaged pack rebuilt: damaged features are never used. The checksums are
not a signature: whoever can write the cache folder can write features with matching checksums,
so the folder is trusted as much as the code (see docs/security.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prolip.atomic import atomic_write, read_json, read_safetensors_header, remove_stale_temps, safetensors_header
from prolip.errors import DamagedCacheEntryError, FeatureCacheError, InputError, InputTypeError
from prolip.features.views import VIEWS_VERSION
from prolip.model.preprocessing import ViewConfig
from prolip.params import STORAGE_DTYPES

logger = logging.getLogger(__name__)

CACHE_FORMAT = "prolip-feature-cache"
CACHE_VERSION = 1
_ST_DTYPE = {"fp16": "F16", "fp32": "F32"}
_NP_DTYPE = {"fp16": np.float16, "fp32": np.float32}
_TENSOR = "features"
_CHECKSUM = "sha256"  # entries: SHA-256 of the feature bytes
_VIEW_CHECKSUMS = "view_sha256"  # packs: SHA-256 of each view's bytes, comma-separated
_MAX_HEADER_BYTES = 1 << 20  # our headers are a few hundred bytes
PACK_BUFFER_BYTES = 64 << 20  # memory used while building a pack, whatever its size


@dataclass(frozen=True)
class CacheKey:
    """What features depend on besides the image itself; its :meth:`digest` names a cache folder.

    Attributes:
        model: SHA-256 of the vision tower's state (:attr:`prolip.model.backbone.Backbone.tower_hash`).
        precision: backbone precision ("fp32", "fp16", "bf16").
        config: crop, flip and normalisation settings.
        seed: the augmentation seed (``random_state``).
        views: views per image; 0 for the plain test-time view.
        storage: dtype of the stored features, "fp16" or "fp32".
        renderer: the version of prolip's view rendering (:data:`prolip.features.views.VIEWS_VERSION`):
            features rendered by another version are never reused.
    """

    model: str
    precision: str
    config: ViewConfig
    seed: int
    views: int
    storage: str = "fp16"
    renderer: int = VIEWS_VERSION

    def as_dict(self) -> dict[str, Any]:
        """The key as plain JSON-able values."""
        fields = dataclasses.asdict(self)
        fields["config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in fields["config"].items()}
        return {"format": CACHE_FORMAT, "format_version": CACHE_VERSION, **fields}

    def digest(self) -> str:
        """SHA-256 of the key's canonical JSON."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


def check_storage(storage: str) -> torch.dtype:
    """The torch dtype of a storage name ("fp16" or "fp32")."""
    if storage not in STORAGE_DTYPES:
        raise InputError(f"cache_dtype={storage!r} is not supported; use one of {sorted(STORAGE_DTYPES)}.")
    return STORAGE_DTYPES[storage]


# ---------------------------------------------------------------------------- safetensors header
def _header_bytes(shape: Sequence[int], storage: str, metadata: dict[str, str]) -> bytes:
    """A safetensors header for one tensor named "features" (:func:`prolip.atomic.safetensors_header`)."""
    nbytes = int(np.prod(shape)) * np.dtype(_NP_DTYPE[storage]).itemsize
    return safetensors_header([(_TENSOR, _ST_DTYPE[storage], shape, nbytes)], metadata)


def _digest(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_file(
    path: Path,
    shape: Sequence[int],
    storage: str,
    metadata: dict[str, str],
    checksum: str = _CHECKSUM,
    required: bool = True,
) -> tuple[int, str | None]:
    """Verify a cache file's header against what it should hold; return where its data starts and its checksum.

    ``required=False`` accepts a file without its checksum (None is returned): an entry written before checksums.
    """
    header, start = read_safetensors_header(path, FeatureCacheError, _MAX_HEADER_BYTES, "feature cache file")
    info = header.get(_TENSOR)
    info = info if isinstance(info, dict) else {}  # a damaged header may hold anything where objects belong
    meta = header.get("__metadata__")
    meta = meta if isinstance(meta, dict) else {}
    nbytes = int(np.prod(shape)) * np.dtype(_NP_DTYPE[storage]).itemsize
    ok = (
        info.get("dtype") == _ST_DTYPE[storage]
        and info.get("shape") == list(shape)
        and info.get("data_offsets") == [0, nbytes]
        and path.stat().st_size == start + nbytes
        and all(meta.get(k) == v for k, v in metadata.items())
        and (isinstance(meta.get(checksum), str) or (not required and checksum not in meta))
    )
    if not ok:
        raise FeatureCacheError(
            f"cache file {str(path)!r} does not hold {_ST_DTYPE[storage]} features of shape {list(shape)} "
            f"for this key (found {info.get('dtype')} {info.get('shape')} in {path.stat().st_size} bytes); "
            "delete it to recompute."
        )
    return start, meta.get(checksum)


def _mapped_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in its own anonymous memory map, returned to the OS when freed.

    A training step's view comes and goes once per step. From the heap, such buffers interleave
    with the small tensors training keeps (one loss per step) and the heap can grow by most of a
    view per step; a memory map of its own cannot fragment anything.
    """
    count = math.prod(shape)
    if count == 0:  # an empty image set (e.g. a validation draw with no image left): frombuffer refuses count 0
        return torch.empty(shape, dtype=dtype)
    buffer = mmap.mmap(-1, count * dtype.itemsize)
    return torch.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)  # the tensor keeps the map alive


# ---------------------------------------------------------------------------- the cache
class FeatureCache:
    """The entries and packs of one :class:`CacheKey` under ``root``.

    Args:
        root: the cache directory (created if missing); may be shared by processes and machines.
        key: what the features depend on besides the image.
        width: d_in, the width of the pre-projection features.
    """

    def __init__(self, root: str | os.PathLike, key: CacheKey, width: int) -> None:
        check_storage(key.storage)
        self.root = Path(root).expanduser()
        self.key = key
        self.width = int(width)
        self.digest = key.digest()
        self.folder = self.root / f"v{CACHE_VERSION}" / self.digest[:32]
        self._meta = {"format": CACHE_FORMAT, "format_version": str(CACHE_VERSION), "settings": self.digest}
        self._opened = False

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> FeatureCache:
        """The cache of one settings folder ``<root>/v1/<settings digest>``, from its ``settings.json``.

        Raises:
            FeatureCacheError: ``settings.json`` is unreadable, or not the settings of a cache of this
                version whose digest names the folder (naming the file).
        """
        folder = Path(folder)
        path = folder / "settings.json"
        settings = read_json(path, FeatureCacheError, "feature cache settings file")
        try:
            fields = {f.name: settings[f.name] for f in dataclasses.fields(CacheKey)}
            config = {k: tuple(v) if isinstance(v, list) else v for k, v in fields["config"].items()}
            key, width = CacheKey(**{**fields, "config": ViewConfig(**config)}), settings["width"]
            ok = (
                {**key.as_dict(), "width": width} == settings
                and type(width) is int and width >= 1 and type(key.views) is int and key.views >= 0
                and key.storage in _ST_DTYPE
                and folder.name == key.digest()[:32] and folder.parent.name == f"v{CACHE_VERSION}"
            )  # fmt: skip
        except (KeyError, TypeError, AttributeError):  # not an object, a field missing or of the wrong type
            ok = False
        if not ok:
            raise FeatureCacheError(
                f"{str(path)!r} is not the settings of the feature cache folder {str(folder)!r} (format version "
                f"{CACHE_VERSION}); leave the folder alone or delete it."
            )
        return cls(folder.parent.parent, key, width)

    @property
    def rows(self) -> int:
        """Rows stored per image: the views, or 1 for the plain test-time view (``views == 0``)."""
        return max(self.key.views, 1)

    @property
    def storage_dtype(self) -> torch.dtype:
        """The torch dtype features are stored in."""
        return STORAGE_DTYPES[self.key.storage]

    def open(self) -> FeatureCache:
        """Create the folders and ``settings.json``, and clear temporary files of killed writers."""
        if self._opened:
            return self
        settings = self.folder / "settings.json"
        try:
            (self.folder / "entries").mkdir(parents=True, exist_ok=True)
            (self.folder / "packs").mkdir(exist_ok=True)
            if not settings.exists():
                text = json.dumps({**self.key.as_dict(), "width": self.width}, indent=2, sort_keys=True)
                atomic_write(settings, [text.encode()], exclusive=True)
            remove_stale_temps(self.folder, recursive=True)
        except OSError as exc:
            raise FeatureCacheError(
                f"cannot use feature cache {str(self.root)!r} ({exc.strerror or exc}); check that it is a "
                "writable folder with free space."
            ) from exc
        self._opened = True
        return self

    def entry_path(self, image_hash: str) -> Path:
        """Where the features of the image with content hash ``image_hash`` live."""
        return self.folder / "entries" / image_hash[:2] / f"{image_hash}.safetensors"

    def _entry_meta(self, image_hash: str) -> dict[str, str]:
        return {**self._meta, "image": image_hash}

    def has(self, image_hash: str) -> bool:
        """True if a complete, valid entry for the image exists (a damaged one counts as missing)."""
        path = self.entry_path(image_hash)
        if not path.exists():
            return False
        try:
            _check_file(path, (self.rows, self.width), self.key.storage, self._entry_meta(image_hash))
        except (FeatureCacheError, OSError) as exc:  # the checksum is checked when the entry is read
            logger.warning("ignoring damaged cache entry %s (%s); it will be recomputed", path, exc)
            return False
        return True

    def check_entry(self, image_hash: str) -> tuple[np.ndarray, str | None]:
        """An entry's stored features (flat, in the storage dtype) and the checksum it records, after checking them.

        The entry must be what this key's entry is: the dtype, the shape ``[rows, width]``, the data's
        size and the metadata (format, settings, image) of its header, and finite values; a checksum it
        records must match its bytes. An entry written before checksums passes with None for its
        checksum: what ``scripts/upgrade_feature_cache.py`` checks before it vouches for one (:meth:`write`
        with ``replace``).

        Raises:
            FeatureCacheError: the entry is missing, unreadable or fails a check (naming the file and the fault).
        """
        path = self.entry_path(image_hash)
        try:
            shape, meta = (self.rows, self.width), self._entry_meta(image_hash)
            start, checksum = _check_file(path, shape, self.key.storage, meta, required=False)
            data = np.fromfile(path, dtype=_NP_DTYPE[self.key.storage], offset=start)
        except OSError as exc:
            raise FeatureCacheError(f"cannot read cache entry {str(path)!r} ({exc.strerror or exc}).") from None
        if checksum is not None and _digest(data.data) != checksum:
            raise FeatureCacheError(f"cache entry {str(path)!r} fails its checksum.")
        if not np.isfinite(data).all():
            raise FeatureCacheError(f"cache entry {str(path)!r} holds NaN or Inf values.")
        return data, checksum

    def write(self, image_hash: str, features: torch.Tensor, *, replace: bool = False) -> None:
        """Store one image's features ``[V, d_in]`` (atomically; an existing entry is kept, unless ``replace``).

        ``replace`` replaces an existing entry: ``scripts/upgrade_feature_cache.py`` rewrites an entry
        of an earlier prolip, checked by :meth:`check_entry`, with its checksum.

        Raises:
            FeatureCacheError: the file cannot be written, or the values overflow fp16.
        """
        self.open()
        expected = (self.rows, self.width)
        if tuple(features.shape) != expected:
            raise InputError(f"features of image {image_hash[:12]} have shape {tuple(features.shape)}, not {expected}.")
        stored = features.detach().to("cpu", self.storage_dtype).contiguous()
        if self.key.storage == "fp16" and torch.isfinite(features).all() and not torch.isfinite(stored).all():
            raise FeatureCacheError(
                f"features of image {image_hash[:12]} exceed the fp16 range (|x| > 65504); use cache_dtype='fp32'."
            )
        path = self.entry_path(image_hash)
        data = stored.numpy().data
        meta = {**self._entry_meta(image_hash), _CHECKSUM: _digest(data)}
        header = _header_bytes(expected, self.key.storage, meta)
        try:
            path.parent.mkdir(exist_ok=True)
            damaged = replace or (path.exists() and not self.has(image_hash))
            atomic_write(path, [header, data], exclusive=not damaged)
        except OSError as exc:
            raise FeatureCacheError(f"cannot write cache entry {str(path)!r} ({exc.strerror or exc}).") from exc

    def read(self, image_hash: str) -> torch.Tensor:
        """One image's stored features ``[V, d_in]``, in the storage dtype, after checking their checksum.

        Raises:
            DamagedCacheEntryError: the entry fails its checks; it is deleted, so that it is recomputed.
        """
        path = self.entry_path(image_hash)
        shape = (self.rows, self.width)
        try:
            start, checksum = _check_file(path, shape, self.key.storage, self._entry_meta(image_hash))
            data = np.fromfile(path, dtype=_NP_DTYPE[self.key.storage], offset=start)
        except FileNotFoundError:
            raise FeatureCacheError(
                f"cache entry {str(path)!r} is missing; extract the features of image {image_hash[:12]} first."
            ) from None
        except FeatureCacheError as exc:
            fault = str(exc)
        else:
            if _digest(data.data) == checksum:
                return torch.from_numpy(data).reshape(shape)
            fault = f"cache entry {str(path)!r} fails its checksum"
        with contextlib.suppress(OSError):  # gone already, or read-only: the error still says what to do
            path.unlink()
        raise DamagedCacheEntryError(f"{fault}; it was damaged and is deleted: extract the image again.", image_hash)

    def features(
        self, image_hashes: Sequence[str], recompute: Callable[[list[str]], None] | None = None
    ) -> CachedFeatures:
        """Lazy ``[V, n, d_in]`` features of the images with these hashes, in this order.

        With ``recompute``, the pack is built now, checking every entry's checksum; a damaged entry
        is deleted and ``recompute(hashes)`` called to extract those images again, before any is used.

        Raises:
            FeatureCacheError: some images have no entry yet (names the first few).
        """
        while True:
            missing = [h for h in dict.fromkeys(image_hashes) if not self.has(h)]
            if missing and recompute is not None:
                recompute(missing)
                missing = [h for h in missing if not self.has(h)]
            if missing:
                shown = ", ".join(h[:12] for h in missing[:5])
                raise FeatureCacheError(
                    f"{len(missing)} of the images have no cached features under {str(self.folder)!r} "
                    f"(first: {shown}); extract them first."
                )
            features = CachedFeatures(self, list(image_hashes))
            if recompute is None:
                return features
            try:
                features.prepare()
            except DamagedCacheEntryError as exc:
                logger.warning("%s; recomputing it", exc)
                continue  # the entry is deleted: the next round recomputes it
            return features


class CachedFeatures:
    """Features ``[V, n, d_in]`` that stay on disk; ``features[v]`` loads view ``v`` of all images.

    Accepted wherever :meth:`~prolip.ProLIPAdapter.fit_features` takes a tensor. Training reads one
    view per step, so memory holds one float32 ``[n, d_in]`` slice at a time, not ``V`` of them.
    Values are the stored ones (fp16-rounded by default) as float32. Each view is checked for
    NaN/Inf as it is read.

    The first read writes the view-major *pack* of this image list (or reuses it), streaming the
    entries through a bounded buffer.
    """

    def __init__(self, cache: FeatureCache, image_hashes: list[str]) -> None:
        self.cache = cache
        self.image_hashes = image_hashes
        views, n, d = cache.rows, len(image_hashes), cache.width
        self.shape = torch.Size((views, n, d))
        set_digest = hashlib.sha256("\n".join([cache.digest, *image_hashes]).encode()).hexdigest()
        self.pack_path = cache.folder / "packs" / f"{set_digest[:32]}.safetensors"
        self._pack_meta = {**cache._meta, "images": set_digest}
        self._data_start: int | None = None
        self._view_checksums: list[str] = []

    dtype = torch.float32
    device = torch.device("cpu")
    ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (
            f"CachedFeatures(shape={tuple(self.shape)}, storage={self.cache.key.storage}, pack={str(self.pack_path)!r})"
        )

    def size(self, dim: int | None = None) -> torch.Size | int:
        """As ``torch.Tensor.size``."""
        return self.shape if dim is None else self.shape[dim]

    def prepare(self) -> None:
        """Build (or check) the pack now, rather than at the first view read."""
        self._ensure_pack()

    def _ensure_pack(self, rebuild: bool = False) -> int:
        if self._data_start is None or rebuild:
            check = (self.pack_path, self.shape, self.cache.key.storage, self._pack_meta, _VIEW_CHECKSUMS)
            if rebuild or not self.pack_path.exists():
                self._build_pack(overwrite=rebuild)
            try:
                self._data_start, checksums = _check_file(*check)
            except FeatureCacheError as exc:
                logger.warning("rebuilding damaged feature pack (%s)", exc)
                self._build_pack(overwrite=True)
                self._data_start, checksums = _check_file(*check)
            self._view_checksums = checksums.split(",")
        return self._data_start

    def _build_pack(self, overwrite: bool = False) -> None:
        """Write the view-major pack from the entries, a block of images at a time."""
        views, n, d = self.shape
        storage = self.cache.key.storage
        itemsize = np.dtype(_NP_DTYPE[storage]).itemsize
        block = max(1, PACK_BUFFER_BYTES // (views * d * itemsize))
        # The header holds each view's checksum, known only at the end: a placeholder of the same length first.
        placeholder = _header_bytes(
            self.shape, storage, {**self._pack_meta, _VIEW_CHECKSUMS: ",".join(["0" * 64] * views)}
        )
        hashers = [hashlib.sha256() for _ in range(views)]

        def write(f: Any) -> None:
            f.write(placeholder)
            f.truncate(len(placeholder) + views * n * d * itemsize)
            for start in range(0, n, block):
                hashes = self.image_hashes[start : start + block]
                buf = np.stack([self.cache.read(h).numpy() for h in hashes], axis=1)  # [V, b, d]
                for v in range(views):  # row v of these images is one contiguous run in the pack
                    f.seek(len(placeholder) + (v * n + start) * d * itemsize)
                    f.write(buf[v].data)
                    hashers[v].update(np.ascontiguousarray(buf[v]).data)
            checksums = ",".join(h.hexdigest() for h in hashers)
            f.seek(0)
            f.write(_header_bytes(self.shape, storage, {**self._pack_meta, _VIEW_CHECKSUMS: checksums}))

        try:
            atomic_write(self.pack_path, writer=write, exclusive=not overwrite)
        except OSError as exc:
            raise FeatureCacheError(
                f"cannot write feature pack {str(self.pack_path)!r} ({exc.strerror or exc})."
            ) from exc
        logger.debug("packed %d cached images into %s", n, self.pack_path)

    def __getitem__(self, view: int, _rebuilt: bool = False) -> torch.Tensor:
        """View ``view`` of every image: float32 CPU ``[n, d_in]``, read from disk (its checksum checked)."""
        if isinstance(view, torch.Tensor) and view.numel() == 1:
            view = int(view)
        if not isinstance(view, (int, np.integer)) or isinstance(view, bool):
            raise InputTypeError(f"CachedFeatures takes one integer view index, not {type(view).__name__}.")
        views, n, d = self.shape
        v = int(view) + views if view < 0 else int(view)
        if not 0 <= v < views:
            raise IndexError(f"view {view} is out of range for {views} views.")
        start = self._ensure_pack()
        storage = self.cache.key.storage
        itemsize = np.dtype(_NP_DTYPE[storage]).itemsize
        out = _mapped_tensor((n, d), torch.float32)
        target = out if storage == "fp32" else _mapped_tensor((n, d), self.cache.storage_dtype)
        # A plain read, not a memory map: mapped pages would count towards the process's memory
        # until the map is dropped, and reading every view would map the whole file.
        with open(self.pack_path, "rb") as f:
            f.seek(start + v * n * d * itemsize)
            got = f.readinto(target.numpy().reshape(-1).view(np.uint8))
        if got != n * d * itemsize:
            raise FeatureCacheError(f"feature pack {str(self.pack_path)!r} is truncated; delete it to rebuild.")
        if _digest(target.numpy().data) != self._view_checksums[v]:
            if not _rebuilt:
                logger.warning("feature pack %s fails its checksum at view %d; rebuilding it", self.pack_path, v)
                self._ensure_pack(rebuild=True)
                return self.__getitem__(view, _rebuilt=True)
            raise FeatureCacheError(f"feature pack {str(self.pack_path)!r} fails its checksum; delete it to rebuild.")
        if target is not out:
            out.copy_(target)
        # The sum is a cheap test (it cannot overflow for fp16 values); the search is exact.
        bad = (~torch.isfinite(out)).nonzero() if not torch.isfinite(out.sum()) else None
        if bad is not None and len(bad):
            image, column = bad[0].tolist()
            raise InputError(
                f"features contains NaN or Inf (first at view {v}, image {image}, column {column}; cache entry "
                f"{str(self.cache.entry_path(self.image_hashes[image]))!r}); delete that entry and its pack to "
                "re-extract them, or drop that image."
            )
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[v] for v in range(len(self)))

    def to_tensor(self) -> torch.Tensor:
        """All views in memory, float32 ``[V, n, d_in]`` (what the cache exists to avoid for large V)."""
        out = torch.empty(self.shape, dtype=torch.float32)
        for v in range(len(self)):
            out[v] = self[v]
        return out


def check_features(
    features: torch.Tensor | CachedFeatures,
    width: int,
    what: str = "features",
    kind: str = "pre-projection features, as returned by extract_features",
) -> torch.Tensor | CachedFeatures:
    """``features`` as ``[V, n, width]`` (a 2-D ``[n, width]`` gains V = 1), after checking shape, dtype and values.

    ``what`` names the argument and ``kind`` what it should hold, in error messages.

    Raises:
        InputTypeError: not a tensor (or CachedFeatures), or not floating point.
        InputError: wrong shape, empty, or NaN/Inf (naming the first bad view, image and column).
    """
    if isinstance(features, CachedFeatures):
        if features.shape[-1] != width:
            raise InputError(f"{what} has shape {tuple(features.shape)}; this model needs [V, n, {width}] {kind}.")
        return features  # NaN/Inf are checked view by view as training reads them
    if not isinstance(features, torch.Tensor):
        raise InputTypeError(f"{what} must be a torch.Tensor [V, n, {width}] of {kind}, not {type(features).__name__}.")
    if features.ndim == 2:
        features = features.unsqueeze(0)
    if features.ndim != 3 or features.shape[-1] != width or features.shape[0] == 0 or features.shape[1] == 0:
        raise InputError(
            f"{what} has shape {tuple(features.shape)}; this model needs [V, n, {width}] (or [n, {width}]) {kind}."
        )
    if not features.is_floating_point():
        raise InputTypeError(f"{what} has dtype {features.dtype}; expected floating point.")
    # View by view: isfinite's temporaries over all of [V, n, d] would cost more than the features.
    for view in range(features.shape[0]):
        if torch.isfinite(features[view]).all():
            continue
        image, column = (~torch.isfinite(features[view])).nonzero()[0].tolist()
        raise InputError(
            f"{what} contains NaN or Inf (first at view {view}, image {image}, column {column}); "
            "re-extract them, or drop that image."
        )
    return features
