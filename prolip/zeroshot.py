"""The zero-shot classifier T: one L2-normalised text embedding per class, averaged over templates."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prolip.errors import InputError

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def valid_templates(templates: object) -> bool:
    """True for a non-empty sequence of strings that each hold exactly one ``{}`` slot."""
    return (
        isinstance(templates, Sequence)
        and not isinstance(templates, str)
        and len(templates) > 0
        and all(isinstance(t, str) and t.count("{}") == 1 for t in templates)
    )


def check_templates(templates: Sequence[str] | None) -> list[str]:
    """``templates`` as a list (None: :data:`DEFAULT_TEMPLATES`), after checking each has one ``{}`` slot."""
    if templates is None:
        return list(DEFAULT_TEMPLATES)
    if not valid_templates(templates):
        raise InputError(
            f"templates={templates!r} must be a non-empty list of strings with exactly one '{{}}' each, "
            "such as ['a photo of a {}.']."
        )
    return list(templates)


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
    L2-normalised, averaged over templates, and normalised again.
    """
    prompts = [t.format(name) for name in class_names for t in templates]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start : start + batch_size]).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(chunks).view(len(class_names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1).cpu()
