"""The bench's baselines on small synthetic problems whose behaviour is known.

Problems are built straight from random tensors (:func:`make_problem`): pre-projection features are
class means plus noise (with a component shared by every image, as CLIP embeddings have), the
image head is a random projection, and the zero-shot classifier T is the true class directions
pushed off by ``shift`` (so zero-shot is poor when ``shift`` is large).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_argmax

from prolip.bench.method_tools import WARMUP_LR, text_prototypes, warmup_cosine_lr
from prolip.bench.methods import FittedMethod, get_method
from prolip.bench.methods.clap import CLAP
from prolip.bench.methods.clip_adapter import ClipAdapter
from prolip.bench.methods.linear_probe import LinearProbe, fit_logistic, search_c
from prolip.bench.methods.lp_plus_plus import LPPlusPlus
from prolip.bench.methods.taskres import TaskRes
from prolip.bench.methods.tip_adapter import TipAdapter
from prolip.bench.methods.tip_adapter_f import TipAdapterF
from prolip.bench.problem import Classes, FeatureSet, Problem
from prolip.errors import InputError
from prolip.model.head import LinearHead
from prolip.training.sides import TextSide
from prolip.variants.tip_cache import ALPHAS, BETAS, search_alpha_beta

BASELINES = ["linear-probe", "lp++", "clap", "tip-adapter", "tip-adapter-f", "clip-adapter", "taskres"]
VALIDATION_FREE = ["lp++", "clap", "taskres"]


def make_problem(
    k: int = 4,
    shots: int = 8,
    views: int = 6,
    d_in: int = 32,
    d_out: int = 16,
    noise: float = 1.0,
    shift: float = 0.0,
    seed: int = 0,
    test_per_class: int = 40,
) -> tuple[Problem, FeatureSet]:
    """A problem and a test set drawn from the same classes."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_in, d_out, generator=g) / math.sqrt(d_in)
    means = 2 * torch.randn(1, d_in, generator=g) + torch.randn(k, d_in, generator=g)

    def draw(per_class: int, n_views: int) -> FeatureSet:
        labels = torch.arange(k).repeat_interleave(per_class)
        return FeatureSet(means[labels] + noise * torch.randn(n_views, len(labels), d_in, generator=g), labels)

    true_directions = F.normalize(means @ w0, dim=-1)
    classifier = F.normalize(true_directions + shift * torch.randn(k, d_out, generator=g) / math.sqrt(d_out), dim=-1)
    # Two templates per class; unnormalised text embeddings of norm about 1: small d_out makes Adam's
    # per-coordinate steps short, so this keeps them as long, relative to the prototypes, as at d = 512.
    text = TextSide(
        torch.randn(k, 2, 8, generator=g) / math.sqrt(8),
        LinearHead(torch.randn(8, d_out, generator=g) / math.sqrt(d_out)),
    )
    train = draw(shots, views)
    problem = Problem(
        train=train,
        train_plain=FeatureSet(train.features[:1].clone(), train.labels),
        val=draw(shots, 1),
        classes=Classes([f"class {i}" for i in range(k)], classifier, text),
        image_head=LinearHead(w0, 0.1 * torch.randn(d_out, generator=g)),
        logit_scale=100.0,
        shots=shots,
        seed=seed,
    )
    return problem, draw(test_per_class, 1)


def with_val_labels(problem: Problem, labels: torch.Tensor) -> Problem:
    """The same problem with other validation labels."""
    return Problem(**{**vars(problem), "val": FeatureSet(problem.val.features, labels)})


def zero_shot_logits(problem: Problem, test: FeatureSet) -> torch.Tensor:
    return get_method("zero-shot").fit(problem).logits(test, problem.classes)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread


@pytest.fixture(scope="module")
def shifted() -> tuple[Problem, FeatureSet]:
    """An easy problem on which zero-shot is poor: T is far off the true class directions."""
    return make_problem(k=5, shots=8, noise=1.0, shift=3.0, seed=1)


