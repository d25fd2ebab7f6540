"""The delta file: one safetensors file with what a fit learned, T, and string metadata.

Layout (format version 2), by ``kind``:

* ``projector`` (a ProLIP adapter): tensor ``<projector key>`` (e.g. ``visual.proj``), W − W0,
  when the vision projector was trained; tensor ``<text projector key>`` (e.g.
  ``text_projection``), W_t − W_t0, when the text projection was (metadata ``target`` says which:
  "image", "text" or "image+text"); both float32 in the parameter's own orientation;
* ``tip_adapter`` (ProLIP + Tip-Adapter, :mod:`prolip.variants.tip_cache`): what a ``projector`` file
  holds, plus tensors ``prolip.cache_keys`` (float32 ``[n, d_out]``, unit rows) and
  ``prolip.cache_labels`` (int64 ``[n]``, class indices) and metadata ``cache`` (JSON: alpha,
  beta, key_views, trained_keys, selection);
* ``linear_adapter`` (a regularised linear adapter, :mod:`prolip.variants.linear_adapter`): tensor
  ``prolip.linear_adapter``, A − I, float32 ``[d, d]``;
* always tensor ``prolip.classifier``: the classifier T, float32 ``[K, d_out]``;
* metadata (all strings): see :data:`REQUIRED_METADATA`, :data:`KIND_METADATA` and
  :data:`TEXT_METADATA`; lists, dicts and fingerprints are JSON. Optional for ``projector``:
  ``selection`` (JSON), the validation search that chose lr and λ.

Version 2 records the base model as a precision-independent fingerprint of W0 and of the whole
vision tower (:mod:`prolip.model.fingerprint`) and the λ training used; version 1 files (projector
deltas only, a SHA-256 of W0 cast to fp16, no λ) are still read. Files of version 2 written
before ``target`` existed are image-projector deltas.

Reading never unpickles: safetensors holds raw tensors and a JSON header, the header size is
checked before anything is parsed, and every field is type-checked before use (see
docs/security.md). Writing is atomic (:func:`prolip.atomic.atomic_write`): a crash leaves either
the old file or the complete new one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from prolip._version import __version__
from prolip.atomic import atomic_write, read_safetensors_header, remove_stale_temps, temp_prefix
from prolip.errors import DeltaFileError, InputTypeError
from prolip.model.fingerprint import Fingerprint
from prolip.params import MAX_ABS_ENTRY, MAX_LOGIT_SCALE, MAX_TIP_WEIGHT, TARGETS, TEMPLATE_RULE, valid_template
from prolip.training.fitted import FittedState, LinearAdapterState, TipCache

FORMAT_NAME = "prolip-delta"
FORMAT_VERSION = 2
KIND = "projector"
LINEAR_ADAPTER_KIND = "linear_adapter"
TIP_KIND = "tip_adapter"
CLASSIFIER_KEY = "prolip.classifier"
LINEAR_ADAPTER_KEY = "prolip.linear_adapter"
CACHE_KEYS_KEY = "prolip.cache_keys"
CACHE_LABELS_KEY = "prolip.cache_labels"
MAX_HEADER_BYTES = 16 * 1024 * 1024  # real headers are a few KB; refuse absurd declared sizes
COMMON_METADATA = (
    "format",
    "format_version",
    "kind",
    "prolip_version",
    "model_name",
    "pretrained",
    "classes",
    "class_names",
    "templates",
    "hyperparameters",
    "n_shots",
    "reg_lambda",
    "logit_scale",
)
"""Metadata every kind of delta file holds."""
KIND_METADATA = {
    KIND: ("projector_family", "projector_key", "base_fingerprint"),
    TIP_KIND: ("projector_family", "projector_key", "base_fingerprint", "cache"),
    LINEAR_ADAPTER_KIND: (),
}
"""Metadata each kind holds besides :data:`COMMON_METADATA`."""
REQUIRED_METADATA = COMMON_METADATA + KIND_METADATA[KIND]
"""Every metadata key of a projector delta."""
TEXT_METADATA = ("text_projector_family", "text_projector_key", "text_fingerprint")
"""Metadata a projector delta holds when its ``target`` includes the text projection."""
_V1_ABSENT = ("kind", "reg_lambda")  # fields format 1 did not have
_JSON_KEYS = ("classes", "class_names", "templates", "hyperparameters")
_LABEL_TYPES = (str, int, float, bool)


def write_delta(path: str | os.PathLike, state: FittedState | LinearAdapterState) -> None:
    """Write ``state`` as a delta file (of kind ``projector``, ``tip_adapter`` or ``linear_adapter``), atomically.

    Temporary files of the same target older than :data:`prolip.atomic.STALE_TEMP_SECONDS` (left
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
        "prolip_version": __version__,
        "model_name": state.model_name,
        "pretrained": state.pretrained,
        "classes": json.dumps(list(state.classes)),
        "class_names": json.dumps(list(state.class_names)),
        "templates": json.dumps(list(state.templates)),
        "hyperparameters": json.dumps(dict(state.hyperparameters)),
        "n_shots": repr(float(state.n_shots)),
        "reg_lambda": repr(float(state.reg_lambda)),
        "logit_scale": repr(float(state.logit_scale)),
    }
    if isinstance(state, LinearAdapterState):
        header["kind"] = LINEAR_ADAPTER_KIND
        tensors = {LINEAR_ADAPTER_KEY: state.delta}
        if state.fingerprint is not None:
            header["base_fingerprint"] = json.dumps(state.fingerprint.as_dict())
    else:
        header.update(
            kind=KIND if state.cache is None else TIP_KIND,
            target=state.target,
            projector_family=state.projector_family,
            projector_key=state.projector_key,
            base_fingerprint=json.dumps(state.fingerprint.as_dict()),
        )
        tensors = {} if state.delta is None else {state.projector_key: state.delta}
        if state.selection is not None:
            header["selection"] = json.dumps(dict(state.selection))
        if state.text_delta is not None:
            header.update(
                text_projector_family=state.text_projector_family,
                text_projector_key=state.text_projector_key,
                text_fingerprint=json.dumps(state.text_fingerprint.as_dict()),
            )
            tensors[state.text_projector_key] = state.text_delta
        if state.cache is not None:
            header["cache"] = json.dumps(_cache_metadata(state.cache))
            tensors[CACHE_KEYS_KEY] = state.cache.keys
    tensors[CLASSIFIER_KEY] = state.classifier
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    if isinstance(state, FittedState) and state.cache is not None:
        tensors[CACHE_LABELS_KEY] = state.cache.labels.detach().to("cpu", torch.int64).contiguous()
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
    kind = KIND if version == 1 else raw.get("kind", KIND)  # format 1 held projector deltas only
    expected = COMMON_METADATA + KIND_METADATA.get(kind, ())
    required = [k for k in expected if version != 1 or k not in _V1_ABSENT]
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

    if kind not in KIND_METADATA:
        raise bad("kind", f"one of {list(KIND_METADATA)}")
    meta["kind"] = kind
    classes = meta["classes"]
    if not (
        isinstance(classes, list)
        and classes
        and all(isinstance(c, _LABEL_TYPES) and not (isinstance(c, float) and not math.isfinite(c)) for c in classes)
    ):  # json reads Infinity and NaN as floats: labels that would make --json invalid
        raise bad("classes", "a non-empty JSON list of strings, finite numbers or booleans")
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
    # A linear adapter's T may come from outside (no templates); a projector's is always built from them.
    if not (
        isinstance(templates, list)
        and (templates or kind == LINEAR_ADAPTER_KIND)
        and all(valid_template(t) for t in templates)
    ):
        raise bad("templates", f"a non-empty JSON list of strings with {TEMPLATE_RULE} each")
    if not isinstance(meta["hyperparameters"], dict):
        raise bad("hyperparameters", "a JSON object")
    for key, low in (("n_shots", 0), ("logit_scale", 0), ("reg_lambda", None)):
        if key not in raw:
            continue
        try:
            value = float(raw[key])
        except ValueError:
            raise bad(key, "a number") from None
        high = MAX_LOGIT_SCALE if key == "logit_scale" else math.inf
        if not (math.isfinite(value) and (value >= 0 if low is None else value > low) and value <= high):
            raise bad(
                key,
                f"a positive number <= {high:g}"
                if key == "logit_scale"
                else "a finite positive number"
                if low is not None
                else "a finite number >= 0",
            )
        meta[key] = value
    if kind != LINEAR_ADAPTER_KIND:
        _parse_projector_metadata(path, raw, meta, version, bad)
    elif "base_fingerprint" in raw:  # written when the embeddings came from a model prolip built (ModelRLA)
        meta["fingerprint"] = _fingerprint(path, raw, "base_fingerprint", bad)
    if kind == TIP_KIND:
        meta["cache"] = _load_json(path, "cache", raw["cache"])
        if not _valid_cache(meta["cache"]):
            raise bad(
                "cache",
                f"a JSON object with alpha and beta in [0, {MAX_TIP_WEIGHT:g}], key_views >= 1, trained_keys and selection",
            )
    return meta


