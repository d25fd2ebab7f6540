"""The delta file: one safetensors file with the trained projector delta, T, and string metadata.

Layout (format version 1):

* tensor ``<projector key>`` (e.g. ``visual.proj``): W − W0, float32, in the parameter's own
  orientation;
* tensor ``prolip.classifier``: the zero-shot classifier T, float32 ``[K, d_out]``;
* metadata (all strings): see :data:`REQUIRED_METADATA`; lists and dicts are JSON.

Reading never unpickles: safetensors holds raw tensors and a JSON header, and the header size is
checked before anything is parsed.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from prolip.errors import DeltaFileError

FORMAT_NAME = "prolip-delta"
FORMAT_VERSION = 1
CLASSIFIER_KEY = "prolip.classifier"
MAX_HEADER_BYTES = 16 * 1024 * 1024  # real headers are a few KB; refuse absurd declared sizes
REQUIRED_METADATA = (
    "format",
    "format_version",
    "prolip_version",
    "model_name",
    "pretrained",
    "projector_family",
    "projector_key",
    "base_fingerprint",
    "classes",
    "class_names",
    "templates",
    "hyperparameters",
    "n_shots",
    "logit_scale",
)
_JSON_KEYS = ("classes", "class_names", "templates", "hyperparameters")


@dataclass
class DeltaFile:
    """The decoded contents of a delta file."""

    delta: torch.Tensor
    classifier: torch.Tensor
    metadata: dict[str, Any]


def write_delta(
    path: str | os.PathLike, delta: torch.Tensor, classifier: torch.Tensor, metadata: dict[str, Any]
) -> None:
    """Write a delta file atomically (temporary file in the same folder, then rename).

    ``metadata`` values under ``classes``, ``class_names``, ``templates`` and
    ``hyperparameters`` are JSON-encoded; every other value is stored with ``str``.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    header = {k: json.dumps(v) if k in _JSON_KEYS else str(v) for k, v in metadata.items()}
    header.update(format=FORMAT_NAME, format_version=str(FORMAT_VERSION))
    tensors = {
        metadata["projector_key"]: delta.detach().to("cpu", torch.float32).contiguous(),
        CLASSIFIER_KEY: classifier.detach().to("cpu", torch.float32).contiguous(),
    }
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".prolip-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_header(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise DeltaFileError(f"{path!r} is too short ({size} bytes) to be a prolip delta file.")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise DeltaFileError(
            f"{path!r} is not a valid safetensors file (declared header of {n} bytes, file of {size} bytes); "
            "it may be truncated, corrupted, or another format such as a pickle."
        )


def read_delta(path: str | os.PathLike) -> DeltaFile:
    """Read and validate a delta file.

    Raises:
        DeltaFileError: the file is missing, not safetensors, truncated, lacks metadata, has an
            unknown format version, or holds tensors of inconsistent shapes.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DeltaFileError(f"delta file {path!r} does not exist (or is not a file).")
    _check_header(path)
    try:
        with safe_open(path, framework="pt") as f:
            raw = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DeltaFileError(
            f"{path!r} could not be read as safetensors ({exc}); the file is corrupt or truncated."
        ) from exc

    missing = [k for k in REQUIRED_METADATA if k not in raw]
    if missing:
        raise DeltaFileError(f"{path!r} lacks prolip metadata {missing}; it was not written by ProLIPAdapter.save.")
    if raw["format"] != FORMAT_NAME:
        raise DeltaFileError(f"{path!r} has format {raw['format']!r}, expected {FORMAT_NAME!r}.")
    try:
        version = int(raw["format_version"])
    except ValueError:
        raise DeltaFileError(f"{path!r} has a malformed format_version {raw['format_version']!r}.") from None
    if version > FORMAT_VERSION:
        raise DeltaFileError(
            f"{path!r} uses delta format version {version}, newer than this prolip understands "
            f"({FORMAT_VERSION}); upgrade prolip (pip install -U prolip)."
        )
    meta: dict[str, Any] = dict(raw)
    try:
        for key in _JSON_KEYS:
            meta[key] = json.loads(raw[key])
        meta["n_shots"] = float(raw["n_shots"])
        meta["logit_scale"] = float(raw["logit_scale"])
    except ValueError as exc:
        raise DeltaFileError(f"{path!r} has malformed metadata ({exc}).") from exc

    key = meta["projector_key"]
    expected = {key, CLASSIFIER_KEY}
    if set(tensors) != expected:
        raise DeltaFileError(f"{path!r} holds tensors {sorted(tensors)}, expected {sorted(expected)}.")
    delta, classifier = tensors[key], tensors[CLASSIFIER_KEY]
    n_classes = len(meta["classes"]) if isinstance(meta["classes"], list) else -1
    if (
        delta.ndim != 2
        or classifier.ndim != 2
        or classifier.shape[0] != n_classes
        or not isinstance(meta["class_names"], list)
        or len(meta["class_names"]) != n_classes
        or delta.dtype != torch.float32
        or classifier.dtype != torch.float32
    ):
        raise DeltaFileError(
            f"{path!r} has inconsistent contents: delta {tuple(delta.shape)} {delta.dtype}, classifier "
            f"{tuple(classifier.shape)} {classifier.dtype}, {n_classes} classes."
        )
    if not (torch.isfinite(delta).all() and torch.isfinite(classifier).all()):
        raise DeltaFileError(f"{path!r} holds NaN or Inf values.")
    return DeltaFile(delta=delta, classifier=classifier, metadata=meta)
