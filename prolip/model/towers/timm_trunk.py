"""open_clip ``TimmModel`` towers whose projection lives inside the timm trunk (``visual.trunk``).

With ``timm_proj`` null (and no attention pool of open_clip's own), open_clip builds the trunk with
``num_classes=embed_dim``, so the trunk's classifier is the projection (EVA01, EVA02, PE-Core,
MobileCLIP ViT-B and FastViT). With ``timm_proj="none"`` the trunk's output is the embedding
itself; for SigLIP and SigLIP 2 that output comes from timm's attention-pool (MAP) head, whose
last linear layer ``mlp.fc2`` adds onto the attention output: ``y = a + fc2(h)``, a residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prolip.model.towers.base import LinearLayerMap, Projector


def _bare_trunk(visual: nn.Module) -> nn.Module | None:
    """The timm trunk of a TimmModel without an open_clip adapter head, else None."""
    from open_clip.timm_model import TimmModel

    if not isinstance(visual, TimmModel) or len(visual.head):
        return None
    return visual.trunk


class TimmClassifierProjector(LinearLayerMap, Projector):
    """``TimmModel`` whose timm trunk's classifier (``trunk.get_classifier()``) is an ``nn.Linear``.

    The features are timm's pre-logits, ``trunk.forward_head(trunk.forward_features(x), pre_logits=True)``,
    which every timm model provides; the key depends on where the trunk keeps its classifier
    (``visual.trunk.head`` for EVA and ViT trunks, ``visual.trunk.head.fc`` for FastViT and ConvNeXt).
    """

    family = "timm_classifier"
    description = "open_clip TimmModel whose timm trunk's classifier is the projection (timm_proj null)"

    @classmethod
    def recognises(cls, visual: nn.Module) -> bool:
        trunk = _bare_trunk(visual)
        return (
            trunk is not None
            and callable(getattr(trunk, "get_classifier", None))
            and isinstance(trunk.get_classifier(), nn.Linear)
        )

    @property
    def layer(self) -> nn.Linear:
        return self.visual.trunk.get_classifier()

    @property
    def key(self) -> str:
        layer = self.layer
        name = next(n for n, m in self.visual.trunk.named_modules() if m is layer)
        return f"visual.trunk.{name}.weight"

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        trunk = self.visual.trunk
        return trunk.forward_head(trunk.forward_features(pixels), pre_logits=True), None


class TimmMapProjector(LinearLayerMap, Projector):
    """timm ``VisionTransformer`` trunk ending in its MAP head (SigLIP, SigLIP 2): ``attn_pool.mlp.fc2``.

    timm's ``AttentionPoolLatent`` computes ``a = proj(attention(latent, tokens))`` and returns
    ``pool(a + mlp(norm(a)))``; the last linear layer is ``mlp.fc2``. Pooling (first latent or
    mean over latents) is linear, so the embedding is ``x W + b + r`` with ``x = pool(h)``,
    ``h = mlp.norm(act(fc1(norm(a))))`` and the residual ``r = pool(a)``, which does not depend on W.
    The attention is recomputed from the pool's own layers because timm calls it functionally.
    """

    family = "timm_map"
    description = "timm VisionTransformer trunk with a MAP head and no projection (timm_pool map, timm_proj none)"
    key = "visual.trunk.attn_pool.mlp.fc2.weight"
    has_residual = True

    @classmethod
    def recognises(cls, visual: nn.Module) -> bool:
        from timm.layers import AttentionPoolLatent, Mlp
        from timm.models.vision_transformer import VisionTransformer

        trunk = _bare_trunk(visual)
        if not isinstance(trunk, VisionTransformer) or not isinstance(trunk.attn_pool, AttentionPoolLatent):
            return False
        pool = trunk.attn_pool
        # Anything but identities after the pool would make the output non-linear in fc2's weight.
        return (
            type(pool.mlp) is Mlp
            and pool.pool in ("token", "avg")
            and isinstance(trunk.fc_norm, nn.Identity)
            and isinstance(trunk.head, nn.Identity)
        )

    @property
    def layer(self) -> nn.Linear:
        return self.visual.trunk.attn_pool.mlp.fc2

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trunk = self.visual.trunk
        tokens = trunk.forward_features(pixels)
        if not getattr(trunk, "pool_include_prefix", True):  # older timm releases pooled every token
            tokens = tokens[:, trunk.num_prefix_tokens :]
        pool, mlp = trunk.attn_pool, trunk.attn_pool.mlp
        attended = _attend(pool, tokens)
        hidden = mlp.norm(mlp.drop1(mlp.act(mlp.fc1(pool.norm(attended)))))
        return _pool_latents(pool, hidden), _pool_latents(pool, attended)


def _attend(pool: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``proj(attention(latent, tokens))`` of an ``AttentionPoolLatent``: ``[n, latent_len, width]``."""
    n, length, _ = tokens.shape
    if pool.pos_embed is not None:
        tokens = tokens + pool.pos_embed.unsqueeze(0).to(tokens.dtype)
    heads, head_dim = pool.num_heads, pool.head_dim
    q = pool.q(pool.latent.expand(n, -1, -1)).reshape(n, pool.latent_len, heads, head_dim).transpose(1, 2)
    k, v = pool.kv(tokens).reshape(n, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(pool.q_norm(q), pool.k_norm(k), v)
    return pool.proj_drop(pool.proj(out.transpose(1, 2).reshape(n, pool.latent_len, heads * head_dim)))


def _pool_latents(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pool's reduction over its latent queries: the first one, or their mean."""
    return x[:, 0] if pool.pool == "token" else x.mean(dim=1)
