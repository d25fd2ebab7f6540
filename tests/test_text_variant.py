"""ProLIP on the text projection (target="text" and "image+text"): its loop, the estimator, files, merge and bench."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import colour_images, edit_delta, engine_train, tiny_adapter
from safetensors import safe_open

from prolip import DeltaFileError, FingerprintMismatchError, InputError, ProLIPAdapter
from prolip.files.delta import read_state
from prolip.model.head import LinearHead
from prolip.model.zeroshot import zero_shot_classifier
from prolip.training.fitted import CLASSIFIER_KEY
from prolip.training.sides import TextSide

CPU = torch.device("cpu")
TEMPLATES = ["a photo of a {}."]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread


def text_problem(views=3, n=12, k=3, m=2, d_in=20, d_t=10, d_out=8, residual=False, seed=0):
    """Image features (with a per-image residual beside x when asked), prompt features, W0, b, W_t0."""
    g = torch.Generator().manual_seed(seed)
    width = d_in + (d_out if residual else 0)
    features = torch.randn(views, n, width, generator=g)
    labels = torch.arange(n) % k
    prompts = torch.randn(k, m, d_t, generator=g)
    w0 = torch.randn(d_in, d_out, generator=g) / math.sqrt(d_in)
    bias = 0.1 * torch.randn(d_out, generator=g)
    text_w0 = torch.randn(d_t, d_out, generator=g) / math.sqrt(d_t)
    return features, labels, prompts, w0, bias, text_w0


def reference_text(features, labels, prompts, w0, bias, text_w0, *, train_image, scale, lr, reg_lambda, epochs):
    """The text-side loss written out for autograd, minimised by torch.optim.Adam with CosineAnnealingLR.

    T = normalize(mean over templates of normalize(P W_t)); the image side is x W + b (+ r).
    """
    d_in = w0.shape[0]
    text_w = text_w0.clone().requires_grad_(True)
    w = w0.clone().requires_grad_(train_image)
    optimizer = torch.optim.Adam([text_w, w] if train_image else [text_w], lr=lr, betas=(0.9, 0.999), eps=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    losses = []
    for step in range(epochs):
        row = features[step % features.shape[0]]
        z = row[:, :d_in] @ w + bias
        if row.shape[1] > d_in:
            z = z + row[:, d_in:]
        per_prompt = prompts @ text_w
        per_prompt = per_prompt / per_prompt.norm(dim=-1, keepdim=True)
        t = per_prompt.mean(dim=1)
        t = t / t.norm(dim=-1, keepdim=True)
        loss = F.cross_entropy(scale * (z / z.norm(dim=-1, keepdim=True)) @ t.T, labels)
        loss = loss + reg_lambda * ((text_w - text_w0) ** 2).sum()
        if train_image:
            loss = loss + reg_lambda * ((w - w0) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return text_w.detach(), w.detach(), torch.tensor(losses)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("train_image", "residual"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("reg_lambda", [0.0, 0.5])
def test_matches_an_independent_autograd_loop(train_image, residual, reg_lambda):
    features, labels, prompts, w0, bias, text_w0 = text_problem(residual=residual)
    kw = {"scale": 100.0, "lr": 1e-2, "reg_lambda": reg_lambda, "epochs": 30}
    text_w, w, losses = reference_text(features, labels, prompts, w0, bias, text_w0, train_image=train_image, **kw)
    got = engine_train(
        features, labels, None, w0, bias, side=TextSide(prompts, LinearHead(text_w0)), train_image=train_image,
        logit_scale=100.0, lr=1e-2, reg_lambda=reg_lambda, epochs=30, device=CPU, verbose=False,
    )  # fmt: skip
    assert float((text_w - text_w0).norm()) > 0.05  # it moved far enough for differences to show
    assert relative(got.losses, losses) < 1e-5
    assert relative(got.classifier_weight - text_w0, text_w - text_w0) < 1e-5
    if train_image:
        assert relative(got.weight - w0, w - w0) < 1e-5
    else:
        assert got.weight is None
    t = F.normalize(F.normalize(prompts @ text_w, dim=-1).mean(dim=1), dim=-1)
    torch.testing.assert_close(got.classifier, t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train_image", [False, True])
def test_fp16_text_training_stays_near_fp32_and_stores_fp16_values(train_image):
    """The official ProLIP_text.py trains the text projection in fp16: train_dtype="fp16" does too."""
    features, labels, prompts, w0, bias, text_w0 = text_problem()
    run = {"logit_scale": 100.0, "lr": 1e-2, "reg_lambda": 0.5, "epochs": 30, "device": CPU, "verbose": False}
    side = TextSide(prompts, LinearHead(text_w0))
    half = engine_train(features, labels, None, w0, bias, side=side, train_image=train_image, train_dtype="fp16", **run)
    full = engine_train(features, labels, None, w0, bias, side=side, train_image=train_image, **run)
    assert torch.equal(half.classifier_weight, half.classifier_weight.half().float())  # fp16 storage
    # Same loss and recipe: the change agrees with fp32 to a few percent (fp16 has 11 bits).
    assert relative(half.classifier_weight - text_w0, full.classifier_weight - text_w0) < 0.05
    if train_image:
        assert torch.equal(half.weight, half.weight.half().float())
        assert relative(half.weight - w0, full.weight - w0) < 0.05


def test_what_the_loop_refuses():
    features, labels, prompts, w0, bias, text_w0 = text_problem()
    run = {"logit_scale": 100.0, "lr": 1e-2, "reg_lambda": 0.1, "epochs": 2, "device": CPU, "verbose": False}
    t = TextSide(prompts, LinearHead(text_w0)).classifier()
    with pytest.raises(InputError, match="trains nothing"):
        engine_train(features, labels, t, w0, bias, train_image=False, **run)
    with pytest.raises(InputError, match=r"do not fit \[K, M, d_t\] × \[d_t, 8\]"):
        engine_train(features, labels, None, w0, bias, side=TextSide(prompts, LinearHead(text_w0[:, :5])), **run)


# ---------------------------------------------------------------------------- the estimator
@pytest.fixture(scope="module")
def fitted(checkpoints) -> dict[str, ProLIPAdapter]:
    images, labels = colour_images(2)
    return {
        target: tiny_adapter(checkpoints["vit"], target=target, epochs=15, lr=3e-2).fit(images, labels)
        for target in ("text", "image+text")
    }


def test_what_each_target_trains(fitted):
    text, both = fitted["text"], fitted["image+text"]
    assert text.delta_ is None and text.text_delta_.norm() > 0 and text.fitted_.target == "text"
    assert both.delta_.norm() > 0 and both.text_delta_.norm() > 0 and both.fitted_.target == "image+text"
    assert text.text_delta_.shape == text.backbone.text_projector.parameter.shape
    assert text.fitted_.text_projector_key == "text_projection" and text.get_params()["target"] == "text"
    with pytest.raises(InputError, match="target='both' is invalid"):
        ProLIPAdapter(target="both").fit_features(torch.zeros(1, 2, 48), ["a", "b"])


def test_the_untrained_text_side_is_the_zero_shot_classifier(checkpoints):
    images, labels = colour_images(2)
    templates = ["a photo of a {}.", "a {} thing."]
    image = tiny_adapter(checkpoints["vit"], epochs=0, templates=templates)
    features = image.extract_features(images)
    text = tiny_adapter(checkpoints["vit"], epochs=0, templates=templates, target="text")
    text.fit_features(features, labels)
    assert torch.equal(text.text_delta_, torch.zeros_like(text.text_delta_))  # exact: W_t0 − W_t0 with no step
    torch.testing.assert_close(text.classifier_, image.fit_features(features, labels).classifier_)


@pytest.mark.parametrize("target", ["text", "image+text"])
def test_merged_model_applies_the_text_delta(fitted, target):
    adapter = fitted[target]
    base = adapter.backbone.model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = adapter.merged_model()
    # The merged model's own text tower gives the stored, adapted T.
    t = zero_shot_classifier(merged, adapter.backbone.tokenizer, adapter.class_names_, TEMPLATES, device=CPU)
    torch.testing.assert_close(t, adapter.classifier_, rtol=1e-5, atol=1e-6)
    original = zero_shot_classifier(base, adapter.backbone.tokenizer, adapter.class_names_, TEMPLATES, device=CPU)
    assert (original - adapter.classifier_).abs().max() > 1e-3
    torch.testing.assert_close(merged.text_projection.detach(), base.text_projection.detach() + adapter.text_delta_)
    # bit-for-bit: elementwise fp32 sums and differences only (correctly rounded, the same on every CPU); the base
    # model is compared with a copy
    visual = merged.visual.proj.detach() - base.visual.proj.detach()
    assert torch.equal(visual, torch.zeros_like(visual)) if target == "text" else torch.equal(visual, adapter.delta_)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


@pytest.mark.parametrize("target", ["text", "image+text"])
def test_save_load_predicts_identically(fitted, target, tmp_path, checkpoints):
    adapter = fitted[target]
    path = tmp_path / "text.safetensors"
    adapter.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    expected = {"text_projection", CLASSIFIER_KEY} | ({"visual.proj"} if target == "image+text" else set())
    config = json.loads(meta["config"])
    assert keys == expected and config["target"] == target and config["text_projector_key"] == "text_projection"
    loaded = ProLIPAdapter.load(path, pretrained=checkpoints["vit"], verbose=False)
    # bit-for-bit: stored tensors read back onto the same weights, then the same ops on the same shapes
    assert loaded.target == target and torch.equal(loaded.text_delta_, adapter.text_delta_)
    images = colour_images(2, seed=9)[0]
    assert torch.equal(
        loaded.logits_from_features(loaded.extract_features(images, views=0)),
        adapter.logits_from_features(adapter.extract_features(images, views=0)),
    )


def _other_text(config: dict, part: str) -> None:
    config["text_fingerprint"][part]["sums"][0] += 1.0


@pytest.fixture(scope="module")
def saved_both(fitted, tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "both.safetensors"
    fitted["image+text"].save(path)
    return path


@pytest.mark.parametrize(
    ("part", "what"), [("projector", "text projection differs"), ("tower", "text tower before it differs")]
)
def test_the_text_side_of_the_base_model_is_checked(saved_both, tmp_path, checkpoints, part, what):
    path = edit_delta(saved_both, tmp_path / "other.safetensors", config=lambda c: _other_text(c, part))
    with pytest.raises(FingerprintMismatchError, match=rf"different base model: its .*{what}"):
        ProLIPAdapter.load(path, pretrained=checkpoints["vit"])
    with pytest.warns(UserWarning, match="different base model"):
        ProLIPAdapter.load(path, pretrained=checkpoints["vit"], strict=False, verbose=False)


@pytest.mark.parametrize(
    ("config", "tensors", "match"),
    [
        (lambda m: m.update(target="both"), None, "'target': expected one of"),
        (lambda m: m.pop("text_projector_key"), None, r"text delta but lacks prolip metadata \['text_projector_key'\]"),
        (lambda m: m.update(text_projector_key="visual.proj"), None, "'text_projector_key'"),
        (lambda m: m.update(text_fingerprint={}), None, "'text_fingerprint'"),
        (lambda m: m.update(target="image"), None, "holds tensors"),
        (None, lambda t: t.pop("visual.proj"), "holds tensors"),
        (None, lambda t: t.update(text_projection=t["text_projection"].half()), "inconsistent"),
        (None, lambda t: t.update(text_projection=t["text_projection"][0].contiguous()), "inconsistent"),
        (None, lambda t: t["text_projection"].view(-1).__setitem__(1, math.nan), "NaN or Inf"),
    ],
)
def test_the_strict_reader_refuses_damaged_text_deltas(saved_both, tmp_path, config, tensors, match):
    damaged = edit_delta(saved_both, tmp_path / "damaged.safetensors", config=config, tensors=tensors)
    with pytest.raises(DeltaFileError, match=match) as info:
        read_state(damaged)
    assert repr(str(damaged)) in str(info.value)


def test_a_text_delta_of_the_wrong_shape_is_refused_on_load(saved_both, tmp_path, checkpoints):
    wrong = edit_delta(saved_both, tmp_path / "t.pt", tensors=lambda t: t.update(text_projection=torch.zeros(5, 24)))
    read_state(wrong)  # well formed on its own; only the base model can tell
    with pytest.raises(DeltaFileError, match=r"text delta for text_projection of shape \(5, 24\).*\(32, 24\)"):
        ProLIPAdapter.load(wrong, pretrained=checkpoints["vit"])


# ---------------------------------------------------------------------------- bench
def consistent_problem(shift: float, seed: int = 1):
    """test_baselines' shifted problem whose zero-shot classifier is what its text head gives."""
    from test_baselines import make_problem

    from prolip.bench.problem import Classes, Problem

    problem, test = make_problem(k=5, shots=8, noise=1.0, shift=shift, seed=seed)
    g = torch.Generator().manual_seed(seed)
    d_out = problem.classes.classifier.shape[1]
    # W_t0 = I on d_out: each class's two prompt features are its (shifted) zero-shot direction plus noise.
    features = problem.classes.classifier[:, None, :] + 0.05 * torch.randn(5, 2, d_out, generator=g)
    text = TextSide(features, LinearHead(torch.eye(d_out)))
    classes = Classes(problem.classes.names, text.classifier(), text)
    return Problem(**{**vars(problem), "classes": classes}), test


