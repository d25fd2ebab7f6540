"""The zero-shot classifier T: one L2-normalised text embedding per class, averaged over templates."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prolip.errors import InputError

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def check_templates(templates: Sequence[str]) -> list[str]:
    """Return ``templates`` as a list after checking each holds exactly one ``{}`` slot."""
    if isinstance(templates, str) or not templates:
        raise InputError("templates must be a non-empty list of strings such as ['a photo of a {}.'].")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise InputError(f"template {t!r} must be a string with exactly one '{{}}' for the class name.")
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
