"""open_clip ``TimmModel`` towers whose projection is open_clip's own adapter head (``visual.head``).

open_clip adds this head after the timm trunk when the config sets ``timm_proj`` to ``"linear"``
(ConvNeXt, ViTamin, Swin, ...) or ``"mlp"`` (``convnext_large_d``). Both heads are an
``nn.Sequential`` of modules that open_clip calls one after the other, so the input of the last
linear layer is the trunk's output passed through the head's earlier modules.
"""

from __future__ import annotations

import torch
from torch import nn

from prolip.model.towers.base import LinearLayerMap, Projector


def _last_head_module(visual: nn.Module, name: str) -> nn.Module | None:
    """The module called ``name`` if it is the last one of a TimmModel's adapter head, else None."""
    from open_clip.timm_model import TimmModel

    if not isinstance(visual, TimmModel) or not len(visual.head):
        return None
    last_name, last = list(visual.head.named_children())[-1]
    return last if last_name == name else None


def _head_input(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The trunk's output passed through every module of the adapter head but the last."""
    x = visual.trunk(pixels)
    for layer in list(visual.head.children())[:-1]:
        x = layer(x)
    return x


class TimmLinearProjector(LinearLayerMap, Projector):
    """``TimmModel`` with ``timm_proj="linear"``: the linear layer ``visual.head.proj``."""

    family = "timm_linear"
    description = 'open_clip TimmModel with timm_proj="linear"'
    key = "visual.head.proj.weight"

    @classmethod
    def recognises(cls, visual: nn.Module) -> bool:
        return isinstance(_last_head_module(visual, "proj"), nn.Linear)

    @property
    def layer(self) -> nn.Linear:
        return self.visual.head.proj

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _head_input(self.visual, pixels), None


class TimmMlpProjector(LinearLayerMap, Projector):
    """``TimmModel`` with ``timm_proj="mlp"``: the second layer ``visual.head.mlp.fc2`` of timm's ``Mlp``.

    The features are the hidden activations ``norm(act(fc1(trunk(x))))``; fc1 stays frozen with the trunk.
    """

    family = "timm_mlp"
    description = 'open_clip TimmModel with timm_proj="mlp"'
    key = "visual.head.mlp.fc2.weight"

    @classmethod
    def recognises(cls, visual: nn.Module) -> bool:
        from timm.layers import Mlp

        mlp = _last_head_module(visual, "mlp")
        return type(mlp) is Mlp and isinstance(mlp.fc2, nn.Linear)

    @property
    def layer(self) -> nn.Linear:
        return self.visual.head.mlp.fc2

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        mlp = self.visual.head.mlp
        x = _head_input(self.visual, pixels)
        return mlp.norm(mlp.drop1(mlp.act(mlp.fc1(x)))), None
