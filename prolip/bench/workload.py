"""What a bench run does, before it does it: its cells, and the feature sets it reads from the cache.

A cell is one method trained on one draw (dataset, N, seed); a problem is the draw the cells of one
(dataset, N, seed) share. For every problem with a cell to run, the run reads the draw's augmented
training views, its plain views and the validation draw's plain views; for every job with a cell to
run, the plain test views of each target (and the augmented test views of test-time methods).
:func:`feature_requests` lists them in the order the run reads them: the distributed run extracts
them up front (:mod:`prolip.bench.shards`), and ``prolip bench --plan`` counts them
(:mod:`prolip.bench.estimate`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prolip.bench.data import Item, draw_shots, draw_validation
from prolip.bench.settings import Job

TEST_VIEW_SEED = 0  # augmented test views (test-time methods) are the same for every draw

CellKey = tuple[str, int, int, str]
"""A cell: training dataset (job key), N, seed, method."""


@dataclass(frozen=True)
class FeatureRequest:
    """One image set under one view setting: ``views`` augmented views seeded by ``seed``, or the plain view (0)."""

    items: Sequence[Item]
    views: int
    seed: int
    what: str


def job_cells(job: Job, shots: Sequence[int], seeds: Sequence[int], methods: Sequence[str]) -> Iterator[CellKey]:
    """The cells of ``job`` in the order the run trains them: seeds, then N, then methods."""
    for seed in seeds:
        for n in shots:
            for name in methods:
                yield job.key, n, seed, name


def feature_requests(
    job: Job,
    shots: Sequence[int],
    seeds: Sequence[int],
    views: int,
    test_views: Sequence[int],
    wanted: Callable[[int, int], bool] = lambda n, seed: True,
) -> Iterator[FeatureRequest]:
    """The feature sets the run reads for ``job``: per problem ``(N, seed)`` that is ``wanted``, then the tests.

    ``test_views`` are the methods' numbers of augmented test views (0 for the plain view alone).
    Nothing is listed for a job without a wanted problem.
    """
    problems = [(n, seed) for seed in seeds for n in shots if wanted(n, seed)]
    for n, seed in problems:
        train, val = draw_shots(job.train, n, seed), draw_validation(job.train, n, seed)
        yield FeatureRequest(train.items, views, seed, f"{job.key} N={n} train")
        yield FeatureRequest(train.items, 0, 0, f"{job.key} N={n} train")
        yield FeatureRequest(val.items, 0, 0, f"{job.key} N={n} val")
    if not problems:
        return
    for target in job.targets:
        for v in sorted({0, *test_views}):
            yield FeatureRequest(target.dataset.test, v, TEST_VIEW_SEED if v else 0, f"{target.name} test")
