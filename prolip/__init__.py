"""prolip: few-shot adaptation of open_clip models by fine-tuning only the vision projector (ProLIP).

Public surface::

    from prolip import ProLIPAdapter
    adapter = ProLIPAdapter("ViT-B-32", "openai").fit(images, labels)
    adapter.predict(new_images)
"""

from prolip._version import __version__
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
from prolip.model.towers import supported_models
from prolip.model.transformers_clip import from_transformers
from prolip.variants.multitask import MultiTaskClassifier
from prolip.variants.open_vocab import OpenVocabularyClassifier
from prolip.variants.prolip_tip_adapter import ProLIPTipAdapter
from prolip.variants.rla import RegularizedLinearAdapter
from prolip.variants.search import ProLIPSearch
from prolip.variants.test_time import TestTimeProLIP

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
