"""Bench results: every cell in ``results.json`` (written as cells finish, so a run resumes), the
paper-style ``table.md``, ``plot.png`` and a sensitivity run's ``heatmap.png`` rendered from it
(:class:`RunResults`: what was run, as results.json records it, in the run's order of names).

A cell is one method trained on one draw (dataset, N, seed) and scored on each of its job's test
sets: ``{"dataset", "shots", "seed", "method", "accuracy": {target: fraction or null}, "fit_seconds",
"info"}``. ``null`` marks a test set the method cannot score (classes it was not trained on).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from prolip._version import __version__
from prolip.atomic import atomic_write, file_lock, read_json
from prolip.errors import InputError
from prolip.figures import pyplot, write_png
from prolip.params import number

FORMAT = "prolip-bench"
VERSION = 1
LOCK_SUFFIX = ".lock"
"""``results.json.lock`` beside the file: what :func:`add_cells` locks while it merges (:func:`results_lock`)."""

_CELL_KEYS = ("dataset", "shots", "seed", "method", "accuracy", "fit_seconds", "info")
_DIGEST = re.compile(r"[0-9a-f]{64}")  # a draw's digest: SHA-256 in hex (FeatureStore.draw_digest)
_MAX_INFO_DEPTH = 16
"""How deeply a cell's ``info`` may nest (the methods' records nest 3 levels). JSON nested near the parser's
recursion limit can be read where the stack is shallow and not where it is deep: such a cell, once merged,
would make ``results.json`` unreadable to the next run."""


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _shown(value: Any) -> str:
    """``value`` for an error message: its repr, cut short (a hostile file's value can be megabytes)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _deeper_than(value: Any, depth: int) -> bool:
    """Whether the JSON value nests more than ``depth`` levels of lists and objects (walked without recursion)."""
    layer = [value]
    for _ in range(depth + 1):
        layer = [v for x in layer if isinstance(x, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)]
        if not layer:
            return False
    return True


def cell_fault(cell: Any) -> str | None:
    """What is wrong with one cell (a phrase: "lacks ['seed']", "has shots=0 ..."), or None.

    The one check of a cell: cells read from ``results.json`` (:func:`read_results`), added to it
    (:func:`add_cells`), and read from the part files of other ranks (:mod:`prolip.bench.shards`).
    """
    if not isinstance(cell, dict):
        return f"is a {type(cell).__name__}, not an object"
    missing = [k for k in _CELL_KEYS if k not in cell]
    if missing:
        return f"lacks {missing}"
    for key in ("dataset", "method"):
        if not isinstance(cell[key], str) or not cell[key]:
            return f"has {key}={_shown(cell[key])}, not a name"
    if not _is_int(cell["shots"], 1) or not _is_int(cell["seed"], 0):
        return f"has shots={_shown(cell['shots'])} and seed={_shown(cell['seed'])}; they must be integers >= 1 and >= 0"
    accuracy = cell["accuracy"]
    if not isinstance(accuracy, dict) or not all(
        isinstance(k, str) and (v is None or (number(v) and 0 <= v <= 1)) for k, v in accuracy.items()
    ):
        return f"has accuracy={_shown(accuracy)}; it must map test sets to fractions in [0, 1] or null"
    if not number(cell["fit_seconds"]) or cell["fit_seconds"] < 0:
        return f"has fit_seconds={_shown(cell['fit_seconds'])}, not a number of seconds"
    if not isinstance(cell["info"], dict):
        return f"has info={_shown(cell['info'])}, not an object"
    if _deeper_than(cell["info"], _MAX_INFO_DEPTH):
        return f"has an info nested more than {_MAX_INFO_DEPTH} levels deep"
    return None


def draws_fault(draws: Any) -> str | None:
    """What is wrong with a record of draws (draw name -> the SHA-256 hex digest of its items), or None.

    The one check of draws: those of ``results.json`` and those a part file or a caller adds to it.
    """
    if not isinstance(draws, dict):
        return f"is a {type(draws).__name__}, not an object of digests"
    for name, digest in draws.items():
        if not (isinstance(name, str) and name and isinstance(digest, str) and _DIGEST.fullmatch(digest)):
            return f"has {_shown(name)}: {_shown(digest)}, not a draw's name and the SHA-256 digest of its items"
    return None


def draw_conflict(known: Mapping[str, str], draws: Mapping[str, str]) -> str | None:
    """The first draw of ``draws`` whose digest differs from the one ``known`` records for it, or None."""
    return next((name for name, digest in draws.items() if known.get(name, digest) != digest), None)


def results_lock(path: str | os.PathLike) -> AbstractContextManager[None]:
    """The exclusive lock of ``results.json`` at ``path`` (on ``<path>.lock``), for a ``with`` block.

    :func:`add_cells` holds it while it merges; :mod:`prolip.bench.shards` holds it while a rank appends
    a cell to its part file and while the parts are merged and deleted, so that no line is written
    between a part's reading and its deletion. The lock is per open file: a process that holds it
    and takes it again waits forever (pass ``locked=True`` to :func:`add_cells` inside it).
    """
    path = Path(path)
    return file_lock(path.with_name(path.name + LOCK_SUFFIX))


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
    elif draws_fault(data.setdefault("draws", {})) is not None:
        fault = f"'draws' {draws_fault(data['draws'])}"
    else:
        seen = set()
        for i, cell in enumerate(data["cells"]):
            fault = cell_fault(cell)
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
    name = draw_conflict(known, draws)
    if name is not None:
        raise InputError(
            f"{where!r} holds cells computed on other data: draw {name!r} has other images, labels or image "
            "contents now; use another --out-dir, or delete it to start over."
        )


def add_cells(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    cells: Sequence[Mapping[str, Any]] = (),
    draws: Mapping[str, str] | None = None,
    *,
    locked: bool = False,
) -> list[dict[str, Any]]:
    """Add finished ``cells`` (and the ``draws`` digests they were computed on) to ``results.json`` at ``path``.

    The one way results are written, safe with any number of processes (or ranks) writing one file:
    under an exclusive lock on ``<path>.lock`` (:func:`results_lock`; ``locked``: the caller holds it
    already) it re-reads the file (checked by :func:`read_results`), refuses another configuration
    or a draw whose digest differs from the recorded one, adds the cells not yet there (a cell
    already present is kept: the first finished copy wins), and replaces the file atomically
    (:func:`prolip.atomic.atomic_write`). A cell another process finished is therefore never lost,
    and a crash leaves the previous complete file. The cells and draws are checked as
    :func:`read_results` checks the file's, so nothing is written that would make it unreadable.

    Returns:
        Every cell now in the file (this process's and the others').

    Raises:
        InputError: the file is damaged, holds another configuration or other data, or cannot be
            written (full disk, read-only folder), naming the file.
    """
    path, draws = Path(path), dict(draws or {})
    for i, cell in enumerate(cells):
        fault = cell_fault(cell)
        if fault is not None:
            raise InputError(f"cell {i} to add to {str(path)!r} {fault}.")
    fault = draws_fault(draws)
    if fault is not None:
        raise InputError(f"the draws to add to {str(path)!r} {fault}.")
    try:
        with nullcontext() if locked else results_lock(path):
            if path.exists():
                data = read_results(path)
                _check_config(str(path), data, config)
                _check_draws(str(path), data["draws"], draws)
            else:
                data = {"format": FORMAT, "format_version": VERSION, "config": dict(config), "draws": {}, "cells": []}
            data["draws"].update(draws)
            done = {_cell_key(c) for c in data["cells"]}
            for c in cells:  # one copy of each: a second one would make the file unreadable
                if _cell_key(c) not in done:
                    data["cells"].append(dict(c))
                    done.add(_cell_key(c))
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

    def add_all(
        self, cells: Sequence[dict[str, Any]], draws: Mapping[str, str] | None = None, *, locked: bool = False
    ) -> None:
        """Record finished ``cells`` computed on ``draws`` in one locked rewrite of the file (``locked``: as
        :func:`add_cells`)."""
        self.cells = add_cells(self.path, self.config, cells, draws, locked=locked)
        self.draws.update(draws or {})
        self._done = {_cell_key(c) for c in self.cells}


def json_default(value: Any) -> Any:
    """``json.dumps``'s ``default`` for bench cells: numpy scalars as Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


Stats = tuple[float, float, int]
"""Accuracies over seeds: mean, standard deviation, how many seeds."""


def _stats(values: Sequence[float | None]) -> Stats | None:
    kept = [v for v in values if v is not None]
    return (float(np.mean(kept)), float(np.std(kept)), len(kept)) if kept else None


def _cell(stats: Stats | None) -> str:
    """A table cell: mean ± std in %, the mean alone where one seed has no spread to show."""
    if stats is None:
        return "–"
    mean, std, seeds = stats
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if seeds > 1 else f"{100 * mean:.2f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _ordered(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _in_order(present: Iterable[str], order: Sequence[str]) -> list[str]:
    """``present`` in ``order``, then what ``order`` lacks sorted: the same whatever order the cells came in."""
    present = set(present)
    return [x for x in _ordered(order) if x in present] + sorted(present.difference(order))


@dataclass(frozen=True)
class RunResults:
    """What ``table.md`` and the plots describe: results.json's configuration and cells, and the run's order of names.

    Attributes:
        config: results.json's ``config``, as the run recorded it (setting, model, weights, views, steps,
            templates, precision, data root).
        cells: the cells to render (every cell of results.json).
        methods: the run's ``--methods``: rows, legends and styles follow their order. Methods of other runs
            sharing the file follow, sorted.
        names: the run's datasets and test sets in the order of its plan: columns and panels follow it; others
            follow, sorted. Cells arrive in any order (ranks under ``torchrun`` finish them in any order): the
            rendering never depends on it.
    """

    config: Mapping[str, Any]
    cells: Sequence[Mapping[str, Any]]
    methods: Sequence[str] = ()
    names: Sequence[str] = ()

    @property
    def setting(self) -> str:
        """The bench setting the cells were run in."""
        return self.config["setting"]

    @cached_property
    def ordered_methods(self) -> list[str]:
        """Every method of the cells, in the run's order."""
        return _in_order((c["method"] for c in self.cells), self.methods)

    @cached_property
    def datasets(self) -> list[str]:
        """Every training dataset of the cells, in the run's order."""
        return _in_order((c["dataset"] for c in self.cells), self.names)

    @cached_property
    def targets(self) -> list[str]:
        """Every test set of the cells, the training dataset first (cross-dataset, domain generalisation)."""
        trained = self.datasets[:1]
        return trained + _in_order((t for c in self.cells for t in c["accuracy"] if t not in trained), self.names)

    @cached_property
    def shots(self) -> list[int]:
        """Every N of the cells, ascending."""
        return sorted({int(c["shots"]) for c in self.cells})

    @cached_property
    def seeds(self) -> list[int]:
        """Every seed of the cells, ascending."""
        return sorted({int(c["seed"]) for c in self.cells})

    @cached_property
    def by(self) -> dict[tuple[str, int], list[Mapping[str, Any]]]:
        """The cells of each (method, N)."""
        grouped: dict[tuple[str, int], list[Mapping[str, Any]]] = defaultdict(list)
        for c in self.cells:
            grouped[c["method"], int(c["shots"])].append(c)
        return grouped


