"""The command line on hostile files, folders and pipes: one line on stderr and status 1, never a traceback."""

from __future__ import annotations

import errno
import logging
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


# ---------------------------------------------------------------------------- outputs that must not be written
@pytest.mark.parametrize("command", ["export", "merge"])
def test_no_command_writes_over_its_own_input(hostile_delta, tmp_path, command):
    copy = tmp_path / "d.safetensors"
    copy.write_bytes(hostile_delta.read_bytes())
    before = copy.read_bytes()
    (tmp_path / "sub").mkdir()
    for out in (copy, tmp_path / "sub" / ".." / "d.safetensors"):  # the same file through another path
        one_line_error(prolip(command, str(copy), "--out", str(out), "--quiet"), "itself: writing it would destroy")
    os.link(copy, tmp_path / "hard.safetensors")  # and through a hard link
    one_line_error(prolip(command, str(copy), "--out", str(tmp_path / "hard.safetensors")), "input")
    assert copy.read_bytes() == before


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_outputs_never_replace_links_or_fifos(hostile_delta, tmp_path, kind):
    target = tmp_path / "out.safetensors"
    if kind == "symlink":
        (tmp_path / "elsewhere").write_bytes(b"keep")
        target.symlink_to(tmp_path / "elsewhere")
        needle = "is a symbolic link"
    else:
        os.mkfifo(target)
        needle = "not a regular file"
    for args in (("merge", str(hostile_delta)), ("export", str(hostile_delta), "--format", "pt2")):
        one_line_error(prolip(*args, "--out", str(target)), needle)
    adapter = ProLIPAdapter.load(hostile_delta, verbose=False)
    with pytest.raises(InputError, match="not a regular file"):
        adapter.save(target)
    assert os.path.islink(target) if kind == "symlink" else os.path.exists(target)


def test_fit_checks_its_output_before_any_work(tmp_path, monkeypatch):
    from prolip import adapter as adapter_module

    def never(*args, **kwargs):
        raise AssertionError("features were extracted before the output path was checked")

    monkeypatch.setattr(adapter_module, "features_of", never)
    folder = tmp_path / "data"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        from PIL import Image

        Image.new("RGB", (8, 8), (200, 10, 10) if name == "a" else (10, 10, 200)).save(folder / name / "0.png")
    out = tmp_path / "missing" / "x.safetensors"
    one_line_error(prolip("fit", str(folder), *MODEL, "--out", str(out)), "does not exist; create it first")


# ---------------------------------------------------------------------------- a CLI that speaks CLI
def test_errors_name_flags_and_unknown_models_get_suggestions(tmp_path):
    from prolip.cli import _in_flags

    assert "--no-strict" in _in_flags("trained on a different base model ... or pass strict=False to apply it anyway.")
    assert _in_flags("Pass model= and pretrained= yourself, or trust_file_model=True if you trust the file.") == (
        "Pass --model and --pretrained yourself, or --trust-file-model if you trust the file."
    )
    folder = tmp_path / "data"
    from PIL import Image

    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (200, 10, 10) if name == "a" else (10, 10, 200)).save(folder / name / "0.png")
    done = prolip("fit", str(folder), "--model", "ViT-B32", "--pretrained", "openai", "--out", str(tmp_path / "d"))
    one_line_error(done, "unknown open_clip model 'ViT-B32'; did you mean 'ViT-B-32'")
    assert len(done.stderr) < 400  # a suggestion, not the list of every config


def test_shots_beyond_a_class_keep_n_whole(tmp_path):
    from prolip.datasets.generic import sample_shots

    paths = [f"{c}{i}.png" for c in "ab" for i in range(5 if c == "a" else 3)]
    labels = [p[0] for p in paths]
    with pytest.warns(UserWarning, match=r"class 'b' has only 3 images, fewer than 4 shots: drawing 3 per class"):
        _, chosen_labels = sample_shots(paths, labels, 4)
    assert chosen_labels.count("a") == chosen_labels.count("b") == 3


def test_quiet_or_a_log_turns_hugging_faces_progress_bars_off(monkeypatch):
    from prolip.cli import _configure_logging

    root, prolip_logger = logging.getLogger(), logging.getLogger("prolip")
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh process; pytest's own handlers are put back after
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(prolip_logger, "level", prolip_logger.level)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    _configure_logging(quiet=True, verbose=False)  # read by transformers and huggingface_hub when imported
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
