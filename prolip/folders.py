"""Labelled image collections on disk: class-per-folder trees and ``path,label`` CSV files."""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Sequence
from pathlib import Path

from prolip.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def read_labelled(source: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Image paths and labels from a folder (one sub-folder per class) or a ``path,label`` CSV.

    In a folder, every file with an image suffix below ``<source>/<class>/`` is taken, sorted,
    with the sub-folder name as its label. In a CSV, a header row ``path,label`` is optional;
    relative paths are taken relative to the CSV's folder.

    Raises:
        InputError: the source does not exist, or holds no labelled images.
    """
    root = Path(source)
    if root.is_dir():
        paths, labels = [], []
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for file in sorted(class_dir.rglob("*")):
                if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(str(file))
                    labels.append(class_dir.name)
        if not paths:
            raise InputError(
                f"{str(root)!r} holds no images in class sub-folders; lay it out as {root}/<class name>/<image files>."
            )
        return paths, labels
    if root.is_file() and root.suffix.lower() == ".csv":
        return _read_csv(root)
    if root.exists():
        raise InputError(f"{str(root)!r} is neither a folder of class sub-folders nor a .csv file of path,label rows.")
    raise InputError(f"{str(root)!r} does not exist; give an image folder or a path,label CSV file.")


def _read_csv(path: Path) -> tuple[list[str], list[str]]:
    paths, labels = [], []
    with path.open(newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if line_no == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise InputError(f"{str(path)!r} line {line_no}: expected 'path,label', got {row!r}.")
            image = Path(row[0].strip())
            paths.append(str(image if image.is_absolute() else path.parent / image))
            labels.append(row[1].strip())
    if not paths:
        raise InputError(f"{str(path)!r} has no path,label rows.")
    return paths, labels


def sample_shots(paths: Sequence[str], labels: Sequence[str], shots: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Draw ``shots`` images per class (all of a class's images when it has fewer), reproducibly."""
    if shots < 1:
        raise InputError(f"shots={shots} must be at least 1.")
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    chosen = sorted(i for members in by_class.values() for i in rng.sample(members, min(shots, len(members))))
    return [paths[i] for i in chosen], [labels[i] for i in chosen]
