"""Sharing deltas through the Hub (mocked: tests never touch the network) and local folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_adapter

from prolip import ProLIPAdapter, ProLIPError
from prolip.files.hub import DELTA_FILENAME


class FakeHub:
    """Stands in for huggingface_hub: repositories are folders under a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.created: list[tuple[str, bool]] = []

    def api(self, token=None):
        hub = self

        class Api:
            def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
                hub.created.append((repo_id, private))

            def upload_folder(self, repo_id, folder_path, commit_message=None, repo_type=None):
                shutil.copytree(folder_path, hub.root / repo_id, dirs_exist_ok=True)

        return Api()

    def download(self, repo_id, filename, revision=None, token=None):
        path = self.root / repo_id / filename
        if not path.exists():
            raise FileNotFoundError(f"404 {repo_id}/{filename}")
        return str(path)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import huggingface_hub

    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.download)
    return hub


def test_push_and_pull_round_trip(fake_hub, checkpoints, colours):
    images, labels = colours
    adapter = tiny_adapter(checkpoints["vit"]).fit(images, labels)
    url = adapter.push_to_hub("someone/colours", private=True, metrics={"accuracy": 0.75})
    assert url.endswith("someone/colours") and fake_hub.created == [("someone/colours", True)]

    card = (fake_hub.root / "someone/colours/README.md").read_text()
    front = card.split("---")[1]
    assert 'library_name: "prolip"' in front and 'pipeline_tag: "image-classification"' in front
    assert 'base_model: "open_clip:test-vit-tiny' in front and "tags:" in front
    assert "`blue`" in card and "| accuracy | 0.7500 |" in card and adapter.base_fingerprint_.summary() in card

    # A shared file names a local checkpoint path: it may not choose it, the user does.
    with pytest.raises(ProLIPError, match="does not let a file choose"):
        ProLIPAdapter.from_pretrained("hf-hub:someone/colours")
    pulled = ProLIPAdapter.from_pretrained("hf-hub:someone/colours", pretrained=checkpoints["vit"], verbose=False)
    # bit-for-bit: the stored delta and T read back onto the same weights: the same ops on the same shapes
    np.testing.assert_array_equal(pulled.predict_proba(images), adapter.predict_proba(images))
    with pytest.raises(ProLIPError, match="someone/missing"):
        ProLIPAdapter.from_pretrained("hf-hub:someone/missing")


def test_tip_adapter_push_and_pull_round_trip(fake_hub, checkpoints, colours):
    from prolip import ProLIPTipAdapter

    images, labels = colours
    tip = ProLIPTipAdapter(tiny_adapter(checkpoints["vit"], epochs=3), alpha=1.0, beta=2.0).fit(images, labels)
    tip.push_to_hub("someone/tip")
    card = (fake_hub.root / "someone/tip/README.md").read_text()
    assert "# ProLIP + Tip-Adapter for test-vit-tiny" in card and "ProLIPTipAdapter.from_pretrained" in card
    assert f"cache of {len(labels)} adapted training embeddings" in card
    pulled = ProLIPTipAdapter.from_pretrained("hf-hub:someone/tip", pretrained=checkpoints["vit"], verbose=False)
    np.testing.assert_array_equal(pulled.predict_proba(images), tip.predict_proba(images))  # bit-for-bit: as above
    assert (pulled.alpha_, pulled.beta_) == (1.0, 2.0)
    with pytest.raises(ProLIPError, match=r"ProLIPTipAdapter\.load"):
        ProLIPAdapter.from_pretrained("hf-hub:someone/tip", pretrained=checkpoints["vit"])


def test_from_pretrained_local_folder_and_file(checkpoints, colours, tmp_path):
    from prolip.files.hub import save_folder

    images, labels = colours
    adapter = tiny_adapter(checkpoints["vit"], epochs=3).fit(images, labels)
    folder = save_folder(adapter.fitted_, tmp_path / "shared")
    by_folder = ProLIPAdapter.from_pretrained(folder, pretrained=checkpoints["vit"], verbose=False)
    by_file = ProLIPAdapter.from_pretrained(folder / DELTA_FILENAME, pretrained=checkpoints["vit"], verbose=False)
    expected = adapter.predict_proba(images)
    # bit-for-bit: the stored delta and T read back onto the same weights: the same ops on the same shapes
    np.testing.assert_array_equal(by_folder.predict_proba(images), expected)
    np.testing.assert_array_equal(by_file.predict_proba(images), expected)
    with pytest.raises(ProLIPError, match="has no prolip_delta"):
        ProLIPAdapter.from_pretrained(tmp_path)


def test_missing_huggingface_hub_gives_an_install_hint(monkeypatch, checkpoints, colours):
    import builtins

    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name == "huggingface_hub":
            raise ImportError("No module named 'huggingface_hub'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(ProLIPError, match="pip install huggingface_hub"):
        ProLIPAdapter.from_pretrained("hf-hub:a/b")
