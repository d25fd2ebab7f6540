"""Class subsets of a dataset: CoCoOp's base-to-new split, and any subset relabelled from 0."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from prolip.bench.data.dataset import SPLIT_NAMES, Dataset, Item
from prolip.errors import InputError


def select_classes(dataset: Dataset, labels: Sequence[int]) -> Dataset:
    """``dataset`` restricted to the classes ``labels``, relabelled 0.. in the order given.

    Items of other classes are dropped from every split; names, class ids and templates follow.

    Raises:
        InputError: ``labels`` is empty, repeats a label, or holds one outside 0..K−1.
    """
    labels = [int(label) for label in labels]
    if not labels or len(set(labels)) != len(labels) or not all(0 <= lb < dataset.num_classes for lb in labels):
        raise InputError(
            f"labels {labels} must be distinct labels of dataset {dataset.name!r} (0..{dataset.num_classes - 1})."
        )
    new_label = {old: new for new, old in enumerate(labels)}
    splits = {
        split: tuple(
            Item(item.path, new_label[item.label], item.classname)
            for item in dataset.split(split)
            if item.label in new_label
        )
        for split in SPLIT_NAMES
    }
    return replace(
        dataset,
        classnames=tuple(dataset.classnames[lb] for lb in labels),
        class_ids=tuple(dataset.class_ids[lb] for lb in labels),
        **splits,
    )


def base_new_split(dataset: Dataset) -> tuple[Dataset, Dataset]:
    """CoCoOp's base-to-new split: ``(base, new)``, each relabelled from 0.

    Base holds the first ⌈K/2⌉ labels, new the rest (CoCoOp's ``subsample_classes`` over the
    sorted labels). Draws of ``base`` equal the full dataset's draws restricted to its classes.
    """
    if dataset.num_classes < 2:
        raise InputError(f"dataset {dataset.name!r} has {dataset.num_classes} class; base-to-new needs at least 2.")
    m = math.ceil(dataset.num_classes / 2)
    return select_classes(dataset, range(m)), select_classes(dataset, range(m, dataset.num_classes))
