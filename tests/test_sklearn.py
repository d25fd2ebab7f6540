"""scikit-learn interoperability: clone and cross-validation on a list of images."""

from __future__ import annotations

import numpy as np
from conftest import colour_images, missing, tiny_adapter

try:
    import sklearn  # noqa: F401  (a test extra: scripts/setup.sh installs it)
except ImportError as exc:
    missing("scikit-learn", str(exc))


def test_clone_keeps_parameters_and_drops_fitted_state(checkpoints, colours):
    from sklearn.base import clone, is_classifier

    images, labels = colours
    adapter = tiny_adapter(checkpoints["vit"], lr=0.02).fit(images, labels)
    copy = clone(adapter)
    assert is_classifier(adapter)
    assert copy.get_params() == adapter.get_params()
    assert not hasattr(copy, "delta_")


def test_cross_val_score_on_images(checkpoints):
    from sklearn.model_selection import cross_val_score

    images, labels = colour_images(4, seed=3)
    scores = cross_val_score(tiny_adapter(checkpoints["vit"], epochs=40), images, np.array(labels), cv=2)
    assert scores.shape == (2,)
    assert scores.min() >= 0.5  # three visibly different colour classes; chance is 1/3
