"""The projectors of open_clip's towers: which linear map ProLIP trains, and what feeds it.

Vision: :func:`find_projector` recognises the tower's family in :data:`FAMILIES` and checks that
``x W0 + b + r`` reproduces ``encode_image``. Text: :func:`find_text_projector`. Which open_clip
configs are supported: :func:`supported_models` and :func:`survey_models`.
"""

from prolip.model.towers.base import LinearMap, Projector
from prolip.model.towers.registry import FAMILIES, describe_tower, find_projector
from prolip.model.towers.survey import ModelReport, build_on_meta, supported_models, survey_models
from prolip.model.towers.text import TEXT_FAMILIES, TextProjector, find_text_projector

__all__ = [
    "FAMILIES",
    "TEXT_FAMILIES",
    "LinearMap",
    "ModelReport",
    "Projector",
    "TextProjector",
    "build_on_meta",
    "describe_tower",
    "find_projector",
    "find_text_projector",
    "supported_models",
    "survey_models",
]
