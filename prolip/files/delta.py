"""The delta file: one safetensors file with what a fit learned — its kind, its configuration, its tensors.

Layout (format version 3), PEFT's shape in one file:

* metadata ``format`` (``prolip-delta``), ``format_version`` (``3``), ``kind`` (``projector``, ``tip_adapter``
  or ``linear_adapter``: which estimator reads it), ``prolip_version``, and ``config``: the typed
  configuration of the fitted state as canonical JSON (:meth:`prolip.training.fitted.FittedState.config`:
  classes, class names, templates, N, λ, s, the base model and its fingerprints, the hyperparameters, the
  validation search, the Tip-Adapter cache's α and β, ...);
* tensors by state-dict key: the vision delta at its projector's key (e.g. ``visual.proj``), the text delta at
  the text projection's (e.g. ``text_projection``), a linear adapter's A − I at ``prolip.linear_adapter``, T at
  ``prolip.classifier``, and Tip-Adapter's keys and labels at ``prolip.cache_keys`` / ``prolip.cache_labels``.

The same fit writes the same bytes (:func:`prolip.atomic.safetensors_bytes`). Reading checks the container here
(a bounded header, nothing unpickled, a known format version) and the contents in one place,
:meth:`~prolip.training.fitted.FittedState.from_config`; configuration keys a newer prolip added are warned about
and ignored. Files of version 2 (prolip 0.1 before the one format: the same fields as flat metadata) are read
through the same checks; version 1 was never released and is not read. Writing is atomic
(:func:`prolip.atomic.atomic_write`): a crash leaves either the old file or the complete new one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from prolip._version import __version__
from prolip.atomic import atomic_write, read_safetensors_header, remove_stale_temps, safetensors_bytes, temp_prefix
from prolip.errors import DeltaFileError, InputTypeError
from prolip.training.fitted import CONFIG_SCHEMA, KINDS, LABEL_TYPES, LINEAR_ADAPTER_KEY, FittedState

FORMAT_NAME = "prolip-delta"
FORMAT_VERSION = 3
READ_VERSIONS = (2, 3)
"""The format versions this prolip reads."""
MAX_HEADER_BYTES = 16 * 1024 * 1024  # real headers are a few KB; refuse absurd declared sizes
_V2_JSON = ("classes", "class_names", "templates", "hyperparameters", "fingerprint", "text_fingerprint", "selection")
_V2_NUMBERS = ("n_shots", "reg_lambda", "logit_scale")


def write_delta(path: str | os.PathLike, state: FittedState) -> None:
    """Write ``state`` as a delta file of its kind, atomically; the same state gives the same bytes.

    Temporary files of the same target older than :data:`prolip.atomic.STALE_TEMP_SECONDS` (left
    by killed writers) are removed.

    Raises:
        InputTypeError: a label is not a string, number or boolean (JSON could not hold it).
        DeltaFileError: the file cannot be written (missing folder, no permission, a directory
            in the way, disk full); the message names the path.
    """
    path = os.fspath(path)
    for c in state.classes:
        if not isinstance(c, LABEL_TYPES):
            raise InputTypeError(f"label {c!r} cannot be saved; use str, int, float or bool labels.")
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "kind": state.kind,
        "prolip_version": __version__,
        "config": json.dumps(state.config(), sort_keys=True, separators=(",", ":"), allow_nan=False),
    }
    data = safetensors_bytes(state.tensors(), metadata)
    if os.path.isdir(path):
        raise DeltaFileError(f"cannot write delta file {path!r}: it is a directory; give a file name.")
    remove_stale_temps(os.path.dirname(os.path.abspath(path)), prefix=temp_prefix(path))
    try:
        atomic_write(path, [data])
    except OSError as exc:
        raise DeltaFileError(
            f"cannot write delta file {path!r} ({exc.strerror or exc}); check that the folder exists, "
            "is writable and has free space."
        ) from exc


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A delta file's format fields, ``kind`` and ``config`` (decoded, not yet checked), without reading its tensors.

    Raises:
        DeltaFileError: as :func:`read_state`, for the container and the format version.
    """
    return _open(os.fspath(path), tensors=False)[0]


def read_state(path: str | os.PathLike) -> FittedState:
    """Read and validate a delta file of any kind; nothing in it is executed or unpickled.

    Raises:
        DeltaFileError: the file is missing, not safetensors, truncated, lacks metadata, has an
            unknown format version or kind, malformed metadata, or tensors of unexpected names,
            dtypes, shapes or values. The message names the file.
    """
    path = os.fspath(path)
    meta, tensors = _open(path, tensors=True)
    return FittedState.from_config(meta["kind"], meta["config"], tensors, repr(path))


