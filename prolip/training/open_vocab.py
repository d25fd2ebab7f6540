"""T of any class names under a fit: open vocabulary's maths half (the estimator half: :mod:`prolip.variants.open_vocab`).

ProLIP trains projectors, not classes: the adapted vision projector scores any classes whose T is
given. T of new names is open_clip's zero-shot classifier, except where the fit trained the text
projection (``target="text"`` or ``"image+text"``): then it is built from the prompts' pre-projection
text features through the trained projection W_t0 + text delta, exactly as training built T.
``prolip bench`` builds every class set's T here too (:func:`prolip.bench.inputs.class_set`), so the
library's new-class scores and the bench's are one computation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from prolip.errors import InputError, InputTypeError
from prolip.model.backbone import Backbone
from prolip.training.sides import TextSide


def check_class_names(class_names: Iterable[str]) -> list[str]:
    """``class_names`` as a list, after checking it is a non-empty list (or array) of distinct non-empty strings."""
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Iterable):
        raise InputTypeError(
            f"class names must be a list of strings such as ['cat', 'dog'], not {type(class_names).__name__}."
        )
    names = [str(name) if isinstance(name, str) else name for name in class_names]  # numpy strings as str
    bad = [name for name in names if not isinstance(name, str) or not name.strip()]
    if not names or bad:
        raise InputError(f"class names {names!r} must be a non-empty list of non-empty strings; {bad!r} are not.")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"class names {repeated!r} are given more than once; give each class once.")
    return names


def class_classifier(
    backbone: Backbone, class_names: Sequence[str], templates: Sequence[str], text_delta: torch.Tensor | None = None
) -> torch.Tensor:
    """T ``[K, d_out]`` (float32, CPU) of ``class_names`` under ``templates``.

    Args:
        backbone: the base model.
        class_names: the text put into the templates for each class, in column order.
        templates: prompt templates, one ``{}`` each (already checked).
        text_delta: W_t − W_t0 of a trained text projection, in the parameter's own orientation
            (:attr:`prolip.training.fitted.FittedState.text_delta`), or None for open_clip's zero-shot T.
    """
    if text_delta is None:
        return backbone.classifier(class_names, templates)
    projector = backbone.text_projector
    side = TextSide(backbone.prompt_features(class_names, templates), projector.head.frozen())
    with torch.no_grad():
        return side.classifier(side.start + projector.to_in_out(text_delta).float().cpu())
