"""Few-shot draws: N images per class, seeded, the same on every machine and Python version, nested in N.

The rule uses no random number generator. Within each class, the items of the split are ranked
by the SHA-256 digest of the UTF-8 bytes of ``"<seed>\\0<path>"`` (``seed`` in decimal, ``path``
relative to the dataset root in POSIX form; ties, which need equal paths, keep split order). The
N-shot draw takes each class's first N, so for one seed the N-shot draw contains every smaller
one, and the draw of a class does not depend on the other classes (a draw of the base classes is
the full draw restricted to them). A class with fewer than N items gives all of them, as CoOp does.

A draw is written as JSON (paths relative to the dataset root) beside the results, and read back
onto the dataset on any machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass

from prolip.atomic import atomic_write, read_json
from prolip.bench.data.dataset import Dataset, Item, path_inside
from prolip.errors import InputError

__all__ = [
    "DRAW_FORMAT",
    "DRAW_VERSION",
    "Draw",
    "draw_json",
    "draw_shots",
    "draw_validation",
    "read_draw",
    "write_draw",
]

logger = logging.getLogger(__name__)

DRAW_FORMAT = "prolip-draw"
"""The ``format`` field of a draw's JSON file."""

DRAW_VERSION = 1
"""The ``format_version`` field of a draw's JSON file (the ranking rule is part of the version)."""


@dataclass(frozen=True)
class Draw:
    """A few-shot draw: ``shots`` images per class of one dataset.

    Attributes:
        dataset: the dataset's name.
        role: what the draw is for: ``"train"`` (the few-shot training set) or ``"val"`` (the
            validation draw for hyperparameter selection).
        source: the split the items were drawn from, ``"train"`` or ``"val"``.
        shots: N, images per class asked for (a class with fewer gives all it has).
        seed: the draw's seed.
        items: the drawn items, class by class in label order, each class in rank order.
    """

    dataset: str
    role: str
    source: str
    shots: int
    seed: int
    items: tuple[Item, ...]

    @property
    def paths(self) -> list[str]:
        """The image paths, in item order."""
        return [item.path for item in self.items]

    @property
    def labels(self) -> list[int]:
        """The labels, in item order."""
        return [item.label for item in self.items]


def _ranked_by_class(dataset: Dataset, split: str, seed: int) -> dict[int, list[Item]]:
    """Each class's items of ``split``, in the draw rule's order."""
    by_class: dict[int, list[Item]] = defaultdict(list)
    for item in dataset.split(split):
        by_class[item.label].append(item)
    prefix = f"{seed}\0".encode()
    for items in by_class.values():
        items.sort(key=lambda item: hashlib.sha256(prefix + dataset.relative_path(item.path).encode()).digest())
    return by_class


def _check_request(shots: int, seed: int) -> None:
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 1:
        raise InputError(f"shots={shots!r} must be an integer >= 1.")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(f"seed={seed!r} must be an integer.")


def _take(dataset: Dataset, split: str, seed: int, start: int, stop: int) -> tuple[Item, ...]:
    """Ranks ``start..stop-1`` of every class of ``split``, class by class in label order."""
    by_class = _ranked_by_class(dataset, split, seed)
    short = [label for label in range(dataset.num_classes) if len(by_class.get(label, ())) < stop]
    if short:
        logger.warning(
            "%s: %d of %d classes have fewer than %d %s images (e.g. %r); they give what they have.",
            dataset.name,
            len(short),
            dataset.num_classes,
            stop,
            split,
            dataset.classnames[short[0]],
        )
    return tuple(item for label in range(dataset.num_classes) for item in by_class.get(label, [])[start:stop])


def draw_shots(dataset: Dataset, shots: int, seed: int) -> Draw:
    """The ``shots``-per-class few-shot training draw of ``dataset``'s train split for ``seed``.

    Raises:
        InputError: ``shots`` is not a positive integer, ``seed`` not an integer, or the dataset
            has no train split (a test-only set).
    """
    _check_request(shots, seed)
    if not dataset.train:
        raise InputError(f"dataset {dataset.name!r} has no train split to draw few-shot training images from.")
    return Draw(dataset.name, "train", "train", shots, seed, _take(dataset, "train", seed, 0, shots))