@pytest.fixture(scope="module")
def fits(shifted) -> dict[str, FittedMethod]:
    """Every baseline, with its defaults, fitted once on the shifted problem."""
    return {name: get_method(name).fit(shifted[0]) for name in BASELINES}


# ---------------------------------------------------------------------------- every baseline
def test_every_baseline_is_registered_and_says_whether_it_transfers():
    transfers = {name: get_method(name).transfers for name in BASELINES}
    assert transfers == {name: name == "clip-adapter" for name in BASELINES}


@pytest.mark.parametrize("name", BASELINES)
def test_beats_zero_shot_on_a_shifted_problem(name, shifted, fits):
    problem, test = shifted
    zero_shot = accuracy(zero_shot_logits(problem, test), test.labels)
    assert zero_shot < 0.4  # the construction: T is misaligned
    assert accuracy(fits[name].logits(test, problem.classes), test.labels) > zero_shot + 0.15


@pytest.mark.parametrize("name", BASELINES)
def test_same_problem_same_result(name, shifted, fits):
    problem, test = shifted
    again = get_method(name).fit(problem)
    # bit-for-bit: the same fit and logits on the same inputs, so the same ops on the same shapes
    assert torch.equal(again.logits(test, problem.classes), fits[name].logits(test, problem.classes))
    assert again.info == fits[name].info


@pytest.mark.parametrize("name", [n for n in BASELINES if n != "clip-adapter"])
def test_methods_that_do_not_transfer_refuse_other_classes(name, shifted, fits):
    problem, test = shifted
    others = Classes(["a", "b"], problem.classes.classifier[:2])
    with pytest.raises(InputError, match="classes"):
        fits[name].logits(test, others)


def test_clip_adapter_scores_unseen_classes_with_their_own_text():
    problem, test = make_problem(seed=3)
    fitted = ClipAdapter(ratio=0.0, epochs=1).fit(problem)
    others = Classes(["a", "b"], problem.classes.classifier[[2, 0]])
    # Not bit-for-bit: scoring 2 classes and picking 2 columns of a 4-class product are matrix products of
    # other shapes, whose BLAS kernels round differently (1.5e-5 apart on an AMD EPYC). Logits near 100 in
    # fp32 (ulp 7.6e-6): 1e-4 is a dozen ulps, far below any difference the adapter or the classes would make.
    expected = zero_shot_logits(problem, test)[:, [2, 0]]
    torch.testing.assert_close(fitted.logits(test, others), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", VALIDATION_FREE)
def test_validation_free_methods_ignore_the_validation_draw(name, shifted, fits):
    problem, test = shifted
    reversed_labels = with_val_labels(problem, problem.val.labels.flip(0))
    logits = get_method(name).fit(reversed_labels).logits(test, problem.classes)
    # bit-for-bit: these methods never read the validation labels, so both fits run the same ops on the same shapes
    assert torch.equal(logits, fits[name].logits(test, problem.classes))


# ---------------------------------------------------------------------------- untrained = zero-shot
def test_tip_adapter_with_no_cache_weight_is_zero_shot():
    problem, test = make_problem(seed=5, shift=2.0)
    fitted = TipAdapter(alpha=0.0, beta=1.0).fit(problem)
    # bit-for-bit: both compute (s · normalize(x W0 + b)) @ Tᵀ on the same [n, d] rows, and the cache adds an exact 0
    assert torch.equal(fitted.logits(test, problem.classes), zero_shot_logits(problem, test))


def test_clip_adapter_with_no_residual_is_zero_shot():
    problem, test = make_problem(seed=5, shift=2.0)
    fitted = ClipAdapter(ratio=0.0).fit(problem)
    # bit-for-bit: 0 · MLP(f) + 1 · f is f exactly, then the same (s · normalize(f)) @ Tᵀ on the same shapes
    assert torch.equal(fitted.logits(test, problem.classes), zero_shot_logits(problem, test))


@pytest.mark.parametrize(
    "method", [TaskRes(alpha=0.0), TaskRes(epochs=0), CLAP(epochs=0)], ids=["alpha0", "epochs0", "clap"]
)
def test_text_residual_and_clap_start_from_zero_shot(method):
    problem, test = make_problem(seed=5, shift=2.0)
    logits = method.fit(problem).logits(test, problem.classes)
    expected = zero_shot_logits(problem, test)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)  # other ops: logits near 100 agree to rounding
    assert_same_argmax(logits.argmax(dim=1), expected, margin=1e-3)  # so labels agree wherever no near-tie


