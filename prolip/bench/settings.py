"""The paper's four evaluation settings, as plans: which training draws, and which test sets each is scored on.

* ``few-shot``: train on each dataset's N-shot draw, test on its own test split.
* ``base-to-new`` (CoCoOp): classes split by label order, base = the first ⌈K/2⌉; train on the
  base classes' draw; test on base-test with the base classes and on new-test with the new
  classes' own text classifier (methods that cannot score unseen classes report no new accuracy).
* ``cross-dataset``: train on a source (ImageNet by default); test on the source and on every
  target dataset with the target's own classes.
* ``domain-generalisation``: train on ImageNet; test on ImageNet-V2, -Sketch, -A and -R; -A and
  -R are scored on their 200-class subsets of ImageNet's classes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prolip.bench.adapted import PROLIP_LR
from prolip.bench.data import IMAGENET_VARIANTS, PAPER_DATASETS, Dataset, base_new_split, read_dataset
from prolip.errors import InputError

SETTINGS = ("few-shot", "base-to-new", "cross-dataset", "domain-generalisation")
DEFAULT_SHOTS = {
    "few-shot": (1, 2, 4, 8, 16),
    "base-to-new": (16,),  # the official ViT-B/16 script; its RN50 script uses --shots 4
    "cross-dataset": (4,),  # the official scripts train on 4-shot ImageNet (train_4_shot_imagenet.sh)
    "domain-generalisation": (4,),
}
DEFAULT_SEEDS = (1, 2, 3)
DEFAULT_SOURCE = "imagenet"
TRANSFER_LR = 1e-5
"""ProLIP's learning rate in the official base-to-new, cross-dataset and DG configurations (λ = 1/N)."""
METHOD_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "base-to-new": {"prolip": {"lr": TRANSFER_LR}},
    "cross-dataset": {"prolip": {"lr": TRANSFER_LR}},
    "domain-generalisation": {"prolip": {"lr": TRANSFER_LR}},
}
"""Per setting, method arguments that default to the official scripts' values instead of the method's own
(``configs/experiments/base_to_new_*.yaml``, ``DG_*.yaml``, ``few_shot_no_val_lr1e-5_lambda_1_N.yaml``);
a ``NAME:key=value`` given on the command line wins."""


def describe_defaults(setting: str) -> str:
    """One line naming the setting's defaults (N, seeds, ProLIP's hyperparameters), for ``table.md``'s header."""
    shots = ", ".join(map(str, DEFAULT_SHOTS[setting]))
    seeds = ", ".join(map(str, DEFAULT_SEEDS))
    lr = METHOD_DEFAULTS.get(setting, {}).get("prolip", {}).get("lr", PROLIP_LR)
    return (
        f"Defaults of this setting (the official scripts'): N = {shots}; seeds {seeds}; prolip: lr {lr:g}, "
        "λ = 1/N; prolip-val: (lr, λ) chosen on the N-shot validation draw over the paper's 7 × 7 grid."
    )


@dataclass(frozen=True)
class Target:
    """One test set a trained method is scored on.

    Attributes:
        name: the column it is reported under (a dataset name, or ``base`` / ``new``).
        dataset: whose test split and classes are used.
    """

    name: str
    dataset: Dataset


@dataclass(frozen=True)
class Job:
    """A training dataset and the test sets its methods are scored on."""

    train: Dataset
    targets: tuple[Target, ...]

    @property
    def key(self) -> str:
        """The training dataset's name as reported (``<name>`` or ``<name>/base``)."""
        return self.train.name


def plan(
    setting: str, data_root: str | os.PathLike, datasets: Sequence[str] | None, source: str | None = None
) -> Iterator[Job]:
    """The jobs of ``setting`` over ``datasets`` under ``data_root`` (datasets are read lazily, job by job).

    ``datasets`` defaults to the paper's: the 11 datasets (few-shot, base-to-new), the 10 besides
    the source (cross-dataset), ImageNet's 4 variants (domain generalisation).

    Raises:
        InputError: an unknown setting, or a source given where the setting has none.
    """
    if setting not in SETTINGS:
        raise InputError(f"unknown bench setting {setting!r}; use one of {list(SETTINGS)}.")
    if setting in ("few-shot", "base-to-new"):
        if source is not None:
            raise InputError(f"--source is for cross-dataset and domain-generalisation, not {setting}.")
        for name in datasets or PAPER_DATASETS:
            dataset = read_dataset(name, data_root)
            if setting == "few-shot":
                yield Job(dataset, (Target(name, dataset),))
            else:
                base, new = base_new_split(dataset)
                yield Job(base, (Target("base", base), Target("new", new)))
        return
    source_name = source or DEFAULT_SOURCE
    default_targets = IMAGENET_VARIANTS if setting == "domain-generalisation" else PAPER_DATASETS
    names = [n for n in (datasets or default_targets) if n != source_name]
    train = read_dataset(source_name, data_root)
    yield Job(train, (Target(source_name, train), *(Target(n, read_dataset(n, data_root)) for n in names)))
