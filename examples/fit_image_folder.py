"""Fit on an image folder (one sub-folder per class), evaluate on another, save the delta.

    python examples/fit_image_folder.py                       # demo folders from Fashion-MNIST
    python examples/fit_image_folder.py --train photos/ --test photos_test/ --model ViT-B-32 --pretrained openai

The same job on the command line: ``prolip fit photos/ --shots 16 --out delta.safetensors`` then
``prolip eval delta.safetensors photos_test/``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from prolip import ProLIPAdapter, standin
from prolip.datasets import export_image_folder
from prolip.datasets.generic import read_labelled, sample_shots


def main() -> None:
    """Fit, evaluate and save, from folders given on the command line or made from Fashion-MNIST."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, help="training folder (default: 16 Fashion-MNIST images per class)")
    parser.add_argument("--test", type=Path, help="test folder (default: 50 Fashion-MNIST test images per class)")
    parser.add_argument("--model", default=standin.MODEL_NAME)
    parser.add_argument("--pretrained", default=standin.PRETRAINED_TAG)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("delta.safetensors"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        train = args.train or export_image_folder(Path(tmp) / "train", "train", per_class=args.shots)
        test = args.test or export_image_folder(Path(tmp) / "test", "test", per_class=50)
        paths, labels = sample_shots(*read_labelled(train), shots=args.shots, seed=0)
        templates = standin.TEMPLATES if args.model == standin.MODEL_NAME else None
        adapter = ProLIPAdapter(args.model, args.pretrained, templates=templates).fit(paths, labels)
        print(f"fitted {len(adapter.classes_)} classes on {len(paths)} images")
        print(f"test accuracy: {adapter.score(*read_labelled(test)):.2%}")
    adapter.save(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
