"""The zero-shot classifier T: one L2-normalised text embedding per class, averaged over templates."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prolip.errors import InputError
from prolip.params import TEMPLATE_RULE, valid_templates

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def check_templates(templates: Sequence[str] | None) -> list[str]:
    """``templates`` as a list (None: :data:`DEFAULT_TEMPLATES`), after checking each (:func:`prolip.params.valid_template`)."""
    if templates is None:
        return list(DEFAULT_TEMPLATES)
    if not valid_templates(templates):
        raise InputError(
            f"templates={templates!r} must be a non-empty list of strings with {TEMPLATE_RULE} each, "
            "such as ['a photo of a {}.']."
        )
    return list(templates)


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, class by class: ``K · M`` prompts, class-major."""
    return [t.format(name) for name in class_names for t in templates]


def average_prompts(embeddings: torch.Tensor) -> torch.Tensor:
    """T ``[K, d]`` from prompt embeddings ``[K, M, d]``: each L2-normalised, averaged over templates, normalised.

    The one definition of the zero-shot classifier, used to build it from a model and to rebuild it
    from a trained text projection at every step of ProLIP-text (differentiable).
    """
    return F.normalize(F.normalize(embeddings, dim=-1).mean(dim=-2), dim=-1)


def text_prototypes(classifier: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Class prototypes ``[K, d]``: what CLAP and TaskRes start from.

    Their code keeps the template-averaged *unnormalised* text embeddings, and trains on them with
    absolute step sizes, so the prototypes' scale matters. These are the rows of T ``[K, d]``
    (their direction, so that the untrained prototypes score exactly as zero-shot does) scaled to
    the norm of that average of the prompt ``embeddings`` ``[K, M, d]``.
    """
    return classifier * embeddings.mean(dim=-2).norm(dim=-1, keepdim=True)


@torch.no_grad()  # not inference_mode: T takes part in autograd during training
def zero_shot_classifier(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """Build T ``[K, d_out]`` (float32, CPU) from class names and prompt templates.

    For each class, every template is filled with the class name and encoded; the embeddings are
    L2-normalised, averaged over templates, and normalised again (:func:`average_prompts`).
    """
    per_prompt = encode_prompts(
        model.encode_text, tokenizer, class_names, templates, device=device, batch_size=batch_size
    )
    return average_prompts(per_prompt)


@torch.no_grad()
def encode_prompts(
    encode: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """``encode(tokens)`` of every prompt, float32 CPU ``[K, M, width]``.

    ``encode`` is ``model.encode_text`` for the embeddings, or a text projector's ``features`` for the
    pre-projection text features ProLIP-text trains on.
    """
    filled = prompts(class_names, templates)
    chunks = [
        encode(tokenizer(filled[start : start + batch_size]).to(device)).float().cpu()
        for start in range(0, len(filled), batch_size)
    ]
    return torch.cat(chunks).view(len(class_names), len(templates), -1)
