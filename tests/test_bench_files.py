"""The bench's own files under hostile or concurrent use: results.json merged under a lock and checked when
read, the data a run's cells were computed on recorded and checked on resume, draw files checked."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time

import pytest
from PIL import Image

from prolip import standin
from prolip.bench.config import BenchConfig
from prolip.bench.results import ResultsFile, add_cells, read_results
from prolip.bench.runner import run_bench
from prolip.bench.shards import CellWriter, merge_parts
from prolip.errors import InputError

FAST = {"views": 2, "epochs": 3, "seeds": [1], "verbose": False}
CONFIG = {"setting": "few-shot", "model": "m"}


def cell(method: str, shots: int = 1, seed: int = 1, dataset: str = "dtd") -> dict:
    return {
        "dataset": dataset, "shots": shots, "seed": seed, "method": method, "accuracy": {dataset: 0.5},
        "fit_seconds": 0.1, "info": {},
    }  # fmt: skip


@pytest.fixture(scope="module")
def suite(mini_suite, tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    mini_suite.make_suite(root, seed=0, train=4, val=3, test=3)
    return root


def bench(suite, out, **kw):
    args = {"data_root": suite, "out_dir": out, "model": standin.MODEL_NAME, "pretrained": standin.PRETRAINED_TAG}
    args.update(templates=standin.TEMPLATES, datasets=["eurosat"], shots=[1], methods=["zero-shot"])
    return run_bench(BenchConfig(setting="few-shot", **{**args, **FAST, **kw}))


def test_two_runs_sharing_results_json_keep_each_others_cells(tmp_path):
    # Both runs open the file before either writes, as two processes started together do.
    path = tmp_path / "results.json"
    first, second = ResultsFile(path, CONFIG), ResultsFile(path, CONFIG)
    for n in (1, 2, 4):
        first.add(cell("zero-shot", n))
        second.add(cell("prolip", n))
    cells = read_results(path)["cells"]
    assert sorted((c["method"], c["shots"]) for c in cells) == sorted(
        (m, n) for m in ("zero-shot", "prolip") for n in (1, 2, 4)
    )
    second.add(cell("zero-shot", 1))  # a cell both finished: the first copy is kept, not doubled
    assert len(read_results(path)["cells"]) == 6


def _add_many(path, method):
    for n in range(1, 21):
        add_cells(path, CONFIG, [cell(method, n)])


@pytest.mark.slow
def test_concurrent_processes_never_lose_a_cell(tmp_path):
    path = tmp_path / "results.json"
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_add_many, args=(path, m)) for m in ("a", "b", "c")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    assert len(read_results(path)["cells"]) == 60


def _append_as_rank_1(path, count, ready):
    """A torchrun job's rank 1: each finished cell appended to its part file (once the merges have begun)."""
    writer = CellWriter(ResultsFile(path, CONFIG), rank=1)
    while not ready.exists():
        time.sleep(0.01)
    for seed in range(count):
        writer(cell("prolip", seed=seed), {"dtd/train-seed1-1shot": "ab" * 32})


def _merge_until(path, ready, stop):
    """A plain ``prolip bench`` on the same --out-dir, merging the job's parts as it starts (again and again)."""
    while not stop.exists():
        merge_parts(ResultsFile(path, CONFIG))
        ready.touch()


@pytest.mark.slow
def test_a_plain_run_merging_the_parts_of_a_running_job_loses_no_cell(tmp_path):
    path, ready, stop = tmp_path / "results.json", tmp_path / "ready", tmp_path / "stop"
    ctx = multiprocessing.get_context("spawn")
    merger = ctx.Process(target=_merge_until, args=(path, ready, stop))
    merger.start()
    rank1 = ctx.Process(target=_append_as_rank_1, args=(path, 40, ready))
    rank1.start()
    rank1.join(120)
    stop.touch()
    merger.join(120)
    assert rank1.exitcode == 0 and merger.exitcode == 0
    merge_parts(ResultsFile(path, CONFIG))  # the job's own merge, at its end
    assert sorted(c["seed"] for c in read_results(path)["cells"]) == list(range(40))


