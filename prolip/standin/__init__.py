"""Stand-in CLIP: a tiny open_clip model pretrained contrastively on Fashion-MNIST.

This is a stand-in for real CLIP weights, for offline demos and tests only. It is
not a real CLIP: it has seen nothing but Fashion-MNIST's ten classes with templated
captions. It exists because the machines that run the demos and tests cannot
download real CLIP checkpoints.

The architecture is a standard open_clip ``VisionTransformer`` (so its vision
projector is ``visual.proj``, shape ``[width, embed_dim]``) and the standard open_clip
text tower and tokenizer, configured in ``prolip-standin-vit.json`` beside this file.
The weights (fp16 safetensors) are made by ``scripts/pretrain_standin.py``; see
``docs/standin.md``.

It is registered with prolip the way open_clip registers its own models, as data
(:data:`prolip.model.local_models.LOCAL_MODELS`: its config and, for its tag, its checkpoint), so
``ProLIPAdapter(MODEL_NAME, PRETRAINED_TAG)`` builds it like any open_clip model. In open_clip
itself::

    import open_clip
    from prolip.model.local_models import add_to_open_clip
    from prolip.standin import MODEL_NAME, checkpoint_path

    add_to_open_clip(MODEL_NAME)
    model = open_clip.create_model(MODEL_NAME, pretrained=str(checkpoint_path()))
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "MODEL_NAME",
    "PRETRAINED_TAG",
    "TEMPLATES",
    "checkpoint_path",
    "config_dir",
    "config_path",
]

MODEL_NAME: str = "prolip-standin-vit"
"""open_clip model name of the stand-in (valid in ``open_clip.create_model`` after :func:`register`)."""

PRETRAINED_TAG: str = "fashion-mnist"
"""Name of the stand-in's only set of weights (what it was pretrained on)."""

TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a picture of a {}.",
    "a grayscale photo of a {}.",
    "a product photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}.",
    "an image of a {}.",
    "a small photo of a {}.",
]
"""Caption templates used in pretraining (each has one ``{}`` for the class name).

The zero-shot classifier averages the normalised text embeddings of all of them.
"""


def config_dir() -> Path:
    """Return the directory holding the stand-in's open_clip config (and checkpoint)."""
    return Path(__file__).resolve().parent


def config_path() -> Path:
    """Return the path of the stand-in's open_clip model config JSON."""
    return config_dir() / f"{MODEL_NAME}.json"


def checkpoint_path() -> Path:
    """Return the path of the stand-in's fp16 safetensors checkpoint (full open_clip state dict)."""
    return config_dir() / f"{MODEL_NAME}.safetensors"
