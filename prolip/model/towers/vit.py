"""open_clip's own VisionTransformer: ``pooled @ visual.proj``, proj a ``[width, embed]`` Parameter."""

from __future__ import annotations

import torch
from torch import nn

from prolip.model.towers.base import Projector


class VisionTransformerProjector(Projector):
    """open_clip ``VisionTransformer`` (OpenAI / LAION ViTs, CLIPA, DFN, MetaCLIP, CoCa's image tower).

    open_clip multiplies by the Parameter directly (``pooled @ self.proj``), so there is no module to
    hook; the pooled token comes from the tower's own ``_embeds`` / ``transformer`` / ``_pool`` steps,
    which cover every pooling variant, CoCa's attentional pooler included.
    """

    family = "vit"
    description = "open_clip VisionTransformer"
    key = "visual.proj"
    transposed = False

    @classmethod
    def recognises(cls, visual: nn.Module) -> bool:
        from open_clip.transformer import VisionTransformer

        return isinstance(visual, VisionTransformer) and isinstance(visual.proj, nn.Parameter)

    @property
    def parameter(self) -> nn.Parameter:
        return self.visual.proj

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        v = self.visual
        pooled, _ = v._pool(v.transformer(v._embeds(pixels)))
        return pooled, None