@pytest.mark.parametrize(
    ("content", "fault"),
    [
        ("[]", "not a 'prolip-bench' file"),
        ("null", "not a 'prolip-bench' file"),
        ('{"format": "prolip-bench", "format_version": 1, "config": {}, "cells": {}}', "'cells' is not a list"),
        ('{"format": "prolip-bench", "format_version": 1, "config": {}, "cells": [3]}', r"cells\[0\] is a int"),
        ("CELL", "lacks"),
        ("SHOTS", "shots='abc'"),
        ("ACC", "accuracy="),
        ("SECONDS", "fit_seconds=None"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("{", "cannot read"),
    ],
)
def test_a_damaged_results_file_is_one_error_naming_it(tmp_path, content, fault):
    good = {"format": "prolip-bench", "format_version": 1, "config": CONFIG, "cells": [cell("prolip")]}
    changes = {"CELL": ("method", None), "SHOTS": ("shots", "abc"), "ACC": ("accuracy", {"dtd": "x"})}
    changes["SECONDS"] = ("fit_seconds", None)
    if content in changes:
        key, value = changes[content]
        if value is None and key == "method":
            del good["cells"][0][key]
        else:
            good["cells"][0][key] = value
        content = json.dumps(good)
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(InputError, match=fault) as info:
        ResultsFile(path, CONFIG)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_resume_on_other_data_is_refused_and_damaged_draws_are_rewritten(suite, tmp_path):
    out = tmp_path / "out"
    bench(suite, out)
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["data_root"] == str(suite) and "eurosat/train-seed1-1shot" in saved["draws"]
    other = tmp_path / "other"
    shutil.copytree(suite, other)
    with pytest.raises(InputError, match="another bench configuration"):
        bench(other, out)
    # Same root, an image of the draw rewritten with other pixels: the cells were computed on other data.
    draw = json.loads((out / "draws" / "eurosat" / "train-seed1-1shot.json").read_text())
    image = other / "eurosat" / draw["items"][0][0]
    Image.new("RGB", Image.open(image).size, (255, 0, 0)).save(image)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    saved["config"]["data_root"] = str(other)
    (moved / "results.json").write_text(json.dumps(saved))
    with pytest.raises(InputError, match="other data: draw 'eurosat/train-seed1-1shot'"):
        bench(other, moved)
    # A truncated draw file is rewritten on resume, not kept.
    path = out / "draws" / "eurosat" / "train-seed1-1shot.json"
    whole = path.read_text()
    path.write_text(whole[: len(whole) // 2])
    bench(suite, out, methods=["zero-shot", "prolip"])
    assert path.read_text() == whole


def _edited_suite(suite, tmp_path, split, keep):
    root = tmp_path / "edited"
    shutil.copytree(suite / "eurosat", root / "eurosat")
    path = root / "eurosat" / "split_zhou_EuroSAT.json"
    data = json.loads(path.read_text())
    data[split] = data[split][:keep]
    path.write_text(json.dumps(data))
    return root


def test_an_empty_validation_draw_skips_what_needs_it_with_a_warning_in_the_table(suite, tmp_path):
    root = _edited_suite(suite, tmp_path, "val", 0)  # 4 training images per class, all drawn at N=4
    cells = bench(root, tmp_path / "out", shots=[4], methods=["prolip", "prolip-val", "linear-probe:c=1"])
    assert sorted(c["method"] for c in cells) == ["linear-probe:c=1", "prolip"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "Warning: 1 cell(s) skipped" in table and "prolip-val on eurosat, N=4, seed 1" in table


def test_a_dataset_without_test_images_is_refused_before_any_work(suite, tmp_path):
    root = _edited_suite(suite, tmp_path, "test", 0)
    with pytest.raises(InputError, match="no test images"):
        bench(root, tmp_path / "out")
    assert not (tmp_path / "out" / "draws").exists()


@pytest.mark.parametrize(
    "spec",
    [
        "prolip:lr=abc",
        "prolip:reg_lambda=-5",
        "linear-probe:c=0",
        "clip-adapter:ratio=5",
        "tip-adapter-f:epochs=-1",
        "prolip+taskres:alpha=-1",
        "tip-adapter:alpha=1,beta=0",
        "test-time-prolip:rho=2",
        "prolip-val:lrs=[]",
    ],
)
def test_bad_method_arguments_are_refused_before_any_work(tmp_path, spec):
    from prolip.bench.methods import get_method

    key = spec.split(":")[1].split("=")[0]
    with pytest.raises(InputError, match=f"{key}=.* is invalid: it must be"):
        get_method(spec)
    with pytest.raises(InputError, match="is invalid"):
        bench(tmp_path / "no-data", tmp_path / "out", methods=["zero-shot", spec])
    assert not (tmp_path / "out").exists()