def test_tip_adapter_f_without_training_is_tip_adapter():
    problem, test = make_problem(seed=6, shift=2.0)
    plain = TipAdapter().fit(problem)
    untrained = TipAdapterF(epochs=0).fit(problem)
    assert untrained.info == plain.info
    # bit-for-bit: no training step leaves the keys a copy of Tip-Adapter's: the same ops on the same shapes
    assert torch.equal(untrained.logits(test, problem.classes), plain.logits(test, problem.classes))


def test_lp_plus_plus_starts_from_class_sums_blended_with_text():
    problem, test = make_problem(seed=7, shift=2.0)
    fitted = LPPlusPlus(epochs=0).fit(problem)
    # Reference, written from the paper's and the public code's initialisation.
    f = F.normalize(problem.image_head.project(problem.train.features[0]), dim=-1)
    t = problem.classes.classifier
    y = problem.train.labels
    k = len(problem.classes)
    sums = torch.stack([f[y == c].sum(dim=0) for c in range(k)])
    alpha = 250 * torch.stack([(f[y == c] @ t[c]).mean() for c in range(k)]).mean()
    f_test = F.normalize(problem.image_head.project(test.features[0]), dim=-1)
    expected = f_test @ sums.t() + alpha * f_test @ t.t()
    torch.testing.assert_close(fitted.logits(test, problem.classes), expected, rtol=1e-5, atol=1e-4)


def test_lp_plus_plus_training_fits_the_support_set(shifted):
    problem, _ = shifted
    plain = problem.train_plain
    before = accuracy(LPPlusPlus(epochs=0).fit(problem).logits(plain, problem.classes), plain.labels)
    after = accuracy(LPPlusPlus().fit(problem).logits(plain, problem.classes), plain.labels)
    assert after == 1.0 and before < 1.0


# ---------------------------------------------------------------------------- selection on val only
def test_tip_adapter_choices_follow_the_validation_labels():
    problem, _ = make_problem(seed=8, shift=3.0)
    zero_shot_agrees = with_val_labels(problem, zero_shot_logits(problem, problem.val).argmax(dim=1))
    assert TipAdapter().fit(zero_shot_agrees).info["alpha"] == ALPHAS[0]  # zero-shot is perfect: least cache
    assert TipAdapter().fit(problem).info["alpha"] > ALPHAS[0]


def test_clip_adapter_ratio_follows_the_validation_labels():
    problem, _ = make_problem(seed=8, shift=3.0)
    zero_shot_agrees = with_val_labels(problem, zero_shot_logits(problem, problem.val).argmax(dim=1))
    assert ClipAdapter().fit(zero_shot_agrees).info["ratio"] < ClipAdapter().fit(problem).info["ratio"]


def test_linear_probe_choice_follows_the_validation_labels():
    problem, _ = make_problem(seed=8, shift=3.0)
    # Every C fits this easy draw: the tie goes to the weak penalty. Scrambled labels favour no C.
    scrambled = with_val_labels(problem, problem.val.labels.flip(0))
    assert LinearProbe().fit(problem).info["C"] > 1e3 > LinearProbe().fit(scrambled).info["C"]


