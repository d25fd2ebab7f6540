"""The backbone: an open_clip model built once, with what prolip derives from it.

A :class:`Backbone` owns the model, its tokenizer and preprocessing settings, its projector, the
device and precision it runs in, and its fingerprints (computed on first use, once). Estimators
build one per (model, pretrained, precision, device, tokenizer) and share it read-only.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prolip.errors import InputError, ModelLoadError
from prolip.model import local_models
from prolip.model.fingerprint import Fingerprint
from prolip.model.preprocessing import view_config_of
from prolip.model.towers import Projector, find_projector
from prolip.model.transformers_clip import (
    PREFIX,
    TransformersCLIP,
    from_transformers,
    is_transformers_model,
    load_transformers,
)
from prolip.model.zeroshot import encode_prompts, zero_shot_classifier
from prolip.params import DEVICE, MODEL, PRECISION, PRECISIONS, PRETRAINED, validate_params

if TYPE_CHECKING:
    from prolip.model.towers.text import TextProjector

logger = logging.getLogger(__name__)

DRAFT_FACTOR = 4
"""Image files are decoded at no less than this many times the model's input side (JPEG draft
mode): cheap for huge photos, and the antialiased resize that follows hides the difference."""


def select_device(device: str | torch.device | None = None) -> torch.device:
    """The device to use: the one given, else CUDA, then Apple MPS, then the CPU.

    Raises:
        InputError: the device given is not there (CUDA without a GPU or past the last one, MPS off a Mac).
    """
    if device is not None:
        chosen = torch.device(device)
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device={str(device)!r}: torch sees no CUDA GPU here; use device 'cpu'.")
        if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise InputError(f"device={str(device)!r}: there are {torch.cuda.device_count()} CUDA GPUs (0..n-1).")
        mps = getattr(torch.backends, "mps", None)
        if chosen.type == "mps" and (mps is None or not mps.is_available()):
            raise InputError(f"device={str(device)!r}: Apple MPS is not available here; use device 'cpu'.")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _default_tokenizer(model: nn.Module) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's standard tokenizer at the model's context length (a transformers model's own, wrapped)."""
    import open_clip

    if isinstance(model, TransformersCLIP):
        return model.tokenizer

    context_length = open_clip.get_model_tokenize_cfg(model).get("context_length", 77)
    return open_clip.SimpleTokenizer(context_length=context_length)


