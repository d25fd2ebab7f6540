"""``prolip bench`` end to end on a tiny miniature suite with the stand-in CLIP; the few-shot validation search."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import engine_train

from prolip import ProLIPAdapter, ProLIPSearch, standin
from prolip.bench.config import BenchConfig
from prolip.bench.methods import METHODS, FittedMethod, Method
from prolip.bench.runner import run_bench
from prolip.cli import main
from prolip.errors import InputError
from prolip.files.delta import read_state
from prolip.model.head import LinearHead
from prolip.training.engine import TrainConfig
from prolip.variants.search import PAPER_LAMBDAS, PAPER_LRS, search_projector

FAST = {"views": 2, "epochs": 5, "seeds": [1], "verbose": False}


@pytest.fixture(scope="module")
def suite(mini_suite, tmp_path_factory):
    """All 15 datasets in CoOp's layout, 4 train, 3 val and 3 test images per class."""
    root = tmp_path_factory.mktemp("suite")
    mini_suite.make_suite(root, seed=0, train=4, val=3, test=3)
    return root


def bench(setting, suite, out, **kw):
    args = {"data_root": suite, "out_dir": out, "model": standin.MODEL_NAME, "pretrained": standin.PRETRAINED_TAG}
    args["templates"] = standin.TEMPLATES
    return run_bench(BenchConfig(setting=setting, **{**args, **FAST, **kw}))


@pytest.mark.slow
def test_few_shot_end_to_end(suite, tmp_path):
    methods = ["zero-shot", "prolip", "prolip-val", "linear-probe"]
    cells = bench("few-shot", suite, tmp_path, datasets=["caltech101", "dtd"], shots=[1, 2], methods=methods)
    assert len(cells) == 2 * 2 * len(methods)
    assert {(c["dataset"], c["shots"], c["method"]) for c in cells} == {
        (d, n, m) for d in ("caltech101", "dtd") for n in (1, 2) for m in methods
    }
    for c in cells:
        (acc,) = c["accuracy"].values()
        assert 0 <= acc <= 1 and c["fit_seconds"] >= 0
        assert round(acc * 30) == pytest.approx(acc * 30, abs=1e-4)  # 30 test images: a multiple of 1/30
    zero_shot = [c for c in cells if c["method"] == "zero-shot"]
    assert len({json.dumps(c["accuracy"]) for c in zero_shot if c["dataset"] == "dtd"}) == 1  # independent of N
    val = next(c for c in cells if c["method"] == "prolip-val")
    assert val["info"]["lrs"] == list(PAPER_LRS) and len(val["info"]["val_accuracy"]) == 7
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["cells"] == json.loads(json.dumps(cells))
    table = (tmp_path / "table.md").read_text()
    assert "| prolip-val |" in table and "caltech101" in table and "Cost: seconds per training" in table
    assert (tmp_path / "plot.png").stat().st_size > 0
    draw = json.loads((tmp_path / "draws" / "caltech101" / "train-seed1-2shot.json").read_text())
    assert draw["shots"] == 2 and len(draw["items"]) == 2 * 10


class _Interrupting(Method):
    """A method that stops the run the second time it is trained, as a Ctrl-C would."""

    name = "interrupting"
    calls = 0

    def fit(self, problem) -> FittedMethod:
        type(self).calls += 1
        if type(self).calls == 2:
            raise KeyboardInterrupt
        return METHODS["zero-shot"]().fit(problem)


@pytest.mark.slow
def test_an_interrupted_bench_resumes_where_it_stopped(suite, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "interrupting", _Interrupting)
    kw = {"datasets": ["eurosat"], "shots": [1, 2], "methods": ["prolip", "interrupting"]}
    with pytest.raises(KeyboardInterrupt):
        bench("few-shot", suite, tmp_path, **kw)
    done = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert [(c["shots"], c["method"]) for c in done] == [(1, "prolip"), (1, "interrupting"), (2, "prolip")]
    trained = []
    original = METHODS["prolip"].fit
    monkeypatch.setattr(METHODS["prolip"], "fit", lambda self, p: trained.append(p.shots) or original(self, p))
    cells = bench("few-shot", suite, tmp_path, **kw)
    assert trained == [] and len(cells) == 4 and _Interrupting.calls == 3  # only the missing cell ran
    fresh = bench("few-shot", suite, tmp_path / "fresh", **{**kw, "methods": ["prolip"]})
    assert [c["accuracy"] for c in cells if c["method"] == "prolip"] == [c["accuracy"] for c in fresh]
    with pytest.raises(InputError, match="another bench configuration"):
        bench("few-shot", suite, tmp_path, **{**kw, "views": 3})


