"""The trainable projector of each open_clip vision tower, and the features just before it.

ProLIP trains one matrix: the vision tower's final linear projection. Each supported tower family
gets a small class that knows where that matrix lives, which way round it is stored, whether a
(frozen) bias follows it, and how to run the tower up to, but not through, the projection.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from prolip.errors import UnsupportedModelError

SUPPORTED_FAMILIES = (
    "open_clip VisionTransformer (visual.proj)",
    "open_clip ModifiedResNet (visual.attnpool.c_proj)",
    "open_clip TimmModel with a linear head (visual.head.proj)",
)


class Projector:
    """Access to one vision tower's projector ``W0`` and its pre-projection features.

    Subclasses set ``family``, ``key`` (the state-dict key of the trained weight, relative to the
    full CLIP model) and ``transposed`` (True where the weight is stored ``[d_out, d_in]`` as in
    ``nn.Linear``), and implement ``parameter`` and ``features``.
    """

    family: ClassVar[str]
    key: ClassVar[str]
    transposed: ClassVar[bool]

    def __init__(self, visual: nn.Module) -> None:
        self.visual = visual

    @property
    def parameter(self) -> nn.Parameter:
        """The model's own projector weight, in its own orientation (never modified by prolip)."""
        raise NotImplementedError

    @property
    def bias(self) -> torch.Tensor | None:
        """The frozen bias added after the projection, or None."""
        return None

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pre-projection features ``[n, d_in]`` of a batch of normalised images ``[n, 3, H, W]``."""
        raise NotImplementedError

    def to_in_out(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight in the parameter's orientation, seen as ``[d_in, d_out]``."""
        return weight.t() if self.transposed else weight

    def from_in_out(self, weight: torch.Tensor) -> torch.Tensor:
        """A ``[d_in, d_out]`` matrix put back into the parameter's orientation."""
        return weight.t() if self.transposed else weight

    @property
    def in_features(self) -> int:
        """Width of the pre-projection features."""
        return self.to_in_out(self.parameter).shape[0]

    @property
    def out_features(self) -> int:
        """Width of the image-text embedding space."""
        return self.to_in_out(self.parameter).shape[1]


class VisionTransformerProjector(Projector):
    """open_clip ``VisionTransformer``: ``pooled @ visual.proj`` with proj ``[width, embed]``."""

    family = "vit"
    key = "visual.proj"
    transposed = False

    @property
    def parameter(self) -> nn.Parameter:
        return self.visual.proj

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        v = self.visual
        pooled, _ = v._pool(v.transformer(v._embeds(pixels)))
        return pooled


class ModifiedResNetProjector(Projector):
    """open_clip ``ModifiedResNet``: the attention pool's output layer ``attnpool.c_proj``.

    open_clip hands ``c_proj.weight`` straight to ``F.multi_head_attention_forward``, so a hook on
    ``c_proj`` never fires. We recompute the attention pool for its single pooled (mean) query and
    stop before the output projection; the bias stays frozen and is applied by the caller.
    """

    family = "modified_resnet"
    key = "visual.attnpool.c_proj.weight"
    transposed = True

    @property
    def parameter(self) -> nn.Parameter:
        return self.visual.attnpool.c_proj.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.visual.attnpool.c_proj.bias

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(pixels)))))
        pool = v.attnpool
        x = x.flatten(2).permute(0, 2, 1)  # [n, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        x = x + pool.positional_embedding.to(x.dtype)
        n, _, width = x.shape
        heads = pool.num_heads
        # Only the first (mean) token's output is used by CLIP, so only it is queried.
        q = F.linear(x[:, :1], pool.q_proj.weight, pool.q_proj.bias)
        k = F.linear(x, pool.k_proj.weight, pool.k_proj.bias)
        val = F.linear(x, pool.v_proj.weight, pool.v_proj.bias)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, t.shape[1], heads, width // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(val))
        return out.transpose(1, 2).reshape(n, width)


class TimmProjector(Projector):
    """open_clip ``TimmModel`` whose adapter head ends in a linear ``head.proj``."""

    family = "timm"
    key = "visual.head.proj.weight"
    transposed = True

    @property
    def parameter(self) -> nn.Parameter:
        return self.visual.head.proj.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.visual.head.proj.bias

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.visual.trunk(pixels)
        for name, layer in self.visual.head.named_children():
            if name == "proj":
                break
            x = layer(x)
        return x


def find_projector(model: nn.Module) -> Projector:
    """Return the :class:`Projector` of an open_clip CLIP model (or of its vision tower).

    Raises:
        UnsupportedModelError: the tower is of a family ProLIP does not support.
    """
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", model)
    if isinstance(visual, VisionTransformer) and isinstance(visual.proj, nn.Parameter):
        return VisionTransformerProjector(visual)
    if isinstance(visual, ModifiedResNet):
        return ModifiedResNetProjector(visual)
    if isinstance(visual, TimmModel) and isinstance(getattr(visual.head, "proj", None), nn.Linear):
        return TimmProjector(visual)
    raise UnsupportedModelError(
        f"prolip cannot find a trainable projector in vision tower {type(visual).__name__}. "
        f"Supported families: {'; '.join(SUPPORTED_FAMILIES)}."
    )
