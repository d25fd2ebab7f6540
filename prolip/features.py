"""Pre-projection feature extraction: images in, ``[V, n, d_in]`` features out, computed once."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from prolip.projector import Projector
from prolip.views import ViewConfig, augmented_views, plain_views, sample_crops

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
) -> torch.Tensor:
    """Pre-projection features of ``views`` augmented views of every image.

    Args:
        projector: the model's projector (its tower must already be on ``device`` in ``dtype``).
        images: RGB uint8 tensors ``[3, H, W]`` (see :func:`prolip.images.load_image`).
        views: number of augmented views per image; 0 means one plain test-time view.
        config: crop, flip and normalisation settings.
        seed: seed of the crop/flip generator; the same seed gives the same views.
        batch_size: images per forward pass.
        device: where the tower runs.
        dtype: the tower's precision; images are cast to it.
        verbose: show a progress bar.
        preprocess: optional test-time transform (PIL image -> CHW tensor) used instead of the
            built-in plain view when ``views`` is 0, e.g. the transform open_clip returned.

    Returns:
        float32 CPU tensor ``[max(views, 1), n, d_in]``; ``[v, i]`` is view ``v`` of image ``i``.
    """
    n = len(images)
    n_views = max(views, 1)
    pairs = [(v, i) for v in range(n_views) for i in range(n)]
    crops = sample_crops([tuple(im.shape[-2:]) for im in images], views, config, seed) if views else None
    on_device = [im.to(device) for im in images]
    out = torch.empty(n_views, n, projector.in_features, dtype=torch.float32)
    flat = out.view(n_views * n, -1)
    what = f"{views} views" if views else "test view"
    # The output is allocated outside inference mode so that training can use it with autograd.
    with (
        torch.inference_mode(),
        tqdm(total=len(pairs), desc=f"features ({what})", unit="img", disable=not verbose, leave=False) as bar,
    ):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            if crops is None and preprocess is not None:
                pil = [Image.fromarray(images[i].permute(1, 2, 0).numpy()) for _, i in chunk]
                pixels = torch.stack([preprocess(im) for im in pil]).to(device)
            elif crops is None:
                pixels = plain_views([on_device[i] for _, i in chunk], config)
            else:
                pixels = augmented_views(on_device, chunk, crops, config)
            feats = projector.features(pixels.to(dtype))
            flat[start : start + len(chunk)] = feats.float().cpu()
            bar.update(len(chunk))
    logger.debug("extracted %s features of %d images on %s", what, n, device)
    return out
