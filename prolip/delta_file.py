"""The delta file: one safetensors file with the trained projector delta, T, and string metadata.

Layout (format version 1):

* tensor ``<projector key>`` (e.g. ``visual.proj``): W − W0, float32, in the parameter's own
  orientation;
* tensor ``prolip.classifier``: the zero-shot classifier T, float32 ``[K, d_out]``;
* metadata (all strings): see :data:`REQUIRED_METADATA`; lists and dicts are JSON.

Reading never unpickles: safetensors holds raw tensors and a JSON header, the header size is
checked before anything is parsed, and every field is type-checked before use (see
docs/security.md). Writing is atomic: the file is written under a hidden temporary name
(``.prolip-<name>.<random>.tmp``) in the target folder, flushed to disk, then renamed over the
target, so a crash leaves either the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Any

import torch

from prolip.errors import DeltaFileError, ProLIPError

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
_LABEL_TYPES = (str, int, float, bool)


@dataclass
class DeltaFile:
    """The decoded contents of a delta file."""

    delta: torch.Tensor
    classifier: torch.Tensor
    metadata: dict[str, Any]


TEMP_PREFIX = ".prolip-"
TEMP_SUFFIX = ".tmp"
STALE_TEMP_SECONDS = 600  # a temp file this old was left by a killed writer, not one still running


def _temp_prefix(path: str) -> str:
    # The target's name (cut to stay well under filename limits) ties temp files to their target.
    return f"{TEMP_PREFIX}{os.path.basename(path)[:100]}."


def _remove_stale_temps(path: str) -> None:
    """Delete temp files of this target left behind by writers that were killed mid-write."""
    folder, prefix = os.path.dirname(os.path.abspath(path)), _temp_prefix(path)
    now = time.time()
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and name.endswith(TEMP_SUFFIX):
            stale = os.path.join(folder, name)
            try:
                if now - os.stat(stale).st_mtime > STALE_TEMP_SECONDS:
                    os.unlink(stale)
            except OSError:  # already gone, or not ours to delete: harmless either way
                pass


def write_delta(
    path: str | os.PathLike, delta: torch.Tensor, classifier: torch.Tensor, metadata: dict[str, Any]
) -> None:
    """Write a delta file atomically (temporary file in the same folder, fsync, then rename).

    ``metadata`` values under ``classes``, ``class_names``, ``templates`` and
    ``hyperparameters`` are JSON-encoded; every other value is stored with ``str``. Temporary
    files of the same target older than :data:`STALE_TEMP_SECONDS` (left by killed writers) are
    removed.

    Raises:
        DeltaFileError: the file cannot be written (missing folder, no permission, a directory
            in the way, disk full); the message names the path.
    """
    from safetensors.torch import save

    path = os.fspath(path)
    header = {k: json.dumps(v) if k in _JSON_KEYS else str(v) for k, v in metadata.items()}
    header.update(format=FORMAT_NAME, format_version=str(FORMAT_VERSION))
    tensors = {
        metadata["projector_key"]: delta.detach().to("cpu", torch.float32).contiguous(),
        CLASSIFIER_KEY: classifier.detach().to("cpu", torch.float32).contiguous(),
    }
    data = save(tensors, metadata=header)
    if os.path.isdir(path):
        raise DeltaFileError(f"cannot write delta file {path!r}: it is a directory; give a file name.")
    _remove_stale_temps(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f"{_temp_prefix(path)}{secrets.token_hex(8)}{TEMP_SUFFIX}")
    try:
        # O_EXCL: never write through someone else's file; mode 0o666 lets the umask decide, as open() would.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise DeltaFileError(
            f"cannot write delta file {path!r} ({exc.strerror or exc}); check that the folder exists, "
            "is writable and has free space."
        ) from exc
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_header(
    path: str | os.PathLike,
    error: type[ProLIPError] = DeltaFileError,
    max_bytes: int = MAX_HEADER_BYTES,
    what: str = "delta file",
) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its tensor data starts.

    The declared header size is checked against ``max_bytes`` and the file size before anything
    is parsed, so a pickle or a hostile length is refused without reading it. Raises ``error``,
    with a message naming the file and calling it a ``what``.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise error(f"{path!r} is too short ({size} bytes) to be a safetensors {what}; it is truncated or corrupt.")
        (n,) = struct.unpack("<Q", head)
        if n > max_bytes or 8 + n > size:
            raise error(
                f"{path!r} is not a valid safetensors file (declared header of {n} bytes, file of {size} bytes); "
                "it may be truncated, corrupted, or another format such as a pickle."
            )
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            header = None
    if not isinstance(header, dict):
        raise error(f"{path!r} could not be read as a safetensors {what} (malformed header); the file is corrupt.")
    return header, 8 + n


def _load_json(path: str, key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # deeply nested JSON exhausts the parser's stack
        raise DeltaFileError(f"{path!r} has malformed metadata {key!r} ({type(exc).__name__}).") from None


def _parse_metadata(path: str, raw: dict[str, str]) -> dict[str, Any]:
    """Check every metadata field's presence, type and range; return them decoded."""
    missing = [k for k in REQUIRED_METADATA if k not in raw]
    if missing:
        raise DeltaFileError(
            f"{path!r} lacks prolip metadata {missing}; it was not written by ProLIPAdapter.save "
            "(or was damaged). Re-save the delta or use the original file."
        )
    if raw["format"] != FORMAT_NAME:
        raise DeltaFileError(f"{path!r} has format {raw['format'][:100]!r}, expected {FORMAT_NAME!r}.")
    try:
        version = int(raw["format_version"])
    except ValueError:
        raise DeltaFileError(f"{path!r} has a malformed format_version {raw['format_version'][:100]!r}.") from None
    if version < 1:
        raise DeltaFileError(f"{path!r} has an invalid format_version {version}.")
    if version > FORMAT_VERSION:
        raise DeltaFileError(
            f"{path!r} uses delta format version {version}, newer than this prolip understands "
            f"({FORMAT_VERSION}); upgrade prolip (pip install -U prolip)."
        )
    meta: dict[str, Any] = dict(raw)
    for key in _JSON_KEYS:
        meta[key] = _load_json(path, key, raw[key])

    def bad(key: str, expected: str) -> DeltaFileError:
        return DeltaFileError(f"{path!r} has malformed metadata {key!r}: expected {expected}.")

    classes = meta["classes"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, _LABEL_TYPES) for c in classes)):
        raise bad("classes", "a non-empty JSON list of strings, numbers or booleans")
    try:
        unique = len(set(classes)) == len(classes)
    except TypeError:
        unique = False
    if not unique:
        raise bad("classes", "distinct labels")
    names = meta["class_names"]
    if not (isinstance(names, list) and len(names) == len(classes) and all(isinstance(n, str) for n in names)):
        raise bad("class_names", f"a JSON list of {len(classes)} strings")
    templates = meta["templates"]
    if not (isinstance(templates, list) and templates and all(isinstance(t, str) for t in templates)):
        raise bad("templates", "a non-empty JSON list of strings")
    if not isinstance(meta["hyperparameters"], dict):
        raise bad("hyperparameters", "a JSON object")
    for key in ("n_shots", "logit_scale"):
        try:
            value = float(raw[key])
        except ValueError:
            raise bad(key, "a number") from None
        if not (math.isfinite(value) and value > 0):
            raise bad(key, "a finite positive number")
        meta[key] = value
    if not meta["projector_key"] or meta["projector_key"] == CLASSIFIER_KEY:
        raise bad("projector_key", "a parameter name such as 'visual.proj'")
    return meta


