"""The model's own preprocessing: input size, normalisation and inference resizing, as open_clip records them.

Training views and the plain test view (:mod:`prolip.features.views`) render images with these
settings and the feature cache keys on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from prolip.errors import InputError

RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass(frozen=True)
class ViewConfig:
    """How images become model inputs.

    Attributes:
        size: model input side (square).
        mean, std: per-channel normalisation of the model.
        resize_mode: how the plain view fits an image to the input, as open_clip's inference
            transform: "shortest" (shorter side to ``size``, centre crop), "longest" (longer side
            to ``size``, centre pad with ``fill_color``) or "squash" (both sides to ``size``).
        interpolation: "bicubic" or "bilinear" resampling of the plain view.
        fill_color: pixel value (0-255) of the padding in "longest" mode.
        scale: range of the crop's area as a fraction of the image (ProLIP: 0.5 to 1).
        ratio: range of the crop's aspect ratio.
        flip_p: probability of a horizontal flip.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill_color: int = 0
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5


def view_config_of(model: nn.Module) -> ViewConfig:
    """The input size, normalisation and inference resizing open_clip recorded on ``model``."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise InputError(f"non-square model input size {tuple(size)} is not supported.")
        size = size[0]
    resize_mode = cfg.get("resize_mode") or "shortest"
    # open_clip's inference transform reads "random" (a training option) as bicubic.
    interpolation = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
    if resize_mode not in RESIZE_MODES or interpolation not in INTERPOLATIONS:
        raise InputError(f"preprocessing {cfg!r} of this model is not supported (resize_mode in {RESIZE_MODES}).")
    return ViewConfig(
        size=int(size),
        mean=tuple(float(m) for m in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(float(s) for s in cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        resize_mode=resize_mode,
        interpolation=interpolation,
        fill_color=int(cfg.get("fill_color", 0)),
    )
