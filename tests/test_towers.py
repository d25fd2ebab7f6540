"""The tower registry: each family's projector, features and residual reproduce open_clip, and misfits are refused.

Every tiny config in tests/configs is a real open_clip / timm architecture with random weights. The
central check is independent of the library's own verification: swap a different weight into the
model and compare open_clip's output with ``x W + b + r`` computed from features taken before the
swap, which holds only if x is the map's true input and r really does not depend on W.
"""

from __future__ import annotations

import importlib.util
import types

import open_clip
import pytest
import torch
from torch import nn

from prolip.errors import InputError, UnsupportedModelError
from prolip.model.towers import find_projector
from prolip.model.towers import survey as survey_module
from prolip.model.towers.survey import build_on_meta, supported_models, survey_model, survey_models
from prolip.model.towers.text import find_text_projector

# tiny config -> (vision family, whether it has a residual, text family)
TINY = {
    "test-vit-tiny": ("vit", False, "clip_text"),
    "test-coca-tiny": ("vit", False, "text_transformer"),
    "test-rn-tiny": ("modified_resnet", False, "clip_text"),
    "test-timm-tiny": ("timm_linear", False, "clip_text"),
    "test-timm-mlp-tiny": ("timm_mlp", False, "clip_text"),
    "test-timm-classifier-tiny": ("timm_classifier", False, "text_transformer"),
    "test-timm-map-tiny": ("timm_map", True, "text_transformer"),
}

# One real open_clip config per family and projector key, with the shapes its architecture implies:
# (name, family, key, d_in, d_out, text key).
REAL = [
    ("ViT-B-32", "vit", "visual.proj", 768, 512, "text_projection"),  # ViT-B width 768, embed 512
    ("RN50", "modified_resnet", "visual.attnpool.c_proj.weight", 2048, 1024, "text_projection"),  # 64 * 32 channels
    ("convnext_base", "timm_linear", "visual.head.proj.weight", 1024, 512, "text_projection"),  # last stage 1024
    ("convnext_large_d", "timm_mlp", "visual.head.mlp.fc2.weight", 1536, 768, "text_projection"),  # hidden 2 * embed
    ("EVA02-B-16", "timm_classifier", "visual.trunk.head.weight", 768, 512, "text.text_projection"),
    ("MobileCLIP-S1", "timm_classifier", "visual.trunk.head.fc.weight", 1024, 512, "text.text_projection"),
    # SigLIP's MAP head: width 768, MLP ratio 4; its text tower asks for a projection bias (nn.Linear).
    ("ViT-B-16-SigLIP", "timm_map", "visual.trunk.attn_pool.mlp.fc2.weight", 3072, 768, "text.text_projection.weight"),
]


