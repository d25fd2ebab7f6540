"""The scikit-learn estimator contract shared by prolip's estimators: parameters in, parameters out.

As in scikit-learn, ``__init__`` only stores its keyword arguments under their own names; this
base class derives ``get_params``, ``set_params`` and ``repr`` from the constructor's signature,
and declares the estimator a classifier that validates its own inputs (images, not arrays).
:class:`Learned` makes the learned attributes (``classes_``, ``delta_``, ...) read the fitted state.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from prolip.errors import InputError


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
    """Base class: ``get_params`` / ``set_params`` / ``repr`` and scikit-learn's classifier tags."""

    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, as scikit-learn's ``get_params``."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Estimator:
        """Set constructor arguments by name, as scikit-learn's ``set_params``; returns self."""
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise InputError(f"unknown parameter {name!r} for {type(self).__name__}; valid parameters: {valid}.")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        shown = [
            f"{k}={v!r}" if not isinstance(v, nn.Module) else f"{k}=<{type(v).__name__}>"
            for k, v in self.get_params().items()
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
