"""Hugging Face transformers vision towers (:mod:`prolip.model.transformers_clip`): CLIP and SigLIP.

* ``CLIPModel``: the image embedding is ``visual_projection(post_layernorm(pooled))``, a bias-free
  ``nn.Linear`` outside the vision model; the text one ``text_projection(pooled)``.
* ``SiglipModel``: the vision model ends in its attention-pooling (MAP) head, ``a = attention(probe,
  tokens)``, ``y = (a + mlp(layernorm(a)))[:, 0]``, whose last linear layer is ``mlp.fc2``: as for
  open_clip's SigLIP towers (:class:`prolip.model.towers.timm_trunk.TimmMapProjector`), the embedding is
  ``x W + b + r`` with ``x`` fc2's input and the residual ``r = a[:, 0]``.

Their text towers are in :mod:`prolip.model.towers.text`.

Inputs of those layers are read with forward hooks while transformers runs its own forward pass, so
prolip never re-implements a tower; the registry's check then verifies that ``x W0 + b + r``
reproduces ``get_image_features`` (``get_text_features``).
"""

from __future__ import annotations

import torch
from torch import nn

from prolip.model.towers.base import LinearLayerMap, Projector, captured
from prolip.model.transformers_clip import TransformersVision


def _model_type(visual: nn.Module) -> str | None:
    return visual.model_type if isinstance(visual, TransformersVision) else None


class TransformersClipProjector(LinearLayerMap, Projector):
    """transformers ``CLIPModel``: ``visual_projection``, on the post-layernorm pooled token."""

    family = "transformers_clip"
    description = "transformers CLIPModel (visual_projection)"
    key = "visual_projection.weight"

    @classmethod
    def recognises(cls, visual: nn.Module) -> bool:
        return _model_type(visual) == "CLIPModel" and isinstance(visual.projection, nn.Linear)

    @property
    def layer(self) -> nn.Linear:
        return self.visual.projection

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.visual.vision_model(pixel_values=pixels).pooler_output, None


class TransformersSiglipProjector(LinearLayerMap, Projector):
    """transformers ``SiglipModel``: ``head.mlp.fc2`` of the vision model's MAP head, with the residual ``a[:, 0]``."""

    family = "transformers_siglip"
    description = "transformers SiglipModel (vision MAP head's mlp.fc2, with its residual)"
    key = "vision_model.head.mlp.fc2.weight"
    has_residual = True

    @classmethod
    def recognises(cls, visual: nn.Module) -> bool:
        if _model_type(visual) != "SiglipModel" or visual.projection is not None:
            return False
        head = getattr(visual.vision_model, "head", None)
        return head is not None and isinstance(getattr(getattr(head, "mlp", None), "fc2", None), nn.Linear)

    @property
    def layer(self) -> nn.Linear:
        return self.visual.vision_model.head.mlp.fc2

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.visual.vision_model.head
        seen = captured(
            lambda: self.visual.vision_model(pixel_values=pixels),
            {"x": (head.mlp.fc2, True), "a": (head.attention, False)},
        )
        return seen["x"][:, 0], seen["a"][:, 0]