def _parse_projector_metadata(
    path: str, raw: dict[str, str], meta: dict[str, Any], version: int, bad: Callable[[str, str], DeltaFileError]
) -> None:
    """Check and decode what a projector delta holds beside the common metadata: keys, target, fingerprints."""
    if meta["projector_key"] in ("", CLASSIFIER_KEY):
        raise bad("projector_key", "a parameter name such as 'visual.proj'")
    meta["target"] = raw.get("target", "image")  # files written before text deltas existed
    if meta["target"] not in TARGETS:
        raise bad("target", f"one of {list(TARGETS)}")
    meta["selection"] = None
    if "selection" in raw:
        meta["selection"] = _load_json(path, "selection", raw["selection"])
        if not _valid_selection(meta["selection"]):
            raise bad("selection", "a JSON object with lr, reg_lambda, lrs, reg_lambdas and val_accuracy")
    if version == 1:
        meta["fingerprint"], meta["legacy_hash"] = None, raw["base_fingerprint"]
    else:
        meta["fingerprint"], meta["legacy_hash"] = _fingerprint(path, raw, "base_fingerprint", bad), None
    meta["text_fingerprint"] = None
    if "text" not in meta["target"]:
        return
    missing = [k for k in TEXT_METADATA if k not in raw]
    if missing:
        raise DeltaFileError(f"{path!r} holds a text delta but lacks prolip metadata {missing}; it was damaged.")
    if meta["text_projector_key"] in ("", CLASSIFIER_KEY, meta["projector_key"]):
        raise bad("text_projector_key", "a parameter name such as 'text_projection'")
    meta["text_fingerprint"] = _fingerprint(path, raw, "text_fingerprint", bad)


