"""``BenchConfig``: one bench run's configuration, built once and shared by the run, its plan and the command line.

The command line builds it from its arguments (``prolip bench SETTING ...``); :func:`prolip.bench.runner.run_bench`
runs it and :func:`prolip.bench.estimate.estimate_bench` plans it, so a run and its ``--plan`` cannot disagree on a
parameter. Every field is checked when it is built (:class:`prolip.params.Constrained`), before any work.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from prolip.bench.settings import DEFAULT_SEEDS, DEFAULT_SHOTS, SETTINGS
from prolip.params import (
    BATCH_SIZE,
    BOOLEAN,
    DEVICE,
    EPOCHS,
    FOLDER,
    PRECISION,
    PRETRAINED,
    TEMPLATES,
    VIEWS,
    Constrained,
    Constraint,
    one_of,
)

DEFAULT_METHODS = ("zero-shot", "prolip", "prolip-val", "linear-probe")
"""The methods a run fits when none are named."""


def _integers(low: int, example: str) -> Constraint:
    def check(values: Any) -> bool:
        return values is None or (
            isinstance(values, (list, tuple))
            and len(values) > 0
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values)
        )

    return Constraint(f"None (the setting's default) or a non-empty list of integers >= {low}, e.g. {example}", check)


def _names(values: Any) -> bool:
    return (
        isinstance(values, (list, tuple))
        and len(values) > 0
        and all(isinstance(v, str) and v for v in values)
        and len(set(values)) == len(values)
    )


@dataclass(frozen=True)
class BenchConfig(Constrained):
    """One bench run: a setting over datasets × shots × seeds × methods, on one model.

    Attributes:
        setting: "few-shot", "base-to-new", "cross-dataset" or "domain-generalisation".
        data_root: the folder holding the datasets in CoOp's layout (docs/datasets.md), or a user's own
            dataset folders (:func:`prolip.bench.data.read_dataset`).
        out_dir: where results.json, table.md, plot.png and the draws' JSON go.
        model, pretrained: the open_clip model and its weights (tag or local checkpoint).
        datasets: reader names; None: the paper's for the setting.
        shots: N values; None: the setting's (1, 2, 4, 8, 16 for few-shot; :data:`DEFAULT_SHOTS`).
        seeds: draw seeds; None: 1, 2, 3.
        methods: bench method specs (``NAME`` or ``NAME:key=value,...``; :data:`prolip.bench.methods.METHODS`).
        source: the training dataset of cross-dataset and domain generalisation (ImageNet).
        cache_dir: the feature cache; None: ``out_dir/cache``.
        views, epochs: augmented views per training image and training steps (the paper: 300, 300).
        templates: prompt templates for every dataset; None: each dataset's own.
        device, precision, batch_size: where and how the backbone runs.
        verbose: the run's one progress line (cells done of all, on a terminal) and its log messages.
    """

    setting: str
    data_root: str | os.PathLike
    out_dir: str | os.PathLike
    model: str
    pretrained: str | None
    datasets: Sequence[str] | None = None
    shots: Sequence[int] | None = None
    seeds: Sequence[int] | None = None
    methods: Sequence[str] = DEFAULT_METHODS
    source: str | None = None
    cache_dir: str | os.PathLike | None = None
    views: int = 300
    epochs: int = 300
    templates: Sequence[str] | None = None
    device: str | torch.device | None = None
    precision: str = "fp32"
    batch_size: int = 64
    verbose: bool = True

    _parameter_constraints: ClassVar[dict[str, Constraint]] = {
        "setting": one_of(SETTINGS, "the bench setting"),
        "data_root": Constraint("a folder path", lambda v: isinstance(v, (str, os.PathLike)) and bool(os.fspath(v))),
        "out_dir": Constraint("a folder path", lambda v: isinstance(v, (str, os.PathLike)) and bool(os.fspath(v))),
        "model": Constraint("an open_clip model name", lambda v: isinstance(v, str) and bool(v)),
        "pretrained": PRETRAINED,
        "datasets": Constraint("None or a non-empty list of distinct dataset names", lambda v: v is None or _names(v)),
        "shots": _integers(1, "1 2 4 8 16"),
        "seeds": _integers(0, "1 2 3"),
        "methods": Constraint("a non-empty list of distinct method names", _names),
        "source": Constraint("None or a dataset name", lambda v: v is None or (isinstance(v, str) and bool(v))),
        "cache_dir": FOLDER,
        "views": VIEWS,
        "epochs": EPOCHS,
        "templates": TEMPLATES,
        "device": DEVICE,
        "precision": PRECISION,
        "batch_size": BATCH_SIZE,
        "verbose": BOOLEAN,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        tuples = {k: tuple(getattr(self, k)) for k in ("datasets", "methods", "templates") if getattr(self, k)}
        tuples["shots"] = tuple(DEFAULT_SHOTS[self.setting] if self.shots is None else self.shots)
        tuples["seeds"] = tuple(DEFAULT_SEEDS if self.seeds is None else self.seeds)
        for key, value in tuples.items():
            object.__setattr__(self, key, value)
