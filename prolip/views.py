"""Training views (random resized crop + flip) and the plain test-time view, as tensor ops.

Crop parameters for every (view, image) pair are drawn up front from one seeded generator, so the
views do not depend on batch size or device; the crops themselves are cut and resized on
whatever device the images live on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_ATTEMPTS = 10  # same number of tries as torchvision's RandomResizedCrop


@dataclass(frozen=True)
class ViewConfig:
    """How images become model inputs.

    Attributes:
        size: model input side (square).
        mean, std: per-channel normalisation of the model.
        scale: range of the crop's area as a fraction of the image (ProLIP: 0.5 to 1).
        ratio: range of the crop's aspect ratio.
        flip_p: probability of a horizontal flip.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5


@dataclass(frozen=True)
class CropParams:
    """Crop boxes and flips for ``V`` views of ``n`` images; every field has shape ``[V, n]``."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor


def sample_crops(sizes: Sequence[tuple[int, int]], views: int, config: ViewConfig, seed: int) -> CropParams:
    """Draw RandomResizedCrop boxes and flips for ``views`` views of images of the given (H, W).

    Follows torchvision's RandomResizedCrop: up to ten tries of (area, log-ratio), the first box
    that fits wins, otherwise a central crop clamped to the ratio range.
    """
    gen = torch.Generator().manual_seed(seed)
    n = len(sizes)
    hw = torch.tensor(sizes, dtype=torch.float64).reshape(n, 2)
    img_h, img_w = hw[:, 0], hw[:, 1]
    u_area = torch.rand(views, n, _ATTEMPTS, generator=gen, dtype=torch.float64)
    u_ratio = torch.rand(views, n, _ATTEMPTS, generator=gen, dtype=torch.float64)
    u_top = torch.rand(views, n, generator=gen, dtype=torch.float64)
    u_left = torch.rand(views, n, generator=gen, dtype=torch.float64)
    u_flip = torch.rand(views, n, generator=gen, dtype=torch.float64)

    lo, hi = config.scale
    area = (img_h * img_w)[None, :, None] * (lo + (hi - lo) * u_area)
    log_lo, log_hi = math.log(config.ratio[0]), math.log(config.ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (h > 0) & (w <= img_w[None, :, None]) & (h <= img_h[None, :, None])
    first = fits.to(torch.int8).argmax(dim=-1, keepdim=True)
    w_pick = w.gather(-1, first).squeeze(-1)
    h_pick = h.gather(-1, first).squeeze(-1)

    # Fallback when no try fits: the whole image, trimmed to the ratio range.
    in_ratio = img_w / img_h
    fb_w = torch.where(in_ratio > config.ratio[1], (img_h * config.ratio[1]).round(), img_w)
    fb_h = torch.where(in_ratio < config.ratio[0], (img_w / config.ratio[0]).round(), img_h)
    any_fit = fits.any(dim=-1)
    w_pick = torch.where(any_fit, w_pick, fb_w[None].expand(views, n)).clamp(min=1)
    h_pick = torch.where(any_fit, h_pick, fb_h[None].expand(views, n)).clamp(min=1)
    top = torch.where(any_fit, torch.floor(u_top * (img_h - h_pick + 1)), ((img_h - h_pick) / 2).round())
    left = torch.where(any_fit, torch.floor(u_left * (img_w - w_pick + 1)), ((img_w - w_pick) / 2).round())
    return CropParams(
        top=top.long(),
        left=left.long(),
        height=h_pick.long(),
        width=w_pick.long(),
        flip=u_flip < config.flip_p,
    )


def _normalize(batch: torch.Tensor, config: ViewConfig) -> torch.Tensor:
    mean = torch.tensor(config.mean, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch / 255.0 - mean) / std


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased resize of one uint8 ``[3, h, w]`` image to float ``[1, 3, *size]``."""
    out = F.interpolate(image[None].float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return out.clamp_(0, 255)


def augmented_views(
    images: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]], crops: CropParams, config: ViewConfig
) -> torch.Tensor:
    """Render the augmented views ``(view, image)`` in ``pairs`` as a normalised float batch."""
    out = []
    side = (config.size, config.size)
    for v, i in pairs:
        t, lft = int(crops.top[v, i]), int(crops.left[v, i])
        h, w = int(crops.height[v, i]), int(crops.width[v, i])
        view = _resize(images[i][:, t : t + h, lft : lft + w], side)
        out.append(view.flip(-1) if bool(crops.flip[v, i]) else view)
    return _normalize(torch.cat(out), config)


def plain_views(images: Sequence[torch.Tensor], config: ViewConfig) -> torch.Tensor:
    """The test-time view of each image: shorter side resized to ``size``, centre crop, normalise.

    This mirrors open_clip's default preprocessing (Resize(size, bicubic) + CenterCrop(size)).
    """
    out = []
    for image in images:
        h, w = image.shape[-2:]
        # Same rounding as torchvision's Resize(int) and CenterCrop.
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(config.size * long / short)
        new_h, new_w = (config.size, new_long) if h <= w else (new_long, config.size)
        resized = _resize(image, (new_h, new_w))
        top, left = round((new_h - config.size) / 2), round((new_w - config.size) / 2)
        out.append(resized[..., top : top + config.size, left : left + config.size])
    return _normalize(torch.cat(out), config)
