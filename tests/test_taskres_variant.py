"""ProLIP + TaskRes as a library feature (``ProLIPAdapter(taskres_alpha=...)``): its loop, the estimator, files, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import colour_images, engine_train, tiny_adapter

from prolip import InputError, ProLIPAdapter, ProLIPSearch
from prolip.model.head import LinearHead
from prolip.model.zeroshot import average_prompts, text_prototypes
from prolip.training.sides import ClassifierResidual

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread


def problem(views=3, n=12, k=3, d_in=20, d_out=8, residual=False, seed=0):
    """Image features (with a per-image residual beside x when asked), prototypes t, W0 and b."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(views, n, d_in + (d_out if residual else 0), generator=g)
    labels = torch.arange(n) % k
    prototypes = 3.0 * torch.randn(k, d_out, generator=g)  # not unit rows: their scale matters to α
    w0 = torch.randn(d_in, d_out, generator=g) / math.sqrt(d_in)
    bias = 0.1 * torch.randn(d_out, generator=g)
    return features, labels, prototypes, w0, bias


def reference_taskres(features, labels, prototypes, w0, bias, *, alpha, scale, lr, reg_lambda, epochs):
    """ProLIP + TaskRes written out for autograd: CE(s·normalize(xW + b + r)·normalize(t + αR)ᵀ) + λ‖W − W0‖².

    W and R (from zero, no penalty) in one torch.optim.Adam with CosineAnnealingLR, as ProLIP trains W.
    """
    d_in = w0.shape[0]
    w = w0.clone().requires_grad_(True)
    r = torch.zeros_like(prototypes, requires_grad=True)
    optimizer = torch.optim.Adam([w, r], lr=lr, betas=(0.9, 0.999), eps=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    losses = []
    for step in range(epochs):
        row = features[step % features.shape[0]]
        z = row[:, :d_in] @ w + bias
        if row.shape[1] > d_in:
            z = z + row[:, d_in:]
        t = prototypes + alpha * r
        t = t / t.norm(dim=-1, keepdim=True)
        loss = F.cross_entropy(scale * (z / z.norm(dim=-1, keepdim=True)) @ t.T, labels)
        loss = loss + reg_lambda * ((w - w0) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return w.detach(), r.detach(), torch.tensor(losses)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "with-residual"])
@pytest.mark.parametrize("reg_lambda", [0.0, 0.5])
def test_matches_an_independent_autograd_loop(residual, reg_lambda):
    features, labels, prototypes, w0, bias = problem(residual=residual)
    kw = {"alpha": 0.5, "scale": 100.0, "lr": 1e-2, "reg_lambda": reg_lambda, "epochs": 30}
    w, r, losses = reference_taskres(features, labels, prototypes, w0, bias, **kw)
    got = engine_train(
        features, labels, None, w0, bias, side=ClassifierResidual(prototypes, 0.5),
        logit_scale=100.0, lr=1e-2, reg_lambda=reg_lambda, epochs=30, device=CPU, verbose=False,
    )  # fmt: skip
    assert float(r.norm()) > 0.05 and float((w - w0).norm()) > 0.05  # both moved far enough for errors to show
    assert relative(got.losses, losses) < 1e-5
    assert relative(got.weight - w0, w - w0) < 1e-5
    assert relative(got.classifier_weight, r) < 1e-5
    torch.testing.assert_close(got.classifier, F.normalize(prototypes + 0.5 * r, dim=-1), rtol=1e-5, atol=1e-6)


def test_the_untrained_residual_scores_as_zero_shot():
    features, labels, prototypes, w0, bias = problem()
    side = ClassifierResidual(prototypes, 0.5)
    torch.testing.assert_close(side.classifier(), F.normalize(prototypes, dim=-1))
    torch.testing.assert_close(side.classifier(torch.zeros_like(prototypes)), F.normalize(prototypes, dim=-1))
    embeddings = torch.randn(3, 4, 8)
    t = text_prototypes(average_prompts(embeddings), embeddings)
    torch.testing.assert_close(F.normalize(t, dim=-1), average_prompts(embeddings))
    torch.testing.assert_close(t.norm(dim=-1), embeddings.mean(dim=1).norm(dim=-1))
    run = {"logit_scale": 100.0, "lr": 1e-2, "reg_lambda": 0.1, "epochs": 2, "device": CPU, "verbose": False}
    with pytest.raises(InputError, match=r"class prototypes \(3, 5\) do not fit \[K, 8\]"):
        engine_train(features, labels, None, w0, bias, side=ClassifierResidual(prototypes[:, :5], 0.5), **run)
    with pytest.raises(InputError, match="alpha=nan"):
        engine_train(features, labels, None, w0, bias, side=ClassifierResidual(prototypes, math.nan), **run)


# ---------------------------------------------------------------------------- the estimator
@pytest.fixture(scope="module")
def fitted(checkpoints) -> ProLIPAdapter:
    images, labels = colour_images(2)
    return tiny_adapter(checkpoints["vit"], taskres_alpha=0.5, epochs=15, lr=3e-2).fit(images, labels)


