"""Test-time ProLIP: per image, the lowest-entropy views, one entropy step on a projector copy, reset.

The library adapts a chunk of images at once; the reference below adapts one image at a time, the
way TPT's loop does, with its own entropy, selection and optimiser, written separately here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODELS, colour_images, tiny_adapter
from test_baselines import accuracy, make_problem, zero_shot_logits

from prolip import InputError, NotFittedError
from prolip.bench.adapted import prolip_weight, train_config
from prolip.bench.methods import get_method
from prolip.bench.problem import FeatureSet
from prolip.cli import main
from prolip.model.backbone import build_backbone
from prolip.model.head import LinearHead
from prolip.variants.test_time import TestTimeProLIP, TestTimeSettings, select_views, tta_logits, view_entropies

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def reference_test_time(features, weight, bias, classifier, s, *, rho, steps, lr, optimizer, reg_lambda, d_in):
    """One image at a time: pick views by entropy, minimise the entropy of their mean prediction, predict view 0."""

    def scores(w, x, r):
        z = x @ w + bias + r
        return s * (z / z.norm(dim=1, keepdim=True)) @ classifier.T

    out = []
    for i in range(features.shape[1]):
        views = features[:, i]
        x, r = views[:, :d_in], (views[:, d_in:] if views.shape[1] > d_in else torch.zeros(len(views), 1))
        with torch.no_grad():
            p = torch.softmax(scores(weight, x, r), dim=1)
            entropy = -(p * p.log()).sum(dim=1)
        keep = torch.argsort(entropy, stable=True)[: max(1, math.floor(len(views) * rho))]
        w = torch.nn.Parameter(weight.clone())
        opt = OPTIMIZERS[optimizer]([w], lr=lr)
        for _ in range(steps):
            mean = torch.softmax(scores(w, x[keep], r[keep]), dim=1).mean(dim=0)
            loss = -(mean * mean.log()).sum() + reg_lambda * ((w - weight) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out.append(scores(w, x[:1], r[:1])[0])
    return torch.stack(out)


def random_inputs(residual: bool, dtype=torch.float64, seed=0, views=20, n=6, d_in=12, d_out=8, k=5):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(views, n, d_in + (d_out if residual else 0), generator=g, dtype=dtype)
    weight = torch.randn(d_in, d_out, generator=g, dtype=dtype) / 3
    bias = 0.1 * torch.randn(d_out, generator=g, dtype=dtype)
    classifier = F.normalize(torch.randn(k, d_out, generator=g, dtype=dtype), dim=-1)
    return features, weight, bias, classifier


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(
    ("steps", "optimizer", "reg_lambda"), [(1, "adamw", 0.0), (3, "adamw", 0.5), (2, "adam", 0.0), (2, "sgd", 0.1)]
)
def test_matches_the_one_image_at_a_time_reference(residual, steps, optimizer, reg_lambda):
    features, weight, bias, classifier = random_inputs(residual)
    settings = TestTimeSettings(rho=0.25, steps=steps, lr=5e-2, optimizer=optimizer, reg_lambda=reg_lambda)
    got = tta_logits(features, LinearHead(weight, bias), classifier, 10.0, settings, chunk_size=4)
    expected = reference_test_time(
        features, weight, bias, classifier, 10.0, rho=0.25, steps=steps, lr=5e-2, optimizer=optimizer,
        reg_lambda=reg_lambda, d_in=weight.shape[0],
    )  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    start = tta_logits(features, LinearHead(weight, bias), classifier, 10.0, TestTimeSettings(steps=0))
    assert (got - start).abs().max() > 0.05  # the step changed the predictions


def test_fp32_matches_the_reference_to_float_rounding():
    features, weight, bias, classifier = random_inputs(False, dtype=torch.float32, seed=1)
    got = tta_logits(features, LinearHead(weight, bias), classifier, 20.0, TestTimeSettings(rho=0.1, lr=5e-3))
    expected = reference_test_time(
        features, weight, bias, classifier, 20.0, rho=0.1, steps=1, lr=5e-3, optimizer="adamw", reg_lambda=0.0, d_in=12
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_keeps_exactly_the_lowest_entropy_views():
    features, weight, bias, classifier = random_inputs(False, seed=2, views=30)
    entropies = view_entropies(features, LinearHead(weight, bias), classifier, 10.0)
    kept = select_views(entropies, 3)
    for i in range(features.shape[1]):
        assert set(kept[:, i].tolist()) == set(torch.topk(-entropies[:, i], 3).indices.tolist())
        assert entropies[kept[1:, i], i].ge(entropies[kept[:-1, i], i]).all()  # lowest first
    settings = TestTimeSettings(rho=0.1, lr=5e-2)  # int(30 · 0.1) = 3 views
    before = tta_logits(features, LinearHead(weight, bias), classifier, 10.0, settings)
    # Swapping two views that were not kept (nor the plain one) changes nothing; swapping a kept one in does.
    image = 0
    dropped = [v for v in range(1, 30) if v not in kept[:, image].tolist()]
    swapped = features.clone()
    swapped[[dropped[0], dropped[1]], image] = features[[dropped[1], dropped[0]], image]
    # bit-for-bit: the same ops on the same shapes; the swapped rows are scored but never kept, and rows never mix
    assert torch.equal(tta_logits(swapped, LinearHead(weight, bias), classifier, 10.0, settings), before)
    best = int(kept[0, image])
    replaced = features.clone()
    replaced[best, image] = features[dropped[-1], image]
    after = tta_logits(replaced, LinearHead(weight, bias), classifier, 10.0, settings)
    # bit-for-bit for the other images: their rows and projector copies see the same ops on the same shapes
    assert not torch.allclose(after[image], before[image]) and torch.equal(after[1:], before[1:])


def test_each_image_starts_afresh_and_chunks_do_not_matter():
    features, weight, bias, classifier = random_inputs(True, dtype=torch.float32, seed=3, n=9)
    settings = TestTimeSettings(rho=0.2, steps=2, lr=2e-2)
    together = tta_logits(features, LinearHead(weight, bias), classifier, 10.0, settings)
    order = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    shuffled = tta_logits(features[:, order], LinearHead(weight, bias), classifier, 10.0, settings)
    torch.testing.assert_close(shuffled, together[order], rtol=1e-6, atol=1e-5)
    for chunk in (1, 4):
        torch.testing.assert_close(
            tta_logits(features, LinearHead(weight, bias), classifier, 10.0, settings, chunk_size=chunk),
            together,
            rtol=1e-6,
            atol=1e-5,
        )
    alone = torch.cat(
        [tta_logits(features[:, i : i + 1], LinearHead(weight, bias), classifier, 10.0, settings) for i in range(9)]
    )
    torch.testing.assert_close(alone, together, rtol=1e-6, atol=1e-5)


class ViewByView:
    """Features that, like lazy CachedFeatures, can only be read one whole view at a time; counts the reads."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features, self.shape, self.reads = features, features.shape, [0] * features.shape[0]

    def __getitem__(self, view: int) -> torch.Tensor:
        assert isinstance(view, int)
        self.reads[view] += 1
        return self.features[view].clone()


