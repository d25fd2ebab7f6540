"""Training views (random resized crop + flip) and the plain test-time view, as tensor ops.

Crop parameters for every (view, image) pair are drawn up front from one seeded generator, so the
views do not depend on batch size or device; the crops themselves are cut and resized on
whatever device the images live on. The plain view follows the model's own open_clip
preprocessing configuration (resize mode, interpolation, fill colour, size, normalisation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prolip.model.preprocessing import ViewConfig

_ATTEMPTS = 10  # same number of tries as torchvision's RandomResizedCrop

VIEWS_VERSION = 2
"""Version of the view rendering. Part of every feature-cache key: bump it whenever a change here
changes the pixels of any view, so that features rendered the old way are never reused."""


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


def _resize(image: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Antialiased resize of uint8 ``[3, h, w]`` (or ``[b, 3, h, w]``) to float ``[b, 3, *size]``.

    Antialiasing scales the filter with the downscale factor, as PIL's (and so open_clip's) resize does.
    """
    batch = image if image.ndim == 4 else image[None]
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch.float()
    out = F.interpolate(batch.float(), size=size, mode=mode, antialias=True, align_corners=False)
    return out.clamp_(0, 255)


def shrink(image: torch.Tensor, max_short_side: int) -> torch.Tensor:
    """``image`` (uint8 ``[3, H, W]``) shrunk, antialiased, so its shorter side is at most ``max_short_side``.

    Crops then never need more than about a 2x downscale, which the view sampler antialiases.
    """
    h, w = image.shape[-2:]
    if min(h, w) <= max_short_side:
        return image
    size = (max(1, round(h * max_short_side / min(h, w))), max(1, round(w * max_short_side / min(h, w))))
    return _resize(image, size).round_().to(torch.uint8)[0]


def _group_by_size(images: Sequence[torch.Tensor], which: Sequence[int]) -> dict[tuple[int, int], list[int]]:
    """Positions in ``which`` grouped by the (H, W) of the image they name, so each group stacks."""
    groups: dict[tuple[int, int], list[int]] = {}
    for pos, i in enumerate(which):
        groups.setdefault(tuple(images[i].shape[-2:]), []).append(pos)
    return groups


def crop_grid(theta: torch.Tensor, side: int) -> torch.Tensor:
    """``F.affine_grid(theta, [N, C, side, side], align_corners=False)`` for axis-aligned maps, faster.

    ``theta`` ``[N, 2, 3]`` scales and shifts each axis (no rotation or shear: ``theta[:, 0, 1]`` and
    ``theta[:, 1, 0]`` are zero), so a grid point's x depends on its column only and its y on its
    row only. This runs affine_grid's own product (the base grid's ``(x, y, 1)`` rows times
    ``thetaᵀ``) on one row and one column of the grid and broadcasts them, instead of on all
    side² points (3-4x faster on CPU). The products have other shapes than affine_grid's, so a BLAS may
    round them differently in the last bit; a test checks agreement to 1e-6.
    """
    n = theta.shape[0]
    # affine_grid's base coordinates: linspace(-1, 1) * (steps - 1) / steps, in this order of roundings.
    coords = torch.linspace(-1, 1, side, device=theta.device, dtype=theta.dtype) * (side - 1) / side
    ones = torch.ones_like(coords)
    row = torch.stack((coords, coords[0] * ones, ones), dim=-1)  # (x_j, y_0, 1): y's weight is zero
    column = torch.stack((coords[0] * ones, coords, ones), dim=-1)  # (x_0, y_i, 1): x's weight is zero
    maps = theta.transpose(1, 2)
    x = row.expand(n, side, 3).bmm(maps)[..., 0]  # [N, side]: x of every column
    y = column.expand(n, side, 3).bmm(maps)[..., 1]  # [N, side]: y of every row
    return torch.stack((x[:, None, :].expand(n, side, side), y[:, :, None].expand(n, side, side)), dim=-1)


