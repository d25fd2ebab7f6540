"""Open-vocabulary prediction with the adapted projector: the view, multi-task, the bench's new classes, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import colour_images, run_prolip, tiny_adapter

from prolip import (
    InputError,
    InputTypeError,
    MultiTaskClassifier,
    NotFittedError,
    OpenVocabularyClassifier,
    ProLIPAdapter,
    standin,
)
from prolip.bench.config import BenchConfig
from prolip.bench.data import base_new_split, draw_shots, read_dataset
from prolip.bench.runner import run_bench
from prolip.bench.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest.one_thread

TEMPLATES = ["a photo of a {}.", "a {} thing."]
NAMES = {"red": "red", "green": "green", "blue": "blue"}


@pytest.fixture(scope="module")
def data():
    return colour_images(4, seed=1), colour_images(3, seed=2)


@pytest.fixture(scope="module", params=["image", "text", "image+text"])
def fitted(request, checkpoints, data):
    (images, labels), _ = data
    return tiny_adapter(checkpoints["vit"], templates=TEMPLATES, target=request.param).fit(images, labels)


def test_trained_names_give_the_fitted_predictions_and_nothing_changes(fitted, data):
    _, (test, test_labels) = data
    state, proba = fitted.fitted_, fitted.predict_proba(test)
    view = OpenVocabularyClassifier(fitted, fitted.classes_)  # an array of names; templates: the fitted ones
    assert view.templates_ == TEMPLATES and view.classes_.tolist() == fitted.class_names_
    # T rebuilt from the names (through the trained text projection for a text delta) is the fitted T,
    # up to float rounding of W_t0 + (W_t − W_t0) against W_t.
    torch.testing.assert_close(view.classifier_, fitted.classifier_, atol=1e-5, rtol=0)
    np.testing.assert_allclose(view.predict_proba(test), proba, atol=1e-5)
    assert view.predict(test).tolist() == fitted.predict(test).tolist()
    assert view.score(test, test_labels) == fitted.score(test, test_labels)
    assert fitted.fitted_ is state and fitted.classes_.tolist() == ["blue", "green", "red"]
    np.testing.assert_array_equal(fitted.predict_proba(test), proba)


def test_new_names_use_the_trained_projectors(fitted, data):
    _, (test, _) = data
    names = ["a purple square", fitted.class_names_[2], "a cat", fitted.class_names_[0]]
    view = OpenVocabularyClassifier(fitted, names, TEMPLATES)
    # Each name's row of T depends on that name alone: trained names keep their fitted rows.
    torch.testing.assert_close(view.classifier_[[1, 3]], fitted.classifier_[[2, 0]], atol=1e-5, rtol=0)
    zero_shot = fitted.backbone.classifier(names, TEMPLATES)
    if fitted.target == "image":
        assert torch.equal(view.classifier_, zero_shot)  # same call on the same prompts
    else:  # the trained text projection, not W_t0, builds the new names' rows too
        assert (view.classifier_[[0, 2]] - zero_shot[[0, 2]]).abs().max() > 1e-4
    proba = view.predict_proba(test)
    assert proba.shape == (len(test), 4) and np.allclose(proba.sum(axis=1), 1, atol=1e-6)
    assert set(view.predict(test)) <= set(names)
    features = fitted.extract_features(test, views=0)
    expected = torch.softmax(fitted.logits_from_features(features, view.classifier_), dim=-1).numpy()
    np.testing.assert_array_equal(proba, expected)
    # The adapted projector is what scores them: W0 gives other probabilities.
    if fitted.delta_ is not None:
        base = tiny_adapter(fitted.pretrained, templates=TEMPLATES, epochs=0).fit(*data[0])
        assert np.abs(OpenVocabularyClassifier(base, names, TEMPLATES).predict_proba(test) - proba).max() > 1e-4


def test_bad_names_and_unfitted_adapters_are_refused(checkpoints, data):
    adapter = tiny_adapter(checkpoints["vit"], epochs=2).fit(*data[0])
    for bad, needle in (([], "non-empty"), (["cat", ""], "non-empty"), (["cat", "cat"], "more than once")):
        with pytest.raises(InputError, match=needle):
            OpenVocabularyClassifier(adapter, bad)
    with pytest.raises(InputTypeError, match="class names must be a list"):
        OpenVocabularyClassifier(adapter, "cat")
    with pytest.raises(InputError, match="exactly one"):
        OpenVocabularyClassifier(adapter, ["cat"], ["no slot"])
    with pytest.raises(NotFittedError):
        OpenVocabularyClassifier(tiny_adapter(checkpoints["vit"]), ["cat"])


def test_multitask_scores_other_names_per_task(checkpoints, data):
    (images, labels), (test, _) = data
    image = tiny_adapter(checkpoints["vit"], templates=TEMPLATES).fit(images, labels)
    text = tiny_adapter(checkpoints["vit"], templates=TEMPLATES, target="text").fit(images, labels)
    tasks = MultiTaskClassifier({"image": image, "text": text})
    names = ["a cat", "a dog", "red"]
    view = tasks.with_classes(names)
    proba = view.predict_proba(test)
    for name, adapter in (("image", image), ("text", text)):
        alone = OpenVocabularyClassifier(adapter, names)
        np.testing.assert_allclose(proba[name], alone.predict_proba(test), atol=1e-6)
        assert view.predict(test)[name].tolist() == alone.predict(test).tolist()
        assert view.classes_[name].tolist() == names
    assert tasks.classes_["image"].tolist() == ["blue", "green", "red"]  # the original is unchanged


def test_library_gives_the_bench_new_class_accuracy(mini_suite, tmp_path):
    """On a base-to-new split, the view on the new classes scores exactly what the bench reports as new."""
    root, out = tmp_path / "suite", tmp_path / "run"
    mini_suite.make_suite(root, seed=0, train=4, val=3, test=3)
    n, seed, views, epochs = 2, 1, 2, 5
    common = {"model": standin.MODEL_NAME, "pretrained": standin.PRETRAINED_TAG, "views": views, "epochs": epochs}
    config = BenchConfig(
        setting="base-to-new", data_root=root, out_dir=out, datasets=["oxford_pets"], shots=[n], seeds=[seed],
        methods=["prolip"], templates=standin.TEMPLATES, verbose=False, **common,
    )  # fmt: skip
    (cell,) = run_bench(config)
    base, new = base_new_split(read_dataset("oxford_pets", root))
    adapter = ProLIPAdapter(**common, templates=standin.TEMPLATES, lr=1e-3, device="cpu", verbose=False)
    # The bench's own cached features of the draw and of the new classes' test split.
    store = FeatureStore(adapter.backbone, out / "cache", verbose=False)
    train = store.features(draw_shots(base, n, seed).items, views, seed)
    adapter.fit_features(train.features, train.labels.tolist(), list(base.classnames))
    test = store.features(new.test, 0)
    view = OpenVocabularyClassifier(adapter, list(new.classnames))
    accuracy = view.score_features(test.features, [new.classnames[i] for i in test.labels])
    # The bench reports a float32 mean, the library a Python fraction: the same count of n images.
    assert round(accuracy * len(test.labels)) == round(cell["accuracy"]["new"] * len(test.labels))
    assert accuracy == pytest.approx(cell["accuracy"]["new"], abs=1e-6)


def test_cli_predict_with_classes(checkpoints, data, tmp_path):
    (images, labels), (test, _) = data
    adapter = ProLIPAdapter(standin.MODEL_NAME, standin.PRETRAINED_TAG, views=2, epochs=5, verbose=False)
    adapter.fit(images, labels).save(tmp_path / "colours.safetensors")
    paths = []
    for i, img in enumerate(test[:4]):
        paths.append(str(tmp_path / f"{i}.png"))
        from PIL import Image

        Image.fromarray(img.permute(1, 2, 0).numpy()).save(paths[-1])
    (tmp_path / "names.txt").write_text("# colours\nT-shirt/top\n\nSneaker\nBag\n")
    done = run_prolip(
        "predict", str(tmp_path / "colours.safetensors"), *paths, "--json", "--classes-file",
        str(tmp_path / "names.txt"), "--template", "a photo of a {}.", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    view = OpenVocabularyClassifier(adapter, ["T-shirt/top", "Sneaker", "Bag"], ["a photo of a {}."])
    proba = view.predict_proba(paths)
    assert [r["image"] for r in rows] == paths
    assert [r["label"] for r in rows] == view.predict(paths).tolist()
    for row, p in zip(rows, proba, strict=True):
        assert [row["probabilities"][c] for c in view.class_names_] == pytest.approx(p.tolist(), abs=1e-6)
    done = run_prolip(
        "predict", str(tmp_path / "colours.safetensors"), paths[0], "--classes", "Bag", "Sneaker", "--quiet"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\t")[1] == OpenVocabularyClassifier(adapter, ["Bag", "Sneaker"]).predict(paths[:1])[0]
