"""The authors' checkpoints: a file in the official layout imports as a delta that predicts as the official formula;
anything else is refused with a DeltaFileError naming the file, and nothing in it is unpickled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODELS, colour_images
from safetensors.torch import save_file
from torch import nn

from prolip import DeltaFileError, InputError, ProLIPAdapter, UnsupportedModelError
from prolip.files.delta import write_delta
from prolip.files.official import OFFICIAL_LOGIT_SCALE, import_official, parse_official_path, read_official
from prolip.model.backbone import build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread

NAMES = ["red", "green", "blue"]  # the order of colour_images' classes: the official label indices
TEMPLATES = ["a photo of a {}.", "a {} image."]
CONFIG = "few_shot_no_val_lr1e-5_lambda_1_N"
OFFICIAL = ("modified_resnet", "vit")


# ---------------------------------------------------------------------------- the official side, written here
class ResNetProjector(nn.Module):
    """What the official code trains for RN50 / RN101: an nn.Linear holding c_proj's weight and (frozen) bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        self.linear.weight = nn.Parameter(weight.clone())
        self.linear.bias = nn.Parameter(bias.clone(), requires_grad=False)


class ViTProjector(nn.Module):
    """What the official code trains for ViT-B: a Parameter holding visual.proj."""

    def __init__(self, proj: torch.Tensor) -> None:
        super().__init__()
        self.vit_proj = nn.Parameter(proj.clone())


def official_module(model: nn.Module, family: str, seed: int = 0) -> nn.Module:
    """An fp16 projector module as the official code would have trained it from ``model``'s: W0 plus a change."""
    gen = torch.Generator().manual_seed(seed)
    if family == "vit":
        w0 = model.visual.proj.detach()
        module = ViTProjector(w0 + 0.1 * w0.std() * torch.randn(w0.shape, generator=gen))
    else:
        c_proj = model.visual.attnpool.c_proj
        w0 = c_proj.weight.detach()
        module = ResNetProjector(w0 + 0.1 * w0.std() * torch.randn(w0.shape, generator=gen), c_proj.bias.detach())
    return module.half()  # the official code runs CLIP, and so its projector, in fp16


def official_path(root: Path, dataset: str = "colours", shots: int = 4, seed: int = 1, config: str = CONFIG) -> Path:
    path = root / "trained_models" / config / dataset / f"{shots}_shot" / f"{dataset}_seed{seed}.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def official_logits(
    features: torch.Tensor, state: dict[str, torch.Tensor], model: nn.Module, tokenizer
) -> torch.Tensor:
    """The official test-time formula, written out: 100 · normalize(x W (+ b)) · Tᵀ, T from the prompts' embeddings."""
    if "vit_proj" in state:
        z = features @ state["vit_proj"].float()
    else:
        z = features @ state["linear.weight"].float().t() + state["linear.bias"].float()
    z = z / z.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        rows = []
        for name in NAMES:
            e = model.encode_text(tokenizer([t.format(name) for t in TEMPLATES])).float()
            e = e / e.norm(dim=-1, keepdim=True)
            mean = e.mean(dim=0)
            rows.append(mean / mean.norm())
    return 100.0 * z @ torch.stack(rows).t()


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fp16_bases(tmp_path_factory, checkpoints) -> dict[str, str]:
    """The tiny ResNet and ViT with every weight rounded to fp16, as OpenAI's released CLIP weights are."""
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("fp16_bases")
    paths = {}
    for family in OFFICIAL:
        weights = load_file(checkpoints[family])
        paths[family] = str(folder / f"{family}.safetensors")
        save_file({k: v.half().float() if v.is_floating_point() else v for k, v in weights.items()}, paths[family])
    return paths


@pytest.fixture(scope="module")
def backbones(fp16_bases):
    return {f: build_backbone(TINY_MODELS[f], fp16_bases[f], device="cpu") for f in OFFICIAL}


@pytest.fixture(scope="module")
def images():
    return colour_images(2)[0]


def written(path: Path, contents) -> Path:
    torch.save(contents, path)
    return path