def test_reads_lazy_features_one_view_at_a_time():
    features, weight, bias, classifier = random_inputs(True, dtype=torch.float32, seed=4, n=5)
    settings = TestTimeSettings(rho=0.2, lr=2e-2)
    lazy = ViewByView(features)
    assert torch.equal(  # bit-for-bit: the same views, copied, through the same ops on the same shapes
        tta_logits(lazy, LinearHead(weight, bias), classifier, 10.0, settings),
        tta_logits(features, LinearHead(weight, bias), classifier, 10.0, settings),
    )
    assert lazy.reads[0] == 3 and max(lazy.reads[1:]) == 2  # scored, gathered (and view 0: predicted)


def test_settings_are_checked():
    for bad in ({"rho": 0.0}, {"rho": 1.5}, {"steps": -1}, {"steps": 1.5}, {"lr": -1.0}, {"optimizer": "lbfgs"}):
        with pytest.raises(InputError, match=next(iter(bad))):
            TestTimeSettings(**bad)
    assert TestTimeSettings(rho=0.1).kept(64) == 6 and TestTimeSettings(rho=0.1).kept(5) == 1


# ---------------------------------------------------------------------------- the bench method
@pytest.fixture(scope="module")
def problem_and_views(one_thread):  # one thread for the module, restored after it (it used to leak to later modules)
    problem, plain = make_problem(k=4, shots=4, seed=5)
    g = torch.Generator().manual_seed(6)
    crops = plain.features + 0.5 * torch.randn(63, *plain.features.shape[1:], generator=g)
    return problem, FeatureSet(torch.cat([plain.features, crops]), plain.labels)