def read_delta(path: str | os.PathLike) -> DeltaFile:
    """Read and validate a delta file; nothing in it is executed or unpickled.

    Raises:
        DeltaFileError: the file is missing, not safetensors, truncated, lacks metadata, has an
            unknown format version, malformed metadata, or tensors of unexpected names, dtypes,
            shapes or values. The message names the file.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DeltaFileError(f"delta file {path!r} does not exist (or is not a file); check the path.")
    try:
        read_header(path)
        with safe_open(path, framework="pt") as f:
            raw = dict(f.metadata() or {})
            meta = _parse_metadata(path, raw)
            key = meta["projector_key"]
            expected = {key, CLASSIFIER_KEY}
            names = set(f.keys())
            if names != expected:
                raise DeltaFileError(
                    f"{path!r} holds tensors {sorted(names)[:10]}, expected {sorted(expected)}; "
                    "it is not a delta written by ProLIPAdapter.save."
                )
            # Shapes and dtypes are checked from the header before any tensor data is read.
            shapes = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in expected}
            n_classes = len(meta["classes"])
            (d_shape, d_dtype), (c_shape, c_dtype) = shapes[key], shapes[CLASSIFIER_KEY]
            if (
                len(d_shape) != 2
                or len(c_shape) != 2
                or c_shape[0] != n_classes
                or min(*d_shape, *c_shape) < 1
                or d_dtype != "F32"
                or c_dtype != "F32"
            ):
                raise DeltaFileError(
                    f"{path!r} has inconsistent contents: delta {tuple(d_shape)} {d_dtype}, classifier "
                    f"{tuple(c_shape)} {c_dtype}, {n_classes} classes; it is damaged or not a prolip delta."
                )
            delta, classifier = f.get_tensor(key), f.get_tensor(CLASSIFIER_KEY)
    except DeltaFileError:
        raise
    except Exception as exc:  # safetensors and the OS raise various types on damaged files
        raise DeltaFileError(
            f"{path!r} could not be read as a safetensors delta file ({type(exc).__name__}: {exc}); "
            "the file is corrupt, truncated, or another format."
        ) from exc
    if not (torch.isfinite(delta).all() and torch.isfinite(classifier).all()):
        raise DeltaFileError(f"{path!r} holds NaN or Inf values; it is damaged.")
    return DeltaFile(delta=delta, classifier=classifier, metadata=meta)
