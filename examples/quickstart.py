"""Quickstart: ProLIP on a distribution-shifted few-shot task, offline.

By default this uses prolip's packaged stand-in CLIP (a tiny ViT pretrained on upright
Fashion-MNIST; see docs/standin.md) and the upside-down Fashion-MNIST task: 16 labelled images per
class from the shifted train split, evaluated on the whole shifted test split. It prints the
zero-shot accuracy, fits ProLIP, prints the accuracy after, saves the delta, reloads it and checks
the reloaded adapter predicts identically.

Run the same job on real CLIP weights you have on disk:

    python examples/quickstart.py --model ViT-B-32 --pretrained /path/to/open_clip_model.safetensors
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from prolip import ProLIPAdapter, standin
from prolip.datasets import FASHION_MNIST_CLASSES, apply_shift, few_shot_indices, load_fashion_mnist


def main() -> None:
    """Run the quickstart with command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=standin.MODEL_NAME, help="open_clip model name (default: %(default)s)")
    parser.add_argument("--pretrained", default=standin.PRETRAINED_TAG, help="tag or checkpoint (default: %(default)s)")
    parser.add_argument("--shift", default="upside_down", help="distribution shift of the task (default: %(default)s)")
    parser.add_argument("--shots", type=int, default=16, help="labelled images per class (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: %(default)s)")
    parser.add_argument("--views", type=int, default=300, help="augmented views per image (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=300, help="training steps (default: %(default)s)")
    parser.add_argument("--test-size", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shot draw and the views (default: 0)")
    parser.add_argument("--out", type=Path, default=None, help="where to save the delta (default: a temp dir)")
    parser.add_argument("--data-root", default=None, help="folder holding torchvision's FashionMNIST/ layout")
    parser.add_argument("--download", action="store_true", help="let torchvision download Fashion-MNIST")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    args = parser.parse_args()
    start = time.perf_counter()

    train_x, train_y = load_fashion_mnist("train", root=args.data_root, download=args.download)
    test_x, test_y = load_fashion_mnist("test", root=args.data_root, download=args.download)
    if args.test_size:
        test_x, test_y = test_x[: args.test_size], test_y[: args.test_size]
    pick = few_shot_indices(train_y, args.shots, args.seed)
    shots_x, shots_y = apply_shift(train_x[pick], args.shift), train_y[pick].tolist()
    test_x, test_y = apply_shift(test_x, args.shift), test_y.tolist()
    print(f"task: Fashion-MNIST, shift={args.shift!r}, {args.shots} shots x 10 classes, {len(test_y)} test images")

    adapter = ProLIPAdapter(
        args.model,
        args.pretrained,
        templates=standin.TEMPLATES,
        lr=args.lr,
        views=args.views,
        epochs=args.epochs,
        device=args.device,
        random_state=args.seed,
    )
    # Features are computed once: the training views of the shots, one plain view of each test image.
    train_features = adapter.extract_features(list(shots_x))
    test_features = adapter.extract_features(list(test_x), views=0)

    adapter.set_params(epochs=0).fit_features(train_features, shots_y, class_names=FASHION_MNIST_CLASSES)
    zero_shot = adapter.score_features(test_features, test_y)
    print(f"zero-shot accuracy:        {zero_shot:.2%}")

    adapter.set_params(epochs=args.epochs).fit_features(train_features, shots_y, class_names=FASHION_MNIST_CLASSES)
    accuracy = adapter.score_features(test_features, test_y)
    print(
        f"ProLIP accuracy ({args.shots} shots): {accuracy:.2%}  (lr={args.lr:g}, lambda=1/N={adapter.reg_lambda_:.4g})"
    )

    with tempfile.TemporaryDirectory() as tmp:
        path = args.out or Path(tmp) / "quickstart-delta.safetensors"
        adapter.save(path)
        # The base model is named explicitly: a delta file alone may only choose open_clip's own models.
        reloaded = ProLIPAdapter.load(path, args.model, args.pretrained, device=args.device)
        same = np.array_equal(reloaded.predict_features(test_features), adapter.predict_features(test_features))
        sample = list(test_x[:64])
        same &= np.array_equal(reloaded.predict_proba(sample), adapter.predict_proba(sample))
        print(
            f"saved delta: {path} ({Path(path).stat().st_size / 1024:.0f} KiB); reloaded predictions identical: {same}"
        )
    print(f"done in {time.perf_counter() - start:.0f} s")
    if not same:
        raise SystemExit("reloaded adapter predicts differently")


if __name__ == "__main__":
    main()
