"""Bench results: every cell in ``results.json`` (written as cells finish, so a run resumes), the
paper-style ``table.md`` and ``plot.png`` rendered from it.

A cell is one method trained on one draw (dataset, N, seed) and scored on each of its job's test
sets: ``{"dataset", "shots", "seed", "method", "accuracy": {target: fraction or null}, "fit_seconds",
"info"}``. ``null`` marks a test set the method cannot score (classes it was not trained on).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prolip.atomic import atomic_write, file_lock, read_json
from prolip.bench.settings import describe_defaults
from prolip.errors import InputError
from prolip.params import number

FORMAT = "prolip-bench"
VERSION = 1
LOCK_SUFFIX = ".lock"
"""``results.json.lock`` beside the file: what :func:`add_cells` locks while it merges."""

_CELL_KEYS = ("dataset", "shots", "seed", "method", "accuracy", "fit_seconds", "info")


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _cell_fault(cell: Any) -> str | None:
    """What is wrong with one cell, or None."""
    if not isinstance(cell, dict):
        return f"is a {type(cell).__name__}, not an object"
    missing = [k for k in _CELL_KEYS if k not in cell]
    if missing:
        return f"lacks {missing}"
    for key in ("dataset", "method"):
        if not isinstance(cell[key], str) or not cell[key]:
            return f"has {key}={cell[key]!r}, not a name"
    if not _is_int(cell["shots"], 1) or not _is_int(cell["seed"], 0):
        return f"has shots={cell['shots']!r} and seed={cell['seed']!r}; they must be integers >= 1 and >= 0"
    accuracy = cell["accuracy"]
    if not isinstance(accuracy, dict) or not all(
        isinstance(k, str) and (v is None or (number(v) and 0 <= v <= 1)) for k, v in accuracy.items()
    ):
        return f"has accuracy={accuracy!r}; it must map test sets to fractions in [0, 1] or null"
    if not number(cell["fit_seconds"]) or cell["fit_seconds"] < 0:
        return f"has fit_seconds={cell['fit_seconds']!r}, not a number of seconds"
    if not isinstance(cell["info"], dict):
        return f"has info={cell['info']!r}, not an object"
    return None


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """The checked contents of a ``results.json``: ``{"format", "format_version", "config", "draws", "cells"}``.

    ``draws`` (absent from files of older versions: read as empty) maps each draw the cells were
    computed on to the digest of its items (:func:`prolip.bench.store.FeatureStore.draw_digest`).

    Raises:
        InputError: one line naming the file and its first fault (unreadable, not JSON, nested too deeply,
            not a bench results file, a cell of the wrong shape, a duplicate cell).
    """
    where = str(path)
    data = read_json(path, InputError, "bench results file")
    fault = None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        fault = f"it is not a {FORMAT!r} file"
    elif data.get("format_version") != VERSION:
        fault = f"format_version is {data.get('format_version')!r}; this prolip reads {VERSION}"
    elif not isinstance(data.get("config"), dict):
        fault = "'config' is not an object"
    elif not isinstance(data.get("cells"), list):
        fault = "'cells' is not a list"
    elif not isinstance(data.setdefault("draws", {}), dict) or not all(
        isinstance(v, str) for v in data["draws"].values()
    ):
        fault = "'draws' is not an object of digests"
    else:
        seen = set()
        for i, cell in enumerate(data["cells"]):
            fault = _cell_fault(cell)
            if fault is None and _cell_key(cell) in seen:
                fault = "is a second copy of an earlier cell"
            if fault is not None:
                fault = f"cells[{i}] {fault}"
                break
            seen.add(_cell_key(cell))
    if fault is not None:
        raise InputError(
            f"{where!r} is not a valid bench results file: {fault}; move it away or use another --out-dir."
        )
    return data


def _cell_key(cell: Mapping[str, Any]) -> tuple[str, int, int, str]:
    """What identifies a cell: training dataset, N, seed, method."""
    return cell["dataset"], int(cell["shots"]), int(cell["seed"]), cell["method"]


def _check_config(where: str, data: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    if data["config"] != config:
        raise InputError(
            f"{where!r} holds results of another bench configuration ({data['config']}); "
            "use another --out-dir, or delete it to start over."
        )


def _check_draws(where: str, known: Mapping[str, str], draws: Mapping[str, str]) -> None:
    for name, digest in draws.items():
        if known.get(name, digest) != digest:
            raise InputError(
                f"{where!r} holds cells computed on other data: draw {name!r} has other images, labels or image "
                "contents now; use another --out-dir, or delete it to start over."
            )


def add_cells(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    cells: Sequence[Mapping[str, Any]] = (),
    draws: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Add finished ``cells`` (and the ``draws`` digests they were computed on) to ``results.json`` at ``path``.

    The one way results are written, safe with any number of processes (or ranks) writing one file:
    under an exclusive lock on ``<path>.lock`` it re-reads the file (checked by :func:`read_results`),
    refuses another configuration or a draw whose digest differs from the recorded one, adds the
    cells not yet there (a cell already present is kept: the first finished copy wins), and replaces
    the file atomically (:func:`prolip.atomic.atomic_write`). A cell another process finished is
    therefore never lost, and a crash leaves the previous complete file.

    Returns:
        Every cell now in the file (this process's and the others').

    Raises:
        InputError: the file is damaged, holds another configuration or other data, or cannot be
            written (full disk, read-only folder), naming the file.
    """
    path, draws = Path(path), dict(draws or {})
    for i, cell in enumerate(cells):
        fault = _cell_fault(cell)
        if fault is not None:
            raise InputError(f"cell {i} to add to {str(path)!r} {fault}.")
    try:
        with file_lock(path.with_name(path.name + LOCK_SUFFIX)):
            if path.exists():
                data = read_results(path)
                _check_config(str(path), data, config)
                _check_draws(str(path), data["draws"], draws)
            else:
                data = {"format": FORMAT, "format_version": VERSION, "config": dict(config), "draws": {}, "cells": []}
            data["draws"].update(draws)
            done = {_cell_key(c) for c in data["cells"]}
            data["cells"] += [dict(c) for c in cells if _cell_key(c) not in done]
            text = json.dumps(data, indent=1, default=json_default)
            atomic_write(path, [text.encode()])
    except OSError as exc:
        raise InputError(
            f"cannot write the bench results {str(path)!r} ({exc.strerror or exc}); check that its folder is "
            "writable and the disk has free space. The cells finished before are kept in it."
        ) from None
    return data["cells"]


