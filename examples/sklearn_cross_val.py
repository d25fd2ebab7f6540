"""ProLIPAdapter inside scikit-learn: cross-validation on a list of image paths.

    pip install scikit-learn
    python examples/sklearn_cross_val.py

The adapter follows scikit-learn's estimator contract (get_params/set_params, fit returns self,
score is accuracy), so ``clone``, ``cross_val_score`` and ``GridSearchCV`` work on it directly.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from prolip import ProLIPAdapter, standin
from prolip.datasets import export_image_folder
from prolip.datasets.generic import read_labelled


def main() -> None:
    """5-fold cross-validated accuracy of ProLIP and of zero-shot CLIP on 10 images per class."""
    try:
        from sklearn.model_selection import cross_val_score
    except ImportError:
        raise SystemExit("this example needs scikit-learn: pip install scikit-learn") from None

    with tempfile.TemporaryDirectory() as tmp:
        paths, labels = read_labelled(export_image_folder(Path(tmp), "train", per_class=10, shift="upside_down"))
        adapter = ProLIPAdapter(
            standin.MODEL_NAME, standin.PRETRAINED_TAG, templates=standin.TEMPLATES, views=30, verbose=False
        )
        for name, epochs in (("zero-shot", 0), ("ProLIP", 300)):
            scores = cross_val_score(adapter.set_params(epochs=epochs), paths, np.array(labels), cv=5)
            print(f"{name:>9}: accuracy {scores.mean():.2%} ± {scores.std():.2%} over 5 folds (upside-down images)")


if __name__ == "__main__":
    main()
