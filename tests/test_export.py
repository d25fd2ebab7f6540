"""A standalone exported classifier (ONNX with onnxruntime, torch.export) gives predict_proba's probabilities."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import colour_images, missing, tiny_adapter

from prolip import InputError, UnsupportedModelError
from prolip.features.views import plain_views

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
    if format == "pt2":
        run = torch.export.load(model).module()
        outputs = [run(batch).detach().numpy() for batch in (pixels, pixels[:1])]
        names = list(torch.export.load(model).state_dict)
        assert "scaled_classes" in names  # s·Tᵀ, and the vision tower's weights alone: no text tower
        assert all(name.startswith("visual.") for name in names if name != "scaled_classes")
    else:
        session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        (name,) = [i.name for i in session.get_inputs()]
        outputs = [session.run(None, {name: batch.numpy()})[0] for batch in (pixels, pixels[:1])]
        graph = onnx.load(str(model)).graph
        assert not any("text" in i.name or "token_embedding" in i.name for i in graph.initializer)
        assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in graph.initializer)  # one file
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


def test_a_tower_that_cannot_be_exported_is_refused_by_name(checkpoints, monkeypatch, tmp_path):
    adapter = tiny_adapter(checkpoints["vit"], views=1, epochs=1).fit(*colour_images(1))

    def untraceable(*args, **kwargs):
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr(torch.export, "export", untraceable)
    with pytest.raises(UnsupportedModelError, match=r"vision tower VisionTransformer \(vit.*cannot be exported to pt2"):
        adapter.export(tmp_path / "x.pt2", "pt2")
    assert not (tmp_path / "x.pt2").exists() and not (tmp_path / "x.json").exists()
    with pytest.raises(InputError, match="not one of"):
        adapter.export(tmp_path / "x.tflite", "tflite")
    with pytest.raises(InputError, match=r"ends in \.json"):
        adapter.export(tmp_path / "x.json", "pt2")
