"""ProLIP + Tip-Adapter as a library feature (``ProLIPTipAdapter``): the cache, the α / β search, files, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import colour_images, edit_delta, tiny_adapter
from safetensors import safe_open

from prolip import DeltaFileError, InputError, NotFittedError, ProLIPAdapter, ProLIPTipAdapter
from prolip.training.fitted import CACHE_KEYS_KEY, CACHE_LABELS_KEY
from prolip.variants.tip_cache import ALPHAS, BETAS, train_keys

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread


@pytest.fixture(scope="module")
def data(checkpoints):
    """Training features (3 views), validation and test plain views, from the tiny ViT."""
    adapter = tiny_adapter(checkpoints["vit"], random_state=0)
    images, labels = colour_images(3)
    val_images, val_labels = colour_images(2, seed=5)
    test_images, test_labels = colour_images(4, seed=7)
    return {
        "features": adapter.extract_features(images),
        "labels": labels,
        "val": adapter.extract_features(val_images, views=0),
        "val_labels": val_labels,
        "test": adapter.extract_features(test_images, views=0),
        "test_labels": test_labels,
        "test_images": test_images,
    }


@pytest.fixture(scope="module")
def fitted(checkpoints, data) -> ProLIPTipAdapter:
    tip = ProLIPTipAdapter(tiny_adapter(checkpoints["vit"], random_state=0))
    return tip.fit_features(data["features"], data["labels"], data["val"], data["val_labels"])


def reference(adapter: ProLIPAdapter, features, labels, test, alpha, beta, key_views=10):
    """Tip-Adapter's scores written out: s·f·Tᵀ + α·exp(−β(1 − f·Kᵀ))·onehot(L), f and K under W0 + delta."""
    proj = adapter.backbone.model.visual.proj.detach() + adapter.delta_
    k = len(adapter.classes_)
    keys = sum(features[v % features.shape[0]] @ proj for v in range(key_views))
    keys = keys / keys.norm(dim=-1, keepdim=True)
    key_labels = torch.tensor([list(adapter.classes_).index(lab) for lab in labels])
    f = test @ proj
    f = f / f.norm(dim=-1, keepdim=True)
    cache = torch.exp(-beta * (1 - f @ keys.T)) @ F.one_hot(key_labels, k).float()
    return adapter.logit_scale_ * f @ adapter.classifier_.T + alpha * cache


def test_the_projector_is_prolips_and_the_given_adapter_is_left_unfitted(checkpoints, data, fitted):
    plain = tiny_adapter(checkpoints["vit"], random_state=0).fit_features(data["features"], data["labels"])
    # bit-for-bit: the same fit on the same features: the same ops on the same shapes
    assert torch.equal(fitted.adapter_.delta_, plain.delta_) and torch.equal(
        fitted.adapter_.classifier_, plain.classifier_
    )
    with pytest.raises(NotFittedError):
        fitted.adapter.delta_  # noqa: B018 - the template adapter itself was not fitted
    assert list(fitted.classes_) == list(plain.classes_)