def _listed(values: Iterable[Any]) -> str:
    return ", ".join(map(str, values))


def _header(run: RunResults) -> list[str]:
    """What was run, from results.json's ``config`` and its cells (never the setting's defaults)."""
    config = run.config
    templates = config.get("templates")
    grid = len(run.datasets) * len(run.shots) * len(run.seeds) * len(run.ordered_methods)
    missing = f"; {grid - len(run.cells)} of the {grid} dataset × N × seed × method missing" * (grid > len(run.cells))
    lines = [
        f"- **model**: `{config.get('model')}`, weights `{config.get('pretrained')}`, {config.get('precision')}",
        f"- **training**: {config.get('views')} augmented views per image, {config.get('epochs')} steps",
        f"- **prompts**: {f'{len(templates)} templates (--templates)' if templates else 'each dataset’s own'}",
        f"- **data root**: `{config.get('data_root')}`",
        f"- **trained on** ({len(run.datasets)}): {_listed(run.datasets)}",
    ]
    if run.setting in ("cross-dataset", "domain-generalisation"):
        lines.append(f"- **test sets** ({len(run.targets)}): {_listed(run.targets)}")
    lines += [
        f"- **N**: {_listed(run.shots)}; **seeds**: {_listed(run.seeds)}",
        f"- **methods** ({len(run.ordered_methods)}): {_listed(run.ordered_methods)}",
        f"- **cells**: {len(run.cells)}{missing}",
    ]
    return [f"What was run (results.json's `config` and cells; rendered by prolip {__version__}):", "", *lines]