class ResultsFile:
    """``results.json`` of one bench run: its configuration, the draws' digests and the finished cells.

    Opening an existing file with another configuration (what changes a cell's value: setting,
    model, weights, data root, views, steps, templates, precision) is refused, and so is a draw whose
    items' digest differs from the one the cells were computed on, so a resumed run never mixes
    results of different settings, models, data or hyperparameters; more datasets, shots, seeds or
    methods simply add cells. Cells are added with :func:`add_cells`, so runs sharing the file keep
    each other's cells.
    """

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any]) -> None:
        self.path, self.config = Path(path), dict(config)
        self.cells: list[dict[str, Any]] = []
        self.draws: dict[str, str] = {}
        if self.path.exists():
            data = read_results(self.path)
            _check_config(str(self.path), data, self.config)
            self.cells, self.draws = data["cells"], data["draws"]
        self._done = {_cell_key(c) for c in self.cells}

    key = staticmethod(_cell_key)

    def done(self, dataset: str, shots: int, seed: int, method: str) -> bool:
        """Whether that cell is in the file (as last read or written by this process)."""
        return (dataset, shots, seed, method) in self._done

    def check_draw(self, name: str, digest: str) -> None:
        """Refuse (InputError) if the file's cells were computed on draw ``name`` with other items."""
        _check_draws(str(self.path), self.draws, {name: digest})

    def add(self, cell: dict[str, Any], draws: Mapping[str, str] | None = None) -> None:
        """Record a finished cell computed on ``draws`` (name -> digest), merged into the file under its lock."""
        self.add_all([cell], draws)

    def add_all(self, cells: Sequence[dict[str, Any]], draws: Mapping[str, str] | None = None) -> None:
        """Record finished ``cells`` computed on ``draws`` in one locked rewrite of the file."""
        self.cells = add_cells(self.path, self.config, cells, draws)
        self.draws.update(draws or {})
        self._done = {_cell_key(c) for c in self.cells}


