"""Hugging Face ``transformers`` CLIP and SigLIP models (``CLIPModel``, ``SiglipModel``) seen as open_clip models.

:class:`TransformersCLIP` wraps a loaded model with its tokenizer and image processor and gives it
what prolip uses of an open_clip model: ``visual`` (the vision tower, and for CLIP its
``visual_projection``), ``encode_image``, ``encode_text``, ``logit_scale`` and the preprocessing
settings (``visual.preprocess_cfg``, from the image processor). The wrapper holds the model's own
modules, so it moves, casts and copies with them; :func:`unwrap` gives the transformers model back
(what ``merged_model`` returns, ready for ``save_pretrained``).

A model name ``"hf-transformers:<repo id or folder>"`` (:data:`PREFIX`) loads one with
``from_pretrained``, the way open_clip's ``"hf-hub:<repo id>"`` loads open_clip checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prolip.errors import InputError, ModelLoadError

PREFIX = "hf-transformers:"
"""Model names starting with this load a transformers CLIPModel or SiglipModel with ``from_pretrained``."""
MODEL_TYPES = ("CLIPModel", "SiglipModel")
INSTALL_HINT = 'Hugging Face transformers models need the transformers package: pip install "prolip[transformers]"'


def is_transformers_model(model: object) -> bool:
    """Whether ``model`` is a transformers ``CLIPModel`` or ``SiglipModel`` (transformers is not imported)."""
    return type(model).__name__ in MODEL_TYPES and type(model).__module__.startswith("transformers.")


def _output_tensor(out: Any) -> torch.Tensor:
    """transformers' ``get_*_features`` return a tensor, or (transformers 5) an output whose pooler output it is."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def preprocess_cfg_of(image_processor: Any) -> dict[str, Any]:
    """open_clip's preprocessing settings (size, mean, std, resize mode, interpolation) of an image processor.

    A ``CLIPImageProcessor`` resizes the shorter side and centre-crops (open_clip's "shortest");
    a ``SiglipImageProcessor`` resizes both sides ("squash").

    Raises:
        InputError: the processor does something prolip's views cannot follow (a crop of another
            size than the resize, non-square inputs, no rescaling to [0, 1], an unknown resampling).
    """
    from PIL import Image

    what = f"image processor {type(image_processor).__name__}"
    size, crop = dict(image_processor.size or {}), dict(getattr(image_processor, "crop_size", None) or {})
    size = {k: v for k, v in size.items() if v is not None}
    crop = {k: v for k, v in crop.items() if v is not None}
    if any(not isinstance(v, int) or v < 1 for v in (*size.values(), *crop.values())):
        raise InputError(f"{what} has sizes {size} / crop {crop}; every size must be a positive number of pixels.")
    if "shortest_edge" in size and getattr(image_processor, "do_center_crop", False):
        side, mode = size["shortest_edge"], "shortest"
        if (crop.get("height"), crop.get("width")) != (side, side):
            raise InputError(
                f"{what} resizes to {side} then crops {crop}; prolip supports a crop of the resize's size."
            )
    elif (
        "height" in size
        and size.get("height") == size.get("width")
        and not getattr(image_processor, "do_center_crop", False)
    ):
        side, mode = size["height"], "squash"
    else:
        raise InputError(f"{what} has sizes {size} / crop {crop}; prolip supports square inputs only.")
    if not (image_processor.do_resize and image_processor.do_rescale and image_processor.do_normalize):
        raise InputError(f"{what} does not resize, rescale and normalise; prolip's views do all three.")
    if abs(float(image_processor.rescale_factor) - 1 / 255) > 1e-9:
        raise InputError(f"{what} rescales by {image_processor.rescale_factor}, not 1/255.")
    resample = int(image_processor.resample)
    interpolation = {int(Image.Resampling.BICUBIC): "bicubic", int(Image.Resampling.BILINEAR): "bilinear"}.get(resample)
    if interpolation is None:
        raise InputError(f"{what} resamples with PIL filter {resample}; prolip supports bicubic and bilinear.")
    return {
        "size": int(side),
        "mean": tuple(float(m) for m in image_processor.image_mean),
        "std": tuple(float(s) for s in image_processor.image_std),
        "resize_mode": mode,
        "interpolation": interpolation,
    }


