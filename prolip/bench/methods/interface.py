"""The method interface of ``prolip bench`` and its registry.

A method is one small module in :mod:`prolip.bench.methods` holding a :class:`Method` subclass
decorated with :func:`register`. Its ``fit`` gets a :class:`~prolip.bench.problem.Problem` (the
features the bench extracted once, the frozen heads, the classes) and returns a
:class:`FittedMethod`, whose ``logits`` the bench calls on each test set with that set's classes.
The bench times ``fit`` and reports it beside the accuracy.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.errors import InputError
from prolip.params import CONSTRAINTS, Constraint, number, positive_numbers


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


_AT_LEAST_ZERO = Constraint("a number >= 0", lambda v: number(v) and v >= 0)
ARGUMENT_CONSTRAINTS: dict[str, Constraint] = {
    "lr": CONSTRAINTS["lr"],
    "prolip_lr": CONSTRAINTS["lr"],
    "reg_lambda": Constraint(
        "None or 'auto' (the method's default, 1/N for ProLIP), '1/N^2' or a number >= 0",
        lambda v: v is None or CONSTRAINTS["reg_lambda"].check(v),
    ),
    "train_dtype": CONSTRAINTS["train_dtype"],
    "epochs": _optional(CONSTRAINTS["epochs"], "the method's default"),
    "batch_size": CONSTRAINTS["batch_size"],
    "max_iter": Constraint("an integer >= 1", CONSTRAINTS["batch_size"].check),
    "c": _optional(Constraint("a positive number", lambda v: number(v) and v > 0), "chosen on val"),
    "ratio": _optional(Constraint("a fraction in [0, 1]", lambda v: number(v) and 0 <= v <= 1), "chosen on val"),
    "alpha": _optional(_AT_LEAST_ZERO, "the method's default or chosen on val"),
    "beta": _optional(Constraint("a positive number", lambda v: number(v) and v > 0), "chosen on val"),
    "rho": Constraint("a fraction in (0, 1]", lambda v: number(v) and 0 < v <= 1),
    "steps": CONSTRAINTS["epochs"],
    "weight_decay": _optional(_AT_LEAST_ZERO, "the optimiser's default"),
    "lrs": Constraint("a non-empty list of positive numbers, e.g. [1e-3,1e-2]", lambda v: positive_numbers(v, 0)),
    "reg_lambdas": Constraint("a non-empty list of numbers >= 0, e.g. [0,0.1]", lambda v: positive_numbers(v, None)),
    **{name: Constraint("a name", lambda v: isinstance(v, str)) for name in ("start", "optimizer", "keys", "form")},
}
"""What every bench method argument must be, by name (an argument means the same in every method that takes it):
checked by :func:`get_method` when a method is built, before the bench does any work."""


def get_method(spec: str, defaults: dict[str, dict[str, Any]] | None = None) -> Method:
    """A new instance of the method named by ``spec``: ``NAME`` or ``NAME:key=value,key=value``.

    The second form sets constructor arguments (values read as JSON numbers, strings otherwise),
    e.g. ``prolip:lr=1e-2,reg_lambda=0`` — how the paper's learning-rate × λ table is run.
    ``defaults`` (method name → arguments) are used for the arguments the spec does not set (a
    setting's official values, :data:`prolip.bench.settings.METHOD_DEFAULTS`).
    Each argument is checked against :data:`ARGUMENT_CONSTRAINTS` here, before any extraction.
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
    for key, value in kwargs.items():
        constraint = ARGUMENT_CONSTRAINTS.get(key)
        if constraint is not None and not constraint.check(value):
            raise InputError(f"bench method {spec!r}: {key}={value!r} is invalid: it must be {constraint.expected}.")
    try:
        return METHODS[name](**kwargs)
    except TypeError as exc:
        raise InputError(f"bench method {spec!r}: {exc}; see the method's docstring for its arguments.") from None