def _spread(run: RunResults, what: str = "mean ± std") -> str:
    """How a table's values summarise the seeds."""
    return f"{what} over seeds" if len(run.seeds) > 1 else f"seed {run.seeds[0]}"


Panels = dict[str, dict[str, list[Stats | None]]]
"""Per column (a dataset or test set, then the average), per method, the accuracy at each N of the run."""


def _accuracy_panels(run: RunResults) -> Panels:
    """Few-shot: each dataset and the average over them; cross-dataset and DG: each test set and the targets' average."""
    few_shot = run.setting == "few-shot"
    columns = run.datasets if few_shot else run.targets
    average = "average" if few_shot else "average (targets)"
    panels: Panels = {name: {} for name in (*columns, average)}
    for m in run.ordered_methods:
        for name in columns:
            panels[name][m] = [
                _stats([c["accuracy"].get(name) for c in run.by[m, n] if not few_shot or c["dataset"] == name])
                for n in run.shots
            ]
        if few_shot:
            panels[average][m] = [_stats(_average_per_seed(run.by[m, n], columns)) for n in run.shots]
        else:
            targets = columns[1:]
            panels[average][m] = [
                _stats(_average_per_seed(run.by[m, n], targets, by_target=True)) if targets else None for n in run.shots
            ]
    return panels


