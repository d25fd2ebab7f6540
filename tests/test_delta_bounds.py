"""Finite but extreme values in a delta file are refused at load (docs/format.md gives the ranges), so no
file makes prolip print NaN probabilities or invalid JSON."""

from __future__ import annotations

import math

import pytest
from conftest import colour_images, edit_delta, tiny_adapter

from prolip import DeltaFileError, ProLIPTipAdapter
from prolip.files.delta import read_state
from prolip.training.fitted import CLASSIFIER_KEY


@pytest.fixture(scope="module")
def valid(checkpoints, tmp_path_factory):
    path = tmp_path_factory.mktemp("delta") / "valid.safetensors"
    tiny_adapter(checkpoints["vit"], epochs=2).fit(*colour_images(1)).save(path)
    return path


@pytest.fixture(scope="module")
def tip_file(checkpoints, tmp_path_factory):
    path = tmp_path_factory.mktemp("tip") / "tip.safetensors"
    adapter = tiny_adapter(checkpoints["vit"], epochs=2, random_state=0)
    images, labels = colour_images(2)
    ProLIPTipAdapter(adapter, alpha=2.0, beta=3.0).fit_features(adapter.extract_features(images), labels).save(path)
    return path


def _scale(value):
    return lambda t: t.update({k: v * value for k, v in t.items() if v.is_floating_point()})


@pytest.mark.parametrize(
    ("config", "tensors", "match"),
    [
        (lambda c: c.update(logit_scale=1e308), None, "'logit_scale': expected a positive number <= 1000"),
        (None, lambda t: t[CLASSIFIER_KEY].__setitem__((0, 0), 1e38), "classifier entries beyond"),
        (None, lambda t: t["visual.proj"].__setitem__((0, 0), -1e38), "delta entries beyond"),
        (lambda c: c.update(classes=[math.inf if x == "blue" else x for x in c["classes"]]), None, "finite numbers"),
        (lambda c: c.update(classes=[math.nan if x == "blue" else x for x in c["classes"]]), None, "finite numbers"),
    ],
)
def test_extreme_values_are_refused(valid, tmp_path, config, tensors, match):
    assert "blue" in read_state(valid).classes
    bad = edit_delta(valid, tmp_path / "bad.safetensors", config=config, tensors=tensors)
    with pytest.raises(DeltaFileError, match=match):
        read_state(bad)


@pytest.mark.parametrize("key", ["alpha", "beta"])
def test_extreme_tip_adapter_weights_are_refused(tip_file, tmp_path, key):
    read_state(tip_file)

    bad = edit_delta(tip_file, tmp_path / "bad.safetensors", config=lambda c: c["cache"].update({key: 1e300}))
    with pytest.raises(DeltaFileError, match=r"alpha and beta in \[0, 1000\]"):
        read_state(bad)


# ---------------------------------------------------------------------------- linear-adapter (RLA) files
@pytest.fixture(scope="module")
def rla_file(checkpoints, tmp_path_factory):
    from prolip.variants.linear_adapter import ModelRLA

    path = tmp_path_factory.mktemp("rla") / "rla.safetensors"
    ModelRLA.fit(tiny_adapter(checkpoints["vit"], epochs=3), *colour_images(2)).rla.save(path)
    return path


def test_an_rla_file_records_the_base_fingerprint_and_is_checked_against_it(rla_file, checkpoints):
    from conftest import TINY_MODELS

    from prolip import FingerprintMismatchError
    from prolip.variants.linear_adapter import ModelRLA

    assert read_state(rla_file).fingerprint is not None
    loaded = ModelRLA.load(rla_file, trust_file_model=True, device="cpu", verbose=False)
    assert loaded.predict(colour_images(1)[0]).shape == (3,)
    with pytest.raises(FingerprintMismatchError, match="different base model"):  # same config, random weights
        ModelRLA.load(rla_file, model=TINY_MODELS["vit"], pretrained=None, device="cpu", verbose=False)


def test_an_rla_file_naming_a_base_without_weights_is_refused(rla_file, tmp_path):
    from prolip.variants.linear_adapter import ModelRLA

    bad = edit_delta(rla_file, tmp_path / "bad.safetensors", config=lambda c: c.update(pretrained=""))
    with pytest.raises(DeltaFileError, match="without pretrained weights"):
        ModelRLA.load(bad, trust_file_model=True, device="cpu", verbose=False)


def test_an_rla_file_of_another_width_is_refused_at_load_naming_both_widths(rla_file, checkpoints):
    from conftest import TINY_MODELS

    from prolip.variants.linear_adapter import ModelRLA

    assert read_state(rla_file).delta.shape[0] == 24  # test-timm-map-tiny embeds with width 64
    with pytest.raises(DeltaFileError, match=r"adapts embeddings of width 24, but .* with width 64"):
        ModelRLA.load(
            rla_file, model=TINY_MODELS["timm_map"], pretrained=checkpoints["timm_map"], device="cpu", verbose=False
        )