def refused(path: Path, backbone, match: str, error: type[Exception] = DeltaFileError) -> None:
    with pytest.raises(error, match=match) as info:
        import_official(path, backbone, NAMES, TEMPLATES, n_shots=4)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------- imports
@pytest.mark.parametrize("family", OFFICIAL)
def test_an_official_checkpoint_predicts_as_the_official_formula(family, backbones, fp16_bases, images, tmp_path):
    backbone = backbones[family]
    module = official_module(backbone.model, family)
    path = written(official_path(tmp_path), module.state_dict())
    state = import_official(path, backbone, NAMES, TEMPLATES)

    # W − W0 in the parameter's own orientation, from the file's fp16 values.
    file_weight = module.state_dict()["vit_proj" if family == "vit" else "linear.weight"].float()
    assert state.delta.dtype == torch.float32
    assert torch.equal(state.delta, file_weight - backbone.projector.parameter.detach())  # one subtraction, both sides
    assert state.projector_key == backbone.projector.key and state.classes == tuple(NAMES)
    assert state.logit_scale == OFFICIAL_LOGIT_SCALE  # the official 100, not the tiny model's own scale
    assert backbone.logit_scale != pytest.approx(OFFICIAL_LOGIT_SCALE)
    assert state.n_shots == 4 and state.reg_lambda == pytest.approx(1 / 4)  # N from the path, λ = 1/N from the config
    assert state.hyperparameters["source"] == "official" and state.hyperparameters["lr"] == 1e-5
    assert state.hyperparameters["official"] == {
        "file": "colours_seed1.pth", "config": CONFIG, "dataset": "colours", "n_shots": 4, "seed": 1, "lr": 1e-5,
        "reg_lambda": "auto", "reg_lambda_from": "config name",
    }  # fmt: skip

    adapter = ProLIPAdapter.from_state(state, TINY_MODELS[family], fp16_bases[family], device="cpu", verbose=False)
    features = adapter.extract_features(images, views=0)
    expected = official_logits(features[0], module.state_dict(), adapter.backbone.model, adapter.backbone.tokenizer)
    # Two fp32 paths (x W and x (W0 + delta), other kernels) of logits scaled by 100 (|logit| up to ~40 here):
    # agreement to rounding, measured at about 6e-6.
    torch.testing.assert_close(adapter.logits_from_features(features), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(adapter.predict_proba(images), torch.softmax(expected, -1).numpy(), atol=1e-5, rtol=0)
    zero_shot = adapter.backbone.projector.head.logits(features[0], state.classifier, OFFICIAL_LOGIT_SCALE).detach()
    assert float((zero_shot - expected).abs().max()) > 0.5  # the imported change is what the predictions show

    out = tmp_path / "delta.safetensors"
    write_delta(out, state)
    loaded = ProLIPAdapter.load(out, pretrained=fp16_bases[family], device="cpu", verbose=False)
    np.testing.assert_array_equal(loaded.predict_proba(images), adapter.predict_proba(images))  # the same ops


def test_the_command_line_imports_an_official_checkpoint(backbones, fp16_bases, images, tmp_path):
    from conftest import run_prolip

    module = official_module(backbones["vit"].model, "vit")
    path = written(official_path(tmp_path), module.state_dict())
    out = tmp_path / "imported.safetensors"
    common = ["--model", TINY_MODELS["vit"], "--pretrained", fp16_bases["vit"], "--device", "cpu"]
    done = run_prolip("import-official", str(path), *common, "--classes", *NAMES, "--template", TEMPLATES[0],
                      "--template", TEMPLATES[1], "--out", str(out))  # fmt: skip
    assert done.returncode == 0 and "3 classes (N=4)" in done.stdout, done.stderr
    expected = import_official(path, backbones["vit"], NAMES, TEMPLATES)
    loaded = ProLIPAdapter.load(out, pretrained=fp16_bases["vit"], device="cpu", verbose=False)
    assert torch.equal(loaded.delta_, expected.delta) and loaded.classes_.tolist() == NAMES
    again = run_prolip("import-official", str(path), *common, "--classes", *NAMES, "--out", str(path))
    assert again.returncode == 1 and "itself" in again.stderr  # never over its own input


def test_the_bias_may_be_the_fp16_rounding_of_the_models(checkpoints, tmp_path):
    # An fp32 base whose bias is not fp16-valued: the file's fp16 copy of it is that bias, rounded.
    backbone = build_backbone(TINY_MODELS["modified_resnet"], checkpoints["modified_resnet"], device="cpu")
    module = official_module(backbone.model, "modified_resnet")
    assert not torch.equal(module.linear.bias.float(), backbone.projector.bias)
    state = import_official(written(official_path(tmp_path), module.state_dict()), backbone, NAMES, TEMPLATES)
    assert state.delta.shape == backbone.projector.parameter.shape


def test_n_shots_and_lambda_outside_the_layout(backbones, tmp_path):
    backbone = backbones["vit"]
    path = written(tmp_path / "my_checkpoint.pth", official_module(backbone.model, "vit").state_dict())
    with pytest.raises(InputError, match="pass n_shots") as info:
        import_official(path, backbone, NAMES, TEMPLATES)
    assert str(path) in str(info.value)
    state = import_official(path, backbone, NAMES, TEMPLATES, n_shots=8, classes=[0, 1, 2])
    assert state.n_shots == 8 and state.reg_lambda == pytest.approx(1 / 8) and state.classes == (0, 1, 2)
    assert state.hyperparameters["official"]["reg_lambda_from"] == "assumed" and "lr" not in state.hyperparameters
    given = import_official(path, backbone, NAMES, n_shots=2, reg_lambda=0.0)
    assert given.reg_lambda == 0.0 and given.templates == ("a photo of a {}.",)


def test_the_official_path_layout():
    run = parse_official_path("/x/trained_models/few_shot_no_val_lr1e-3_lambda_1e-2/dtd/16_shot/dtd_seed3.pth")
    assert (run.config, run.dataset, run.n_shots, run.seed) == ("few_shot_no_val_lr1e-3_lambda_1e-2", "dtd", 16, 3)
    assert run.lr == 1e-3 and run.reg_lambda == 1e-2
    assert parse_official_path("t/few_shot_no_val_lr1e-4_lambda_1_N2/eurosat/2_shot/eurosat_seed1.pth").reg_lambda == (
        "1/N^2"
    )
    assert parse_official_path("t/few_shot_no_val_lr1e-2_lambda_0/dtd/1_shot/dtd_seed1.pth").reg_lambda == 0.0
    searched = parse_official_path("trained_models/few_shot_few_val/imagenet/4_shot/imagenet_seed2.pth")
    assert searched.config == "few_shot_few_val" and searched.lr is None and searched.reg_lambda is None
    moved = parse_official_path("downloads/oxford_pets_seed7.pth")
    assert (moved.config, moved.dataset, moved.n_shots, moved.seed) == (None, "oxford_pets", None, 7)
    assert parse_official_path("model.pth").recorded() == {}


# ---------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def rn_state(backbones) -> dict[str, torch.Tensor]:
    return dict(official_module(backbones["modified_resnet"].model, "modified_resnet").state_dict())


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: {"weight": s["linear.weight"], "bias": s["linear.bias"]}, "not a projector checkpoint"),
        (lambda s: {"linear.weight": s["linear.weight"]}, "holds keys"),
        (lambda s: {**s, "linear2.weight": torch.eye(24).half()}, "linear adapter's"),  # the official RLA's file
        (lambda s: {**s, "R": torch.zeros(3, 24).half()}, "TaskRes"),
        (lambda s: {"vit_proj": s["linear.weight"].t()}, "checkpoint of a ViT"),
        (lambda s: {**s, "linear.weight": s["linear.weight"].t()}, "of shape"),
        (lambda s: {**s, "linear.weight": s["linear.weight"][:, :-1]}, "another backbone"),
        (lambda s: {**s, "linear.bias": s["linear.bias"][:-1]}, r"c_proj\.bias is \[24\]"),
        (lambda s: {**s, "linear.weight": 3}, "holds a value of type int at 'linear.weight'"),
        (lambda s: {**s, "linear.weight": s["linear.weight"].to(torch.int32)}, "torch.int32 tensor"),
        (lambda s: {**s, "linear.weight": s["linear.weight"].index_fill(0, torch.tensor([2]), float("nan"))}, "NaN"),
        (lambda s: {**s, "linear.bias": s["linear.bias"].index_fill(0, torch.tensor([0]), float("inf"))}, "NaN"),
        (lambda s: {**s, "linear.bias": s["linear.bias"] * 1.01 + 1e-3}, "differs from this model's"),
        (lambda s: {**s, "linear.weight": s["linear.weight"] + 2e4}, "another base model"),
        (lambda s: [s["linear.weight"], s["linear.bias"]], "holds a list, not a state dict"),
        (lambda s: {0: s["linear.weight"], 1: s["linear.bias"]}, "holds keys"),
    ],
)
def test_a_file_of_other_contents_is_refused(edit, match, rn_state, backbones, tmp_path):
    refused(written(official_path(tmp_path), edit(rn_state)), backbones["modified_resnet"], match)


