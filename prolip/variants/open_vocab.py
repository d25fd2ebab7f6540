"""Open vocabulary: a fitted adapter's projector scoring any class names — T of any names, and the classifier.

ProLIP trains projectors, not classes: the adapted vision projector W0 + delta scores any classes whose T is
given, seen in training or not, with no refit. T of new names (:func:`class_classifier`) is open_clip's
zero-shot classifier, except where the fit trained the text projection (``target="text"`` or
``"image+text"``): then it is built from the prompts' pre-projection text features through the trained
projection W_t0 + text delta, exactly as training built T. :class:`OpenVocabularyClassifier` is a light view
of a fitted :class:`~prolip.adapter.ProLIPAdapter` over other class names;
:meth:`prolip.variants.multitask.MultiTaskClassifier.with_classes` gives the same for several tasks. Neither
changes the adapter's fitted state. ``prolip bench`` builds every class set's T with :func:`class_classifier`
too, so the library's new-class scores and the bench's are one computation.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Sequence

import numpy as np
import torch

from prolip.adapter import ProLIPAdapter
from prolip.errors import InputError, InputTypeError
from prolip.features.images import ImageLike, kept
from prolip.model.backbone import Backbone
from prolip.model.zeroshot import check_templates
from prolip.training.labels import accuracy, check_lengths, class_array, label_list
from prolip.training.sides import TextSide

logger = logging.getLogger(__name__)


def _check_class_names(class_names: Iterable[str]) -> list[str]:
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


class OpenVocabularyClassifier:
    """A fitted adapter's adapted projector scoring any class names: ``predict``, ``predict_proba``, ``score``.

    T of the names is open_clip's zero-shot classifier under ``templates``, or, for a delta whose
    text side was trained (``target="text"`` / ``"image+text"``), the one its trained text projection
    gives (:func:`class_classifier`). Names and templates the adapter
    was fitted with give its own classifier's predictions. A TaskRes residual
    (``taskres_alpha``) belongs to the trained classes and is not applied here.

    Args:
        adapter: a fitted :class:`~prolip.adapter.ProLIPAdapter` (only read; images go through its
            own preprocessing, batch size, device and ``on_error``).
        class_names: the classes to score, in column order; they are also the predicted labels.
        templates: prompt templates with one ``{}`` each; None uses the adapter's fitted templates.

    Attributes:
        classes_: the class names as an array, in the column order of ``predict_proba``.
        class_names_: the class names as a list.
        templates_: the templates T was built with.
        classifier_: T, float32 ``[K, d_out]``.

    Raises:
        NotFittedError: the adapter is not fitted.
        InputError: empty, repeated or non-string class names; malformed templates.
    """

    def __init__(
        self, adapter: ProLIPAdapter, class_names: Sequence[str], templates: Sequence[str] | None = None
    ) -> None:
        if not isinstance(adapter, ProLIPAdapter):
            raise InputTypeError(f"adapter must be a fitted ProLIPAdapter, not {type(adapter).__name__}.")
        state = adapter.fitted_  # NotFittedError before any text is encoded
        self.adapter = adapter
        self.class_names_ = _check_class_names(class_names)
        self.templates_ = check_templates(list(state.templates) if templates is None else templates)
        self.classifier_ = class_classifier(adapter.backbone, self.class_names_, self.templates_, state.text_delta)
        self.classes_ = class_array(self.class_names_)
        logger.info("open-vocabulary view over %d classes, %d templates", len(self.classes_), len(self.templates_))

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``[n, K]`` of test features ``[n, d_in]`` or ``[1, n, d_in]`` (``extract_features(images, views=0)``)."""
        return self.adapter.logits_from_features(features, self.classifier_)

    def predict_features(self, features: torch.Tensor) -> np.ndarray:
        """Predicted class names from test-time features."""
        return self.classes_[self.logits_from_features(features).argmax(dim=1).numpy()]

    def score_features(self, features: torch.Tensor, labels: Sequence[Hashable]) -> float:
        """Accuracy of :meth:`predict_features` against ``labels`` (class names)."""
        return accuracy(self.predict_features(features), labels)

    def predict_proba(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Class probabilities ``(n, K)``; columns follow ``classes_`` (readable images only, see ``on_error``)."""
        features = self.adapter.extract(images, views=0).features
        return torch.softmax(self.logits_from_features(features), dim=-1).numpy()

    def predict(self, images: Sequence[ImageLike]) -> np.ndarray:
        """The predicted class name of each image (readable images only)."""
        return self.predict_features(self.adapter.extract(images, views=0).features)

    def score(self, images: Sequence[ImageLike], labels: Sequence[Hashable]) -> float:
        """Accuracy of :meth:`predict` against ``labels`` (class names; readable images only)."""
        check_lengths(images, labels)
        labels = label_list(labels)
        extracted = self.adapter.extract(images, views=0)
        return self.score_features(extracted.features, kept(labels, extracted.skipped))

    def __repr__(self) -> str:
        shown = ", ".join(self.class_names_[:5]) + (", ..." if len(self.class_names_) > 5 else "")
        return f"OpenVocabularyClassifier({len(self.class_names_)} classes: {shown})"
