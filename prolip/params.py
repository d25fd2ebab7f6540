"""What a parameter must be: one vocabulary of constraints, and one function that checks a table of them.

Every estimator, configuration dataclass and bench method declares ``_parameter_constraints`` (scikit-learn's
idiom): a dict from parameter name to :class:`Constraint`, composed by inheritance (a subclass writes
``{**Base._parameter_constraints, "lr": ...}``). :func:`validate_params` checks such a table — an estimator
once per ``fit``, a configuration when it is built, a file's stored hyperparameters when it is read — so a
value is accepted or refused by the same rule, with the same message, wherever it comes from. The
constraints below are the shared vocabulary the tables are made of.
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from prolip.errors import InputError

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


@dataclass(frozen=True)
class Constraint:
    """What a parameter must be: a predicate and the phrase that describes it in errors."""

    expected: str
    check: Callable[[Any], bool]

    def __or__(self, other: Constraint) -> Constraint:
        """A value either constraint accepts."""
        return Constraint(f"{self.expected} or {other.expected}", lambda v: self.check(v) or other.check(v))


def validate_params(values: Mapping[str, Any], constraints: Mapping[str, Constraint]) -> None:
    """Check every value of ``values`` whose name has a constraint in ``constraints``.

    Raises:
        InputError: naming the first parameter that breaks its constraint, its value, and what it must be.
    """
    for name, value in values.items():
        constraint = constraints.get(name)
        if constraint is not None and not constraint.check(value):
            shown = f"<{type(value).__name__}>" if isinstance(value, nn.Module) else repr(value)
            raise InputError(f"{name}={shown} is invalid: it must be {constraint.expected}.")


def number(value: Any) -> bool:
    """True for a finite real number (not a bool); an integer too large for a float is not one."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int of hundreds of digits, as JSON can write
        return False


def _integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def one_of(values: Sequence[str] | Mapping[str, Any], what: str = "") -> Constraint:
    """One of ``values`` (a mapping's keys), a string; ``what`` says what the choice is."""
    names = list(values)
    return Constraint(f"one of {names}" + (f": {what}" if what else ""), lambda v: isinstance(v, str) and v in names)


def at_least(low: float, *, integer: bool = False, example: str = "") -> Constraint:
    """A number (an integer) ``>= low``."""
    kind = "an integer" if integer else "a number"
    check = _integer if integer else number
    return Constraint(f"{kind} >= {low:g}" + (f", e.g. {example}" if example else ""), lambda v: check(v) and v >= low)


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


def numbers(low: float | None, strict: bool, example: str) -> Constraint:
    """A non-empty list of finite numbers, each > ``low`` (``strict``) or >= it."""

    def check(values: Any) -> bool:
        return (
            isinstance(values, (list, tuple))
            and len(values) > 0
            and all(number(v) and (v > low if strict else v >= low) for v in values)
        )

    kind = f"{'positive numbers' if strict and low == 0 else f'numbers >= {low:g}'}"
    return Constraint(f"a non-empty list of {kind}, e.g. {example}", check)


def _device(value: Any) -> bool:
    if value is None or isinstance(value, torch.device):
        return True
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        return False
    return True


NONE = Constraint("None", lambda v: v is None)
POSITIVE = Constraint("a positive number", lambda v: number(v) and v > 0)
NON_NEGATIVE = at_least(0)
FRACTION = Constraint("a fraction in (0, 1]", lambda v: number(v) and 0 < v <= 1)
BOOLEAN = Constraint("True or False", lambda v: isinstance(v, (bool, np.bool_)))
COUNT = at_least(1, integer=True)
STEPS = at_least(0, integer=True)
SEED = Constraint("an integer", _integer)

MODEL = Constraint(
    "an open_clip model name (see open_clip.list_models()), an open_clip model object, or a transformers "
    "CLIPModel / SiglipModel (see docs/models.md)",
    lambda v: (isinstance(v, str) and bool(v)) or isinstance(v, nn.Module),
)
PRETRAINED = Constraint(
    "None, an open_clip pretrained tag or a checkpoint path", lambda v: v is None or isinstance(v, (str, os.PathLike))
)
TEMPLATES = Constraint(
    f"None or a non-empty list of strings with {TEMPLATE_RULE} each, such as ['a photo of a {{}}.']",
    lambda v: v is None or valid_templates(v),
)
LR = Constraint("a positive number, e.g. 1e-3", POSITIVE.check)
REG_LAMBDA = Constraint(
    "'auto' (1/N), '1/N^2' or a number >= 0",
    lambda v: (isinstance(v, str) and v in REG_LAMBDA_RULES) or NON_NEGATIVE.check(v),
)
TRAIN_DTYPE = one_of(TRAIN_DTYPES, "W's training numerics")
EPOCHS = Constraint("an integer >= 0", STEPS.check)
VIEWS = Constraint("an integer >= 0 (0: train on the plain view)", STEPS.check)
BATCH_SIZE = Constraint("an integer >= 1", COUNT.check)
DEVICE = Constraint("None or a torch device such as 'cuda', 'cuda:1', 'mps' or 'cpu'", _device)
PRECISION = one_of(sorted(PRECISIONS))
LOGIT_SCALE = Constraint(
    f"None or a positive number <= {MAX_LOGIT_SCALE:g}", lambda v: v is None or (number(v) and 0 < v <= MAX_LOGIT_SCALE)
)
RANDOM_STATE = NONE | SEED
PREPROCESS = Constraint("None or a callable (PIL image -> tensor)", lambda v: v is None or callable(v))
TOKENIZER = Constraint("None or a callable (list of str -> token tensor)", lambda v: v is None or callable(v))
ON_ERROR_RULE = one_of(ON_ERROR)
FOLDER = Constraint("None or a folder path", lambda v: v is None or isinstance(v, (str, os.PathLike)))
CACHE_DTYPE = one_of(sorted(STORAGE_DTYPES))
TARGET = one_of(TARGETS, "the projector(s) to train")


def _class_names(names: Any) -> bool:
    return (
        isinstance(names, Sequence)
        and not isinstance(names, (str, bytes))
        and len(names) > 0
        and all(isinstance(n, str) and n.strip() for n in names)
        and len(set(names)) == len(names)
    )


CLASS_NAMES = Constraint("a non-empty list of distinct non-empty strings, e.g. ['cat', 'dog']", _class_names)
LRS = numbers(0, True, "[1e-3, 1e-2]")
REG_LAMBDAS = numbers(0, False, "[0, 0.1]")
TASKRES_ALPHA = Constraint(
    "None (no residual) or a positive number, TaskRes's α (e.g. 0.5)", lambda v: v is None or POSITIVE.check(v)
)


def resolve_reg_lambda(reg_lambda: float | str | None, n_shots: float) -> float:
    """λ as a number: a rule of :data:`REG_LAMBDA_RULES` (None is "auto") applied to N, or the number given.

    Raises:
        InputError: ``reg_lambda`` is neither a rule's name nor a number >= 0.
    """
    reg_lambda = "auto" if reg_lambda is None else reg_lambda
    validate_params({"reg_lambda": reg_lambda}, {"reg_lambda": REG_LAMBDA})
    if isinstance(reg_lambda, str):
        return 1.0 / float(n_shots) ** REG_LAMBDA_RULES[reg_lambda]
    return float(reg_lambda)


class Constrained:
    """A frozen configuration dataclass whose fields are checked against its ``_parameter_constraints`` when built."""

    _parameter_constraints: ClassVar[dict[str, Constraint]] = {}

    def __post_init__(self) -> None:
        validate_params(vars(self), type(self)._parameter_constraints)
