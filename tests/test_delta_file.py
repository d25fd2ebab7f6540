"""Untrusted delta files: each kind of damage is a DeltaFileError naming the file; nothing is executed."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import colour_images, edit_delta, tiny_adapter
from safetensors import safe_open
from safetensors.torch import save_file

import prolip
from prolip import DeltaFileError, FingerprintMismatchError, ProLIPAdapter
from prolip.files.delta import MAX_HEADER_BYTES, read_state, write_delta
from prolip.training.fitted import CLASSIFIER_KEY, CONFIG_SCHEMA, FittedState


@pytest.fixture(scope="module")
def fitted(checkpoints) -> ProLIPAdapter:
    images, labels = colour_images(2)
    return tiny_adapter(checkpoints["vit"], epochs=2).fit(images, labels)


@pytest.fixture(scope="module")
def valid(fitted, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("delta") / "valid.safetensors"
    fitted.save(path)
    return path


def _contents(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _expect(path: Path, match: str, error: type[Exception] = DeltaFileError, **load_kw) -> None:
    """Both the reader and ProLIPAdapter.load refuse ``path`` with a message naming it."""
    with pytest.raises(error, match=match) as info:
        read_state(path)
    assert repr(str(path)) in str(info.value)
    with pytest.raises(error, match=match):
        ProLIPAdapter.load(path, trust_file_model=True, **load_kw)


def test_the_valid_file_loads(valid, fitted):
    contents = read_state(valid)
    assert torch.equal(contents.delta, fitted.delta_)  # bit-for-bit: a stored tensor read back
    assert contents.classes == ("blue", "green", "red") and contents.reg_lambda == fitted.reg_lambda_
    loaded = ProLIPAdapter.load(valid, trust_file_model=True, verbose=False)
    assert loaded.base_fingerprint_ == fitted.base_fingerprint_


@pytest.mark.parametrize("keep", [0, 5, 8, 100, "header", "-1"])
def test_truncated(valid, tmp_path, keep):
    data = valid.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    size = {"header": 8 + n, "-1": len(data) - 1}.get(keep, keep)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:size])
    _expect(path, "too short|truncated|corrupt")


@pytest.mark.parametrize(
    "damage",
    [
        lambda h: h.replace(b'"__metadata__"', b'"__metadata__'),  # broken JSON
        lambda h: h.replace(b"{", b"[", 1),
        lambda h: b"\xff\xfe" + h[2:],  # not UTF-8
        lambda h: h.replace(b'"F32"', b'"Q99"', 1),  # unknown dtype
        lambda h: h.replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1),  # overlapping data
    ],
)
def test_corrupted_header(valid, tmp_path, damage):
    data = valid.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = damage(data[8 : 8 + n])
    header = header + b" " * (n - len(header)) if len(header) < n else header[:n]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data[:8] + header + data[8 + n :])
    _expect(path, "could not be read as a safetensors delta file|inconsistent contents")


def test_huge_declared_header(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}" + b"\0" * 64)
    _expect(path, r"declared header of 4611686018427387904 bytes.*truncated, corrupted, or another format")
    # Even a file that really is that long is refused before the header is read.
    with open(path, "r+b") as f:
        f.truncate(MAX_HEADER_BYTES + 1024)
        f.seek(0)
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
    _expect(path, f"declared header of {MAX_HEADER_BYTES + 1} bytes")


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_pickle_renamed_to_safetensors(tmp_path, kind):
    path = tmp_path / "model.safetensors"
    payload = {"visual.proj": torch.zeros(48, 24)}
    if kind == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path)
    _expect(path, "another format such as a pickle")


def test_wrong_tensor_shapes(valid, tmp_path, fitted):
    key = fitted.backbone.projector.key
    cases = {
        "1-D delta": lambda t: t.update({key: t[key].flatten()}),
        "classifier rows": lambda t: t.update({CLASSIFIER_KEY: t[CLASSIFIER_KEY][:2]}),
        "empty": lambda t: t.update({key: torch.zeros(0, 24)}),
        "float16": lambda t: t.update({key: t[key].half()}),
        "extra tensor": lambda t: t.update({"payload": torch.zeros(3)}),
        "missing tensor": lambda t: t.pop(CLASSIFIER_KEY),
    }
    for name, change in cases.items():
        path = edit_delta(valid, tmp_path / f"{name}.safetensors", tensors=change)
        _expect(path, "inconsistent contents|holds tensors")
    # Well-formed on its own, but not the shape of this model's projector: only load can tell.
    path = edit_delta(valid, tmp_path / "t.safetensors", tensors=lambda t: t.update({key: t[key].t().contiguous()}))
    read_state(path)
    with pytest.raises(DeltaFileError, match=r"delta for visual\.proj of shape \(24, 48\).*\(48, 24\)"):
        ProLIPAdapter.load(path, trust_file_model=True)
    path = edit_delta(valid, tmp_path / "w.safetensors", tensors=lambda t: t.update({CLASSIFIER_KEY: torch.ones(3, 7)}))
    with pytest.raises(DeltaFileError, match="classifier of width 7"):
        ProLIPAdapter.load(path, trust_file_model=True)


def test_nan_values(valid, tmp_path, fitted):
    key = fitted.backbone.projector.key
    path = edit_delta(valid, tmp_path / "n.safetensors", tensors=lambda t: t[key].view(-1).__setitem__(3, float("nan")))
    _expect(path, "NaN or Inf")


@pytest.mark.parametrize(
    ("missing", "where"),
    [("fingerprint", "config"), ("classes", "config"), ("projector_key", "config"), ("format", "meta"),
     ("format_version", "meta"), ("kind", "meta"), ("config", "meta")],
)  # fmt: skip
def test_missing_metadata_keys(valid, tmp_path, missing, where):
    path = edit_delta(valid, tmp_path / "m.safetensors", **{where: lambda m: m.pop(missing)})
    _expect(path, rf"lacks prolip metadata \['{missing}'\].*(Re-save|original file)")


def test_no_metadata_at_all(valid, tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file(_contents(valid)[1], str(path))
    _expect(path, "lacks prolip metadata")


def test_unknown_future_format_version(valid, tmp_path):
    path = edit_delta(valid, tmp_path / "v4.safetensors", meta=lambda m: m.update(format_version="4"))
    _expect(path, r"format version 4, newer than this prolip understands \(3\); upgrade prolip")
    for bad in ("0", "-1", "one", "9" * 5000):
        path = edit_delta(valid, tmp_path / "vx.safetensors", meta=lambda m, bad=bad: m.update(format_version=bad))
        _expect(path, "format_version")


def test_format_1_was_never_released_and_is_refused(valid, tmp_path):
    path = edit_delta(valid, tmp_path / "v1.safetensors", meta=lambda m: m.update(format_version="1"))
    _expect(path, r"format_version 1, which no released prolip wrote; this prolip reads versions \[2, 3\]")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("format", "other-delta", "has format 'other-delta'"),
        ("kind", "pickle", "'kind': expected one of"),
        ("config", "[not json", "malformed metadata 'config'"),
        ("config", "[" * 100_000 + "]" * 100_000, "malformed metadata 'config'"),  # parser recursion
        ("config", "[1, 2]", "'config': expected a JSON object"),
    ],
)
def test_malformed_header(valid, tmp_path, key, value, match):
    path = edit_delta(valid, tmp_path / "bad.safetensors", meta=lambda m: m.update({key: value}))
    _expect(path, match)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("classes", {"a": 1}, "'classes': expected a non-empty list of distinct"),
        ("classes", ["red", "red", "blue"], "'classes': expected a non-empty list of distinct"),
        ("classes", [["a"], "b", "c"], "'classes'"),
        ("classes", [], "'classes'"),
        ("class_names", ["a", "b"], "'class_names': expected a JSON list of 3 strings"),
        ("class_names", [1, 2, 3], "'class_names'"),
        ("templates", "a photo of a {}.", "'templates'"),
        ("templates", [], "'templates'"),
        ("hyperparameters", [1, 2], "'hyperparameters': expected a JSON object"),
        ("n_shots", math.nan, "'n_shots': expected a finite positive number"),
        ("n_shots", True, "'n_shots'"),
        ("logit_scale", -100, "'logit_scale'"),
        ("logit_scale", "lots", "'logit_scale': expected a positive number"),
        ("projector_key", CLASSIFIER_KEY, "'projector_key'"),
        ("model_name", 3, "'model_name': expected a string"),
        ("fingerprint", {"precision": "fp32"}, "'fingerprint'"),
        ("selection", {"lr": 1}, "'selection': expected None or a JSON object with lr"),
        (
            "selection",
            {"lr": 1, "reg_lambda": 0, "lrs": [1], "reg_lambdas": [0], "val_accuracy": [[0.5, 0.5]]},
            "'selection'",
        ),
        ("cache", {"alpha": 1.0}, "is of kind 'projector' but holds another kind's contents|'cache'"),
    ],
)
def test_malformed_configuration(valid, tmp_path, key, value, match):
    path = edit_delta(valid, tmp_path / "bad.safetensors", config=lambda c: c.update({key: value}))
    _expect(path, match)


def test_configuration_keys_of_a_newer_prolip_are_warned_about_and_ignored(valid, tmp_path, fitted):
    path = edit_delta(valid, tmp_path / "newer.safetensors", config=lambda c: c.update(new_field=[1], other=2))
    with pytest.warns(UserWarning, match=r"configuration keys this prolip does not know, \['new_field', 'other'\]"):
        loaded = ProLIPAdapter.load(path, trust_file_model=True, verbose=False)
    assert torch.equal(loaded.delta_, fitted.delta_)  # bit-for-bit: the stored tensor read back


def test_the_same_fit_writes_the_same_bytes(checkpoints, tmp_path):
    images, labels = colour_images(2)
    for name in ("a", "b"):  # two fits in one process, from the same parameters and data
        tiny_adapter(checkpoints["vit"], epochs=2).fit(images, labels).save(tmp_path / f"{name}.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_the_file_holds_its_kind_and_one_json_configuration(valid, fitted):
    meta, tensors = _contents(valid)
    assert set(meta) == {"format", "format_version", "kind", "prolip_version", "config"}
    assert (meta["format"], meta["format_version"], meta["kind"]) == ("prolip-delta", "3", "projector")
    config = json.loads(meta["config"])
    assert set(config) == set(CONFIG_SCHEMA) and config == fitted.fitted_.config()
    assert set(tensors) == {CLASSIFIER_KEY, fitted.backbone.projector.key}


def _other_base(config: dict, part: str) -> None:
    """Edit the recorded fingerprint as if another W0 (``part="projector"``) or trunk (``"tower"``) made it."""
    config["fingerprint"][part]["sums"][0] += 1.0


@pytest.mark.parametrize(
    ("part", "what"), [("projector", "projector W0 differs"), ("tower", "vision tower before it differs")]
)
def test_delta_for_a_different_base_model(valid, tmp_path, fitted, part, what):
    path = edit_delta(valid, tmp_path / "other.safetensors", config=lambda c: _other_base(c, part))
    read_state(path)  # the file itself is fine; it does not fit this base model
    with pytest.raises(
        FingerprintMismatchError, match=rf"trained on a different base model: its .*{what}.*strict=False"
    ) as info:
        ProLIPAdapter.load(path, trust_file_model=True)
    assert repr(str(path)) in str(info.value) and fitted.base_fingerprint_.summary() in str(info.value)
    with pytest.warns(UserWarning, match="different base model"):
        loaded = ProLIPAdapter.load(path, strict=False, trust_file_model=True, verbose=False)
    assert loaded.predict(colour_images(1)[0]).shape == (3,)


def test_missing_file_or_directory(tmp_path):
    _expect(tmp_path / "nothing.safetensors", "does not exist")
    _expect(tmp_path, "does not exist")


def test_write_errors_name_the_path(fitted, tmp_path):
    with pytest.raises(
        DeltaFileError, match=r"cannot write delta file '.*no/such/folder/d\.safetensors'.*folder exists"
    ):
        fitted.save(tmp_path / "no" / "such" / "folder" / "d.safetensors")
    with pytest.raises(DeltaFileError, match="is a directory"):
        fitted.save(tmp_path)
    assert os.listdir(tmp_path) == []


def test_saved_file_permissions_follow_the_umask(fitted, tmp_path):
    old = os.umask(0o022)
    try:
        fitted.save(tmp_path / "d.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "d.safetensors").stat().st_mode & 0o777 == 0o644


def test_write_delta_round_trips_every_field(tmp_path, valid):
    contents = read_state(valid)
    write_delta(tmp_path / "copy.safetensors", contents)
    copy = read_state(tmp_path / "copy.safetensors")
    for field in dataclasses.fields(FittedState):
        mine, theirs = getattr(copy, field.name), getattr(contents, field.name)
        same = (  # bit-for-bit: every field written and read back
            torch.equal(mine, theirs)
            if isinstance(mine, torch.Tensor)
            else np.array_equal(mine, theirs)
            if isinstance(mine, np.ndarray)
            else mine == theirs
        )
        assert same, field.name


# ---------------------------------------------------------------------------- nothing executes
_FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
_FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def _violations(source: str, filename: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in _FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _FORBIDDEN_MODULES:
            found.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            kwargs = {k.arg: k.value for k in node.keywords}
            if isinstance(func, ast.Name) and name in _FORBIDDEN_CALLS:
                found.append(f"{where} calls {name}()")
            elif name == "load" and ast.unparse(func) in ("torch.load", "load"):
                safe = kwargs.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    found.append(f"{where} calls torch.load without weights_only=True")
            elif name in ("load", "loads") and "allow_pickle" in kwargs:
                value = kwargs["allow_pickle"]
                if not (isinstance(value, ast.Constant) and value.value is False):
                    found.append(f"{where} calls {ast.unparse(func)} with allow_pickle")
            elif name in ("load", "loads") and ast.unparse(func).split(".")[0] in _FORBIDDEN_MODULES:
                found.append(f"{where} calls {ast.unparse(func)}")
            elif name == "load" and ast.unparse(func) == "torch.jit.load":
                found.append(f"{where} calls torch.jit.load")
    return found


def test_scanner_catches_what_it_should():
    bad = (
        "import pickle\nfrom joblib import load\nimport torch\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
        "eval('1')\nexec('x')\nnp.load(f, allow_pickle=True)\ntorch.jit.load(f)\n"
    )
    assert [int(v.split(":")[1].split()[0]) for v in _violations(bad, "bad.py")] == [1, 2, 4, 5, 6, 7, 8, 9]
    assert _violations("import torch\ntorch.load(f, weights_only=True)\nnp.load(f)\nmodel.eval()\n", "ok.py") == []


def test_package_never_unpickles_or_evaluates():
    root = Path(prolip.__file__).parent
    sources = sorted(root.rglob("*.py"))
    assert len(sources) > 5
    found = [v for path in sources for v in _violations(path.read_text(encoding="utf-8"), str(path.relative_to(root)))]
    assert found == []


# ---------------------------------------------------------------------------- files from before
FIXTURES = Path(__file__).parent / "fixtures" / "main-f8a78c0"


@pytest.mark.parametrize(
    "name", ["projector", "text", "taskres", "tip_adapter", "linear_adapter"], ids=lambda name: name
)
def test_files_written_by_main_before_the_engine_load_and_predict_the_same(name):
    """Delta files of every kind written by prolip at f8a78c0 (tests/fixtures/main-f8a78c0/make.py) still load, onto
    the model they record, and predict what that prolip predicted with them."""
    from prolip import ProLIPTipAdapter
    from prolip.variants.linear_adapter import ModelRLA

    path = FIXTURES / f"{name}.safetensors"
    expected = np.asarray(json.loads((FIXTURES / "expected.json").read_text())[f"{name}.safetensors"])
    loader = {"tip_adapter": ProLIPTipAdapter.load, "linear_adapter": ModelRLA.load}.get(name, ProLIPAdapter.load)
    loaded = loader(path, verbose=False, device="cpu")
    images, _ = colour_images(1, seed=5)
    got = loaded.predict_proba(images)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)  # float rounding of the same computation
    assert list(loaded.classes_) == ["blue", "green", "red"]