BaseNew = dict[str, dict[str, list[tuple[float | None, float | None]]]]
"""Per dataset (then the average), per method, (base, new) mean accuracies at each N of the run."""


def _base_new_panels(run: RunResults) -> BaseNew:
    panels: BaseNew = {name: {} for name in (*run.datasets, "average")}
    for m in run.ordered_methods:
        panels["average"][m] = []
        for name in run.datasets:
            panels[name][m] = []
            for n in run.shots:
                group = [c for c in run.by[m, n] if c["dataset"] == name]
                base, new = (_stats([c["accuracy"].get(key) for c in group]) for key in ("base", "new"))
                panels[name][m].append((base and base[0], new and new[0]))
        for i in range(len(run.shots)):
            bases, news = zip(*(panels[name][m][i] for name in run.datasets), strict=True)
            mean = [None if None in values else float(np.mean(values)) for values in (bases, news)]
            panels["average"][m].append((mean[0], mean[1]))
    return panels


def render_table(run: RunResults, skipped: Sequence[str] = ()) -> str:
    """``table.md``: what was run, then the paper-style tables of its setting (accuracy %), and costs.

    A value is the mean ± std over seeds, or the mean alone where a cell has one seed. ``skipped`` lists the
    cells this run could not compute, and why: they are warned about under the tables.
    """
    setting, methods, shots = run.setting, run.ordered_methods, run.shots
    out = [f"# prolip bench: {setting}", "", *_header(run), ""]
    trained = [[m, *_hyperparameters([c for c in run.cells if c["method"] == m])] for m in methods]
    out += ["Hyperparameters the cells trained with (their `info` in results.json):", ""]
    out += [*_table(["method", "lr", "λ"], trained), ""]
    if setting == "base-to-new":
        panels = _base_new_panels(run)
        for i, n in enumerate(shots):
            out += [f"**N = {n}**: base / new / harmonic mean (accuracy %, {_spread(run, 'mean')})", ""]
            rows = [[m, *(_triple(*panels[name][m][i]) for name in panels)] for m in methods]
            out += [*_table(["method", *panels], rows), ""]
    else:
        panels = _accuracy_panels(run)
        if setting == "few-shot":
            out += [f"Average over datasets (accuracy %, {_spread(run)}):", ""]
            rows = [[m, *map(_cell, panels["average"][m])] for m in methods]
            out += [*_table(["method", *(f"N={n}" for n in shots)], rows), ""]
        for i, n in enumerate(shots):
            trained_on = "" if setting == "few-shot" else f", trained on {run.targets[0]}"
            out += [f"**N = {n}**{trained_on} (accuracy %, {_spread(run)})", ""]
            rows = [[m, *(_cell(panels[name][m][i]) for name in panels)] for m in methods]
            out += [*_table(["method", *panels], rows), ""]
    out += ["Cost: seconds per training (mean over cells, on the same features):", ""]
    rows = [
        [m, *(f"{np.mean([c['fit_seconds'] for c in run.by[m, n]]):.2f}" if run.by[m, n] else "–" for n in shots)]
        for m in methods
    ]
    out += _table(["method", *(f"N={n}" for n in shots)], rows)
    if skipped:
        out += ["", f"**Warning: {len(skipped)} cell(s) skipped** (not in the tables above):", ""]
        out += [f"- {line}" for line in skipped]
    return "\n".join(out) + "\n"


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


