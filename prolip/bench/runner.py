"""``run_bench``: a setting over datasets × shots × seeds × methods, on features extracted once.

For every job of the setting (:mod:`prolip.bench.settings`) and every seed, the largest N-shot
draw is written as JSON; for each N, the draw's augmented views, its plain views and the N-shot
validation draw come from the feature cache (:mod:`prolip.bench.store`), and every method is
trained on that one :class:`~prolip.bench.problem.Problem`, timed, and scored on each test set.
Cells are written as they finish (:mod:`prolip.bench.results`): an interrupted run resumes where
it stopped. ``table.md`` and ``plot.png`` are rendered at the end.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prolip.bench.inputs import class_set, image_head
from prolip.bench.methods import FittedMethod, Method, get_method
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.bench.results import ResultsFile, render_plot, render_table
from prolip.bench.settings import DEFAULT_SEEDS, DEFAULT_SHOTS, METHOD_DEFAULTS, Target, plan
from prolip.bench.store import FeatureStore
from prolip.datasets import Dataset, draw_shots, draw_validation, write_draw
from prolip.errors import InputError
from prolip.model.backbone import build_backbone
from prolip.model.zeroshot import check_templates
from prolip.params import check_params

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("zero-shot", "prolip", "prolip-val", "linear-probe")
TEST_VIEW_SEED = 0  # augmented test views (test-time methods) are the same for every draw


def run_bench(
    setting: str,
    *,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: str,
    pretrained: str | None,
    datasets: Sequence[str] | None = None,
    shots: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    source: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    views: int = 300,
    epochs: int = 300,
    templates: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    batch_size: int = 64,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Run one bench setting; returns every cell (also in ``out_dir/results.json``).

    Args:
        setting: "few-shot", "base-to-new", "cross-dataset" or "domain-generalisation".
        data_root: the folder holding the datasets in CoOp's layout (docs/datasets.md), or a
            user's own dataset folders (:func:`prolip.datasets.read_dataset`).
        out_dir: where results.json, table.md, plot.png and the draws' JSON go.
        model, pretrained: the open_clip model and its weights (tag or local checkpoint).
        datasets: reader names; default: the paper's for the setting.
        shots: N values; default 1, 2, 4, 8, 16 (few-shot) or 16.
        seeds: draw seeds; default 1, 2, 3.
        methods: bench method names (:data:`prolip.bench.methods.METHODS`).
        source: the training dataset of cross-dataset and domain generalisation (ImageNet).
        cache_dir: the feature cache; default ``out_dir/cache``.
        views, epochs: augmented views per training image and training steps (the paper: 300, 300).
        templates: prompt templates for every dataset; default each dataset's CoOp prompt.
        device, precision, batch_size: where and how the backbone runs.
        verbose: progress bars over datasets, draws and trainings.

    Raises:
        InputError: invalid arguments, a missing dataset (naming what was expected where), or
            ``out_dir`` holding results of another configuration.
    """
    shots = tuple(DEFAULT_SHOTS.get(setting, (16,)) if shots is None else shots)
    seeds = tuple(DEFAULT_SEEDS if seeds is None else seeds)
    _check(shots, seeds, methods, views, epochs)
    templates = None if templates is None else tuple(check_templates(templates))
    defaults = METHOD_DEFAULTS.get(setting, {})  # the official scripts' values where the setting has its own
    chosen = {name: get_method(name, defaults) for name in methods}  # unknown names fail before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = build_backbone(model, pretrained, precision=precision, device=device)
    store = FeatureStore(backbone, cache_dir or out / "cache", batch_size=batch_size, verbose=verbose)
    # What changes a cell's value; datasets, shots, seeds and methods can grow between resumed runs.
    config = {
        "setting": setting, "model": model, "pretrained": pretrained, "source": source, "views": views,
        "epochs": epochs, "templates": list(templates) if templates else None, "precision": precision,
    }  # fmt: skip
    results = ResultsFile(out / "results.json", config)
    head, scale = image_head(backbone), backbone.logit_scale
    for job in tqdm(list(plan(setting, data_root, datasets, source)), desc="datasets", disable=not verbose):
        train_classes = class_set(backbone, job.train.classnames, templates or job.train.templates)
        tests = _Tests(
            store, job.targets, train_classes, lambda ds: class_set(backbone, ds.classnames, templates or ds.templates)
        )
        for seed in tqdm(seeds, desc=f"{job.key} draws", leave=False, disable=not verbose):
            _write_draw(draw_shots(job.train, max(shots), seed), out, job.train)
            for n in shots:
                pending = [name for name in methods if not results.done(job.key, n, seed, name)]
                if not pending:
                    continue
                train, val = draw_shots(job.train, n, seed), draw_validation(job.train, n, seed)
                _write_draw(val, out, job.train)
                problem = Problem(
                    train=store.features(train.items, views, seed, what=f"{job.key} N={n} train"),
                    train_plain=store.features(train.items, 0, what=f"{job.key} N={n} train"),
                    val=store.features(val.items, 0, what=f"{job.key} N={n} val"),
                    classes=train_classes, image_head=head, logit_scale=scale, shots=n, seed=seed, epochs=epochs,
                    device=backbone.device,
                )  # fmt: skip
                for name in tqdm(pending, desc=f"{job.key} N={n} seed {seed}", leave=False, disable=not verbose):
                    method = chosen[name]
                    start = time.perf_counter()
                    fitted = method.fit(problem)
                    seconds = time.perf_counter() - start
                    accuracy = {t.name: tests.score(fitted, method, t) for t in job.targets}
                    results.add(
                        {"dataset": job.key, "shots": n, "seed": seed, "method": name, "accuracy": accuracy,
                         "fit_seconds": seconds, "info": {**method.hyperparameters(), **fitted.info}}
                    )  # fmt: skip
                    logger.debug("%s N=%d seed %d %s: %s (%.2f s)", job.key, n, seed, name, accuracy, seconds)
    (out / "table.md").write_text(render_table(setting, results.cells), encoding="utf-8")
    if not render_plot(setting, results.cells, out / "plot.png"):
        logger.info("matplotlib is not installed: no plot.png (pip install matplotlib)")
    return results.cells


