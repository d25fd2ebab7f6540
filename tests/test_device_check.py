"""benchmarks/device_check.py runs at tiny sizes on the CPU, and its JSON holds every figure a GPU run reports.

Figures are checked for presence, type and sign, never for their values (timings are not asserted); what only
a CUDA device can measure must be null with a reason, and every correctness check must pass.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
PARTS = ("extraction", "training", "grid", "test_time", "correctness", "torchrun")
CHECKS = ("fit_device_vs_cpu", "merged_model", "export_onnx", "export_pt2")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread


@pytest.fixture(scope="module")
def device_check():
    """The script as a module (it imports its sibling benchmark modules, so benchmarks/ goes on the path)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("device_check")
    finally:
        sys.path.remove(str(BENCHMARKS))


def strict_json(path: Path) -> dict[str, Any]:
    """The report, refusing NaN and infinities (strict JSON)."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in the JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def positive(value: Any) -> bool:
    """A finite number above zero (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def skipped_figures(entry: dict[str, Any], figures: list[str]) -> None:
    """Figures a CPU cannot measure: null, with the reason beside them."""
    assert all(entry[f] is None for f in figures), entry
    assert isinstance(entry["skipped"], str) and entry["skipped"], entry


def check_extraction(section: dict[str, Any]) -> None:
    assert section["views"] >= 1 and section["passes"] == section["views"] * section["images"]
    families = {name.split("-")[0] for name in section["models"]}
    assert families == {"ViT", "RN50"}, section["models"].keys()  # a transformer and a ResNet
    for name, model in section["models"].items():
        assert set(model["precisions"]) == {"fp32", "fp16", "bf16"}, name
        for precision, entry in model["precisions"].items():
            if precision != "fp32" and "skipped" in entry:  # a CPU kernel without half precision
                assert isinstance(entry["skipped"], str)
                continue
            assert positive(entry["extract_images_per_s"]) and positive(entry["encode_images_per_s"])
            assert entry["ratio"] == pytest.approx(entry["extract_images_per_s"] / entry["encode_images_per_s"])
            error = entry["feature_relative_error_vs_fp32"]
            assert error == 0.0 if precision == "fp32" else 0.0 <= error < 0.1, (name, precision, error)
            peak = entry["peak_memory"]
            skipped_figures(peak, ["model_bytes", "extract_features_bytes", "encode_image_bytes"])


def check_training(section: dict[str, Any]) -> None:
    assert (section["d_in"], section["d_out"]) == (768, 512)  # ViT-B's projector
    assert set(section["sizes"]) == {"10", "100", "1000"}
    for k, entry in section["sizes"].items():
        assert entry["n"] == section["shots"] * int(k) and entry["steps"] == section["steps"]
        assert all(positive(entry["seconds"][m]) for m in ("floor", "floor+adam", "prolip"))
        assert positive(entry["prolip_over_floor"]) and positive(entry["prolip_over_floor_adam"])
        assert positive(entry["floor_tflops"]) and positive(entry["step_gflop"])
        assert isinstance(entry["overhead_us_per_step"], float) and isinstance(entry["adam_us_per_step"], float)
        graph = entry["graph"]
        skipped_figures(
            graph,
            ["floor_seconds", "floor_adam_seconds", "eager_over_graphed_floor", "eager_over_graphed_floor_adam",
             "prolip_over_graphed_floor_adam"],
        )  # fmt: skip
        assert "CUDA" in graph["skipped"]
        assert graph["prolip_graphed"] is None and graph["prolip_graphed_skipped"]
        skipped_figures(entry["host_features"], ["pageable_over_device", "pinned_over_device"])


def check_grid(section: dict[str, Any]) -> None:
    assert section["points"] == 49
    assert positive(section["fits_seconds"]) and positive(section["search_seconds"])
    assert section["ratio"] == pytest.approx(section["search_seconds"] / section["fits_seconds"])


def check_test_time(section: dict[str, Any]) -> None:
    assert set(section["per_image_ms"]) == {"trunk", "views", "test-time", "adapt"}
    assert all(positive(v) for v in section["per_image_ms"].values())
    assert positive(section["throughput_vs_trunk"]) and positive(section["throughput_vs_views"])
    assert 0 < section["trunk_share"] <= 1


def check_correctness(section: dict[str, Any], onnx: bool) -> None:
    for what in CHECKS:
        entry = section[what]
        if what == "export_onnx" and not onnx:  # prolip[export] absent: recorded, not failed
            assert entry["skipped"] and entry["passed"] is None
            continue
        assert isinstance(entry["max_abs_difference"], float) and entry["max_abs_difference"] >= 0, what
        assert positive(entry["tolerance"]) and entry["passed"] is True, (what, entry)
    fit = section["fit_device_vs_cpu"]
    assert fit["probabilities"]["passed"] is True and fit["labels_equal"] is True
    assert fit["max_abs_delta"] > fit["tolerance"]  # the fit moved W by more than the tolerance
    merged = section["merged_model"]
    assert merged["adaptation_effect"] > merged["tolerance"]  # W0 alone would fail the check


def check_torchrun(section: dict[str, Any]) -> None:
    assert section["backend"] == "gloo" and section["nproc_per_node"] == 1  # no CUDA: Gloo
    assert section["joined_on"] == "cpu" and section["backend_confirmed"] is True
    assert isinstance(section["cells"], int) and section["cells"] > 0
    assert section["cells_equal"] is True and section["max_accuracy_difference"] == 0.0
    assert section["passed"] is True


CHECKERS = {
    "extraction": check_extraction, "training": check_training, "grid": check_grid, "test_time": check_test_time,
    "torchrun": check_torchrun,
}  # fmt: skip


def check_report(report: dict[str, Any], parts: tuple[str, ...]) -> None:
    """Every requested part's figures, and the others marked as not requested."""
    environment = report["environment"]
    assert environment["device"] == "cpu" and environment["tiny"] is True and positive(environment["total_seconds"])
    assert report["passed"] is True and report["failures"] == []
    for part in PARTS:
        section = report[part]
        if part not in parts:
            assert section == {"skipped": "not requested (--parts)"}
            continue
        assert "error" not in section, section.get("error")
        assert positive(section["elapsed_seconds"]) and positive(section["budget_seconds"])
        if part == "correctness":
            check_correctness(section, onnx=importlib.util.find_spec("onnxruntime") is not None)
        else:
            CHECKERS[part](section)


def test_every_part_but_torchrun_runs_in_process(device_check, tmp_path, capsys):
    out = tmp_path / "out.json"
    parts = tuple(p for p in PARTS if p != "torchrun")
    assert device_check.main(["--device", "cpu", "--tiny", "--json", str(out), "--parts", *parts]) == 0
    check_report(strict_json(out), parts)
    printed = capsys.readouterr().out
    assert "every check passed" in printed
    assert all(f"\n{part} " in printed for part in parts)  # one table, a row per figure and part


def test_a_cuda_run_without_cuda_is_refused(device_check):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        device_check.main(["--device", "cuda"])


@pytest.mark.slow
def test_the_tiny_cpu_command_writes_every_figure(mini_suite, tmp_path):
    """The acceptance command as a user runs it, torchrun (Gloo) included."""
    out = tmp_path / "out.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(BENCHMARKS / "device_check.py"), "--device", "cpu", "--tiny", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "every check passed" in done.stdout
    check_report(strict_json(out), PARTS)
