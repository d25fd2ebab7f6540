"""The methods ``prolip bench`` can run: every module of this package registers its own.

Adding a method is adding one module here with a :class:`~prolip.bench.methods.interface.Method`
subclass decorated with :func:`~prolip.bench.methods.interface.register`.
"""

from __future__ import annotations

import importlib
import pkgutil

from prolip.bench.methods.interface import METHODS, FittedMethod, Method, get_method, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "interface":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "FittedMethod", "Method", "get_method", "register"]