def test_bench_method_with_no_step_is_zero_shot_or_prolip_exactly(problem_and_views):
    problem, test = problem_and_views
    method = get_method("test-time-prolip")
    assert method.test_views == 63 and method.transfers
    frozen = type(method)(lr=0.0).fit(problem)
    # bit-for-bit: lr 0 leaves each copy at W0 exactly, the change adds an exact 0, and the plain view's logits are
    # (s · normalize(x W0 + b)) @ Tᵀ on the same [n, d] rows as zero-shot's
    assert torch.equal(frozen.logits(test, problem.classes), zero_shot_logits(problem, test))
    weight = prolip_weight(problem, train_config(problem))
    expected = LinearHead(weight, problem.image_head.bias).logits(
        test.features[0], problem.classes.classifier, problem.logit_scale
    )
    # bit-for-bit: the same prolip_weight, and the same ops on the same rows (as above)
    assert torch.equal(type(method)(start="prolip", lr=0.0).fit(problem).logits(test, problem.classes), expected)
    adapted = method.fit(problem).logits(test, problem.classes)
    assert not torch.allclose(adapted, zero_shot_logits(problem, test))
    with pytest.raises(InputError, match="start"):
        get_method("test-time-prolip:start=nowhere")


def test_beats_zero_shot_when_the_crops_see_what_the_plain_view_hides():
    problem, test = make_problem(k=5, shots=4, noise=0.5, shift=0.5, seed=2)
    g = torch.Generator().manual_seed(2)
    n, d_in = test.labels.numel(), problem.image_head.in_features
    means = torch.stack([problem.train.features[:, problem.train.labels == c].mean((0, 1)) for c in range(5)])
    # The plain view holds the object and a strong distractor (another class); the crops mostly the object.
    other = (test.labels + 1 + torch.randint(4, (n,), generator=g)) % 5
    plain = means[test.labels] + 0.9 * (means[other] - means[other].mean(0)) + 0.3 * torch.randn(n, d_in, generator=g)
    crops = means[test.labels] + 1.5 * torch.rand(63, n, 1, generator=g) * torch.randn(63, n, d_in, generator=g)
    views = FeatureSet(torch.cat([plain[None], crops]), test.labels)
    zero_shot = accuracy(zero_shot_logits(problem, views), test.labels)
    adapted = accuracy(get_method("test-time-prolip").fit(problem).logits(views, problem.classes), test.labels)
    assert zero_shot < 0.6 and adapted > zero_shot + 0.2


# ---------------------------------------------------------------------------- on images
@pytest.fixture(scope="module")
def fitted(checkpoints):
    images, labels = colour_images(3)
    return tiny_adapter(checkpoints["vit"], views=2, epochs=10).fit(images, labels)


def test_predicts_images_deterministically_and_one_at_a_time(fitted):
    images = colour_images(2, seed=4)[0]
    tt = TestTimeProLIP(fitted, views=8, rho=0.25, lr=5e-2)
    features = tt.extract_features(images)
    assert features.shape == (8, 6, fitted.n_features_in_)
    torch.testing.assert_close(features[:1], fitted.extract_features(images, views=0))
    proba = tt.predict_proba(images)
    assert proba.shape == (6, 3) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert np.array_equal(tt.predict(images), fitted.classes_[proba.argmax(axis=1)])  # exact: the same logits
    np.testing.assert_allclose(TestTimeProLIP(fitted, views=8, rho=0.25, lr=5e-2).predict_proba(images), proba)
    alone = np.concatenate([tt.predict_proba([im]) for im in images])
    np.testing.assert_allclose(alone, proba, rtol=1e-5, atol=1e-6)
    other_views = TestTimeProLIP(fitted, views=8, rho=0.25, lr=5e-2, random_state=1).extract_features(images)
    # bit-for-bit: the plain views are one views=0 extraction, which no seed enters
    assert torch.equal(other_views[0], features[0]) and not torch.equal(other_views[1:], features[1:])


def test_with_no_step_it_is_the_adapter_or_zero_shot_exactly(fitted):
    images = colour_images(1, seed=5)[0]
    tt = TestTimeProLIP(fitted, views=4, lr=0.0)
    features = tt.extract_features(images)
    # bit-for-bit below: lr 0 leaves each copy at its start exactly and the change adds an exact 0, so each side is
    # (s · normalize(x W + b)) @ Tᵀ on the same [n, d] rows, W the same W0 (+ delta)
    assert torch.equal(tt.logits_from_features(features), fitted.logits_from_features(features[:1]))
    backbone = fitted.backbone
    w0 = backbone.projector.to_in_out(backbone.projector.parameter).detach().float()
    bias, scale = backbone.projector.bias, fitted.logit_scale_
    from_w0 = TestTimeProLIP(fitted, views=4, lr=0.0, start="pretrained").logits_from_features(features)
    assert torch.equal(from_w0, LinearHead(w0, bias).logits(features[0], fitted.classifier_, scale))
    bare = TestTimeProLIP(backbone, list(fitted.class_names_), views=4, lr=0.0)
    assert list(bare.classes_) == list(fitted.class_names_)
    expected = LinearHead(w0, bias).logits(features[0], bare.classifier_, backbone.logit_scale)
    assert torch.equal(bare.logits_from_features(features), expected)


