"""The labelled dataset every reader returns: class names, prompt templates and train / val / test items."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from prolip.errors import InputError
from prolip.model.zeroshot import check_templates

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
"""The splits a :class:`Dataset` holds, in order."""


class Item(NamedTuple):
    """One labelled image: its file's path, its label (0..K−1) and the name of that label's class."""

    path: str
    label: int
    classname: str


@dataclass(frozen=True)
class Dataset:
    """A labelled image dataset with fixed train / val / test splits, as the few-shot protocol uses it.

    Construction checks that every item's label is in 0..K−1 and carries that label's class name.

    Attributes:
        name: the reader name (e.g. ``"caltech101"``) or the user's name for the data.
        root: the dataset's own folder; draws store image paths relative to it.
        classnames: the class name of each label, in label order (what the prompts are filled with).
        templates: the prompt templates (each with one ``{}``), e.g. CoOp's ``("a photo of a {}.",)``.
        train: the training split (few-shot draws are taken from it); empty for test-only sets.
        val: the validation split; empty for test-only sets and for ImageNet (CoOp has none).
        test: the test split.
        class_ids: an identifier of each label's class that is stable across datasets (the WordNet
            id for the ImageNet family, so ImageNet-A's classes can be found among ImageNet's);
            defaults to ``classnames``.
    """

    name: str
    root: Path
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    train: tuple[Item, ...] = ()
    val: tuple[Item, ...] = ()
    test: tuple[Item, ...] = ()
    class_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "classnames", tuple(self.classnames))
        object.__setattr__(self, "templates", tuple(check_templates(self.templates)))
        object.__setattr__(self, "class_ids", tuple(self.class_ids) or self.classnames)
        if not self.classnames:
            raise InputError(f"dataset {self.name!r} has no classes.")
        empty = [label for label, name in enumerate(self.classnames) if not (isinstance(name, str) and name.strip())]
        if empty:  # every prompt of such a class would be the bare template
            raise InputError(
                f"dataset {self.name!r}: class {empty[0]} has an empty name ({len(empty)} empty in all); give every "
                "class its name (classnames.txt lines are '<folder> <class name>')."
            )
        if len(self.class_ids) != len(self.classnames):
            raise InputError(
                f"dataset {self.name!r}: {len(self.class_ids)} class_ids for {len(self.classnames)} classes."
            )
        for split in SPLIT_NAMES:
            items = tuple(item if isinstance(item, Item) else Item(*item) for item in getattr(self, split))
            object.__setattr__(self, split, items)
            for item in items:
                if not 0 <= item.label < len(self.classnames) or item.classname != self.classnames[item.label]:
                    raise InputError(
                        f"dataset {self.name!r}, {split} item {item.path!r}: label {item.label} with class name "
                        f"{item.classname!r} does not match the {len(self.classnames)} classes {self.classnames!r}."
                    )

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return len(self.classnames)

    def split(self, name: str) -> tuple[Item, ...]:
        """The items of split ``name`` (``"train"``, ``"val"`` or ``"test"``)."""
        if name not in SPLIT_NAMES:
            raise InputError(f"split must be one of {list(SPLIT_NAMES)}, got {name!r}.")
        return getattr(self, name)

    def relative_path(self, path: str | os.PathLike) -> str:
        """``path`` relative to :attr:`root` in POSIX form (the absolute POSIX path when outside it)."""
        text, prefix = os.fspath(path), os.path.join(os.fspath(self.root), "")
        if text.startswith(prefix):  # the readers' paths: a string test is fast enough for ImageNet's 1.3M
            return text[len(prefix) :].replace(os.sep, "/")
        try:
            return Path(text).relative_to(self.root).as_posix()
        except ValueError:
            return Path(text).as_posix()


def path_inside(folder: str | os.PathLike, relative: str, where: str) -> str:
    """``folder/relative``, after checking that ``relative`` names a file inside ``folder``.

    A split or draw file names images relative to its dataset's folder; an absolute path, a drive,
    or a ``..`` component would let the file point anywhere on the disk, and is refused.

    Raises:
        InputError: naming ``where`` (the file and entry) and the path.
    """
    parts = relative.replace("\\", "/").split("/")
    if not relative or os.path.isabs(relative) or ".." in parts or os.path.splitdrive(relative)[0] or "\0" in relative:
        raise InputError(
            f"{where}: image path {relative!r} is not inside the dataset folder {os.fspath(folder)!r}; "
            "entries must be relative paths without '..'."
        )
    return os.path.join(folder, relative)


def classnames_of(items: Iterable[Item], where: str) -> tuple[str, ...]:
    """The class name of each label 0..K−1, as the items carry them (CoOp's split files hold no class list).

    Raises:
        InputError: a label carries two names, or the labels are not 0..K−1 (each used) for K distinct labels.
    """
    names: dict[int, str] = {}
    for item in items:
        known = names.setdefault(item.label, item.classname)
        if known != item.classname:
            raise InputError(f"{where}: label {item.label} is called both {known!r} and {item.classname!r}.")
    if not names:
        raise InputError(f"{where}: holds no items.")
    k = len(names)
    if min(names) < 0 or max(names) >= k:  # K distinct labels that are not 0..K-1: some label is out of range
        shown = sorted(names)[:3] + (["..."] if k > 6 else []) + sorted(names)[max(3, k - 3) :]
        raise InputError(
            f"{where}: labels must be 0..K-1 with each used, and the {k} labels used are {shown}; "
            f"{min(names) if min(names) < 0 else max(names)} is out of range."
        )
    return tuple(names[label] for label in range(len(names)))
