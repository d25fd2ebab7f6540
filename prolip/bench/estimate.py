"""``prolip bench --plan``: what a run will do, before it does it, and how long its extraction will take here.

The plan lists the run's feature sets (:func:`~prolip.bench.workload.feature_requests`) and counts,
per view setting (a feature cache folder), the distinct images it reads and how many of them the
cache already holds (images the cache's index does not know yet count as missing: the plan decodes
no image), the images the run cannot read (a file that is missing or unreadable, or whose header
Pillow does not recognise as an image: the run stops at the first of them), the trunk passes left
(one per view of each missing image), the cache's size on disk (its entries, plus the view-major
*pack* written for every feature set read: :class:`~prolip.features.cache.CachedFeatures`), the
cells to train per method (``results.json`` read and checked as the run reads it:
:func:`~prolip.bench.results.read_results`), and an estimated extraction time from a short probe of
the trunk on this machine (``passes / (P × rate)`` for P processes). Nothing is written but the
probe's own throwaway features, in memory.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from prolip.bench.config import BenchConfig
from prolip.bench.data import Item
from prolip.bench.methods import get_method
from prolip.bench.results import ResultsFile, read_results
from prolip.bench.settings import plan
from prolip.bench.store import FeatureStore
from prolip.bench.workload import feature_requests, job_cells
from prolip.errors import ProLIPError
from prolip.features.cache import check_storage
from prolip.features.extract import extract_features
from prolip.model.backbone import Backbone, build_backbone

PROBE_IMAGES, PROBE_VIEWS = 4, 4


@dataclass(frozen=True)
class ViewSetting:
    """One view setting's images: ``views`` augmented views seeded by ``seed`` (0: the plain view)."""

    views: int
    seed: int
    images: int
    cached: int
    unreadable: int = 0

    @property
    def rows(self) -> int:
        """Rows (trunk passes) per image."""
        return max(self.views, 1)

    @property
    def missing(self) -> int:
        """Images to extract: neither cached nor unreadable."""
        return self.images - self.cached - self.unreadable


@dataclass
class BenchPlan:
    """The figures of a bench run (see the module's docstring).

    Attributes:
        settings: per view setting, distinct images and how many are cached.
        pack_rows: rows in the packs of every feature set read (one set per problem and split).
        width: stored values per row (the trunk's output width).
        value_bytes: bytes per stored value (2 for the fp16 cache).
        cells: cells to train, per method.
        done: cells already in ``results.json``.
        passes_per_second: the trunk's measured throughput here (augmented views), None if not probed.
        probe: what the probe ran, in words.
        unreadable: each image file the run cannot read, and why (the run stops at the first).
    """

    settings: list[ViewSetting]
    pack_rows: int
    width: int
    value_bytes: int
    cells: Mapping[str, int] = field(default_factory=dict)
    done: int = 0
    passes_per_second: float | None = None
    probe: str = ""
    unreadable: Mapping[str, str] = field(default_factory=dict)

    @property
    def images(self) -> int:
        """Distinct images to extract (summed over view settings)."""
        return sum(s.missing for s in self.settings)

    @property
    def passes(self) -> int:
        """Trunk passes left: one per view of each missing image."""
        return sum(s.missing * s.rows for s in self.settings)

    @property
    def cache_bytes(self) -> int:
        """The cache's size on disk once the run is done: entries and packs (headers left out)."""
        rows = sum(s.images * s.rows for s in self.settings) + self.pack_rows
        return rows * self.width * self.value_bytes

    @property
    def cached_bytes(self) -> int:
        """The entries already on disk (packs left out)."""
        return sum(s.cached * s.rows for s in self.settings) * self.width * self.value_bytes

    def seconds(self, processes: int = 1) -> float | None:
        """Estimated extraction time with ``processes`` devices like this one: passes / (P × rate)."""
        return None if not self.passes_per_second else self.passes / (processes * self.passes_per_second)

    def report(self, processes: int = 1) -> str:
        """The plan as text: one figure a line."""
        lines = ["prolip bench plan (a dry run: nothing extracted or trained)"]
        for s in self.settings:
            what = f"{s.views} views, seed {s.seed}" if s.views else "plain view"
            unreadable = f", {s.unreadable} unreadable" if s.unreadable else ""
            lines.append(f"  {what}: {s.images} images, {s.cached} cached, {s.missing * s.rows} passes{unreadable}")
        lines.append(f"images to extract: {self.images} ({self.passes} trunk passes)")
        if self.unreadable:
            path, reason = next(iter(self.unreadable.items()))
            lines.append(
                f"unreadable images: {len(self.unreadable)}: the run stops at the first it reaches; replace or "
                f"remove them (e.g. {path!r}: {reason})"
            )
        lines.append(f"cells to train: {sum(self.cells.values())} ({self.done} already done)")
        lines += [f"  {name}: {count}" for name, count in self.cells.items()]
        lines.append(f"feature cache on disk: {_size(self.cache_bytes)} when done, {_size(self.cached_bytes)} exists")
        if self.passes_per_second:
            lines.append(f"trunk throughput here: {self.passes_per_second:.1f} passes/s ({self.probe})")
            for p in sorted({1, processes}):
                lines.append(f"estimated extraction time with {p} such device(s): {_duration(self.seconds(p))}")
            lines.append("with P devices like it: passes / (P × throughput); training is not included")
        return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError  # unreachable: TB ends the loop


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def probe_throughput(backbone: Backbone, *, batch_size: int = 64, images: int = PROBE_IMAGES) -> float:
    """Trunk passes per second of augmented views on ``backbone``'s device, from random images.

    One warm-up pass, then ``images`` images × :data:`PROBE_VIEWS` views timed, as the bench
    extracts them (decoding left out).
    """
    gen = torch.Generator().manual_seed(0)
    side = backbone.draft_size
    pixels = [torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=gen) for _ in range(images)]
    extract_features(backbone, pixels[:1], 1, seed=0, batch_size=batch_size, verbose=False)  # warm-up
    if backbone.device.type == "cuda":
        torch.cuda.synchronize(backbone.device)
    start = time.perf_counter()
    extract_features(backbone, pixels, PROBE_VIEWS, seed=0, batch_size=batch_size, verbose=False)
    if backbone.device.type == "cuda":
        torch.cuda.synchronize(backbone.device)
    return images * PROBE_VIEWS / (time.perf_counter() - start)