def test_search_alpha_beta_breaks_ties_like_the_original():
    # One identical key per class adds the same score to every class: every grid point ties.
    f = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    t = torch.eye(4)
    labels = (f @ t.t()).argmax(dim=1)
    keys = f[:1].expand(4, -1)
    assert search_alpha_beta(f, labels, t, keys, torch.arange(4), 100.0) == (ALPHAS[0], BETAS[0], 1.0)
    # The same search with scrambled labels still returns the first of its ties.
    alpha, beta, _ = search_alpha_beta(f, labels.flip(0), t, keys, torch.arange(4), 100.0)
    assert (alpha, beta) == (ALPHAS[0], BETAS[0])


def test_search_c_finds_the_peak_of_a_unimodal_score():
    peak = 3.7
    found = search_c(lambda c: -abs(math.log10(c) - math.log10(peak)))
    assert abs(math.log10(found) - math.log10(peak)) < 0.02


def test_selection_needs_a_validation_draw():
    problem, _ = make_problem(seed=9)
    empty = Problem(**{**vars(problem), "val": FeatureSet(problem.val.features[:, :0], problem.val.labels[:0])})
    for method in (LinearProbe(), TipAdapter(), TipAdapterF(), ClipAdapter()):
        with pytest.raises(InputError, match="validation"):
            method.fit(empty)
    assert LinearProbe(c=1.0).fit(empty).info == {"C": 1.0}


# ---------------------------------------------------------------------------- pieces
def test_linear_probe_separates_separable_clusters():
    problem, test = make_problem(k=6, shots=4, noise=0.3, seed=10)
    fitted = LinearProbe(c=1e4).fit(problem)
    assert accuracy(fitted.logits(problem.train_plain, problem.classes), problem.train_plain.labels) == 1.0
    assert accuracy(fitted.logits(test, problem.classes), test.labels) > 0.95


def test_logistic_regression_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    problem, _ = make_problem(k=5, shots=10, noise=2.0, seed=11)
    x = F.normalize(problem.image_head.project(problem.train_plain.features[0]), dim=-1)
    y = problem.train_plain.labels
    for c in (0.1, 10.0, 1000.0):
        weight, bias = fit_logistic(x, y, 5, c, tol=1e-8)
        reference = sklearn.LogisticRegression(C=c, max_iter=1000, tol=1e-8).fit(x.double().numpy(), y.numpy())
        scale = float(abs(reference.coef_).max())
        torch.testing.assert_close(weight.t().double(), torch.from_numpy(reference.coef_), rtol=0, atol=1e-4 * scale)
        torch.testing.assert_close(bias.double(), torch.from_numpy(reference.intercept_), rtol=0, atol=1e-4 * scale)


def test_warm_up_then_cosine_like_dassl():
    base, epochs = 0.1, 7
    param = torch.zeros(1, requires_grad=True)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([param], lr=base), epochs)
    expected = [WARMUP_LR]
    for _ in range(epochs - 1):  # after the warm-up epoch the cosine starts from its first value
        expected.append(cosine.get_last_lr()[0])
        cosine.optimizer.step()
        cosine.step()
    assert [warmup_cosine_lr(base, e, epochs) for e in range(epochs)] == pytest.approx(expected)


def test_text_prototypes_keep_zero_shot_directions_at_the_text_scale():
    problem, _ = make_problem(seed=12)
    prototypes = text_prototypes(problem.classes)
    raw = (problem.classes.text.prompts @ problem.classes.text.start).mean(dim=1)
    torch.testing.assert_close(F.normalize(prototypes, dim=-1), problem.classes.classifier)
    torch.testing.assert_close(prototypes.norm(dim=-1), raw.norm(dim=-1))
    no_text = Classes(problem.classes.names, problem.classes.classifier)
    assert torch.equal(text_prototypes(no_text), problem.classes.classifier)  # bit-for-bit: a copy of T


def test_tip_adapter_takes_both_cache_settings_or_neither():
    with pytest.raises(InputError, match="alpha and beta"):
        TipAdapter(alpha=1.0)
