"""Open-vocabulary prediction with an adapted projector: the estimator half (the maths half: :mod:`prolip.training.open_vocab`).

ProLIP keeps CLIP's text interface: a fitted adapter's projector W0 + delta scores any class names
through their text classifier T, seen in training or not, with no refit.
:class:`OpenVocabularyClassifier` is a light view of a fitted :class:`~prolip.adapter.ProLIPAdapter`
over other class names; :meth:`prolip.variants.multitask.MultiTaskClassifier.with_classes` gives the
same for several tasks. Neither changes the adapter's fitted state.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from prolip.adapter import ProLIPAdapter
from prolip.errors import InputTypeError
from prolip.features.images import ImageLike, kept
from prolip.model.zeroshot import check_templates
from prolip.training.labels import accuracy, check_lengths, class_array, label_list
from prolip.training.open_vocab import check_class_names, class_classifier

logger = logging.getLogger(__name__)


class OpenVocabularyClassifier:
    """A fitted adapter's adapted projector scoring any class names: ``predict``, ``predict_proba``, ``score``.

    T of the names is open_clip's zero-shot classifier under ``templates``, or, for a delta whose
    text side was trained (``target="text"`` / ``"image+text"``), the one its trained text projection
    gives (:func:`prolip.training.open_vocab.class_classifier`). Names and templates the adapter
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
        self.class_names_ = check_class_names(class_names)
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
        features = self.adapter.extract_features(images, views=0)
        return torch.softmax(self.logits_from_features(features), dim=-1).numpy()

    def predict(self, images: Sequence[ImageLike]) -> np.ndarray:
        """The predicted class name of each image (readable images only)."""
        return self.predict_features(self.adapter.extract_features(images, views=0))

    def score(self, images: Sequence[ImageLike], labels: Sequence[Hashable]) -> float:
        """Accuracy of :meth:`predict` against ``labels`` (class names; readable images only)."""
        check_lengths(images, labels)
        labels = label_list(labels)
        features = self.adapter.extract_features(images, views=0)
        return self.score_features(features, kept(labels, self.adapter.skipped_))

    def __repr__(self) -> str:
        shown = ", ".join(self.class_names_[:5]) + (", ..." if len(self.class_names_) > 5 else "")
        return f"OpenVocabularyClassifier({len(self.class_names_)} classes: {shown})"