def test_scores_match_the_written_out_cache_model(checkpoints, data):
    tip = ProLIPTipAdapter(tiny_adapter(checkpoints["vit"], random_state=0), alpha=2.0, beta=3.0)
    tip.fit_features(data["features"], data["labels"])
    expected = reference(tip.adapter_, data["features"], data["labels"], data["test"][0], 2.0, 3.0)
    got = tip.logits_from_features(data["test"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert tip.val_accuracy_ is None and (tip.alpha_, tip.beta_) == (2.0, 3.0)
    # Fewer key views average fewer views: the keys (and so the scores) change.
    fewer = ProLIPTipAdapter(tip.adapter, alpha=2.0, beta=3.0, key_views=1)
    fewer.fit_features(data["features"], data["labels"])
    expected = reference(fewer.adapter_, data["features"], data["labels"], data["test"][0], 2.0, 3.0, key_views=1)
    torch.testing.assert_close(fewer.logits_from_features(data["test"]), expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(fewer.cache_.keys, tip.cache_.keys)


def test_with_no_cache_weight_it_is_prolip_exactly(checkpoints, data):
    tip = ProLIPTipAdapter(tiny_adapter(checkpoints["vit"], random_state=0), alpha=0.0, beta=1.0)
    tip.fit_features(data["features"], data["labels"])
    # bit-for-bit: (s · normalize(x W)) @ Tᵀ on the same [n, d] rows on both sides, and the cache adds an exact 0
    assert torch.equal(tip.logits_from_features(data["test"]), tip.adapter_.logits_from_features(data["test"]))


def test_alpha_and_beta_are_the_first_best_on_validation(data, fitted):
    adapter = fitted.adapter_
    val_logits = {
        (alpha, beta): reference(adapter, data["features"], data["labels"], data["val"][0], alpha, beta)
        for beta in BETAS
        for alpha in ALPHAS
    }
    y = torch.tensor([list(adapter.classes_).index(lab) for lab in data["val_labels"]])
    correct = {point: int((scores.argmax(dim=1) == y).sum()) for point, scores in val_logits.items()}
    best = max(correct.values())
    first = next(point for point in ((a, b) for b in BETAS for a in ALPHAS) if correct[point] == best)
    assert (fitted.alpha_, fitted.beta_) == pytest.approx(first, rel=1e-12)
    assert fitted.val_accuracy_ == pytest.approx(best / len(y))
    assert fitted.cache_.selection["alphas"] == ALPHAS and fitted.cache_.selection["betas"] == BETAS


def test_save_load_predicts_identically(fitted, data, tmp_path, checkpoints):
    path = tmp_path / "tip.safetensors"
    fitted.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        assert f.get_tensor(CACHE_LABELS_KEY).dtype == torch.int64
    assert meta["kind"] == "tip_adapter" and {CACHE_KEYS_KEY, CACHE_LABELS_KEY, "visual.proj"} <= keys
    assert json.loads(meta["config"])["cache"]["alpha"] == fitted.alpha_
    loaded = ProLIPTipAdapter.load(path, pretrained=checkpoints["vit"], verbose=False)
    # bit-for-bit here and below: stored tensors read back onto the same weights, the same ops on the same shapes
    assert torch.equal(loaded.logits_from_features(data["test"]), fitted.logits_from_features(data["test"]))
    assert (loaded.alpha_, loaded.beta_, loaded.val_accuracy_) == (fitted.alpha_, fitted.beta_, fitted.val_accuracy_)
    assert loaded.alpha is None and loaded.alphas == ALPHAS  # searched: the loaded estimator would search again
    assert list(loaded.predict(data["test_images"])) == list(fitted.predict(data["test_images"]))
    assert loaded.score(data["test_images"], data["test_labels"]) == fitted.score(
        data["test_images"], data["test_labels"]
    )
    with pytest.raises(DeltaFileError, match=r"load it with prolip\.ProLIPTipAdapter\.load"):
        ProLIPAdapter.load(path, pretrained=checkpoints["vit"])
    plain = tmp_path / "plain.safetensors"
    fitted.adapter_.save(plain)
    with pytest.raises(
        DeltaFileError, match=r"holds a projector fit, not a tip_adapter one; load it with prolip\.ProLIPAdapter\.load"
    ):
        ProLIPTipAdapter.load(plain, pretrained=checkpoints["vit"])


def test_train_keys_matches_a_written_out_tip_adapter_f_loop():
    g = torch.Generator().manual_seed(0)
    n, d, k, epochs, batch_size = 12, 6, 3, 4, 5
    views = F.normalize(torch.randn(5, n, d, generator=g), dim=-1)
    labels = torch.arange(n) % k
    classifier = F.normalize(torch.randn(k, d, generator=g), dim=-1)
    start = views[0].clone()
    kw = {"alpha": 1.5, "beta": 4.0, "logit_scale": 50.0, "epochs": epochs, "lr": 1e-2, "batch_size": batch_size}
    got = train_keys(
        start, lambda e: views[e + 1], labels, classifier, generator=torch.Generator().manual_seed(3), **kw
    )
    keys = start.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([keys], lr=1e-2, eps=1e-4)
    order, total, step = torch.Generator().manual_seed(3), epochs * math.ceil(n / batch_size), 0
    for epoch in range(epochs):
        for batch in torch.randperm(n, generator=order).split(batch_size):
            optimizer.param_groups[0]["lr"] = 1e-2 * (1 + math.cos(math.pi * step / total)) / 2
            f = views[epoch + 1][batch]
            cache = torch.exp(-4.0 * (1 - f @ keys.T)) @ F.one_hot(labels, k).float()
            loss = F.cross_entropy(50.0 * f @ classifier.T + 1.5 * cache, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    assert float((got - start).abs().max()) > 1e-3 and torch.equal(start, views[0])  # trained; input untouched (a copy)
    torch.testing.assert_close(got, keys.detach(), rtol=1e-5, atol=1e-6)


def test_trained_keys_are_tip_adapter_f_on_the_adapted_embeddings(checkpoints, data, fitted, tmp_path):
    adapter = tiny_adapter(checkpoints["vit"], random_state=4)
    tip = ProLIPTipAdapter(adapter, alpha=1.0, beta=2.0, keys="trained", key_views=2)
    tip.fit_features(data["features"], data["labels"])
    cache = ProLIPTipAdapter(adapter, alpha=1.0, beta=2.0, key_views=2).fit_features(data["features"], data["labels"])
    proj = tip.adapter_.backbone.model.visual.proj.detach() + tip.adapter_.delta_
    views = F.normalize(data["features"] @ proj, dim=-1)
    y = torch.tensor([list(tip.classes_).index(lab) for lab in data["labels"]])
    expected = train_keys(
        cache.cache_.keys, lambda e: views[(2 + e) % 3], y, tip.adapter_.classifier_, alpha=1.0, beta=2.0,
        logit_scale=tip.adapter_.logit_scale_, generator=torch.Generator().manual_seed(4),
    )  # fmt: skip
    torch.testing.assert_close(tip.cache_.keys, expected, rtol=1e-5, atol=1e-6)
    assert float((tip.cache_.keys - cache.cache_.keys).abs().max()) > 1e-4 and tip.cache_.trained_keys
    path = tmp_path / "trained.safetensors"
    tip.save(path)
    loaded = ProLIPTipAdapter.load(path, pretrained=checkpoints["vit"], verbose=False)
    # bit-for-bit: stored keys read back
    assert loaded.keys == "trained" and loaded.cache_.trained_keys and torch.equal(loaded.cache_.keys, tip.cache_.keys)
    # Searched α, β are chosen again after training, on validation only.
    searched = ProLIPTipAdapter(adapter, keys="trained").fit_features(
        data["features"], data["labels"], data["val"], data["val_labels"]
    )
    assert searched.val_accuracy_ is not None and searched.cache_.trained_keys


@pytest.mark.parametrize(
    ("config", "tensors", "match"),
    [
        (lambda c: c.pop("cache"), None, "of kind 'tip_adapter' but holds another kind's contents"),
        (lambda c: c["cache"].update(alpha=-1), None, "malformed metadata 'cache'"),
        (lambda c: c["cache"].update(key_views=0), None, "malformed metadata 'cache'"),
        (
            lambda c: c["cache"]["selection"].update(accuracy=c["cache"]["selection"].pop("val_accuracy")),
            None,
            "malformed metadata 'cache'",
        ),
        (None, lambda t: t.update({CACHE_LABELS_KEY: t[CACHE_LABELS_KEY] + 5}), "cache labels outside its 3 classes"),
        (None, lambda t: t.update({CACHE_LABELS_KEY: t[CACHE_LABELS_KEY].float()}), "inconsistent contents"),
        (None, lambda t: t.update({CACHE_KEYS_KEY: t[CACHE_KEYS_KEY][:, :4].contiguous()}), "inconsistent contents"),
        (None, lambda t: t.update({CACHE_KEYS_KEY: t[CACHE_KEYS_KEY][:-1].contiguous()}), "inconsistent contents"),
        (None, lambda t: t.pop(CACHE_KEYS_KEY), "expected"),
    ],
)
def test_the_strict_reader_refuses_damaged_caches(fitted, tmp_path, checkpoints, config, tensors, match):
    path = tmp_path / "tip.safetensors"
    fitted.save(path)
    damaged = edit_delta(path, tmp_path / "damaged.safetensors", config=config, tensors=tensors)
    with pytest.raises(DeltaFileError, match=match):
        ProLIPTipAdapter.load(damaged, pretrained=checkpoints["vit"])


def test_what_it_refuses(checkpoints, data):
    adapter = tiny_adapter(checkpoints["vit"])
    features, labels = data["features"], data["labels"]
    with pytest.raises(InputError, match="pass val_images and val_labels"):
        ProLIPTipAdapter(adapter).fit_features(features, labels)
    with pytest.raises(InputError, match="give both alpha and beta"):
        ProLIPTipAdapter(adapter, alpha=1.0).fit_features(features, labels)
    with pytest.raises(InputError, match=r"beta=-1\.0 is invalid"):
        ProLIPTipAdapter(adapter, alpha=1.0, beta=-1.0).fit_features(features, labels)
    with pytest.raises(InputError, match="keys='random' is invalid"):
        ProLIPTipAdapter(adapter, alpha=1.0, beta=1.0, keys="random").fit_features(features, labels)
    with pytest.raises(InputError, match="key_views=0 is invalid"):
        ProLIPTipAdapter(adapter, alpha=1.0, beta=1.0, key_views=0).fit_features(features, labels)
    with pytest.raises(InputError, match="val_labels hold labels the training labels do not"):
        ProLIPTipAdapter(adapter).fit_features(features, labels, data["val"], ["purple"] * len(data["val_labels"]))
    with pytest.raises(InputError, match="pass the plain view of each validation image"):
        ProLIPTipAdapter(adapter).fit_features(features, labels, features, labels)
    with pytest.raises(NotFittedError, match="call fit"):
        ProLIPTipAdapter(adapter).predict_features(data["test"])


def test_cli_fits_inspects_predicts_and_refuses_to_merge(tmp_path, capsys):
    from PIL import Image

    from prolip import standin
    from prolip.cli import main

    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for name, rows in (("top", slice(2, 12)), ("bottom", slice(16, 26))):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                img = rng.integers(0, 40, size=(28, 28), dtype=np.uint8)
                img[rows, 6:22] = 230
                Image.fromarray(img).save(tmp_path / split / name / f"{i}.png")
    out = str(tmp_path / "tip.safetensors")
    model = ["--model", standin.MODEL_NAME, "--pretrained", standin.PRETRAINED_TAG]
    train = ["--views", "2", "--epochs", "5", "--lr", "1e-2", "--seed", "1", "--variant", "image+tip-adapter"]
    assert (
        main(["fit", str(tmp_path / "train"), *model, *train, "--val", str(tmp_path / "val"), "--out", out, "-q"]) == 0
    )
    loaded = ProLIPTipAdapter.load(out, verbose=False)
    assert loaded.val_accuracy_ is not None and loaded.cache_.keys.shape[0] == 6
    assert main(["info", out]) == 0
    info = capsys.readouterr().out
    assert "kind:              tip_adapter" in info and "cache alpha, beta:" in info and "val accuracy" in info
    assert main(["predict", out, str(tmp_path / "val" / "top" / "0.png"), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"] in ("top", "bottom")
    assert main(["eval", out, str(tmp_path / "val"), "--quiet"]) == 0
    assert "accuracy:" in capsys.readouterr().out
    assert main(["merge", out, "--out", str(tmp_path / "m.safetensors"), "--quiet"]) == 1
    assert "cache model is not a weight" in capsys.readouterr().err
    fixed = str(tmp_path / "fixed.safetensors")
    fixed_args = ["--tip-alpha", "1", "--tip-beta", "2", "--tip-keys", "trained"]
    args = ["fit", str(tmp_path / "train"), *model, *train, *fixed_args, "--out", fixed, "-q"]
    assert main(args) == 0
    reloaded = ProLIPTipAdapter.load(fixed, verbose=False)
    assert (reloaded.alpha_, reloaded.beta_, reloaded.keys) == (1, 2, "trained")
    assert main(["fit", str(tmp_path / "train"), *model, *train, "--out", fixed, "-q"]) == 1
    assert "pass val_images and val_labels" in capsys.readouterr().err


def test_lazy_cached_features_give_the_same_cache(checkpoints, data, tmp_path):
    """Training views read one at a time from the on-disk feature cache (fp16) build the same keys."""
    from prolip import CachedFeatures

    images, labels = colour_images(3)
    adapter = tiny_adapter(checkpoints["vit"], random_state=0, cache_dir=tmp_path)
    features = adapter.extract_features(images)
    assert isinstance(features, CachedFeatures)
    lazy = ProLIPTipAdapter(adapter, alpha=1.0, beta=2.0).fit_features(features, labels)
    eager = ProLIPTipAdapter(tiny_adapter(checkpoints["vit"], random_state=0), alpha=1.0, beta=2.0)
    eager.fit_features(data["features"], data["labels"])
    torch.testing.assert_close(lazy.cache_.keys, eager.cache_.keys, rtol=0, atol=2e-3)  # fp16 storage
