"""Seed-to-seed spread of the claims in tests/test_fashion_task.py, at that file's settings.

HF_HUB_OFFLINE=1 .venv/bin/python scripts/measure_test_margins.py 6
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from prolip import ProLIPAdapter, standin
from prolip.datasets import FASHION_MNIST_CLASSES, apply_shift, few_shot_indices, load_fashion_mnist

VIEWS, TEST_SIZE = 30, 2000


def main(draws: int) -> None:
    """Print each draw's accuracies, then mean/std/min/max of each quantity."""
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    test_x, test_y = test_x[:TEST_SIZE], test_y[:TEST_SIZE].tolist()
    adapter = ProLIPAdapter(
        standin.MODEL_NAME, standin.PRETRAINED_TAG, templates=standin.TEMPLATES, views=VIEWS, verbose=False
    )
    test_shifted = adapter.extract_features(list(apply_shift(test_x, "upside_down")), views=0)
    test_plain = adapter.extract_features(list(test_x), views=0)

    def score(features: torch.Tensor, labels: list[int], test: torch.Tensor, **params: float | str) -> float:
        adapter.set_params(**params).fit_features(features, labels, class_names=FASHION_MNIST_CLASSES)
        return adapter.score_features(test, test_y)

    rows: dict[str, list[float]] = {}
    for seed in range(draws):
        adapter.set_params(random_state=seed)
        pick = few_shot_indices(train_y, 16, seed)
        x, y = adapter.extract_features(list(apply_shift(train_x[pick], "upside_down"))), train_y[pick].tolist()
        shifted_zs = score(x, y, test_shifted, epochs=0)
        shifted_16 = score(x, y, test_shifted, epochs=300, lr=1e-3, reg_lambda="auto")
        pick = few_shot_indices(train_y, 1, seed)
        x, y = adapter.extract_features(list(train_x[pick])), train_y[pick].tolist()
        plain_zs = score(x, y, test_plain, epochs=0)
        reg = score(x, y, test_plain, epochs=300, lr=1e-2, reg_lambda="auto")
        free = score(x, y, test_plain, epochs=300, lr=1e-2, reg_lambda=0.0)
        row = {
            "shifted 16-shot gain over zero-shot": shifted_16 - shifted_zs,
            "1-shot lr=1e-2: lambda=1/N minus lambda=0": reg - free,
            "1-shot lr=1e-2: lambda=1/N minus zero-shot": reg - plain_zs,
            "1-shot lr=1e-2: lambda=0 minus zero-shot": free - plain_zs,
        }
        for k, v in row.items():
            rows.setdefault(k, []).append(v)
        print(seed, {k: round(v, 4) for k, v in row.items()}, flush=True)
    for k, v in rows.items():
        print(f"{k}: mean {np.mean(v):+.4f} std {np.std(v):.4f} min {np.min(v):+.4f} max {np.max(v):+.4f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
