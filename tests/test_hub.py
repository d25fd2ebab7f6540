"""Sharing fitted estimators the Hugging Face way: save_pretrained / from_pretrained / push_to_hub, one mixin.

Tests never touch the network: a local folder, a fake Hub API (repositories are folders, one per revision) put in
place of huggingface_hub's download and upload functions, and huggingface_hub itself in offline mode.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import colour_images, tiny_adapter

from prolip import (
    DeltaFileError,
    ProLIPAdapter,
    ProLIPError,
    ProLIPSearch,
    ProLIPTipAdapter,
    RegularizedLinearAdapter,
)
from prolip.files.hub import CARD_FILENAME, DELTA_FILENAME, ESTIMATORS, estimator_for, hub_base_model, model_card

huggingface_hub = pytest.importorskip("huggingface_hub")


class FakeHub:
    """Stands in for the Hub's API: ``root/<repo_id>/<revision>/`` holds each revision's files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.created: list[tuple[str, bool]] = []
        self.calls: list[dict] = []

    def api(self, token=None):
        hub = self

        class Api:
            def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
                hub.created.append((repo_id, private))

            def create_branch(self, repo_id, branch, exist_ok=False, repo_type=None):
                (hub.root / repo_id / branch).mkdir(parents=True, exist_ok=True)

            def upload_folder(self, repo_id, folder_path, commit_message=None, repo_type=None, revision=None):
                hub.calls.append({"upload": repo_id, "token": token, "revision": revision})
                shutil.copytree(folder_path, hub.root / repo_id / (revision or "main"), dirs_exist_ok=True)

        return Api()

    def download(self, repo_id, filename, revision=None, token=None, **kwargs):
        self.calls.append({"download": repo_id, "revision": revision, "token": token})
        path = self.root / repo_id / (revision or "main") / filename
        if not path.exists():
            raise huggingface_hub.errors.EntryNotFoundError(f"404 Client Error: {repo_id}@{revision}/{filename}")
        return str(path)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.download)
    return hub


@pytest.fixture(scope="module")
def fitted(checkpoints):
    return tiny_adapter(checkpoints["vit"], epochs=3).fit(*colour_images(2))


def test_save_pretrained_then_from_pretrained_folder_and_hub_revision_predict_identically(
    fitted, fake_hub, tmp_path, checkpoints
):
    folder = fitted.save_pretrained(tmp_path / "shared", metrics={"accuracy": 0.75}, datasets=["colours"])
    assert sorted(p.name for p in folder.iterdir()) == [CARD_FILENAME, DELTA_FILENAME]
    images = colour_images(2, seed=3)[0]
    expected = fitted.predict_proba(images)
    by_folder = ProLIPAdapter.from_pretrained(folder, pretrained=checkpoints["vit"], verbose=False)
    by_file = ProLIPAdapter.from_pretrained(folder / DELTA_FILENAME, pretrained=checkpoints["vit"], verbose=False)
    # The Hub's revision v1 is this folder; main holds nothing: the revision is what is read.
    shutil.copytree(folder, fake_hub.root / "user" / "repo" / "v1")
    by_repo = ProLIPAdapter.from_pretrained(
        "user/repo", revision="v1", token="secret", pretrained=checkpoints["vit"], verbose=False
    )
    assert fake_hub.calls[-1] == {"download": "user/repo", "revision": "v1", "token": "secret"}
    # bit-for-bit: the stored delta and T read back onto the same weights: the same ops on the same shapes
    for loaded in (by_folder, by_file, by_repo):
        np.testing.assert_array_equal(loaded.predict_proba(images), expected)
    with pytest.raises(ProLIPError, match=r"Hub repository user/repo: EntryNotFoundError") as info:
        ProLIPAdapter.from_pretrained("user/repo", pretrained=checkpoints["vit"])  # main has no delta
    assert "\n" not in str(info.value)


