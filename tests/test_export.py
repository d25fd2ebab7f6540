"""A standalone exported classifier (ONNX with onnxruntime, torch.export) gives predict_proba's probabilities."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import zipfile

import numpy as np
import pytest
import torch
from conftest import colour_images, missing, tiny_adapter

from prolip import InputError, UnsupportedModelError
from prolip.features.views import plain_views
from prolip.files.export import load_exported_program

try:
    import onnx
    import onnxruntime
except ImportError as exc:  # scripts/setup.sh installs the export extra
    missing("prolip[export] (onnx, onnxruntime, onnxscript)", str(exc))

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread

TOLERANCE = 1e-4  # probabilities; the exported graph reorders float32 ops (s·Tᵀ baked, fused kernels)


def pixels_and_images(adapter):
    """Red, green and blue images of various sizes, and the preprocessed pixels [3, 3, H, W] predict_proba makes of them."""
    size = adapter.backbone.view_config.size
    images = [image[:, : size + 5 * i, :size] for i, image in enumerate(colour_images(1, seed=3, size=size + 10)[0])]
    return plain_views(images, adapter.backbone.view_config), images


@pytest.fixture(scope="module", params=["vit", "modified_resnet", "timm_linear"])
def adapter(request, checkpoints):
    # A strong delta (λ = 0, a large step), so that the exported file without it would be far off.
    params = {"views": 2, "epochs": 30, "lr": 5e-2, "reg_lambda": 0.0}
    return tiny_adapter(checkpoints[request.param], request.param, **params).fit(*colour_images(2))


@pytest.mark.parametrize("format", ["pt2", "onnx"])
def test_the_exported_file_reproduces_predict_proba(adapter, format, tmp_path):
    pixels, images = pixels_and_images(adapter)
    expected = adapter.predict_proba(images)
    zero_shot = tiny_adapter(adapter.pretrained, model=adapter.model, epochs=0).fit(*colour_images(2))
    assert np.abs(expected - zero_shot.predict_proba(images)).max() > 1e-2  # W0 alone would fail the check
    model, sidecar = adapter.export(tmp_path / f"classifier.{format}", format)
    assert sidecar.name == f"classifier.{format}.json"  # named after its file: the other format's is its own
    if format == "pt2":
        program = load_exported_program(model)
        run = program.module()
        outputs = [run(batch).detach().numpy() for batch in (pixels, pixels[:1])]
        names = list(program.state_dict)
        assert "scaled_classes" in names  # s·Tᵀ, and the vision tower's weights alone: no text tower
        assert all(name.startswith("visual.") for name in names if name != "scaled_classes")
    else:
        session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        (name,) = [i.name for i in session.get_inputs()]
        outputs = [session.run(None, {name: batch.numpy()})[0] for batch in (pixels, pixels[:1])]
        loaded = onnx.load(str(model))
        graph = loaded.graph
        assert not any("text" in i.name or "token_embedding" in i.name for i in graph.initializer)
        assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in graph.initializer)  # one file
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        inside = json.loads({p.key: p.value for p in loaded.metadata_props}["prolip"])
        assert inside == {k: v for k, v in json.loads(sidecar.read_text()).items() if k != "sha256"}
    # Dynamic batch: 3 images and 1 through the same file.
    assert np.abs(outputs[0] - expected).max() <= TOLERANCE
    assert np.abs(outputs[1] - expected[:1]).max() <= TOLERANCE
    described = json.loads(sidecar.read_text())
    config = adapter.backbone.view_config
    assert described["classes"] == adapter.classes_.tolist() and described["class_names"] == adapter.class_names_
    assert described["input"]["shape"] == ["batch", 3, config.size, config.size]
    prep = described["preprocessing"]
    assert (prep["size"], tuple(prep["mean"]), tuple(prep["std"])) == (config.size, config.mean, config.std)
    assert (prep["resize_mode"], prep["interpolation"]) == (config.resize_mode, config.interpolation)
    assert described["format"] == format and described["file"] == model.name
    assert described["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert (described["model"], described["pretrained"]) == adapter.backbone.recorded
    assert prep["alpha_background"] == [255, 255, 255] and prep["antialias"] and prep["kernel"] == config.interpolation


def test_a_tower_that_cannot_be_exported_is_refused_by_name(checkpoints, monkeypatch, tmp_path):
    adapter = tiny_adapter(checkpoints["vit"], views=1, epochs=1).fit(*colour_images(1))

    def untraceable(*args, **kwargs):
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr(torch.export, "export", untraceable)
    with pytest.raises(UnsupportedModelError, match=r"vision tower VisionTransformer \(vit.*cannot be exported to pt2"):
        adapter.export(tmp_path / "x.pt2", "pt2")
    assert not (tmp_path / "x.pt2").exists() and not (tmp_path / "x.pt2.json").exists()
    with pytest.raises(InputError, match="not one of"):
        adapter.export(tmp_path / "x.tflite", "tflite")
    with pytest.raises(InputError, match=r"ends in \.json"):
        adapter.export(tmp_path / "x.json", "pt2")
    with pytest.raises(InputError, match=r"names a onnx file but the format is pt2; use '.*x\.pt2' or --format onnx"):
        adapter.export(tmp_path / "x.onnx", "pt2")


def test_both_formats_side_by_side_keep_their_own_descriptions(checkpoints, tmp_path):
    adapter = tiny_adapter(checkpoints["vit"], views=1, epochs=1).fit(*colour_images(1))
    _, onnx_json = adapter.export(tmp_path / "m.onnx", "onnx")
    _, pt2_json = adapter.export(tmp_path / "m.pt2", "pt2")
    assert json.loads(onnx_json.read_text())["format"] == "onnx" and json.loads(pt2_json.read_text())["format"] == "pt2"
    program = load_exported_program(tmp_path / "m.pt2")
    assert program is not None
    with zipfile.ZipFile(tmp_path / "m.pt2") as archive:
        (inside,) = [n for n in archive.namelist() if n.endswith("extra/prolip.json")]
        described = json.loads(archive.read(inside))
    assert described["classes"] == adapter.classes_.tolist() and described["format"] == "pt2"


def _rewritten(source, target, change):
    """A copy of the zip archive ``source`` at ``target`` with ``change(name, data) -> data`` applied to each entry."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            new.writestr(info, change(info.filename, old.read(info.filename)))
    return target


