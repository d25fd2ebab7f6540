"""Prompt-template files: one template per line, each with one ``{}`` for the class name."""

from __future__ import annotations

import os
from pathlib import Path

from prolip.errors import InputError
from prolip.model.zeroshot import check_templates


def read_templates(path: str | os.PathLike) -> tuple[str, ...]:
    """Read prompt templates from a UTF-8 text file, one per line.

    Blank lines and lines starting with ``#`` are skipped; surrounding whitespace is stripped.

    Raises:
        InputError: the file is missing or unreadable, holds no template, or a template lacks
            exactly one ``{}``.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read templates file {str(path)!r}: {exc}") from None
    templates = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not templates:
        raise InputError(
            f"templates file {str(path)!r} holds no template; write one per line, e.g. 'a photo of a {{}}.'"
        )
    return tuple(check_templates(templates))
