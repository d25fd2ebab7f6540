"""Progress bars show on a terminal when asked for, and never in a log, a pipe or with verbose=False."""

from __future__ import annotations

import io
import sys

import pytest
from conftest import colour_images, tiny_adapter

from prolip.progress import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stderr", "verbose", "shown"), [(_Terminal, True, True), (_Terminal, False, False),
                                                         (io.StringIO, True, False), (io.StringIO, False, False)])  # fmt: skip
def test_a_bar_shows_only_on_a_terminal_when_verbose(monkeypatch, stderr, verbose, shown):
    err = stderr()
    monkeypatch.setattr(sys, "stderr", err)
    with progress(range(3), verbose=verbose, desc="work", file=err) as bar:
        assert bar.disable is not shown
        list(bar)
    assert ("work" in err.getvalue()) is shown


def test_fitting_into_a_log_draws_no_bar(checkpoints, monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    tiny_adapter(checkpoints["vit"], verbose=True).fit(*colour_images(2))
    assert "features" not in err.getvalue() and "training" not in err.getvalue()
