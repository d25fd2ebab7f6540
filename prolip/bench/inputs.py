"""What the bench takes from the backbone, once: the frozen heads, and each dataset's classes and text.

The vision projector and the text projection are copied out as tensors (:class:`ImageHead`,
:class:`TextHead`), so bench methods never touch the model; the zero-shot classifier T is the
backbone's own (encoded by open_clip), and the text head's features are what its projection takes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from prolip.bench.problem import Classes, ImageHead, TextHead
from prolip.errors import UnsupportedModelError
from prolip.model.backbone import Backbone
from prolip.training.open_vocab import class_classifier

logger = logging.getLogger(__name__)


def image_head(backbone: Backbone) -> ImageHead:
    """The backbone's vision projector W0 ``[d_in, d_out]`` and bias, float32 on the CPU."""
    projector = backbone.projector
    w0 = projector.to_in_out(projector.parameter).detach().float().cpu().contiguous()
    bias = None if projector.bias is None else projector.bias.detach().float().cpu()
    return ImageHead(w0, bias)


def class_set(backbone: Backbone, names: Sequence[str], templates: Sequence[str]) -> Classes:
    """The classes ``names`` under ``templates``: T from open_clip, and the text head when the tower has one.

    T is the library's open-vocabulary classifier (:func:`prolip.training.open_vocab.class_classifier`),
    so new classes are scored here exactly as ``OpenVocabularyClassifier`` scores them.

    The text head (pre-projection features of every (class, template) prompt and the projection)
    is what text-side methods train; towers whose text projection prolip cannot locate get None.
    """
    classifier = class_classifier(backbone, names, templates)
    try:
        projector = backbone.text_projector
    except UnsupportedModelError as exc:
        logger.info("no text head for the bench (%s)", exc)
        return Classes(list(names), classifier, None)
    w0 = projector.to_in_out(projector.parameter).detach().float().cpu().contiguous()
    bias = None if projector.bias is None else projector.bias.detach().float().cpu()
    return Classes(list(names), classifier, TextHead(backbone.prompt_features(names, templates), w0, bias))
