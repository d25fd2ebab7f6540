"""``torchrun -m prolip bench``: two Gloo processes on CPU give the cells of one process; part files merge once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from prolip import standin
from prolip.bench.results import ResultsFile
from prolip.bench.shards import CellWriter, deal, merge_parts, open_results
from prolip.errors import InputError

CONFIG = {"setting": "few-shot", "model": "m"}


@pytest.fixture(scope="module")
def suite(mini_suite, tmp_path_factory):
    """Two datasets in CoOp's layout, 4 train, 3 val and 3 test images per class (as tests/test_bench.py)."""
    root = tmp_path_factory.mktemp("suite")
    mini_suite.make_suite(root, seed=0, train=4, val=3, test=3)
    return root


def _bench(suite, out, seeds, processes=1):
    templates = out.parent / "templates.txt"
    templates.write_text("a photo of a {}.\n")
    args = ["bench", "few-shot", "--data-root", str(suite), "--datasets", "dtd", "eurosat", "--shots", "1", "2",
            "--seeds", *map(str, seeds), "--methods", "zero-shot", "prolip", "linear-probe", "--model",
            standin.MODEL_NAME, "--pretrained", standin.PRETRAINED_TAG, "--out-dir", str(out), "--views", "2",
            "--epochs", "5", "--templates", str(templates)]  # fmt: skip
    launcher = ["-m", "prolip"]
    if processes > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *launcher]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *launcher, *args], env=env, capture_output=True, text=True, timeout=400)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    return {ResultsFile.key(c): c for c in json.loads((out / "results.json").read_text())["cells"]}, log


@pytest.mark.slow
def test_two_gloo_processes_give_the_cells_of_one_and_resume(suite, tmp_path):
    one, _ = _bench(suite, tmp_path / "one", seeds=[1, 2])
    two, log = _bench(suite, tmp_path / "two", seeds=[1, 2], processes=2)
    assert len(one) == 2 * 2 * 2 * 3 and set(two) == set(one)  # every cell once (keys are unique)
    # Both ranks extracted a share of the missing images, and both trained cells (rank 1's came through its part).
    shares = dict(map(int, m) for m in re.findall(r"rank (\d) of 2 computed (\d+) images", log))
    assert set(shares) == {0, 1} and all(shares.values()), log[-3000:]
    assert "merged 12 cells from other ranks" in log
    assert not list((tmp_path / "two").glob("results.part-*"))
    for key, cell in one.items():
        # Same draws, the same cached features (fp16, computed by another process in other batches), the same
        # training: accuracies are multiples of 1/30 and agree exactly; trained hyperparameters are recorded as is.
        assert two[key]["accuracy"] == pytest.approx(cell["accuracy"], abs=1e-9), key
        assert two[key]["info"] == cell["info"], key
    for draw in (tmp_path / "one" / "draws").rglob("*.json"):
        assert (tmp_path / "two" / draw.relative_to(tmp_path / "one")).read_text() == draw.read_text()
    # A rerun with one more seed trains only that seed's cells; the others keep their values (and timings).
    more, _ = _bench(suite, tmp_path / "two", seeds=[1, 2, 3], processes=2)
    assert len(more) == 36 and all(more[k] == two[k] for k in two)


def test_parts_merge_once_and_a_cut_line_is_dropped(tmp_path):
    results = open_results(tmp_path / "results.json", CONFIG, rank=0)
    cell = {"dataset": "d", "shots": 1, "method": "zero-shot", "accuracy": {"d": 0.5}, "fit_seconds": 0.0, "info": {}}
    CellWriter(results, rank=0)({**cell, "seed": 1})  # rank 0 writes results.json itself
    part = CellWriter(results, rank=1)
    for seed in (1, 2, 3):  # seed 1 twice: as if a part had outlived its merge
        part({**cell, "seed": seed})
    with open(part.part, "a") as f:  # the line a killed rank was writing
        f.write('{"dataset": "d", "shots": 1, "se')
    assert merge_parts(results) == 2 and not part.part.exists()
    assert sorted(c["seed"] for c in json.loads(results.path.read_text())["cells"]) == [1, 2, 3]
    part({**cell, "seed": 3})
    assert merge_parts(results) == 0  # nothing written twice
    stale = json.dumps({"config": {**CONFIG, "model": "other"}}) + "\n" + json.dumps({**cell, "seed": 4}) + "\n"
    (tmp_path / "results.part-rank1-host-1.jsonl").write_text(stale)  # left by a run of another configuration
    with pytest.raises(InputError, match="another bench configuration"):
        open_results(tmp_path / "results.json", CONFIG, rank=0)


def test_cells_are_dealt_round_robin():
    cells = [("d", n, s, m) for s in (1, 2) for n in (1, 2, 4) for m in ("a", "b", "c")]
    shares = [deal(cells, rank, 4) for rank in range(4)]
    assert set().union(*shares) == set(cells) and sum(map(len, shares)) == len(cells)
    assert [len(s) for s in shares] == [5, 5, 4, 4]
    assert deal(cells, 0, 1) == set(cells)


def test_the_plan_counts_what_the_run_then_does(suite, tmp_path, capsys):
    from prolip.bench.config import BenchConfig
    from prolip.bench.estimate import estimate_bench
    from prolip.bench.runner import run_bench
    from prolip.cli import main

    kw = {"data_root": suite, "out_dir": tmp_path, "model": standin.MODEL_NAME, "pretrained": standin.PRETRAINED_TAG}
    kw |= {"datasets": ["dtd", "eurosat"], "shots": [1, 2], "seeds": [1], "methods": ["zero-shot", "prolip"]}
    kw |= {"views": 2}
    before = estimate_bench(BenchConfig(setting="few-shot", **kw), probe=False)
    assert not (tmp_path / "cache").exists()  # a dry run writes nothing
    assert before.cells == {"zero-shot": 4, "prolip": 4} and before.done == 0
    assert all(s.cached == 0 for s in before.settings) and before.cached_bytes == 0
    run_bench(BenchConfig(setting="few-shot", **kw, epochs=3, templates=standin.TEMPLATES, verbose=False))
    # Each view setting's folder holds one entry per image the plan counted, and the cache's size is the plan's.
    folders = {}
    for settings in (tmp_path / "cache").rglob("settings.json"):
        key = json.loads(settings.read_text())
        folders[key["views"], key["seed"]] = len(list(settings.parent.glob("entries/*/*.safetensors")))
    assert folders == {(s.views, s.seed): s.images for s in before.settings}
    files = [p for p in (tmp_path / "cache").rglob("*.safetensors")]
    on_disk = sum(p.stat().st_size for p in files)
    assert before.cache_bytes <= on_disk <= before.cache_bytes + 1024 * len(files)  # headers aside
    after = estimate_bench(BenchConfig(setting="few-shot", **kw), probe=False)
    assert after.passes == 0 and after.images == 0 and after.cells == {} and after.done == 8
    assert after.cached_bytes == sum(s.images * s.rows for s in before.settings) * after.width * after.value_bytes
    # The command line prints the figures, with an estimated time from the probe.
    args = ["bench", "few-shot", "--data-root", str(suite), "--datasets", "dtd", "--shots", "1", "--seeds", "5",
            "--model", standin.MODEL_NAME, "--pretrained", standin.PRETRAINED_TAG, "--out-dir", str(tmp_path),
            "--views", "2", "--plan"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "2 views, seed 5: 10 images, 0 cached, 20 passes" in printed  # a new 1-shot draw of 10 classes
    assert "estimated extraction time with 1 such device(s)" in printed and "passes/s" in printed
