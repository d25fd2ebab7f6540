"""train_projector against the plain autograd + torch.optim loop it replaces."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import engine_grid, engine_train
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_training import reference_logits, reference_train, reference_train_fp16

from prolip import InputError, TrainingDivergedError, TrainingWarning
from prolip.training.engine import TrainResult

CPU = torch.device("cpu")


def problem(views=3, n=12, d_in=48, d_out=24, k=3, bias=False, seed=0):
    """Random features, labels, unit-norm classifier, W0 (and bias) shaped like a small CLIP."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(views, n, d_in, generator=gen)
    labels = torch.arange(n) % k
    classifier = F.normalize(torch.randn(k, d_out, generator=gen), dim=-1)
    w0 = torch.randn(d_in, d_out, generator=gen) / math.sqrt(d_in)
    b = torch.randn(d_out, generator=gen) if bias else None
    return features, labels, classifier, w0, b


def both(features, labels, classifier, w0, bias, **kw) -> tuple[TrainResult, TrainResult]:
    kw.setdefault("logit_scale", 100.0)
    fast = engine_train(features, labels, classifier, w0, bias, device=CPU, verbose=False, **kw)
    slow = reference_train(features, labels, classifier, w0, bias, **kw)
    return fast, slow


def assert_same(fast: TrainResult, slow: TrainResult, w0: torch.Tensor) -> None:
    torch.testing.assert_close(fast.losses, slow.losses, rtol=1e-5, atol=1e-5)
    # Adam divides by |g| + eps, so rounding in near-zero gradients moves single entries by up to
    # about lr·1e-4; the learned change W − W0 must agree to a thousandth of its own size.
    change = slow.weight - w0
    torch.testing.assert_close(fast.weight - w0, change, rtol=0, atol=1e-3 * float(change.abs().max()))


@pytest.mark.parametrize("k", [3, 20], ids=["few-classes", "many-classes"])  # both log-softmax paths
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("reg_lambda", [0.0, 0.25])
def test_matches_autograd_and_torch_adam(with_bias, reg_lambda, k):
    features, labels, classifier, w0, bias = problem(n=2 * k, k=k, bias=with_bias)
    fast, slow = both(features, labels, classifier, w0, bias, lr=1e-2, reg_lambda=reg_lambda, epochs=40)
    assert (fast.weight - w0).abs().max() > 0.05  # it trained far enough for differences to show
    assert fast.losses[-1] < fast.losses[0]
    assert_same(fast, slow, w0)