def test_the_card_parses_with_valid_hub_metadata(fitted, tmp_path):
    folder = fitted.save_pretrained(
        tmp_path / "shared", metrics={"accuracy": 0.75}, datasets=["tanganke/kmnist"], license="apache-2.0",
        repo_id="someone/colours",
    )  # fmt: skip
    card = huggingface_hub.ModelCard.load(folder / CARD_FILENAME)
    data = card.data
    assert (data.library_name, data.license, data.datasets) == ("prolip", "apache-2.0", ["tanganke/kmnist"])
    assert data.base_model is None  # a local checkpoint is not on the Hub: the card names it as open_clip does
    assert data.prolip == {"kind": "projector", "model": "test-vit-tiny", "pretrained": fitted.pretrained}
    assert data.pipeline_tag == "image-classification" and "few-shot" in data.tags
    result = data.eval_results[0]
    assert (result.metric_type, result.metric_value, result.dataset_type) == ("accuracy", 0.75, "tanganke/kmnist")
    assert "model-index" in data.to_dict()
    text = card.text
    assert "ProLIPAdapter.from_pretrained('someone/colours', model='test-vit-tiny', pretrained=" in text
    assert "<" not in text.split("## How to use it")[1].split("## What it holds")[0]  # no placeholders
    assert fitted.base_fingerprint_.summary() in text and "`blue`" in text and "arXiv:2410.05270" in text
    assert "## Intended use and limitations" in text


@pytest.mark.parametrize(
    ("model_name", "pretrained", "expected"),
    [
        ("ViT-B-32", "openai", "timm/vit_base_patch32_clip_224.openai"),
        ("ViT-B-16", "laion2b_s34b_b88k", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
        ("hf-hub:timm/ViT-B-16-SigLIP", "", "timm/ViT-B-16-SigLIP"),
        ("hf-transformers:openai/clip-vit-base-patch32", "", "openai/clip-vit-base-patch32"),
        ("ViT-B-32", "/checkpoints/mine.pt", None),
        ("prolip-standin-vit", "fashion-mnist", None),
        ("", "", None),
    ],
)
def test_base_model_is_a_hub_id_only_where_the_base_is_on_the_hub(model_name, pretrained, expected):
    assert hub_base_model(model_name, pretrained) == expected


def test_a_hub_base_model_is_the_cards_base_model_and_the_file_chooses_it(fitted):
    state = dataclasses.replace(fitted.fitted_, model_name="ViT-B-32", pretrained="openai")
    card = huggingface_hub.ModelCard(model_card(state, "someone/colours"))
    assert card.data.base_model == "timm/vit_base_patch32_clip_224.openai" and card.data.eval_results is None
    # An open_clip model and tag: the file may choose its base, so the snippet needs nothing else.
    assert "ProLIPAdapter.from_pretrained('someone/colours')\n" in card.text


def test_push_to_hub_then_from_pretrained_round_trip(fitted, fake_hub, checkpoints):
    url = fitted.push_to_hub("someone/colours", private=True, token="t", metrics={"accuracy": 0.5})
    assert url == "https://huggingface.co/someone/colours" and fake_hub.created == [("someone/colours", True)]
    assert fake_hub.calls[-1] == {"upload": "someone/colours", "token": "t", "revision": None}
    card = huggingface_hub.ModelCard.load(fake_hub.root / "someone/colours/main" / CARD_FILENAME)
    assert card.data.eval_results[0].metric_value == 0.5
    # A shared file names a local checkpoint path: it may not choose it, the user does.
    with pytest.raises(ProLIPError, match="does not let a file choose"):
        ProLIPAdapter.from_pretrained("someone/colours")
    pulled = ProLIPAdapter.from_pretrained("hf-hub:someone/colours", pretrained=checkpoints["vit"], verbose=False)
    images = colour_images(1, seed=4)[0]
    np.testing.assert_array_equal(pulled.predict_proba(images), fitted.predict_proba(images))  # bit-for-bit


def test_every_estimator_shares_through_the_one_mixin(checkpoints, fake_hub, tmp_path):
    images, labels = colour_images(2)
    tip = ProLIPTipAdapter(tiny_adapter(checkpoints["vit"], epochs=3), alpha=1.0, beta=2.0).fit(images, labels)
    tip.push_to_hub("someone/tip", revision="v2")
    card = (fake_hub.root / "someone/tip/v2" / CARD_FILENAME).read_text()
    assert "# ProLIP + Tip-Adapter for test-vit-tiny" in card and "ProLIPTipAdapter.from_pretrained" in card
    assert f"cache of {len(labels)} adapted training embeddings" in card
    pulled = ProLIPTipAdapter.from_pretrained(
        "someone/tip", revision="v2", pretrained=checkpoints["vit"], verbose=False
    )
    np.testing.assert_array_equal(pulled.predict_proba(images), tip.predict_proba(images))  # bit-for-bit: as above
    assert (pulled.alpha_, pulled.beta_) == (1.0, 2.0)
    with pytest.raises(DeltaFileError, match=r"holds a tip_adapter fit, not a projector one.*ProLIPTipAdapter\.load"):
        ProLIPAdapter.from_pretrained("someone/tip", revision="v2", pretrained=checkpoints["vit"])
    for cls in (ProLIPAdapter, ProLIPSearch, ProLIPTipAdapter, RegularizedLinearAdapter):  # one implementation
        for method in ("save", "load", "save_pretrained", "from_pretrained", "push_to_hub"):
            assert getattr(cls, method).__qualname__.startswith("HubMixin."), (cls, method)
    assert {kind: estimator_for(kind) for kind in ESTIMATORS} == {
        "projector": ProLIPAdapter, "tip_adapter": ProLIPTipAdapter, "linear_adapter": RegularizedLinearAdapter
    }  # fmt: skip


def test_a_search_shares_its_best_fit_and_reads_back_its_results(checkpoints, fitted, tmp_path):
    images, labels = colour_images(2)
    search = ProLIPSearch(tiny_adapter(checkpoints["vit"], epochs=3), lrs=[1e-2, 1e-3], reg_lambdas=[0.0, 1.0])
    search.fit(images, labels, *colour_images(1, seed=2))
    folder = search.save_pretrained(tmp_path / "search")
    loaded = ProLIPSearch.from_pretrained(folder, pretrained=checkpoints["vit"], verbose=False)
    assert (loaded.best_params_, loaded.cv_results_) == (search.best_params_, search.cv_results_)
    assert (loaded.lrs, loaded.reg_lambdas) == ([1e-2, 1e-3], [0.0, 1.0]) and "_state" not in vars(loaded.adapter)
    np.testing.assert_array_equal(loaded.predict_proba(images), search.predict_proba(images))  # bit-for-bit
    plain = ProLIPAdapter.from_pretrained(folder, pretrained=checkpoints["vit"], verbose=False)  # any adapter reads it
    assert plain.lr == search.best_params_["lr"]
    fitted.save(tmp_path / "plain.safetensors")
    with pytest.raises(DeltaFileError, match=r"without a validation search.*ProLIPAdapter\.load"):
        ProLIPSearch.load(tmp_path / "plain.safetensors", pretrained=checkpoints["vit"])


def test_offline_hub_failures_are_one_line_prolip_errors(fitted, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))  # an empty cache: nothing to fall back on
    with pytest.raises(ProLIPError, match=r"could not upload to Hub repository 'someone/colours': .*offline") as info:
        fitted.push_to_hub("someone/colours")
    assert "\n" not in str(info.value) and info.value.__cause__ is None
    with pytest.raises(
        ProLIPError, match=r"could not get prolip_delta\.safetensors of Hub repository user/repo"
    ) as info:
        ProLIPAdapter.from_pretrained("user/repo", revision="v1")
    assert "\n" not in str(info.value) and "at revision 'v1'" in str(info.value)