def _harmonic(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def _triple(base: float | None, new: float | None) -> str:
    if base is None:
        return "–"
    if new is None:
        return f"{100 * base:.2f} / – / –"
    return f"{100 * base:.2f} / {100 * new:.2f} / {100 * _harmonic(base, new):.2f}"


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


# ---------------------------------------------------------------------------------------------------- plots
_COLOURS = (
    *("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"),
    *("#000000", "#393b79", "#637939", "#843c39"),
)  # matplotlib's tab10, then four darker ones: the 14 methods of the paper's table in 14 colours
_LINE_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h")
_HATCHES = ("", "//", "\\\\", "xx", "..", "++", "oo", "--", "||")


def _style(k: int) -> dict[str, Any]:
    """The k-th method's colour, line style, marker and hatch: the same in every panel of every plot.

    Cycles of 14, 4 and 9 (lcm 252) keep (colour, line style, marker) and (colour, hatch) (lcm 126) distinct for
    far more methods than a plot can hold.
    """
    return {
        "color": _COLOURS[k % len(_COLOURS)],
        "linestyle": _LINE_STYLES[k % len(_LINE_STYLES)],
        "marker": _MARKERS[k % len(_MARKERS)],
        "hatch": _HATCHES[k % len(_HATCHES)],
    }


def _title(run: RunResults, what: str) -> str:
    """A figure's title: the setting and what it shows, then what was run (as ``table.md``'s header)."""
    config = run.config
    return (
        f"prolip bench: {run.setting}: {what}\n{config.get('model')} ({config.get('pretrained')}), "
        f"{config.get('views')} views, {config.get('epochs')} steps; N = {_listed(run.shots)}; "
        f"seed{'s' * (len(run.seeds) > 1)} {_listed(run.seeds)}; data root {config.get('data_root')}"
    )


def _figure(plt: Any, panels: int, legend_entries: int) -> tuple[Any, list[Any]]:
    """A figure of ``panels`` axes, four to a row, with room for a legend of ``legend_entries`` below them."""
    columns = min(4, panels)
    rows = math.ceil(panels / columns)
    height = 3.3 * rows + 0.3 * math.ceil(legend_entries / 5) + 1.0
    fig, axes = plt.subplots(rows, columns, figsize=(4.3 * columns, height), layout="constrained", squeeze=False)
    axes = list(axes.flat)
    for ax in axes[panels:]:
        ax.axis("off")
    return fig, axes[:panels]


def _save(plt: Any, fig: Any, path: str | os.PathLike, title: str, legend: bool = True) -> None:
    """Title the figure, add the methods' legend below its panels, and write it to ``path`` atomically."""
    if legend:
        handles, labels = fig.axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), fontsize=9)
    fig.suptitle(title, fontsize=11)
    write_png(plt, fig, path, dpi=100)


