"""prolip: few-shot adaptation of open_clip models by fine-tuning only the vision projector (ProLIP).

Public surface::

    from prolip import ProLIPAdapter
    adapter = ProLIPAdapter("ViT-B-32", "openai").fit(images, labels)
    adapter.predict(new_images)

``import prolip`` loads nothing but this table: each public name is imported from its module the first
time it is asked for (a module ``__getattr__``), so ``from prolip import ProLIPAdapter`` loads the
adapter's modules only, never the variants or the benchmark harness (:mod:`prolip.bench`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from prolip._version import __version__

_ERRORS = (
    "DeltaFileError",
    "FeatureCacheError",
    "FingerprintMismatchError",
    "ImageLoadError",
    "InputError",
    "InputTypeError",
    "ModelLoadError",
    "NotFittedError",
    "PrecisionWarning",
    "ProLIPError",
    "ProLIPWarning",
    "SkippedImagesWarning",
    "TrainingDivergedError",
    "TrainingWarning",
    "UnsupportedModelError",
)

_PUBLIC: dict[str, str] = {
    "ProLIPAdapter": "prolip.adapter",
    "CachedFeatures": "prolip.features.cache",
    "dataset_images": "prolip.features.dataset_objects",
    "supported_models": "prolip.model.towers.survey",
    "from_transformers": "prolip.model.transformers_clip",
    "MultiTaskClassifier": "prolip.variants.multitask",
    "OpenVocabularyClassifier": "prolip.variants.open_vocab",
    "ProLIPTipAdapter": "prolip.variants.tip_cache",
    "RegularizedLinearAdapter": "prolip.variants.linear_adapter",
    "ProLIPSearch": "prolip.variants.search",
    "TestTimeProLIP": "prolip.variants.test_time",
    **dict.fromkeys(_ERRORS, "prolip.errors"),
}
"""Each public name and the module it lives in."""

__all__ = [
    "CachedFeatures",
    "DeltaFileError",
    "FeatureCacheError",
    "FingerprintMismatchError",
    "ImageLoadError",
    "InputError",
    "InputTypeError",
    "ModelLoadError",
    "MultiTaskClassifier",
    "NotFittedError",
    "OpenVocabularyClassifier",
    "PrecisionWarning",
    "ProLIPAdapter",
    "ProLIPError",
    "ProLIPSearch",
    "ProLIPTipAdapter",
    "ProLIPWarning",
    "RegularizedLinearAdapter",
    "SkippedImagesWarning",
    "TestTimeProLIP",
    "TrainingDivergedError",
    "TrainingWarning",
    "UnsupportedModelError",
    "__version__",
    "dataset_images",
    "from_transformers",
    "supported_models",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load on first use
    from prolip.adapter import ProLIPAdapter
    from prolip.errors import (
        DeltaFileError,
        FeatureCacheError,
        FingerprintMismatchError,
        ImageLoadError,
        InputError,
        InputTypeError,
        ModelLoadError,
        NotFittedError,
        PrecisionWarning,
        ProLIPError,
        ProLIPWarning,
        SkippedImagesWarning,
        TrainingDivergedError,
        TrainingWarning,
        UnsupportedModelError,
    )
    from prolip.features.cache import CachedFeatures
    from prolip.features.dataset_objects import dataset_images
    from prolip.model.towers.survey import supported_models
    from prolip.model.transformers_clip import from_transformers
    from prolip.variants.linear_adapter import RegularizedLinearAdapter
    from prolip.variants.multitask import MultiTaskClassifier
    from prolip.variants.open_vocab import OpenVocabularyClassifier
    from prolip.variants.search import ProLIPSearch
    from prolip.variants.test_time import TestTimeProLIP
    from prolip.variants.tip_cache import ProLIPTipAdapter


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (then it is an ordinary attribute)."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'prolip' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