def test_a_vit_file_of_the_wrong_size_is_refused(backbones, tmp_path):
    proj = backbones["vit"].projector.parameter.detach()
    path = written(official_path(tmp_path), {"vit_proj": torch.cat([proj, proj]).half()})
    refused(path, backbones["vit"], r"shape \[96, 24\], but this model's visual\.proj is \[48, 24\]")
    rn_file = {"linear.weight": proj.t(), "linear.bias": proj[0]}
    refused(written(official_path(tmp_path, seed=2), rn_file), backbones["vit"], "checkpoint of a ResNet")


CANARY: list[str] = []


def _canary() -> None:
    CANARY.append("unpickled")


class Payload:
    """An object whose unpickling would run code: what weights-only loading must never do."""

    def __reduce__(self):
        return _canary, ()


def test_pickled_objects_are_never_unpickled(rn_state, backbones, tmp_path):
    module = ResNetProjector(rn_state["linear.weight"], rn_state["linear.bias"])
    refused(written(tmp_path / "module.pth", module), backbones["modified_resnet"], "not a weights-only torch file")
    refused(
        written(tmp_path / "payload.pth", {**rn_state, "x": Payload()}), backbones["modified_resnet"], "weights-only"
    )
    assert CANARY == []


@pytest.mark.parametrize(
    "content, match",
    [(b"hello, not a checkpoint\n", "not a torch checkpoint"), (b"", "not a torch checkpoint")],
)
def test_a_file_that_is_not_a_torch_file_is_refused(content, match, backbones, tmp_path):
    path = tmp_path / "file.pth"
    path.write_bytes(content)
    refused(path, backbones["vit"], match)