def test_refuses_what_it_cannot_use(fitted, checkpoints):
    # The constructor only stores (scikit-learn's contract); the first use refuses, before any image is read.
    for kwargs, error, match in (
        ({"model": fitted.backbone}, InputError, "class_names"),
        ({"model": fitted.backbone, "class_names": ["a", "b"], "start": "adapted"}, InputError, "adapted"),
        ({"model": fitted, "class_names": ["a", "b"]}, InputError, "class_names"),
        ({"model": fitted, "views": 0}, InputError, "views"),
        ({"model": "ViT-B-32"}, InputError, "ProLIPAdapter"),
        ({"model": tiny_adapter(checkpoints["vit"])}, NotFittedError, "not fitted"),
    ):
        estimator = TestTimeProLIP(**kwargs)
        with pytest.raises(error, match=match):
            estimator.predict(["no image is read before the check"])


def test_templates_build_t_as_the_official_clip_classifier(fitted):
    """T from several templates: each prompt's embedding normalised, averaged, normalised (utils.clip_classifier)."""
    templates = ["itap of a {}.", "art of the {}.", "a photo of the small {}."]
    backbone = fitted.backbone
    names = list(fitted.class_names_)
    embeddings = backbone.prompt_embeddings(names, templates)  # [K, M, d], encode_text's output
    expected = embeddings / embeddings.norm(dim=-1, keepdim=True)
    expected = expected.mean(dim=1)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    for tt in (TestTimeProLIP(fitted, templates=templates), TestTimeProLIP(backbone, names, templates=templates)):
        torch.testing.assert_close(tt.classifier_, expected, rtol=0, atol=1e-6)  # unit rows: 1e-6 is float rounding
    assert torch.equal(TestTimeProLIP(fitted).classifier_, fitted.classifier_)  # no templates: the adapter's own T
    images = colour_images(1, seed=7)[0]
    tt = TestTimeProLIP(fitted, templates=templates, views=4, lr=0.0)
    features = tt.extract_features(images)
    w = fitted.fitted_.adapted_weight(backbone.projector)
    scale = fitted.logit_scale_
    assert torch.equal(
        tt.logits_from_features(features),
        LinearHead(w, backbone.projector.bias).logits(features[0], tt.classifier_, scale),
    )


def test_templates_are_refused_where_t_was_trained(checkpoints):
    images, labels = colour_images(2)
    text = tiny_adapter(checkpoints["vit"], views=1, epochs=2, target="text").fit(images, labels)
    with pytest.raises(InputError, match="target='text'"):
        _ = TestTimeProLIP(text, templates=["a {}."]).classes_


def test_command_line_test_time_predict(fitted, checkpoints, tmp_path, capsys):
    delta = tmp_path / "colours.safetensors"
    fitted.save(delta)
    picture = tmp_path / "red.png"
    from PIL import Image

    Image.fromarray(colour_images(1, seed=6)[0][0].permute(1, 2, 0).numpy()).save(picture)
    base = ["predict", str(delta), str(picture), "--json", "--quiet", "--device", "cpu"]
    base += ["--model", TINY_MODELS["vit"], "--pretrained", checkpoints["vit"]]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*base, "--test-time", "--tt-views", "8", "--tt-lr", "0"]) == 0
    frozen = json.loads(capsys.readouterr().out)
    assert frozen[0]["probabilities"] == pytest.approx(plain[0]["probabilities"], abs=1e-6)
    assert main([*base, "--test-time", "--tt-views", "8", "--tt-lr", "0.5", "--tt-rho", "0.5"]) == 0
    moved = json.loads(capsys.readouterr().out)
    assert moved[0]["probabilities"] != pytest.approx(plain[0]["probabilities"], abs=1e-4)
    templated = [*base, "--test-time", "--tt-views", "8", "--tt-lr", "0", "--tt-template", "a {} thing."]
    assert main([*templated, "--tt-template", "a photo of a {}."]) == 0
    other_t = json.loads(capsys.readouterr().out)
    assert other_t[0]["probabilities"] != pytest.approx(plain[0]["probabilities"], abs=1e-6)  # T rebuilt
    assert main([*base, "--test-time", "--tt-optimizer", "lbfgs"]) == 1
    assert "optimizer" in capsys.readouterr().err


def test_a_backbone_alone_gives_zero_shot_plus_adaptation(checkpoints):
    backbone = build_backbone(TINY_MODELS["vit"], checkpoints["vit"], device="cpu")
    tt = TestTimeProLIP(backbone, ["red", "green", "blue"], templates=["a {} square."], views=4)
    assert tt.start is None and tt.predict(colour_images(1)[0]).shape == (3,)  # a backbone starts from W0
