"""The projectors of open_clip's towers: which linear map ProLIP trains, and what feeds it.

Vision: :func:`find_projector` recognises the tower's family in :data:`FAMILIES` and checks that
``x W0 + b + r`` reproduces ``encode_image``. Text (:mod:`prolip.model.towers.text`, loaded when a text side is
used): ``find_text_projector``. Which open_clip configs are supported (:mod:`prolip.model.towers.survey`):
``supported_models`` and ``survey_models``.
"""

from prolip.model.towers.base import LinearMap, Projector
from prolip.model.towers.registry import FAMILIES, describe_tower, find_projector

__all__ = ["FAMILIES", "LinearMap", "Projector", "describe_tower", "find_projector"]
