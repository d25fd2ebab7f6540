"""Share a delta and load it elsewhere: a local folder, or a Hugging Face Hub repository.

    python examples/share_delta.py                       # folder round trip, offline
    python examples/share_delta.py --repo you/fashion    # also push to the Hub (needs a token)

The receiver needs only prolip, the same base model, and the folder or repository name:
``ProLIPAdapter.from_pretrained("you/fashion")`` (``revision=`` and ``token=`` as transformers takes them). Loading checks the base model's projector
fingerprint and never unpickles anything.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from prolip import ProLIPAdapter, standin
from prolip.datasets import export_image_folder
from prolip.datasets.generic import read_labelled


def main() -> None:
    """Fit a small adapter, share it through a folder (and the Hub if asked), load it back."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--repo", help="Hub repository to push to, e.g. you/fashion (needs huggingface_hub and a token)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths, labels = read_labelled(export_image_folder(Path(tmp) / "train", "train", per_class=8))
        adapter = ProLIPAdapter(standin.MODEL_NAME, standin.PRETRAINED_TAG, templates=standin.TEMPLATES, views=50)
        adapter.fit(paths, labels)
        test_paths, test_labels = read_labelled(export_image_folder(Path(tmp) / "test", "test", per_class=20))
        accuracy = adapter.score(test_paths, test_labels)

        # The shareable unit: prolip_delta.safetensors plus a model card.
        shared = adapter.save_pretrained(
            Path(tmp) / "shared", metrics={"accuracy": accuracy}, datasets=["fashion_mnist"]
        )
        print(f"shared folder: {sorted(p.name for p in shared.iterdir())}")
        print((shared / "README.md").read_text().split("---")[1].strip())

        # "Elsewhere": a fresh adapter that knows nothing but the folder.
        received = ProLIPAdapter.from_pretrained(shared)
        same = np.array_equal(received.predict_proba(test_paths), adapter.predict_proba(test_paths))
        print(f"accuracy {accuracy:.2%}; received adapter predicts identically: {same}")

        if args.repo:
            print(f"pushed to {adapter.push_to_hub(args.repo, metrics={'accuracy': accuracy})}")
            pulled = ProLIPAdapter.from_pretrained(args.repo)
            print(
                f"pulled back from the Hub; identical: {np.array_equal(pulled.predict_proba(test_paths), adapter.predict_proba(test_paths))}"
            )


if __name__ == "__main__":
    main()