def test_steps_cycle_through_views():
    # More steps than views, and one view alone gives a different result: views are really used.
    features, labels, classifier, w0, bias = problem(views=4)
    fast, slow = both(features, labels, classifier, w0, bias, lr=1e-3, reg_lambda=1.0, epochs=10)
    assert_same(fast, slow, w0)
    one_view, _ = both(features[:1], labels, classifier, w0, bias, lr=1e-3, reg_lambda=1.0, epochs=10)
    assert not torch.allclose(one_view.weight, fast.weight, rtol=1e-5, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(
    n_per_class=st.integers(1, 4),
    k=st.integers(2, 6),
    views=st.integers(1, 3),
    epochs=st.integers(1, 12),
    lr=st.sampled_from([1e-4, 1e-3, 1e-2]),
    reg_lambda=st.sampled_from([0.0, 1e-2, 1.0]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_on_random_problems(n_per_class, k, views, epochs, lr, reg_lambda, with_bias, seed):
    features, labels, classifier, w0, bias = problem(
        views=views, n=n_per_class * k, d_in=20, d_out=12, k=k, bias=with_bias, seed=seed
    )
    fast, slow = both(features, labels, classifier, w0, bias, lr=lr, reg_lambda=reg_lambda, epochs=epochs)
    assert_same(fast, slow, w0)


def test_first_loss_is_the_objective_at_w0():
    features, labels, classifier, w0, bias = problem(bias=True)
    fast, _ = both(features, labels, classifier, w0, bias, lr=1e-3, reg_lambda=0.5, epochs=2)
    expected = F.cross_entropy(reference_logits(features[0], w0, bias, classifier, 100.0), labels)
    torch.testing.assert_close(fast.losses[0], expected)


def test_w0_bias_and_features_are_only_read():
    features, labels, classifier, w0, bias = problem(bias=True)
    param = torch.nn.Parameter(w0.clone())
    before = [t.clone() for t in (features, classifier, param.detach(), bias)]
    result = engine_train(
        features, labels, classifier, param, bias,
        logit_scale=100.0, lr=1e-2, reg_lambda=0.1, epochs=5, device=CPU, verbose=False,
    )  # fmt: skip
    for old, new in zip(before, (features, classifier, param.detach(), bias), strict=True):
        assert torch.equal(old, new)  # bit-for-bit: untouched, vs copies
    assert param.requires_grad and param.grad is None
    assert result.weight.dtype == torch.float32 and not result.weight.requires_grad
    assert result.weight.data_ptr() != param.data_ptr()
    assert not torch.equal(result.weight, w0)  # it trained (far from W0, not a matter of rounding)


def test_transposed_w0_as_stored_by_nn_linear():
    features, labels, classifier, w0, bias = problem(bias=True)
    linear = torch.nn.Linear(w0.shape[0], w0.shape[1])
    with torch.no_grad():
        linear.weight.copy_(w0.t())
        linear.bias.copy_(bias)
    fast, slow = both(features, labels, classifier, linear.weight.t(), linear.bias, lr=1e-2, reg_lambda=0.5, epochs=10)
    assert_same(fast, slow, w0)
    assert fast.weight.is_contiguous() and fast.weight.shape == w0.shape
    assert torch.equal(linear.weight, w0.t())  # bit-for-bit: untouched, vs the copy it was given


def test_half_precision_features_train_in_fp32():
    features, labels, classifier, w0, bias = problem()
    fast = engine_train(
        features.half(), labels, classifier, w0.half(), bias,
        logit_scale=100.0, lr=1e-2, reg_lambda=0.0, epochs=5, device=CPU, verbose=False,
    )  # fmt: skip
    slow = reference_train(
        features.half().float(), labels, classifier, w0.half().float(), bias,
        logit_scale=100.0, lr=1e-2, reg_lambda=0.0, epochs=5,
    )  # fmt: skip
    assert fast.weight.dtype == torch.float32
    assert_same(fast, slow, w0.half().float())


@pytest.mark.parametrize(
    ("scale", "lr", "reg_lambda"),
    [
        (1e38, 1e-3, 0.0),  # xW overflows to Inf, and Inf / Inf is NaN
        (1.0, 1e37, 1.0),  # W runs off to Inf and takes the penalty with it
    ],
)
def test_divergence_names_lr_and_lambda(scale, lr, reg_lambda):
    features, labels, classifier, w0, bias = problem()
    with pytest.raises(TrainingDivergedError) as info:
        engine_train(
            features * scale, labels, classifier, w0, bias,
            logit_scale=100.0, lr=lr, reg_lambda=reg_lambda, epochs=20, device=CPU, verbose=False,
        )  # fmt: skip
    message = str(info.value)
    assert f"lr={lr}" in message and f"reg_lambda={reg_lambda}" in message


@pytest.mark.parametrize("reg_lambda", [0.0, 1.0])
def test_a_loss_that_ends_far_above_its_start_warns(reg_lambda):
    features, labels, classifier, w0, bias = problem()
    with pytest.warns(TrainingWarning, match=re.escape(f"lr={1e12} and reg_lambda={reg_lambda}")):
        result = engine_train(
            features, labels, classifier, w0, bias,
            logit_scale=100.0, lr=1e12, reg_lambda=reg_lambda, epochs=10, device=CPU, verbose=False,
        )  # fmt: skip
    assert result.losses[-1] > 2 * result.losses[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary fit stays silent
        engine_train(
            features, labels, classifier, w0, bias,
            logit_scale=100.0, lr=1e-3, reg_lambda=reg_lambda, epochs=10, device=CPU, verbose=False,
        )  # fmt: skip


def test_losses_are_the_reference_losses_at_a_high_learning_rate():
    # Without the penalty a high lr moves W far; the loss curve must still be the reference one.
    features, labels, classifier, w0, bias = problem(views=2, bias=True)
    fast, slow = both(features, labels, classifier, w0, bias, lr=0.1, reg_lambda=0.0, epochs=15)
    torch.testing.assert_close(fast.losses, slow.losses, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [3, 20], ids=["few-classes", "many-classes"])
def test_a_grid_trains_each_point_as_alone(k):
    features, labels, classifier, w0, bias = problem(views=3, n=4 * k, k=k, bias=True)
    points = [(1e-2, 0.0), (1e-3, 0.25), (5e-2, 1.0), (1e-2, 0.25)]
    grid = engine_grid(
        features, labels, classifier, w0, bias, logit_scale=100.0, points=points, epochs=12, device=CPU, verbose=False
    )
    for (lr, reg_lambda), together in zip(points, grid, strict=True):
        alone = engine_train(
            features, labels, classifier, w0, bias,
            logit_scale=100.0, lr=lr, reg_lambda=reg_lambda, epochs=12, device=CPU, verbose=False,
        )  # fmt: skip
        # Batched and single products may round differently; each point is its own training all the same.
        torch.testing.assert_close(together.losses, alone.losses, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together.weight, alone.weight, rtol=1e-5, atol=1e-6)
    # A diverging point is reported as None without disturbing the others.
    wild = engine_grid(
        features * 1e38,
        labels,
        classifier,
        w0,
        bias,
        logit_scale=100.0,
        points=points[:2],
        epochs=3,
        device=CPU,
        verbose=False,
    )
    assert wild == [None, None]


# ---------------------------------------------------------------------------- the official fp16 numerics
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("lr", "reg_lambda"), [(1e-5, 0.25), (1e-3, 1.0), (1e-3, 0.0)])
def test_fp16_training_is_the_official_fp16_loop(with_bias, lr, reg_lambda):
    features, labels, classifier, w0, b = problem(bias=with_bias, k=5, n=20)
    kw = {"logit_scale": 100.0, "lr": lr, "reg_lambda": reg_lambda, "epochs": 40}
    fast = engine_train(features, labels, classifier, w0, b, device=CPU, verbose=False, train_dtype="fp16", **kw)
    slow = reference_train_fp16(features, labels, classifier, w0, b, **kw)
    # Both run the same fp16 operations on the same shapes; only the schedule's learning rate is
    # computed differently (closed form vs CosineAnnealingLR's recursion, equal to ~1e-16), which
    # can move an update across an fp16 rounding boundary: at most one fp16 step (2^-11 relative) per entry.
    step = torch.finfo(torch.float16).eps * slow.weight.abs().clamp_min(2**-14)
    assert ((fast.weight - slow.weight).abs() <= step).all()
    assert (fast.weight != slow.weight).float().mean() < 0.01
    torch.testing.assert_close(fast.losses, slow.losses, rtol=2e-3, atol=2e-3)
    # And it is not the fp32 loop: fp16 rounding is visible at this scale.
    fp32 = engine_train(features, labels, classifier, w0, b, device=CPU, verbose=False, **kw)
    assert (fp32.weight - slow.weight).abs().max() > step.max()


def test_fp16_leaves_small_updates_unapplied():
    """At lr 1e-5 most updates are below half an fp16 step of W's entries: they stay at W0 (rounded)."""
    features, labels, classifier, w0, _ = problem(k=5, n=20)
    kw = {"logit_scale": 100.0, "lr": 1e-5, "reg_lambda": 0.25, "epochs": 30}
    half = engine_train(features, labels, classifier, w0, None, device=CPU, verbose=False, train_dtype="fp16", **kw)
    full = engine_train(features, labels, classifier, w0, None, device=CPU, verbose=False, **kw)
    assert (half.weight == w0.half().float()).float().mean() > 0.2
    assert (full.weight == w0).float().mean() < 0.01


def test_fp16_grid_points_are_lone_fp16_fits():
    features, labels, classifier, w0, _ = problem(k=3)
    points = [(1e-3, 0.5), (1e-2, 0.0)]
    grid = engine_grid(
        features, labels, classifier, w0, None, logit_scale=100.0, points=points, epochs=10, device=CPU,
        verbose=False, train_dtype="fp16",
    )  # fmt: skip
    for (lr, lam), result in zip(points, grid, strict=True):
        alone = engine_train(
            features, labels, classifier, w0, None, logit_scale=100.0, lr=lr, reg_lambda=lam, epochs=10,
            device=CPU, verbose=False, train_dtype="fp16",
        )  # fmt: skip
        assert torch.equal(result.weight, alone.weight)  # the same function on the same inputs


def test_an_unknown_train_dtype_is_refused():
    features, labels, classifier, w0, _ = problem()
    with pytest.raises(InputError, match="train_dtype='bf16'"):
        engine_train(
            features, labels, classifier, w0, None, logit_scale=100.0, lr=1e-3, reg_lambda=0.0, epochs=2,
            device=CPU, verbose=False, train_dtype="bf16",
        )  # fmt: skip


@pytest.mark.parametrize("side_kind", ["taskres", "none"])
def test_the_fp16_loop_is_the_fp32_loop_but_for_its_dtype(side_kind, monkeypatch):
    """Run in fp32, the fp16 loop's autograd recipe is train_projector's closed-form one (to float rounding);
    in fp16 it stores W (and R) as fp16 values."""
    from prolip.training import engine
    from prolip.training.sides import ClassifierResidual

    features, labels, classifier, w0, _ = problem(k=3)
    side = ClassifierResidual(classifier * 3.0, 0.5) if side_kind == "taskres" else None
    t = None if side else classifier
    run = {"logit_scale": 100.0, "lr": 1e-3, "reg_lambda": 0.5, "epochs": 30, "device": CPU, "verbose": False}
    stored = engine_train(features, labels, t, w0, None, side=side, train_dtype="fp16", **run)
    for got in (stored.weight, stored.classifier_weight if side else stored.weight):
        assert torch.equal(got, got.half().float())
    full = engine_train(features, labels, t, w0, None, side=side, **run)
    monkeypatch.setattr(engine, "HALF", torch.float32)
    same_dtype = engine_train(features, labels, t, w0, None, side=side, train_dtype="fp16", **run)
    change = full.weight - w0
    assert float((same_dtype.weight - full.weight).norm() / change.norm()) < 1e-5
    if side:
        torch.testing.assert_close(same_dtype.classifier_weight, full.classifier_weight, rtol=1e-5, atol=1e-6)