def json_default(value: Any) -> Any:
    """``json.dumps``'s ``default`` for bench cells: numpy scalars as Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _stats(values: Sequence[float | None]) -> tuple[float, float] | None:
    kept = [v for v in values if v is not None]
    return (float(np.mean(kept)), float(np.std(kept))) if kept else None


def _cell(stats: tuple[float, float] | None, std: bool = True) -> str:
    if stats is None:
        return "–"
    return f"{100 * stats[0]:.2f} ± {100 * stats[1]:.2f}" if std else f"{100 * stats[0]:.2f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _ordered(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def render_table(setting: str, cells: Sequence[Mapping[str, Any]], skipped: Sequence[str] = ()) -> str:
    """``table.md``: the paper-style tables of ``setting`` (accuracy %, mean ± std over seeds), and costs.

    ``skipped`` lists the cells this run could not compute, and why: they are warned about under the tables.
    """
    methods = _ordered(c["method"] for c in cells)
    shots = sorted({int(c["shots"]) for c in cells})
    by: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for c in cells:
        by[c["method"], int(c["shots"])].append(c)
    out = [f"# prolip bench: {setting}", "", describe_defaults(setting), ""]
    trained = [[m, *_hyperparameters(by_method)] for m, by_method in _by_method(cells).items()]
    out += ["Hyperparameters the cells trained with (their `info` in results.json):", ""]
    out += [*_table(["method", "lr", "λ"], trained), ""]
    if setting == "few-shot":
        datasets = _ordered(c["dataset"] for c in cells)
        out += ["Average over datasets (accuracy %, mean ± std over seeds):", ""]
        rows = [[m, *(_cell(_stats(_average_per_seed(by[m, n], datasets))) for n in shots)] for m in methods]
        out += [*_table(["method", *(f"N={n}" for n in shots)], rows), ""]
        for n in shots:
            out += [f"**N = {n}** (accuracy %, mean ± std over seeds)", ""]
            rows = []
            for m in methods:
                per = [_cell(_stats([c["accuracy"].get(d) for c in by[m, n] if c["dataset"] == d])) for d in datasets]
                rows.append([m, *per, _cell(_stats(_average_per_seed(by[m, n], datasets)))])
            out += [*_table(["method", *datasets, "average"], rows), ""]
    elif setting == "base-to-new":
        datasets = _ordered(c["dataset"] for c in cells)
        for n in shots:
            out += [f"**N = {n}**: base / new / harmonic mean (accuracy %, mean over seeds)", ""]
            rows = []
            for m in methods:
                per, bases, news = [], [], []
                for d in datasets:
                    group = [c for c in by[m, n] if c["dataset"] == d]
                    base, new = (
                        _stats([c["accuracy"].get("base") for c in group]),
                        _stats([c["accuracy"].get("new") for c in group]),
                    )
                    bases.append(base and base[0])
                    news.append(new and new[0])
                    per.append(_triple(base and base[0], new and new[0]))
                mean_base = None if None in bases else float(np.mean(bases))
                mean_new = None if None in news else float(np.mean(news))
                rows.append([m, *per, _triple(mean_base, mean_new)])
            out += [*_table(["method", *datasets, "average"], rows), ""]
    else:
        targets = _ordered(t for c in cells for t in c["accuracy"])
        for n in shots:
            out += [f"**N = {n}**, trained on {targets[0]} (accuracy %, mean ± std over seeds)", ""]
            rows = []
            for m in methods:
                per = [_cell(_stats([c["accuracy"].get(t) for c in by[m, n]])) for t in targets]
                avg = _stats(_average_per_seed(by[m, n], targets[1:], by_target=True)) if len(targets) > 1 else None
                rows.append([m, *per, _cell(avg)])
            out += [*_table(["method", *targets, "average (targets)"], rows), ""]
    out += ["Cost: seconds per training (mean over cells, on the same features):", ""]
    rows = [
        [m, *(f"{np.mean([c['fit_seconds'] for c in by[m, n]]):.2f}" if by[m, n] else "–" for n in shots)]
        for m in methods
    ]
    out += _table(["method", *(f"N={n}" for n in shots)], rows)
    if skipped:
        out += ["", f"**Warning: {len(skipped)} cell(s) skipped** (not in the tables above):", ""]
        out += [f"- {line}" for line in skipped]
    return "\n".join(out) + "\n"


def _by_method(cells: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    grouped: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for c in cells:
        grouped[c["method"]].append(c)
    return grouped


def _hyperparameters(cells: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """The lr and λ a method's cells record: one value, a rule of N (1/N, 1/N²), "per cell" or "–"."""
    infos = [(c.get("info") or {}, int(c["shots"])) for c in cells]
    shown = []
    for key in ("lr", "reg_lambda"):
        values = [(info.get(key), n) for info, n in infos]
        if any(v is None or isinstance(v, (str, list)) for v, _ in values):
            shown.append("–")
        elif len({v for v, _ in values}) == 1:
            shown.append(f"{values[0][0]:g}")
        elif all(math.isclose(v, 1 / n) for v, n in values):
            shown.append("1/N")
        elif all(math.isclose(v, 1 / n**2) for v, n in values):
            shown.append("1/N²")
        else:
            shown.append("per cell")
    return shown[0], shown[1]


