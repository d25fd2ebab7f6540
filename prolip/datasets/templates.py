"""Prompt-template files (one template per line, each with one ``{}`` for the class name) and class-name files."""

from __future__ import annotations

import os
from pathlib import Path

from prolip.atomic import read_text
from prolip.errors import InputError
from prolip.model.zeroshot import check_templates


def _read_lines(path: Path, what: str) -> list[str]:
    """The stripped lines of a UTF-8 text file (a byte-order mark dropped), without blank lines and ``#`` comments."""
    lines = read_text(path, f"{what} file").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Read class names from a UTF-8 text file, one per line (blank lines and ``#`` comments skipped).

    Raises:
        InputError: the file is missing or unreadable, or holds no name.
    """
    names = _read_lines(Path(path), "class names")
    if not names:
        raise InputError(f"class names file {os.fspath(path)!r} holds no name; write one class name per line.")
    return names


def read_templates(path: str | os.PathLike) -> tuple[str, ...]:
    """Read prompt templates from a UTF-8 text file, one per line.

    Blank lines and lines starting with ``#`` are skipped; surrounding whitespace is stripped.

    Raises:
        InputError: the file is missing or unreadable, holds no template, or a template lacks
            exactly one ``{}``.
    """
    path = Path(path)
    templates = _read_lines(path, "templates")
    if not templates:
        raise InputError(
            f"templates file {str(path)!r} holds no template; write one per line, e.g. 'a photo of a {{}}.'"
        )
    return tuple(check_templates(templates))
