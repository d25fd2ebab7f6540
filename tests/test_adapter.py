"""Core ProLIPAdapter behaviour on tiny random-weight open_clip models (one per tower family)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODELS, assert_same_argmax, colour_images, tiny_adapter
from reference_training import reference_train

from prolip import FingerprintMismatchError, NotFittedError, ProLIPAdapter, TrainingWarning
from prolip.features.images import load_images
from prolip.features.views import plain_views

# Widths of the tiny configs' pre-projection features, from their architectures: ViT width 48; RN
# 8 × 32 channels; test_convnext's last stage 64, its MLP head's hidden 48; test_vit's width 64, and
# its attention-pool MLP's hidden 192 with the 64-wide residual beside it.
FEATURE_WIDTH = {
    "vit": 48,
    "modified_resnet": 256,
    "timm_linear": 64,
    "timm_mlp": 48,
    "timm_classifier": 64,
    "timm_map": 192 + 64,
}


@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_each_family_fits_predicts_and_round_trips(family, checkpoints, colours, tmp_path):
    images, labels = colours
    adapter = tiny_adapter(checkpoints[family], family)
    features = adapter.extract_features(images)
    assert features.shape == (3, len(images), FEATURE_WIDTH[family])

    adapter.fit_features(features, labels)
    predicted = adapter.predict(images)
    proba = adapter.predict_proba(images)
    assert proba.shape == (len(images), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert list(adapter.classes_) == ["blue", "green", "red"]
    # predict is the most probable column, named by classes_.
    assert predicted.tolist() == [["blue", "green", "red"][k] for k in proba.argmax(axis=1)]
    assert adapter.delta_.dtype == torch.float32
    assert adapter.delta_.shape == adapter.backbone.projector.parameter.shape

    path = tmp_path / "delta.safetensors"
    adapter.save(path)
    loaded = ProLIPAdapter.load(path, pretrained=checkpoints[family], verbose=False)
    # bit-for-bit: the stored delta, T and s read back onto the same weights: the same ops on the same shapes
    np.testing.assert_array_equal(loaded.predict_proba(images), proba)
    assert torch.equal(loaded.delta_, adapter.delta_)
    assert list(loaded.classes_) == list(adapter.classes_)
    assert loaded.get_params()["lr"] == adapter.lr


@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_the_trained_delta_is_the_reference_loops(family, checkpoints, colours):
    images, labels = colours
    adapter = tiny_adapter(checkpoints[family], family, reg_lambda=0.5, epochs=15)
    features = adapter.extract_features(images)
    adapter.fit_features(features, labels)
    projector = adapter.backbone.projector
    y = torch.tensor([list(adapter.classes_).index(lab) for lab in labels])
    reference = reference_train(
        features, y, adapter.classifier_, projector.to_in_out(projector.parameter), projector.bias,
        d_in=projector.in_features, logit_scale=adapter.logit_scale_, lr=adapter.lr, reg_lambda=0.5, epochs=15,
    )  # fmt: skip
    change = reference.weight - projector.to_in_out(projector.parameter).detach().float()
    assert change.abs().max() > 0
    torch.testing.assert_close(
        projector.to_in_out(adapter.delta_), change, rtol=0, atol=1e-3 * float(change.abs().max())
    )
    torch.testing.assert_close(torch.from_numpy(adapter.loss_history_), reference.losses, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_merged_model_agrees_with_adapter(family, checkpoints, colours):
    images, labels = colours
    adapter = tiny_adapter(checkpoints[family], family).fit(images, labels)
    merged = adapter.merged_model()
    projector = adapter.backbone.projector
    merged_param = merged.state_dict()[projector.key]
    assert merged_param.data_ptr() != projector.parameter.data_ptr()
    assert merged_param.dtype == torch.float32
    # bit-for-bit: the same elementwise fp32 W0 + delta (correctly rounded, the same on every CPU)
    assert torch.equal(merged_param, projector.parameter.detach().float() + adapter.delta_)

    pixels = plain_views(load_images(images), adapter.backbone.view_config)
    with torch.no_grad():
        embedding = F.normalize(merged.encode_image(pixels).float(), dim=-1)
    merged_logits = adapter.logit_scale_ * embedding @ adapter.classifier_.t()
    expected = adapter.logits_from_features(adapter.extract_features(images, views=0))
    torch.testing.assert_close(merged_logits, expected, rtol=1e-4, atol=1e-4)
    # The merged model's path rounds otherwise: its labels are the adapter's wherever no near-tie (~1e-3 of agreement).
    assert_same_argmax(adapter.predict(images), merged_logits, margin=1e-2, classes=adapter.classes_)


@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_base_projector_is_bit_identical_after_fit(family, checkpoints, colours):
    images, labels = colours
    adapter = tiny_adapter(checkpoints[family], family, lr=0.1)
    before = adapter.backbone.projector.parameter.detach().clone()
    adapter.fit(images, labels)
    adapter.merged_model()
    assert adapter.delta_.abs().max() > 1e-3  # it did train
    assert torch.equal(adapter.backbone.projector.parameter.detach(), before)  # bit-for-bit: untouched, vs a copy


def test_regularisation_strength(checkpoints, colours):
    images, labels = colours
    probe = tiny_adapter(checkpoints["vit"])
    features = probe.extract_features(images)
    with pytest.warns(TrainingWarning, match="reg_lambda=1000000.0"):  # Adam's first steps overshoot a huge λ
        huge = tiny_adapter(checkpoints["vit"], reg_lambda=1e6).fit_features(features, labels)
    free = tiny_adapter(checkpoints["vit"], reg_lambda=0.0).fit_features(features, labels)
    # Adam takes steps of about lr whatever the gradient's size, so a huge λ leaves W oscillating
    # around W0 within one step (damped by the cosine schedule), far below the free movement.
    assert huge.delta_.abs().max() < huge.lr / 2
    assert free.delta_.norm() > 50 * huge.delta_.norm()

    auto = tiny_adapter(checkpoints["vit"]).fit_features(features, labels)
    n_shots = len(labels) / 3
    assert auto.n_shots_ == n_shots and auto.reg_lambda_ == pytest.approx(1 / n_shots)
    explicit = tiny_adapter(checkpoints["vit"], reg_lambda=1 / n_shots).fit_features(features, labels)
    assert torch.equal(auto.delta_, explicit.delta_)  # bit-for-bit: the same λ = 0.25, the same training ops
    assert not torch.equal(auto.delta_, free.delta_)  # other λ: far apart, not a matter of rounding


def test_auto_lambda_uses_mean_shots_for_unequal_classes(checkpoints):
    images, labels = colour_images(4)
    keep = [i for i, lab in enumerate(labels) if lab != "blue" or i % 4 == 0]  # 4 + 4 + 1 images
    adapter = tiny_adapter(checkpoints["vit"], epochs=2).fit([images[i] for i in keep], [labels[i] for i in keep])
    assert adapter.n_shots_ == pytest.approx(9 / 3)
    assert adapter.reg_lambda_ == pytest.approx(3 / 9)


def test_learning_is_real(checkpoints):
    images, labels = colour_images(6, seed=1)
    adapter = tiny_adapter(checkpoints["vit"], epochs=60).fit(images, labels)
    zero_shot = tiny_adapter(checkpoints["vit"], epochs=0).fit(images, labels)  # W = W0: plain CLIP
    assert not zero_shot.delta_.any() and len(zero_shot.loss_history_) == 0
    accuracy, zs_accuracy = adapter.score(images, labels), zero_shot.score(images, labels)
    assert accuracy >= 0.9, accuracy  # chance is 1/3
    assert accuracy > zs_accuracy + 0.2, (accuracy, zs_accuracy)
    held_out, held_labels = colour_images(5, seed=2)
    assert adapter.score(held_out, held_labels) >= 0.8


def test_first_loss_is_the_paper_objective_at_w0(checkpoints, colours):
    images, labels = colours
    adapter = tiny_adapter(checkpoints["modified_resnet"], "modified_resnet", reg_lambda=0.5)
    features = adapter.extract_features(images)
    adapter.fit_features(features, labels)
    p = adapter.backbone.projector
    y = torch.tensor([list(adapter.classes_).index(lab) for lab in labels])
    z = F.normalize(features[0] @ p.to_in_out(p.parameter).detach() + p.bias.detach(), dim=-1)
    expected = F.cross_entropy(adapter.logit_scale_ * z @ adapter.classifier_.t(), y)  # λ term is 0 at W0
    assert adapter.loss_history_[0] == pytest.approx(float(expected), rel=1e-5)
    assert adapter.logit_scale_ == pytest.approx(float(adapter.backbone.model.logit_scale.detach().exp()), rel=1e-6)


def test_fit_features_equals_fit_and_random_state_matters(checkpoints, colours):
    images, labels = colours
    direct = tiny_adapter(checkpoints["vit"], random_state=7).fit(images, labels)
    staged = tiny_adapter(checkpoints["vit"], random_state=7)
    staged.fit_features(staged.extract_features(images), labels)
    assert torch.equal(direct.delta_, staged.delta_)  # bit-for-bit: fit is these two calls, the same ops and shapes
    other = tiny_adapter(checkpoints["vit"], random_state=8)
    assert not torch.equal(other.extract_features(images), staged.extract_features(images))  # other crops


def test_loading_onto_a_different_base_model_is_refused(checkpoints, colours, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    images, labels = colours
    adapter = tiny_adapter(checkpoints["vit"], epochs=2).fit(images, labels)
    path = tmp_path / "delta.safetensors"
    adapter.save(path)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        other = open_clip.create_model(TINY_MODELS["vit"])
    other_ckpt = tmp_path / "other.safetensors"
    save_file(other.state_dict(), other_ckpt)
    with pytest.raises(FingerprintMismatchError) as info:
        ProLIPAdapter.load(path, pretrained=str(other_ckpt), verbose=False)
    assert adapter.base_fingerprint_.summary() in str(info.value)
    with pytest.warns(UserWarning, match="different base model"):
        forced = ProLIPAdapter.load(path, pretrained=str(other_ckpt), strict=False, verbose=False)
    assert forced.predict(images).shape == (len(images),)
    with pytest.raises(FingerprintMismatchError):
        ProLIPAdapter.load(path, model=other, verbose=False)


def test_load_onto_a_model_object(checkpoints, colours, tmp_path):
    import open_clip

    images, labels = colours
    base = open_clip.create_model(TINY_MODELS["timm_linear"], pretrained=checkpoints["timm_linear"])
    adapter = ProLIPAdapter(base, views=2, epochs=5, device="cpu", verbose=False).fit(images, labels)
    path = tmp_path / "delta.safetensors"
    adapter.save(path)
    loaded = ProLIPAdapter.load(path, model=base, verbose=False)
    # bit-for-bit: the stored delta and T read back onto the same model object: the same ops on the same shapes
    np.testing.assert_array_equal(loaded.predict_proba(images), adapter.predict_proba(images))
    with pytest.raises(Exception, match="pass model="):
        ProLIPAdapter.load(path)


def test_estimator_contract(checkpoints, colours):
    images, labels = colours
    adapter = tiny_adapter(checkpoints["vit"])
    for call in (lambda: adapter.predict(images), lambda: adapter.score(images, labels), lambda: adapter.save("x")):
        with pytest.raises(NotFittedError, match="call fit"):
            call()
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, AttributeError)
    assert not hasattr(adapter, "delta_")
    params = adapter.get_params()
    assert params["lr"] == 1e-2 and params["reg_lambda"] == "auto" and params["views"] == 3
    assert adapter.set_params(lr=0.5) is adapter and adapter.lr == 0.5
    with pytest.raises(ValueError, match="valid parameters"):
        adapter.set_params(learning_rate=1)
    assert adapter.fit(images, labels) is adapter
    predicted = adapter.predict(images)
    # Exact: score predicts the same images with the same ops as the predict call above.
    assert adapter.score(images, labels) == np.mean([p == t for p, t in zip(predicted, labels, strict=True)])
    clone = ProLIPAdapter(**adapter.get_params())
    assert clone.get_params() == adapter.get_params()
    assert "lr=0.5" in repr(adapter)


def test_integer_labels_with_class_names(checkpoints, colours):
    images, labels = colours
    ints = [["red", "green", "blue"].index(lab) for lab in labels]
    adapter = tiny_adapter(checkpoints["vit"], epochs=2).fit(
        images, np.array(ints), class_names=["red", "green", "blue"]
    )
    assert adapter.class_names_ == ["red", "green", "blue"]
    assert adapter.predict(images).dtype.kind == "i"
    mapped = tiny_adapter(checkpoints["vit"], epochs=2).fit(
        images, labels, class_names={"red": "crimson", "green": "lime", "blue": "navy"}
    )
    assert mapped.class_names_ == ["navy", "lime", "crimson"]


def test_defaults_follow_the_paper():
    adapter = ProLIPAdapter()
    assert (adapter.model, adapter.pretrained) == ("ViT-B-32", "openai")
    assert (adapter.epochs, adapter.views, adapter.lr, adapter.reg_lambda, adapter.random_state) == (
        300,
        300,
        1e-3,
        "auto",
        0,
    )


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_backbone_trains_in_fp32(precision, checkpoints, colours):
    images, labels = colours
    full = tiny_adapter(checkpoints["vit"], random_state=3).fit(images, labels)
    half = tiny_adapter(checkpoints["vit"], random_state=3, precision=precision).fit(images, labels)
    assert half.backbone.projector.parameter.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert half.delta_.dtype == torch.float32
    # The same base model in another precision has the same fingerprint.
    assert half.base_fingerprint_.mismatch(full.base_fingerprint_) is None
    # The same training on slightly rounded features ends close to the fp32 result (measured: 0.45%
    # of the delta's norm in fp16, 3.4% in bf16, whose features carry 8 bits of mantissa).
    tolerance = {"fp16": 0.02, "bf16": 0.1}[precision]
    assert (half.delta_ - full.delta_).norm() < tolerance * full.delta_.norm()