def _triple(base: float | None, new: float | None) -> str:
    if base is None:
        return "–"
    if new is None:
        return f"{100 * base:.2f} / – / –"
    hm = 2 * base * new / (base + new) if base + new > 0 else 0.0
    return f"{100 * base:.2f} / {100 * new:.2f} / {100 * hm:.2f}"


def _average_per_seed(
    cells: Sequence[Mapping[str, Any]], columns: Sequence[str], by_target: bool = False
) -> list[float | None]:
    """Per seed, the mean over ``columns`` (datasets, or targets with ``by_target``); None if one is missing."""
    per_seed: dict[int, list[float | None]] = defaultdict(list)
    for c in cells:
        if by_target:
            per_seed[int(c["seed"])] += [c["accuracy"].get(t) for t in columns]
        elif c["dataset"] in columns:
            per_seed[int(c["seed"])].append(c["accuracy"].get(c["dataset"]))
    want = len(columns)
    return [float(np.mean(v)) if len(v) == want and None not in v else None for _, v in sorted(per_seed.items())]


def render_plot(setting: str, cells: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> bool:
    """``plot.png``: average accuracy against N (few-shot) or per test set (the others); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    methods = _ordered(c["method"] for c in cells)
    fig, ax = plt.subplots(figsize=(8, 5))
    if setting == "few-shot":
        datasets = _ordered(c["dataset"] for c in cells)
        shots = sorted({int(c["shots"]) for c in cells})
        for m in methods:
            stats = [
                _stats(_average_per_seed([c for c in cells if c["method"] == m and c["shots"] == n], datasets))
                for n in shots
            ]
            xs = [n for n, s in zip(shots, stats, strict=True) if s is not None]
            ys = [100 * s[0] for s in stats if s is not None]
            errs = [100 * s[1] for s in stats if s is not None]
            style = "-" if m.startswith("prolip") else "--" if m == "zero-shot" else ":"
            ax.errorbar(xs, ys, yerr=errs, label=m, marker="o", capsize=3, linestyle=style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(n) for n in shots])
        ax.set_xlabel("shots per class (N)")
        ax.set_ylabel("average test accuracy (%)")
    else:
        columns = ["base", "new"] if setting == "base-to-new" else _ordered(t for c in cells for t in c["accuracy"])
        width = 0.8 / max(len(methods), 1)
        for k, m in enumerate(methods):
            mine = [c for c in cells if c["method"] == m]
            means = []
            for t in columns:
                stats = _stats([c["accuracy"].get(t) for c in mine])
                means.append(math.nan if stats is None else 100 * stats[0])
            ax.bar(np.arange(len(columns)) + k * width, means, width, label=m)
        ax.set_xticks(np.arange(len(columns)) + 0.4 - width / 2, columns, rotation=30)
        ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"prolip bench: {setting}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
