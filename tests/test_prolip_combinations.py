"""ProLIP combined with Tip-Adapter and TaskRes, against reference loops written separately here."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from reference_training import reference_train
from test_baselines import accuracy, make_problem, zero_shot_logits

from prolip import InputError
from prolip.bench.adapted import adapted_problem, prolip_weight, train_config
from prolip.bench.method_tools import text_prototypes
from prolip.bench.methods import get_method
from prolip.bench.methods.prolip_taskres import ProLIPTaskRes
from prolip.bench.methods.prolip_tip_adapter import ProLIPTipAdapter
from prolip.bench.methods.tip_adapter_f import TipAdapterF
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.model.head import LinearHead
from prolip.variants.tip_cache import ALPHAS, BETAS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread


def in_float64(problem: Problem, test: FeatureSet) -> tuple[Problem, FeatureSet]:
    """The same problem and test set in float64, so that two loops agree far below 1e-5."""

    def f64(features: FeatureSet) -> FeatureSet:
        return FeatureSet(features.features.double(), features.labels)

    head, classes = problem.image_head, problem.classes
    return (
        dataclasses.replace(
            problem,
            train=f64(problem.train),
            train_plain=f64(problem.train_plain),
            val=f64(problem.val),
            classes=Classes(classes.names, classes.classifier.double(), dataclasses.replace(
                classes.text, prompts=classes.text.prompts.double(), head=classes.text.head.frozen(dtype=torch.float64)
            )),
            image_head=head.frozen(dtype=torch.float64),
        ),
        f64(test),
    )  # fmt: skip


def embed(x, w, b):
    z = x @ w + b
    return z / z.norm(dim=-1, keepdim=True)


def cache_term(f, keys, key_labels, k, alpha, beta):
    return alpha * torch.exp(-beta * (1 - f @ keys.T)) @ F.one_hot(key_labels, k).to(f)


@pytest.fixture(scope="module")
def shifted():
    return make_problem(k=5, shots=2, noise=1.0, shift=3.0, seed=1)


def clustered(k=4, clusters=4, shots=16, d=8, seed=2):
    """Each class is four tight clusters in a space too small for one linear map to separate them all."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k * clusters, d, generator=g)
    w0 = torch.randn(d, d, generator=g) / math.sqrt(d)

    def draw(per_class, views):
        labels = torch.arange(k).repeat_interleave(per_class)
        which = torch.randint(clusters, (len(labels),), generator=g) + labels * clusters
        return FeatureSet(centers[which] + 0.15 * torch.randn(views, len(labels), d, generator=g), labels)

    of_class = torch.arange(k).repeat_interleave(clusters)
    classifier = F.normalize(torch.stack([embed(centers[of_class == c], w0, 0).mean(0) for c in range(k)]), dim=-1)
    train = draw(shots, 12)
    problem = Problem(
        train=train,
        train_plain=FeatureSet(train.features[:1].clone(), train.labels),
        val=draw(shots, 1),
        classes=Classes([f"class {i}" for i in range(k)], classifier),
        image_head=LinearHead(w0),
        logit_scale=100.0,
        shots=shots,
        seed=seed,
    )
    return problem, draw(50, 1)


# ---------------------------------------------------------------------------- ProLIP + Tip-Adapter
def test_tip_with_no_cache_weight_is_prolip_exactly(shifted):
    problem, test = shifted
    weight = prolip_weight(problem, train_config(problem))
    expected = LinearHead(weight, problem.image_head.bias).logits(
        test.features[0], problem.classes.classifier, problem.logit_scale
    )
    got = ProLIPTipAdapter(alpha=0.0, beta=1.0).fit(problem).logits(test, problem.classes)
    # bit-for-bit: the same W (the same training run twice), (s · normalize(x W + b)) @ Tᵀ on the same [n, d] rows
    # on both sides, and the cache adds an exact 0
    assert torch.equal(got, expected)