@pytest.mark.parametrize("part", ["weights", "sample_inputs"])
def test_a_pt2_archive_whose_loading_would_unpickle_is_refused(checkpoints, tmp_path, part):
    adapter = tiny_adapter(checkpoints["vit"], views=1, epochs=1).fit(*colour_images(1))
    model, _ = adapter.export(tmp_path / "m.pt2", "pt2")

    class Payload:
        def __reduce__(self):  # what a crafted archive would run at load
            return (print, ("owned",))

    def change(name, data):
        if part == "weights" and name.endswith("data/weights/model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if part == "sample_inputs" and "/data/sample_inputs/" in name:
            buffer = io.BytesIO()
            torch.save(Payload(), buffer)
            return buffer.getvalue()
        return data

    crafted = _rewritten(model, tmp_path / "crafted.pt2", change)
    with pytest.raises(InputError, match=r"crafted\.pt2.* which loading would unpickle \(it can run code\); refused"):
        load_exported_program(crafted)
    with pytest.raises(InputError, match="not a readable pt2 archive"):
        load_exported_program(tmp_path / "m.pt2.json")


def test_an_export_never_replaces_a_link_a_fifo_or_its_input(checkpoints, tmp_path):
    adapter = tiny_adapter(checkpoints["vit"], views=1, epochs=1).fit(*colour_images(1))
    (tmp_path / "real.onnx").write_bytes(b"keep")
    (tmp_path / "link.onnx").symlink_to(tmp_path / "real.onnx")
    os.mkfifo(tmp_path / "pipe.onnx")
    for name, kind in (("link.onnx", "a symbolic link"), ("pipe.onnx", "not a regular file")):
        with pytest.raises(InputError, match=rf"export path '.*{name}' is {kind}"):
            adapter.export(tmp_path / name, "onnx")
    assert (tmp_path / "real.onnx").read_bytes() == b"keep" and stat.S_ISFIFO(os.stat(tmp_path / "pipe.onnx").st_mode)
    with pytest.raises(InputError, match=r"folder .* does not exist"):
        adapter.export(tmp_path / "missing" / "m.onnx", "onnx")