class Backbone:
    """An open_clip model in eval mode on its device and precision, and what prolip needs of it.

    Attributes:
        model: the open_clip model (prolip never modifies it).
        tokenizer: turns prompts into tokens for ``model.encode_text``.
        view_config: input size, normalisation and resizing of the model's preprocessing.
        projector: the vision tower's trainable projector (:mod:`prolip.model.towers`).
        name: the open_clip model name, or None for a model object.
        pretrained: the pretrained tag or checkpoint it was built with.
        precision: "fp32", "fp16" or "bf16".
        device: where the model lives.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        name: str | None,
        pretrained: str | None,
        precision: str,
        device: torch.device,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.view_config = view_config_of(model)
        self.projector: Projector = find_projector(model)
        self.name = name
        self.pretrained = pretrained
        self.precision = precision
        self.device = device

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of ``precision``."""
        return PRECISIONS[self.precision]

    @property
    def recorded(self) -> tuple[str, str]:
        """``(model name, pretrained)`` as files record the base model: ``("", "")`` for a model object."""
        if not self.name:
            return "", ""
        return self.name, os.fspath(self.pretrained) if self.pretrained else ""

    @property
    def draft_size(self) -> int:
        """The shortest side image files are decoded at (see :data:`DRAFT_FACTOR`)."""
        return DRAFT_FACTOR * self.view_config.size

    @cached_property
    def fingerprint(self) -> Fingerprint:
        """Precision-independent sketches of W0 and of the whole vision tower (:mod:`prolip.model.fingerprint`)."""
        p = self.projector
        return Fingerprint.of(p.key, p.parameter, p.visual, self.precision)

    @cached_property
    def tower_hash(self) -> str:
        """SHA-256 of the vision tower's state as loaded (names, shapes, dtypes, bytes): the feature cache's key.

        Exact, unlike :attr:`fingerprint`: cached features are reused only for bit-identical towers.
        """
        digest = hashlib.sha256()
        for name, tensor in sorted(self.projector.visual.state_dict().items()):
            value = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
            digest.update(value.view(torch.uint8).numpy().data)
        return digest.hexdigest()

    @cached_property
    def logit_scale(self) -> float:
        """s: the model's own ``logit_scale.exp()``, or 100 where it has none."""
        scale = getattr(self.model, "logit_scale", None)
        return float(scale.detach().float().exp()) if isinstance(scale, torch.Tensor) else 100.0

    def classifier(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """The zero-shot classifier T ``[K, d_out]`` (float32, CPU) of ``class_names`` under ``templates``."""
        return zero_shot_classifier(self.model, self.tokenizer, class_names, templates, device=self.device)

    def prompt_embeddings(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Text embeddings (``encode_text``, unnormalised) of every (class, template) prompt: float32 CPU ``[K, M, d_out]``.

        T is :func:`prolip.model.zeroshot.average_prompts` of them; TaskRes starts from their average
        (:func:`prolip.model.zeroshot.text_prototypes`).
        """
        return encode_prompts(self.model.encode_text, self.tokenizer, class_names, templates, device=self.device)

    @cached_property
    def text_projector(self) -> TextProjector:
        """The text tower's final projection (:func:`prolip.model.towers.text.find_text_projector`), checked on first use.

        Raises:
            UnsupportedModelError: the text tower has no projection prolip can train.
        """
        from prolip.model.towers.text import find_text_projector  # only fits and files with a text side need it

        return find_text_projector(self.model)

    @cached_property
    def text_fingerprint(self) -> Fingerprint:
        """Sketches of the text projection and of the text tower: every tensor of the model outside the vision tower."""
        p = self.text_projector
        text = ((k, v) for k, v in self.model.state_dict().items() if not k.startswith("visual."))
        return Fingerprint.of(p.key, p.parameter, text, self.precision)

    def prompt_features(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Pre-projection text features of every (class, template) prompt: float32 CPU ``[K, M, d_t]``."""
        return encode_prompts(self.text_projector.features, self.tokenizer, class_names, templates, device=self.device)


def build_backbone(
    model: str | nn.Module,
    pretrained: str | None,
    *,
    precision: str = "fp32",
    device: str | torch.device | None = None,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    image_processor: Any = None,
) -> Backbone:
    """Create (or adopt) an open_clip model in eval mode on ``device`` in ``precision``.

    ``model`` is an open_clip model name (``pretrained`` then is an open_clip tag, a local
    checkpoint path, or None for random weights) or an already-built open_clip model, which is
    cast and moved in place. ``device=None`` picks CUDA, then MPS, then the CPU.

    Hugging Face transformers models (:mod:`prolip.model.transformers_clip`): a name
    ``"hf-transformers:<repo id or folder>"`` (``pretrained`` is ignored), a ``TransformersCLIP`` from
    ``from_transformers``, or a ``CLIPModel`` / ``SiglipModel`` with its processor as ``tokenizer`` (or its
    tokenizer as ``tokenizer`` and its ``image_processor``).

    Raises:
        ModelLoadError: the name, tag or checkpoint cannot be turned into a model.
        UnsupportedModelError: the vision tower has no projector prolip can train.
    """
    import open_clip

    validate_params(
        {"model": model, "pretrained": pretrained, "precision": precision, "device": device},
        {"model": MODEL, "pretrained": PRETRAINED, "precision": PRECISION, "device": DEVICE},
    )
    name = None
    if isinstance(model, str) and model.startswith(PREFIX):  # the name says it all: no pretrained tag
        source = model[len(PREFIX) :]
        # A folder is recorded as an absolute path: a delta loaded elsewhere must not resolve it anew.
        name = PREFIX + str(Path(source).resolve()) if Path(source).is_dir() else model
        model, pretrained = load_transformers(model, tokenizer), None
    elif is_transformers_model(model):
        model = from_transformers(model, tokenizer, image_processor=image_processor)
    if isinstance(model, nn.Module):
        if not hasattr(model, "encode_text") or not hasattr(model, "visual"):
            raise InputError(
                f"model of type {type(model).__name__} is not an open_clip CLIP model (it needs .visual and .encode_text)."
            )
        net = model
        # A transformers model brings its own (from its processor, or the tokenizer it was wrapped with).
        tok = _default_tokenizer(model) if isinstance(model, TransformersCLIP) or tokenizer is None else tokenizer
    else:
        pretrained = os.fspath(pretrained) if pretrained is not None else None
        checkpoint = local_models.resolve(model, pretrained)
        if checkpoint and os.path.sep in checkpoint and not os.path.isfile(checkpoint):
            raise ModelLoadError(f"checkpoint file {checkpoint!r} does not exist; check the path given as pretrained.")
        try:
            net = open_clip.create_model(model, pretrained=checkpoint, weights_only=True)
            tok = tokenizer or open_clip.get_tokenizer(model)
        except Exception as exc:  # open_clip raises bare RuntimeErrors for unknown names and tags
            known = local_models.known_models()
            if model not in known and not model.startswith(("hf-hub:", "local-dir:")):
                close = difflib.get_close_matches(model, known, n=5, cutoff=0.5)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "."
                raise ModelLoadError(
                    f"unknown open_clip model {model!r}{hint} `prolip models` lists the ones prolip supports."
                ) from None
            raise ModelLoadError(
                f"could not build open_clip model {model!r} with pretrained={pretrained!r}: {exc}. "
                "Use a name from open_clip.list_models(), and a tag from open_clip.list_pretrained() "
                "or a local checkpoint file (needed offline)."
            ) from exc
        name = model
    target = select_device(device)
    net = net.to(device=target, dtype=PRECISIONS[precision]).eval()
    return Backbone(net, tok, name=name, pretrained=pretrained, precision=precision, device=target)


def file_may_choose(model_name: str, pretrained: str) -> bool:
    """Whether a delta file alone may decide to build this base model.

    A file is untrusted input: it may name open_clip's own configurations (``open_clip.list_models()``,
    local JSON, nothing fetched) and prolip's registered ones (:mod:`prolip.model.local_models`), with one of
    their own pretrained tags (official weights, or the registered local files). A Hub model name
    (``hf-hub:...``), a checkpoint path or an unknown tag would let the file choose what is downloaded or
    read, so it needs the caller's explicit choice (see docs/security.md).
    """
    if model_name not in local_models.known_models():
        return False
    return pretrained == "" or pretrained in local_models.pretrained_tags(model_name)
