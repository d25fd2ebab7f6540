"""The delta file: one safetensors file with the trained projector delta, T, and string metadata.

Layout (format version 2):

* tensor ``<projector key>`` (e.g. ``visual.proj``): W − W0, float32, in the parameter's own
  orientation;
* tensor ``prolip.classifier``: the zero-shot classifier T, float32 ``[K, d_out]``;
* metadata (all strings): see :data:`REQUIRED_METADATA`; lists, dicts and the fingerprint are JSON.
  Optional: ``selection`` (JSON), the validation search that chose lr and λ.

Version 2 records the base model as a precision-independent fingerprint of W0 and of the whole
vision tower (:mod:`prolip.fingerprint`) and the λ training used; version 1 files (a SHA-256 of
W0 cast to fp16, no λ) are still read.

Reading never unpickles: safetensors holds raw tensors and a JSON header, the header size is
checked before anything is parsed, and every field is type-checked before use (see
docs/security.md). Writing is atomic (:func:`prolip.files.atomic_write`): a crash leaves either
the old file or the complete new one.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch

from prolip._version import __version__
from prolip.errors import DeltaFileError, InputTypeError
from prolip.files import atomic_write, read_safetensors_header, remove_stale_temps, temp_prefix
from prolip.fingerprint import Fingerprint
from prolip.fitted import FittedState

FORMAT_NAME = "prolip-delta"
FORMAT_VERSION = 2
KIND = "projector"
CLASSIFIER_KEY = "prolip.classifier"
MAX_HEADER_BYTES = 16 * 1024 * 1024  # real headers are a few KB; refuse absurd declared sizes
REQUIRED_METADATA = (
    "format",
    "format_version",
    "kind",
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
    "reg_lambda",
    "logit_scale",
)
_V1_ABSENT = ("kind", "reg_lambda")  # fields format 1 did not have
_JSON_KEYS = ("classes", "class_names", "templates", "hyperparameters")
_LABEL_TYPES = (str, int, float, bool)


def write_delta(path: str | os.PathLike, state: FittedState) -> None:
    """Write ``state`` as a delta file, atomically.

    Temporary files of the same target older than :data:`prolip.files.STALE_TEMP_SECONDS` (left
    by killed writers) are removed.

    Raises:
        InputTypeError: a label is not a string, number or boolean (JSON could not hold it).
        DeltaFileError: the file cannot be written (missing folder, no permission, a directory
            in the way, disk full); the message names the path.
    """
    from safetensors.torch import save

    path = os.fspath(path)
    for c in state.classes:
        if not isinstance(c, _LABEL_TYPES):
            raise InputTypeError(f"label {c!r} cannot be saved; use str, int, float or bool labels.")
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "kind": KIND,
        "prolip_version": __version__,
        "model_name": state.model_name,
        "pretrained": state.pretrained,
        "projector_family": state.projector_family,
        "projector_key": state.projector_key,
        "base_fingerprint": json.dumps(state.fingerprint.as_dict()),
        "classes": json.dumps(list(state.classes)),
        "class_names": json.dumps(list(state.class_names)),
        "templates": json.dumps(list(state.templates)),
        "hyperparameters": json.dumps(dict(state.hyperparameters)),
        "n_shots": repr(float(state.n_shots)),
        "reg_lambda": repr(float(state.reg_lambda)),
        "logit_scale": repr(float(state.logit_scale)),
    }
    if state.selection is not None:
        header["selection"] = json.dumps(dict(state.selection))
    tensors = {
        state.projector_key: state.delta.detach().to("cpu", torch.float32).contiguous(),
        CLASSIFIER_KEY: state.classifier.detach().to("cpu", torch.float32).contiguous(),
    }
    data = save(tensors, metadata=header)
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


def _load_json(path: str, key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # deeply nested JSON exhausts the parser's stack
        raise DeltaFileError(f"{path!r} has malformed metadata {key!r} ({type(exc).__name__}).") from None


def _parse_metadata(path: str, raw: dict[str, str]) -> dict[str, Any]:
    """Check every metadata field's presence, type and range; return them decoded."""
    if "format" in raw and raw["format"] != FORMAT_NAME:
        raise DeltaFileError(f"{path!r} has format {raw['format'][:100]!r}, expected {FORMAT_NAME!r}.")
    try:
        version = int(raw.get("format_version", ""))
    except ValueError:
        version = None
    required = [k for k in REQUIRED_METADATA if version != 1 or k not in _V1_ABSENT]
    missing = [k for k in required if k not in raw]
    if missing:
        raise DeltaFileError(
            f"{path!r} lacks prolip metadata {missing}; it was not written by ProLIPAdapter.save "
            "(or was damaged). Re-save the delta or use the original file."
        )
    if version is None:
        raise DeltaFileError(f"{path!r} has a malformed format_version {raw['format_version'][:100]!r}.")
    if version < 1:
        raise DeltaFileError(f"{path!r} has an invalid format_version {version}.")
    if version > FORMAT_VERSION:
        raise DeltaFileError(
            f"{path!r} uses delta format version {version}, newer than this prolip understands "
            f"({FORMAT_VERSION}); upgrade prolip (pip install -U prolip)."
        )
    meta: dict[str, Any] = dict(raw)
    meta["format_version"] = version
    for key in _JSON_KEYS:
        meta[key] = _load_json(path, key, raw[key])

    def bad(key: str, expected: str) -> DeltaFileError:
        return DeltaFileError(f"{path!r} has malformed metadata {key!r}: expected {expected}.")

    if version > 1 and raw["kind"] != KIND:
        raise bad("kind", f"{KIND!r}")
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
    for key, low in (("n_shots", 0), ("logit_scale", 0), ("reg_lambda", None)):
        if key not in raw:
            continue
        try:
            value = float(raw[key])
        except ValueError:
            raise bad(key, "a number") from None
        if not (math.isfinite(value) and (value >= 0 if low is None else value > low)):
            raise bad(key, "a finite positive number" if low is not None else "a finite number >= 0")
        meta[key] = value
    if not meta["projector_key"] or meta["projector_key"] == CLASSIFIER_KEY:
        raise bad("projector_key", "a parameter name such as 'visual.proj'")
    meta["selection"] = None
    if "selection" in raw:
        meta["selection"] = _load_json(path, "selection", raw["selection"])
        if not _valid_selection(meta["selection"]):
            raise bad("selection", "a JSON object with lr, reg_lambda, lrs, reg_lambdas and val_accuracy")
    if version == 1:
        meta["fingerprint"], meta["legacy_hash"] = None, raw["base_fingerprint"]
    else:
        try:
            meta["fingerprint"] = Fingerprint.from_dict(_load_json(path, "base_fingerprint", raw["base_fingerprint"]))
        except ValueError:
            raise bad("base_fingerprint", "a JSON fingerprint (precision, projector and tower sketches)") from None
        meta["legacy_hash"] = None
    return meta


