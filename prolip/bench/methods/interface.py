"""The method interface of ``prolip bench`` and its registry.

A method is one small module in :mod:`prolip.bench.methods` holding a :class:`Method` subclass
decorated with :func:`register`. Its ``fit`` gets a :class:`~prolip.bench.problem.Problem` (the
features the bench extracted once, the frozen heads, the classes) and returns a
:class:`FittedMethod`, whose ``logits`` the bench calls on each test set with that set's classes.
The bench times ``fit`` and reports it beside the accuracy.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.errors import InputError
from prolip.params import (
    BATCH_SIZE,
    COUNT,
    EPOCHS,
    FRACTION,
    LR,
    LRS,
    NON_NEGATIVE,
    POSITIVE,
    REG_LAMBDA,
    REG_LAMBDAS,
    STEPS,
    TRAIN_DTYPE,
    Constraint,
    number,
    validate_params,
)


class FittedMethod(ABC):
    """A trained method: class scores for test features, given the classes to score."""

    info: dict[str, Any]
    """What the method chose or learned that a reader of the results wants (e.g. a selected lr)."""

    def __init__(self) -> None:
        self.info = {}

    @abstractmethod
    def logits(self, test: FeatureSet, classes: Classes) -> torch.Tensor:
        """Scores ``[n, K]`` of the test images for ``classes`` (higher is more likely).

        ``test.features`` is ``[1, n, width]`` (the plain view), or ``[1 + test_views, n, width]``
        with view 0 the plain view for methods with ``test_views > 0``. ``classes`` are the training
        classes, or other classes (base-to-new, cross-dataset) for methods with ``transfers``.
        """


class Method(ABC):
    """A few-shot method the bench can run (see the module docstring)."""

    name: ClassVar[str]
    """The name used on the command line (``--methods NAME``)."""

    transfers: ClassVar[bool] = True
    """Whether the fitted method can score classes it was not trained on from their text
    (needed for base-to-new's new classes and for cross-dataset and domain-generalisation targets)."""

    test_views: ClassVar[int] = 0
    """Augmented views of each test image the method needs besides the plain one (test-time methods)."""

    _parameter_constraints: ClassVar[dict[str, Constraint]] = {}
    """The method's own constraints on its arguments, besides (or instead of) the shared :data:`ARGUMENTS`."""

    @classmethod
    def parameter_constraints(cls) -> dict[str, Constraint]:
        """What each constructor argument must be: the shared vocabulary's entry for its name, or the method's own."""
        names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        return {n: ARGUMENTS[n] for n in names if n in ARGUMENTS} | cls._parameter_constraints

    @abstractmethod
    def fit(self, problem: Problem) -> FittedMethod:
        """Train on ``problem`` (selecting hyperparameters on ``problem.val`` only, never on test data)."""

    def hyperparameters(self) -> dict[str, Any]:
        """The method's arguments as set (its attributes, dataclasses flattened), as JSON values.

        The bench records them in every cell's ``info``, under what the fit itself reports
        (a λ resolved from 1/N, a point chosen on validation), so each cell says how it was trained.
        """
        out: dict[str, Any] = {}
        for key, value in vars(self).items():
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                out.update(dataclasses.asdict(value))
            else:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out


METHODS: dict[str, type[Method]] = {}
"""Every registered method class, by name."""


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available to the bench under ``cls.name``."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise InputError(f"two bench methods are named {cls.name!r}: {METHODS[cls.name].__name__} and {cls.__name__}.")
    METHODS[cls.name] = cls
    return cls


def _optional(constraint: Constraint, default: str) -> Constraint:
    return Constraint(f"None ({default}) or {constraint.expected}", lambda v: v is None or constraint.check(v))


ARGUMENTS: dict[str, Constraint] = {
    "lr": LR,
    "prolip_lr": LR,
    "reg_lambda": _optional(REG_LAMBDA, "the method's default, 1/N for ProLIP"),
    "train_dtype": TRAIN_DTYPE,
    "epochs": _optional(EPOCHS, "the method's default"),
    "batch_size": BATCH_SIZE,
    "max_iter": COUNT,
    "c": _optional(POSITIVE, "chosen on val"),
    "ratio": _optional(Constraint("a fraction in [0, 1]", lambda v: number(v) and 0 <= v <= 1), "chosen on val"),
    "alpha": _optional(NON_NEGATIVE, "the method's default or chosen on val"),
    "beta": _optional(POSITIVE, "chosen on val"),
    "rho": FRACTION,
    "steps": STEPS,
    "weight_decay": _optional(NON_NEGATIVE, "the optimiser's default"),
    "lrs": LRS,
    "reg_lambdas": REG_LAMBDAS,
}
"""The shared vocabulary of bench method arguments: an argument means the same in every method that takes it, unless
the method's own ``_parameter_constraints`` say otherwise (:meth:`Method.parameter_constraints`)."""


def get_method(spec: str, defaults: dict[str, dict[str, Any]] | None = None) -> Method:
    """A new instance of the method named by ``spec``: ``NAME`` or ``NAME:key=value,key=value``.

    The second form sets constructor arguments (values read as JSON numbers, strings otherwise),
    e.g. ``prolip:lr=1e-2,reg_lambda=0`` — how the paper's learning-rate × λ table is run.
    ``defaults`` (method name → arguments) are used for the arguments the spec does not set (a
    setting's official values, :data:`prolip.bench.settings.METHOD_DEFAULTS`).
    Each argument is checked against the method's :meth:`Method.parameter_constraints` here, before any extraction.
    """
    name, _, arguments = spec.partition(":")
    if name not in METHODS:
        raise InputError(f"unknown bench method {name!r}; available: {sorted(METHODS)}.")
    kwargs = dict((defaults or {}).get(name, {}))
    for pair in filter(None, arguments.split(",")):
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise InputError(f"bench method {spec!r}: {pair!r} is not key=value, e.g. prolip:lr=1e-2,reg_lambda=0.")
        try:
            kwargs[key] = json.loads(text)
        except ValueError:
            kwargs[key] = text
    try:
        validate_params(kwargs, METHODS[name].parameter_constraints())
    except InputError as exc:
        raise InputError(f"bench method {spec!r}: {exc}") from None
    try:
        return METHODS[name](**kwargs)
    except TypeError as exc:
        raise InputError(f"bench method {spec!r}: {exc}; see the method's docstring for its arguments.") from None