def test_a_missing_or_oversized_file_is_refused(backbones, tmp_path):
    refused(tmp_path / "absent.pth", backbones["vit"], "cannot read official checkpoint")
    big = written(tmp_path / "big.pth", {"vit_proj": torch.zeros(1 << 19)})
    refused(big, backbones["vit"], "far more than an official checkpoint")


def test_models_the_official_code_does_not_train_are_refused(checkpoints, tmp_path):
    backbone = build_backbone(TINY_MODELS["timm_linear"], checkpoints["timm_linear"], device="cpu")
    with pytest.raises(UnsupportedModelError, match="RN50, RN101"):
        read_official(tmp_path / "any.pth", backbone.projector)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"class_names": "red"}, "list of strings"),
        ({"class_names": ["red", ""]}, "non-empty string"),
        ({"class_names": ["red", "red"]}, "distinct"),
        ({"class_names": NAMES, "classes": [0, 1]}, "one label per name"),
        ({"class_names": NAMES, "templates": ["no field"]}, "templates"),
        ({"class_names": NAMES, "reg_lambda": -1.0}, "reg_lambda"),
    ],
)
def test_malformed_arguments_are_refused_before_the_file_is_read(kwargs, match, backbones, tmp_path):
    with pytest.raises(InputError, match=match):
        import_official(tmp_path / "never_read.pth", backbones["vit"], n_shots=1, **kwargs)
