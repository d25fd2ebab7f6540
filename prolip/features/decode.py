"""Image files to RGB PIL images: decoding, EXIF orientation, and every PIL mode to 8-bit RGB. numpy and PIL only.

The first step of every image prolip reads (:mod:`prolip.features.images`), and of the reference client of an
exported classifier (:mod:`prolip.files.client`), which runs without torch: one definition of how a file becomes
pixels, so a client decodes exactly as ``prolip predict`` does.
"""

from __future__ import annotations

import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from prolip.errors import ImageLoadError, warn

ALPHA_BACKGROUND = (255, 255, 255)
"""The colour transparent pixels are composited onto (white)."""


def to_rgb(img: Image.Image, what: str) -> Image.Image:
    """Convert any PIL mode to RGB: transparency over white, 16-bit and float scaled to 8 bits.

    Float images follow the rule of float arrays in memory: values in [0, 1] are scaled by 255, and
    NaN or Inf pixels are refused (ImageLoadError naming ``what``), never silently made 0.
    """
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float32)  # float32 holds 16-bit values exactly, at half float64's memory
        if img.mode == "F" and not np.isfinite(arr).all():
            raise ImageLoadError(f"{what} is a floating-point image with NaN or Inf pixels; fix or remove it.")
        top = arr.max(initial=0.0)
        if img.mode == "F" and arr.min(initial=0.0) >= 0 and top <= 1:
            arr = arr * 255.0  # a float image in [0, 1], as float arrays in memory are read
        # 16-bit data is rescaled; data that already fits in 8 bits is kept as is.
        arr = arr * (255.0 / 65535.0) if top > 255 else arr
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def exif_transpose(img: Image.Image, what: str) -> Image.Image:
    """Apply the EXIF orientation; a corrupt EXIF block is ignored rather than losing the image."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # PIL's EXIF parser raises many types on malformed tags
        warn(f"{what} has unreadable EXIF data ({exc}); its orientation is not applied.")
        return img


def open_image_file(path: str, what: str, draft_size: int | None = None) -> Image.Image:
    """Decode the image file ``path`` (EXIF orientation applied), in its own mode; ``what`` names it in errors.

    Args:
        path: the file; a link is followed, but what it names must be a regular file.
        what: how errors name the image (e.g. ``"image 3 ('a.jpg')"``).
        draft_size: if given, a JPEG decodes at 1/2 or 1/4 scale where its shorter side stays at least this
            (never 1/8: that scale keeps only each block's mean, a box filter a later resize cannot hide).

    Raises:
        ImageLoadError: the file is missing, a directory, not a regular file (a FIFO or device: reading one could
            block for ever), empty, unreadable, not an image, too large to decode safely, truncated or corrupt.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageLoadError(f"{what} does not exist; check the path.") from None
    except OSError as exc:
        raise ImageLoadError(f"{what} cannot be read ({exc.strerror}); check the path and its permissions.") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageLoadError(f"{what} is a directory, not an image file; list the files inside it.")
    if not stat.S_ISREG(info.st_mode):
        raise ImageLoadError(f"{what} is not a regular file (a FIFO, device or socket); pass image files only.")
    if info.st_size == 0:
        raise ImageLoadError(f"{what} is an empty (zero-byte) file; re-copy or remove it.")
    try:
        with warnings.catch_warnings():
            # Large photos are fine: JPEGs decode at reduced scale, and memory is the only limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if draft_size is not None:
                    floor = -(-min(img.size) // 4)
                    img.draft("RGB", (max(draft_size, floor), max(draft_size, floor)))
                img.load()  # decode first, so that decoding errors are not mistaken for EXIF ones
                return exif_transpose(img, what)
    except PermissionError as exc:
        raise ImageLoadError(f"{what} cannot be read ({exc.strerror}); check the file's permissions.") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{what} is not an image PIL can read; remove it or convert it.") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{what} is too large to decode safely ({exc}); downscale it first.") from exc
    except MemoryError as exc:
        raise ImageLoadError(f"{what} needs more memory to decode than is available; downscale it first.") from exc
    except Exception as exc:  # a decoder fed a damaged file can raise almost any type (struct.error, zlib.error, ...)
        raise ImageLoadError(
            f"{what} could not be decoded ({type(exc).__name__}: {exc}); the file may be truncated or corrupt. "
            "Re-copy or remove it, or pass on_error='skip'."
        ) from exc
