"""Many ProLIP tasks on one base model: the trunk runs once per image, each task adds one projector.

Every ProLIP delta changes only the vision projector, so tasks trained on the same base model
share everything before it. :class:`MultiTaskClassifier` extracts the pre-projection features of
a batch once and applies each task's ``W0 + delta`` and text classifier T to them; the extra
cost of a task is two small matrix products, not another pass through the vision tower.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from prolip.adapter import ProLIPAdapter
from prolip.errors import InputError, InputTypeError
from prolip.features.images import ImageLike
from prolip.variants.open_vocab import OpenVocabularyClassifier

logger = logging.getLogger(__name__)

TaskSource = str | os.PathLike | ProLIPAdapter
"""A task: a delta file written by :meth:`ProLIPAdapter.save`, or a fitted adapter."""


class MultiTaskClassifier:
    """Several fitted ProLIP tasks that share one base model, predicted together.

    Args:
        paths_or_adapters: delta files and/or fitted :class:`ProLIPAdapter` objects, as a
            sequence (tasks are named by file stem, or ``task<i>`` for an adapter) or as a
            mapping from task name to file or adapter.
        model: base model for the delta files, as in :meth:`ProLIPAdapter.load`; None uses the
            model named in the first file. Must be None when the first task is an adapter
            object: its model is then the base.
        pretrained: the base model's weights, as in :meth:`ProLIPAdapter.load`; None as ``model``.
        device: device for the delta files' base model; None lets the first task choose.
        verbose: show progress bars while loading and extracting features.
        trust_file_model: as in :meth:`ProLIPAdapter.load`: let the first file alone choose a
            base model that is not one of open_clip's own models and tags.

    Features are extracted once per call with the first task's settings (batch size,
    precision, preprocessing); every delta file is loaded onto that task's model object, so
    the model is held in memory once.

    Raises:
        FingerprintMismatchError: a task was trained on a different base model than the first;
            the message names its file (or task).
        InputError: no tasks, or two tasks with the same name.
        InputTypeError: an entry is neither a path nor a ProLIPAdapter.
        NotFittedError: an adapter object is not fitted.
    """

    def __init__(
        self,
        paths_or_adapters: Sequence[TaskSource] | Mapping[str, TaskSource],
        model: str | torch.nn.Module | None = None,
        pretrained: str | None = None,
        device: str | torch.device | None = None,
        verbose: bool = False,
        trust_file_model: bool = False,
    ) -> None:
        named = _named_sources(paths_or_adapters)
        if isinstance(named[0][1], ProLIPAdapter) and (model is not None or pretrained is not None):
            raise InputError(
                "model= and pretrained= choose the base model of delta files, but the first task is a fitted "
                "adapter whose own model is the base; drop them or put a delta file first."
            )
        self._adapters: dict[str, ProLIPAdapter] = {}
        base: ProLIPAdapter | None = None
        for name, source in named:
            if isinstance(source, ProLIPAdapter):
                state = source.fitted_  # NotFittedError if it is not fitted
                if base is not None:
                    state.check_base(base.backbone, source=f"task {name!r}")
                adapter = source
            elif base is None:
                overrides = {"verbose": verbose} if device is None else {"verbose": verbose, "device": device}
                adapter = ProLIPAdapter.load(
                    source, model=model, pretrained=pretrained, trust_file_model=trust_file_model, **overrides
                )
            else:
                # Onto the base's own model object, in its precision and on its device, so that
                # loading never builds, casts or moves a second copy of the model; load refuses a
                # delta trained on another base model, naming its file.
                adapter = ProLIPAdapter.load(
                    source,
                    model=base.backbone.model,
                    device=base.backbone.device,
                    precision=base.precision,
                    verbose=verbose,
                )
            if base is None:
                base = adapter
            self._adapters[name] = adapter
        self._base = base
        # What scores each task: the adapter itself, or an open-vocabulary view of it (with_classes).
        self._heads: dict[str, ProLIPAdapter | OpenVocabularyClassifier] = dict(self._adapters)
        logger.info("multi-task classifier with %d tasks: %s", len(self._adapters), ", ".join(self._adapters))

    @property
    def tasks(self) -> list[str]:
        """Task names, in the order given."""
        return list(self._adapters)

    @property
    def classes_(self) -> dict[str, np.ndarray]:
        """Each task's labels, in the column order of its :meth:`predict_proba` output."""
        return {name: head.classes_ for name, head in self._heads.items()}

    def with_classes(self, class_names: Sequence[str], templates: Sequence[str] | None = None) -> MultiTaskClassifier:
        """The same tasks, each scoring ``class_names`` with its adapted projector (open vocabulary).

        Each task's T of the names is built as :class:`~prolip.variants.open_vocab.OpenVocabularyClassifier`
        builds it (its own trained text projection, if any; ``templates=None``: each task's fitted
        templates). The trunk still runs once per image. This classifier is left unchanged.
        """
        view = copy.copy(self)
        view._heads = {
            name: OpenVocabularyClassifier(adapter, class_names, templates) for name, adapter in self._adapters.items()
        }
        return view

    def _logits(self, images: Sequence[ImageLike]) -> dict[str, torch.Tensor]:
        features = self._base.extract(images, views=0).features  # the trunk's only pass
        return {name: head.logits_from_features(features) for name, head in self._heads.items()}

    def predict_proba(self, images: Sequence[ImageLike]) -> dict[str, np.ndarray]:
        """Class probabilities of every task: ``{task: (n, K_task) array}``, columns as ``classes_[task]``."""
        return {name: torch.softmax(out, dim=-1).numpy() for name, out in self._logits(images).items()}

    def predict(self, images: Sequence[ImageLike]) -> dict[str, np.ndarray]:
        """Predicted labels of every task: ``{task: (n,) array of values from classes_[task]}``."""
        return {
            name: self._heads[name].classes_[out.argmax(dim=1).numpy()] for name, out in self._logits(images).items()
        }

    def __repr__(self) -> str:
        return f"MultiTaskClassifier(tasks={self.tasks!r})"


def _named_sources(sources: Sequence[TaskSource] | Mapping[str, TaskSource]) -> list[tuple[str, TaskSource]]:
    """(name, source) pairs: mapping keys, else file stems, else ``task<i>`` for adapters."""
    if isinstance(sources, (str, bytes, os.PathLike, ProLIPAdapter)) or not isinstance(sources, (Sequence, Mapping)):
        raise InputTypeError(
            "paths_or_adapters must be a list of delta files and/or fitted adapters, or a dict name -> file or "
            f"adapter, not {type(sources).__name__}."
        )
    items = list(sources.items()) if isinstance(sources, Mapping) else list(enumerate(sources))
    if not items:
        raise InputError("paths_or_adapters is empty; give at least one delta file or fitted adapter.")
    pairs = []
    for key, source in items:
        if not isinstance(source, (str, os.PathLike, ProLIPAdapter)):
            raise InputTypeError(
                f"task {key!r} is a {type(source).__name__}; give a delta file path or a fitted ProLIPAdapter."
            )
        if isinstance(sources, Mapping):
            name = key
        else:
            name = f"task{key}" if isinstance(source, ProLIPAdapter) else Path(source).stem
        if not isinstance(name, str) or not name:
            raise InputTypeError(f"task name {name!r} must be a non-empty string.")
        if any(name == seen for seen, _ in pairs):
            raise InputError(f"two tasks are named {name!r}; pass a dict {{name: path}} to tell them apart.")
        pairs.append((name, source))
    return pairs
