"""A reference client of an exported classifier, in numpy and PIL only: image files in, class probabilities out.

It reproduces prolip's test view (:func:`prolip.files.export.test_view` lists the steps; a test holds it to 1e-5 of
``prolip predict``'s own pixels) and runs an ONNX file with onnxruntime — no torch, no prolip training code —
so it is both what a Python client can use as is and the specification a client in another language follows::

    from prolip.files.client import ExportedClassifier

    classifier = ExportedClassifier("pets.onnx")  # reads the description inside the file
    classifier.predict_proba(["cat.jpg"])  # [n, K], columns follow classifier.classes
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from prolip.errors import InputError
from prolip.features.decode import open_image_file, to_rgb

DESCRIPTION_KEY = "prolip"  # as prolip.files.export.DESCRIPTION_KEY (that module imports torch)
_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}


def load_pixels(image: str | os.PathLike | Image.Image, preprocessing: Mapping[str, Any]) -> np.ndarray:
    """The model input of one image, float32 ``[3, size, size]``, as prolip's test view makes it.

    Args:
        image: an image file (decoded as prolip decodes it) or a PIL image.
        preprocessing: the ``preprocessing`` entry of an exported classifier's description.
    """
    if isinstance(image, Image.Image):
        rgb = to_rgb(image, "the image")
    else:
        rgb = to_rgb(open_image_file(os.fspath(image), repr(os.fspath(image)), preprocessing["jpeg_draft_min_side"]),
                     repr(os.fspath(image)))  # fmt: skip
    pixels = np.asarray(rgb, dtype=np.float64)  # [H, W, 3] in 0..255
    side, mode = int(preprocessing["size"]), preprocessing["resize_mode"]
    h, w = pixels.shape[:2]
    if mode == "squash":
        size = (side, side)
    elif mode == "longest":
        ratio = max(h, w) / side
        size = (round(h / ratio), round(w / ratio))
    else:  # shortest: torchvision's Resize(int), the longer side truncated
        short, long = (h, w) if h <= w else (w, h)
        size = (side, int(side * long / short)) if h <= w else (int(side * long / short), side)
    if size != (h, w):
        pixels = resize(pixels, size, preprocessing["kernel"], float(preprocessing["bicubic_a"]))
    pixels = _center_crop_or_pad(pixels, side, float(preprocessing["fill_color"]))
    mean, std = np.asarray(preprocessing["mean"]), np.asarray(preprocessing["std"])
    return ((pixels / 255.0 - mean) / std).transpose(2, 0, 1).astype(np.float32)


def resize(pixels: np.ndarray, size: tuple[int, int], kernel: str = "bicubic", a: float = -0.5) -> np.ndarray:
    """Antialiased separable resize of float ``[H, W, C]`` to ``[*size, C]``, as torch's ``interpolate(antialias=True)``.

    Each output pixel i of an axis averages the inputs around its centre ``scale · (i + 0.5)`` with the filter,
    whose support grows with the downscale factor ``scale = in / out`` when shrinking; weights are normalised to
    sum to 1. An axis of unchanged size is left as it is. The result is clamped to [0, 255].
    """
    out = pixels
    if size[1] != pixels.shape[1]:
        out = np.einsum("ow,hwc->hoc", _weights(pixels.shape[1], size[1], kernel, a), out)
    if size[0] != pixels.shape[0]:
        out = np.einsum("oh,hwc->owc", _weights(pixels.shape[0], size[0], kernel, a), out)
    return np.clip(out, 0, 255)


def _weights(n_in: int, n_out: int, kernel: str, a: float) -> np.ndarray:
    """The ``[n_out, n_in]`` resampling matrix of one axis (float32 arithmetic for the taps, as torch's)."""
    f32 = np.float32
    scale = f32(n_in / n_out)
    support = f32(_SUPPORT[kernel]) * scale if scale >= 1 else f32(_SUPPORT[kernel])
    invscale = f32(1.0) / scale if scale >= 1 else f32(1.0)
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        center = scale * (f32(i) + f32(0.5))
        start = max(int(center - support + f32(0.5)), 0)
        stop = min(int(center + support + f32(0.5)), n_in)
        taps = np.array([_filter(f32((j - center + f32(0.5)) * invscale), kernel, a) for j in range(start, stop)])
        total = taps.sum(dtype=np.float32)
        matrix[i, start:stop] = taps / total if total != 0 else taps
    return matrix


def _filter(x: float, kernel: str, a: float) -> np.float32:
    x = abs(float(x))
    if kernel == "bilinear":
        return np.float32(max(0.0, 1.0 - x))
    if x < 1:
        return np.float32(((a + 2) * x - (a + 3)) * x * x + 1)
    if x < 2:
        return np.float32((((x - 5) * x + 8) * x - 4) * a)
    return np.float32(0.0)


def _center_crop_or_pad(pixels: np.ndarray, side: int, fill: float) -> np.ndarray:
    h, w = pixels.shape[:2]
    if h < side or w < side:
        pad_h, pad_w = max(side - h, 0), max(side - w, 0)
        pad = ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0))
        pixels = np.pad(pixels, pad, constant_values=fill)
        h, w = pixels.shape[:2]
    top, left = round((h - side) / 2), round((w - side) / 2)
    return pixels[top : top + side, left : left + side]


class ExportedClassifier:
    """An ONNX file written by ``prolip export`` (or ``ProLIPAdapter.export``), run with onnxruntime.

    Args:
        path: the ``.onnx`` file. Its description is read from inside it (``metadata_props``); without one, the
            JSON beside it (``path + ".json"``) is used, and refused if its SHA-256 is not the file's (a
            mismatched pair).

    Attributes:
        classes: the labels, in column order.
        class_names: their names.
        description: everything the file says about itself (:func:`prolip.files.export.description`).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import onnxruntime  # the export extra

        self.path = Path(path)
        data = self.path.read_bytes()
        self.session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        inside = self.session.get_modelmeta().custom_metadata_map.get(DESCRIPTION_KEY)
        self.description = json.loads(inside) if inside else _sidecar(self.path, data)
        self.classes: list[Any] = self.description["classes"]
        self.class_names: list[str] = self.description["class_names"]

    def predict_proba(self, images: Sequence[str | os.PathLike | Image.Image]) -> np.ndarray:
        """Class probabilities ``[n, K]`` of image files or PIL images."""
        pixels = np.stack([load_pixels(image, self.description["preprocessing"]) for image in images])
        name = self.description["input"]["name"]
        return self.session.run(None, {name: pixels})[0]

    def predict(self, images: Sequence[str | os.PathLike | Image.Image]) -> list[Any]:
        """The label of each image."""
        return [self.classes[i] for i in self.predict_proba(images).argmax(axis=1)]


def _sidecar(path: Path, data: bytes) -> dict[str, Any]:
    sidecar = Path(f"{path}.json")
    try:
        described = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{str(path)!r} holds no description and {str(sidecar)!r} cannot be read ({exc}).") from None
    digest = hashlib.sha256(data).hexdigest()
    if described.get("sha256") != digest:
        raise InputError(
            f"{str(sidecar)!r} describes another file than {str(path)!r} (SHA-256 differs): the pair is mismatched; "
            "export again."
        )
    return described
