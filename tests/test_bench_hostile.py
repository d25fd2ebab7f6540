"""The bench on a damaged or shared --out-dir and a hostile dataset folder: a damaged part file is set aside with a
warning, never merged; --plan reads results.json as the run does and counts the images the run cannot read; a
dataset's CSV names no image outside its folder; a merge beside a running job loses no cell."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from conftest import run_prolip

from prolip import standin
from prolip.bench import shards
from prolip.bench.config import BenchConfig
from prolip.bench.data import read_image_dataset
from prolip.bench.estimate import estimate_bench
from prolip.bench.results import ResultsFile, read_results
from prolip.bench.runner import run_bench
from prolip.bench.shards import CellWriter, merge_parts, open_results
from prolip.errors import InputError, ProLIPError, ProLIPWarning

CONFIG = {"setting": "few-shot", "model": "m"}
DRAW, DIGEST = "d/train-seed1-1shot", "ab" * 32
FAST = {"views": 2, "epochs": 3, "seeds": [1], "verbose": False}


def cell(seed: int = 1, **changes) -> dict:
    return {
        "dataset": "d", "shots": 1, "seed": seed, "method": "zero-shot", "accuracy": {"d": 0.5}, "fit_seconds": 0.1,
        "info": {}, **changes,
    }  # fmt: skip


def line(record) -> str:
    return json.dumps(record)


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"x": value}
    return value


@pytest.fixture(scope="module")
def suite(mini_suite, tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    mini_suite.make_suite(root, seed=0, train=4, val=3, test=3)
    return root


def config(data_root, out, **kw) -> BenchConfig:
    args = {"data_root": data_root, "out_dir": out, "model": standin.MODEL_NAME, "pretrained": standin.PRETRAINED_TAG}
    args.update(templates=standin.TEMPLATES, datasets=["eurosat"], shots=[1], methods=["zero-shot"])
    return BenchConfig(setting="few-shot", **{**args, **FAST, **kw})


# ---------------------------------------------------------------------------- part files
HEADER = line({"config": CONFIG})
GOOD = line({"cell": cell(3), "draws": {DRAW: DIGEST}})


@pytest.mark.parametrize(
    ("lines", "fault"),
    [
        # A draw's digest that is a number: merged, it made results.json unreadable to every later run.
        ([HEADER, GOOD, line({"cell": cell(2), "draws": {"d/x": 5}})], "line 3: its draws has 'd/x': 5, not a draw"),
        ([HEADER, GOOD, line({"cell": cell(2), "draws": [DIGEST]})], "line 3: its draws is a list"),
        ([HEADER, GOOD, line({"cell": cell(2), "draws": {DRAW: "cd" * 32}})], "computed on draw"),  # other data
        ([HEADER, GOOD, line({"cell": 3, "draws": {}})], "line 3: its cell is a int"),
        ([HEADER, GOOD, line({"cell": cell(2, shots="1"), "draws": {}})], "line 3: its cell has shots='1'"),
        ([HEADER, GOOD, line({"cell": cell(2, fit_seconds=10**400), "draws": {}})], "not a number of seconds"),
        ([HEADER, GOOD, line({"cell": cell(2, info=nested(100)), "draws": {}})], "nested more than 16 levels"),
        ([HEADER, GOOD, line([1, 2])], "line 3 is not an object of a cell"),
        ([HEADER, GOOD, "[" * 100_000 + "]" * 100_000], "line 3 is JSON nested too deeply"),
        ([HEADER, GOOD, b"\xff\xfe\x00 bytes"], "line 3 is not UTF-8 text"),
        ([HEADER, GOOD, "not json", GOOD], "line 3 is not JSON"),
        ([line([1]), GOOD], "line 1 is not the configuration"),
        ([GOOD, GOOD], "line 1 is not the configuration"),  # its header lost: the race of a merge beside a writer
    ],
)
def test_a_damaged_part_is_set_aside_with_a_warning_and_never_merged(tmp_path, lines, fault):
    path = tmp_path / "results.json"
    CellWriter(open_results(path, CONFIG, rank=0), rank=0)(cell(1), {DRAW: DIGEST})
    part = tmp_path / "results.part-rank1-host-7.jsonl"
    part.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    with pytest.warns(ProLIPWarning) as caught:
        assert merge_parts(ResultsFile(path, CONFIG)) == 0
    (message,) = [str(w.message) for w in caught]
    assert str(part) in message and fault in message and "\n" not in message, message
    assert not part.exists() and part.with_name(part.name + ".bad").exists()  # out of every later merge
    # results.json holds nothing a run refuses, and nothing of the part (not even its good lines).
    assert [c["seed"] for c in read_results(path)["cells"]] == [1] and read_results(path)["draws"] == {DRAW: DIGEST}
    assert merge_parts(ResultsFile(path, CONFIG)) == 0


def test_a_part_that_is_not_a_regular_file_is_set_aside(tmp_path):
    path = tmp_path / "results.json"
    (tmp_path / "results.part-rank1-host-7.jsonl").mkdir()
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("not a part")
    (tmp_path / "results.part-rank2-host-7.jsonl").symlink_to(outside)
    with pytest.warns(ProLIPWarning, match="not a regular file") as caught:
        assert merge_parts(ResultsFile(path, CONFIG)) == 0
    assert len(caught) == 2 and outside.read_text() == "not a part"
    assert not list(tmp_path.glob(shards.PART_GLOB))


def test_a_run_beside_a_damaged_part_goes_on_and_the_next_run_reads_its_results(suite, tmp_path):
    out = tmp_path / "out"
    run_bench(config(suite, out))
    stale = cell(2, dataset="eurosat", accuracy={"eurosat": 0.5})
    part = out / "results.part-rank1-host-7.jsonl"
    identity = read_results(out / "results.json")["config"]
    bad = {"cell": {**stale, "seed": 3}, "draws": {"eurosat/train-seed3-1shot": 5}}  # a digest that is a number
    part.write_text(f"{line({'config': identity})}\n{line({'cell': stale, 'draws': {}})}\n{line(bad)}\n")
    with pytest.warns(ProLIPWarning, match="damaged bench part file"):
        cells = run_bench(config(suite, out, seeds=[1, 2]))
    # The part's cell is not taken from it: the run trained it (another accuracy than the part's made-up one).
    assert sorted(c["seed"] for c in cells) == [1, 2] and next(c for c in cells if c["seed"] == 2) != stale
    assert len(run_bench(config(suite, out, seeds=[1, 2]))) == 2  # the next run reads its results.json


def test_a_cell_appended_while_a_plain_run_merges_the_parts_is_kept(tmp_path, monkeypatch):
    """A plain ``prolip bench`` started beside a torchrun job merges the job's live parts (``open_results``). The
    interleaving that dropped a cell: the merge reads rank 1's part, rank 1 appends a cell, the merge deletes the
    part. Rank 1's append here runs in a thread started just after the merge's reading, and the merge goes on once
    that append is done or waits for the lock the merge holds."""
    path = tmp_path / "results.json"
    results = open_results(path, CONFIG, rank=0)
    rank1 = CellWriter(results, rank=1)
    rank1(cell(1), {DRAW: DIGEST})
    waiting, appending = threading.Event(), []
    lock = getattr(shards, "results_lock", None)  # what a writer waits on while the merge holds it

    def locking(target):
        if threading.current_thread() in appending:
            waiting.set()
        return lock(target)

    def append():
        rank1(cell(2), {DRAW: DIGEST})
        waiting.set()

    read = shards._read_part

    def read_then_append(*args, **kwargs):
        found = read(*args, **kwargs)
        if not appending:
            appending.append(threading.Thread(target=append))
            appending[0].start()
            assert waiting.wait(60)
        return found

    if lock is not None:
        monkeypatch.setattr(shards, "results_lock", locking)
    monkeypatch.setattr(shards, "_read_part", read_then_append)
    merge_parts(ResultsFile(path, CONFIG))
    appending[0].join(60)
    merge_parts(ResultsFile(path, CONFIG))  # the job's own merge, at its end
    assert sorted(c["seed"] for c in read_results(path)["cells"]) == [1, 2]


# ---------------------------------------------------------------------------- --plan
@pytest.mark.parametrize(
    ("content", "fault"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"format": "prolip-bench", "config": {}, "cells": []}\xff', "cannot read"),
        (b'{"format": "prolip-bench", "format_version": 1, "config": {}, "cells": {"a": 1}}', "'cells' is not a list"),
        (b'{"format": "prolip-bench", "format_version": 1, "config": {}, "cells": [], "draws": {"x": 5}}', "'draws'"),
    ],
)
def test_the_plan_reads_a_damaged_results_file_as_the_run_does(suite, tmp_path, content, fault):
    (tmp_path / "results.json").write_bytes(content)
    with pytest.raises(InputError) as plan:
        estimate_bench(config(suite, tmp_path), probe=False)
    with pytest.raises(InputError) as run:
        run_bench(config(suite, tmp_path))
    assert str(plan.value) == str(run.value) and fault in str(plan.value) and "\n" not in str(plan.value)
    args = ["bench", "few-shot", "--data-root", str(suite), "--datasets", "eurosat", "--shots", "1", "--seeds", "1",
            "--model", standin.MODEL_NAME, "--pretrained", standin.PRETRAINED_TAG, "--out-dir", str(tmp_path),
            "--plan"]  # fmt: skip
    done = run_prolip(*args)
    assert done.returncode == 1 and done.stderr.splitlines() == [f"prolip bench: error: {plan.value}"], done.stderr


@pytest.mark.parametrize("cached", [False, True])
def test_the_plan_counts_the_images_the_run_cannot_read(suite, tmp_path, cached):
    root = tmp_path / "data"
    shutil.copytree(suite / "eurosat", root / "eurosat")
    split = json.loads((root / "eurosat" / "split_zhou_EuroSAT.json").read_text())
    images = root / "eurosat" / "2750"
    gone, garbage, folder = (images / split["test"][i][0] for i in range(3))
    gone.unlink()
    garbage.write_bytes(b"not an image")
    folder.unlink()
    folder.mkdir()
    if cached:  # with a cache, the plan also looks up each image in its index (by the file's bytes)
        (tmp_path / "out" / "cache").mkdir(parents=True)
    plan = estimate_bench(config(root, tmp_path / "out"), probe=False)
    assert set(plan.unreadable) == {str(gone), str(garbage), str(folder)}
    plain = next(s for s in plan.settings if s.views == 0)
    assert plain.unreadable == 3 and plain.missing == plain.images - 3 and plain.cached == 0
    report = plan.report()
    assert "unreadable images: 3" in report and f"{plain.images - 3} passes, 3 unreadable" in report
    with pytest.raises(ProLIPError, match="|".join(str(p.name) for p in (gone, garbage, folder))):
        run_bench(config(root, tmp_path / "out"))  # the run refuses what the plan counted


# ---------------------------------------------------------------------------- a dataset's own CSV files
@pytest.mark.parametrize("row", ["../../outside.png", "OUTSIDE", "train/../../../outside.png", "b/../../outside.png"])
def test_a_dataset_csv_naming_an_image_outside_its_folder_is_refused_naming_the_line(tmp_path, row):
    from PIL import Image

    root = tmp_path / "data" / "mine"
    for name in ("a/0.png", "b/0.png", "a/1.png"):
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / "images" / name)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    row = str(outside) if row == "OUTSIDE" else row
    (root / "train.csv").write_text(f"path,label\nimages/a/0.png,a\n\n{row},b\nimages/a/1.png,a\n")
    (root / "test.csv").write_text("images/a/0.png,a\nimages/b/0.png,b\n")
    with pytest.raises(InputError) as info:
        read_image_dataset(root)
    message = str(info.value)
    assert f"{str(root / 'train.csv')!r} line 4" in message and repr(row) in message and "\n" not in message
    done = run_prolip("bench", "few-shot", "--data-root", str(root.parent), "--datasets", "mine", "--shots", "1",
                      "--seeds", "1", "--methods", "zero-shot", "--model", standin.MODEL_NAME, "--pretrained",
                      standin.PRETRAINED_TAG, "--out-dir", str(tmp_path / "out"), "--views", "2", "--epochs", "2")  # fmt: skip
    assert done.returncode == 1 and "line 4" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out" / "draws").exists()  # refused before any draw is written


def test_a_dataset_csv_may_name_its_own_images_by_absolute_path(tmp_path):
    from PIL import Image

    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    for name in ("0.png", "1.png"):
        Image.new("RGB", (8, 8)).save(root / "images" / name)
    (root / "train.csv").write_text(f"{root / 'images' / '0.png'},a\nimages/1.png,b\n")
    dataset = read_image_dataset(root)
    assert [Path(item.path) for item in dataset.train] == [root / "images" / "0.png", root / "images" / "1.png"]
