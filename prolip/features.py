"""Pre-projection feature extraction: images in, ``[V, n, d_in]`` features out, computed once.

The crops and flips of an image's views come from a generator seeded by the run's seed and the
image's content hash (:func:`image_seed`), so an image gets the same views whatever list it is
in, at whatever position, in whatever batch, and whether its features come from memory or from
the on-disk cache (:mod:`prolip.cache`). Identical images therefore get identical views.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from prolip.cache import FeatureCache
from prolip.errors import InputError
from prolip.projector import Projector
from prolip.views import CropParams, ViewConfig, augmented_views, plain_views, sample_crops, shrink

logger = logging.getLogger(__name__)


def select_device(device: str | torch.device | None = None) -> torch.device:
    """The device to use: the one given, else CUDA, then Apple MPS, then the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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
    projector: Projector,
    images: Sequence[torch.Tensor],
    views: int,
    config: ViewConfig,
    *,
    seeds: Sequence[int] | None,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    preprocess: Callable[[Image.Image], Any] | None,
    bar: tqdm,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(i, float32 CPU [max(views, 1), d_in])`` per image, in order, once all its views are done.

    Only the images of the current batch are held on the device, so memory does not grow with n.
    """
    n, n_views = len(images), max(views, 1)
    prepared: dict[int, tuple[torch.Tensor, CropParams | None]] = {}
    rows: dict[int, torch.Tensor] = {}
    for start in range(0, n * n_views, batch_size):
        # Image-major order: a batch holds many views of few images, which batch well.
        chunk = [(p % n_views, p // n_views) for p in range(start, min(start + batch_size, n * n_views))]
        with torch.inference_mode():
            for _, i in chunk:
                if i not in prepared:
                    on_device = shrink(images[i].to(device), 2 * config.size)
                    crops = sample_crops([tuple(on_device.shape[-2:])], views, config, seeds[i]) if views else None
                    prepared[i] = (on_device, crops)
            if views:
                local = list(dict.fromkeys(i for _, i in chunk))
                position = {i: k for k, i in enumerate(local)}
                crops = _concat_crops([prepared[i][1] for i in local])
                pairs = [(v, position[i]) for v, i in chunk]
                pixels = augmented_views([prepared[i][0] for i in local], pairs, crops, config)
            elif preprocess is not None:
                pil = [Image.fromarray(images[i].permute(1, 2, 0).cpu().numpy()) for _, i in chunk]
                pixels = torch.stack([preprocess(im) for im in pil]).to(device)
            else:
                pixels = plain_views([prepared[i][0] for _, i in chunk], config)
            feats = projector.features(pixels.to(dtype)).float().cpu()
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


def extract_features(
    projector: Projector,
    images: Sequence[torch.Tensor],
    views: int,
    config: ViewConfig,
    *,
    seed: int,
    batch_size: int = 64,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    verbose: bool = True,
    preprocess: Callable[[Image.Image], Any] | None = None,
    hashes: Sequence[str] | None = None,
) -> torch.Tensor:
    """Pre-projection features of ``views`` augmented views of every image, in memory.

    Args:
        projector: the model's projector (its tower must already be on ``device`` in ``dtype``).
        images: RGB uint8 tensors ``[3, H, W]`` (see :func:`prolip.images.load_image`).
        views: number of augmented views per image; 0 means one plain test-time view.
        config: crop, flip and normalisation settings.
        seed: seed of the crop/flip generators (see :func:`image_seed`); the same seed gives the
            same views.
        batch_size: images per forward pass.
        device: where the tower runs.
        dtype: the tower's precision; images are cast to it.
        verbose: show a progress bar.
        preprocess: optional test-time transform (PIL image -> CHW tensor) used instead of the
            built-in plain view when ``views`` is 0, e.g. the transform open_clip returned.
        hashes: the images' :func:`image_hash` values, if already known.

    Returns:
        float32 CPU tensor ``[max(views, 1), n, d_in]``; ``[v, i]`` is view ``v`` of image ``i``.
    """
    n = len(images)
    seeds = None
    if views:
        hashes = hashes if hashes is not None else [image_hash(im) for im in images]
        seeds = [image_seed(seed, h) for h in hashes]
    out = torch.empty(max(views, 1), n, projector.in_features, dtype=torch.float32)
    what = f"{views} views" if views else "test view"
    with tqdm(total=n * max(views, 1), desc=f"features ({what})", unit="img", disable=not verbose, leave=False) as bar:
        for i, row in _iter_features(
            projector,
            images,
            views,
            config,
            seeds=seeds,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            preprocess=preprocess,
            bar=bar,
        ):
            out[:, i] = row
    logger.debug("extracted %s features of %d images on %s", what, n, device)
    return out


def fill_cache(
    projector: Projector,
    images: Sequence[torch.Tensor],
    cache: FeatureCache,
    config: ViewConfig,
    *,
    batch_size: int = 64,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
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
    if views < 1:
        raise InputError(f"views={views} cannot be cached; only augmented views (views >= 1) are.")
    if not 0 <= rank < world_size:
        raise InputError(f"rank={rank} must be in [0, world_size={world_size}).")
    cache.open()
    hashes = list(hashes) if hashes is not None else [image_hash(im) for im in images]
    first = {h: i for i, h in reversed(list(enumerate(hashes)))}  # distinct images, first occurrence
    mine = [h for k, h in enumerate(dict.fromkeys(hashes)) if k % world_size == rank]
    todo = [h for h in mine if not cache.has(h)]
    logger.info(
        "feature cache %s: %d of %d images to compute (%d cached or on other ranks)",
        cache.folder,
        len(todo),
        len(hashes),
        len(hashes) - len(todo),
    )
    if todo:
        subset = [images[first[h]] for h in todo]
        seeds = [image_seed(seed, h) for h in todo]
        desc = f"features ({views} views, cached)"
        with tqdm(total=len(todo) * views, desc=desc, unit="img", disable=not verbose, leave=False) as bar:
            for k, row in _iter_features(
                projector,
                subset,
                views,
                config,
                seeds=seeds,
                batch_size=batch_size,
                device=device,
                dtype=dtype,
                preprocess=None,
                bar=bar,
            ):
                cache.write(todo[k], row)
    return todo