def draw_validation(dataset: Dataset, shots: int, seed: int) -> Draw:
    """The validation draw: ``shots`` per class from the val split, for hyperparameter selection.

    ProLIP's few-shot validation uses N per class (CoOp's code draws min(N, 4); pass that as
    ``shots`` to follow it). A dataset without a val split (ImageNet in CoOp's layout) gives
    ranks N..2N−1 of the train split under the same seed, which are disjoint from the N-shot
    training draw, as ProLIP's ImageNet code does (it samples 2N train images per class and
    splits them in halves).

    Raises:
        InputError: as :func:`draw_shots`; or the dataset has neither a val nor a train split.
    """
    _check_request(shots, seed)
    if dataset.val:
        return Draw(dataset.name, "val", "val", shots, seed, _take(dataset, "val", seed, 0, shots))
    if not dataset.train:
        raise InputError(
            f"dataset {dataset.name!r} has neither a val nor a train split to draw validation images from."
        )
    return Draw(dataset.name, "val", "train", shots, seed, _take(dataset, "train", seed, shots, 2 * shots))


def draw_json(draw: Draw, dataset: Dataset) -> bytes:
    """The bytes :func:`write_draw` writes: ``{"format": "prolip-draw", "format_version": 1, "dataset", "role",
    "source", "shots", "seed", "items": [[path, label, class name], ...]}``, items as in CoOp's split
    files, image paths relative to ``dataset.root``."""
    record = {
        "format": DRAW_FORMAT,
        "format_version": DRAW_VERSION,
        "dataset": draw.dataset,
        "role": draw.role,
        "source": draw.source,
        "shots": draw.shots,
        "seed": draw.seed,
        "items": [[dataset.relative_path(item.path), item.label, item.classname] for item in draw.items],
    }
    return json.dumps(record, indent=1, ensure_ascii=False).encode("utf-8")


def write_draw(draw: Draw, path: str | os.PathLike, dataset: Dataset) -> None:
    """Write ``draw`` as JSON to ``path`` (atomically): :func:`draw_json`."""
    try:
        atomic_write(path, [draw_json(draw, dataset)])
    except OSError as exc:
        raise InputError(
            f"cannot write draw file {str(path)!r} ({exc}); check that its folder exists and is writable."
        ) from exc


def read_draw(path: str | os.PathLike, dataset: Dataset) -> Draw:
    """Read a draw written by :func:`write_draw` onto ``dataset`` (paths resolved against its root).

    Raises:
        InputError: the file is unreadable or not a draw, or it was drawn from another dataset (its
            name, labels or class names do not match ``dataset``).
    """
    where = str(path)
    record = read_json(path, InputError, "prolip draw file")
    if not isinstance(record, dict) or record.get("format") != DRAW_FORMAT:
        raise InputError(f"{where!r} is not a prolip draw file (no 'format': {DRAW_FORMAT!r}).")
    if record.get("format_version") != DRAW_VERSION:
        raise InputError(
            f"{where!r} has draw format version {record.get('format_version')!r}; this prolip reads {DRAW_VERSION}."
        )
    if record.get("dataset") != dataset.name:
        raise InputError(f"{where!r} is a draw of dataset {record.get('dataset')!r}, not of {dataset.name!r}.")
    items = []
    for i, entry in enumerate(record.get("items", [])):
        ok = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[1], int)
        if not ok or not 0 <= entry[1] < dataset.num_classes or entry[2] != dataset.classnames[entry[1]]:
            raise InputError(f"{where!r}: item {i} = {entry!r} does not match the classes of dataset {dataset.name!r}.")
        items.append(Item(path_inside(dataset.root, entry[0], f"{where!r}: item {i}"), entry[1], entry[2]))
    try:
        return Draw(
            dataset.name, record["role"], record["source"], int(record["shots"]), int(record["seed"]), tuple(items)
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{where!r} lacks a valid {exc} field of a draw file.") from None
