"""The regularised linear adapter: against its own autograd loop, on embeddings from anywhere, saved and shared."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_argmax, edit_delta
from safetensors import safe_open

from prolip import DeltaFileError, InputError, NotFittedError, ProLIPAdapter, RegularizedLinearAdapter
from prolip.files.delta import read_state
from prolip.training.fitted import CLASSIFIER_KEY, LINEAR_ADAPTER_KEY

SCALE = 100.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread


def embedding_problem(views=3, n_per_class=4, k=3, d=16, seed=0):
    """Embeddings whose classes a linear map can separate, and a text classifier pushed off them."""
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(1, d, generator=g) + torch.randn(k, d, generator=g)
    labels = torch.arange(k).repeat_interleave(n_per_class)
    embeddings = means[labels] + 0.5 * torch.randn(views, len(labels), d, generator=g)
    classifier = F.normalize(F.normalize(means, dim=-1) + torch.randn(k, d, generator=g), dim=-1)
    return embeddings, labels, classifier


def reference_rla(embeddings, labels, classifier, *, lr, reg_lambda, epochs, scale=SCALE):
    """RLA written out for autograd: A from I, Adam(eps=1e-4) with CosineAnnealingLR, step t on view t mod V."""
    d = embeddings.shape[-1]
    identity = torch.eye(d)
    a = identity.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([a], lr=lr, betas=(0.9, 0.999), eps=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    losses = []
    for step in range(epochs):
        f = embeddings[step % embeddings.shape[0]] @ a
        out = scale * (f / f.norm(dim=-1, keepdim=True)) @ classifier.T
        loss = F.cross_entropy(out, labels) + reg_lambda * ((a - identity) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return a.detach(), torch.tensor(losses)


def rla(**kw) -> RegularizedLinearAdapter:
    return RegularizedLinearAdapter(**{"device": "cpu", "verbose": False, "logit_scale": SCALE, **kw})


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("reg_lambda", ["auto", 0.0, 2.0])
def test_matches_an_independent_autograd_loop(reg_lambda):
    embeddings, labels, classifier = embedding_problem()
    fitted = rla(lr=1e-2, epochs=40, reg_lambda=reg_lambda).fit_embeddings(embeddings, labels.tolist(), classifier)
    lam = 1 / 4 if reg_lambda == "auto" else reg_lambda
    a, losses = reference_rla(embeddings, labels, classifier, lr=1e-2, reg_lambda=lam, epochs=40)
    assert fitted.reg_lambda_ == lam
    assert float((a - torch.eye(16)).norm()) > 0.1  # it moved far enough for differences to show
    assert relative(torch.from_numpy(fitted.loss_history_), losses) < 1e-5
    assert relative(fitted.delta_, a - torch.eye(16)) < 1e-5


def test_fits_the_shifted_classes_and_starts_from_zero_shot():
    embeddings, labels, classifier = embedding_problem(views=4, n_per_class=8, seed=1)
    test, test_labels, _ = embedding_problem(views=1, n_per_class=30, seed=1)
    zero_shot = rla(epochs=0).fit_embeddings(embeddings, labels.tolist(), classifier)
    assert torch.equal(zero_shot.delta_, torch.zeros(16, 16))  # exact: nothing trained
    # Zero-shot's labels: the adapter multiplies by A = I and renormalises T, which rounds otherwise; logits near 100
    # agree to ~1e-5, so the labels agree wherever no near-tie.
    expected = SCALE * F.normalize(test[0], dim=-1) @ classifier.T
    assert_same_argmax(zero_shot.predict(test[0]), expected, margin=1e-3, classes=zero_shot.classes_)
    trained = rla(lr=1e-2).fit_embeddings(embeddings, labels.tolist(), classifier)
    assert trained.score(test[0], test_labels.tolist()) > zero_shot.score(test[0], test_labels.tolist()) + 0.2
    torch.testing.assert_close(trained.transform(test[0]), test[0] @ (torch.eye(16) + trained.delta_))


def test_classifier_as_rows_a_mapping_or_a_text_encoder():
    embeddings, labels, classifier = embedding_problem()
    names = ["cat", "dog", "owl"]
    y = [names[i] for i in labels]
    by_rows = rla(epochs=5).fit_embeddings(embeddings.numpy(), y, classifier.numpy() * 3)  # arrays; rows renormalised
    by_map = rla(epochs=5).fit_embeddings(embeddings, y, {n: classifier[i] for i, n in enumerate(names)})
    torch.testing.assert_close(by_rows.delta_, by_map.delta_)
    assert by_rows.class_names_ == names
    torch.testing.assert_close(by_rows.classifier_, classifier)
    prompts_seen = []
    g = torch.Generator().manual_seed(3)
    table = {f"{t} {n}": torch.randn(16, generator=g) for n in names for t in ("a", "the")}

    def encoder(texts):
        prompts_seen.append(list(texts))
        return np.stack([table[t].numpy() for t in texts])

    encoded = rla(epochs=0, templates=["a {}", "the {}"]).fit_embeddings(embeddings, y, text_encoder=encoder)
    assert prompts_seen == [["a cat", "the cat"], ["a dog", "the dog"], ["a owl", "the owl"]]
    # Written out: each prompt normalised, averaged over the two templates, normalised.
    expected = torch.stack([F.normalize(table[f"a {n}"], dim=0) + F.normalize(table[f"the {n}"], dim=0) for n in names])
    torch.testing.assert_close(encoded.classifier_, F.normalize(expected, dim=-1))
    assert encoded.fitted_.templates == ("a {}", "the {}")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda e, y, t: rla().fit_embeddings(e, y), "classifier=T, or a text_encoder"),
        (lambda e, y, t: rla().fit_embeddings(e, y, t, text_encoder=lambda p: None), "not both"),
        (lambda e, y, t: rla().fit_embeddings(e, y, t[:2]), r"shape \(2, 16\)"),
        (lambda e, y, t: rla().fit_embeddings(e, y[:5], t), "12 images but 5 labels"),
        (lambda e, y, t: rla().fit_embeddings(e, y, {0: t[0]}), r"no row for label\(s\) \[1, 2\]"),
        (lambda e, y, t: rla().fit_embeddings(e.int(), y, t), "floating point"),
        (lambda e, y, t: rla(lr=-1).fit_embeddings(e, y, t), "lr=-1"),
        (lambda e, y, t: rla().fit_embeddings(e, y, text_encoder=lambda p: np.zeros((2, 16))), "one finite embedding"),
        (lambda e, y, t: rla().fit_embeddings(e, y, text_encoder=lambda p: np.zeros((1, 16))), "non-zero rows"),
    ],
)
@pytest.mark.filterwarnings("ignore:labels are not strings")
def test_input_errors_name_what_to_fix(call, match):
    embeddings, labels, classifier = embedding_problem()
    with pytest.raises((InputError, TypeError), match=match):
        call(embeddings, labels.tolist(), classifier)


def test_unfitted_and_wrong_width():
    with pytest.raises(NotFittedError, match="fit_embeddings"):
        rla().predict(torch.zeros(2, 16))
    embeddings, labels, classifier = embedding_problem()
    fitted = rla(epochs=2).fit_embeddings(embeddings, labels.tolist(), classifier)
    with pytest.raises(InputError, match=r"needs \[V, n, 16\].*image embeddings"):
        fitted.predict(torch.zeros(2, 8))
    with pytest.raises(InputError, match="3 views"):
        fitted.predict(embeddings)


# ---------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    embeddings, labels, classifier = embedding_problem()
    fitted = rla(lr=1e-2, epochs=20).fit_embeddings(
        embeddings, [f"c{i}" for i in labels], classifier, source=("ViT-B-32", "openai")
    )
    path = tmp_path_factory.mktemp("rla") / "rla.safetensors"
    fitted.save(path)
    return fitted, path


def test_save_load_predicts_identically(saved):
    fitted, path = saved
    loaded = RegularizedLinearAdapter.load(path, device="cpu")
    test = embedding_problem(views=1, seed=5)[0][0]
    # bit-for-bit: the stored A − I, T and s read back: the same ops on the same shapes
    assert torch.equal(loaded.logits_from_embeddings(test), fitted.logits_from_embeddings(test))
    saved_params = ("lr", "reg_lambda", "epochs", "logit_scale", "templates")
    assert [loaded.get_params()[k] for k in saved_params] == [fitted.get_params()[k] for k in saved_params]
    state = loaded.fitted_
    assert (state.model_name, state.pretrained, state.templates) == ("ViT-B-32", "openai", ())
    assert isinstance(read_state(path), type(state))


def test_the_file_holds_a_minus_identity_and_t(saved):
    fitted, path = saved
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        assert torch.equal(f.get_tensor(LINEAR_ADAPTER_KEY), fitted.delta_)  # bit-for-bit: stored tensor
    assert keys == {LINEAR_ADAPTER_KEY, CLASSIFIER_KEY}
    config = json.loads(meta["config"])
    assert meta["kind"] == "linear_adapter" and meta["format_version"] == "3" and config["templates"] == []


def test_each_loader_refuses_the_other_kind(saved, tmp_path, checkpoints, colours):
    _, path = saved
    assert read_state(path).kind == "linear_adapter"
    with pytest.raises(
        DeltaFileError, match=r"holds a linear_adapter fit, not a projector one.*RegularizedLinearAdapter\.load"
    ):
        ProLIPAdapter.load(path)
    from conftest import tiny_adapter

    projector = tmp_path / "projector.safetensors"
    tiny_adapter(checkpoints["vit"], epochs=1).fit(*colours).save(projector)
    with pytest.raises(DeltaFileError, match=r"holds a projector fit.*ProLIPAdapter\.load"):
        RegularizedLinearAdapter.load(projector)


@pytest.mark.parametrize(
    ("meta", "config", "tensors", "match"),
    [
        (lambda m: m.pop("kind"), None, None, r"lacks prolip metadata \['kind'"),
        (lambda m: m.update(kind="adapter"), None, None, "'kind': expected one of"),
        (lambda m: m.update(kind="projector"), None, None, "holds another kind's contents"),
        (None, lambda c: c.pop("classes"), None, r"lacks prolip metadata \['classes'\]"),
        (None, lambda c: c.update(reg_lambda=-1), None, "'reg_lambda'"),
        (
            None,
            None,
            lambda t: t.update({LINEAR_ADAPTER_KEY: t[LINEAR_ADAPTER_KEY][:, :8].contiguous()}),
            "inconsistent",
        ),
        (None, None, lambda t: t.update({CLASSIFIER_KEY: t[CLASSIFIER_KEY][:, :8].contiguous()}), "inconsistent"),
        (None, None, lambda t: t.update({LINEAR_ADAPTER_KEY: t[LINEAR_ADAPTER_KEY].double()}), "inconsistent"),
        (None, None, lambda t: t.update({"visual.proj": torch.zeros(4, 4)}), "holds tensors"),
        (None, None, lambda t: t.pop(LINEAR_ADAPTER_KEY), "holds tensors"),
        (None, None, lambda t: t[LINEAR_ADAPTER_KEY].view(-1).__setitem__(0, math.inf), "NaN or Inf"),
        (None, lambda c: c.update(hyperparameters={"lr": -1}), None, "invalid hyperparameters"),
    ],
)
def test_the_strict_reader_refuses_damaged_adapters(saved, tmp_path, meta, config, tensors, match):
    _, path = saved
    damaged = edit_delta(path, tmp_path / "damaged.safetensors", meta=meta, config=config, tensors=tensors)
    with pytest.raises(DeltaFileError, match=match) as info:
        RegularizedLinearAdapter.load(damaged)
    assert repr(str(damaged)) in str(info.value)


def test_shared_through_a_folder(saved, tmp_path):
    from prolip.files.hub import DELTA_FILENAME

    fitted, _ = saved
    fitted.save_pretrained(tmp_path / "shared", metrics={"accuracy": 0.5})
    card = (tmp_path / "shared" / "README.md").read_text()
    assert "RegularizedLinearAdapter.from_pretrained" in card and "`c0`" in card and "ViT-B-32" in card
    pulled = RegularizedLinearAdapter.from_pretrained(tmp_path / "shared")
    # bit-for-bit: a stored tensor read back
    assert torch.equal(pulled.delta_, fitted.delta_) and (tmp_path / "shared" / DELTA_FILENAME).is_file()


# ---------------------------------------------------------------------------- bench
def test_bench_rla_beats_zero_shot_and_transfers():
    from test_baselines import accuracy, make_problem, zero_shot_logits

    from prolip.bench.methods import get_method
    from prolip.bench.problem import Classes

    problem, test = make_problem(k=5, shots=8, noise=1.0, shift=3.0, seed=1)
    method = get_method("rla")
    assert method.transfers
    fitted = method.fit(problem)
    zero_shot = zero_shot_logits(problem, test)
    assert accuracy(fitted.logits(test, problem.classes), test.labels) > accuracy(zero_shot, test.labels) + 0.15
    # Other classes are scored with their own classifier through the same A.
    others = Classes(["a", "b"], problem.classes.classifier[[3, 1]])
    torch.testing.assert_close(fitted.logits(test, others), fitted.logits(test, problem.classes)[:, [3, 1]])
    untrained = type(method)(lr=1e-12).fit(problem)
    torch.testing.assert_close(untrained.logits(test, problem.classes), zero_shot, rtol=1e-4, atol=1e-3)
