"""The scikit-learn estimator contract shared by prolip's estimators: parameters in, parameters out.

As in scikit-learn, ``__init__`` only stores its keyword arguments under their own names; this base class
derives ``get_params`` (nested, ``deep=True``), ``set_params`` (nested: ``adapter__lr=...``) and ``repr``
from the constructor's signature, checks the parameters against the class's ``_parameter_constraints`` once
per fit (:meth:`Estimator._validate_params`), and declares the estimator a classifier that validates its own
inputs (images, not arrays), so ``sklearn.base.clone`` and meta-estimators work. :class:`Learned` makes the
learned attributes (``classes_``, ``delta_``, ...) read the fitted state.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from torch import nn

from prolip.errors import DeltaFileError, InputError
from prolip.params import Constraint, validate_params


class Learned:
    """A learned attribute (``name_``) of an estimator, read from its fitted state.

    The estimator's ``_fitted()`` returns that state or raises NotFittedError, so every learned
    attribute of an unfitted estimator says how to fit it.
    """

    def __init__(self, read: Callable[[Any], Any], doc: str) -> None:
        self.read, self.__doc__ = read, doc

    def __get__(self, instance: Any, owner: type) -> Any:
        return self if instance is None else self.read(instance._fitted())


class Estimator:
    """Base class: ``get_params`` / ``set_params`` / ``repr``, the parameter constraints, scikit-learn's tags."""

    _parameter_constraints: ClassVar[dict[str, Constraint]] = {}
    """What each constructor argument must be (composed by inheritance); checked once per fit."""

    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, as scikit-learn's ``get_params``; with ``deep``, also ``name__param`` of each
        argument that is an estimator itself (e.g. ``adapter__lr`` of a ProLIPSearch)."""
        params = {name: getattr(self, name) for name in self._param_names()}
        if deep:
            for name, value in list(params.items()):
                if isinstance(value, Estimator):
                    params.update({f"{name}__{key}": v for key, v in value.get_params(deep=True).items()})
        return params

    def set_params(self, **params: Any) -> Estimator:
        """Set constructor arguments by name, as scikit-learn's ``set_params`` (``adapter__lr=...`` sets the nested
        estimator's); returns self."""
        valid = self._param_names()
        nested: dict[str, dict[str, Any]] = {}
        for name, value in params.items():
            outer, _, inner = name.partition("__")
            if outer not in valid:
                raise InputError(f"unknown parameter {outer!r} for {type(self).__name__}; valid parameters: {valid}.")
            if inner:
                nested.setdefault(outer, {})[inner] = value
            else:
                setattr(self, name, value)
        for outer, values in nested.items():
            inner_estimator = getattr(self, outer)
            if not isinstance(inner_estimator, Estimator):
                raise InputError(
                    f"{outer} of {type(self).__name__} is not an estimator; {sorted(values)} cannot be set."
                )
            inner_estimator.set_params(**values)
        return self

    def check_params(self) -> None:
        """Check the constructor arguments against ``_parameter_constraints`` (InputError naming the first bad one)."""
        validate_params(self.get_params(deep=False), type(self)._parameter_constraints)

    @classmethod
    def _restored(
        cls, stored: Mapping[str, Any], saved: Sequence[str], overrides: Mapping[str, Any], source: str
    ) -> dict[str, Any]:
        """The constructor arguments of an estimator read from a file: the ``saved`` ones it stores, checked, then the
        caller's ``overrides``.

        Only the names in ``saved`` are taken from the file, so a file never chooses the device, callables or the
        model.

        Raises:
            InputError: an override is not one of the estimator's parameters.
            DeltaFileError: a stored value breaks its constraint (the file was damaged or edited).
        """
        valid = cls._param_names()
        unknown = set(overrides) - set(valid)
        if unknown:
            raise InputError(f"unknown parameter(s) {sorted(unknown)}; valid: {list(valid)}.")
        params = {k: v for k, v in stored.items() if k in saved}
        try:
            validate_params(params, cls._parameter_constraints)
        except InputError as exc:
            raise DeltaFileError(
                f"{source} holds invalid hyperparameters ({exc}); the file is damaged or was edited."
            ) from None
        return {**params, **overrides}

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        shown = [
            f"{k}={v!r}" if not isinstance(v, nn.Module) else f"{k}=<{type(v).__name__}>"
            for k, v in self.get_params(deep=False).items()
            if not (
                v is defaults[k]
                or (
                    isinstance(v, (str, int, float, bool, type(None)))
                    and v == defaults[k]
                    and type(v) is type(defaults[k])
                )
            )
        ]
        return f"{type(self).__name__}({', '.join(shown)})"

    _estimator_type = "classifier"  # what scikit-learn < 1.6 reads

    def __sklearn_tags__(self) -> Any:
        """scikit-learn's estimator tags: a classifier whose inputs are images, validated by prolip.

        Only called by scikit-learn (e.g. ``cross_val_score``), so importing it here adds no dependency.
        """
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags

        return Tags(
            estimator_type="classifier",
            target_tags=TargetTags(required=True),
            classifier_tags=ClassifierTags(),
            input_tags=InputTags(one_d_array=True, two_d_array=False),
            no_validation=True,
        )