def _fingerprint(path: str, raw: dict[str, str], key: str, bad: Callable[[str, str], DeltaFileError]) -> Fingerprint:
    try:
        return Fingerprint.from_dict(_load_json(path, key, raw[key]))
    except ValueError:
        raise bad(key, "a JSON fingerprint (precision, projector and tower sketches)") from None


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


def _cache_metadata(cache: TipCache) -> dict[str, Any]:
    """The ``cache`` metadata of a ``tip_adapter`` file: everything of the cache but its tensors."""
    selection = None if cache.selection is None else dict(cache.selection)
    return {
        "alpha": cache.alpha,
        "beta": cache.beta,
        "key_views": cache.key_views,
        "trained_keys": cache.trained_keys,
        "selection": selection,
    }


def _valid_cache(cache: Any) -> bool:
    """Whether a recorded cache is well formed: α, β finite numbers >= 0, key_views an integer >= 1, trained_keys a bool."""

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= MAX_TIP_WEIGHT

    return (
        isinstance(cache, dict)
        and number(cache.get("alpha"))
        and number(cache.get("beta"))
        and isinstance(cache.get("key_views"), int)
        and not isinstance(cache.get("key_views"), bool)
        and cache["key_views"] >= 1
        and isinstance(cache.get("trained_keys"), bool)
        and (cache.get("selection") is None or _valid_cache_selection(cache["selection"]))
    )


