"""``run_bench``: a setting over datasets × shots × seeds × methods, on features extracted once.

For every job of the setting (:mod:`prolip.bench.settings`) and every seed, the largest N-shot
draw is written as JSON; for each N, the draw's augmented views, its plain views and the N-shot
validation draw come from the feature cache (:mod:`prolip.bench.store`), and every method is
trained on that one :class:`~prolip.bench.problem.Problem`, timed, and scored on each test set.
Cells are written as they finish (:mod:`prolip.bench.results`): an interrupted run resumes where
it stopped, and one progress line counts the run's cells. ``table.md``, ``plot.png`` and a
sensitivity run's ``heatmap.png`` are rendered at the end from results.json
(:class:`~prolip.bench.results.RunResults`). Under ``torchrun`` the processes share the extraction
and the cells out (:mod:`prolip.bench.shards`). Memory holds one problem's features and one test
set's at a time, so it does not grow with the number of datasets.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prolip.atomic import atomic_write
from prolip.bench.config import BenchConfig
from prolip.bench.data import Dataset, Draw, draw_json, draw_shots, draw_validation
from prolip.bench.inputs import class_set
from prolip.bench.method_tools import EmptyValidationError
from prolip.bench.methods import FittedMethod, Method, get_method
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.bench.results import RunResults, render_heatmap, render_plot, render_table
from prolip.bench.settings import METHOD_DEFAULTS, Job, Target, plan
from prolip.bench.shards import (
    CellWriter,
    deal,
    extract_share,
    finish_results,
    join_job,
    leave_job,
    open_results,
    pending_cells,
)
from prolip.bench.store import FeatureStore
from prolip.bench.workload import TEST_VIEW_SEED, CellKey, feature_requests, job_cells
from prolip.errors import InputError
from prolip.model.backbone import build_backbone
from prolip.progress import progress

logger = logging.getLogger(__name__)


def run_bench(config: BenchConfig) -> list[dict[str, Any]]:
    """Run one bench setting (:class:`~prolip.bench.config.BenchConfig`); returns every cell (also in ``results.json``).

    Raises:
        InputError: invalid arguments, a missing dataset (naming what was expected where), or
            ``out_dir`` holding results of another configuration.
    """
    setting, shots, seeds, methods, views, epochs = (
        config.setting,
        config.shots,
        config.seeds,
        config.methods,
        config.views,
        config.epochs,
    )
    data_root, datasets, source, templates = config.data_root, config.datasets, config.source, config.templates
    defaults = METHOD_DEFAULTS.get(setting, {})  # the official scripts' values where the setting has its own
    chosen = {name: get_method(name, defaults) for name in methods}  # unknown names fail before any work
    out = Path(config.out_dir)
    _make_folder(out, "--out-dir")
    rank, world, rank_device, created = join_job()  # under torchrun: this process's share (prolip.bench.shards)
    verbose = config.verbose and rank == 0
    backbone = build_backbone(
        config.model, config.pretrained, precision=config.precision, device=config.device or rank_device
    )
    store = FeatureStore(backbone, config.cache_dir or out / "cache", batch_size=config.batch_size, verbose=verbose)
    # What changes a cell's value; datasets, shots, seeds and methods can grow between resumed runs.
    identity = {
        "setting": setting, "model": config.model, "pretrained": config.pretrained, "source": source,
        "views": views, "epochs": epochs, "templates": list(templates) if templates else None,
        "precision": config.precision, "data_root": os.path.abspath(os.path.expanduser(os.fspath(data_root))),
    }  # fmt: skip
    results = open_results(out / "results.json", identity, rank)
    record = CellWriter(results, rank)
    jobs = list(plan(setting, data_root, datasets, source))
    _check_splits(jobs)
    skipped: list[str] = []
    # Every pending cell, in the order one process runs them; under torchrun each rank runs its share.
    cells_of_run = [c for job in jobs for c in job_cells(job, shots, seeds, methods)]
    pending = pending_cells(results, cells_of_run)
    mine = deal(pending, rank, world)
    done = len(cells_of_run) - len(pending)
    if done and rank == 0:
        logger.info("resuming: %d of %d cells already in %s", done, len(cells_of_run), results.path)
    if world > 1:  # the whole run's missing features first, shared out; the cells then only read the cache
        test_views = [m.test_views for m in chosen.values()]
        extract_share(
            store,
            (r for job in jobs for r in feature_requests(job, shots, seeds, views, test_views, _wanting(job, pending))),
            rank,
            world,
        )
    head, scale = backbone.projector.head.frozen(), backbone.logit_scale
    # One line for the run: cells done (those of earlier runs included) of all, with tqdm's ETA; under
    # torchrun rank 0 counts its own share.
    counted = (done, len(cells_of_run)) if world == 1 else (0, len(mine))
    bar = progress(
        total=counted[1], initial=counted[0], desc="cells" if world == 1 else "rank 0's cells", unit="cell",
        verbose=verbose,
    )  # fmt: skip
    for job in jobs:
        train_classes = class_set(backbone, job.train.classnames, templates or job.train.templates)
        tests = _Tests(
            store, job.targets, train_classes, lambda ds: class_set(backbone, ds.classnames, templates or ds.templates)
        )
        for seed in seeds:
            _write_draw(draw_shots(job.train, max(shots), seed), out, job.train)
            for n in shots:
                train, val = draw_shots(job.train, n, seed), draw_validation(job.train, n, seed)
                # What identifies the data of these cells; a resumed run on other data is refused here.
                draws = {_draw_name(d, job.train): store.draw_digest(d.items, job.train.root) for d in (train, val)}
                for name, digest in draws.items():
                    results.check_draw(name, digest)
                todo = [name for name in methods if (job.key, n, seed, name) in mine]
                if not todo:
                    continue
                _write_draw(val, out, job.train)
                problem = Problem(
                    train=store.features(train.items, views, seed, what=f"{job.key} N={n} train"),
                    train_plain=store.features(train.items, 0, what=f"{job.key} N={n} train"),
                    val=store.features(val.items, 0, what=f"{job.key} N={n} val"),
                    classes=train_classes, image_head=head, logit_scale=scale, shots=n, seed=seed, epochs=epochs,
                    device=backbone.device,
                )  # fmt: skip
                for name in todo:
                    bar.set_postfix_str(f"{job.key} N={n} seed {seed} {name}", refresh=False)
                    method = chosen[name]
                    start = time.perf_counter()
                    try:
                        fitted = method.fit(problem)
                    except EmptyValidationError as exc:  # e.g. ImageNet at 8 shots has no images left for val
                        skipped.append(f"{name} on {job.key}, N={n}, seed {seed}: {exc}")
                        logger.warning("skipped %s", skipped[-1])
                        bar.update()
                        continue
                    seconds = time.perf_counter() - start
                    accuracy = {t.name: tests.score(fitted, method, t) for t in job.targets}
                    record(
                        {"dataset": job.key, "shots": n, "seed": seed, "method": name, "accuracy": accuracy,
                         "fit_seconds": seconds, "info": {**method.hyperparameters(), **fitted.info}},
                        draws,
                    )  # fmt: skip
                    bar.update()
                    logger.debug("%s N=%d seed %d %s: %s (%.2f s)", job.key, n, seed, name, accuracy, seconds)
    bar.close()
    cells = finish_results(results, rank)
    if rank == 0:
        run = RunResults(results.config, cells, methods, _ordered_names(jobs))
        try:
            atomic_write(out / "table.md", [render_table(run, skipped).encode("utf-8")])
            plotted = render_plot(run, out / "plot.png")
            render_heatmap(run, out / "heatmap.png")
        except OSError as exc:
            raise InputError(
                f"cannot write table.md / plot.png in {str(out)!r} ({exc.strerror or exc}); every cell is kept in "
                "results.json: free space or make the folder writable, and rerun to render them."
            ) from None
        if not plotted:
            logger.info("matplotlib is not installed: no plot.png (pip install matplotlib)")
    leave_job(created)
    return cells


def _ordered_names(jobs: Sequence[Job]) -> list[str]:
    """The run's datasets and test sets in its plan's order: the order of table.md's columns and the plots' panels."""
    return list(dict.fromkeys(name for job in jobs for name in (job.key, *(t.name for t in job.targets))))


def _check_splits(jobs: Sequence[Job]) -> None:
    """Refuse, before any work, a training dataset without training images or a test set without test images."""
    for job in jobs:
        if not job.train.train:
            raise InputError(f"dataset {job.train.name!r} has no training images to draw shots from.")
        for target in job.targets:
            if not target.dataset.test:
                raise InputError(
                    f"dataset {target.dataset.name!r} has no test images to score {target.name!r} on; "
                    "add its test split, or leave the dataset out."
                )


def _make_folder(folder: Path, what: str) -> None:
    """Create ``folder``, or one InputError naming it (a regular file there, a read-only file system)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the folder {str(folder)!r} ({what}): {exc.strerror or exc}.") from None