def _open(path: str, tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The format fields, kind and configuration of the file, and with ``tensors`` its tensors by name."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise DeltaFileError(f"delta file {path!r} does not exist (or is not a file); check the path.")
    loaded: dict[str, torch.Tensor] = {}
    try:
        read_safetensors_header(path, DeltaFileError, MAX_HEADER_BYTES, "delta file")
        with safe_open(path, framework="pt") as f:
            meta = _format(path, dict(f.metadata() or {}))
            if tensors:
                loaded = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except DeltaFileError:
        raise
    except Exception as exc:  # safetensors and the OS raise various types on damaged files
        raise DeltaFileError(
            f"{path!r} could not be read as a safetensors delta file ({type(exc).__name__}: {exc}); "
            "the file is corrupt, truncated, or another format."
        ) from exc
    return meta, loaded


def _format(path: str, raw: dict[str, str]) -> dict[str, Any]:
    """Check the format fields and return them with ``kind`` and the ``config`` mapping (any supported version)."""
    missing = [key for key in ("format", "format_version") if key not in raw]
    if missing:
        raise DeltaFileError(
            f"{path!r} lacks prolip metadata {missing}; it was not written by prolip's save "
            "(or was damaged). Re-save the delta or use the original file."
        )
    if raw["format"] != FORMAT_NAME:
        raise DeltaFileError(f"{path!r} has format {raw['format'][:100]!r}, expected {FORMAT_NAME!r}.")
    try:
        version = int(raw["format_version"])
    except ValueError:  # also a number of more than 4300 digits
        raise DeltaFileError(f"{path!r} has a malformed format_version {raw['format_version'][:100]!r}.") from None
    if version > FORMAT_VERSION:
        raise DeltaFileError(
            f"{path!r} uses delta format version {version}, newer than this prolip understands "
            f"({FORMAT_VERSION}); upgrade prolip (pip install -U prolip)."
        )
    if version not in READ_VERSIONS:
        raise DeltaFileError(
            f"{path!r} has format_version {version}, which no released prolip wrote; this prolip reads versions "
            f"{list(READ_VERSIONS)}. Fit and save it again."
        )
    if version == 3 and "kind" not in raw:
        raise DeltaFileError(f"{path!r} lacks prolip metadata ['kind']; it was damaged. Use the original file.")
    kind = raw.get("kind", "projector")  # version 2 files written before other kinds existed are projector deltas
    if kind not in KINDS:
        raise DeltaFileError(f"{path!r} has malformed metadata 'kind': expected one of {list(KINDS)}.")
    config = _json(path, "config", raw) if version == 3 else _version_2(path, kind, raw)
    if not isinstance(config, dict):
        raise DeltaFileError(f"{path!r} has malformed metadata 'config': expected a JSON object.")
    return {
        "format": FORMAT_NAME,
        "format_version": version,
        "kind": kind,
        "prolip_version": raw.get("prolip_version", ""),
        "config": config,
    }


def _json(path: str, key: str, raw: dict[str, str]) -> Any:
    if key not in raw:
        raise DeltaFileError(
            f"{path!r} lacks prolip metadata [{key!r}]; it was not written by prolip (or was damaged). "
            "Re-save the delta or use the original file."
        )
    try:
        return json.loads(raw[key])
    except (ValueError, RecursionError) as exc:  # deeply nested JSON exhausts the parser's stack
        raise DeltaFileError(f"{path!r} has malformed metadata {key!r} ({type(exc).__name__}).") from None


def _version_2(path: str, kind: str, raw: dict[str, str]) -> dict[str, Any]:
    """A version 2 file's flat metadata as version 3's configuration: the same fields, some of them JSON text."""
    flat = dict(raw)
    if "base_fingerprint" in flat:
        flat["fingerprint"] = flat.pop("base_fingerprint")
    if "cache" in flat:
        flat["cache"] = _json(path, "cache", flat)
    config: dict[str, Any] = {}
    for key in CONFIG_SCHEMA:
        if key not in flat:
            continue
        if key in _V2_JSON:
            config[key] = _json(path, key, flat)
        elif key in _V2_NUMBERS:
            try:
                config[key] = float(flat[key])
            except ValueError:
                raise DeltaFileError(f"{path!r} has malformed metadata {key!r}: expected a number.") from None
        else:
            config[key] = flat[key]
    if kind == "linear_adapter":  # version 2 kept A − I at this key without naming it
        config.update(projector_key=LINEAR_ADAPTER_KEY, projector_family="linear_adapter")
        config.setdefault("fingerprint", None)
    return config