@pytest.mark.slow
def test_base_to_new(suite, tmp_path):
    cells = bench(
        "base-to-new",
        suite,
        tmp_path,
        datasets=["oxford_pets"],
        shots=[2],
        methods=["zero-shot", "prolip", "linear-probe"],
    )
    by = {c["method"]: c["accuracy"] for c in cells}
    assert set(by["prolip"]) == {"base", "new"} and by["prolip"]["new"] is not None
    assert by["linear-probe"]["new"] is None  # its weights are per base class
    assert "base / new / harmonic mean" in (tmp_path / "table.md").read_text()


@pytest.mark.slow
def test_cross_dataset_and_domain_generalisation(suite, tmp_path):
    methods = ["zero-shot", "prolip", "linear-probe"]
    cross = bench("cross-dataset", suite, tmp_path / "cross", datasets=["dtd", "eurosat"], shots=[1], methods=methods)
    assert {tuple(c["accuracy"]) for c in cross} == {("imagenet", "dtd", "eurosat")}
    probe = next(c for c in cross if c["method"] == "linear-probe")["accuracy"]
    assert probe["imagenet"] is not None and probe["dtd"] is None  # other classes: not scored
    dg = bench("domain-generalisation", suite, tmp_path / "dg", shots=[1], methods=methods)
    targets = ("imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    assert {tuple(c["accuracy"]) for c in dg} == {targets}
    probe = next(c for c in dg if c["method"] == "linear-probe")["accuracy"]
    assert all(probe[t] is not None for t in targets)  # A and R: ImageNet's columns for their 5 classes
    zero = {c["method"]: c["accuracy"] for c in dg}["zero-shot"]
    assert all(zero[t] * 15 == pytest.approx(round(zero[t] * 15)) for t in ("imagenet_a", "imagenet_r"))  # 5 × 3


def test_the_command_line_runs_a_setting(suite, tmp_path, capsys):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n")
    args = ["bench", "few-shot", "--data-root", str(suite), "--datasets", "dtd", "--shots", "1", "--seeds", "1",
            "--methods", "zero-shot", "prolip", "--model", standin.MODEL_NAME, "--pretrained", standin.PRETRAINED_TAG,
            "--out-dir", str(tmp_path / "out"), "--views", "2", "--epochs", "3", "--templates", str(templates), "-q"]  # fmt: skip
    assert main(args) == 0
    assert "| prolip |" in (tmp_path / "out" / "table.md").read_text()
    assert main([*args[:-1], "--methods", "no-such-method"]) == 1
    assert "unknown bench method 'no-such-method'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- few-shot validation
def _problem(seed: int = 0, k: int = 4, n: int = 6, d_in: int = 16, d_out: int = 8):
    """Separable class clusters whose zero-shot classifier is wrong: only training helps."""
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(k, d_in, generator=g)
    labels = torch.arange(k).repeat_interleave(n)
    features = means[labels] + 0.3 * torch.randn(2, len(labels), d_in, generator=g)
    val = means[labels] + 0.3 * torch.randn(len(labels), d_in, generator=g)
    w0 = torch.randn(d_in, d_out, generator=g) / math.sqrt(d_in)
    classifier = F.normalize(torch.randn(k, d_out, generator=g), dim=-1)
    return features, labels, val, classifier, w0


def test_the_search_keeps_the_most_accurate_point_with_the_reference_tie_rule():
    features, labels, val, classifier, w0 = _problem()
    kw = {"logit_scale": 100.0, "epochs": 20, "device": torch.device("cpu"), "verbose": False}
    config, head = TrainConfig(reg_lambda=0.0, **kw), LinearHead(w0)
    found = search_projector(
        features, labels, val, labels, head, classifier, config, lrs=(1e-1, 1e-8), reg_lambdas=(0.0,)
    )
    # A tiny learning rate leaves the wrong zero-shot classifier; a large one learns the clusters.
    assert found.accuracy[1, 0] < 0.6 and found.accuracy[0, 0] == 1.0
    assert (found.lr, found.reg_lambda) == (1e-1, 0.0)
    alone = engine_train(features, labels, classifier, w0, None, lr=1e-1, reg_lambda=0.0, **{**kw, "verbose": False})
    # The chosen point's own training: trained beside the other point (batched products), it rounds otherwise than
    # alone; weights of order 1 after 20 Adam steps at lr 0.1 move ~1e-6 under last-bit changes in the products.
    torch.testing.assert_close(found.result.weight, alone.weight, rtol=1e-5, atol=1e-5)
    # Equal accuracies: the first point in grid order (learning rates outer, λ inner), as the reference loop.
    tie = search_projector(
        features, labels, val, labels, head, classifier, config, lrs=(5e-2, 1e-1), reg_lambdas=(1e-3, 0.0)
    )
    assert tie.accuracy.min() == tie.accuracy.max() == 1.0 and (tie.lr, tie.reg_lambda) == (5e-2, 1e-3)
    # Validation labels decide: labelled as the zero-shot classifier predicts, the untrained point wins.
    zero_shot = (F.normalize(val @ w0, dim=-1) @ classifier.t()).argmax(dim=1)
    other = search_projector(
        features, labels, val, zero_shot, head, classifier, config, lrs=(1e-1, 1e-8), reg_lambdas=(0.0,)
    )
    assert other.accuracy[1, 0] == 1.0 > other.accuracy[0, 0] and other.lr == 1e-8
    with pytest.raises(InputError, match="lrs="):
        search_projector(features, labels, val, labels, head, classifier, config, lrs=())
    assert PAPER_LAMBDAS[-1] == 0.0 and len(PAPER_LRS) == 7


def test_search_estimator_records_the_grid_in_the_delta(checkpoints, tmp_path):
    from conftest import assert_no_near_ties, colour_images, tiny_adapter

    images, labels = colour_images(3)
    val_images, val_labels = colour_images(2, seed=5)
    search = ProLIPSearch(tiny_adapter(checkpoints["vit"], epochs=5), lrs=(1e-1, 1e-3), reg_lambdas=(1.0, 0.0))
    assert search.fit(images, labels, val_images, val_labels) is search
    best = search.best_estimator_
    assert (best.lr, best.reg_lambda) == (search.best_params_["lr"], search.best_params_["reg_lambda"])
    grid = torch.tensor(search.cv_results_["val_accuracy"])
    # The grid scored with W, best with W0 + (W − W0): equal to rounding, so equal accuracies without near-ties.
    assert_no_near_ties(best.logits_from_features(best.extract_features(val_images, views=0)), margin=1e-3)
    assert grid.shape == (2, 2) and float(grid.max()) == best.score(val_images, val_labels)
    search.save(tmp_path / "d.safetensors")
    state = read_state(tmp_path / "d.safetensors")
    assert state.selection == search.cv_results_ and state.hyperparameters["lr"] == best.lr
    loaded = ProLIPAdapter.load(tmp_path / "d.safetensors", pretrained=checkpoints["vit"], verbose=False)
    assert loaded.fitted_.selection == search.cv_results_
    assert (loaded.predict(images) == search.predict(images)).all()  # exact: the stored delta and T read back


def test_methods_take_arguments_in_their_names(suite, tmp_path):
    cells = bench(
        "few-shot", suite, tmp_path, datasets=["dtd"], shots=[1],
        methods=["prolip:lr=1e-2,reg_lambda=0", "prolip:lr=1e-5,reg_lambda=auto"],
    )  # fmt: skip
    info = {c["method"]: {k: c["info"][k] for k in ("lr", "reg_lambda", "train_dtype")} for c in cells}
    assert info == {
        "prolip:lr=1e-2,reg_lambda=0": {"lr": 1e-2, "reg_lambda": 0.0, "train_dtype": "fp32"},
        "prolip:lr=1e-5,reg_lambda=auto": {"lr": 1e-5, "reg_lambda": 1.0, "train_dtype": "fp32"},
    }
    with pytest.raises(InputError, match="unexpected keyword argument 'rate'"):
        bench("few-shot", suite, tmp_path / "x", datasets=["dtd"], shots=[1], methods=["prolip:rate=1"])


# ---------------------------------------------------------------------------- the official scripts' settings
@pytest.mark.slow
def test_each_setting_runs_the_official_defaults_and_says_so(suite, tmp_path):
    """Without --shots or method arguments: 4-shot ImageNet and lr 1e-5 for the transfer settings, lr 1e-3 for few-shot."""
    transfer = bench("cross-dataset", suite, tmp_path / "cross", datasets=["dtd"], methods=["prolip"])
    (cell,) = transfer
    assert cell["shots"] == 4 and cell["info"]["lr"] == 1e-5 and cell["info"]["reg_lambda"] == pytest.approx(1 / 4)
    header = (tmp_path / "cross" / "table.md").read_text().split("**N = ")[0]
    assert "**N**: 4;" in header and "**test sets** (2): imagenet, dtd" in header
    assert "| prolip | 1e-05 | 0.25 |" in header  # what the cells trained with
    base = bench("base-to-new", suite, tmp_path / "b2n", datasets=["dtd"], methods=["prolip", "prolip:lr=1e-2"])
    assert [(c["shots"], c["info"]["lr"]) for c in base] == [(16, 1e-5), (16, 1e-2)]  # an explicit argument wins
    assert "**N**: 16;" in (tmp_path / "b2n" / "table.md").read_text()
    few = bench("few-shot", suite, tmp_path / "few", datasets=["dtd"], shots=[1, 2], methods=["prolip"])
    assert [c["info"]["lr"] for c in few] == [1e-3, 1e-3]
    table = (tmp_path / "few" / "table.md").read_text()
    assert "**N**: 1, 2;" in table and "| prolip | 0.001 | 1/N |" in table  # what ran, not the setting's N


@pytest.mark.slow
def test_every_cell_records_the_hyperparameters_it_trained_with(suite, tmp_path):
    methods = sorted(METHODS)
    cells = bench("few-shot", suite, tmp_path, datasets=["dtd"], shots=[2], methods=methods)
    info = {c["method"]: c["info"] for c in cells}
    for name in methods:
        arguments = set(inspect.signature(METHODS[name]).parameters)
        assert arguments <= set(info[name]), name  # every constructor argument, as set or as resolved
    for name in ("prolip", "rla", "prolip-text", "prolip+taskres", "prolip+tip-adapter"):
        assert info[name]["reg_lambda"] == pytest.approx(1 / 2), name  # λ resolved from 1/N
        assert info[name]["train_dtype"] == "fp32"
    assert info["prolip-val"]["lr"] in PAPER_LRS and info["test-time-prolip"]["lr"] == 5e-3
    assert isinstance(info["taskres"]["epochs"], int) and isinstance(info["clip-adapter"]["epochs"], int)  # from N


def test_reg_lambda_one_over_n_squared(suite, tmp_path, colours):
    cells = bench(
        "few-shot",
        suite,
        tmp_path,
        datasets=["dtd"],
        shots=[2],
        methods=["prolip:reg_lambda=1/N^2", "rla:reg_lambda=1/N^2"],
    )
    assert [c["info"]["reg_lambda"] for c in cells] == [pytest.approx(1 / 4)] * 2
    images, labels = colours  # 4 per class
    adapter = ProLIPAdapter(
        standin.MODEL_NAME, standin.PRETRAINED_TAG, reg_lambda="1/N^2", views=1, epochs=2, verbose=False
    )
    assert adapter.fit(images, labels).reg_lambda_ == pytest.approx(1 / 16)
    with pytest.raises(InputError, match="'1/N\\^2'"):
        ProLIPAdapter(standin.MODEL_NAME, standin.PRETRAINED_TAG, reg_lambda="1/N^3").fit(images, labels)


def test_fp16_training_in_the_bench(suite, tmp_path):
    methods = ["prolip:lr=1e-5", "prolip:lr=1e-5,train_dtype=fp16", "rla:train_dtype=fp16", "prolip-text:train_dtype=fp16",
               "prolip+taskres:train_dtype=fp16", "prolip+tip-adapter:keys=official,train_dtype=fp16"]  # fmt: skip
    cells = bench("few-shot", suite, tmp_path, datasets=["dtd"], shots=[2], methods=methods, epochs=20)
    info = {c["method"]: c["info"] for c in cells}
    assert info["prolip:lr=1e-5"]["w_unchanged"] < 0.01  # fp32 applies every update
    assert info["prolip:lr=1e-5,train_dtype=fp16"]["w_unchanged"] > 0.1  # fp16 rounds many of them away
    assert all(info[m]["train_dtype"] == "fp16" for m in methods[1:])
    assert all(0 <= c["accuracy"]["dtd"] <= 1 for c in cells)


def test_tip_adapter_official_keys_score_with_the_trained_projector(suite, tmp_path):
    """keys="official": the cache's affinities use the trained W, as ProLIP_Tip.py's aliased "frozen" projection."""
    from prolip.bench.adapted import adapted_problem
    from prolip.bench.method_tools import plain_embeddings
    from prolip.variants.tip_cache import cache_scores

    seen = {}
    original = METHODS["prolip+tip-adapter"]._fit_joint

    def spy(self, problem, official, **kw):
        seen["problem"] = problem
        seen["fitted"] = original(self, problem, official, **kw)
        return seen["fitted"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(METHODS["prolip+tip-adapter"], "_fit_joint", spy)
        cells = bench(
            "few-shot", suite, tmp_path, datasets=["dtd"], shots=[2], methods=["prolip+tip-adapter:keys=official"]
        )
    problem, fitted = seen["problem"], seen["fitted"]
    test = problem.val  # any plain-view features
    f = plain_embeddings(adapted_problem(problem, fitted.weight).image_head, test)
    classes = problem.classes
    expected = problem.logit_scale * f @ classes.classifier.t() + cache_scores(
        f @ fitted.keys.t(), problem.train.labels, len(classes), 1.0
    )
    # The same operations on the same shapes as _JointCache.logits (one chunk): equal bit for bit.
    assert torch.equal(fitted.logits(test, classes), expected)
    assert cells[0]["info"]["keys"] == "official" and cells[0]["info"]["lr"] == 1e-4
