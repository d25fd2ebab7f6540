"""Several ProLIP tasks served from one base model, offline.

Three tasks are fitted on the same few-shot Fashion-MNIST images, each with its own labels:
the item (10 classes), its kind (clothing / shoe / bag) and where it is worn (5 classes). Each is
saved as its own small delta file. A MultiTaskClassifier then loads the three files onto one base
model and labels the test images for all tasks at once: the vision tower runs once per image,
and each task only adds its own projector and text classifier.

Run ``python examples/multitask.py`` (offline; about 3 minutes on 2 CPU cores, mostly feature
extraction). By default it uses prolip's packaged stand-in CLIP (a tiny ViT pretrained on
Fashion-MNIST; see docs/standin.md). Run it on real CLIP weights you have on disk with
``--model ViT-B-32 --pretrained /path/to/open_clip_model.safetensors``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from prolip import ProLIPAdapter, standin
from prolip.datasets import FASHION_MNIST_CLASSES, few_shot_indices, load_fashion_mnist
from prolip.variants.multitask import MultiTaskClassifier

# Each task relabels the ten Fashion-MNIST classes (index = Fashion-MNIST label).
KIND = ["clothing"] * 5 + ["shoe", "clothing", "shoe", "bag", "shoe"]
WORN_ON = [
    "upper body", "legs", "upper body", "whole body", "upper body",
    "feet", "upper body", "feet", "hand", "feet",
]  # fmt: skip
TASKS = {"item": FASHION_MNIST_CLASSES, "kind": KIND, "worn_on": WORN_ON}


def main() -> None:
    """Fit, save and serve three tasks; print each task's accuracy and the time saved."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=standin.MODEL_NAME, help="open_clip model name (default: %(default)s)")
    parser.add_argument(
        "--pretrained", default=standin.PRETRAINED_TAG, help="tag or checkpoint file (default: %(default)s)"
    )
    parser.add_argument("--shots", type=int, default=16, help="labelled images per item class (default: %(default)s)")
    parser.add_argument("--views", type=int, default=50, help="augmented views per image (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=300, help="training steps (default: %(default)s)")
    parser.add_argument("--test-size", type=int, default=2000, help="test images to label (default: %(default)s)")
    parser.add_argument("--data-root", default=None, help="folder holding torchvision's FashionMNIST/ layout")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    args = parser.parse_args()

    train_x, train_y = load_fashion_mnist("train", root=args.data_root)
    test_x, test_y = load_fashion_mnist("test", root=args.data_root)
    pick = few_shot_indices(train_y, args.shots, seed=0)
    shots_x, shots_y = list(train_x[pick]), train_y[pick].tolist()
    test_x, test_y = list(test_x[: args.test_size]), test_y[: args.test_size].tolist()

    with tempfile.TemporaryDirectory(prefix="prolip-multitask-") as tmp:
        # Same images, model and seed for every task, so the training views are extracted once.
        features = new_adapter(args).extract_features(shots_x)
        paths = [fit_and_save(task, names, features, shots_y, Path(tmp), args) for task, names in TASKS.items()]
        clf = MultiTaskClassifier(paths, model=args.model, pretrained=args.pretrained, device=args.device)
        start = time.perf_counter()
        predicted = clf.predict(test_x)
        together = time.perf_counter() - start
        for task in clf.tasks:
            truth = np.array([TASKS[task][y] for y in test_y])
            print(f"{task:>8}: accuracy {np.mean(predicted[task] == truth):.2%} on {len(test_y)} test images")

        # The same predictions, one adapter at a time: the vision tower runs once per task.
        alone = {
            path.stem: ProLIPAdapter.load(path, args.model, args.pretrained, device=args.device, verbose=False)
            for path in paths
        }
        start = time.perf_counter()
        for task, adapter in alone.items():
            assert np.array_equal(adapter.predict(test_x), predicted[task]), f"{task}: the two ways disagree"
        separately = time.perf_counter() - start
    print(f"labelling for all {len(paths)} tasks: {together:.2f} s together, {separately:.2f} s one task at a time")


def new_adapter(args: argparse.Namespace) -> ProLIPAdapter:
    """An unfitted adapter with the command line's settings."""
    return ProLIPAdapter(
        args.model,
        args.pretrained,
        templates=standin.TEMPLATES,
        views=args.views,
        epochs=args.epochs,
        device=args.device,
        verbose=False,
    )


def fit_and_save(
    task: str, names: list[str], features: torch.Tensor, labels: list[int], folder: Path, args: argparse.Namespace
) -> Path:
    """Fit one task on the shared training features under its own labels and save its delta."""
    adapter = new_adapter(args).fit_features(features, [names[y] for y in labels])
    path = folder / f"{task}.safetensors"
    adapter.save(path)
    print(f"fitted {task!r}: {len(adapter.classes_)} classes, delta file {path.stat().st_size / 1024:.0f} KiB")
    return path


if __name__ == "__main__":
    main()
