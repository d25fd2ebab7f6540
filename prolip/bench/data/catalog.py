"""Datasets by name under one data root: CoOp's reader names, or any other folder in the generic layout.

The generic layout (:func:`read_image_dataset`) makes a :class:`~prolip.bench.data.Dataset` of a user's own
folder, so every bench setting runs on it: for each split ``train``, ``val`` and ``test``, either a
class-per-folder tree ``<split>/<class name>/<images>`` or a ``<split>.csv`` file of ``path,label`` rows,
and optionally a ``templates.txt`` of prompts.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from prolip.bench.data.coop import COOP_LAYOUTS, read_coop
from prolip.bench.data.dataset import SPLIT_NAMES, Dataset, Item, path_inside
from prolip.datasets.generic import read_labelled
from prolip.datasets.templates import read_templates
from prolip.errors import InputError
from prolip.model.zeroshot import DEFAULT_TEMPLATES


def read_dataset(name: str, data_root: str | os.PathLike) -> Dataset:
    """The dataset called ``name`` under ``data_root``.

    A reader name of :data:`prolip.bench.data.COOP_LAYOUTS` (``"imagenet"``, ``"caltech101"``, ...)
    reads CoOp's layout (:func:`prolip.bench.data.read_coop`); any other name is the folder
    ``data_root/name`` in the generic layout (:func:`read_image_dataset`).

    Raises:
        InputError: the dataset is missing or malformed; the message says what was expected where.
    """
    if name in COOP_LAYOUTS:
        return read_coop(name, data_root)
    folder = Path(data_root).expanduser() / name
    if not folder.is_dir():
        raise InputError(
            f"dataset {name!r} is neither a CoOp reader name ({', '.join(COOP_LAYOUTS)}) nor a folder "
            f"{str(folder)!r} of your own data (train/, val/, test/ of class folders, or train.csv, val.csv, "
            "test.csv); see docs/datasets.md."
        )
    return read_image_dataset(folder, name=name)


TEMPLATES_FILE = "templates.txt"
"""The optional prompt file of a user's dataset folder, read by :func:`prolip.datasets.templates.read_templates`."""


def _split_source(root: Path, split: str) -> Path | None:
    folder, table = root / split, root / f"{split}.csv"
    if folder.is_dir() and table.is_file():
        raise InputError(f"{str(root)!r} has both {split}/ and {split}.csv; keep one of them.")
    return folder if folder.is_dir() else table if table.is_file() else None


def _check_inside(root: Path, table: Path, paths: Sequence[str]) -> None:
    """Refuse a ``<split>.csv`` that names an image outside the dataset folder, as a split file naming one is.

    Draws store image paths relative to the folder and their reader refuses any other
    (:func:`~prolip.bench.data.dataset.path_inside`), so the bench reads no image elsewhere on the disk:
    a path with a ``..`` component, or an absolute one outside the folder, is refused before any image is
    read. (``paths`` are :func:`~prolip.datasets.generic.read_labelled`'s: the CSV's cells, joined to
    its folder when relative.)

    Raises:
        InputError: naming the CSV file, the line and the path.
    """
    prefix = os.path.join(os.fspath(root), "")
    outside = {p for p in paths if not p.startswith(prefix) or ".." in Path(p).parts}
    if not outside:
        return
    with table.open(newline="", encoding="utf-8") as f:  # again, for the line: read_labelled gives the paths only
        for line, row in enumerate(csv.reader(f), start=1):
            cell = row[0].strip() if row else ""
            if cell and str(Path(cell) if Path(cell).is_absolute() else table.parent / cell) in outside:
                path_inside(root, cell, f"{str(table)!r} line {line}")  # raises: absolute, or a '..' component
    raise InputError(f"{str(table)!r} names images outside the dataset folder {str(root)!r}, e.g. {min(outside)!r}.")


def read_image_dataset(
    root: str | os.PathLike, name: str | None = None, templates: Sequence[str] | None = None
) -> Dataset:
    """Read a user's dataset: ``root/<split>/<class>/<images>`` or ``root/<split>.csv`` per split.

    Splits that are absent are empty (a test-only folder serves as a cross-dataset target; without
    ``val``, validation draws come from ``train``, see :func:`prolip.bench.data.draw_validation`).
    Classes are the labels of all splits together, sorted; the label text is the class name.

    Args:
        root: the dataset folder.
        name: the dataset's name; defaults to the folder's name.
        templates: prompt templates; defaults to ``root/templates.txt`` (one per line) if present,
            else ``("a photo of a {}.",)``.

    Raises:
        InputError: no split is present, a split has both a folder and a CSV, a split is empty
            or malformed (see :func:`prolip.datasets.generic.read_labelled`), or a CSV names an
            image outside ``root`` (an absolute path elsewhere, or a ``..`` component; naming its line).
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
    for split, source in sources.items():
        if source is not None and source.is_file():
            _check_inside(root, source, read[split][0])
    classnames = tuple(sorted({label for _, labels in read.values() for label in labels}))
    label_of = {classname: label for label, classname in enumerate(classnames)}
    splits = {
        split: tuple(Item(path, label_of[c], c) for path, c in zip(paths, labels, strict=True))
        for split, (paths, labels) in read.items()
    }
    if templates is None:
        templates = read_templates(root / TEMPLATES_FILE) if (root / TEMPLATES_FILE).is_file() else DEFAULT_TEMPLATES
    return Dataset(name or root.name, root, classnames, tuple(templates), **splits)