def augmented_views(
    images: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]], crops: CropParams, config: ViewConfig
) -> torch.Tensor:
    """Render the augmented views ``(view, image)`` in ``pairs`` as a normalised float batch.

    All views of same-sized images are cut, resized and flipped by one batched bicubic
    ``grid_sample`` on the images' device (the flip is a negated x-scale of the sampling grid).
    Where a crop is larger than the output, the grid is sampled at twice the output resolution
    and 2x2-averaged, which stands in for the antialiasing of a PIL/torchvision resize.
    """
    side = config.size
    device = images[pairs[0][1]].device
    v_idx = torch.tensor([v for v, _ in pairs])
    i_idx = torch.tensor([i for _, i in pairs])
    top, left = crops.top[v_idx, i_idx].double(), crops.left[v_idx, i_idx].double()
    height, width = crops.height[v_idx, i_idx].double(), crops.width[v_idx, i_idx].double()
    flip = crops.flip[v_idx, i_idx]
    out = torch.empty(len(pairs), 3, side, side, device=device)
    for (img_h, img_w), positions in _group_by_size(images, i_idx.tolist()).items():
        pos = torch.tensor(positions)
        # Affine map from output coordinates in [-1, 1] to the crop box, align_corners=False convention.
        theta = torch.zeros(len(positions), 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = torch.where(flip[pos], -1.0, 1.0) * width[pos] / img_w
        theta[:, 0, 2] = (2 * left[pos] + width[pos]) / img_w - 1
        theta[:, 1, 1] = height[pos] / img_h
        theta[:, 1, 2] = (2 * top[pos] + height[pos]) / img_h - 1
        factor = 2 if bool((height[pos] > side).any() or (width[pos] > side).any()) else 1
        grid = crop_grid(theta.float().to(device), side * factor)
        source = torch.stack([images[int(i_idx[p])] for p in positions]).float()
        views = F.grid_sample(source, grid, mode="bicubic", padding_mode="border", align_corners=False)
        out[pos.to(device)] = F.avg_pool2d(views, factor) if factor > 1 else views
    return _normalize(out.clamp_(0, 255), config)


def plain_views(images: Sequence[torch.Tensor], config: ViewConfig) -> torch.Tensor:
    """The test-time view of each image, normalised: open_clip's inference transform as tensor ops.

    Follows ``config.resize_mode`` and ``config.interpolation`` with torchvision's and open_clip's
    rounding (``Resize`` + ``CenterCrop``, ``ResizeKeepRatio`` + ``CenterCropOrPad``, or a squash
    ``Resize``). Resampling is torch's antialiased kernel where open_clip resizes PIL images with
    PIL's, so values differ from open_clip's by float rounding and the two kernels' small
    differences (tests/test_views.py measures it).
    """
    out = torch.empty(len(images), 3, config.size, config.size, device=images[0].device)
    for (h, w), positions in _group_by_size(images, range(len(images))).items():
        out[positions] = _plain_batch(torch.stack([images[p] for p in positions]), h, w, config)
    return _normalize(out, config)


def _plain_batch(batch: torch.Tensor, h: int, w: int, config: ViewConfig) -> torch.Tensor:
    """Resize and crop (or pad) same-sized uint8 images ``[b, 3, h, w]`` to float ``[b, 3, size, size]``."""
    side, mode = config.size, config.interpolation
    if config.resize_mode == "squash":
        return _resize(batch, (side, side), mode)
    if config.resize_mode == "longest":  # ResizeKeepRatio(longest=1): the longer side becomes `side`
        ratio = max(h, w) / side
        resized = _resize(batch, (round(h / ratio), round(w / ratio)), mode)
    else:  # torchvision Resize(int): the shorter side becomes `side`, the longer one is truncated
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(side * long / short)
        resized = _resize(batch, (side, new_long) if h <= w else (new_long, side), mode)
    return _center_crop_or_pad(resized, side, config.fill_color)


def _center_crop_or_pad(batch: torch.Tensor, side: int, fill: int) -> torch.Tensor:
    """torchvision's CenterCrop (open_clip's CenterCropOrPad): pad with ``fill`` where smaller, then crop."""
    h, w = batch.shape[-2:]
    if h < side or w < side:
        pad_w, pad_h = max(side - w, 0), max(side - h, 0)
        batch = F.pad(batch, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=float(fill))
        h, w = batch.shape[-2:]
    top, left = round((h - side) / 2), round((w - side) / 2)  # Python's round, as torchvision's int(round())
    return batch[..., top : top + side, left : left + side]
