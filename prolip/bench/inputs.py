"""What the bench takes from the backbone, once: each dataset's classes, their T and their text side.

The vision projector and the text projection are copied out as tensors (:class:`~prolip.model.head.LinearHead`),
so bench methods never touch the model; the zero-shot classifier T is the backbone's own (encoded by
open_clip), and the text side's features are what its projection takes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from prolip.bench.problem import Classes
from prolip.errors import UnsupportedModelError
from prolip.model.backbone import Backbone
from prolip.training.sides import TextSide
from prolip.variants.open_vocab import class_classifier

logger = logging.getLogger(__name__)


def class_set(backbone: Backbone, names: Sequence[str], templates: Sequence[str]) -> Classes:
    """The classes ``names`` under ``templates``: T from open_clip, and the text head when the tower has one.

    T is the library's open-vocabulary classifier (:func:`prolip.variants.open_vocab.class_classifier`),
    so new classes are scored here exactly as ``OpenVocabularyClassifier`` scores them.

    The text side (pre-projection features of every (class, template) prompt and the projection)
    is what text-side methods train; towers whose text projection prolip cannot locate get None.
    """
    classifier = class_classifier(backbone, names, templates)
    try:
        projector = backbone.text_projector
    except UnsupportedModelError as exc:
        logger.info("no text head for the bench (%s)", exc)
        return Classes(list(names), classifier, None)
    return Classes(
        list(names), classifier, TextSide(backbone.prompt_features(names, templates), projector.head.frozen())
    )