@pytest.mark.parametrize("name", ["not a repo", "user/", "-x/y"])
def test_a_name_that_is_neither_a_path_nor_a_repo_id(name):
    with pytest.raises(
        ProLIPError, match=r"neither a delta file, a folder holding prolip_delta\.safetensors, nor a Hub"
    ):
        ProLIPAdapter.from_pretrained(name)


@pytest.mark.parametrize("name", ["out/blobs.safetensors", "a/b/c", "./missing-folder/", "../x", "~/d", "/abs/x"])
def test_a_missing_path_is_never_looked_up_on_the_hub(name, fake_hub):
    with pytest.raises(DeltaFileError, match=r"does not exist \(or is not a file\); check the path"):
        ProLIPAdapter.from_pretrained(name)
    assert fake_hub.calls == []


def test_a_folder_without_the_delta(tmp_path):
    with pytest.raises(ProLIPError, match="has no prolip_delta"):
        ProLIPAdapter.from_pretrained(tmp_path)


def test_missing_huggingface_hub_gives_an_install_hint(monkeypatch, fitted, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name == "huggingface_hub":
            raise ImportError("No module named 'huggingface_hub'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    for call in (lambda: ProLIPAdapter.from_pretrained("a/b"), lambda: fitted.save_pretrained(tmp_path / "s")):
        with pytest.raises(ProLIPError, match=r'pip install "prolip\[hub\]"'):
            call()
