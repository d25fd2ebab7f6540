"""MultiTaskClassifier: several deltas on one base model give each adapter's own predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import colour_images, tiny_adapter

from prolip import FingerprintMismatchError, InputError, InputTypeError, NotFittedError, ProLIPAdapter
from prolip.variants.multitask import MultiTaskClassifier

WARMTH = {"red": "warm", "green": "cool", "blue": "cool"}
BRIGHT = {"red": 1, "green": 0, "blue": 1}


@pytest.fixture(scope="module")
def saved(checkpoints, tmp_path_factory) -> dict[str, str]:
    """Three tasks with different label sets, fitted on the same tiny base model and saved."""
    images, colours = colour_images(3)
    folder = tmp_path_factory.mktemp("deltas")
    tasks = {
        "colour": (colours, None),
        "warmth": ([WARMTH[c] for c in colours], None),
        "bright": ([BRIGHT[c] for c in colours], {0: "dark thing", 1: "bright thing"}),
    }
    paths = {}
    for name, (labels, class_names) in tasks.items():
        adapter = tiny_adapter(checkpoints["vit"], views=2, epochs=10, random_state=len(name))
        adapter.fit(images, labels, class_names)
        paths[name] = str(folder / f"{name}.safetensors")
        adapter.save(paths[name])
    return paths


@pytest.fixture(scope="module")
def test_images() -> list[torch.Tensor]:
    return colour_images(2, seed=1)[0]


def test_predictions_equal_each_adapter_alone(saved, test_images, checkpoints):
    clf = MultiTaskClassifier(list(saved.values()), pretrained=checkpoints["vit"])
    assert clf.tasks == ["colour", "warmth", "bright"]
    proba, labels = clf.predict_proba(test_images), clf.predict(test_images)
    assert list(proba) == list(labels) == clf.tasks
    for name, path in saved.items():
        alone = ProLIPAdapter.load(path, pretrained=checkpoints["vit"], verbose=False)
        np.testing.assert_allclose(proba[name], alone.predict_proba(test_images), rtol=0, atol=1e-6)
        # exact: the same features (one extraction, same batch), delta and T: the same ops on the same shapes
        np.testing.assert_array_equal(labels[name], alone.predict(test_images))
        np.testing.assert_array_equal(clf.classes_[name], alone.classes_)  # labels, not computed
        assert proba[name].shape == (len(test_images), len(alone.classes_))
    assert set(labels["warmth"]) <= {"warm", "cool"} and set(labels["bright"]) <= {0, 1}


def test_trunk_runs_once_per_image_on_one_shared_model(saved, test_images, checkpoints):
    clf = MultiTaskClassifier(saved, pretrained=checkpoints["vit"])
    models = {id(clf._adapters[name].backbone.model) for name in clf.tasks}
    assert len(models) == 1  # every delta was loaded onto the first task's model object
    seen = []
    trunk = clf._base.backbone.model.visual.transformer
    handle = trunk.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        clf.predict(test_images)
    finally:
        handle.remove()
    assert sum(seen) == len(test_images)


def test_names_from_a_dict_and_fitted_adapters(saved, test_images, checkpoints):
    images, colours = colour_images(3)
    fitted = tiny_adapter(checkpoints["vit"], views=2, epochs=10).fit(images, [WARMTH[c] for c in colours])
    clf = MultiTaskClassifier({"mine": fitted, "colours": saved["colour"]})  # onto the adapter's own model
    assert clf.tasks == ["mine", "colours"]
    proba = clf.predict_proba(test_images)
    np.testing.assert_allclose(proba["mine"], fitted.predict_proba(test_images), rtol=0, atol=1e-6)
    colour = ProLIPAdapter.load(saved["colour"], pretrained=checkpoints["vit"], verbose=False)
    np.testing.assert_allclose(proba["colours"], colour.predict_proba(test_images), rtol=0, atol=1e-6)
    assert MultiTaskClassifier([fitted, saved["warmth"]]).tasks == ["task0", "warmth"]


def test_a_delta_for_another_base_model_is_refused(saved, tmp_path, checkpoints):
    import open_clip

    with torch.random.fork_rng():
        torch.manual_seed(1)
        other = open_clip.create_model("test-vit-tiny")
    images, colours = colour_images(3)
    stranger = ProLIPAdapter(other, views=2, epochs=5, device="cpu", verbose=False).fit(images, colours)
    path = tmp_path / "stranger.safetensors"
    stranger.save(path)
    with pytest.raises(FingerprintMismatchError, match=r"stranger\.safetensors"):
        MultiTaskClassifier([saved["colour"], path], pretrained=checkpoints["vit"])
    with pytest.raises(FingerprintMismatchError, match="'odd'"):
        MultiTaskClassifier({"colour": saved["colour"], "odd": stranger}, pretrained=checkpoints["vit"])


def test_bad_task_lists_are_refused(saved, checkpoints):
    with pytest.raises(InputError, match="empty"):
        MultiTaskClassifier([])
    with pytest.raises(InputError, match="'colour'"):
        MultiTaskClassifier([saved["colour"], saved["colour"]], pretrained=checkpoints["vit"])
    with pytest.raises(InputTypeError):
        MultiTaskClassifier(saved["colour"])
    with pytest.raises(InputTypeError, match="int"):
        MultiTaskClassifier([saved["colour"], 3], pretrained=checkpoints["vit"])
    with pytest.raises(NotFittedError):
        MultiTaskClassifier([tiny_adapter(checkpoints["vit"])])
    fitted = ProLIPAdapter.load(saved["colour"], pretrained=checkpoints["vit"], verbose=False)
    with pytest.raises(InputError, match="pretrained"):
        MultiTaskClassifier([fitted, saved["warmth"]], pretrained=checkpoints["vit"])
