"""Progress bars: one place decides when they show.

A bar shows on long work when the caller asked for output (``verbose``) and stderr is a terminal: a log file, a
pipe or CI gets none (tqdm's own default would draw them into the log).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress(iterable: Iterable[Any] | None = None, *, verbose: bool, **kwargs: Any) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one, with ``total=``), shown only when ``verbose`` and on a terminal."""
    return tqdm(iterable, disable=not (verbose and _on_terminal()), **kwargs)


def _on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
