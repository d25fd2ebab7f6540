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

from prolip.atomic import atomic_write
from prolip.bench.settings import describe_defaults
from prolip.errors import InputError

FORMAT = "prolip-bench"
VERSION = 1


class ResultsFile:
    """``results.json`` of one bench run: its configuration and the finished cells.

    Opening an existing file with another configuration (what changes a cell's value: setting,
    model, weights, views, steps, templates, precision) is refused, so a resumed run never mixes
    results of different settings, models or hyperparameters; more datasets, shots, seeds or
    methods simply add cells.
    """

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any]) -> None:
        self.path, self.config = Path(path), dict(config)
        self.cells: list[dict[str, Any]] = []
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except ValueError as exc:
                raise InputError(f"{str(self.path)!r} is not a readable results file ({exc}); move it away.") from None
            if data.get("format") != FORMAT or data.get("config") != self.config:
                raise InputError(
                    f"{str(self.path)!r} holds results of another bench configuration ({data.get('config')}); "
                    "use another --out-dir, or delete it to start over."
                )
            self.cells = list(data["cells"])
        self._done = {self.key(c) for c in self.cells}

    @staticmethod
    def key(cell: Mapping[str, Any]) -> tuple[str, int, int, str]:
        """What identifies a cell: training dataset, N, seed, method."""
        return cell["dataset"], int(cell["shots"]), int(cell["seed"]), cell["method"]

    def done(self, dataset: str, shots: int, seed: int, method: str) -> bool:
        """Whether that cell is already in the file."""
        return (dataset, shots, seed, method) in self._done

    def add(self, cell: dict[str, Any]) -> None:
        """Record a finished cell and rewrite the file atomically."""
        self.cells.append(cell)
        self._done.add(self.key(cell))
        data = {"format": FORMAT, "format_version": VERSION, "config": self.config, "cells": self.cells}
        atomic_write(self.path, [json.dumps(data, indent=1, default=_json_default).encode()])


def _json_default(value: Any) -> Any:
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


def render_table(setting: str, cells: Sequence[Mapping[str, Any]]) -> str:
    """``table.md``: the paper-style tables of ``setting`` (accuracy %, mean ± std over seeds), and costs."""
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
