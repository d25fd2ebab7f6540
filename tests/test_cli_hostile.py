"""The command line on hostile files, folders and pipes: one line on stderr and status 1, never a traceback."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import torch
from conftest import colour_images, run_prolip

from prolip import ProLIPAdapter, standin
from prolip.bench import results
from prolip.errors import InputError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
MODEL = ["--model", standin.MODEL_NAME, "--pretrained", standin.PRETRAINED_TAG]


def prolip(*args: str) -> subprocess.CompletedProcess:
    return run_prolip(*args)


def one_line_error(done: subprocess.CompletedProcess, needle: str) -> None:
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in done.stderr, done.stderr


@pytest.fixture(scope="module")
def hostile_delta(tmp_path_factory):
    """A delta whose class names carry a terminal escape sequence and a newline."""
    images, labels = colour_images(2)
    names = {"red": "red\x1b[31m", "green": "gr\neen", "blue": "blue"}
    adapter = ProLIPAdapter(
        model=standin.MODEL_NAME, pretrained=standin.PRETRAINED_TAG, views=2, epochs=2, device="cpu", verbose=False
    )
    adapter.fit(images, [names.get(lb, lb) for lb in labels])
    path = tmp_path_factory.mktemp("delta") / "hostile.safetensors"
    adapter.save(path)
    return path


def test_info_escapes_control_characters_from_the_file(hostile_delta):
    done = prolip("info", str(hostile_delta))
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "red\\x1b[31m" in done.stdout and "gr\\neen" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("command", ["info", "predict"])
def test_a_closed_pipe_ends_quietly(hostile_delta, command, tmp_path):
    args = [str(hostile_delta)]
    if command == "predict":
        image = tmp_path / "x.png"
        from PIL import Image

        Image.new("RGB", (20, 20), (200, 10, 10)).save(image)
        args += [str(image)] * 3 + ["--json", "--quiet"]
    # The reader is gone before prolip writes a byte, as `| head -1` is after its line.
    proc = subprocess.Popen(
        [sys.executable, "-m", "prolip", command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV
    )
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(300) == 141 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_bench_folders_that_are_files_are_one_line_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bench = ["bench", "few-shot", "--data-root", str(tmp_path), "--datasets", "dtd", *MODEL, "--quiet"]
    one_line_error(prolip(*bench, "--out-dir", str(blocker)), "cannot create the folder")
    one_line_error(prolip(*bench, "--out-dir", str(tmp_path / "out"), "--cache-dir", str(blocker)), "feature cache")
    one_line_error(prolip(*bench, "--out-dir", str(tmp_path / "out"), "--batch-size", "0"), "batch_size=0 is invalid")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_one_line_error(hostile_delta, tmp_path):
    bench = ["bench", "few-shot", "--data-root", str(tmp_path), "--datasets", "dtd", *MODEL, "--quiet"]
    one_line_error(prolip(*bench, "--out-dir", str(tmp_path / "out"), "--device", "cuda"), "no CUDA GPU")
    one_line_error(prolip("predict", str(hostile_delta), str(hostile_delta), "--device", "cuda"), "no CUDA GPU")


def test_a_full_disk_while_writing_results_is_one_error_and_keeps_the_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    cell = {
        "dataset": "d",
        "shots": 1,
        "seed": 1,
        "method": "m",
        "accuracy": {"d": 1.0},
        "fit_seconds": 0.0,
        "info": {},
    }
    results.add_cells(path, {"a": 1}, [cell])
    before = path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(results, "atomic_write", full)
    with pytest.raises(InputError, match=r"cannot write the bench results .* free space"):
        results.add_cells(path, {"a": 1}, [{**cell, "seed": 2}])
    assert path.read_bytes() == before


def test_merge_refuses_a_taskres_fit(tmp_path):
    images, labels = colour_images(2)
    adapter = ProLIPAdapter(
        model=standin.MODEL_NAME, pretrained=standin.PRETRAINED_TAG, views=2, epochs=2, device="cpu", verbose=False,
        taskres_alpha=0.5,
    )  # fmt: skip
    adapter.fit(images, labels)
    path = tmp_path / "taskres.safetensors"
    adapter.save(path)
    one_line_error(
        prolip("merge", str(path), "--out", str(tmp_path / "m.safetensors")),
        "TaskRes: its residual lives in the stored classifier",
    )
