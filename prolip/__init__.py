"""prolip: few-shot adaptation of open_clip models by fine-tuning only the vision projector (ProLIP).

Public surface::

    from prolip import ProLIPAdapter
    adapter = ProLIPAdapter("ViT-B-32", "openai").fit(images, labels)
    adapter.predict(new_images)
"""

from prolip._version import __version__
from prolip.adapter import ProLIPAdapter
from prolip.cache import CachedFeatures
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
from prolip.multitask import MultiTaskClassifier
from prolip.rla import RegularizedLinearAdapter
from prolip.test_time import TestTimeProLIP
from prolip.tip_adapter import ProLIPTipAdapter
from prolip.towers import supported_models
from prolip.validation import ProLIPSearch

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
    "supported_models",
]
