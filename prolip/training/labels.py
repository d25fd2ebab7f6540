"""Labels in, class indices out: checking, encoding and naming the classes of a few-shot task."""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from prolip.errors import InputError, InputTypeError, warn


def plain_label(label: Any) -> Any:
    """numpy scalars to Python scalars, so labels compare, hash and serialise as users expect."""
    return label.item() if isinstance(label, np.generic) else label


def label_list(labels: Sequence[Hashable]) -> list[Hashable]:
    """``labels`` as a list, refusing a bare string or a non-sequence."""
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()  # tensor elements hash by identity, which would make every label unique
    # Any sized iterable (list, array, pandas Series) works; strings, mappings and sets do not.
    if isinstance(labels, (str, bytes, Mapping, set, frozenset)) or not (
        hasattr(labels, "__len__") and hasattr(labels, "__iter__")
    ):
        raise InputTypeError(
            f"labels must be a sequence with one label per image (a list, array or tensor), not {type(labels).__name__}."
        )
    return list(labels)


def check_lengths(images: Sequence[Any], labels: Sequence[Any]) -> None:
    """Refuse a non-sequence of images, an empty one, or one whose length differs from the labels'."""
    if isinstance(images, (str, bytes, os.PathLike)) or not hasattr(images, "__len__"):
        raise InputTypeError(
            f"images must be a sequence of images (a list of paths, PIL images or tensors), not {type(images).__name__}."
        )
    n_images, n_labels = len(images), len(label_list(labels))
    if n_images == 0:
        raise InputError("images is empty; pass at least one image per class.")
    if n_images != n_labels:
        raise InputError(f"got {n_images} images but {n_labels} labels; pass exactly one label per image.")


def encode_labels(labels: Sequence[Hashable]) -> tuple[list[Hashable], torch.Tensor]:
    """The sorted distinct labels (first-appearance order when they do not sort) and each label's index.

    Raises:
        InputTypeError: a label is unhashable.
        InputError: a label is None or NaN, two labels print the same (1 and "1"), or fewer than two classes.
    """
    labels = [plain_label(lab) for lab in label_list(labels)]
    for i, lab in enumerate(labels):
        try:
            if isinstance(lab, (list, dict, set)):
                raise TypeError
            hash(lab)
        except TypeError:
            raise InputTypeError(f"label {i} ({lab!r}) is not hashable; use strings or integers as labels.") from None
        if lab is None or (isinstance(lab, float) and math.isnan(lab)):
            raise InputError(
                f"label {i} is {lab!r}: that image has no label. Give it one, or leave it out "
                "(a Hugging Face dataset's rows without a label are left out for you)."
            )
    unique = list(dict.fromkeys(labels))
    printed: dict[str, Hashable] = {}
    for c in unique:  # 1 and "1" are two classes that every output (JSON, tables) would print as one
        other = printed.setdefault(str(c), c)
        if other is not c and other != c:
            raise InputError(
                f"labels {other!r} and {c!r} are different values that print the same; use one type for all labels."
            )
    try:
        classes = sorted(unique)
    except TypeError:  # mixed label types: keep first-appearance order
        classes = unique
    if len(classes) < 2:
        raise InputError(f"all labels are {classes[0]!r}; ProLIP needs at least two classes.")
    index = {c: k for k, c in enumerate(classes)}
    return classes, torch.tensor([index[lab] for lab in labels], dtype=torch.long)


def label_indices(labels: Sequence[Hashable], classes: Sequence[Hashable], what: str = "labels") -> torch.Tensor:
    """Each label's index among ``classes`` (e.g. validation labels among the training classes), int64.

    Raises:
        InputError: a label is not one of ``classes``; the message calls them ``what``.
    """
    index = {c: k for k, c in enumerate(classes)}
    labels = [plain_label(lab) for lab in label_list(labels)]
    unknown = [lab for lab in labels if lab not in index]
    if unknown:
        raise InputError(f"{what} hold labels the training labels do not: {unknown[:5]}.")
    return torch.tensor([index[lab] for lab in labels], dtype=torch.long)


def names_of_classes(classes: Sequence[Hashable], names: Mapping[Hashable, str] | Sequence[str] | None) -> list[str]:
    """The text put into the prompt templates for each class.

    ``names`` maps label → text, or is a sequence indexed by integer labels; None uses the labels
    themselves (with a warning when they are not strings).
    """
    if names is None:
        if not all(isinstance(c, str) for c in classes):
            warn(
                "labels are not strings and no class_names were given; prompts use str(label). "
                "Pass class_names={label: 'text'} for meaningful prompts."
            )
        return [str(c) for c in classes]
    result = []
    for c in classes:
        try:
            name = names[c]
        except (KeyError, IndexError, TypeError):
            raise InputError(f"class_names has no entry for label {c!r}; give a name for every label.") from None
        if not isinstance(name, str) or not name:
            raise InputError(f"class_names[{c!r}] = {name!r} must be a non-empty string.")
        result.append(name)
    return result


def class_array(classes: Sequence[Hashable]) -> np.ndarray:
    """Labels as a 1-D numpy array (of their own dtype where numpy has one, else of objects)."""
    arr = np.asarray(classes) if len(classes) else np.empty(0)
    if arr.ndim != 1 or arr.dtype.kind not in "biufU":
        arr = np.empty(len(classes), dtype=object)
        arr[:] = list(classes)
    return arr


def accuracy(predicted: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    """Fraction of ``predicted`` equal to ``labels`` (numpy and Python scalars compare alike)."""
    labels = label_list(labels)
    if len(predicted) != len(labels):
        raise InputError(f"features hold {len(predicted)} images but {len(labels)} labels were given.")
    return float(np.mean([plain_label(p) == plain_label(t) for p, t in zip(predicted, labels, strict=True)]))
