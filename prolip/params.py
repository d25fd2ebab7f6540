"""Every hyperparameter's constraint, in one table, checked in one place.

:func:`check_params` is what the estimator runs before it does any work (scikit-learn style: the
constructor only stores), what :meth:`~prolip.ProLIPAdapter.load` runs on the hyperparameters a
file stores, and what :mod:`prolip.variants.distributed` and the backbone builder run on theirs, so a
value is accepted or refused by the same rule wherever it comes from.
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from prolip.errors import DeltaFileError, InputError

TARGETS = ("image", "text", "image+text")
"""Which projectors a ProLIP fit trains (``target``): the vision projector, the text projection, or both."""

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""Backbone precisions by name (training's numerics are ``train_dtype``'s: fp32 unless asked)."""


STORAGE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
"""Feature-cache storage precisions by name (``cache_dtype``)."""

REG_LAMBDA_RULES = {"auto": 1, "1/N^2": 2}
"""λ rules by name (``reg_lambda``): "auto" is the paper's 1/N, "1/N^2" its alternative 1/N² (Table 11)."""

TRAIN_DTYPES = ("fp32", "fp16")
"""Training numerics by name (``train_dtype``): fp32 (prolip's default), or fp16 storage of W, its
gradient and Adam's moments as the official code trains on the GPU."""

ON_ERROR = ("raise", "skip")
"""What to do with an image that cannot be read (``on_error``)."""


TEMPLATE_RULE = "exactly one '{}' field (empty: the class name) and otherwise literal text ('{{' and '}}' for braces)"
"""What a prompt template must be, in words (errors quote it)."""


MAX_LOGIT_SCALE = 1e3
"""The largest logit scale s accepted (CLIP's own is clamped at 100): larger ones only overflow softmax."""

MAX_TIP_WEIGHT = 1e3
"""The largest Tip-Adapter α and β a file may hold (the searched grids end at 50)."""

MAX_ABS_ENTRY = 1e4
"""The largest magnitude of an entry of a stored tensor (deltas, T, cache keys): training moves weights of order 1."""


def valid_template(template: object) -> bool:
    """True for a string that ``template.format(name)`` fills safely: :data:`TEMPLATE_RULE`.

    Named, numbered, attribute, index, conversion and format-spec fields (``{x}``, ``{0}``,
    ``{.__class__}``, ``{!r}``, ``{:>9}``) are refused: they fail in ``str.format`` or reach into the
    class name's attributes.
    """
    if not isinstance(template, str):
        return False
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError:  # a lone '{' or '}'
        return False
    return fields == [("", "", None)]


def valid_templates(templates: object) -> bool:
    """True for a non-empty sequence of templates that each pass :func:`valid_template` (the one rule, used everywhere)."""
    return (
        isinstance(templates, Sequence)
        and not isinstance(templates, str)
        and len(templates) > 0
        and all(valid_template(t) for t in templates)
    )


@dataclass(frozen=True)
class Constraint:
    """What a parameter must be: a predicate and the phrase that describes it in errors."""

    expected: str
    check: Callable[[Any], bool]