def test_the_estimator_trains_the_projector_and_the_residual(fitted, checkpoints):
    images, labels = colour_images(2)
    plain = tiny_adapter(checkpoints["vit"], epochs=15, lr=3e-2)
    features = plain.extract_features(images)
    zero_shot = plain.set_params(epochs=0).fit_features(features, labels).classifier_
    # The same features and settings through the library's loop on its own.
    backbone = fitted.backbone
    embeddings = backbone.prompt_embeddings(fitted.class_names_, ["a photo of a {}."])
    side = ClassifierResidual(text_prototypes(zero_shot, embeddings), 0.5)
    projector = backbone.projector
    w0 = projector.to_in_out(projector.parameter)
    y = torch.tensor([list(fitted.classes_).index(lab) for lab in labels])
    expected = engine_train(
        features, y, None, w0, projector.bias, side=side, logit_scale=backbone.logit_scale, lr=3e-2,
        reg_lambda=0.5, epochs=15, device=CPU, verbose=False,
    )  # fmt: skip
    torch.testing.assert_close(fitted.classifier_, expected.classifier)
    torch.testing.assert_close(fitted.delta_, projector.from_in_out(expected.weight - w0.detach()))
    assert float((fitted.classifier_ - zero_shot).norm()) > 1e-3  # T moved off the zero-shot classifier
    assert fitted.fitted_.hyperparameters["taskres_alpha"] == 0.5 and fitted.fitted_.target == "image"


def test_save_load_predicts_identically(fitted, tmp_path, checkpoints):
    path = tmp_path / "taskres.safetensors"
    fitted.save(path)
    loaded = ProLIPAdapter.load(path, pretrained=checkpoints["vit"], verbose=False)
    # bit-for-bit: stored tensors read back, then the same ops on the same shapes
    assert loaded.taskres_alpha == 0.5 and torch.equal(loaded.classifier_, fitted.classifier_)
    assert torch.equal(loaded.delta_, fitted.delta_)
    images = colour_images(2, seed=9)[0]
    features = fitted.extract_features(images, views=0)
    assert torch.equal(loaded.logits_from_features(features), fitted.logits_from_features(features))
    # The merged model holds W0 + delta; with the saved T it scores as the adapter does.
    merged = fitted.merged_model()
    assert torch.equal(merged.visual.proj, fitted.backbone.model.visual.proj + fitted.delta_)  # the same fp32 sum
    expected = LinearHead(merged.visual.proj.detach()).logits(features[0], fitted.classifier_, fitted.logit_scale_)
    torch.testing.assert_close(expected, fitted.logits_from_features(features))


def test_what_the_estimator_refuses(checkpoints):
    features, labels = torch.zeros(1, 2, 48), ["a", "b"]
    with pytest.raises(InputError, match="taskres_alpha=-1 is invalid"):
        ProLIPAdapter(taskres_alpha=-1).fit_features(features, labels)
    with pytest.raises(InputError, match="beside the image projector only; got target='text'"):
        tiny_adapter(checkpoints["vit"], taskres_alpha=0.5, target="text").fit_features(features, labels)
    search = ProLIPSearch(tiny_adapter(checkpoints["vit"], taskres_alpha=0.5), lrs=[1e-2], reg_lambdas=[0.1])
    with pytest.raises(InputError, match=r"not with taskres_alpha=0\.5"):
        search.fit_features(features, labels, features[0], labels)


def test_cli_fits_and_predicts_with_taskres(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from prolip import standin
    from prolip.cli import main

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name, rows in (("top", slice(2, 12)), ("bottom", slice(16, 26))):
        (root / name).mkdir(parents=True)
        for i in range(3):
            img = rng.integers(0, 40, size=(28, 28), dtype=np.uint8)
            img[rows, 6:22] = 230
            Image.fromarray(img).save(root / name / f"{i}.png")
    out = str(tmp_path / "taskres.safetensors")
    model = ["--model", standin.MODEL_NAME, "--pretrained", standin.PRETRAINED_TAG]
    train = ["--views", "2", "--epochs", "5", "--lr", "1e-2", "--seed", "1", "--taskres-alpha", "0.25"]
    assert main(["fit", str(root), *model, *train, "--variant", "image+taskres", "--out", out, "--quiet"]) == 0
    assert ProLIPAdapter.load(out, verbose=False).taskres_alpha == 0.25
    assert main(["info", out]) == 0
    assert "taskres_alpha" in capsys.readouterr().out
    assert main(["predict", out, str(root / "top" / "0.png"), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"] in ("top", "bottom")


def test_the_bench_method_trains_the_same_objective():
    """``prolip+taskres`` is the library's ProLIP + TaskRes on a bench problem: the same engine, the same objective."""
    import dataclasses

    from test_baselines import make_problem

    from prolip.bench.method_tools import text_prototypes as bench_prototypes
    from prolip.bench.methods.prolip_taskres import ProLIPTaskRes

    problem, test = make_problem(k=5, shots=2, noise=1.0, shift=3.0, seed=1)
    problem = dataclasses.replace(problem, epochs=40)
    head, s = problem.image_head, problem.logit_scale
    result = engine_train(
        problem.train.features, problem.train.labels, None, head.weight, head.bias,
        side=ClassifierResidual(bench_prototypes(problem.classes), 0.5), logit_scale=s, lr=1e-2,
        reg_lambda=1 / problem.shots, epochs=problem.epochs, device=CPU, verbose=False,
    )  # fmt: skip
    expected = LinearHead(result.weight, head.bias).logits(test.features[0], result.classifier, s)
    got = ProLIPTaskRes(alpha=0.5, lr=1e-2).fit(problem).logits(test, problem.classes)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert float((result.classifier - problem.classes.classifier).abs().max()) > 1e-3  # T moved