def _lines(ax: Any, shots: Sequence[int], values: Mapping[str, Sequence[float | None]]) -> None:
    for k, (m, ys) in enumerate(values.items()):
        style = {key: v for key, v in _style(k).items() if key != "hatch"}
        ys = [math.nan if y is None else 100 * y for y in ys]
        ax.plot(shots, ys, label=m, markersize=4, linewidth=1.3, **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(n) for n in shots])
    ax.minorticks_off()


def _bars(ax: Any, groups: Sequence[str], values: Mapping[str, Sequence[float | None]]) -> None:
    width = 0.8 / max(len(values), 1)
    shown = []
    for k, (m, ys) in enumerate(values.items()):
        style = _style(k)
        heights = [math.nan if y is None else 100 * y for y in ys]
        shown += [h for h in heights if not math.isnan(h)]
        xs = np.arange(len(groups)) - 0.4 + (k + 0.5) * width
        ax.bar(xs, heights, width, label=m, color=style["color"], hatch=style["hatch"], edgecolor="0.25", linewidth=0.4)
    ax.set_xticks(np.arange(len(groups)), groups)
    if shown:  # bars from just below the lowest: differences of a point stay visible
        ax.set_ylim(max(0.0, min(shown) - 5), min(100.0, max(shown) + 2))


def render_plot(run: RunResults, path: str | os.PathLike) -> bool:
    """``plot.png``: one panel per dataset (or test set) and one for the average, every method in its own style.

    Few-shot over several N: accuracy against N, a line per method (colour, line style and marker its own).
    Otherwise bars per method (colour and hatch its own): at each N for each test set, or base / new /
    harmonic mean for base-to-new. Values are means over seeds; the title names what was run. False without
    matplotlib.
    """
    plt = pyplot()
    if plt is None:
        return False
    shots = run.shots
    if run.setting == "base-to-new":
        panels = {
            name: {m: [v for b, n in per for v in (b, n, None if None in (b, n) else _harmonic(b, n))]
                   for m, per in by_method.items()}
            for name, by_method in _base_new_panels(run).items()
        }  # fmt: skip
        groups = [g if len(shots) == 1 else f"{g}\nN={n}" for n in shots for g in ("base", "new", "HM")]
        what = "base / new / harmonic mean accuracy (%), mean over seeds"
    else:
        panels = {
            name: {m: [s and s[0] for s in per] for m, per in by_method.items()}
            for name, by_method in _accuracy_panels(run).items()
        }
        groups = [f"N={n}" for n in shots]
        what = "accuracy (%) against N" if len(shots) > 1 else "accuracy (%)"
        what += ", mean over seeds" if len(run.seeds) > 1 else ""
    fig, axes = _figure(plt, len(panels), len(run.ordered_methods))
    lines = run.setting != "base-to-new" and len(shots) > 1
    for i, (ax, (name, values)) in enumerate(zip(axes, panels.items(), strict=True)):
        if lines:
            _lines(ax, shots, values)
            if i >= len(axes) - min(4, len(axes)):
                ax.set_xlabel("shots per class (N)")
        else:
            _bars(ax, groups, values)
        if i % 4 == 0:
            ax.set_ylabel("accuracy (%)")
        ax.set_title(name, fontsize=10, fontweight="bold" if name.startswith("average") else "normal")
        ax.grid(alpha=0.3, axis="both" if lines else "y")
    _save(plt, fig, path, _title(run, what))
    return True


_GRID_ARGUMENTS = {"lr", "reg_lambda"}


def lr_lambda_grids(run: RunResults) -> dict[str, dict[tuple[float, str], str]]:
    """The lr × λ grids among the run's methods: per method name, each (lr, λ label) it trained at -> its spec.

    A grid is one method run under several learning rates and several λ, its specs setting nothing else
    (``prolip:lr=1e-5``, ``prolip:lr=1e-5,reg_lambda=0``, ...: the paper's sensitivity table). A point is what
    its cells trained with (their ``info``: ``prolip`` alone is lr 1e-3 at λ = 1/N); of two specs at one point
    the first is kept.
    """
    points: dict[str, dict[tuple[float, str], str]] = defaultdict(dict)
    for m in run.ordered_methods:
        name, _, arguments = m.partition(":")
        if not {pair.partition("=")[0] for pair in arguments.split(",") if pair} <= _GRID_ARGUMENTS:
            continue
        mine = [c for c in run.cells if c["method"] == m]
        lr, reg_lambda = _hyperparameters(mine)
        if "–" not in (lr, reg_lambda) and "per cell" not in (lr, reg_lambda):
            points[name].setdefault((float(mine[0]["info"]["lr"]), reg_lambda), m)
    return {
        name: grid
        for name, grid in points.items()
        if len({lr for lr, _ in grid}) > 1 and len({lam for _, lam in grid}) > 1
    }