def _valid_cache_selection(selection: Any) -> bool:
    """A recorded α / β search: the chosen point's validation accuracy in [0, 1] and the grid (lists of numbers >= 0)."""

    def numbers(values: Any) -> bool:
        return (
            isinstance(values, list)
            and bool(values)
            and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in values
            )
        )

    return (
        isinstance(selection, dict)
        and numbers([selection.get("val_accuracy")])
        and selection["val_accuracy"] <= 1
        and numbers(selection.get("alphas"))
        and numbers(selection.get("betas"))
    )


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The validated, decoded metadata of a delta file, without reading its tensors."""
    return _read(path, tensors=False)[0]


def read_state(path: str | os.PathLike) -> FittedState | LinearAdapterState:
    """Read and validate a delta file of any kind; nothing in it is executed or unpickled.

    Returns:
        A :class:`~prolip.training.fitted.FittedState` for a ``projector`` file (and, with its ``cache``,
        for a ``tip_adapter`` one), a :class:`~prolip.training.fitted.LinearAdapterState` for a
        ``linear_adapter`` one.

    Raises:
        DeltaFileError: the file is missing, not safetensors, truncated, lacks metadata, has an
            unknown format version or kind, malformed metadata, or tensors of unexpected names,
            dtypes, shapes or values. The message names the file.
    """
    meta, tensors = _read(path, tensors=True)
    common = {
        "classifier": tensors["classifier"],
        "classes": tuple(meta["classes"]),
        "class_names": tuple(meta["class_names"]),
        "templates": tuple(meta["templates"]),
        "n_shots": meta["n_shots"],
        "logit_scale": meta["logit_scale"],
        "model_name": meta["model_name"],
        "pretrained": meta["pretrained"],
        "hyperparameters": meta["hyperparameters"],
        "loss_history": np.empty(0, dtype=np.float32),
    }
    if meta["kind"] == LINEAR_ADAPTER_KIND:
        return LinearAdapterState(
            delta=tensors["delta"], reg_lambda=meta["reg_lambda"], fingerprint=meta.get("fingerprint"), **common
        )
    reg_lambda = meta.get("reg_lambda")
    if reg_lambda is None:  # format 1 did not record it: what the stored hyperparameter implies
        stored = meta["hyperparameters"].get("reg_lambda", "auto")
        reg_lambda = 1.0 / meta["n_shots"] if stored == "auto" else stored
    text = meta["text_fingerprint"] is not None
    return FittedState(
        delta=tensors.get("delta"),
        reg_lambda=float(reg_lambda) if isinstance(reg_lambda, (int, float)) else math.nan,
        projector_key=meta["projector_key"],
        projector_family=meta["projector_family"],
        fingerprint=meta["fingerprint"],
        legacy_hash=meta["legacy_hash"],
        text_delta=tensors.get("text_delta"),
        text_projector_key=meta["text_projector_key"] if text else "",
        text_projector_family=meta["text_projector_family"] if text else "",
        text_fingerprint=meta["text_fingerprint"],
        selection=meta["selection"],
        cache=_cache(meta, tensors) if meta["kind"] == TIP_KIND else None,
        **common,
    )


def _cache(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> TipCache:
    """The Tip-Adapter cache of a checked ``tip_adapter`` file."""
    cache = meta["cache"]
    return TipCache(
        keys=tensors["cache_keys"],
        labels=tensors["cache_labels"],
        alpha=float(cache["alpha"]),
        beta=float(cache["beta"]),
        key_views=int(cache["key_views"]),
        trained_keys=cache["trained_keys"],
        selection=cache.get("selection"),
    )


def read_delta(path: str | os.PathLike) -> FittedState:
    """Read and validate a ProLIP delta file (kind ``projector``); see :func:`read_state`.

    Raises:
        DeltaFileError: as :func:`read_state`, and for a file of another kind (naming its loader).
    """
    state = read_state(path)
    if not isinstance(state, FittedState):
        raise DeltaFileError(
            f"{os.fspath(path)!r} holds a regularised linear adapter (kind {LINEAR_ADAPTER_KIND!r}), not a ProLIP "
            "projector delta; load it with prolip.RegularizedLinearAdapter.load."
        )
    if state.cache is not None:
        raise DeltaFileError(
            f"{os.fspath(path)!r} holds ProLIP + Tip-Adapter (kind {TIP_KIND!r}): a projector delta and a cache model "
            "that ProLIPAdapter would ignore; load it with prolip.ProLIPTipAdapter.load."
        )
    return state


def read_linear_adapter(path: str | os.PathLike) -> LinearAdapterState:
    """Read and validate a regularised linear adapter file (kind ``linear_adapter``); see :func:`read_state`.

    Raises:
        DeltaFileError: as :func:`read_state`, and for a file of another kind (naming its loader).
    """
    state = read_state(path)
    if not isinstance(state, LinearAdapterState):
        kind, loader = (TIP_KIND, "ProLIPTipAdapter") if state.cache is not None else (KIND, "ProLIPAdapter")
        raise DeltaFileError(
            f"{os.fspath(path)!r} holds a ProLIP projector delta (kind {kind!r}), not a regularised linear "
            f"adapter; load it with prolip.{loader}.load."
        )
    return state


def _tensor_roles(meta: dict[str, Any]) -> dict[str, str]:
    """The tensors a file of this metadata must hold: name → role ("delta", "text_delta", "classifier")."""
    if meta["kind"] == LINEAR_ADAPTER_KIND:
        return {LINEAR_ADAPTER_KEY: "delta", CLASSIFIER_KEY: "classifier"}
    trained = meta["target"].split("+")
    roles = {meta["projector_key"]: "delta"} if "image" in trained else {}
    if "text" in trained:
        roles[meta["text_projector_key"]] = "text_delta"
    roles[CLASSIFIER_KEY] = "classifier"
    if meta["kind"] == TIP_KIND:
        roles.update({CACHE_KEYS_KEY: "cache_keys", CACHE_LABELS_KEY: "cache_labels"})
    return roles


def _read(path: str | os.PathLike, tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The validated metadata and, with ``tensors``, the tensors by role (see :func:`_tensor_roles`)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DeltaFileError(f"delta file {path!r} does not exist (or is not a file); check the path.")
    loaded: dict[str, torch.Tensor] = {}
    try:
        read_safetensors_header(path, DeltaFileError, MAX_HEADER_BYTES, "delta file")
        with safe_open(path, framework="pt") as f:
            meta = _parse_metadata(path, dict(f.metadata() or {}))
            roles = _tensor_roles(meta)
            names = set(f.keys())
            if names != set(roles):
                raise DeltaFileError(
                    f"{path!r} holds tensors {sorted(names)[:10]}, expected {sorted(roles)}; "
                    "it is not a delta written by prolip (or was damaged)."
                )
            # Shapes and dtypes are checked from the header before any tensor data is read.
            shapes = {roles[k]: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in roles}
            _check_shapes(path, meta, shapes)
            if tensors:
                loaded = {role: f.get_tensor(k) for k, role in roles.items()}
    except DeltaFileError:
        raise
    except Exception as exc:  # safetensors and the OS raise various types on damaged files
        raise DeltaFileError(
            f"{path!r} could not be read as a safetensors delta file ({type(exc).__name__}: {exc}); "
            "the file is corrupt, truncated, or another format."
        ) from exc
    if not all(torch.isfinite(t).all() for t in loaded.values()):
        raise DeltaFileError(f"{path!r} holds NaN or Inf values; it is damaged.")
    extreme = [role for role, t in loaded.items() if t.is_floating_point() and t.abs().max() > MAX_ABS_ENTRY]
    if extreme:
        raise DeltaFileError(
            f"{path!r} holds {extreme[0]} entries beyond ±{MAX_ABS_ENTRY:g}, which no training produces; "
            "it is damaged or was edited."
        )
    labels = loaded.get("cache_labels")
    if (
        labels is not None
        and labels.numel()
        and not (0 <= int(labels.min()) <= int(labels.max()) < len(meta["classes"]))
    ):
        raise DeltaFileError(f"{path!r} holds cache labels outside its {len(meta['classes'])} classes; it is damaged.")
    return meta, loaded


def _check_shapes(path: str, meta: dict[str, Any], shapes: dict[str, tuple[list[int], str]]) -> None:
    """Every tensor 2-D, non-empty float32 (cache labels: int64, one per key); T one row per class; a
    linear adapter square, as wide as T; cache keys as wide as T."""
    n_classes = len(meta["classes"])
    classifier = shapes["classifier"][0]
    square = meta["kind"] != LINEAR_ADAPTER_KIND or shapes["delta"][0] == [classifier[-1]] * 2
    labels = shapes.get("cache_labels")
    cache = labels is None or (
        labels[1] == "I64"
        and labels[0] == shapes["cache_keys"][0][:1]
        and shapes["cache_keys"][0][1:] == classifier[1:]
    )
    if (
        not (square and cache)
        or any(
            len(shape) != 2 or min(shape) < 1 or dtype != "F32"
            for role, (shape, dtype) in shapes.items()
            if role != "cache_labels"
        )
        or classifier[0] != n_classes
    ):
        found = ", ".join(f"{role} {tuple(shape)} {dtype}" for role, (shape, dtype) in shapes.items())
        raise DeltaFileError(
            f"{path!r} has inconsistent contents: {found}, {n_classes} classes; it is damaged or not a prolip delta."
        )
