"""open_clip's ModifiedResNet (the OpenAI RN50 family): the attention pool's output layer ``c_proj``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prolip.model.towers.base import LinearLayerMap, Projector


class ModifiedResNetProjector(LinearLayerMap, Projector):
    """open_clip ``ModifiedResNet``: the attention pool's output layer ``attnpool.c_proj``.

    open_clip hands ``c_proj.weight`` straight to ``F.multi_head_attention_forward``, so a hook on
    ``c_proj`` never fires. We recompute the attention pool for its single pooled (mean) query and
    stop before the output projection; the bias stays frozen and is applied by ``embed``.
    """

    family = "modified_resnet"
    description = "open_clip ModifiedResNet"
    key = "visual.attnpool.c_proj.weight"

    @classmethod
    def recognises(cls, visual: nn.Module) -> bool:
        from open_clip.modified_resnet import ModifiedResNet

        return isinstance(visual, ModifiedResNet)

    @property
    def layer(self) -> nn.Linear:
        return self.visual.attnpool.c_proj

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
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
        return out.transpose(1, 2).reshape(n, width), None
