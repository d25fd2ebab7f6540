"""User images on disk: class-per-folder trees and ``path,label`` CSV files, and a folder of them as a Dataset.

:func:`read_labelled` reads one labelled collection (what ``prolip fit`` and ``prolip eval`` take);
:func:`read_images` lists unlabelled images from files, folders and CSV files of paths (``prolip predict``).
:func:`read_image_dataset` makes a :class:`~prolip.datasets.Dataset` of a user's folder, so every bench
setting runs on it: for each split ``train``, ``val`` and ``test``, either a class-per-folder tree
``<split>/<class name>/<images>`` or a ``<split>.csv`` file of ``path,label`` rows, and optionally a
``templates.txt`` of prompts.
"""

from __future__ import annotations

import csv
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

from prolip.datasets.dataset import SPLIT_NAMES, Dataset, Item
from prolip.datasets.templates import read_templates
from prolip.errors import InputError
from prolip.model.zeroshot import DEFAULT_TEMPLATES

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
    with path.open(newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if line_no == 1 and [c.strip().lower() for c in row[:width]] == list(columns):
                continue
            if len(row) < width or not all(cell.strip() for cell in row[:width]):
                raise InputError(f"{str(path)!r} line {line_no}: expected '{expected}', got {row!r}.")
            image = Path(row[0].strip())
            table[0].append(str(image if image.is_absolute() else path.parent / image))
            for column, cell in zip(table[1:], row[1:width], strict=False):
                column.append(cell.strip())
    if not table[0]:
        raise InputError(f"{str(path)!r} has no {expected} rows.")
    return table


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


TEMPLATES_FILE = "templates.txt"
"""The optional prompt file of a user's dataset folder, read by :func:`prolip.datasets.read_templates`."""


def _split_source(root: Path, split: str) -> Path | None:
    folder, table = root / split, root / f"{split}.csv"
    if folder.is_dir() and table.is_file():
        raise InputError(f"{str(root)!r} has both {split}/ and {split}.csv; keep one of them.")
    return folder if folder.is_dir() else table if table.is_file() else None


def read_image_dataset(
    root: str | os.PathLike, name: str | None = None, templates: Sequence[str] | None = None
) -> Dataset:
    """Read a user's dataset: ``root/<split>/<class>/<images>`` or ``root/<split>.csv`` per split.

    Splits that are absent are empty (a test-only folder serves as a cross-dataset target; without
    ``val``, validation draws come from ``train``, see :func:`prolip.datasets.draw_validation`).
    Classes are the labels of all splits together, sorted; the label text is the class name.

    Args:
        root: the dataset folder.
        name: the dataset's name; defaults to the folder's name.
        templates: prompt templates; defaults to ``root/templates.txt`` (one per line) if present,
            else ``("a photo of a {}.",)``.

    Raises:
        InputError: no split is present, a split has both a folder and a CSV, or a split is empty
            or malformed (see :func:`prolip.datasets.generic.read_labelled`).
    """
    root = Path(root).expanduser().absolute()
    sources = {split: _split_source(root, split) for split in SPLIT_NAMES} if root.is_dir() else {}
    if not any(sources.values()):
        raise InputError(
            f"{str(root)!r} holds no dataset: give a folder with train/, val/ and test/ sub-folders of "
            "class folders (train/<class name>/<images>), or train.csv, val.csv and test.csv files of "
            "path,label rows; see docs/datasets.md."
        )
    read = {split: read_labelled(source) if source else ([], []) for split, source in sources.items()}
    classnames = tuple(sorted({label for _, labels in read.values() for label in labels}))
    label_of = {classname: label for label, classname in enumerate(classnames)}
    splits = {
        split: tuple(Item(path, label_of[c], c) for path, c in zip(paths, labels, strict=True))
        for split, (paths, labels) in read.items()
    }
    if templates is None:
        templates = read_templates(root / TEMPLATES_FILE) if (root / TEMPLATES_FILE).is_file() else DEFAULT_TEMPLATES
    return Dataset(name or root.name, root, classnames, tuple(templates), **splits)