def _draw_name(draw: Draw, dataset: Dataset) -> str:
    """The draw's file name under ``draws/`` (without .json): what results.json records its digest under."""
    return f"{dataset.name}/{draw.role}-seed{draw.seed}-{draw.shots}shot"


def _write_draw(draw: Draw, out: Path, dataset: Dataset) -> None:
    """Write the draw's JSON, unless the file there already holds this draw; a damaged or stale one is rewritten."""
    path = out / "draws" / f"{_draw_name(draw, dataset)}.json"
    _make_folder(path.parent, "the draws folder")
    data = draw_json(draw, dataset)
    if path.is_file():
        try:
            if path.read_bytes() == data:
                return
        except OSError:
            pass
        logger.warning("rewriting the draw file %s: it was damaged or held another draw", path)
    try:
        atomic_write(path, [data])
    except OSError as exc:
        raise InputError(f"cannot write the draw file {str(path)!r} ({exc.strerror or exc}).") from None


def _wanting(job: Job, cells: Sequence[CellKey]) -> Any:
    """Whether problem ``(n, seed)`` of ``job`` has a cell in ``cells``."""
    keys = {(n, seed) for key, n, seed, _ in cells if key == job.key}
    return lambda n, seed: (n, seed) in keys


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
            # One target's features at a time (its plain and augmented test views): memory stays flat
            # however many targets a job scores (cross-dataset: every dataset's test split).
            self._cache = {k: v for k, v in self._cache.items() if k[0] == target.name}
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
