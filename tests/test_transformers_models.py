"""Hugging Face transformers CLIPModel / SiglipModel backbones, on tiny random configs built offline."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import colour_images, missing, run_prolip
from PIL import Image
from test_fidelity import _photo

from prolip import (
    DeltaFileError,
    FingerprintMismatchError,
    InputError,
    ModelLoadError,
    ProLIPAdapter,
    UnsupportedModelError,
    from_transformers,
)
from prolip.cli import main
from prolip.features.images import load_image
from prolip.features.views import plain_views
from prolip.model.backbone import build_backbone
from prolip.model.preprocessing import ViewConfig
from prolip.model.towers import find_projector
from prolip.model.towers.base import TOLERANCE
from prolip.model.towers.text import find_text_projector
from prolip.model.transformers_clip import preprocess_cfg_of

try:
    import transformers
except ImportError as exc:  # an optional extra; scripts/setup.sh installs it
    missing("transformers", str(exc))

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = ["clip", "siglip"]
SIDE = 32
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def simple_tokenizer(texts: list[str]) -> torch.Tensor:
    """SigLIP's tokenizer needs files from the Hub: a deterministic stand-in, ids in 1..63, 16 per prompt."""
    return torch.tensor([[(sum(map(ord, t)) * (i + 7)) % 63 + 1 for i in range(16)] for t in texts])


def tiny_model(kind: str, seed: int = 0):
    """A random tiny CLIPModel or SiglipModel (eval mode) and its image processor."""
    text = dict(TOWER, vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(TOWER, image_size=SIDE, patch_size=8)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "clip":
            config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
            model = transformers.CLIPModel(config)
            processor = transformers.CLIPImageProcessor(
                size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}
            )
        else:
            model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
            processor = transformers.SiglipImageProcessor(size={"height": SIDE, "width": SIDE})
    return model.eval(), processor


def wrapped(kind: str, clip_tokenizer, seed: int = 0):
    model, image_processor = tiny_model(kind, seed)
    if kind == "clip":  # a loaded model with its processor
        return from_transformers(
            model, transformers.CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer)
        )
    return from_transformers(model, tokenizer=simple_tokenizer, image_processor=image_processor)


def adapter_on(model, **kwargs):
    params = dict(views=3, epochs=20, lr=1e-2, device="cpu", verbose=False)
    return ProLIPAdapter(model, **(params | kwargs))


@pytest.mark.parametrize("kind", KINDS)
def test_towers_reproduce_the_models_own_features(kind, clip_tokenizer):
    model = wrapped(kind, clip_tokenizer)
    projector, text = find_projector(model), find_text_projector(model)  # each runs the build-time check
    expected_keys = {"clip": ("visual_projection.weight", "text_projection.weight")}
    assert (projector.key, text.key) == expected_keys.get(
        kind, ("vision_model.head.mlp.fc2.weight", "text_model.head.weight")
    )
    assert projector.has_residual == (kind == "siglip")
    hf = model.hf
    pixels = torch.randn(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    tokens = simple_tokenizer(["a", "b c", "d."])
    with torch.no_grad():
        image = hf.get_image_features(pixel_values=pixels).pooler_output
        words = hf.get_text_features(input_ids=tokens).pooler_output
        got_image = projector.head.project(projector.pack(*projector.features(pixels)))
        got_text = text.head.project(text.features(tokens))
    for expected, got in ((image, got_image), (words, got_text)):
        relative = ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).max()
        assert relative < TOLERANCE[torch.float32]  # the open_clip towers' tolerance
    if kind == "siglip":  # the check can fail: a head whose output is not x W + b + r is refused
        head = hf.vision_model.head

        def no_residual(self, hidden):
            attended = self.attention(self.probe.repeat(hidden.shape[0], 1, 1), hidden, hidden)[0]
            return self.mlp(self.layernorm(attended))[:, 0]

        head.forward = types.MethodType(no_residual, head)
        with pytest.raises(UnsupportedModelError, match="could not reproduce"):
            find_projector(model)