def _integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def number(value: Any) -> bool:
    """True for a finite real number (not a bool)."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def positive_numbers(values: Any, low: float | None) -> bool:
    """True for a non-empty list of finite numbers, each > ``low`` (or >= 0 when ``low`` is None)."""
    return (
        isinstance(values, (list, tuple))
        and len(values) > 0
        and all(number(v) and (v >= 0 if low is None else v > low) for v in values)
    )


def _device(value: Any) -> bool:
    if value is None or isinstance(value, torch.device):
        return True
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        return False
    return True


CONSTRAINTS: dict[str, Constraint] = {
    "model": Constraint(
        "an open_clip model name (see open_clip.list_models()), an open_clip model object, or a transformers "
        "CLIPModel / SiglipModel (see docs/models.md)",
        lambda v: (isinstance(v, str) and bool(v)) or isinstance(v, nn.Module),
    ),
    "pretrained": Constraint(
        "None, an open_clip pretrained tag or a checkpoint path",
        lambda v: v is None or isinstance(v, (str, os.PathLike)),
    ),
    "templates": Constraint(
        f"None or a non-empty list of strings with {TEMPLATE_RULE} each, such as ['a photo of a {{}}.']",
        lambda v: v is None or valid_templates(v),
    ),
    "lr": Constraint("a positive number, e.g. 1e-3", lambda v: number(v) and v > 0),
    "reg_lambda": Constraint(
        "'auto' (1/N), '1/N^2' or a number >= 0",
        lambda v: (isinstance(v, str) and v in REG_LAMBDA_RULES) or (number(v) and v >= 0),
    ),
    "train_dtype": Constraint(
        f"one of {list(TRAIN_DTYPES)}: W's training numerics", lambda v: isinstance(v, str) and v in TRAIN_DTYPES
    ),
    "epochs": Constraint("an integer >= 0", lambda v: _integer(v) and v >= 0),
    "views": Constraint("an integer >= 0 (0: train on the plain view)", lambda v: _integer(v) and v >= 0),
    "batch_size": Constraint("an integer >= 1", lambda v: _integer(v) and v >= 1),
    "device": Constraint("None or a torch device such as 'cuda', 'cuda:1', 'mps' or 'cpu'", _device),
    "precision": Constraint(f"one of {sorted(PRECISIONS)}", lambda v: isinstance(v, str) and v in PRECISIONS),
    "logit_scale": Constraint(
        f"None or a positive number <= {MAX_LOGIT_SCALE:g}",
        lambda v: v is None or (number(v) and 0 < v <= MAX_LOGIT_SCALE),
    ),
    "random_state": Constraint("None or an integer", lambda v: v is None or _integer(v)),
    "verbose": Constraint("True or False", lambda v: isinstance(v, (bool, np.bool_))),
    "preprocess": Constraint("None or a callable (PIL image -> tensor)", lambda v: v is None or callable(v)),
    "tokenizer": Constraint("None or a callable (list of str -> token tensor)", lambda v: v is None or callable(v)),
    "on_error": Constraint(f"one of {list(ON_ERROR)}", lambda v: isinstance(v, str) and v in ON_ERROR),
    "cache_dir": Constraint("None or a folder path", lambda v: v is None or isinstance(v, (str, os.PathLike))),
    "cache_dtype": Constraint(f"one of {sorted(STORAGE_DTYPES)}", lambda v: isinstance(v, str) and v in STORAGE_DTYPES),
    "target": Constraint(
        f"one of {list(TARGETS)}: the projector(s) to train", lambda v: isinstance(v, str) and v in TARGETS
    ),
    "taskres_alpha": Constraint(
        "None (no residual) or a positive number, TaskRes's α (e.g. 0.5)", lambda v: v is None or (number(v) and v > 0)
    ),
}


def resolve_reg_lambda(reg_lambda: float | str | None, n_shots: float) -> float:
    """λ as a number: a rule of :data:`REG_LAMBDA_RULES` (None is "auto") applied to N, or the number given.

    Raises:
        InputError: ``reg_lambda`` is neither a rule's name nor a number >= 0.
    """
    reg_lambda = "auto" if reg_lambda is None else reg_lambda
    check_params({"reg_lambda": reg_lambda})
    if isinstance(reg_lambda, str):
        return 1.0 / float(n_shots) ** REG_LAMBDA_RULES[reg_lambda]
    return float(reg_lambda)


def check_params(params: Mapping[str, Any]) -> None:
    """Check every parameter of ``params`` that has a constraint.

    Raises:
        InputError: naming the first parameter that breaks its constraint, its value, and what
            it must be.
    """
    for name, value in params.items():
        constraint = CONSTRAINTS.get(name)
        if constraint is not None and not constraint.check(value):
            shown = f"<{type(value).__name__}>" if isinstance(value, nn.Module) else repr(value)
            raise InputError(f"{name}={shown} is invalid: it must be {constraint.expected}.")


def restore_params(
    stored: Mapping[str, Any], saved: Sequence[str], valid: Sequence[str], overrides: Mapping[str, Any], source: str
) -> dict[str, Any]:
    """An estimator's parameters from a file: the ``saved`` ones it stores, checked, then the caller's ``overrides``.

    Only the names in ``saved`` are taken from the file, so a file never chooses the device,
    callables or the model.

    Raises:
        InputError: an override is not one of the estimator's parameters (``valid``).
        DeltaFileError: a stored value breaks its constraint (the file was damaged or edited).
    """
    unknown = set(overrides) - set(valid)
    if unknown:
        raise InputError(f"unknown parameter(s) {sorted(unknown)}; valid: {list(valid)}.")
    params = {k: v for k, v in stored.items() if k in saved}
    try:
        check_params(params)
    except InputError as exc:
        raise DeltaFileError(
            f"{source} holds invalid hyperparameters ({exc}); the file is damaged or was edited."
        ) from None
    return {**params, **overrides}
