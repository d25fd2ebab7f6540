"""scikit-learn interoperability: clone and cross-validation on a list of images."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import colour_images, missing, tiny_adapter

from prolip import InputError

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


# ---------------------------------------------------------------------------- the estimator contract
def test_clone_and_nested_params_of_the_search(checkpoints, colours):
    from sklearn.base import clone

    from prolip import ProLIPSearch

    search = ProLIPSearch(tiny_adapter(checkpoints["vit"], lr=0.02), lrs=[1e-3, 1e-2], reg_lambdas=[0.0, 1.0])
    deep, shallow = search.get_params(deep=True), search.get_params(deep=False)
    assert set(shallow) == {"adapter", "lrs", "reg_lambdas"} and deep["adapter__lr"] == 0.02
    assert set(deep) == set(shallow) | {f"adapter__{k}" for k in search.adapter.get_params()}
    copy = clone(search)
    assert copy.adapter is not search.adapter and copy.adapter.get_params() == search.adapter.get_params()
    assert copy.set_params(adapter__lr=0.05, adapter__epochs=3, lrs=[1e-2]) is copy
    assert (copy.adapter.lr, copy.adapter.epochs, copy.lrs) == (0.05, 3, [1e-2])
    assert search.adapter.lr == 0.02 and search.lrs == [1e-3, 1e-2]  # the original is untouched
    images, labels = colours
    copy.fit(images, labels, images, labels)
    assert copy.best_params_["lr"] == 1e-2 and copy.best_estimator_.epochs == 3
    with pytest.raises(InputError, match=r"unknown parameter 'adaptor' for ProLIPSearch"):
        copy.set_params(adaptor__lr=1)
    with pytest.raises(InputError, match=r"lrs of ProLIPSearch is not an estimator"):
        copy.set_params(lrs__x=1)


def test_init_only_stores_and_fit_checks_against_the_classs_own_constraints(checkpoints, colours):
    from prolip import ProLIPAdapter, ProLIPSearch, TestTimeProLIP

    bad = ProLIPAdapter("no-such-model", None, lr=-1.0)  # stored as given, checked at fit
    assert bad.lr == -1.0 and bad.model == "no-such-model"
    with pytest.raises(InputError, match=r"lr=-1\.0 is invalid"):
        bad.fit(*colours)
    with pytest.raises(InputError, match=r"lrs=\[\] is invalid"):
        ProLIPSearch(tiny_adapter(checkpoints["vit"]), lrs=[]).fit(*colours, *colours)
    with pytest.raises(InputError, match=r"adapter='x' is invalid.*ProLIPAdapter"):
        ProLIPSearch("x").fit_features(None, [], None, [])
    # Constraints are per class and composed by inheritance: test-time lr 0 (no step) is valid there only.
    assert TestTimeProLIP._parameter_constraints["lr"].check(0.0)
    assert not ProLIPAdapter._parameter_constraints["lr"].check(0.0)


def test_predict_leaves_the_estimator_as_it_finds_it(checkpoints, colours, tmp_path):
    images, labels = colours
    adapter = tiny_adapter(checkpoints["vit"], on_error="skip").fit(images, labels)
    before = dict(vars(adapter))
    unreadable = tmp_path / "broken.png"
    unreadable.write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        adapter.predict([*images[:2], str(unreadable)])
    adapter.predict_proba(images[:2])
    adapter.score(images, labels)
    assert vars(adapter).keys() == before.keys()
    assert all(vars(adapter)[k] is v for k, v in before.items())  # skipped_ is fit's, not predict's
