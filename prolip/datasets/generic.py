"""User images on disk: class-per-folder trees and ``path,label`` CSV files.

:func:`read_labelled` reads one labelled collection (what ``prolip fit`` and ``prolip eval`` take);
:func:`read_images` lists unlabelled images from files, folders and CSV files of paths (``prolip predict``);
:func:`sample_shots` draws N images per class from them.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

from prolip.atomic import read_text
from prolip.errors import InputError, warn

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _report_skipped(root: Path, files: Sequence[Path], where: str = "") -> None:
    """Say how many files below ``root`` were left out for not being images (by suffix) ``where`` they are."""
    if files:
        many = len(files) != 1
        logger.info(
            "%s: skipped %d file%s that %s not image files%s (e.g. %s)",
            root, len(files), "s" if many else "", "are" if many else "is", where, files[0].name,
        )  # fmt: skip


def read_images(sources: Sequence[str | os.PathLike]) -> list[str]:
    """Image paths from a mixed list of image files, folders and CSV files of paths, in the order given.

    A folder gives every image file below it (recursively, by suffix: :data:`IMAGE_SUFFIXES`),
    sorted; other files are skipped and counted (logged). A ``.csv`` file gives the paths in its
    first column (an optional header row ``path``; other columns, such as a label, are ignored;
    relative paths are taken relative to the CSV's folder). Anything else is taken as one image
    file, read (and checked) when the images are loaded.

    Raises:
        InputError: a folder holds no image files, a CSV file holds no paths, or ``sources`` is empty.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    paths: list[str] = []
    for source in sources:
        root = Path(source)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file())
            images = [str(p) for p in files if _is_image(p)]
            _report_skipped(root, [p for p in files if not _is_image(p)])
            if not images:
                raise InputError(f"{str(root)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}), even below it.")
            paths.extend(images)
        elif root.suffix.lower() == ".csv" and root.is_file():
            paths.extend(_read_csv(root, columns=("path",))[0])
        else:
            paths.append(os.fspath(source))
    if not paths:
        raise InputError("no images given; pass image files, folders of images, or CSV files of paths.")
    return paths


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
        paths, labels, others = [], [], [p for p in root.iterdir() if p.is_file()]
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for file in sorted(p for p in class_dir.rglob("*") if p.is_file()):
                if _is_image(file):
                    paths.append(str(file))
                    labels.append(class_dir.name)
                else:
                    others.append(file)
        _report_skipped(root, sorted(others), " in class sub-folders")
        if not paths:
            raise InputError(
                f"{str(root)!r} holds no images in class sub-folders; lay it out as {root}/<class name>/<image files>."
            )
        return paths, labels
    if root.is_file() and root.suffix.lower() == ".csv":
        paths, labels = _read_csv(root, columns=("path", "label"))
        return paths, labels
    if root.exists():
        raise InputError(f"{str(root)!r} is neither a folder of class sub-folders nor a .csv file of path,label rows.")
    raise InputError(f"{str(root)!r} does not exist; give an image folder or a path,label CSV file.")


def _read_csv(path: Path, columns: tuple[str, ...]) -> tuple[list[str], ...]:
    """The first ``len(columns)`` cells of every row (an optional header row naming them), paths made absolute."""
    width, expected = len(columns), ",".join(columns)
    table: tuple[list[str], ...] = tuple([] for _ in columns)
    reader = csv.reader(io.StringIO(read_text(path, "CSV file"), newline=""))
    try:
        rows = list(reader)
    except csv.Error as exc:  # a field beyond csv's size limit, a NUL byte
        raise InputError(f"{str(path)!r} line {reader.line_num}: not a readable CSV row ({exc}).") from None
    for line_no, row in enumerate(rows, start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if line_no == 1 and [c.strip().lower() for c in row[:width]] == list(columns):
            continue
        if len(row) < width or not all(cell.strip() for cell in row[:width]):
            raise InputError(f"{str(path)!r} line {line_no}: expected '{expected}', got {row[:4]!r}.")
        image = Path(row[0].strip())
        table[0].append(str(image if image.is_absolute() else path.parent / image))
        for column, cell in zip(table[1:], row[1:width], strict=False):
            column.append(cell.strip())
    if not table[0]:
        raise InputError(f"{str(path)!r} has no {expected} rows.")
    return table


def sample_shots(paths: Sequence[str], labels: Sequence[str], shots: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Draw ``shots`` images per class, reproducibly; the same number from every class, so N stays whole.

    When a class has fewer than ``shots`` images, every class gets as many as the smallest has, with a warning
    naming it (an N-shot task has N images of each class).
    """
    if shots < 1:
        raise InputError(f"shots={shots} must be at least 1.")
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    smallest = min(by_class, key=lambda c: len(by_class[c]))
    n = min(shots, len(by_class[smallest]))
    if n < shots:
        warn(f"class {smallest!r} has only {n} images, fewer than {shots} shots: drawing {n} per class, so that "
             "every class has as many.")  # fmt: skip
    chosen = sorted(i for members in by_class.values() for i in rng.sample(members, n))
    return [paths[i] for i in chosen], [labels[i] for i in chosen]