def _valid_selection(selection: Any) -> bool:
    """Whether a recorded validation search is well formed: numbers, a grid of matching shape."""

    def numbers(values: Any, none_ok: bool = False) -> bool:
        return isinstance(values, list) and all(
            (v is None and none_ok) or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
            for v in values
        )

    if not isinstance(selection, dict):
        return False
    lrs, lambdas, grid = selection.get("lrs"), selection.get("reg_lambdas"), selection.get("val_accuracy")
    return (
        numbers(lrs)
        and numbers(lambdas)
        and numbers([selection.get("lr"), selection.get("reg_lambda")])
        and isinstance(grid, list)
        and len(grid) == len(lrs)
        and all(numbers(row, none_ok=True) and len(row) == len(lambdas) for row in grid)
    )


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The validated, decoded metadata of a delta file, without reading its tensors."""
    return _read(path, tensors=False)[0]


def read_delta(path: str | os.PathLike) -> FittedState:
    """Read and validate a delta file; nothing in it is executed or unpickled.

    Raises:
        DeltaFileError: the file is missing, not safetensors, truncated, lacks metadata, has an
            unknown format version, malformed metadata, or tensors of unexpected names, dtypes,
            shapes or values. The message names the file.
    """
    meta, delta, classifier = _read(path, tensors=True)
    hyper = meta["hyperparameters"]
    reg_lambda = meta.get("reg_lambda")
    if reg_lambda is None:  # format 1 did not record it: what the stored hyperparameter implies
        stored = hyper.get("reg_lambda", "auto")
        reg_lambda = 1.0 / meta["n_shots"] if stored == "auto" else stored
    return FittedState(
        delta=delta,
        classifier=classifier,
        classes=tuple(meta["classes"]),
        class_names=tuple(meta["class_names"]),
        templates=tuple(meta["templates"]),
        n_shots=meta["n_shots"],
        reg_lambda=float(reg_lambda) if isinstance(reg_lambda, (int, float)) else math.nan,
        logit_scale=meta["logit_scale"],
        projector_key=meta["projector_key"],
        projector_family=meta["projector_family"],
        model_name=meta["model_name"],
        pretrained=meta["pretrained"],
        hyperparameters=hyper,
        fingerprint=meta["fingerprint"],
        legacy_hash=meta["legacy_hash"],
        loss_history=np.empty(0, dtype=np.float32),
        selection=meta["selection"],
    )


def _read(path: str | os.PathLike, tensors: bool) -> tuple[dict[str, Any], torch.Tensor | None, torch.Tensor | None]:
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DeltaFileError(f"delta file {path!r} does not exist (or is not a file); check the path.")
    delta = classifier = None
    try:
        read_safetensors_header(path, DeltaFileError, MAX_HEADER_BYTES, "delta file")
        with safe_open(path, framework="pt") as f:
            meta = _parse_metadata(path, dict(f.metadata() or {}))
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
            if tensors:
                delta, classifier = f.get_tensor(key), f.get_tensor(CLASSIFIER_KEY)
    except DeltaFileError:
        raise
    except Exception as exc:  # safetensors and the OS raise various types on damaged files
        raise DeltaFileError(
            f"{path!r} could not be read as a safetensors delta file ({type(exc).__name__}: {exc}); "
            "the file is corrupt, truncated, or another format."
        ) from exc
    if tensors and not (torch.isfinite(delta).all() and torch.isfinite(classifier).all()):
        raise DeltaFileError(f"{path!r} holds NaN or Inf values; it is damaged.")
    return meta, delta, classifier