def _check(shots: Sequence[int], seeds: Sequence[int], methods: Sequence[str], views: int, epochs: int) -> None:
    check_params({"views": views, "epochs": epochs})
    if not shots or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shots):
        raise InputError(f"shots={list(shots)} must be integers >= 1, e.g. 1 2 4 8 16.")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise InputError(f"seeds={list(seeds)} must be integers >= 0, e.g. 1 2 3.")
    if not methods or len(set(methods)) != len(methods):
        raise InputError(f"methods={list(methods)} must be distinct method names.")


def _write_draw(draw: Any, out: Path, dataset: Dataset) -> None:
    path = out / "draws" / dataset.name / f"{draw.role}-seed{draw.seed}-{draw.shots}shot.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        write_draw(draw, path, dataset)


class _Tests:
    """Each target's test features and classes, made on first use, and the scoring rules."""

    def __init__(self, store: FeatureStore, targets: Sequence[Target], train: Classes, classes_of: Any) -> None:
        self.store, self.train, self.classes_of = store, train, classes_of
        self.train_ids = list(targets[0].dataset.class_ids) if targets else []
        self.train_dataset = targets[0].dataset if targets else None
        self._cache: dict[tuple[str, int], tuple[FeatureSet, Classes]] = {}

    def _get(self, target: Target, test_views: int) -> tuple[FeatureSet, Classes]:
        key = (target.name, test_views)
        if key not in self._cache:
            items = target.dataset.test
            what = f"{target.name} test"
            features = (
                self.store.test_views(items, test_views, TEST_VIEW_SEED, what)
                if test_views
                else self.store.features(items, 0, what=what)
            )
            classes = self.train if target.dataset is self.train_dataset else self.classes_of(target.dataset)
            self._cache[key] = (features, classes)
        return self._cache[key]

    def score(self, fitted: FittedMethod, method: Method, target: Target) -> float | None:
        """Accuracy on the target's test split, or None where the method cannot score its classes.

        Methods that transfer score the target's own classes. The others score their training
        classes; a target whose classes are a subset of them (ImageNet-A and -R among ImageNet's)
        keeps those columns, as CoOp does; any other target is not scored.
        """
        test, classes = self._get(target, method.test_views)
        ids = list(target.dataset.class_ids)
        if method.transfers or ids == self.train_ids:
            scores = fitted.logits(test, classes)
        elif set(ids) <= set(self.train_ids):
            scores = fitted.logits(test, self.train)[:, [self.train_ids.index(i) for i in ids]]
        else:
            return None
        return float((scores.argmax(dim=1) == test.labels).float().mean())