def build(name: str) -> nn.Module:
    """A tiny model with fixed random weights, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return open_clip.create_model(name).eval()


def random_pixels(model: nn.Module, n: int = 3, seed: int = 1) -> torch.Tensor:
    size = model.visual.image_size
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def image_embedding(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    out = model.encode_image(pixels, normalize=False)
    return out[0] if isinstance(out, tuple) else out


def perturbed(weight: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """A different weight of the same shape, as training would produce."""
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    return weight.detach().clone() + 0.1 * noise * weight.detach().std()


@pytest.mark.parametrize("name", list(TINY))
def test_projector_is_the_models_own_parameter_under_its_key(name):
    model = build(name)
    projector = find_projector(model)
    family, has_residual, _ = TINY[name]
    assert projector.family == family
    assert projector.has_residual is has_residual
    assert dict(model.named_parameters())[projector.key] is projector.parameter
    assert model.state_dict()[projector.key].data_ptr() == projector.parameter.data_ptr()
    assert projector.to_in_out(projector.parameter).shape == (projector.in_features, projector.out_features)


@pytest.mark.parametrize("name", list(TINY))
def test_features_and_residual_reproduce_encode_image_for_any_weight(name):
    model = build(name)
    projector = find_projector(model)
    pixels = random_pixels(model)
    with torch.no_grad():
        x, residual = projector.features(pixels)
        assert x.shape == (3, projector.in_features)
        assert (residual is not None) is projector.has_residual
        if residual is not None:
            assert residual.shape == (3, projector.out_features)
        before = image_embedding(model, pixels)
        torch.testing.assert_close(projector.head.project(projector.pack(x, residual)), before)

        weight = perturbed(projector.to_in_out(projector.parameter))
        projector.parameter.copy_(projector.from_in_out(weight))
        expected = image_embedding(model, pixels)
        assert not torch.allclose(before, expected)  # the swap changed the output...
        torch.testing.assert_close(
            projector.head.project(projector.pack(x, residual), weight=weight), expected
        )  # ...exactly as x W + b + r


@pytest.mark.parametrize("name", list(TINY))
def test_text_projection_reproduces_encode_text_for_any_weight(name):
    model = build(name)
    projector = find_text_projector(model)
    assert projector.family == TINY[name][2]
    assert dict(model.named_parameters())[projector.key] is projector.parameter
    tokens = torch.randint(1, 1000, (3, model.context_length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = projector.features(tokens)
        weight = perturbed(projector.to_in_out(projector.parameter))
        projector.parameter.copy_(projector.from_in_out(weight))
        expected = model.encode_text(tokens, normalize=False)
    torch.testing.assert_close(projector.head.project(x, weight=weight), expected)


def test_siglip_text_projection_is_a_linear_layer_with_bias():
    projector = find_text_projector(build("test-timm-map-tiny"))
    assert projector.key == "text.text_projection.weight"
    assert projector.transposed and projector.bias is not None


@pytest.mark.parametrize("name", list(TINY))
def test_verification_refuses_a_tower_whose_output_changed(name, monkeypatch):
    model = build(name)
    original = model.visual.forward

    def changed(pixels):  # as if open_clip added a step after the projector
        out = original(pixels)
        return (out[0] * 1.01, *out[1:]) if isinstance(out, tuple) else out * 1.01

    monkeypatch.setattr(model.visual, "forward", changed)
    tower = type(model.visual).__name__
    with pytest.raises(UnsupportedModelError, match=f"{tower}.*could not reproduce"):
        find_projector(model)
    assert find_projector(model, verify=False).family == TINY[name][0]


def test_verification_refuses_a_text_tower_whose_output_changed(monkeypatch):
    model = build("test-vit-tiny")
    original = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda text, normalize=False: original(text, normalize) + 0.1)
    with pytest.raises(UnsupportedModelError, match="could not reproduce"):
        find_text_projector(model)


def test_a_timm_head_ending_in_a_nonlinearity_is_refused_naming_it():
    model = build("test-timm-tiny")
    model.visual.head.add_module("act", nn.GELU())
    with pytest.raises(UnsupportedModelError, match=r"TimmModel.*act: GELU"):
        find_projector(model)


def test_a_tower_of_no_family_is_refused_naming_its_class():
    with pytest.raises(UnsupportedModelError, match="Conv2d"):
        find_projector(nn.Conv2d(3, 8, 3))
    model = build("test-vit-tiny")
    model.visual.proj = None  # a ViT pruned of its projection
    with pytest.raises(UnsupportedModelError, match="VisionTransformer"):
        find_projector(model)


def test_a_text_tower_without_projection_is_refused():
    model = build("test-timm-classifier-tiny")
    model.text.text_projection = None
    with pytest.raises(UnsupportedModelError, match="TextTransformer"):
        find_text_projector(model)


def test_verification_leaves_every_module_in_its_own_mode():
    model = build("test-timm-map-tiny").train()
    model.visual.trunk.blocks[0].eval()
    before = {name: m.training for name, m in model.named_modules()}
    find_projector(model)
    find_text_projector(model)
    assert {name: m.training for name, m in model.named_modules()} == before


def test_meta_models_can_only_be_identified():
    model, _ = build_on_meta("test-vit-tiny")
    with pytest.raises(InputError, match="meta"):
        find_projector(model)
    with pytest.raises(InputError, match="meta"):
        find_text_projector(model)
    assert find_projector(model, verify=False).family == "vit"


def test_projector_of_a_vision_tower_alone():
    model = build("test-timm-map-tiny")
    assert find_projector(model.visual).key == find_projector(model).key


def test_bfloat16_model_is_verified_in_its_own_precision():
    model = build("test-timm-map-tiny").to(torch.bfloat16)
    projector = find_projector(model)
    assert projector.parameter.dtype == torch.bfloat16


def hf_text_tower(width: int, proj: nn.Module) -> nn.Module:
    """An ``HFTextEncoder`` with a stand-in for the transformers model (which is not a dependency)."""
    from open_clip.hf_model import HFTextEncoder, MeanPooler

    class Transformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(100, width)
            self.mix = nn.Linear(width, width)

        def forward(self, input_ids, attention_mask):
            return types.SimpleNamespace(last_hidden_state=torch.tanh(self.mix(self.embed(input_ids))))

    tower = HFTextEncoder.__new__(HFTextEncoder)
    nn.Module.__init__(tower)
    tower.config = types.SimpleNamespace(pad_token_id=1)
    tower.transformer, tower.pooler, tower.proj = Transformer(), MeanPooler(), proj
    tower.output_tokens, tower.vocab_size, tower.context_length = False, 100, 514
    return tower


@pytest.mark.parametrize(
    ("proj", "key"),
    [
        (nn.Linear(16, 24, bias=False), "text.proj.weight"),
        (nn.Sequential(nn.Linear(16, 20, bias=False), nn.GELU(), nn.Linear(20, 24, bias=False)), "text.proj.2.weight"),
    ],
)
def test_hugging_face_text_projection(proj, key):
    model = build("test-timm-classifier-tiny")
    model.text = hf_text_tower(16, proj)
    projector = find_text_projector(model)
    assert (projector.family, projector.key) == ("hf_text", key)
    assert dict(model.named_parameters())[key] is projector.parameter
    tokens = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x = projector.features(tokens)
        weight = perturbed(projector.to_in_out(projector.parameter))
        projector.parameter.copy_(projector.from_in_out(weight))
        torch.testing.assert_close(projector.head.project(x, weight=weight), model.encode_text(tokens))


@pytest.mark.parametrize(("name", "family", "key", "d_in", "d_out", "text_key"), REAL)
def test_real_config_is_identified_on_meta(name, family, key, d_in, d_out, text_key):
    (report,) = survey_models([name])
    assert (report.status, report.family, report.key) == ("supported", family, key)
    assert (report.in_features, report.out_features) == (d_in, d_out)
    assert report.residual is (family == "timm_map")
    assert report.text_key == text_key


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed")
def test_config_with_a_hugging_face_text_tower_is_identified_by_its_vision_tower():
    report = survey_model("nllb-clip-base-siglip")
    assert (report.status, report.family, report.text_key) == ("supported", "timm_map", None)
    assert "transformers" in report.note


def test_survey_reports_refused_and_unbuildable_configs(monkeypatch):
    assert survey_model("no-such-model").status == "unbuildable"
    model = build("test-timm-tiny")
    model.visual.head.add_module("act", nn.GELU())
    monkeypatch.setattr(survey_module, "build_on_meta", lambda name: (model, ""))
    report = survey_model("anything")
    assert report.status == "refused" and "GELU" in report.note


def test_supported_models_groups_every_listed_config_by_family(monkeypatch):
    names = ["test-vit-tiny", "test-coca-tiny", "test-timm-map-tiny", "no-such-model"]
    monkeypatch.setattr(open_clip, "list_models", lambda: names)
    assert supported_models() == {"vit": ["test-vit-tiny", "test-coca-tiny"], "timm_map": ["test-timm-map-tiny"]}