def test_tip_cache_on_adapted_embeddings_matches_the_reference(shifted):
    problem, test = shifted
    head, labels, k, s = problem.image_head, problem.train.labels, len(problem.classes), problem.logit_scale
    weight = prolip_weight(problem, train_config(problem))
    # The projector itself: ProLIP's fast loop against the autograd reference (as tests/test_training.py).
    slow = reference_train(
        problem.train.features, labels, problem.classes.classifier, head.weight, head.bias,
        logit_scale=s, lr=1e-3, reg_lambda=1 / problem.shots, epochs=problem.epochs,
    ).weight  # fmt: skip
    change = slow - head.weight
    torch.testing.assert_close(weight - head.weight, change, rtol=0, atol=1e-3 * float(change.abs().max()))
    # The cache on top of it, with the library's W: keys average 10 augmented views (cycling through the 6 there are).
    views = problem.train.features
    keys = F.normalize(sum(views[v % len(views)] @ weight + head.bias for v in range(10)), dim=-1)
    f = embed(test.features[0], weight, head.bias)
    expected = s * f @ problem.classes.classifier.T + cache_term(f, keys, labels, k, 2.0, 3.0)
    got = ProLIPTipAdapter(alpha=2.0, beta=3.0).fit(problem).logits(test, problem.classes)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    # α and β: the best validation accuracy over the grid, first in β-major order.
    val = embed(problem.val.features[0], weight, head.bias)
    best, chosen = -1.0, None
    for beta in BETAS:
        for alpha in ALPHAS:
            scores = s * val @ problem.classes.classifier.T + cache_term(val, keys, labels, k, alpha, beta)
            correct = int((scores.argmax(dim=1) == problem.val.labels).sum())
            if correct > best:
                best, chosen = correct, (alpha, beta)
    info = ProLIPTipAdapter().fit(problem).info
    assert (info["alpha"], info["beta"]) == pytest.approx(chosen, rel=1e-12)


def test_tip_beats_prolip_where_classes_are_not_linearly_separable():
    problem, test = clustered()
    weight = prolip_weight(problem, train_config(problem))
    prolip = accuracy(LinearHead(weight).logits(test.features[0], problem.classes.classifier, 100.0), test.labels)
    combined = accuracy(get_method("prolip+tip-adapter").fit(problem).logits(test, problem.classes), test.labels)
    trained = accuracy(ProLIPTipAdapter(keys="trained").fit(problem).logits(test, problem.classes), test.labels)
    assert prolip < 0.8 and combined > prolip + 0.2 and trained > prolip + 0.2


def test_trained_keys_are_tip_adapter_f_on_the_adapted_embeddings(shifted):
    problem, test = shifted
    expected = (
        TipAdapterF()
        .fit(adapted_problem(problem, prolip_weight(problem, train_config(problem))))
        .logits(test, problem.classes)
    )
    fitted = ProLIPTipAdapter(keys="trained").fit(problem)
    # bit-for-bit: the method is these calls, the same ops on the same shapes
    assert torch.equal(fitted.logits(test, problem.classes), expected) and fitted.info["keys"] == "trained"


def test_joint_training_matches_the_public_code_recipe(shifted):
    problem, test = in_float64(*shifted)
    problem = dataclasses.replace(problem, epochs=40)
    head, labels, k, s = problem.image_head, problem.train.labels, len(problem.classes), problem.logit_scale
    w = torch.nn.Parameter(head.weight.clone())
    keys = torch.nn.Parameter(F.normalize(problem.train.features[0] @ head.weight + head.bias, dim=-1))
    opt = torch.optim.AdamW([w, keys], lr=1e-2, eps=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=problem.epochs)
    for step in range(problem.epochs):
        x = problem.train.features[step % problem.train.n_views]
        f, f0 = embed(x, w, head.bias), embed(x, head.weight, head.bias)
        scores = s * f @ problem.classes.classifier.T + cache_term(f0, keys, labels, k, 1.0, 1.0)
        loss = F.cross_entropy(scores, labels) + ((w - head.weight) ** 2).sum() / problem.shots
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    with torch.no_grad():
        f, f0 = embed(test.features[0], w, head.bias), embed(test.features[0], head.weight, head.bias)
        expected = s * f @ problem.classes.classifier.T + cache_term(f0, keys, labels, k, 1.0, 1.0)
    got = ProLIPTipAdapter(keys="joint", lr=1e-2).fit(problem).logits(test, problem.classes)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    untrained = ProLIPTipAdapter(keys="joint", lr=1e-12).fit(problem)  # (a learning rate must be positive)
    assert (got - untrained.logits(test, problem.classes)).abs().max() > 0.1


