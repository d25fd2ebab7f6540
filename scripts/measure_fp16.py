"""What the official code's fp16 training changes (``train_dtype="fp16"``): W's entries left at W0, test predictions.

The stand-in CLIP on upside-down Fashion-MNIST (as tests/test_fashion_task.py), ProLIP fitted twice
on the same features, in fp32 and in fp16, at each learning rate and N; prints the fraction of W's
entries training left at W0 (as each run stores W0), the two test accuracies and the fraction of
test predictions that differ.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/measure_fp16.py
"""

from __future__ import annotations

import torch

from prolip import ProLIPAdapter, standin
from prolip.datasets import FASHION_MNIST_CLASSES, apply_shift, few_shot_indices, load_fashion_mnist

VIEWS, TEST_SIZE, SEED = 30, 2000, 0


def main() -> None:
    """Print one line per (N, lr)."""
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    test_x, test_y = test_x[:TEST_SIZE], test_y[:TEST_SIZE].tolist()
    adapter = ProLIPAdapter(
        standin.MODEL_NAME, standin.PRETRAINED_TAG, templates=standin.TEMPLATES, views=VIEWS, verbose=False
    )
    test = adapter.extract_features(list(apply_shift(test_x, "upside_down")), views=0)
    w0 = adapter.backbone.projector.parameter.detach().float().cpu()
    for shots in (1, 16):
        pick = few_shot_indices(train_y, shots, SEED)
        x = adapter.extract_features(list(apply_shift(train_x[pick], "upside_down")))
        y = train_y[pick].tolist()
        for lr in (1e-5, 1e-4, 1e-3):
            runs = {}
            for dtype, start in (("fp32", w0), ("fp16", w0.half().float())):
                adapter.set_params(lr=lr, reg_lambda="auto", epochs=300, train_dtype=dtype)
                adapter.fit_features(x, y, class_names=FASHION_MNIST_CLASSES)
                # W0 + (W − W0) is W exactly here: the subtraction of nearby floats is exact (Sterbenz).
                unchanged = float((w0 + adapter.delta_ == start).float().mean())
                runs[dtype] = (adapter.predict_features(test), adapter.score_features(test, test_y), unchanged)
            changed = float(torch.tensor((runs["fp32"][0] != runs["fp16"][0]).mean()))
            print(
                f"N={shots:2d} lr={lr:g}: W entries left at W0 fp32 {runs['fp32'][2]:.1%}, fp16 {runs['fp16'][2]:.1%}; "
                f"accuracy fp32 {runs['fp32'][1]:.2%}, fp16 {runs['fp16'][1]:.2%}; predictions changed {changed:.2%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
