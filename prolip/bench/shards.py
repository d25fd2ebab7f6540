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
as a single-process run does. Only barriers are communicated: no tensors or Python objects travel
between processes, so the backend does not matter (NCCL on GPUs, Gloo on CPUs). Two distributed
runs writing into one ``--out-dir`` at the same time are not supported.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from prolip.bench.data import Item
from prolip.bench.results import ResultsFile, json_default
from prolip.bench.store import FeatureStore
from prolip.bench.workload import CellKey, FeatureRequest
from prolip.errors import InputError
from prolip.variants.distributed import barrier, init_distributed, rank_and_world_size

logger = logging.getLogger(__name__)

PART_GLOB = "results.part-*.jsonl"


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
        """Record one finished cell durably, with the digests of the ``draws`` it was computed on."""
        if self.rank == 0:
            self.results.add(cell, draws)
            return
        new = not self.part.exists()
        with open(self.part, "a", encoding="utf-8") as f:
            if new:  # the configuration first, so that a part is never merged into another run's results
                f.write(json.dumps({"config": self.results.config}) + "\n")
            f.write(json.dumps({"cell": cell, "draws": dict(draws or {})}, default=json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _read_part(path: Path, config: Mapping[str, Any]) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """The cells of one part file, each with its draws' digests; a last line cut short by a killed writer is ignored.

    Raises:
        InputError: the part was written by a run of another configuration.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    cells = []
    for number, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines) - 1:
                break  # the cell being written when its rank was killed: not done, it will be rerun
            raise InputError(f"{str(path)!r} line {number + 1} is not JSON; move the file away.") from None
        if number == 0:
            if record.get("config") != dict(config):
                raise InputError(
                    f"{str(path)!r} holds results of another bench configuration ({record.get('config')}); "
                    "use another --out-dir, or move it away."
                )
            continue
        if not isinstance(record, dict) or not isinstance(record.get("cell"), dict):
            raise InputError(f"{str(path)!r} line {number + 1} is not a bench cell; move the file away.")
        cells.append((record["cell"], record.get("draws") or {}))
    return cells


def merge_parts(results: ResultsFile) -> int:
    """Add the cells of every part file beside ``results`` that it lacks, then delete the parts (rank 0 only).

    Returns the number of cells added. A cell already in ``results`` (or in an earlier part) is
    skipped, so merging twice, or a part that outlived its merge, writes nothing twice.
    """
    added = 0
    for path in sorted(results.path.parent.glob(PART_GLOB)):
        cells: dict[tuple, dict[str, Any]] = {}
        draws: dict[str, str] = {}
        for cell, cell_draws in _read_part(path, results.config):
            key = ResultsFile.key(cell)
            if not results.done(*key) and key not in cells:
                cells[key] = cell
                draws.update(cell_draws)
        if cells:  # one locked rewrite of results.json per part, not one per cell
            results.add_all(list(cells.values()), draws)
            added += len(cells)
        path.unlink()
    if added:
        logger.info("merged %d cells from other ranks into %s", added, results.path)
    return added


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
    return results.cells if rank == 0 else ResultsFile(results.path, results.config).cells


def pending_cells(results: ResultsFile, cells: Sequence[CellKey]) -> list[CellKey]:
    """The cells not yet in ``results``, in order."""
    return [cell for cell in cells if not results.done(*cell)]
