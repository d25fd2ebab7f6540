"""Pre-projection feature extraction: images in, ``[V, n, d_in]`` features out, computed once.

Towers whose embedding adds a per-image residual after the projector (SigLIP) get it stored
beside x in each row, ``[V, n, d_in + d_out]`` (:meth:`prolip.model.towers.Projector.pack`).

The crops and flips of an image's views come from a generator seeded by the run's seed and the
image's content hash (:func:`image_seed`), so an image gets the same views whatever list it is
in, at whatever position, in whatever batch, and whether its features come from memory or from
the on-disk cache (:mod:`prolip.features.cache`). Identical images therefore get identical views.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Subset
from tqdm.auto import tqdm

from prolip.errors import InputError
from prolip.features.cache import CachedFeatures, CacheKey, FeatureCache
from prolip.features.images import SkippedImage
from prolip.features.views import CropParams, augmented_views, plain_views, sample_crops, shrink
from prolip.model.backbone import Backbone
from prolip.progress import progress

logger = logging.getLogger(__name__)


class Extracted(NamedTuple):
    """Features of the readable images of a list, and the images left out (``on_error="skip"``)."""

    features: torch.Tensor | CachedFeatures
    skipped: list[SkippedImage]


def image_hash(image: torch.Tensor) -> str:
    """SHA-256 of a decoded image (uint8 ``[3, H, W]``): its shape, then its bytes in row-major order."""
    pixels = image.detach().to("cpu", torch.uint8).contiguous()
    digest = hashlib.sha256(f"uint8{tuple(pixels.shape)}".encode())
    digest.update(pixels.numpy().data)
    return digest.hexdigest()


def image_seed(seed: int, content_hash: str) -> int:
    """Seed of one image's crop/flip generator, from the run's seed and the image's content hash."""
    digest = hashlib.sha256(f"prolip-views:{int(seed)}:{content_hash}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative 63-bit int, as manual_seed wants


def _concat_crops(parts: Sequence[CropParams]) -> CropParams:
    """Crop parameters ``[V, 1]`` of several images side by side, ``[V, k]``."""
    return CropParams(
        **{f: torch.cat([getattr(p, f) for p in parts], dim=1) for f in ("top", "left", "height", "width", "flip")}
    )


def _iter_features(
    backbone: Backbone,
    images: Sequence[torch.Tensor],
    views: int,
    *,
    seeds: Sequence[int] | None,
    batch_size: int,
    bar: tqdm,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(i, float32 CPU [max(views, 1), d_in])`` per image, in order, once all its views are done.

    Only the images of the current batch are held on the device, so memory does not grow with n.
    """
    n, n_views, config = len(images), max(views, 1), backbone.view_config
    prepared: dict[int, tuple[torch.Tensor, CropParams | None]] = {}
    rows: dict[int, torch.Tensor] = {}
    for start in range(0, n * n_views, batch_size):
        # Image-major order: a batch holds many views of few images, which batch well.
        chunk = [(p % n_views, p // n_views) for p in range(start, min(start + batch_size, n * n_views))]
        with torch.inference_mode():
            for _, i in chunk:
                if i not in prepared:
                    on_device = images[i].to(backbone.device)
                    if views:  # crops need at most a 2x downscale, which the view sampler antialiases
                        on_device = shrink(on_device, 2 * config.size)
                    crops = sample_crops([tuple(on_device.shape[-2:])], views, config, seeds[i]) if views else None
                    prepared[i] = (on_device, crops)
            if views:
                local = list(dict.fromkeys(i for _, i in chunk))
                position = {i: k for k, i in enumerate(local)}
                crops = _concat_crops([prepared[i][1] for i in local])
                pairs = [(v, position[i]) for v, i in chunk]
                pixels = augmented_views([prepared[i][0] for i in local], pairs, crops, config)
            else:  # the plain view from the full image, as open_clip's own transform sees it
                pixels = plain_views([prepared[i][0] for _, i in chunk], config)
            feats = backbone.projector.pack(*backbone.projector.features(pixels.to(backbone.dtype))).float().cpu()
        # Rows are allocated outside inference mode so that training can use them with autograd.
        for k, (v, i) in enumerate(chunk):
            row = rows.get(i)
            if row is None:
                row = rows[i] = torch.empty(n_views, feats.shape[1])
            row[v] = feats[k]
            if v == n_views - 1:
                del prepared[i]
                yield i, rows.pop(i)
        bar.update(len(chunk))


def _iter_preprocessed(
    backbone: Backbone,
    images: Sequence[Image.Image],
    preprocess: Callable[[Image.Image], Any],
    batch_size: int,
    bar: tqdm,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(i, [1, d_in])`` per image for a user's own test-time transform of full-resolution PIL images."""
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        pixels = torch.stack([preprocess(im) for im in batch]).to(backbone.device, backbone.dtype)
        with torch.inference_mode():
            feats = backbone.projector.pack(*backbone.projector.features(pixels)).float().cpu()
        for k in range(len(batch)):
            yield start + k, feats[k : k + 1].clone()
        bar.update(len(batch))


def extract_features(
    backbone: Backbone,
    images: Sequence[torch.Tensor] | Sequence[Image.Image],
    views: int,
    *,
    seed: int,
    batch_size: int = 64,
    verbose: bool = True,
    preprocess: Callable[[Image.Image], Any] | None = None,
) -> torch.Tensor:
    """Pre-projection features of ``views`` augmented views of every image, in memory.

    Args:
        backbone: the model (its tower runs on ``backbone.device`` in ``backbone.dtype``).
        images: RGB uint8 tensors ``[3, H, W]`` (see :func:`prolip.features.images.load_image`), or with
            ``preprocess``, full-resolution PIL images (:func:`prolip.features.images.load_pil_image`).
        views: number of augmented views per image; 0 means one plain test-time view.
        seed: seed of the crop/flip generators (see :func:`image_seed`); the same seed gives the
            same views.
        batch_size: images per forward pass.
        verbose: show a progress bar.
        preprocess: a user's test-time transform (PIL image -> CHW tensor), used instead of the
            built-in plain view; only with ``views == 0``.

    Returns:
        float32 CPU tensor ``[max(views, 1), n, d_in]``; ``[v, i]`` is view ``v`` of image ``i``.
        For towers with a per-image residual (:attr:`prolip.model.towers.Projector.has_residual`), each
        row also holds the residual r beside x: ``[..., d_in + d_out]``.
    """
    if preprocess is not None and views:
        raise InputError("a preprocess transform gives the plain test-time view only; use it with views=0.")
    n = len(images)
    seeds = [image_seed(seed, image_hash(im)) for im in images] if views else None
    out = torch.empty(max(views, 1), n, backbone.projector.feature_width, dtype=torch.float32)
    what = f"{views} views" if views else "test view"
    with progress(total=n * max(views, 1), desc=f"features ({what})", unit="img", verbose=verbose, leave=False) as bar:
        rows = (
            _iter_preprocessed(backbone, images, preprocess, batch_size, bar)
            if preprocess is not None
            else _iter_features(backbone, images, views, seeds=seeds, batch_size=batch_size, bar=bar)
        )
        for i, row in rows:
            out[:, i] = row
    logger.debug("extracted %s features of %d images on %s", what, n, backbone.device)
    return out


def feature_cache(
    backbone: Backbone, root: str | os.PathLike, *, views: int, seed: int, storage: str = "fp16"
) -> FeatureCache:
    """The on-disk cache of ``backbone``'s features for one view setting (see :mod:`prolip.features.cache`).

    ``views=0`` caches the plain test-time view (one row per image).
    """
    key = CacheKey(
        model=backbone.tower_hash,
        precision=backbone.precision,
        config=backbone.view_config,
        seed=seed,
        views=views,
        storage=storage,
    )
    return FeatureCache(root, key, backbone.projector.feature_width)


def fill_cache(
    backbone: Backbone,
    images: Sequence[torch.Tensor],
    cache: FeatureCache,
    *,
    batch_size: int = 64,
    verbose: bool = True,
    hashes: Sequence[str] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> list[str]:
    """Compute and store the features of the images the cache lacks; return the hashes computed.

    Views, seed and storage dtype come from ``cache.key``. Each image is written as soon as its
    views are done, so an interrupted run loses at most the images of one batch; a rerun
    computes only the images without an entry.

    With ``world_size > 1``, this process handles the distinct images at positions
    ``rank, rank + world_size, ...`` (in order of first appearance); together the processes
    cover every image, and an image another process already stored is not recomputed.
    """
    views, seed = cache.key.views, cache.key.seed
    if not 0 <= rank < world_size:
        raise InputError(f"rank={rank} must be in [0, world_size={world_size}).")
    cache.open()
    hashes = list(hashes) if hashes is not None else [image_hash(im) for im in images]
    first = {h: i for i, h in reversed(list(enumerate(hashes)))}  # distinct images, first occurrence
    mine = [h for k, h in enumerate(dict.fromkeys(hashes)) if k % world_size == rank]
    todo = [h for h in mine if not cache.has(h)]
    logger.debug(
        "feature cache %s: %d of %d images to compute (%d cached or on other ranks)",
        cache.folder,
        len(todo),
        len(hashes),
        len(hashes) - len(todo),
    )
    if todo:
        subset = Subset(images, [first[h] for h in todo])  # by index: a lazy dataset's images are loaded one by one
        seeds = [image_seed(seed, h) for h in todo] if views else None
        desc = f"features ({views} views, cached)" if views else "features (test view, cached)"
        with progress(total=len(todo) * max(views, 1), desc=desc, unit="img", verbose=verbose, leave=False) as bar:
            for k, row in _iter_features(backbone, subset, views, seeds=seeds, batch_size=batch_size, bar=bar):
                cache.write(todo[k], row)
    return todo


def features_of(
    backbone: Backbone,
    images: Sequence[torch.Tensor] | Sequence[Image.Image],
    views: int,
    *,
    seed: int,
    batch_size: int = 64,
    verbose: bool = True,
    preprocess: Callable[[Image.Image], Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_dtype: str = "fp16",
) -> torch.Tensor | CachedFeatures:
    """Features of loaded images as an estimator asks for them: in memory, or with ``cache_dir`` and
    augmented views (``views > 0``), through the on-disk cache as lazy :class:`CachedFeatures`."""
    if cache_dir is None or views == 0:
        return extract_features(
            backbone, images, views, seed=seed, batch_size=batch_size, verbose=verbose, preprocess=preprocess
        )
    cache = feature_cache(backbone, cache_dir, views=views, seed=seed, storage=cache_dtype)
    hashes = [image_hash(im) for im in images]

    def recompute(_: list[str]) -> None:  # what lacks a valid entry (never computed, or damaged and deleted)
        fill_cache(backbone, images, cache, batch_size=batch_size, verbose=verbose, hashes=hashes)

    return cache.features(hashes, recompute)
