"""The registry of vision tower families, and ``find_projector``, which picks and checks one.

Each family is a ``Projector`` subclass that recognises its towers by class (and, for timm towers,
by the structure open_clip gave the head); Hugging Face transformers CLIP and SigLIP models join
through :class:`prolip.model.transformers_clip.TransformersCLIP`. A recognised tower is then run once on a random input:
unless ``x W0 + b + r`` reproduces ``encode_image``, the model is refused, so a change in open_clip
or timm can never make prolip silently train the wrong layer.
"""

from __future__ import annotations

import torch
from torch import nn

from prolip.errors import UnsupportedModelError
from prolip.model.towers.base import (
    CHECK_ROWS,
    Projector,
    check_device,
    check_generator,
    check_reproduces,
    eval_mode,
)
from prolip.model.towers.modified_resnet import ModifiedResNetProjector
from prolip.model.towers.timm_head import TimmLinearProjector, TimmMlpProjector
from prolip.model.towers.timm_trunk import TimmClassifierProjector, TimmMapProjector
from prolip.model.towers.transformers_towers import TransformersClipProjector, TransformersSiglipProjector
from prolip.model.towers.vit import VisionTransformerProjector

FAMILIES: tuple[type[Projector], ...] = (
    VisionTransformerProjector,
    ModifiedResNetProjector,
    TimmLinearProjector,
    TimmMlpProjector,
    TimmClassifierProjector,
    TimmMapProjector,
    TransformersClipProjector,
    TransformersSiglipProjector,
)


def describe_tower(visual: nn.Module) -> str:
    """A vision tower's class, and for timm towers the trunk and the modules that end the tower."""
    name = type(visual).__name__
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        return name
    head = ", ".join(f"{n}: {type(m).__name__}" for n, m in visual.head.named_children()) or "empty"
    get_classifier = getattr(trunk, "get_classifier", None)
    classifier = type(get_classifier()).__name__ if callable(get_classifier) else "none"
    pool = getattr(trunk, "attn_pool", None)
    pooled = f", attention pool {type(pool).__name__}" if pool is not None else ""
    return f"{name} (timm trunk {type(trunk).__name__}{pooled}, classifier {classifier}; open_clip head: {head})"


def find_projector(model: nn.Module, *, verify: bool = True) -> Projector:
    """The :class:`Projector` of an open_clip CLIP model (or of its vision tower alone).

    Args:
        model: an open_clip model (CLIP, CustomTextCLIP, CoCa) or its ``visual`` tower.
        verify: run the tower once on a random input (two images, in the model's dtype and on its
            device, without gradients) and check that ``x W0 + b + r`` reproduces
            ``model.encode_image``; pass False only for models on the meta device.

    Raises:
        UnsupportedModelError: the tower is of no supported family, or its output is not reproduced.
        InputError: ``verify`` is True for a model on the meta device.
    """
    visual = getattr(model, "visual", model)
    families = [f for f in FAMILIES if f.recognises(visual)]
    if len(families) != 1:
        found = f"it is recognised by {len(families)} families" if families else "it is of none of the families"
        raise UnsupportedModelError(
            f"prolip cannot find a trainable projector in vision tower {describe_tower(visual)}: {found}. "
            f"Supported families: {'; '.join(f'{f.family} ({f.description})' for f in FAMILIES)}."
        )
    projector = families[0](visual)
    if verify:
        _verify(projector, model)
    return projector


def _verify(projector: Projector, model: nn.Module) -> None:
    """Check that the projector's features and map reproduce the model's image embedding."""
    visual = projector.visual
    what = f"vision tower {describe_tower(visual)}"
    check_device(visual, what)
    param = projector.parameter
    size = visual.image_size  # an int or (height, width), depending on the tower
    height, width = (size, size) if isinstance(size, int) else size
    pixels = torch.randn(CHECK_ROWS, 3, height, width, generator=check_generator()).to(param.device, param.dtype)
    encode = getattr(model, "encode_image", None)
    with torch.no_grad(), eval_mode(model):
        expected = encode(pixels, normalize=False) if encode is not None else visual(pixels)
        got = projector.head.project(projector.pack(*projector.features(pixels)))
    check_reproduces(expected, got, param.dtype, what, f"x {projector.key} + bias + residual vs encode_image")
