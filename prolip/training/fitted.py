"""Fitted states: what training learned, and the base model it belongs to — one type for every kind of fit.

:class:`FittedState` is what every estimator's fit produces (a ProLIP adapter's, ProLIP + Tip-Adapter's with its
cache, a regularised linear adapter's), what a delta file stores (:mod:`prolip.files.delta`), what ``load``
restores and what the Hub code shares. It holds no model: it is checked against one
(:meth:`FittedState.check_base`) and merged into one (:meth:`FittedState.merge_into`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from prolip.errors import DeltaFileError, FingerprintMismatchError, PrecisionWarning, warn
from prolip.estimator import Learned
from prolip.model.backbone import Backbone, file_may_choose
from prolip.model.fingerprint import Fingerprint
from prolip.model.towers import LinearMap, Projector, find_projector
from prolip.model.transformers_clip import saveable
from prolip.params import (
    COUNT,
    MAX_ABS_ENTRY,
    MAX_LOGIT_SCALE,
    MAX_TIP_WEIGHT,
    PRECISION,
    PRECISIONS,
    TARGETS,
    TEMPLATE_RULE,
    Constraint,
    number,
    valid_template,
    validate_params,
)
from prolip.training.labels import class_array

KINDS = ("projector", "tip_adapter", "linear_adapter")
"""The kinds of fitted state: a ProLIP fit (any target, TaskRes included), ProLIP + Tip-Adapter, a linear adapter."""
CLASSIFIER_KEY = "prolip.classifier"
LINEAR_ADAPTER_KEY = "prolip.linear_adapter"
CACHE_KEYS_KEY = "prolip.cache_keys"
CACHE_LABELS_KEY = "prolip.cache_labels"
LABEL_TYPES = (str, int, float, bool)
"""The label types a file can hold (JSON: strings, numbers, booleans)."""


@dataclass(frozen=True, eq=False)
class TipCache:
    """The cache of a fitted ProLIP + Tip-Adapter (:mod:`prolip.variants.tip_cache`): keys, their labels, α and β.

    Attributes:
        keys: K, float32 CPU ``[n, d_out]``, unit rows: each training image's adapted embedding
            (averaged over ``key_views`` augmented views, then normalised).
        labels: the keys' class indices, int64 CPU ``[n]`` (columns of the classifier).
        alpha: α, the cache's weight (0: the cache is off and the scores are ProLIP's).
        beta: β, the sharpness of the affinities.
        key_views: augmented views averaged into each key.
        trained_keys: whether the keys were then fine-tuned (Tip-Adapter-F, :func:`prolip.variants.tip_cache.train_keys`).
        selection: how α and β were chosen on a validation set (``alphas``, ``betas``,
            ``val_accuracy`` of the chosen point), or None when they were given.
    """

    keys: torch.Tensor
    labels: torch.Tensor
    alpha: float
    beta: float
    key_views: int
    trained_keys: bool = False
    selection: Mapping[str, Any] | None = None


@dataclass(frozen=True, eq=False)
class FittedState:
    """What one fit learned, of any kind, and the base model it belongs to: a kind, its typed configuration, tensors.

    One type for every estimator's fit, PEFT's shape: the ``kind`` (:data:`KINDS`) says which estimator reads it
    back; the tensors go to the file by state-dict key (:meth:`tensors`); every other field is the typed
    configuration, JSON in the file (:meth:`config`), read back and checked field by field by
    :meth:`from_config` (the one place a file's contents are validated).

    Attributes:
        delta: the trained tensor of the map: W − W0 of the vision projector (float32 CPU, in the parameter's own
            orientation; None when only the text projection was trained), or a linear adapter's A − I ``[d, d]``.
        classifier: the classifier T, float32 CPU ``[K, d_out]``: the zero-shot one, or the one the trained text
            projection (or TaskRes's residual) gives.
        classes: the labels, in column order.
        class_names: the text put into the templates for each class.
        templates: the prompt templates T was built with (empty for a linear adapter given T directly).
        n_shots: N, training images per class (n / K).
        reg_lambda: the λ training used.
        logit_scale: the s training used.
        projector_key: the state-dict key of ``delta`` (e.g. "visual.proj"; :data:`LINEAR_ADAPTER_KEY` for a linear
            adapter, which is what makes its kind).
        projector_family: the tower family (:mod:`prolip.model.towers`), or "linear_adapter".
        model_name: the open_clip model name, or "" for a model object (or embeddings from elsewhere).
        pretrained: the pretrained tag or checkpoint, or "".
        hyperparameters: the estimator's parameters at fit time (JSON values only).
        fingerprint: sketches of the base model's W0 and vision tower; None only for a linear adapter fitted on
            embeddings from outside open_clip.
        loss_history: training loss per step (empty for a loaded file).
        text_delta: W_t − W_t0 of the text projection, float32 CPU, in the parameter's own orientation; None when
            the text side was not trained.
        text_projector_key: the state-dict key of the text projection (e.g. "text_projection"), or "".
        text_projector_family: the text tower family (:mod:`prolip.model.towers.text`), or "".
        text_fingerprint: sketches of the base model's text projection and text tower, or None.
        selection: how ``lr`` and ``reg_lambda`` were chosen on a validation draw (the grid and every point's
            validation accuracy, :meth:`prolip.variants.search.SearchResult.as_dict`), or None.
        cache: Tip-Adapter's cache on the adapted embeddings (ProLIP + Tip-Adapter,
            :class:`prolip.variants.tip_cache.ProLIPTipAdapter`), or None.
        label_ids: when the training labels were integer ids of named classes (a Hugging Face ``ClassLabel``),
            each class name's id (the classes are the names); else None.
    """

    delta: torch.Tensor | None
    classifier: torch.Tensor
    classes: tuple[Hashable, ...]
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    n_shots: float
    reg_lambda: float
    logit_scale: float
    projector_key: str
    projector_family: str
    model_name: str
    pretrained: str
    hyperparameters: Mapping[str, Any]
    fingerprint: Fingerprint | None
    loss_history: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float32))
    text_delta: torch.Tensor | None = None
    text_projector_key: str = ""
    text_projector_family: str = ""
    text_fingerprint: Fingerprint | None = None
    selection: Mapping[str, Any] | None = None
    cache: TipCache | None = None
    label_ids: Mapping[str, int] | None = None

    @property
    def kind(self) -> str:
        """Which estimator's fit this is (:data:`KINDS`): "projector", "tip_adapter" or "linear_adapter"."""
        if self.projector_key == LINEAR_ADAPTER_KEY:
            return "linear_adapter"
        return "projector" if self.cache is None else "tip_adapter"

    # ------------------------------------------------------------------ the file's contents
    def config(self) -> dict[str, Any]:
        """The typed configuration as JSON values: every field but the tensors (what a file stores as ``config``)."""
        cache = self.cache
        return {
            "classes": list(self.classes),
            "class_names": list(self.class_names),
            "templates": list(self.templates),
            "n_shots": float(self.n_shots),
            "reg_lambda": float(self.reg_lambda),
            "logit_scale": float(self.logit_scale),
            "model_name": self.model_name,
            "pretrained": self.pretrained,
            "hyperparameters": dict(self.hyperparameters),
            "projector_key": self.projector_key,
            "projector_family": self.projector_family,
            "fingerprint": None if self.fingerprint is None else self.fingerprint.as_dict(),
            "target": self.target,
            "text_projector_key": self.text_projector_key,
            "text_projector_family": self.text_projector_family,
            "text_fingerprint": None if self.text_fingerprint is None else self.text_fingerprint.as_dict(),
            "selection": None if self.selection is None else dict(self.selection),
            "label_ids": None if self.label_ids is None else dict(self.label_ids),
            "cache": None
            if cache is None
            else {
                "alpha": cache.alpha,
                "beta": cache.beta,
                "key_views": cache.key_views,
                "trained_keys": cache.trained_keys,
                "selection": None if cache.selection is None else dict(cache.selection),
            },
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors by state-dict key (float32; the cache's labels int64), CPU and contiguous."""
        tensors = {CLASSIFIER_KEY: self.classifier}
        if self.delta is not None:
            tensors[self.projector_key] = self.delta
        if self.text_delta is not None:
            tensors[self.text_projector_key] = self.text_delta
        if self.cache is not None:
            tensors[CACHE_KEYS_KEY] = self.cache.keys
        out = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        if self.cache is not None:
            out[CACHE_LABELS_KEY] = self.cache.labels.detach().to("cpu", torch.int64).contiguous()
        return out

    @classmethod
    def from_config(
        cls, kind: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: str
    ) -> FittedState:
        """The state a file holds: its ``kind``, its configuration (:meth:`config`'s keys) and its tensors by key,
        each checked against :data:`CONFIG_SCHEMA` and against each other (the one validation of a file's contents).

        Keys this prolip does not know (from a newer version) are warned about and ignored.

        Raises:
            DeltaFileError: naming ``source`` and the first fault: an unknown kind, a missing or malformed field, or
                tensors of unexpected names, dtypes, shapes or values.
        """
        if kind not in KINDS:
            raise DeltaFileError(f"{source} has malformed metadata 'kind': expected one of {list(KINDS)}.")
        unknown = sorted(set(config) - set(CONFIG_SCHEMA))
        if unknown:
            warn(
                f"{source} holds configuration keys this prolip does not know, {unknown[:10]} (a newer prolip wrote "
                "it?); they are ignored."
            )
        values = {key: _field(source, key, config, rule) for key, rule in CONFIG_SCHEMA.items()}
        missing = [key for key in _TEXT_KEYS if key not in config]
        if "text" in values["target"] and missing:
            raise DeltaFileError(f"{source} holds a text delta but lacks prolip metadata {missing}; it was damaged.")
        return _state(kind, values, tensors, source)

    @property
    def target(self) -> str:
        """Which projectors were trained: "image", "text" or "image+text" (:data:`prolip.params.TARGETS`)."""
        if self.text_delta is None:
            return "image"
        return "text" if self.delta is None else "image+text"

    def check_base(self, backbone: Backbone, *, strict: bool = True, source: str = "this delta") -> None:
        """Refuse (or with ``strict=False``, warn about) a base model this state was not trained on.

        A projector fit: the vision projector's key and shape, the embedding width and the vision fingerprint
        always (the classifier was trained on that tower's features); the text projection's key, shape and
        fingerprint too when the state holds a text delta. A linear adapter: the embedding width, and the
        fingerprint of the model that made its embeddings when it records one.

        Raises:
            DeltaFileError: a projector's key or shape, or the embedding width, differ: the delta cannot be
                applied at all.
            FingerprintMismatchError: the base model's W0 or vision tower differ, or its text projection or text
                tower do for a text delta (``strict``; a linear adapter's always).
            UnsupportedModelError: the state holds a text delta but the model has no text projection prolip can
                find.
        """
        projector = backbone.projector
        if self.kind == "linear_adapter":
            width, d = projector.out_features, self.delta.shape[0]
            if width != d:
                raise DeltaFileError(
                    f"{source} adapts embeddings of width {d}, but the model {backbone.name or '(object)'!r} "
                    f"embeds images with width {width}; load it onto the model it was fitted on."
                )
            strict = True  # the adapter was fitted on that model's embeddings: another model's mean nothing
        else:
            _check_shape(source, "delta", self.projector_key, self.delta, projector)
            if self.classifier.shape[1] != projector.out_features:
                raise DeltaFileError(
                    f"{source} holds a classifier of width {self.classifier.shape[1]}, "
                    f"but the model's embedding width is {projector.out_features}."
                )
            if self.text_delta is not None:
                _check_shape(source, "text delta", self.text_projector_key, self.text_delta, backbone.text_projector)
        if self.fingerprint is None:
            return
        problem = self.fingerprint.mismatch(backbone.fingerprint)
        recorded, found = self.fingerprint.summary(), backbone.fingerprint.summary()
        if problem is None and self.text_fingerprint is not None:
            problem = self.text_fingerprint.mismatch(backbone.text_fingerprint, side="text")
            recorded, found = self.text_fingerprint.summary("W_t0"), backbone.text_fingerprint.summary("W_t0")
        if problem is None:
            return
        message = (
            f"{source} was trained on a different base model: {problem}. Recorded: {recorded}; "
            f"given model: {found}. Load it onto the base model it was made for"
            + (", or pass strict=False to apply it anyway." if self.kind != "linear_adapter" else ".")
        )
        if strict:
            raise FingerprintMismatchError(message)
        warn(message)

    def base_model(self, pretrained: str | None, *, trust_file_model: bool, source: str) -> tuple[str, str | None]:
        """The base model name and pretrained weights this state names, if a file may choose them.

        ``pretrained`` (the caller's choice) overrides the recorded one.

        Raises:
            DeltaFileError: the file records no model name (it was fitted on a model object, or on embeddings
                from elsewhere), a linear adapter names a model without weights, or the file names a model a file
                may not choose (:func:`prolip.model.backbone.file_may_choose`) and ``trust_file_model`` is False.
        """
        if not self.model_name:
            if self.kind == "linear_adapter":
                raise DeltaFileError(
                    f"{source} was fitted on embeddings from outside open_clip (it names no model); compute the "
                    "embeddings of new images yourself and use RegularizedLinearAdapter.predict, or pass model=."
                )
            raise DeltaFileError(f"{source} was fitted on a model object, not a named model; pass model= to load it.")
        if self.kind == "linear_adapter" and not self.pretrained and pretrained is None:
            raise DeltaFileError(
                f"{source} names base model {self.model_name!r} without pretrained weights: prolip would embed "
                "images with randomly initialised weights. Pass pretrained= (the weights the file was fitted on)."
            )
        # The caller's own pretrained choice leaves the file only the architecture to pick.
        if not (trust_file_model or file_may_choose(self.model_name, self.pretrained if pretrained is None else "")):
            raise DeltaFileError(
                f"{source} names base model {self.model_name!r} with pretrained {self.pretrained!r}, which is not "
                "one of open_clip's own models and tags: prolip does not let a file choose what to download or "
                "read. Pass model= and pretrained= yourself, or trust_file_model=True if you trust the file."
            )
        return self.model_name, pretrained if pretrained is not None else (self.pretrained or None)

    def adapter_matrix(self) -> torch.Tensor:
        """A linear adapter's A = I + delta, float32 CPU ``[d, d]``."""
        return self.delta + torch.eye(self.delta.shape[0])

    def adapted_weight(self, projector: Projector) -> torch.Tensor:
        """W0 + delta (W0 when the vision projector was not trained), fp32 ``[d_in, d_out]`` on the projector's device."""
        w0 = projector.to_in_out(projector.parameter).detach().float()
        return w0 if self.delta is None else w0 + projector.to_in_out(self.delta).to(w0.device)

    def merged_copy(self, model: nn.Module, precision: str) -> nn.Module:
        """A copy of ``model`` in ``precision`` whose projectors are W0 + delta (``model`` is untouched).

        For a transformers model (:mod:`prolip.model.transformers_clip`) the copy is the transformers
        model itself, ready for ``save_pretrained`` (which then also writes its tokenizer and image processor). Warns (PrecisionWarning) with the measured relative error of the merged update when the
        precision rounds it (fp16, bf16); fp32 keeps it exact.
        """
        validate_params({"precision": precision}, {"precision": PRECISION})
        merged = copy.deepcopy(model).to(PRECISIONS[precision])
        lost = self.merge_into(merged)
        if lost > 0:
            warn(
                f"merging into {precision} rounded the trained update: its relative error is {lost:.2%}. "
                "Use merged_model(precision='fp32') to keep it exact.",
                PrecisionWarning,
            )
        return saveable(merged)

    def merge_into(self, model: nn.Module) -> float:
        """Write W0 + delta into ``model``'s own projector parameter, and W_t0 + text delta into its text projection.

        Each in that parameter's own dtype; only the deltas the state holds are written.

        Returns:
            The relative error of the merged update, ‖(W0 + delta) rounded − W0 − delta‖ / ‖delta‖
            (both deltas together): 0 for an fp32 model, and what fp16 or bf16 rounding lost otherwise.
        """
        # The same architecture as the checked base, so the projectors need no second check.
        merged = []
        if self.delta is not None:
            merged.append((find_projector(model, verify=False).parameter, self.delta))
        if self.text_delta is not None:
            from prolip.model.towers.text import find_text_projector  # loaded for text deltas only

            merged.append((find_text_projector(model, verify=False).parameter, self.text_delta))
        lost = norm = 0.0
        with torch.no_grad():
            for param, delta in merged:
                w0 = param.detach().float().clone()
                delta = delta.to(param.device)
                param.copy_((w0 + delta).to(param.dtype))
                lost += float((param.detach().float() - w0 - delta).norm()) ** 2
                norm += float(delta.norm()) ** 2
        return (lost / norm) ** 0.5 if norm > 0 else 0.0


def _check_shape(source: str, what: str, key: str, delta: torch.Tensor | None, projector: LinearMap) -> None:
    """Refuse a delta whose key or shape is not the model's projector's (the key alone for an absent delta)."""
    shape = None if delta is None else tuple(delta.shape)
    if key != projector.key or (delta is not None and shape != tuple(projector.parameter.shape)):
        raise DeltaFileError(
            f"{source} holds a {what} for {key}" + (f" of shape {shape}" if shape else "") + ", "
            f"but the base model's projector is {projector.key} of shape {tuple(projector.parameter.shape)}."
        )


class FittedAttributes:
    """The learned attributes (``name_``) of an estimator holding a :class:`FittedState`, read from it.

    The estimator provides ``_fitted()`` (the state, or NotFittedError — an AttributeError, so
    ``hasattr`` is False before fit) and ``backbone``.
    """

    @property
    def n_features_in_(self) -> int:
        """Width of the features predict_features takes: d_in (+ d_out for towers with a residual)."""
        self._fitted()
        return self.backbone.projector.feature_width

    fitted_ = Learned(lambda s: s, "The fitted state (:class:`FittedState`).")
    classes_ = Learned(lambda s: class_array(s.classes), "Labels, in the column order of predict_proba.")
    class_names_ = Learned(lambda s: list(s.class_names), "The text put into the templates for each class.")
    classifier_ = Learned(lambda s: s.classifier, "The classifier T, float32 [K, d_out].")
    delta_ = Learned(lambda s: s.delta, "W − W0, float32, in the model parameter's own orientation, or None.")
    text_delta_ = Learned(lambda s: s.text_delta, "W_t − W_t0 of the text projection, or None.")
    n_shots_ = Learned(lambda s: s.n_shots, "N, training images per class.")
    reg_lambda_ = Learned(lambda s: s.reg_lambda, "The λ training used.")
    logit_scale_ = Learned(lambda s: s.logit_scale, "The logit scale s training used.")
    loss_history_ = Learned(lambda s: s.loss_history, "Training loss per step (empty after load).")
    base_fingerprint_ = Learned(lambda s: s.fingerprint, "The base model's fingerprint.")


# ---------------------------------------------------------------------------- the schema of a file's configuration
def _labels(value: Any) -> bool:
    # json reads Infinity and NaN as floats: labels that would make --json invalid.
    if not (isinstance(value, list) and value and all(isinstance(c, LABEL_TYPES) for c in value)):
        return False
    if any(isinstance(c, float) and not math.isfinite(c) for c in value):
        return False
    try:
        return len(set(value)) == len(value)
    except TypeError:
        return False


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _selection(value: Any) -> bool:
    """A recorded validation search: numbers, a grid of matching shape."""

    def numbers(values: Any, none_ok: bool = False) -> bool:
        return isinstance(values, list) and all((v is None and none_ok) or number(v) for v in values)

    if not isinstance(value, dict):
        return False
    lrs, lambdas, grid = value.get("lrs"), value.get("reg_lambdas"), value.get("val_accuracy")
    return (
        numbers(lrs)
        and numbers(lambdas)
        and numbers([value.get("lr"), value.get("reg_lambda")])
        and isinstance(grid, list)
        and len(grid) == len(lrs)
        and all(numbers(row, none_ok=True) and len(row) == len(lambdas) for row in grid)
    )


def _cache(value: Any) -> bool:
    """A recorded Tip-Adapter cache: α, β in [0, MAX_TIP_WEIGHT], key_views an integer >= 1, and its α / β search."""

    def weight(v: Any) -> bool:
        return number(v) and 0 <= v <= MAX_TIP_WEIGHT

    def grid(values: Any) -> bool:
        return isinstance(values, list) and bool(values) and all(number(v) and v >= 0 for v in values)

    search = value.get("selection") if isinstance(value, dict) else None
    return (
        isinstance(value, dict)
        and weight(value.get("alpha"))
        and weight(value.get("beta"))
        and COUNT.check(value.get("key_views"))
        and isinstance(value.get("trained_keys"), bool)
        and (
            search is None
            or (
                isinstance(search, dict)
                and number(search.get("val_accuracy"))
                and 0 <= search["val_accuracy"] <= 1
                and grid(search.get("alphas"))
                and grid(search.get("betas"))
            )
        )
    )


def _label_ids(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value.values())
        and len(set(value.values())) == len(value)
    )


def _fingerprint(value: Any) -> bool:
    if value is None:
        return True
    try:
        Fingerprint.from_dict(value)
    except (ValueError, TypeError, KeyError):
        return False
    return True


_STRING = Constraint("a string", lambda v: isinstance(v, str))
CONFIG_SCHEMA: dict[str, tuple[Constraint, Any]] = {
    "classes": (Constraint("a non-empty list of distinct strings, finite numbers or booleans", _labels), None),
    "class_names": (Constraint("a list of strings, one per class", _strings), None),
    "templates": (Constraint(f"a list of strings with {TEMPLATE_RULE} each", lambda v: _strings(v) and all(
        valid_template(t) for t in v)), None),
    "n_shots": (Constraint("a finite positive number", lambda v: number(v) and v > 0), None),
    "reg_lambda": (Constraint("a finite number >= 0", lambda v: number(v) and v >= 0), None),
    "logit_scale": (Constraint(f"a positive number <= {MAX_LOGIT_SCALE:g}", lambda v: number(v) and 0 < v <= MAX_LOGIT_SCALE), None),
    "model_name": (_STRING, None),
    "pretrained": (_STRING, None),
    "hyperparameters": (Constraint("a JSON object", lambda v: isinstance(v, dict)), None),
    "projector_key": (Constraint("a parameter name such as 'visual.proj'", lambda v: isinstance(v, str) and v not in ("", CLASSIFIER_KEY)), None),
    "projector_family": (_STRING, None),
    "fingerprint": (Constraint("None or a JSON fingerprint (precision, projector and tower sketches)", _fingerprint), None),
    "target": (Constraint(f"one of {list(TARGETS)}", lambda v: v in TARGETS), "image"),
    "text_projector_key": (_STRING, ""),
    "text_projector_family": (_STRING, ""),
    "text_fingerprint": (Constraint("None or a JSON fingerprint", _fingerprint), None),
    "selection": (Constraint("None or a JSON object with lr, reg_lambda, lrs, reg_lambdas and val_accuracy", lambda v: v is None or _selection(v)), None),
    "cache": (Constraint(f"None or a JSON object with alpha and beta in [0, {MAX_TIP_WEIGHT:g}], key_views >= 1, trained_keys and selection", lambda v: v is None or _cache(v)), None),
    "label_ids": (Constraint("None or a JSON object from each class name to its integer id", lambda v: v is None or _label_ids(v)), None),
}  # fmt: skip
"""Every configuration field a file may hold: what it must be, and its default when absent (``None`` in the second
place with a required field: the fields up to ``fingerprint`` are required)."""
_REQUIRED = tuple(CONFIG_SCHEMA)[: tuple(CONFIG_SCHEMA).index("fingerprint") + 1]
_TEXT_KEYS = ("text_projector_key", "text_projector_family", "text_fingerprint")  # required with a text target


def _field(source: str, key: str, config: Mapping[str, Any], rule: tuple[Constraint, Any]) -> Any:
    constraint, default = rule
    if key not in config:
        if key in _REQUIRED:
            raise DeltaFileError(
                f"{source} lacks prolip metadata [{key!r}]; it was not written by prolip (or was damaged). "
                "Re-save the delta or use the original file."
            )
        return default
    value = config[key]
    if not constraint.check(value):
        raise DeltaFileError(f"{source} has malformed metadata {key!r}: expected {constraint.expected}.")
    return value


def _state(kind: str, v: dict[str, Any], tensors: Mapping[str, torch.Tensor], source: str) -> FittedState:
    """The state of checked configuration values ``v`` and the file's tensors, once they agree with each other."""

    def bad(key: str, expected: str) -> DeltaFileError:
        return DeltaFileError(f"{source} has malformed metadata {key!r}: expected {expected}.")

    classes, linear = v["classes"], kind == "linear_adapter"
    if linear != (v["projector_key"] == LINEAR_ADAPTER_KEY) or (kind == "tip_adapter") != (v["cache"] is not None):
        raise DeltaFileError(f"{source} is of kind {kind!r} but holds another kind's contents; it is damaged.")
    if len(v["class_names"]) != len(classes):
        raise bad("class_names", f"a JSON list of {len(classes)} strings")
    if not (v["templates"] or linear):  # a linear adapter's T may come from outside: no templates
        raise bad("templates", f"a non-empty JSON list of strings with {TEMPLATE_RULE} each")
    text = "text" in v["target"]
    if text and v["text_fingerprint"] is None:
        raise bad("text_fingerprint", "a JSON fingerprint (precision, projector and tower sketches)")
    if text and v["text_projector_key"] in ("", CLASSIFIER_KEY, v["projector_key"]):
        raise bad("text_projector_key", "a parameter name such as 'text_projection'")
    if not linear and v["fingerprint"] is None:
        raise bad("fingerprint", "a JSON fingerprint (precision, projector and tower sketches)")
    roles = {CLASSIFIER_KEY: "classifier"}
    if "image" in v["target"] or linear:
        roles[v["projector_key"]] = "delta"
    if text:
        roles[v["text_projector_key"]] = "text_delta"
    if kind == "tip_adapter":
        roles.update({CACHE_KEYS_KEY: "cache_keys", CACHE_LABELS_KEY: "cache_labels"})
    t = _checked_tensors(source, tensors, roles, len(classes), linear)
    cache = v["cache"]
    return FittedState(
        delta=t.get("delta"),
        classifier=t["classifier"],
        classes=tuple(classes),
        class_names=tuple(v["class_names"]),
        templates=tuple(v["templates"]),
        n_shots=float(v["n_shots"]),
        reg_lambda=float(v["reg_lambda"]),
        logit_scale=float(v["logit_scale"]),
        projector_key=v["projector_key"],
        projector_family=v["projector_family"],
        model_name=v["model_name"],
        pretrained=v["pretrained"],
        hyperparameters=v["hyperparameters"],
        fingerprint=None if v["fingerprint"] is None else Fingerprint.from_dict(v["fingerprint"]),
        text_delta=t.get("text_delta"),
        text_projector_key=v["text_projector_key"] if text else "",
        text_projector_family=v["text_projector_family"] if text else "",
        text_fingerprint=Fingerprint.from_dict(v["text_fingerprint"]) if text else None,
        selection=v["selection"],
        label_ids=v["label_ids"],
        cache=None
        if cache is None
        else TipCache(
            keys=t["cache_keys"], labels=t["cache_labels"], alpha=float(cache["alpha"]), beta=float(cache["beta"]),
            key_views=int(cache["key_views"]), trained_keys=cache["trained_keys"], selection=cache.get("selection"),
        ),
    )  # fmt: skip


def _checked_tensors(
    source: str, tensors: Mapping[str, torch.Tensor], roles: Mapping[str, str], n_classes: int, square: bool
) -> dict[str, torch.Tensor]:
    """The tensors by role, after checking their names, dtypes, shapes and values against the configuration."""
    if set(tensors) != set(roles):
        raise DeltaFileError(
            f"{source} holds tensors {sorted(tensors)[:10]}, expected {sorted(roles)}; "
            "it is not a delta written by prolip (or was damaged)."
        )
    t = {role: tensors[key] for key, role in roles.items()}
    classifier, labels = t["classifier"], t.get("cache_labels")
    floats = {role: x for role, x in t.items() if role != "cache_labels"}
    consistent = (
        all(x.ndim == 2 and min(x.shape) >= 1 and x.dtype == torch.float32 for x in floats.values())
        and classifier.shape[0] == n_classes
        and (not square or tuple(t["delta"].shape) == (classifier.shape[1],) * 2)
        and (
            labels is None
            or (
                labels.dtype == torch.int64
                and labels.ndim == 1
                and labels.shape[0] == t["cache_keys"].shape[0]
                and t["cache_keys"].shape[1:] == classifier.shape[1:]
            )
        )
    )
    if not consistent:
        found = ", ".join(f"{role} {tuple(x.shape)} {x.dtype}" for role, x in t.items())
        raise DeltaFileError(
            f"{source} has inconsistent contents: {found}, {n_classes} classes; it is damaged or not a prolip delta."
        )
    if not all(torch.isfinite(x).all() for x in floats.values()):
        raise DeltaFileError(f"{source} holds NaN or Inf values; it is damaged.")
    extreme = [role for role, x in floats.items() if x.abs().max() > MAX_ABS_ENTRY]
    if extreme:
        raise DeltaFileError(
            f"{source} holds {extreme[0]} entries beyond ±{MAX_ABS_ENTRY:g}, which no training produces; "
            "it is damaged or was edited."
        )
    if labels is not None and labels.numel() and not (0 <= int(labels.min()) <= int(labels.max()) < n_classes):
        raise DeltaFileError(f"{source} holds cache labels outside its {n_classes} classes; it is damaged.")
    return t