def unreadable_image(path: str) -> str | None:
    """Why the run could not read the image file ``path`` (missing, unreadable, or a header Pillow does not
    recognise as an image), or None. Only the header is read: nothing is decoded."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - the header is parsed on open; its size is all the plan asks of it
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        return f"{type(exc).__name__}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
    return None


def estimate_bench(config: BenchConfig, probe: bool = True) -> BenchPlan:
    """The plan of :func:`~prolip.bench.runner.run_bench` of the same ``config`` (see :class:`BenchPlan`).

    ``probe=False`` skips the throughput probe. The datasets' file lists are read; images (their headers), the
    results file and the cache are only looked at.

    Raises:
        InputError: as the run: a missing or malformed dataset, or a damaged ``results.json`` (one line naming it).
    """
    shots, seeds, methods, views = config.shots, config.seeds, config.methods, config.views
    test_views = [get_method(name).test_views for name in methods]
    backbone = build_backbone(config.model, config.pretrained, precision=config.precision, device=config.device)
    out = Path(config.out_dir)
    root = Path(config.cache_dir) if config.cache_dir is not None else out / "cache"
    store = FeatureStore(backbone, root, batch_size=config.batch_size, verbose=False) if root.is_dir() else None
    jobs = list(plan(config.setting, config.data_root, config.datasets, config.source))
    done: set = set()
    if (out / "results.json").exists():
        # Checked as the run reads it; the configuration check is the run's: the plan counts any finished cell.
        done = {ResultsFile.key(c) for c in read_results(out / "results.json")["cells"]}
    cells = [c for job in jobs for c in job_cells(job, shots, seeds, methods) if c not in done]
    images: dict[tuple[int, int], dict[str, Item]] = {}  # per view setting, the distinct images by path
    pack_rows = 0
    for job in jobs:  # every feature set of the run, finished cells' too: what exists is what is cached
        for request in feature_requests(job, shots, seeds, views, test_views):
            images.setdefault((request.views, request.seed), {}).update((i.path, i) for i in request.items)
            pack_rows += len(request.items) * max(request.views, 1)
    checked: dict[str, str | None] = {}  # per image file, why the run cannot read it (None: it can)
    settings = []
    for (v, seed), distinct in images.items():
        for path in distinct.keys() - checked.keys():
            checked[path] = unreadable_image(path)
            if checked[path] is None and store is not None:
                try:
                    store.file_hash(path)  # what the cache's index is keyed by: the file's bytes
                except ProLIPError as exc:
                    checked[path] = str(exc)
        readable = [item for path, item in distinct.items() if checked[path] is None]
        missing = len(store.missing(readable, v, seed)) if store is not None else len(readable)
        settings.append(ViewSetting(v, seed, len(distinct), len(readable) - missing, len(distinct) - len(readable)))
    result = BenchPlan(
        settings=settings,
        pack_rows=pack_rows,
        width=backbone.projector.feature_width,
        value_bytes=check_storage("fp16").itemsize,
        cells=dict(Counter(name for *_, name in cells)),
        done=len(done),
        unreadable={path: reason for path, reason in sorted(checked.items()) if reason is not None},
    )
    if probe:
        result.passes_per_second = probe_throughput(backbone, batch_size=config.batch_size)
        result.probe = f"{PROBE_IMAGES} images × {PROBE_VIEWS} views of {config.model} on {backbone.device}"
    return result
