"""``prolip bench`` across the processes of a ``torch.distributed`` job: ``torchrun ... -m prolip bench ...``.

A run in P processes (ranks) has two phases, with the feature cache (a folder every rank reaches:
local on one machine, a shared file system across machines) as the meeting point:

1. **Extraction.** Every rank lists the run's feature sets (:func:`~prolip.bench.workload.feature_requests`),
   merges them per view setting, decides which images the cache lacks (before any rank writes),
   decodes and hashes those, and computes the views of its share of them
   (:func:`~prolip.features.extract.fill_cache`'s ``rank``/``world_size``: distinct images at positions
   ``rank, rank + P, ...`` of each chunk); then all wait at a barrier.
2. **Cells.** The pending cells, in the order a single process runs them, are dealt round-robin:
   cell ``j`` to rank ``j mod P``. Every cell is a pure function of its draw and the cached
   features, so it has the same value whichever rank trains it.

Rank 0 is the only writer of ``results.json``. It records its own cells there as they finish;
every other rank appends each finished cell as one JSON line to its own part file
``results.part-rank<r>-<host>-<pid>.jsonl`` (flushed and fsynced, so a killed rank loses at most
the cell it was writing). After a final barrier rank 0 merges every part into ``results.json``
(cells already there are skipped, so none is written twice) and deletes it; it merges leftover
parts the same way when a run starts, so the cells of a killed run are kept and a rerun resumes
as a single-process run does. A rank appends its line, and a merge reads, adds and deletes the
parts, under ``results.json``'s lock (:func:`~prolip.bench.results.results_lock`): a process that
merges the parts of a job still running beside it (a plain ``prolip bench`` started on the same
``--out-dir``) never deletes a line written after its reading. A damaged part is set aside, never
merged (:func:`merge_parts`). Only barriers are communicated: no tensors or Python objects travel
between processes, so the backend does not matter (NCCL on GPUs, Gloo on CPUs). Two distributed
runs writing into one ``--out-dir`` at the same time are not supported.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from prolip.bench.data import Item
from prolip.bench.results import (
    ResultsFile,
    cell_fault,
    draw_conflict,
    draws_fault,
    json_default,
    results_lock,
)
from prolip.bench.store import FeatureStore
from prolip.bench.workload import CellKey, FeatureRequest
from prolip.errors import InputError, warn
from prolip.variants.distributed import barrier, init_distributed, rank_and_world_size

logger = logging.getLogger(__name__)

PART_GLOB = "results.part-*.jsonl"
BAD_SUFFIX = ".bad"
"""A damaged part is renamed ``<part>.bad``: out of :data:`PART_GLOB`, kept for whoever wants to look at it."""
MAX_PART_BYTES = 256 << 20  # a part holds one line of a few KB per cell: far more is not a part


def join_job() -> tuple[int, int, torch.device | None, bool]:
    """Join the ``torchrun`` job described in the environment, if any.

    Returns ``(rank, world size, this rank's device or None, whether this call created the process group)``;
    outside ``torchrun`` ``(0, 1, None, False)``.
    """
    if "RANK" not in os.environ or (dist.is_available() and dist.is_initialized()):
        rank, world = rank_and_world_size()
        return rank, world, None, False
    device = init_distributed()
    rank, world = rank_and_world_size()
    return rank, world, device, True


def leave_job(created: bool) -> None:
    """Destroy the process group :func:`join_job` created (after a last barrier)."""
    if created:
        barrier()
        dist.destroy_process_group()


def deal(cells: Iterable[CellKey], rank: int, world_size: int) -> set[CellKey]:
    """The cells of ``rank``: every ``world_size``-th of ``cells``, from position ``rank``."""
    return {cell for j, cell in enumerate(cells) if j % world_size == rank}


def extract_share(store: FeatureStore, requests: Iterable[FeatureRequest], rank: int, world_size: int) -> None:
    """Compute this rank's share of the features the cache lacks for ``requests``, then wait for the others.

    The requests are merged per view setting (one list of distinct images each), and what the
    cache lacks is decided before any rank writes (a barrier), so every rank walks the same lists
    and the shares (:func:`~prolip.features.extract.fill_cache`'s ``rank``) cover every image once.
    """
    sets: dict[tuple[int, int], dict[str, Item]] = {}
    for request in requests:
        sets.setdefault((request.views, request.seed), {}).update((item.path, item) for item in request.items)
    work = [(views, seed, store.missing(list(items.values()), views, seed)) for (views, seed), items in sets.items()]
    barrier()  # every rank has decided what is missing before any rank writes
    computed = passes = 0
    for views, seed, items in work:
        what = f"{views} views, seed {seed}" if views else "plain view"
        done = store.extract(items, views, seed, what, rank=rank, world_size=world_size)
        computed, passes = computed + done, passes + done * max(views, 1)
    logger.info("rank %d of %d computed %d images' features (%d trunk passes)", rank, world_size, computed, passes)
    barrier()  # every rank's share is in the cache past this point


class CellWriter:
    """Where finished cells go: ``results.json`` on rank 0, this rank's part file on the others.

    Args:
        results: the run's results file (only rank 0 writes it).
        rank: this process's rank.
    """

    def __init__(self, results: ResultsFile, rank: int) -> None:
        self.results, self.rank = results, rank
        self.part = results.path.with_name(f"results.part-rank{rank}-{socket.gethostname()}-{os.getpid()}.jsonl")

    def __call__(self, cell: dict[str, Any], draws: Mapping[str, str] | None = None) -> None:
        """Record one finished cell durably, with the digests of the ``draws`` it was computed on.

        Raises:
            InputError: the part file cannot be written (full disk, read-only folder), naming it.
        """
        if self.rank == 0:
            self.results.add(cell, draws)
            return
        lines = [json.dumps({"cell": cell, "draws": dict(draws or {})}, default=json_default) + "\n"]
        try:
            # Under results.json's lock: a merge never deletes this part between this line and its reading.
            with results_lock(self.results.path):
                # O_NOFOLLOW: a link planted under the part's name is never written through.
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                with open(os.open(self.part, flags, 0o666), "a", encoding="utf-8") as f:
                    if os.fstat(f.fileno()).st_size == 0:  # the configuration first: never merged into another run
                        lines.insert(0, json.dumps({"config": self.results.config}) + "\n")
                    f.write("".join(lines))
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            raise InputError(
                f"cannot write the part file {str(self.part)!r} ({exc.strerror or exc}); check that the folder is "
                "writable and the disk has free space. The cells merged before are kept in results.json."
            ) from None


def _read_part(path: Path, config: Mapping[str, Any]) -> tuple[list[tuple[dict[str, Any], dict[str, str]]], str | None]:
    """The cells of one part file, each with its draws' digests, or what is wrong with the part.

    Returns ``(cells, None)``, or ``([], fault)`` for a damaged part: not a regular file, unreadable,
    too large, a line that is not UTF-8 or not JSON (or nested too deeply), a first line that is not
    the part's configuration, or a line that is not a cell (:func:`~prolip.bench.results.cell_fault`)
    with the digests of its draws (:func:`~prolip.bench.results.draws_fault`). A last line without
    its newline was cut short by a killed writer: it is ignored (that cell is not done; it is rerun).

    Raises:
        InputError: the part was written by a run of another configuration.
    """
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode):
            return [], "it is not a regular file"
        if info.st_size > MAX_PART_BYTES:
            return [], f"it holds {info.st_size} bytes, more than a part's {MAX_PART_BYTES}"
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as f:
            *lines, cut = f.read(MAX_PART_BYTES + 1).split(b"\n")
    except OSError as exc:
        return [], f"it cannot be read ({exc.strerror or exc})"
    if cut:
        logger.debug("%s: ignoring the last line, cut short by a killed writer", path)
    cells = []
    for number, raw in enumerate(lines, start=1):
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return [], f"line {number} is not UTF-8 text"
        except RecursionError:
            return [], f"line {number} is JSON nested too deeply"
        except ValueError:
            return [], f"line {number} is not JSON"
        if number == 1:
            if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
                return [], "line 1 is not the configuration of the run that wrote it"
            if record["config"] != dict(config):
                raise InputError(
                    f"{str(path)!r} holds results of another bench configuration ({record['config']}); "
                    "use another --out-dir, or move it away."
                )
            continue
        if not isinstance(record, dict) or set(record) != {"cell", "draws"}:
            return [], f"line {number} is not an object of a cell and its draws"
        bad_cell, bad_draws = cell_fault(record["cell"]), draws_fault(record["draws"])
        if bad_cell or bad_draws:
            return [], f"line {number}: its cell {bad_cell}" if bad_cell else f"line {number}: its draws {bad_draws}"
        cells.append((record["cell"], record["draws"]))
    return cells, None


def _set_aside(path: Path, fault: str) -> None:
    """Rename a damaged part ``<part>.bad`` (out of the merge), with a warning naming it and its fault."""
    bad = path.with_name(path.name + BAD_SUFFIX)
    try:
        os.replace(path, bad)
        where = f"renamed {str(bad)!r}"
    except OSError as exc:
        where = f"left in place: it cannot be renamed ({exc.strerror or exc})"
    warn(
        f"{str(path)!r} is a damaged bench part file: {fault}. None of its cells are merged (a run trains them "
        f"again); it is {where}."
    )


def merge_parts(results: ResultsFile) -> int:
    """Add the cells of every part file beside ``results`` that it lacks, then delete the parts (rank 0 only).

    Returns the number of cells added. A cell already in ``results.json`` (or in an earlier part) is
    skipped, so merging twice, or a part that outlived its merge, writes nothing twice. It all runs
    under ``results.json``'s lock, which writers of parts hold while they append
    (:class:`CellWriter`), and re-reads ``results.json`` under it: a line is merged, or written
    after the part's deletion into a new part, never lost between the two.

    A damaged part (see :func:`_read_part`), or one whose cells were computed on a draw whose digest
    differs from the one ``results.json`` (or an earlier part) records, is set aside, not merged: it
    is renamed ``<part>.bad`` with a warning naming the file and its fault, and the run goes on. Its
    cells are then missing, and trained again; ``results.json`` holds nothing a run would refuse.

    Raises:
        InputError: ``results.json`` is damaged or of another configuration, a part is of another
            configuration, or the folder cannot be written (the parts are then kept).
    """
    folder = results.path.parent
    if not any(folder.glob(PART_GLOB)):  # nothing to merge: no lock (a part written now waits for the next merge)
        return 0
    cells: dict[tuple, dict[str, Any]] = {}
    try:
        with results_lock(results.path):
            current = ResultsFile(results.path, results.config)  # as other writers left it: re-read under the lock
            draws: dict[str, str] = {}
            merged = []
            for path in sorted(folder.glob(PART_GLOB)):
                part, fault = _read_part(path, results.config)
                part_draws: dict[str, str] = {}
                for _, cell_draws in part:
                    name = draw_conflict({**current.draws, **draws, **part_draws}, cell_draws)
                    if name is not None:
                        fault = f"its cells were computed on draw {name!r} with other images than results.json's"
                        break
                    part_draws.update(cell_draws)
                if fault is not None:
                    _set_aside(path, fault)
                    continue
                for cell, _ in part:
                    key = ResultsFile.key(cell)
                    if not current.done(*key) and key not in cells:
                        cells[key] = cell
                draws.update(part_draws)
                merged.append(path)
            if cells:  # one rewrite of results.json for all the parts
                results.add_all(list(cells.values()), draws, locked=True)
            for path in merged:  # only once their cells are in results.json
                path.unlink()
    except OSError as exc:
        raise InputError(
            f"cannot merge the part files of other ranks beside {str(results.path)!r} ({exc.strerror or exc}); check "
            "that the folder is writable. The parts not merged are kept."
        ) from None
    if cells:
        logger.info("merged %d cells from other ranks into %s", len(cells), results.path)
    return len(cells)


def open_results(path: Path, config: Mapping[str, Any], rank: int) -> ResultsFile:
    """The run's results file, with the cells of any killed run's parts merged in first (by rank 0).

    Every rank returns after the merge, so all see the same finished cells.
    """
    if rank == 0:
        merge_parts(ResultsFile(path, config))
    barrier()
    return ResultsFile(path, config)


def finish_results(results: ResultsFile, rank: int) -> list[dict[str, Any]]:
    """Once every rank is done: rank 0 merges the parts; every rank returns all the run's cells."""
    barrier()  # every part is complete past this point
    if rank == 0:
        merge_parts(results)
    barrier()
    return ResultsFile(results.path, results.config).cells  # with the cells of any other run sharing the file


def pending_cells(results: ResultsFile, cells: Sequence[CellKey]) -> list[CellKey]:
    """The cells not yet in ``results``, in order."""
    return [cell for cell in cells if not results.done(*cell)]