@pytest.mark.parametrize("kind", KINDS)
def test_fit_save_load_merge_and_from_pretrained(kind, clip_tokenizer, tmp_path):
    images, labels = colour_images(3)
    model = wrapped(kind, clip_tokenizer)
    adapter = adapter_on(model).fit(images, labels)
    assert adapter.fitted_.projector_family == f"transformers_{kind}"
    proba = adapter.predict_proba(images)

    path = tmp_path / "delta.safetensors"
    adapter.save(path)
    loaded = ProLIPAdapter.load(path, model=model, verbose=False)
    np.testing.assert_array_equal(loaded.predict_proba(images), proba)
    with pytest.raises(FingerprintMismatchError):
        ProLIPAdapter.load(path, model=wrapped(kind, clip_tokenizer, seed=1), verbose=False)

    merged = loaded.merged_model()
    assert type(merged) is type(model.hf) and merged is not model.hf
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(model.hf).from_pretrained(tmp_path / "merged").eval()
    processor = tiny_model(kind)[1]
    pixels = torch.as_tensor(
        processor([im.permute(1, 2, 0).numpy() for im in images], return_tensors="np")["pixel_values"]
    )
    projector = adapter.backbone.projector
    with torch.no_grad():
        embeddings = F.normalize(reloaded.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        expected = adapter.logits_from_features(projector.pack(*projector.features(pixels)))
    logits = adapter.logit_scale_ * embeddings @ adapter.classifier_.T
    # nn.Linear with W0 + delta against x @ (W0 + delta): another summation order, fp32 rounding only.
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(
        adapter.classes_[logits.argmax(1).numpy()], adapter.classes_[expected.argmax(1).numpy()]
    )
    # The base model is untouched.
    assert torch.equal(projector.parameter, find_projector(model, verify=False).parameter)
    assert not torch.equal(
        projector.parameter,
        find_projector(transformers_wrapped(reloaded, kind, clip_tokenizer), verify=False).parameter,
    )


def transformers_wrapped(model, kind, clip_tokenizer):
    processor = tiny_model(kind)[1]
    tokenizer = clip_tokenizer if kind == "clip" else simple_tokenizer
    return from_transformers(model, tokenizer=tokenizer, image_processor=processor)


def test_a_text_delta_merges_into_the_text_projection(clip_tokenizer, tmp_path):
    images, labels = colour_images(2)
    model = wrapped("siglip", clip_tokenizer)
    adapter = adapter_on(model, target="image+text").fit(images, labels)
    merged = adapter.merged_model()
    base = model.hf.text_model.head.weight
    assert torch.allclose(merged.text_model.head.weight, base + adapter.text_delta_, atol=1e-6)
    assert not torch.equal(merged.text_model.head.weight, base)


def test_a_hf_transformers_name_loads_with_from_pretrained(clip_tokenizer, tmp_path):
    model, processor = tiny_model("clip")
    folder = tmp_path / "clip"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    clip_tokenizer.save_pretrained(folder)
    name = f"hf-transformers:{folder}"
    images, labels = colour_images(2)
    adapter = adapter_on(name, pretrained=None).fit(images, labels)
    path = tmp_path / "delta.safetensors"
    adapter.save(path)
    assert adapter.fitted_.model_name == name
    with pytest.raises(DeltaFileError, match="trust_file_model"):
        ProLIPAdapter.load(path, verbose=False)  # a file may not choose what transformers loads
    loaded = ProLIPAdapter.load(path, trust_file_model=True, verbose=False)
    np.testing.assert_array_equal(loaded.predict_proba(images), adapter.predict_proba(images))
    same = adapter_on(wrapped("clip", clip_tokenizer)).fit(images, labels)  # the same weights as an object
    assert torch.equal(same.delta_, adapter.delta_)


def test_the_command_line_fits_and_merges_a_transformers_model(clip_tokenizer, tmp_path):
    model, processor = tiny_model("clip")
    folder = tmp_path / "clip"
    for part in (model, processor, clip_tokenizer):
        part.save_pretrained(folder)
    data = tmp_path / "data"
    images, labels = colour_images(2)
    for k, (image, label) in enumerate(zip(images, labels, strict=True)):
        (data / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(data / label / f"{k}.png")
    delta, out = tmp_path / "delta.safetensors", tmp_path / "merged"
    common = ["--device", "cpu", "-q"]
    fit = [
        "fit",
        str(data),
        "--model",
        f"hf-transformers:{folder}",
        "--views",
        "2",
        "--epochs",
        "5",
        "--out",
        str(delta),
    ]
    assert main(fit + common) == 0
    (tmp_path / "a-file").write_text("keep")
    done = run_prolip("merge", str(delta), "--out", str(tmp_path / "a-file"), "--trust-file-model", *common)
    assert done.returncode == 1 and "is a file, not a folder" in done.stderr  # was: "wrote", and nothing written
    assert (tmp_path / "a-file").read_text() == "keep"
    assert main(["merge", str(delta), "--out", str(out), "--trust-file-model", *common]) == 0
    assert transformers.CLIPProcessor.from_pretrained(out).tokenizer.get_vocab() == clip_tokenizer.get_vocab()
    merged = transformers.CLIPModel.from_pretrained(out)
    adapter = ProLIPAdapter.load(delta, trust_file_model=True, verbose=False)
    expected = model.visual_projection.weight + adapter.delta_
    torch.testing.assert_close(merged.visual_projection.weight, expected, atol=0, rtol=0)  # fp32 sum, stored as is


@pytest.mark.parametrize("kind", KINDS)
def test_the_test_view_is_the_image_processors(kind, clip_tokenizer, tmp_path):
    """As tests/test_fidelity.py checks open_clip's transform: the plain view against the processor's pixels."""
    if kind == "clip":
        processor = transformers.CLIPImageProcessor()  # OpenAI's: shorter side 224, centre crop, bicubic
    else:
        processor = transformers.SiglipImageProcessor(size={"height": 224, "width": 224})  # squash
    config = ViewConfig(**preprocess_cfg_of(processor))
    assert config.resize_mode == {"clip": "shortest", "siglip": "squash"}[kind]
    pil = _photo(1500, 2000)
    reference = torch.as_tensor(processor(pil, return_tensors="np")["pixel_values"][0])
    diff = (plain_views([load_image(pil)], config)[0] - reference).abs()
    # Measured (normalised units): mean 0.002-0.004, max 0.007-0.013, from the resampling kernels.
    assert diff.mean() < 0.006 and diff.max() < 0.03, (float(diff.mean()), float(diff.max()))
    wrong = dataclasses.replace(config, resize_mode="squash" if kind == "clip" else "shortest")
    assert (plain_views([load_image(pil)], wrong)[0] - reference).abs().mean() > 0.05  # the test can fail

    # And the tiny model's test-view features are those of its processor's pixels.
    model = wrapped(kind, clip_tokenizer)
    adapter = adapter_on(model, views=0)
    image = _photo(90, 120, seed=1)
    pixels = torch.as_tensor(tiny_model(kind)[1](image, return_tensors="np")["pixel_values"])
    with torch.no_grad():
        expected = adapter.backbone.projector.pack(*adapter.backbone.projector.features(pixels))[0]
    got = adapter.extract_features([image], views=0)[0, 0]
    # Measured: cosine 0.99999+ (CLIP), 0.9998-0.99996 (SigLIP's random head amplifies pixel rounding);
    # the other resize mode gives 0.35-0.998.
    assert F.cosine_similarity(got, expected, dim=0) > 0.9995


def test_a_raw_model_takes_its_processor_as_the_tokenizer(clip_tokenizer):
    model, image_processor = tiny_model("clip")
    with pytest.raises(InputError, match="needs its tokenizer and its image processor"):
        adapter_on(model, tokenizer=simple_tokenizer).fit(*colour_images(2))
    processor = transformers.CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer)
    images, labels = colour_images(2)
    raw = adapter_on(model, tokenizer=processor).fit(images, labels)
    assert torch.equal(raw.delta_, adapter_on(wrapped("clip", clip_tokenizer)).fit(images, labels).delta_)


@pytest.mark.parametrize("kind", KINDS)
def test_an_exported_classifier_reproduces_predict_proba(kind, clip_tokenizer, tmp_path):
    pytest.importorskip("onnxruntime")  # the export extra; scripts/setup.sh installs it
    import onnxruntime

    images, labels = colour_images(3)
    adapter = adapter_on(wrapped(kind, clip_tokenizer)).fit(images, labels)
    expected = adapter.predict_proba(images)
    pixels = plain_views(images, adapter.backbone.view_config)
    pt2, sidecar = adapter.export(tmp_path / "classifier.pt2", "pt2")
    onnx_file, _ = adapter.export(tmp_path / "classifier.onnx", "onnx")
    from_pt2 = torch.export.load(pt2).module()(pixels).detach().numpy()
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    from_onnx = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[0]
    # The exported graph reorders float32 ops (s·Tᵀ baked in): probabilities agree to 1e-4.
    assert np.abs(from_pt2 - expected).max() <= 1e-4 and np.abs(from_onnx - expected).max() <= 1e-4
    assert json.loads(sidecar.read_text())["preprocessing"]["size"] == SIDE


# A model folder from elsewhere (issue 29): its own code never runs, its weights are read from safetensors only.

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import CLIPConfig, CLIPModel, CLIPImageProcessor

class EvilConfig(CLIPConfig):
    model_type = "evil"

class EvilModel(CLIPModel):
    config_class = EvilConfig

class EvilProcessor(CLIPImageProcessor):
    pass
"""


def _model_folder(tmp_path, tokenizer, *, bin_only: bool = False):
    model, processor = tiny_model("clip")
    folder = tmp_path / "clip"
    model.save_pretrained(folder)
    if bin_only:  # the pickled form transformers also reads
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _add_auto_map(folder, marker, config_file: str, entry: dict[str, str], types: dict[str, str]) -> None:
    """Point ``config_file`` at the folder's own classes, under a type transformers does not know (so it would ask)."""
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((folder / config_file).read_text())
    config.update(types, auto_map=entry)
    (folder / config_file).write_text(json.dumps(config))


@pytest.mark.parametrize(
    "config_file, entry, types",
    [
        ("config.json", {"AutoModel": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}, {"model_type": "evil"}),
        (
            "preprocessor_config.json",
            {"AutoImageProcessor": "evil.EvilProcessor"},
            {"image_processor_type": "EvilProcessor"},
        ),
    ],
)
def test_a_model_folders_code_never_runs_whatever_stdin_says(
    config_file, entry, types, clip_tokenizer, tmp_path, monkeypatch
):
    folder = _model_folder(tmp_path, clip_tokenizer)
    marker = tmp_path / "code-ran"
    _add_auto_map(folder, marker, config_file, entry, types)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # transformers would ask, and read "y"
    try:
        backbone = build_backbone(f"hf-transformers:{folder}", None, device="cpu")
    except ModelLoadError:
        pass  # refusing the folder is as good as ignoring its code
    else:
        assert type(backbone.model.hf).__name__ == "CLIPModel"  # transformers' own class, not the folder's
    assert not marker.exists()
    assert "evil" not in sys.modules


def test_a_model_folder_with_pickled_weights_only_is_refused(clip_tokenizer, tmp_path):
    folder = _model_folder(tmp_path, clip_tokenizer, bin_only=True)
    assert (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").exists()
    with pytest.raises(ModelLoadError, match="safetensors"):
        build_backbone(f"hf-transformers:{folder}", None, device="cpu")


# ---------------------------------------------------------------------------- the forms users guess, end to end
def test_a_raw_model_takes_its_tokenizer_and_image_processor_as_open_clip_parameters(clip_tokenizer):
    model, image_processor = tiny_model("clip")
    images, labels = colour_images(2)
    guessed = adapter_on(model, tokenizer=clip_tokenizer, preprocess=image_processor).fit(images, labels)
    same = adapter_on(wrapped("clip", clip_tokenizer)).fit(images, labels)
    assert torch.equal(guessed.delta_, same.delta_)  # the image processor is the preprocessing, not a transform
    np.testing.assert_array_equal(guessed.predict_proba(images), same.predict_proba(images))
    with pytest.raises(InputError, match=r"tokenizer=\.\.\. and preprocess=image_processor"):
        adapter_on(model, tokenizer=clip_tokenizer).fit(images, labels)


def test_a_merged_folder_carries_its_processor_and_loads_by_name(clip_tokenizer, tmp_path):
    images, labels = colour_images(2)
    adapter = adapter_on(wrapped("clip", clip_tokenizer)).fit(images, labels)
    folder = tmp_path / "merged"
    adapter.merged_model().save_pretrained(folder)
    processor = transformers.CLIPProcessor.from_pretrained(folder)  # the tokenizer and image processor went along
    assert processor.tokenizer.get_vocab() == clip_tokenizer.get_vocab()
    by_name = adapter_on(f"hf-transformers:{folder}", epochs=0).fit(images, labels)  # W0 is the merged W
    np.testing.assert_allclose(by_name.predict_proba(images), adapter.predict_proba(images), atol=1e-5)


def test_a_relative_folder_is_recorded_absolute(clip_tokenizer, tmp_path, monkeypatch):
    model, processor = tiny_model("clip")
    for part in (model, processor, clip_tokenizer):
        part.save_pretrained(tmp_path / "clip")
    monkeypatch.chdir(tmp_path)
    adapter = adapter_on("hf-transformers:clip", epochs=2).fit(*colour_images(2))
    assert adapter.fitted_.model_name == f"hf-transformers:{tmp_path / 'clip'}"


def test_tokenizer_and_processor_faults_are_one_line_errors(clip_tokenizer):
    model, image_processor = tiny_model("clip")

    def broken(texts, **kwargs):
        raise RuntimeError("vocabulary file is damaged\nsecond line")

    tokenizer = type("CLIPTokenizer", (), {"__call__": staticmethod(broken), "pad_token": "<pad>"})()
    type(tokenizer).__module__ = "transformers.models.clip.tokenization_clip"
    with pytest.raises(
        InputError, match=r"the tokenizer CLIPTokenizer failed on the prompts \(RuntimeError: vocab"
    ) as info:
        adapter_on(model, tokenizer=tokenizer, preprocess=image_processor).fit(*colour_images(2))
    assert "\n" not in str(info.value)
    zero = transformers.CLIPImageProcessor(size={"shortest_edge": 0}, crop_size={"height": 0, "width": 0})
    with pytest.raises(InputError, match="every size must be a positive number of pixels"):
        adapter_on(model, tokenizer=clip_tokenizer, preprocess=zero).fit(*colour_images(2))
