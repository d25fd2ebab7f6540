"""Bad input gives a clear prolip error naming the item and the fix; on_error="skip"; divergence."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import colour_images, tiny_adapter
from PIL import Image

from prolip import (
    ImageLoadError,
    InputError,
    InputTypeError,
    NotFittedError,
    ProLIPAdapter,
    ProLIPError,
    TrainingDivergedError,
)
from prolip.errors import DeltaFileError, SkippedImagesWarning
from prolip.features.images import SkippedImage


@pytest.fixture(scope="module")
def data() -> tuple[list[torch.Tensor], list[str]]:
    return colour_images(4)


@pytest.fixture(scope="module")
def features(checkpoints, data) -> torch.Tensor:
    return tiny_adapter(checkpoints["vit"]).extract_features(data[0])


@pytest.fixture(scope="module")
def fitted(checkpoints, data, features) -> ProLIPAdapter:
    return tiny_adapter(checkpoints["vit"], epochs=3).fit_features(features, data[1])


def bad_files(folder: Path) -> dict[str, Path]:
    """One file (or folder) per way an image path can be unreadable."""
    rng = np.random.default_rng(0)
    good = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    good.save(folder / "good.jpg", quality=90)
    good.save(folder / "good.png")
    jpg, png = (folder / "good.jpg").read_bytes(), (folder / "good.png").read_bytes()
    files = {
        "missing": folder / "missing.jpg",
        "zero-byte": folder / "empty.jpg",
        "truncated JPEG": folder / "cut.jpg",
        "truncated PNG": folder / "cut.png",
        "text named .jpg": folder / "notes.jpg",
        "directory": folder / "photos.jpg",
    }
    files["zero-byte"].touch()
    files["truncated JPEG"].write_bytes(jpg[: len(jpg) // 2])
    files["truncated PNG"].write_bytes(png[: len(png) // 2])
    files["text named .jpg"].write_text("this is not a picture\n")
    files["directory"].mkdir()
    return files


# ---------------------------------------------------------------------------------------- inputs
def test_error_hierarchy_subclasses_builtin_types():
    import prolip.errors as errors

    for name in ("InputError", "ImageLoadError", "NotFittedError", "DeltaFileError", "ModelLoadError"):
        assert issubclass(getattr(errors, name), (ProLIPError)) and issubclass(getattr(errors, name), ValueError)
    for name in ("InputTypeError", "UnsupportedModelError"):
        assert issubclass(getattr(errors, name), ProLIPError) and issubclass(getattr(errors, name), TypeError)
    assert issubclass(errors.TrainingDivergedError, ProLIPError)
    assert issubclass(errors.FingerprintMismatchError, errors.DeltaFileError)


def test_empty_image_list(checkpoints, fitted):
    adapter = tiny_adapter(checkpoints["vit"])
    with pytest.raises(InputError, match="empty"):
        adapter.fit([], [])
    with pytest.raises(InputError, match="empty"):
        adapter.extract_features([])
    with pytest.raises(InputError, match="empty"):
        fitted.predict([])


def test_images_and_labels_of_different_lengths(checkpoints, data, features):
    images, labels = data
    adapter = tiny_adapter(checkpoints["vit"])
    with pytest.raises(InputError, match="12 images but 11 labels"):
        adapter.fit(images, labels[:-1])
    with pytest.raises(InputError, match="12 images but 13 labels"):
        adapter.fit_features(features, [*labels, "red"])


def test_a_single_class_is_refused_before_extracting_features(checkpoints, features, tmp_path):
    adapter = tiny_adapter(checkpoints["vit"])
    with pytest.raises(InputError, match=r"all labels are 'cat'.*at least two classes"):
        adapter.fit_features(features, ["cat"] * 12)
    # The label check comes first: unreadable paths are never opened.
    with pytest.raises(InputError, match="at least two classes"):
        adapter.fit([str(tmp_path / "missing.jpg")] * 3, ["cat"] * 3)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_in_features(checkpoints, data, features, fitted, value):
    bad = features.clone()
    bad[1, 4, 7] = value
    with pytest.raises(InputError, match=r"NaN or Inf \(first at view 1, image 4, column 7\).*re-extract"):
        tiny_adapter(checkpoints["vit"]).fit_features(bad, data[1])
    with pytest.raises(InputError, match="image 4"):
        fitted.logits_from_features(bad[1:2])


def test_features_of_the_wrong_width_or_shape(checkpoints, data, features, fitted):
    adapter = tiny_adapter(checkpoints["vit"])
    with pytest.raises(InputError, match=r"shape \(3, 12, 40\).*\[V, n, 48\].*extract_features"):
        adapter.fit_features(features[..., :40], data[1])
    with pytest.raises(InputError, match="shape"):
        adapter.fit_features(features[:0], data[1])  # zero views
    with pytest.raises(InputError, match="shape"):
        fitted.predict_features(torch.zeros(5, 64))
    with pytest.raises(InputTypeError, match=r"must be a torch\.Tensor"):
        adapter.fit_features(features.numpy(), data[1])
    with pytest.raises(InputTypeError, match="floating point"):
        adapter.fit_features(features.long(), data[1])


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ([[0], [1], [2]] * 4, r"label 0 \(\[0\]\) is not hashable"),
        ([{"a": 1}] * 12, "label 0 .* is not hashable"),
        (["red"] * 11 + [{"blue"}], "label 11 .* is not hashable"),
        (np.zeros((12, 2)), "label 0 .* is not hashable"),
        (None, "labels must be a sequence"),
        ("redgreenblue", "labels must be a sequence"),
        (5, "labels must be a sequence"),
        ({"red": 1}, "labels must be a sequence"),
        ({"red", "green"}, "labels must be a sequence"),
        ((lab for lab in "rgb"), "labels must be a sequence"),
    ],
)
def test_labels_that_are_not_hashable_or_not_a_sequence(checkpoints, data, features, labels, match):
    with pytest.raises(InputTypeError, match=match):
        tiny_adapter(checkpoints["vit"]).fit_features(features, labels)
    with pytest.raises(InputTypeError, match=match):
        tiny_adapter(checkpoints["vit"]).fit(data[0][:3] * 4, labels)


def test_tensor_labels_are_values_not_objects(checkpoints, features):
    adapter = tiny_adapter(checkpoints["vit"], epochs=1)
    adapter.fit_features(features, torch.tensor([0, 1, 2] * 4), class_names=["red", "green", "blue"])
    assert list(adapter.classes_) == [0, 1, 2]


def test_use_before_fit(checkpoints, data, features, tmp_path):
    adapter = tiny_adapter(checkpoints["vit"])
    calls = {
        "predict": lambda: adapter.predict(data[0]),
        "predict_proba": lambda: adapter.predict_proba(data[0]),
        "score": lambda: adapter.score(data[0], data[1]),
        "save": lambda: adapter.save(tmp_path / "d.safetensors"),
        "logits_from_features": lambda: adapter.logits_from_features(features[:1]),
        "merged_model": adapter.merged_model,
        "predict_features": lambda: adapter.predict_features(features[:1]),
        "score_features": lambda: adapter.score_features(features[:1], data[1]),
    }
    for name, call in calls.items():
        with pytest.raises(NotFittedError, match=r"not fitted yet; call fit\(images, labels\)"):
            call()
        assert not (tmp_path / "d.safetensors").exists(), name


@pytest.mark.parametrize(
    "kind", ["missing", "zero-byte", "truncated JPEG", "truncated PNG", "text named .jpg", "directory"]
)
def test_unreadable_files_name_the_path_index_and_fix(fitted, data, tmp_path, kind):
    path = bad_files(tmp_path)[kind]
    with pytest.raises(ImageLoadError) as info:
        fitted.predict([data[0][0], str(path), data[0][1]])
    message = str(info.value)
    assert f"image 1 ({str(path)!r})" in message
    hints = ("check the path", "re-copy or remove", "remove it or convert", "list the files", "truncated or corrupt")
    assert any(h in message.lower() for h in hints), message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        ("photo.jpg", InputTypeError, "sequence of images.*not a single image"),
        (None, InputTypeError, "sequence of images.*not NoneType"),
        ([42], InputTypeError, r"image 0 \(int\) is not a supported image"),
        ([np.zeros((4, 4, 2), np.uint8)], InputError, "image 0 .*1, 3 or 4 channels"),
        ([np.full((4, 4, 3), 2.0)], InputError, r"outside \[0, 1\]"),
        ([torch.full((3, 4, 4), float("nan"))], InputError, "NaN or Inf"),
        ([np.zeros((4, 4, 3), np.int64)], InputTypeError, "dtype"),
    ],
)
def test_unusable_in_memory_images(fitted, images, error, match):
    with pytest.raises(error, match=match):
        fitted.predict(images)


def test_bad_hyperparameters_are_named(checkpoints, features, data):
    for params, match in [
        ({"lr": -1}, "lr=-1"),
        ({"reg_lambda": "big"}, "reg_lambda='big'"),
        ({"epochs": 2.5}, "epochs=2.5"),
        ({"precision": "fp8"}, "precision='fp8'"),
        ({"on_error": "ignore"}, r"on_error='ignore' is invalid: it must be one of \['raise', 'skip'\]"),
        ({"random_state": "seven"}, r"random_state='seven' is invalid: it must be None or an integer"),
        ({"random_state": 1.5}, "random_state=1.5"),
        ({"templates": ["no slot"]}, r"templates=\['no slot'\] is invalid: .*exactly one '\{\}'"),
        ({"templates": "a photo of a {}."}, "templates='a photo of a {}.'"),
        ({"views": -1}, r"views=-1 is invalid: it must be an integer >= 0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"device": "gpu7"}, "device='gpu7'"),
    ]:
        with pytest.raises(InputError, match=match):
            tiny_adapter(checkpoints["vit"], **params).fit_features(features, data[1])


# -------------------------------------------------------------------------------------- on_error
def test_on_error_is_a_hyperparameter():
    adapter = ProLIPAdapter(on_error="skip")
    assert adapter.get_params()["on_error"] == "skip"
    assert ProLIPAdapter().get_params()["on_error"] == "raise"
    assert "on_error='skip'" in repr(adapter)
    assert adapter.set_params(on_error="raise").on_error == "raise"


def test_fit_skips_unreadable_images_and_their_labels(checkpoints, data, tmp_path):
    images, labels = data
    bad = bad_files(tmp_path)
    # Bad images carry a label of their own: if it survived, "purple" would become a class.
    mixed = [*images[:2], str(bad["missing"]), *images[2:7], str(bad["truncated JPEG"]), *images[7:]]
    mixed_labels = [*labels[:2], "purple", *labels[2:7], "purple", *labels[7:]]
    adapter = tiny_adapter(checkpoints["vit"], epochs=3, on_error="skip")
    with pytest.warns(
        SkippedImagesWarning, match=r"skipped 2 of 14 .*image 2 .*missing\.jpg.*image 8 .*cut\.jpg"
    ) as record:
        adapter.fit(mixed, mixed_labels)
    assert record[0].filename == __file__  # the warning points at the caller's line, not prolip's
    assert [(s.index, s.item) for s in adapter.skipped_] == [(2, str(bad["missing"])), (8, str(bad["truncated JPEG"]))]
    assert "does not exist" in adapter.skipped_[0].reason and "truncated" in adapter.skipped_[1].reason
    assert isinstance(adapter.skipped_[0], SkippedImage) and adapter.skipped_[0] == (2, *adapter.skipped_[0][1:])
    assert list(adapter.classes_) == ["blue", "green", "red"]
    clean = tiny_adapter(checkpoints["vit"], epochs=3).fit(images, labels)
    assert adapter.n_shots_ == clean.n_shots_ == 4
    # bit-for-bit: the same 12 images in the same order, so the same batches, views, ops and shapes
    assert torch.equal(adapter.delta_, clean.delta_)
    assert clean.skipped_ == []


@pytest.fixture
def skipping(fitted):
    """The fitted adapter switched to on_error="skip" for one test."""
    yield fitted.set_params(on_error="skip")
    fitted.set_params(on_error="raise")


def test_predict_and_extract_skip_unreadable_images(skipping, data, tmp_path):
    adapter, (images, labels), bad = skipping, data, bad_files(tmp_path)
    mixed = [images[0], str(bad["text named .jpg"]), images[5], str(bad["directory"]), images[9]]
    kept = [images[0], images[5], images[9]]
    before = getattr(adapter, "skipped_", None)
    with pytest.warns(SkippedImagesWarning, match="skipped 2 of 5") as caught:
        predicted = adapter.predict(mixed)
    assert [s.index for s in caught[0].message.skipped] == [1, 3]  # the warning says which
    assert getattr(adapter, "skipped_", None) is before  # predict does not change the estimator
    expected = adapter.predict_proba(kept)
    # bit-for-bit here and below: the 3 readable images make the same batch as `kept`: the same ops and shapes
    np.testing.assert_array_equal(predicted, adapter.classes_[expected.argmax(1)])
    with pytest.warns(SkippedImagesWarning):
        proba = adapter.predict_proba(mixed)
    np.testing.assert_array_equal(proba, expected)
    with pytest.warns(SkippedImagesWarning):
        feats = adapter.extract_features(mixed, views=0)
    assert feats.shape[1] == 3 and [s.index for s in adapter.skipped_] == [1, 3]
    with pytest.warns(SkippedImagesWarning):
        accuracy = adapter.score(mixed, [labels[0], "x", labels[5], "x", labels[9]])
    assert accuracy == adapter.score(kept, [labels[0], labels[5], labels[9]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.extract_features(kept)  # nothing skipped: no warning, skipped_ reset
    assert adapter.skipped_ == []


def test_all_images_unreadable_is_an_error(checkpoints, skipping, tmp_path):
    bad = bad_files(tmp_path)
    paths = [str(bad["missing"]), str(bad["zero-byte"])]
    adapter = tiny_adapter(checkpoints["vit"], on_error="skip")
    with pytest.raises(ImageLoadError, match=r"all 2 images were unreadable: image 0 .*missing\.jpg.*image 1"):
        adapter.fit(paths, ["a", "b"])
    assert [s.index for s in adapter.skipped_] == [0, 1]
    assert not hasattr(adapter, "delta_")
    with pytest.raises(ImageLoadError, match="all 2 images were unreadable"):
        skipping.predict(paths)


def test_skip_leaving_one_class_is_an_error(checkpoints, data, tmp_path):
    images = data[0]
    missing = str(tmp_path / "missing.jpg")
    adapter = tiny_adapter(checkpoints["vit"], on_error="skip")
    with pytest.warns(SkippedImagesWarning), pytest.raises(InputError, match="at least two classes"):
        adapter.fit([images[0], missing, missing], ["red", "blue", "blue"])


# -------------------------------------------------------------------------------------- numerics
def test_divergence_names_lr_and_lambda_and_leaves_nothing_fitted(checkpoints, data, features):
    adapter = tiny_adapter(checkpoints["vit"], epochs=3).fit_features(features, data[1])
    assert hasattr(adapter, "delta_")
    w0 = adapter.backbone.projector.parameter.detach().clone()
    adapter.set_params(lr=1e30)
    with pytest.raises(TrainingDivergedError) as info:
        adapter.fit_features(features, data[1])
    message = str(info.value)
    assert "lr=1e+30" in message and ("reg_lambda=0.25" in message or "λ=0.25" in message), message
    for name in ("delta_", "classes_", "classifier_", "loss_history_"):
        assert not hasattr(adapter, name), name
    with pytest.raises(NotFittedError):
        adapter.predict_features(features[:1])
    assert torch.equal(adapter.backbone.projector.parameter.detach(), w0)  # bit-for-bit: untouched, vs a copy


def test_loading_a_delta_with_bad_hyperparameters(fitted, tmp_path):
    from conftest import edit_delta

    valid = tmp_path / "valid.safetensors"
    fitted.save(valid)
    path = tmp_path / "d.safetensors"
    for change, match in [({"lr": "fast"}, "lr='fast'"), ({"templates": ["no slot"]}, r"templates=\['no slot'\]")]:
        edit_delta(valid, path, config=lambda c, change=change: c["hyperparameters"].update(change))
        with pytest.raises(DeltaFileError, match=f"invalid hyperparameters.*{match}"):
            ProLIPAdapter.load(path, model=fitted.backbone.model)
    # A file cannot choose the device, callables or the base model through its hyperparameters.
    chosen = {"device": "cuda:7", "preprocess": "x", "model": "RN50"}
    edit_delta(valid, path, config=lambda c: c["hyperparameters"].update(chosen))
    loaded = ProLIPAdapter.load(path, model=fitted.backbone.model, verbose=False)
    assert loaded.device is None and loaded.preprocess is None
