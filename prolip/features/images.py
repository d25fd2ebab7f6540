"""Turning user images (paths, PIL images, arrays, tensors) into RGB uint8 tensors."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from prolip.errors import ImageLoadError, InputError, InputTypeError, ProLIPError, SkippedImagesWarning, warn
from prolip.features.dataset_objects import DatasetImages, as_dataset_images
from prolip.features.decode import exif_transpose, open_image_file, to_rgb
from prolip.params import ON_ERROR
from prolip.progress import progress

ImageLike = str | os.PathLike | Image.Image | torch.Tensor | np.ndarray
"""Anything prolip accepts as one image: a file path, a PIL image, an HWC/HW numpy array, or a
CHW/HW tensor (uint8 in 0..255, or floating point in 0..1)."""


class SkippedImage(NamedTuple):
    """An image left out under ``on_error="skip"``: its position, what it was, and why."""

    index: int
    item: str
    reason: str


class LoadedImages(NamedTuple):
    """What :func:`load_images_skipping` returns (``images``: a list, or :class:`LazyImages` for a dataset object)."""

    images: Sequence[Any]
    kept: list[int]
    skipped: list[SkippedImage]


class LazyImages(Sequence):
    """The kept images of a dataset object, each read and loaded only when asked for, so that a large dataset is
    never held in memory at once (extraction asks for each image once per pass)."""

    def __init__(self, source: DatasetImages, kept: Sequence[int], load_one: Callable[[ImageLike, int], Any]) -> None:
        self._source, self._kept, self._load_one = source, kept, load_one

    def __len__(self) -> int:
        return len(self._kept)

    def __getitem__(self, k: int | slice) -> Any:  # type: ignore[override]
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        i = self._kept[k]
        return self._load_one(self._source[i], i)


def _describe(item: object, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return f"image {index} ({os.fspath(item)!r})"
    return f"image {index} ({type(item).__name__})"


def _from_array(arr: np.ndarray | torch.Tensor, index: int, channels_first: bool) -> torch.Tensor:
    what = _describe(arr, index)
    t = torch.as_tensor(arr).detach().cpu()
    if t.ndim == 2:
        t = t.unsqueeze(0) if channels_first else t.unsqueeze(-1)
    if t.ndim != 3:
        raise InputError(f"{what} has shape {tuple(t.shape)}; expected {'CHW' if channels_first else 'HWC'} or HW.")
    if not channels_first:
        t = t.permute(2, 0, 1)
    if t.shape[0] not in (1, 3, 4) or t.shape[1] == 0 or t.shape[2] == 0:
        raise InputError(f"{what} has shape {tuple(t.shape)}; expected 1, 3 or 4 channels and a non-empty size.")
    if t.dtype == torch.uint8:
        pass
    elif t.is_floating_point():
        if not torch.isfinite(t).all():
            raise InputError(f"{what} contains NaN or Inf values.")
        if t.min() < 0 or t.max() > 1:
            raise InputError(f"{what} is floating point with values outside [0, 1]; scale it to [0, 1] or pass uint8.")
        t = (t.float() * 255).round().to(torch.uint8)
    else:
        raise InputTypeError(f"{what} has dtype {t.dtype}; pass uint8 (0..255) or floating point (0..1).")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 4:
        alpha = t[3:].float() / 255
        t = (t[:3].float() * alpha + 255 * (1 - alpha)).round().to(torch.uint8)
    return t.contiguous()


def _pil_image(item: ImageLike, index: int, draft_size: int | None) -> Image.Image | None:
    """A path or PIL image decoded (EXIF orientation applied), in RGB; None for arrays and tensors."""
    if isinstance(item, (str, os.PathLike)):
        img = open_image_file(os.fspath(item), _describe(item, index), draft_size)
    elif isinstance(item, Image.Image):
        try:
            item.load()
            img = exif_transpose(item, _describe(item, index))
        except Exception as exc:  # a lazily-opened PIL image decodes here; see open_image_file
            raise ImageLoadError(
                f"{_describe(item, index)} could not be decoded ({type(exc).__name__}: {exc}); "
                "the file it was opened from may be truncated or corrupt."
            ) from exc
    elif isinstance(item, (torch.Tensor, np.ndarray)):
        return None
    else:
        raise InputTypeError(
            f"{_describe(item, index)} is not a supported image; pass a file path, a PIL image, "
            "a numpy HWC array or a CHW tensor."
        )
    return to_rgb(img, _describe(item, index))


def load_image(item: ImageLike, index: int = 0, draft_size: int | None = None) -> torch.Tensor:
    """Load one image as an RGB ``uint8`` tensor ``[3, H, W]``.

    Args:
        item: a path, a PIL image, an HWC/HW numpy array or a CHW/HW tensor.
        index: position of the item in the caller's list, used in error messages.
        draft_size: if given, JPEG files are decoded at the smallest of 1/1, 1/2 or 1/4 scale
            whose shorter side is still at least this (cheap decoding of huge photos).

    Raises:
        ImageLoadError: the file is missing, empty, truncated or not an image.
        InputError / InputTypeError: an in-memory image has an unusable shape, dtype or range.
    """
    img = _pil_image(item, index, draft_size)
    if img is None:
        return _from_array(item, index, channels_first=isinstance(item, torch.Tensor))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def load_pil_image(item: ImageLike, index: int = 0) -> Image.Image:
    """Load one image as a full-resolution RGB PIL image (what a user ``preprocess`` transform takes)."""
    img = _pil_image(item, index, None)
    if img is None:
        return Image.fromarray(
            _from_array(item, index, channels_first=isinstance(item, torch.Tensor)).permute(1, 2, 0).numpy()
        )
    return img


def _check_sequence(items: object) -> Sequence:
    source = as_dataset_images(items)
    if source is not None:
        return source
    if isinstance(items, (str, bytes, os.PathLike, Image.Image)) or (
        isinstance(items, (torch.Tensor, np.ndarray)) and items.ndim < 3
    ):
        raise InputTypeError(
            "images must be a sequence of images (a list of paths, PIL images or tensors), not a single image."
        )
    if not isinstance(items, Iterable):
        raise InputTypeError(
            f"images must be a sequence of images (a list of paths, PIL images or tensors), not {type(items).__name__}."
        )
    return list(items)


def load_images(items: Sequence[ImageLike], draft_size: int | None = None) -> list[torch.Tensor]:
    """Load every image of ``items`` with :func:`load_image`; raises on the first bad one."""
    return [load_image(item, i, draft_size) for i, item in enumerate(_check_sequence(items))]


def load_images_skipping(
    items: Sequence[ImageLike],
    draft_size: int | None = None,
    on_error: str = "skip",
    loader: Callable[[ImageLike, int], Any] | None = None,
    verbose: bool = False,
) -> LoadedImages:
    """Load ``items``, leaving out (``on_error="skip"``) or raising on (``"raise"``) unusable ones.

    ``loader(item, index)`` loads one image; the default is :func:`load_image` with ``draft_size``.
    A dataset object (:mod:`prolip.features.dataset_objects`) gives :class:`LazyImages` instead of a
    list; ``verbose`` shows a progress bar over its first pass.

    Any per-image :class:`~prolip.errors.ProLIPError` (unreadable file, unusable array) counts as
    unusable; a wrong argument type for ``items`` itself always raises.

    Returns:
        the loaded images, the indices in ``items`` they came from, and one
        :class:`SkippedImage` per image left out.
    """
    if on_error not in ON_ERROR:
        raise InputError(f"on_error={on_error!r} must be one of {list(ON_ERROR)}.")
    items = _check_sequence(items)
    load_one = loader or functools.partial(load_image, draft_size=draft_size)
    if isinstance(items, DatasetImages):
        return _load_lazily(items, load_one, on_error, verbose)
    if on_error == "raise":
        return LoadedImages([load_one(item, i) for i, item in enumerate(items)], list(range(len(items))), [])
    images, kept, skipped = [], [], []
    for i, item in enumerate(items):
        try:
            images.append(load_one(item, i))
        except ProLIPError as exc:
            desc = os.fspath(item) if isinstance(item, (str, os.PathLike)) else type(item).__name__
            skipped.append(SkippedImage(i, desc, str(exc)))
        else:
            kept.append(i)
    return LoadedImages(images, kept, skipped)


def _load_lazily(
    source: DatasetImages, load_one: Callable[[ImageLike, int], Any], on_error: str, verbose: bool
) -> LoadedImages:
    """A dataset object's images as :class:`LazyImages`; with ``on_error="skip"``, one pass first finds the
    unusable ones (each image is loaded and dropped), so that extraction never meets them."""
    if on_error == "raise":  # a bad image raises when extraction reaches it, named by its index
        return LoadedImages(LazyImages(source, range(len(source)), load_one), list(range(len(source))), [])
    kept, skipped = [], []
    for i in progress(range(len(source)), desc="checking images", unit="img", verbose=verbose, leave=False):
        try:
            load_one(source[i], i)
        except ProLIPError as exc:
            skipped.append(SkippedImage(i, f"{source.description} item", str(exc)))
        else:
            kept.append(i)
    return LoadedImages(LazyImages(source, kept, load_one), kept, skipped)


def load_for_model(
    items: Sequence[ImageLike],
    on_error: str,
    draft_size: int | None = None,
    as_pil: bool = False,
    verbose: bool = False,
) -> LoadedImages:
    """Load a user's images for a model: tensors, or full-resolution PIL images with ``as_pil``.

    ``verbose`` shows a progress bar over a dataset object's first pass (``on_error="skip"``).

    Follow with :func:`report_skipped`, once the caller has recorded what was skipped.
    """
    loader = load_pil_image if as_pil else None
    return load_images_skipping(items, draft_size, on_error=on_error, loader=loader, verbose=verbose)


def kept(items: Sequence[Any], skipped: Sequence[SkippedImage]) -> list[Any]:
    """The ``items`` (e.g. labels) that belong to the images a load kept, in order: those not in ``skipped``."""
    dropped = {s.index for s in skipped}
    return [item for i, item in enumerate(items) if i not in dropped]


def report_skipped(result: LoadedImages) -> None:
    """Warn about skipped images (one :class:`SkippedImagesWarning` naming the first ten), or fail if none is left.

    Raises:
        ImageLoadError: every image was unreadable.
        InputError: there were no images at all.
    """
    if result.skipped:
        shown = "; ".join(f"image {s.index} ({s.item!r})" for s in result.skipped[:10])
        more = f" and {len(result.skipped) - 10} more" if len(result.skipped) > 10 else ""
        if not result.images:
            raise ImageLoadError(
                f"all {len(result.skipped)} images were unreadable: {shown}{more}. "
                f"First reason: {result.skipped[0].reason}"
            )
        warn(
            SkippedImagesWarning(
                f"skipped {len(result.skipped)} of {len(result.skipped) + len(result.images)} unreadable images "
                f"(on_error='skip'): {shown}{more}; the warning's skipped (and an adapter's skipped_ after fit) "
                "give the reasons.",
                result.skipped,
            )
        )
    if not result.images:
        raise InputError("images is empty; pass at least one image.")
