"""The prolip command line on a tiny image folder, run in-process through prolip.cli.main (conftest.run_prolip); one
test runs the entry point as a process."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_prolip
from PIL import Image

from prolip import ProLIPAdapter, standin
from prolip.files.delta import read_state
from prolip.model.local_models import add_to_open_clip


def prolip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``prolip ARGS`` (in this process) and return what the finished process would."""
    done = run_prolip(*args)
    if check and done.returncode != 0:
        raise AssertionError(f"prolip {args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


@pytest.mark.slow
def test_the_entry_point_runs_as_a_process(delta):
    """``python -m prolip`` (what the ``prolip`` script runs) as a separate process: output, status, one-line errors."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "prolip"]
    done = subprocess.run([*command, "info", str(delta)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout == prolip("info", str(delta)).stdout, done.stderr
    done = subprocess.run(
        [*command, "info", "missing.safetensors"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "does not exist" in done.stderr, done.stderr


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Class folders of 28x28 images: bright blobs at the top vs at the bottom."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, rows in (("top", slice(2, 12)), ("bottom", slice(16, 26))):
        (root / name).mkdir()
        for i in range(6):
            img = rng.integers(0, 40, size=(28, 28), dtype=np.uint8)
            img[rows, 6:22] = 230
            Image.fromarray(img).save(root / name / f"{i}.png")
    (root / "notes.txt").write_text("not an image folder")  # stray files are ignored
    return root


@pytest.fixture(scope="module")
def delta(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "blobs.safetensors"
    done = prolip(
        "fit",
        str(folder),
        "--model",
        standin.MODEL_NAME,
        "--pretrained",
        standin.PRETRAINED_TAG,
        "--shots",
        "4",
        "--views",
        "4",
        "--epochs",
        "30",
        "--lr",
        "1e-2",
        "--out",
        str(out),
        "--quiet",
    )
    assert done.stdout == "" and out.is_file()
    return out


def test_fit_info_predict_eval(folder, delta):
    info = prolip("info", str(delta)).stdout
    assert standin.MODEL_NAME in info and "bottom, top" in info and "shots per class:   4" in info
    assert ProLIPAdapter.load(delta, verbose=False).base_fingerprint_.summary() in info

    images = [str(folder / "top" / "5.png"), str(folder / "bottom" / "5.png")]
    rows = json.loads(prolip("predict", str(delta), *images, "--json", "--quiet").stdout)
    assert [r["image"] for r in rows] == images
    for row in rows:
        assert row["label"] in ("top", "bottom")
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    adapter = ProLIPAdapter.load(delta, verbose=False)
    proba = adapter.predict_proba(images)
    # Exact: the command runs the same ops on the same shapes.
    assert [r["label"] for r in rows] == adapter.predict(images).tolist()
    for row, p in zip(rows, proba, strict=True):
        assert [row["probabilities"][str(c)] for c in adapter.classes_] == pytest.approx(p.tolist(), abs=1e-6)
    plain = prolip("predict", str(delta), *images, "--quiet").stdout.splitlines()
    assert [line.split("\t")[1] for line in plain] == [r["label"] for r in rows]

    report = prolip("eval", str(delta), str(folder), "--quiet").stdout
    expected = adapter.score(
        [str(p) for p in sorted(folder.rglob("*.png"))], [p.parent.name for p in sorted(folder.rglob("*.png"))]
    )
    assert f"accuracy: {expected:.4f} (" in report
    assert "precision  recall      F1  support" in report and "confusion matrix" in report
    assert "zero-shot accuracy (the same model without the fit)" in report


def test_eval_reports_what_a_decision_needs_as_json_and_a_picture(folder, delta, tmp_path):
    from prolip.training.metrics import classification_report

    images = [str(p) for p in sorted(folder.rglob("*.png"))]
    truth = [os.path.basename(os.path.dirname(p)) for p in images]
    plot = tmp_path / "confusion.png"
    done = prolip("eval", str(delta), str(folder), "--json", "--plot", str(plot), "--quiet")
    report = json.loads(done.stdout)
    adapter = ProLIPAdapter.load(delta, verbose=False)
    predicted = [str(p) for p in adapter.predict(images)]
    expected = classification_report(truth, predicted, [str(c) for c in adapter.classes_]).as_dict()
    assert {k: report[k] for k in expected} == expected  # per class precision, recall, F1, support; macro; confusion
    assert report["images"] == len(images) and report["skipped"] == 0
    assert report["misclassified"] == [
        {"image": p, "true": t, "predicted": g} for p, t, g in zip(images, truth, predicted, strict=True) if t != g
    ]
    zero_shot = ProLIPAdapter.load(delta, verbose=False, epochs=0)
    zero_shot._set_fitted(dataclasses.replace(zero_shot.fitted_, delta=zero_shot.delta_ * 0))
    assert report["zero_shot_accuracy"] == pytest.approx(zero_shot.score(images, truth))  # W0 and the zero-shot T
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_plot_without_matplotlib_says_what_to_install_before_any_work(folder, delta, tmp_path, monkeypatch):
    import prolip.figures

    monkeypatch.setattr(prolip.figures, "pyplot", lambda: None)  # as where matplotlib is not installed
    done = run_prolip("eval", str(delta), str(folder), "--plot", str(tmp_path / "c.png"), "--quiet")
    assert done.returncode == 1 and done.stdout == ""  # no report: it stopped before evaluating
    assert done.stderr.strip() == 'prolip eval: error: --plot needs matplotlib: pip install "prolip[plot]"'


def test_predict_and_eval_skip_unreadable_images_on_request(folder, delta, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(folder, data, ignore=shutil.ignore_patterns("*.txt"))
    (data / "top" / "broken.png").write_bytes(b"not a png")
    stopped = prolip("eval", str(delta), str(data), "--quiet", check=False)
    assert stopped.returncode == 1 and "broken.png" in stopped.stderr
    kept = prolip("eval", str(delta), str(data), "--on-error", "skip", "--json", "--quiet")
    assert json.loads(kept.stdout)["skipped"] == 1 and kept.stderr.count("broken.png") == 1  # once, named
    lines = prolip("predict", str(delta), str(data), "--on-error", "skip", "--quiet").stdout.splitlines()
    assert len(lines) == 12 and not any("broken.png" in line for line in lines)  # each line its own image


def test_predict_and_eval_take_folders_csv_files_and_mixed_lists(folder, delta, tmp_path):
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(folder, photos / "nested")  # class folders one level deeper, and notes.txt
    (photos / "readme.md").write_text("not an image")
    expected = [str(p) for p in sorted(photos.rglob("*.png"))]
    done = prolip("predict", str(delta), str(photos), "--json")
    rows = json.loads(done.stdout)
    assert [r["image"] for r in rows] == expected  # recursively, image files only, sorted
    assert "skipped 2 files that are not image files" in done.stderr
    adapter = ProLIPAdapter.load(delta, verbose=False)
    assert [r["label"] for r in rows] == adapter.predict(expected).tolist()

    listed = tmp_path / "some.csv"
    listed.write_text("path\n" + "".join(f"{os.path.relpath(p, tmp_path)}\n" for p in expected[:3]))
    single = str(folder / "top" / "0.png")
    mixed = prolip("predict", str(delta), single, str(listed), str(photos / "nested" / "top"), "--quiet")
    lines = mixed.stdout.splitlines()
    order = [single, *expected[:3], *(p for p in expected if "/nested/top/" in p)]
    assert [line.split("\t")[0] for line in lines] == order
    assert [line.split("\t")[1] for line in lines] == adapter.predict(order).tolist()

    labelled = tmp_path / "labelled.csv"
    labelled.write_text("".join(f"{p},{p.parent.name}\n" for p in sorted((folder / "top").glob("*.png"))))
    report = prolip("eval", str(delta), str(folder / "top" / ".."), str(labelled), "--quiet").stdout
    paths = [str(p) for p in sorted(folder.rglob("*.png"))] + [str(p) for p in sorted((folder / "top").glob("*.png"))]
    labels = [os.path.basename(os.path.dirname(p)) for p in paths]
    n = len(paths)
    assert f"accuracy: {adapter.score(paths, labels):.4f} (" in report and f"/{n})" in report


def test_fit_in_the_official_fp16_numerics_with_lambda_one_over_n_squared(folder, tmp_path):
    out = tmp_path / "fp16.safetensors"
    common = ["--model", standin.MODEL_NAME, "--pretrained", standin.PRETRAINED_TAG, "--shots", "4", "--views", "2"]
    prolip("fit", str(folder), *common, "--epochs", "5", "--lr", "1e-5", "--reg-lambda", "1/N^2", "--train-dtype", "fp16",
           "--out", str(out), "--quiet")  # fmt: skip
    assert "lambda used:       0.0625" in prolip("info", str(out)).stdout  # 1/N² with N = 4
    state = read_state(out)
    assert state.hyperparameters["train_dtype"] == "fp16" and state.hyperparameters["reg_lambda"] == "1/N^2"
    adapter = ProLIPAdapter.load(out, verbose=False)
    assert adapter.train_dtype == "fp16"
    w0 = adapter.backbone.projector.parameter.detach().float()
    trained = w0 + adapter.delta_  # fp16 values: W − W0 and back are exact (Sterbenz), so W is as training stored it
    assert torch.equal(trained, trained.half().float())
    assert (trained == w0.half().float()).float().mean() > 0.1  # many updates rounded away: W0 in fp16


def test_merge_gives_an_open_clip_checkpoint(delta, tmp_path):
    import open_clip

    out = tmp_path / "merged.safetensors"
    prolip("merge", str(delta), "--out", str(out), "--quiet")
    add_to_open_clip(standin.MODEL_NAME)
    merged = open_clip.create_model(standin.MODEL_NAME, pretrained=str(out))
    base = open_clip.create_model(standin.MODEL_NAME, pretrained=str(standin.checkpoint_path()))
    delta_file = read_state(delta)
    # The projector is exactly W0 + delta from the file, in fp32; everything else is the base model. Bit-for-bit:
    # the same elementwise fp32 addition (correctly rounded, the same on every CPU), and copies of the rest.
    assert merged.visual.proj.dtype == torch.float32
    assert torch.equal(merged.visual.proj, base.visual.proj.float() + delta_file.delta)
    assert delta_file.delta.abs().max() > 0
    for (name, a), (_, b) in zip(merged.state_dict().items(), base.state_dict().items(), strict=True):
        assert name == "visual.proj" or torch.equal(a, b.to(a.dtype)), name
    half = tmp_path / "half.safetensors"
    done = prolip("merge", str(delta), "--out", str(half), "--precision", "fp16", "--quiet")
    assert "PrecisionWarning" in done.stderr and "relative error is" in done.stderr
    assert (out.stat().st_mode & 0o777) == (half.stat().st_mode & 0o777) == 0o666 & ~_umask()


def test_csv_input_and_user_errors(folder, tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(folder.rglob("*.png"))))
    out, again, cache = tmp_path / "csv.safetensors", tmp_path / "again.safetensors", tmp_path / "cache"
    common = ("--model", standin.MODEL_NAME, "--pretrained", standin.PRETRAINED_TAG, "--views", "2", "--epochs", "3")
    prolip("fit", str(csv), *common, "--cache-dir", str(cache), "--out", str(out), "--quiet")
    entries = sorted(p for p in cache.rglob("*") if p.is_file())
    assert entries  # the training views went into the cache
    stamps = [p.stat().st_mtime_ns for p in entries]
    prolip("fit", str(csv), *common, "--cache-dir", str(cache), "--out", str(again), "--quiet")
    assert [p.stat().st_mtime_ns for p in entries] == stamps  # reused, not rewritten
    # bit-for-bit: both fits train on the same fp16 features read back from the cache: the same ops and shapes
    assert torch.equal(read_state(out).delta, read_state(again).delta)

    for args, needle in (
        (("fit", str(tmp_path / "missing"), "--out", str(tmp_path / "x.safetensors")), "does not exist"),
        (("info", str(csv)), "not a valid safetensors file"),
        (("predict", str(out), str(tmp_path / "nope.png"), "--quiet"), "nope.png"),
    ):
        done = prolip(*args, check=False)
        assert done.returncode == 1, done
        assert needle in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_export_writes_a_standalone_classifier(folder, delta, tmp_path):
    from prolip.features.images import load_images
    from prolip.features.views import plain_views
    from prolip.files.export import load_exported_program

    out = tmp_path / "blobs.pt2"
    done = prolip("export", str(delta), "--format", "pt2", "--out", str(out))
    assert "blobs.pt2.json" in done.stdout
    adapter = ProLIPAdapter.load(delta, verbose=False)
    images = [str(p) for p in sorted(folder.rglob("*.png"))][:4]
    pixels = plain_views(load_images(images), adapter.backbone.view_config)
    probabilities = load_exported_program(out).module()(pixels).detach().numpy()
    assert np.abs(probabilities - adapter.predict_proba(images)).max() <= 1e-4
    described = json.loads((tmp_path / "blobs.pt2.json").read_text())
    assert described["classes"] == ["bottom", "top"]
    assert described["preprocessing"]["size"] == adapter.backbone.view_config.size
    done = prolip("export", str(delta), "--format", "tflite", "--out", str(out), check=False)
    assert done.returncode == 1 and "invalid choice: 'tflite'" in done.stderr


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ("fit", ".", "--out", "x.safetensors", "--reg-lambda", "abc"),
            "--reg-lambda: 'abc' is not 'auto', '1/N^2' or a number",
        ),
        (("fit", ".", "--out", "x.safetensors", "--reg-lambda", "-1"), "finite number >= 0"),
        (("fit", ".", "--out", "x.safetensors", "--epochs", "many"), "--epochs: invalid int value"),
        (("fit", ".", "--out", "x.safetensors", "--train-dtype", "bf16"), "invalid choice: 'bf16'"),
        (("fit", "."), "required: --out"),
        (("merge", "d.safetensors", "--out", "m.safetensors", "--precision", "fp8"), "invalid choice: 'fp8'"),
        (("train",), "invalid choice: 'train'"),
    ],
)
def test_argument_errors_are_one_line_and_status_1(args, needle):
    done = prolip(*args, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_open_clip_chatter_only_with_verbose(delta, folder):
    image = str(folder / "top" / "5.png")
    quiet = prolip("predict", str(delta), image)
    loud = prolip("predict", str(delta), image, "--verbose")
    assert quiet.stdout == loud.stdout
    assert "Loaded" not in quiet.stderr and "open_clip" not in quiet.stderr.lower()
    assert "Loaded" in loud.stderr or "model config" in loud.stderr.lower()


@pytest.mark.parametrize(
    "command", ["fit", "predict", "eval", "info", "models", "bench", "merge", "export", "import-official"]
)
def test_every_subcommand_has_help_with_an_example(command):
    done = run_prolip(command, "--help")
    assert done.returncode == 0
    text = done.stdout
    assert "example:" in text and f"prolip {command}" in text


def test_models_lists_supported_configs_by_family(monkeypatch, capsys):
    import open_clip

    from prolip.cli import main

    # Three real configs stand for open_clip's whole list (the full sweep is scripts/list_models.py).
    monkeypatch.setattr(open_clip, "list_models", lambda: ["RN50", "ViT-B-32", "ViT-B-16-SigLIP", "no-such-config"])
    assert main(["models", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "modified_resnet (1): RN50" in out and "vit (1): ViT-B-32" in out and "timm_map (1): ViT-B-16-SigLIP" in out
    assert "3 of 4 open_clip configs supported, 0 refused, 1 not buildable offline" in out
    assert "no-such-config" not in out.split("supported, by tower family:")[1].split("3 of 4")[0]  # not listed
    assert main(["models", "--all", "--quiet"]) == 0
    listed = capsys.readouterr().out
    assert "not buildable offline here (1):\n  no-such-config: " in listed  # apart from the supported ones
    assert main(["models", "--json", "--all", "--quiet"]) == 0
    rows = {row["name"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["no-such-config"]["status"] == "unbuildable"
    assert rows["ViT-B-16-SigLIP"]["residual"] is True and rows["RN50"]["key"] == "visual.attnpool.c_proj.weight"


def test_fit_reports_held_out_accuracy_and_searches_lr_and_lambda_on_it(folder, tmp_path):
    from prolip import ProLIPSearch

    common = ["--model", standin.MODEL_NAME, "--pretrained", standin.PRETRAINED_TAG, "--shots", "3", "--views", "2",
              "--epochs", "5", "--val", str(folder)]  # fmt: skip
    plain = prolip("fit", str(folder), *common, "--out", str(tmp_path / "plain.safetensors"))
    fitted = ProLIPAdapter.load(tmp_path / "plain.safetensors", verbose=False)
    images = [str(p) for p in sorted(folder.rglob("*.png"))]
    truth = [os.path.basename(os.path.dirname(p)) for p in images]
    assert f"accuracy on {folder}: {fitted.score(images, truth):.4f} (12 images)" in plain.stdout
    searched = prolip("fit", str(folder), *common, "--search", "--out", str(tmp_path / "search.safetensors"))
    loaded = ProLIPSearch.load(tmp_path / "search.safetensors", verbose=False)
    chosen = loaded.best_params_
    assert f"chose lr={chosen['lr']:g}, lambda={chosen['reg_lambda']:g}" in searched.stdout
    assert len(loaded.cv_results_["lrs"]) * len(loaded.cv_results_["reg_lambdas"]) == 49  # the paper's grid
    refused = prolip(
        "fit", str(folder), *common[:-2], "--search", "--out", str(tmp_path / "x.safetensors"), check=False
    )
    assert refused.returncode == 1 and "--search chooses lr and λ on --val" in refused.stderr


def test_main_called_from_python_leaves_the_processs_warnings_as_it_found_them(tmp_path):
    import warnings

    from prolip.cli import main

    # main() logs warnings while it runs (logging.captureWarnings); left on, the next main() in the process could not
    # turn it on again and its warnings would go wherever the first caller's went (a notebook's, a test's recorder).
    before = warnings.showwarning
    assert main(["info", str(tmp_path / "missing.safetensors"), "--quiet"]) == 1
    assert warnings.showwarning is before
