"""The text tower's final projection, and the text features just before it.

Like the vision side, each text tower family knows where the projection lives (an ``nn.Parameter``
``[width, embed]`` used as ``x @ P``, or an ``nn.Linear`` when the config asks for a bias) and how
to compute its input; ``find_text_projector`` checks on random tokens that ``x W0 + b`` reproduces
``model.encode_text`` before anything trains it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from prolip.errors import UnsupportedModelError
from prolip.model.towers.base import (
    CHECK_ROWS,
    LinearMap,
    captured,
    check_device,
    check_generator,
    check_reproduces,
    eval_mode,
)
from prolip.model.transformers_clip import TransformersCLIP

HF_CHECK_LENGTH = 16  # Hugging Face towers report their position table size, which may exceed what they accept


class TextProjector(LinearMap):
    """The last linear map of an open_clip text tower: ``encode_text = x W + b``.

    Subclasses say where the map is held (``holder``) and how to compute its input (``features``).
    """

    description: ClassVar[str]

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        """Whether ``model``'s text tower is of this family."""
        raise NotImplementedError

    @property
    def holder(self) -> tuple[nn.Module, str, str]:
        """``(module, attribute, key prefix)``: the map is ``getattr(module, attribute)``."""
        raise NotImplementedError

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pre-projection text features ``[n, d_t]`` of token ids ``[n, length]``."""
        raise NotImplementedError

    def sample_tokens(self, generator: torch.Generator) -> torch.Tensor:
        """Random token ids ``[2, length]`` the tower accepts, for the reproduction check."""
        raise NotImplementedError

    def _stored(self) -> nn.Parameter | nn.Linear:
        module, attribute, _ = self.holder
        return getattr(module, attribute)

    @property
    def key(self) -> str:
        _, attribute, prefix = self.holder
        return prefix + attribute + (".weight" if self.transposed else "")

    @property
    def transposed(self) -> bool:
        return isinstance(self._stored(), nn.Linear)

    @property
    def parameter(self) -> nn.Parameter:
        stored = self._stored()
        return stored.weight if isinstance(stored, nn.Linear) else stored

    @property
    def bias(self) -> torch.Tensor | None:
        stored = self._stored()
        return stored.bias if isinstance(stored, nn.Linear) else None


class ClipTextProjector(TextProjector):
    """open_clip ``CLIP``, whose text transformer's parts sit on the model itself: ``text_projection``."""

    family = "clip_text"
    description = "open_clip CLIP text transformer"

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        from open_clip.model import CLIP

        return isinstance(model, CLIP) and model.text_projection is not None

    @property
    def holder(self) -> tuple[nn.Module, str, str]:
        return self.model, "text_projection", ""

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        m = self.model
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding.to(cast)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        return text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))

    def sample_tokens(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(self.model.vocab_size, (CHECK_ROWS, self.model.context_length), generator=generator)


class TextTransformerProjector(TextProjector):
    """open_clip ``TextTransformer`` as ``model.text`` (CustomTextCLIP, SigLIP, CoCa): ``text.text_projection``."""

    family = "text_transformer"
    description = "open_clip TextTransformer (model.text)"

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        from open_clip.transformer import TextTransformer

        text = getattr(model, "text", None)
        return isinstance(text, TextTransformer) and text.text_projection is not None

    @property
    def holder(self) -> tuple[nn.Module, str, str]:
        return self.model.text, "text_projection", "text."

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        text = self.model.text
        x, attn_mask = text._embeds(tokens)
        x = text.transformer(x, attn_mask=attn_mask)
        if text.cls_emb is not None:  # CoCa: an appended class token, normalised after pooling
            return text.ln_final(x[:, -1])
        return text_global_pool(text.ln_final(x), tokens, text.pool_type, eos_token_id=text.eos_id)

    def sample_tokens(self, generator: torch.Generator) -> torch.Tensor:
        text = self.model.text
        return torch.randint(text.vocab_size, (CHECK_ROWS, text.context_length), generator=generator)


class HFTextProjector(TextProjector):
    """open_clip ``HFTextEncoder`` (needs ``transformers``): ``text.proj`` or the last layer of its MLP.

    ``hf_proj_type="linear"`` makes ``proj`` one ``nn.Linear`` (key ``text.proj.weight``);
    ``"mlp"`` makes it ``Linear, GELU, Linear`` and the map is ``text.proj.2``, whose input is the
    first two layers applied to the pooled output. Towers whose ``proj`` is an Identity have no map.
    """

    family = "hf_text"
    description = "open_clip HFTextEncoder (Hugging Face text tower)"

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        from open_clip.hf_model import HFTextEncoder

        text = getattr(model, "text", None)
        if not isinstance(text, HFTextEncoder):
            return False
        proj = text.proj
        return isinstance(proj, nn.Linear) or (isinstance(proj, nn.Sequential) and isinstance(proj[-1], nn.Linear))

    @property
    def holder(self) -> tuple[nn.Module, str, str]:
        proj = self.model.text.proj
        if isinstance(proj, nn.Linear):
            return self.model.text, "proj", "text."
        return proj, str(len(proj) - 1), "text.proj."

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        text = self.model.text
        attn_mask = (tokens != text.config.pad_token_id).long()
        pooled = text.pooler(text.transformer(input_ids=tokens, attention_mask=attn_mask), attn_mask)
        return pooled if isinstance(text.proj, nn.Linear) else text.proj[:-1](pooled)

    def sample_tokens(self, generator: torch.Generator) -> torch.Tensor:
        length = min(self.model.text.context_length, HF_CHECK_LENGTH)
        return torch.randint(self.model.text.vocab_size, (CHECK_ROWS, length), generator=generator)


class TransformersClipTextProjector(TextProjector):
    """transformers ``CLIPModel``: ``text_projection`` on the text model's pooled output."""

    family = "transformers_clip_text"
    description = "transformers CLIPModel (text_projection)"

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        return isinstance(model, TransformersCLIP) and isinstance(model.text.text_projection, nn.Linear)

    @property
    def holder(self) -> tuple[nn.Module, str, str]:
        return self.model.text, "text_projection", ""

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.text.text_model(input_ids=tokens).pooler_output

    def sample_tokens(self, generator: torch.Generator) -> torch.Tensor:
        return _sample_tokens(self.model, generator)


class TransformersSiglipTextProjector(TextProjector):
    """transformers ``SiglipModel``: the text model's ``head``, an ``nn.Linear`` on the last token."""

    family = "transformers_siglip_text"
    description = "transformers SiglipModel (text_model.head)"

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        return (
            isinstance(model, TransformersCLIP)
            and model.text.text_projection is None
            and isinstance(getattr(model.text.text_model, "head", None), nn.Linear)
        )

    @property
    def holder(self) -> tuple[nn.Module, str, str]:
        return self.model.text.text_model, "head", "text_model."

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        text_model = self.model.text.text_model
        return captured(lambda: text_model(input_ids=tokens), {"x": (text_model.head, True)})["x"]

    def sample_tokens(self, generator: torch.Generator) -> torch.Tensor:
        return _sample_tokens(self.model, generator)


def _sample_tokens(model: TransformersCLIP, generator: torch.Generator) -> torch.Tensor:
    length = min(model.text.context_length, HF_CHECK_LENGTH)
    return torch.randint(model.text.vocab_size, (CHECK_ROWS, length), generator=generator)


TEXT_FAMILIES: tuple[type[TextProjector], ...] = (
    ClipTextProjector,
    TextTransformerProjector,
    HFTextProjector,
    TransformersClipTextProjector,
    TransformersSiglipTextProjector,
)


def find_text_projector(model: nn.Module, *, verify: bool = True) -> TextProjector:
    """The :class:`TextProjector` of an open_clip model's text tower.

    Args:
        model: an open_clip model (CLIP, CustomTextCLIP, CoCa).
        verify: run the text tower once on random tokens (in its dtype, on its device, without
            gradients) and check that ``x W0 + b`` reproduces ``model.encode_text``; pass False only
            for models on the meta device.

    Raises:
        UnsupportedModelError: the text tower has no projection of a supported family, or its output
            is not reproduced.
        InputError: ``verify`` is True for a model on the meta device.
    """
    families = [f for f in TEXT_FAMILIES if f.recognises(model)]
    tower = type(getattr(model, "text", model)).__name__
    if len(families) != 1:
        raise UnsupportedModelError(
            f"prolip cannot find a trainable text projection in {type(model).__name__} (text tower {tower}): it has "
            f"none, or none of a supported family: {'; '.join(f'{f.family} ({f.description})' for f in TEXT_FAMILIES)}."
        )
    projector = families[0](model)
    if verify:
        what = f"text tower {tower}"
        check_device(model, what)
        param = projector.parameter
        tokens = projector.sample_tokens(check_generator()).to(param.device)
        with torch.no_grad(), eval_mode(model):
            expected = model.encode_text(tokens, normalize=False)
            got = projector.head.project(projector.features(tokens))
        check_reproduces(expected, got, param.dtype, what, f"x {projector.key} + bias vs encode_text")
    return projector