def test_tip_options_are_checked():
    from prolip.bench.methods import get_method

    with pytest.raises(InputError, match=r"bench method 'prolip\+tip-adapter:keys=random': keys='random' is invalid"):
        get_method("prolip+tip-adapter:keys=random")  # the bench's one check of a method's arguments
    with pytest.raises(InputError, match="alpha and beta"):
        ProLIPTipAdapter(keys="joint", alpha=1.0, beta=1.0)
    problem, test = make_problem(k=3, shots=2, seed=3)
    with pytest.raises(InputError, match="classes"):
        ProLIPTipAdapter().fit(problem).logits(test, Classes(["a", "b"], problem.classes.classifier[:2]))


# ---------------------------------------------------------------------------- ProLIP + TaskRes
@pytest.mark.parametrize("form", ["taskres", "prolip-code"])
def test_taskres_matches_the_reference_loop(shifted, form):
    problem, test = in_float64(*shifted)
    problem = dataclasses.replace(problem, epochs=40)
    head, labels, s, t = problem.image_head, problem.train.labels, problem.logit_scale, problem.classes.classifier
    alpha, lr = 0.5, 1e-2
    base = text_prototypes(problem.classes) if form == "taskres" else t
    w = torch.nn.Parameter(head.weight.clone())
    r = torch.nn.Parameter(torch.zeros_like(base))
    opt = torch.optim.Adam([w, r], lr=lr, eps=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=problem.epochs)

    def scores(x, w, r):
        if form == "taskres":
            prototypes = base + alpha * r
            return s * embed(x, w, head.bias) @ (prototypes / prototypes.norm(dim=1, keepdim=True)).T
        return s * embed(x, w, head.bias) @ t.T + alpha * s * embed(x, head.weight, head.bias) @ r.T

    for step in range(problem.epochs):
        x = problem.train.features[step % problem.train.n_views]
        loss = F.cross_entropy(scores(x, w, r), labels) + ((w - head.weight) ** 2).sum() / problem.shots
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    with torch.no_grad():
        expected = scores(test.features[0], w, r)
    fitted = ProLIPTaskRes(form=form, alpha=alpha, lr=lr).fit(problem)
    got = fitted.logits(test, problem.classes)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert float(r.detach().abs().max()) > 1e-3  # the residual trained
    assert fitted.info == {"form": form, "alpha": alpha, "lr": lr, "reg_lambda": 1 / problem.shots}


def test_taskres_beats_prolip_and_zero_shot_when_the_text_is_off(shifted):
    problem, test = shifted
    weight = prolip_weight(problem, train_config(problem))
    prolip = accuracy(
        LinearHead(weight, problem.image_head.bias).logits(test.features[0], problem.classes.classifier, 100.0),
        test.labels,
    )
    zero_shot = accuracy(zero_shot_logits(problem, test), test.labels)
    combined = accuracy(get_method("prolip+taskres").fit(problem).logits(test, problem.classes), test.labels)
    assert zero_shot < 0.4 and combined > zero_shot + 0.3 and combined > prolip


def test_taskres_with_a_frozen_residual_is_prolip(shifted):
    problem, test = shifted
    weight = prolip_weight(problem, train_config(problem))
    got = ProLIPTaskRes(form="prolip-code", alpha=0.0, lr=1e-3).fit(problem).logits(test, problem.classes)
    expected = LinearHead(weight, problem.image_head.bias).logits(test.features[0], problem.classes.classifier, 100.0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)  # autograd vs ProLIP's own loop
    from prolip.bench.methods import get_method

    with pytest.raises(InputError, match="form='other' is invalid"):
        get_method("prolip+taskres:form=other")