def render_heatmap(run: RunResults, path: str | os.PathLike) -> bool:
    """``heatmap.png`` of a few-shot run whose methods form lr × λ grids (:func:`lr_lambda_grids`).

    One panel per grid and N: each (lr, λ)'s accuracy averaged over the datasets (mean over seeds), written in
    its square. Where zero-shot was run, the colour is the difference to zero-shot's average at that N (blue
    above, red below); otherwise the accuracy. False when the run has no grid, or without matplotlib.
    """
    grids = lr_lambda_grids(run) if run.setting == "few-shot" else {}
    plt = pyplot() if grids else None
    if plt is None:
        return False
    from matplotlib.colors import Normalize

    average = _accuracy_panels(run)["average"]
    zero = [None if s is None else 100 * s[0] for s in average.get("zero-shot", [None] * len(run.shots))]
    squares = []  # per panel: grid name, N's index, lrs, λ labels, accuracies [λ, lr]
    for name, grid in grids.items():
        lrs, lambdas = sorted({lr for lr, _ in grid}), _ordered(lam for _, lam in grid)
        for i in range(len(run.shots)):
            accuracy = np.full((len(lambdas), len(lrs)), math.nan)
            for (lr, lam), m in grid.items():
                if average[m][i] is not None:
                    accuracy[lambdas.index(lam), lrs.index(lr)] = 100 * average[m][i][0]
            squares.append((name, i, lrs, lambdas, accuracy))
    against_zero = None not in zero
    shown = [acc - zero[i] if against_zero else acc for _, i, _, _, acc in squares]
    if against_zero:
        limit = max(float(np.nanmax(np.abs(s))) for s in shown) or 1.0
        norm, cmap, label = Normalize(-limit, limit), "RdBu", "accuracy − zero-shot (points)"
    else:
        norm = Normalize(min(float(np.nanmin(s)) for s in shown), max(float(np.nanmax(s)) for s in shown))
        cmap, label = "viridis", "accuracy (%)"
    columns = len(run.shots)
    fig, axes = plt.subplots(
        len(grids), columns, figsize=(3.4 * columns + 1.2, 2.4 * len(grids) + 1.2), layout="constrained", squeeze=False
    )
    for ax, (name, i, lrs, lambdas, accuracy), colour in zip(axes.flat, squares, shown, strict=True):
        image = ax.imshow(np.ma.masked_invalid(colour), cmap=cmap, norm=norm, aspect="auto")
        for (row, column), value in np.ndenumerate(accuracy):
            if not math.isnan(value):
                strong = abs(norm(colour[row, column]) - 0.5) > 0.3 if against_zero else norm(value) < 0.5
                ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if strong else "black")  # fmt: skip
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], fontsize=8)
        ax.set_yticks(range(len(lambdas)), [f"λ = {lam}" for lam in lambdas], fontsize=8)
        ax.set_xlabel("learning rate", fontsize=8)
        title = f"{name}, N = {run.shots[i]}" if len(grids) > 1 else f"N = {run.shots[i]}"
        ax.set_title(title + (f" (zero-shot {zero[i]:.2f})" if against_zero else ""), fontsize=9)
    fig.colorbar(image, ax=axes, label=label, shrink=0.9)
    what = f"λ × learning rate, accuracy (%) averaged over the {len(run.datasets)} datasets"
    what += ", mean over seeds" if len(run.seeds) > 1 else ""
    _save(plt, fig, path, _title(run, what + ", per N"), legend=False)
    return True