def test_bench_prolip_text_beats_zero_shot_and_scores_new_classes():
    from test_baselines import accuracy

    from prolip.bench.methods import get_method
    from prolip.bench.problem import Classes

    problem, test = consistent_problem(shift=3.0)
    method = get_method("prolip-text")
    assert method.transfers
    zero_shot = get_method("zero-shot").fit(problem).logits(test, problem.classes)
    fitted = method.fit(problem)
    assert accuracy(fitted.logits(test, problem.classes), test.labels) > accuracy(zero_shot, test.labels) + 0.15
    # New classes: their own prompt features through the trained W_t.
    text = problem.classes.text
    new_text = TextSide(text.prompts[[4, 0]] + 0.1, text.head)
    new = Classes(["x", "y"], new_text.classifier(), new_text)
    w_t = fitted.text_weight
    t = F.normalize(F.normalize((text.prompts[[4, 0]] + 0.1) @ w_t, dim=-1).mean(dim=1), dim=-1)
    f = F.normalize(problem.image_head.project(test.features[0]), dim=-1)
    torch.testing.assert_close(fitted.logits(test, new), problem.logit_scale * f @ t.T)
    assert (w_t - text.start).norm() > 0.01
    with pytest.raises(InputError, match="text features"):
        fitted.logits(test, Classes(["x", "y"], new_text.classifier()))
    untrained = type(method)(lr=1e-12).fit(problem)
    torch.testing.assert_close(untrained.logits(test, problem.classes), zero_shot, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("blobs")
    rng = np.random.default_rng(0)
    for name, rows in (("top", slice(2, 12)), ("bottom", slice(16, 26))):
        (root / name).mkdir()
        for i in range(3):
            img = rng.integers(0, 40, size=(28, 28), dtype=np.uint8)
            img[rows, 6:22] = 230
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("variant", ["text", "rla"])
def test_cli_fits_and_uses_each_variant(blobs, tmp_path, capsys, variant):
    from prolip import RegularizedLinearAdapter, standin
    from prolip.cli import main

    out = str(tmp_path / f"{variant}.safetensors")
    model = ["--model", standin.MODEL_NAME, "--pretrained", standin.PRETRAINED_TAG]
    train = ["--views", "2", "--epochs", "5", "--lr", "1e-2", "--seed", "1"]
    assert main(["fit", str(blobs), *model, *train, "--variant", variant, "--out", out, "--quiet"]) == 0
    assert main(["info", out]) == 0
    info = capsys.readouterr().out
    image = str(blobs / "top" / "0.png")
    assert main(["predict", out, image, "--json", "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["label"] in ("top", "bottom") and sum(rows[0]["probabilities"].values()) == pytest.approx(1.0)
    if variant == "text":
        assert "kind:              projector (read by ProLIPAdapter)" in info and "target:            text" in info
        assert "text projection:   text_projection" in info
        assert ProLIPAdapter.load(out, verbose=False).target == "text"
    else:
        assert "kind:              linear_adapter" in info and f"embeddings of:     {standin.MODEL_NAME}" in info
        assert RegularizedLinearAdapter.load(out).fitted_.model_name == standin.MODEL_NAME
        assert main(["merge", out, "--out", str(tmp_path / "m.safetensors"), "--quiet"]) == 1
        assert "no weight to merge" in capsys.readouterr().err


# ---------------------------------------------------------------------------- one text head for every text tower
TEXT_FAMILIES = ["open_clip-text-transformer", "open_clip-siglip-proj-bias", "transformers-clip", "transformers-siglip"]


def text_tower_model(family: str, clip_tokenizer):
    """A random tiny model of the text-tower family, with a non-zero text projection bias where the family has one."""
    import open_clip

    with torch.random.fork_rng():
        torch.manual_seed(0)
        if family.startswith("open_clip"):
            model = open_clip.create_model("test-vit-tiny" if family.endswith("transformer") else "test-timm-map-tiny")
        else:
            from test_transformers_models import simple_tokenizer, tiny_model

            from prolip import from_transformers

            kind = family.split("-")[1]
            hf, image_processor = tiny_model(kind)
            tokenizer = clip_tokenizer if kind == "clip" else simple_tokenizer
            model = from_transformers(hf, tokenizer=tokenizer, image_processor=image_processor)
        text = ProLIPAdapter(model, None, device="cpu", verbose=False).backbone.text_projector
        if text.bias is not None:  # make the bias count: the bug it guards against dropped it
            with torch.no_grad():
                text.bias.copy_(0.5 * torch.randn(text.bias.shape))
    return model


def zero_shot_of(model, adapter: ProLIPAdapter) -> torch.Tensor:
    """T of ``model`` (a merged copy, or the base) through its own encode_text, for the adapter's classes and prompts."""
    from prolip.model.backbone import build_backbone
    from prolip.model.transformers_clip import from_transformers, is_transformers_model

    base = adapter.backbone
    if is_transformers_model(model):  # a merged transformers model: wrapped again with the base's own processors
        model = from_transformers(model, tokenizer=base.tokenizer, image_processor=_image_processor(base))
    backbone = build_backbone(
        model, None, device="cpu", tokenizer=None if is_transformers_model(model) else base.tokenizer
    )
    return backbone.classifier(list(adapter.class_names_), list(adapter.fitted_.templates))


def _image_processor(backbone):
    import transformers

    config = backbone.view_config
    kind = "clip" if backbone.model.model_type == "CLIPModel" else "siglip"
    side = config.size
    if kind == "clip":
        return transformers.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return transformers.SiglipImageProcessor(size={"height": side, "width": side})


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_one_text_head_for_every_text_tower(family, clip_tokenizer):
    """T at epochs=0 is the zero-shot classifier for every target; after a text-side fit, the merged model's text
    features give exactly the adapter's classifier (the text projection's bias included)."""
    model = text_tower_model(family, clip_tokenizer)
    images, labels = colour_images(2, size=32)
    base = ProLIPAdapter(model, None, views=2, epochs=0, device="cpu", verbose=False)
    features = base.extract_features(images)
    zero_shot = base.fit_features(features, labels).classifier_
    assert torch.allclose(zero_shot, zero_shot_of(model, base), atol=1e-6)
    for target in ("image", "text", "image+text"):
        untrained = base.set_params(target=target).fit_features(features, labels)
        torch.testing.assert_close(untrained.classifier_, zero_shot, rtol=0, atol=1e-5)  # float rounding of unit rows
    for target in ("text", "image+text"):
        fitted = base.set_params(target=target, epochs=5, lr=1e-2).fit_features(features, labels)
        assert float((fitted.classifier_ - zero_shot).norm()) > 1e-3  # it trained
        merged = fitted.merged_model()
        torch.testing.assert_close(zero_shot_of(merged, fitted), fitted.classifier_, rtol=0, atol=1e-5)
