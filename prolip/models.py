"""Building open_clip models, their preprocessing settings and tokenizers, and W0 fingerprints."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prolip.errors import InputError, ModelLoadError
from prolip.views import ViewConfig

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Backbone:
    """An open_clip model together with what prolip needs to feed it."""

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    view_config: ViewConfig
    name: str | None
    pretrained: str | None
    tower_fingerprint: str | None = None  # the feature cache's key for this tower, once computed


def _resolve_pretrained(name: str, pretrained: str | None) -> str | None:
    """Map prolip's own stand-in tag to its packaged checkpoint; everything else passes through."""
    from prolip import standin

    if name == standin.MODEL_NAME:
        standin.register()
        if pretrained == standin.PRETRAINED_TAG:
            return os.fspath(standin.checkpoint_path())
    return pretrained


def dtype_of(precision: str) -> torch.dtype:
    """The torch dtype of a precision name ("fp32", "fp16" or "bf16")."""
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise InputError(f"precision={precision!r} is not supported; use one of {sorted(PRECISIONS)}.") from None


def view_config_of(model: nn.Module) -> ViewConfig:
    """The input size and normalisation open_clip recorded on ``model``."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise InputError(f"non-square model input size {tuple(size)} is not supported.")
        size = size[0]
    mean = tuple(float(m) for m in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(s) for s in cfg.get("std", open_clip.OPENAI_DATASET_STD))
    return ViewConfig(size=int(size), mean=mean, std=std)


def default_tokenizer(model: nn.Module) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's standard tokenizer at the model's context length."""
    import open_clip

    context_length = open_clip.get_model_tokenize_cfg(model).get("context_length", 77)
    return open_clip.SimpleTokenizer(context_length=context_length)


def build_backbone(
    model: str | nn.Module,
    pretrained: str | None,
    *,
    precision: str,
    device: torch.device,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
) -> Backbone:
    """Create (or adopt) an open_clip model in eval mode on ``device`` in ``precision``.

    ``model`` is an open_clip model name (``pretrained`` then is an open_clip tag, a local
    checkpoint path, or None for random weights) or an already-built open_clip model.
    """
    import open_clip

    dtype = dtype_of(precision)
    if isinstance(model, nn.Module):
        if not hasattr(model, "encode_text") or not hasattr(model, "visual"):
            raise InputError(
                f"model of type {type(model).__name__} is not an open_clip CLIP model (it needs .visual and .encode_text)."
            )
        net, name = model, None
        tok = tokenizer or default_tokenizer(model)
    elif isinstance(model, str):
        checkpoint = _resolve_pretrained(model, pretrained)
        if checkpoint and os.path.sep in checkpoint and not os.path.isfile(checkpoint):
            raise ModelLoadError(f"checkpoint file {checkpoint!r} does not exist; check the path given as pretrained.")
        try:
            net = open_clip.create_model(model, pretrained=checkpoint, weights_only=True)
            tok = tokenizer or open_clip.get_tokenizer(model)
        except Exception as exc:  # open_clip raises bare RuntimeErrors for unknown names and tags
            raise ModelLoadError(
                f"could not build open_clip model {model!r} with pretrained={pretrained!r}: {exc}. "
                "Use a name from open_clip.list_models(), and a tag from open_clip.list_pretrained() "
                "or a local checkpoint file (needed offline)."
            ) from exc
        name = model
    else:
        raise InputError(f"model must be an open_clip model name or model, not {type(model).__name__}.")
    net = net.to(device=device, dtype=dtype).eval()
    return Backbone(net, tok, view_config_of(net), name, pretrained)


def fingerprint(weight: torch.Tensor) -> str:
    """SHA-256 of a projector weight cast to float16 (C order), as a hex string.

    Casting first makes the fingerprint the same whether the base model runs in fp32 or fp16.
    """
    data = weight.detach().to("cpu", torch.float16).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()