def _token_function(tokenizer: Any, context_length: int) -> Callable[[list[str]], torch.Tensor]:
    """Prompts to token ids ``[n, context_length]``, as the model's processor pads them (to the maximum length).

    ``tokenizer`` is a transformers tokenizer or processor, or a callable already returning ids.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
    if type(tokenizer).__module__.startswith("transformers.") and hasattr(tokenizer, "pad_token"):

        def tokenize(texts: list[str]) -> torch.Tensor:
            try:
                out = tokenizer(
                    list(texts), padding="max_length", max_length=context_length, truncation=True, return_tensors="pt"
                )
            except Exception as exc:  # a tokenizer's own failure (no pad token, a broken vocabulary, ...)
                reason = (str(exc).strip().splitlines() or [""])[0][:200]
                raise InputError(
                    f"the tokenizer {type(tokenizer).__name__} failed on the prompts ({type(exc).__name__}: {reason}); "
                    "check that it is the model's own, with a pad token."
                ) from None
            return out["input_ids"]

        return tokenize
    return tokenizer


class TransformersVision(nn.Module):
    """The vision side of a transformers model: ``vision_model`` and, for CLIP, ``projection`` (its own modules).

    ``model_type`` is the model's class name, "CLIPModel" or "SiglipModel".
    """

    def __init__(
        self, model_type: str, vision_model: nn.Module, projection: nn.Linear | None, preprocess_cfg: dict[str, Any]
    ) -> None:
        super().__init__()
        self.model_type = model_type
        self.vision_model = vision_model
        self.projection = projection
        self.image_size = int(vision_model.config.image_size)
        self.preprocess_cfg = preprocess_cfg

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The image embedding (what ``get_image_features`` returns)."""
        pooled = self.vision_model(pixel_values=pixels).pooler_output
        return pooled if self.projection is None else self.projection(pooled)


class TransformersText(nn.Module):
    """The text side of a transformers model: ``text_model`` and, for CLIP, ``text_projection`` (its own modules)."""

    def __init__(self, text_model: nn.Module, text_projection: nn.Linear | None) -> None:
        super().__init__()
        self.text_model = text_model
        self.text_projection = text_projection
        self.context_length = int(text_model.config.max_position_embeddings)
        self.vocab_size = int(text_model.config.vocab_size)


class TransformersCLIP(nn.Module):
    """A transformers ``CLIPModel`` or ``SiglipModel`` with open_clip's interface (see the module docstring).

    Attributes:
        hf: the transformers model (not a registered child: its modules are, through ``visual`` and ``text``).
        visual, text: its towers (:class:`TransformersVision`, :class:`TransformersText`).
        tokenizer: prompts to token ids ``[n, context_length]``.
        model_type: "CLIPModel" or "SiglipModel".
        processing: the transformers tokenizer (or processor) and image processor it came with, which a merged
            model saves beside its weights (those that have ``save_pretrained``).
    """

    def __init__(
        self,
        hf: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        preprocess_cfg: dict,
        processing: tuple[Any, ...] = (),
    ) -> None:
        super().__init__()
        self.processing = tuple(p for p in processing if hasattr(p, "save_pretrained"))
        object.__setattr__(self, "hf", hf)  # not a child: the state dict stays visual.* / text.* / logit_*
        self.model_type = type(hf).__name__
        clip = self.model_type == "CLIPModel"
        self.visual = TransformersVision(
            self.model_type, hf.vision_model, hf.visual_projection if clip else None, preprocess_cfg
        )
        self.text = TransformersText(hf.text_model, hf.text_projection if clip else None)
        self.logit_scale = hf.logit_scale
        self.logit_bias = getattr(hf, "logit_bias", None)
        self.tokenizer = tokenizer

    def train(self, mode: bool = True) -> TransformersCLIP:
        """Set the mode of the towers and of the transformers model itself (not a registered child)."""
        self.hf.train(mode)
        return super().train(mode)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``get_image_features``, L2-normalised with ``normalize``."""
        out = _output_tensor(self.hf.get_image_features(pixel_values=pixels))
        return nn.functional.normalize(out, dim=-1) if normalize else out

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``get_text_features`` of token ids, L2-normalised with ``normalize``."""
        out = _output_tensor(self.hf.get_text_features(input_ids=tokens))
        return nn.functional.normalize(out, dim=-1) if normalize else out


def from_transformers(
    model: nn.Module, processor: Any = None, *, tokenizer: Any = None, image_processor: Any = None
) -> TransformersCLIP:
    """A transformers ``CLIPModel`` / ``SiglipModel`` as a model for :class:`prolip.ProLIPAdapter` (``model=``).

    Args:
        model: the loaded transformers model.
        processor: its processor (``CLIPProcessor`` / ``SiglipProcessor``): tokenizer and image processor.
        tokenizer: instead of the processor's: a transformers tokenizer, or a callable turning a list of
            prompts into token ids ``[n, length]``.
        image_processor: instead of the processor's: the image processor whose resizing and
            normalisation the test view follows.
    """
    if isinstance(model, TransformersCLIP):
        return model
    if not is_transformers_model(model):
        raise InputError(f"model of type {type(model).__name__} is not a transformers CLIPModel or SiglipModel.")
    if tokenizer is None:  # a processor holds both; a tokenizer passed as the processor is the tokenizer
        tokenizer = getattr(processor, "tokenizer", None) or (
            None if hasattr(processor, "image_processor") else processor
        )
    image_processor = image_processor if image_processor is not None else getattr(processor, "image_processor", None)
    if tokenizer is None or image_processor is None:
        raise InputError(
            f"a transformers {type(model).__name__} needs its tokenizer and its image processor: "
            "ProLIPAdapter(model, tokenizer=processor), or tokenizer=... and preprocess=image_processor "
            "(from_transformers(model, processor) alike): prolip tokenizes prompts and renders test views as they do."
        )
    context_length = int(model.text_model.config.max_position_embeddings)
    saved = (processor,) if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer") else (
        tokenizer, image_processor)  # fmt: skip
    return TransformersCLIP(
        model, _token_function(tokenizer, context_length), preprocess_cfg_of(image_processor), saved
    )


def is_image_processor(obj: object) -> bool:
    """Whether ``obj`` is a transformers image processor (e.g. ``CLIPImageProcessor``), not a transform to call."""
    return type(obj).__module__.startswith("transformers.") and hasattr(obj, "image_mean")


def load_transformers(name: str, tokenizer: Any = None) -> TransformersCLIP:
    """``"hf-transformers:<repo id or folder>"``: the model, its tokenizer (unless given) and image processor.

    Raises:
        ModelLoadError: transformers cannot load them (offline without a local copy, not a CLIP or SigLIP model).
    """
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError(INSTALL_HINT) from exc
    source = name[len(PREFIX) :]
    # A folder's (or repository's) own code never runs, whatever stdin says: without trust_remote_code=False
    # transformers asks on stdin whether to import the classes an ``auto_map`` names. Weights come from
    # safetensors only (a pytorch_model.bin is a pickle).
    safe = {"trust_remote_code": False}
    try:
        model = transformers.AutoModel.from_pretrained(source, use_safetensors=True, **safe)
        image_processor = transformers.AutoImageProcessor.from_pretrained(source, **safe)
        if tokenizer is None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, **safe)
    except Exception as exc:  # transformers raises OSError, ValueError, HTTP errors ... for a missing model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"could not load {name!r} with transformers ({first[:300]}). Give a Hub repo id or a folder written by "
            "save_pretrained, with model.safetensors (prolip never reads pickled weights or runs a folder's own "
            "code) and the image processor's and tokenizer's files."
        ) from None
    return from_transformers(model, tokenizer=tokenizer, image_processor=image_processor)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model of a :class:`TransformersCLIP`; any other model as it is."""
    return model.hf if isinstance(model, TransformersCLIP) else model


def saveable(model: nn.Module) -> nn.Module:
    """:func:`unwrap`, and for a transformers model (a merged copy) a ``save_pretrained`` that writes its tokenizer
    and image processor beside the weights, so the folder loads with ``CLIPProcessor.from_pretrained`` and as
    ``hf-transformers:FOLDER``."""
    if not isinstance(model, TransformersCLIP):
        return model
    hf, processing, save = model.hf, model.processing, type(model.hf).save_pretrained

    def save_pretrained(folder: Any, *args: Any, **kwargs: Any) -> Any:
        out = save(hf, folder, *args, **kwargs)
        for part in processing:
            part.save_pretrained(folder)
        return out

    save_pretrained.__doc__ = save.__doc__
    hf.save_pretrained = save_pretrained  # this copy's own method: the model's class is untouched
    return hf


def image_tower(model: nn.Module) -> nn.Module:
    """The module mapping pixels to image embeddings: open_clip's ``visual``, or a transformers model's vision side."""
    if hasattr(model, "visual"):
        return model.visual
    clip = type(model).__name__ == "CLIPModel"
    return TransformersVision(type(model).__name__, model.vision_model, model.visual_projection if clip else None, {})
