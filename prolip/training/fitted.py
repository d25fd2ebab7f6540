"""Fitted states: what training learned, and the base model it belongs to.

:class:`FittedState` is what a ProLIP adapter's ``fit_features`` produces, what a delta file
stores (:mod:`prolip.files.delta`), what ``load`` restores and what the Hub module shares. It
holds no model: it is checked against one (:meth:`FittedState.check_base`) and merged into one
(:meth:`FittedState.merge_into`). :class:`LinearAdapterState` is the same for a regularised
linear adapter (:mod:`prolip.variants.linear_adapter`), which works on embeddings and belongs to no model weights.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from prolip.errors import DeltaFileError, FingerprintMismatchError, PrecisionWarning, warn
from prolip.estimator import Learned
from prolip.model.backbone import Backbone, file_may_choose
from prolip.model.fingerprint import Fingerprint, legacy_projector_hash
from prolip.model.towers import LinearMap, Projector, find_projector
from prolip.model.transformers_clip import unwrap
from prolip.params import PRECISIONS, check_params
from prolip.training.labels import class_array


@dataclass(frozen=True, eq=False)
class TipCache:
    """The cache of a fitted ProLIP + Tip-Adapter (:mod:`prolip.variants.tip_cache`): keys, their labels, α and β.

    Attributes:
        keys: K, float32 CPU ``[n, d_out]``, unit rows: each training image's adapted embedding
            (averaged over ``key_views`` augmented views, then normalised).
        labels: the keys' class indices, int64 CPU ``[n]`` (columns of the classifier).
        alpha: α, the cache's weight (0: the cache is off and the scores are ProLIP's).
        beta: β, the sharpness of the affinities.
        key_views: augmented views averaged into each key.
        trained_keys: whether the keys were then fine-tuned (Tip-Adapter-F, :func:`prolip.variants.tip_cache.train_keys`).
        selection: how α and β were chosen on a validation set (``alphas``, ``betas``,
            ``val_accuracy`` of the chosen point), or None when they were given.
    """

    keys: torch.Tensor
    labels: torch.Tensor
    alpha: float
    beta: float
    key_views: int
    trained_keys: bool = False
    selection: Mapping[str, Any] | None = None


@dataclass(frozen=True, eq=False)
class FittedState:
    """Everything a fitted adapter needs to predict, save and be checked against its base model.

    Attributes:
        delta: W − W0, float32 CPU, in the projector parameter's own orientation; None when only
            the text projection was trained (W = W0).
        classifier: the classifier T, float32 CPU ``[K, d_out]``: the zero-shot one, or the one
            the trained text projection gives when the text side was trained.
        classes: the labels, in column order.
        class_names: the text put into the templates for each class.
        templates: the prompt templates T was built with.
        n_shots: N, training images per class (n / K).
        reg_lambda: the λ training used.
        logit_scale: the s training used.
        projector_key: the state-dict key of the projector parameter (e.g. "visual.proj").
        projector_family: the tower family (:mod:`prolip.model.towers`).
        model_name: the open_clip model name, or "" for a model object.
        pretrained: the pretrained tag or checkpoint, or "".
        hyperparameters: the estimator's hyperparameters at fit time (JSON-able values only).
        fingerprint: sketches of the base model's W0 and vision tower; None only for files of
            delta format 1, which record ``legacy_hash`` instead.
        legacy_hash: format 1's SHA-256 of W0 cast to fp16, or None.
        loss_history: training loss per step (empty for a loaded delta).
        text_delta: W_t − W_t0 of the text projection, float32 CPU, in the parameter's own
            orientation; None when the text side was not trained.
        text_projector_key: the state-dict key of the text projection (e.g. "text_projection"), or "".
        text_projector_family: the text tower family (:mod:`prolip.model.towers.text`), or "".
        text_fingerprint: sketches of the base model's text projection and text tower, or None.
        selection: how ``lr`` and ``reg_lambda`` were chosen on a validation draw (the grid and
            every point's validation accuracy, :meth:`prolip.variants.search.SearchResult.as_dict`), or None.
        cache: Tip-Adapter's cache on the adapted embeddings (ProLIP + Tip-Adapter,
            :class:`prolip.variants.tip_cache.ProLIPTipAdapter`), or None for a plain ProLIP fit.
    """

    delta: torch.Tensor | None
    classifier: torch.Tensor
    classes: tuple[Hashable, ...]
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    n_shots: float
    reg_lambda: float
    logit_scale: float
    projector_key: str
    projector_family: str
    model_name: str
    pretrained: str
    hyperparameters: Mapping[str, Any]
    fingerprint: Fingerprint | None
    legacy_hash: str | None = None
    loss_history: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float32))
    text_delta: torch.Tensor | None = None
    text_projector_key: str = ""
    text_projector_family: str = ""
    text_fingerprint: Fingerprint | None = None
    selection: Mapping[str, Any] | None = None
    cache: TipCache | None = None

    @property
    def target(self) -> str:
        """Which projectors were trained: "image", "text" or "image+text" (:data:`prolip.params.TARGETS`)."""
        if self.text_delta is None:
            return "image"
        return "text" if self.delta is None else "image+text"

    def check_base(self, backbone: Backbone, *, strict: bool = True, source: str = "this delta") -> None:
        """Refuse (or with ``strict=False``, warn about) a base model this state was not trained on.

        Checked: the vision projector's key and shape, the embedding width and the vision
        fingerprint always (the classifier was trained on that tower's features); the text
        projection's key, shape and fingerprint too when the state holds a text delta.

        Raises:
            DeltaFileError: a projector's key or shape, or the embedding width, differ: the
                delta cannot be applied at all.
            FingerprintMismatchError: the base model's W0 or vision tower differ, or its text
                projection or text tower do for a text delta (``strict``).
            UnsupportedModelError: the state holds a text delta but the model has no text
                projection prolip can find.
        """
        projector = backbone.projector
        _check_shape(source, "delta", self.projector_key, self.delta, projector)
        if self.classifier.shape[1] != projector.out_features:
            raise DeltaFileError(
                f"{source} holds a classifier of width {self.classifier.shape[1]}, "
                f"but the model's embedding width is {projector.out_features}."
            )
        if self.text_delta is not None:
            _check_shape(source, "text delta", self.text_projector_key, self.text_delta, backbone.text_projector)
        if self.fingerprint is not None:
            problem = self.fingerprint.mismatch(backbone.fingerprint)
            recorded, found = self.fingerprint.summary(), backbone.fingerprint.summary()
        else:
            found = legacy_projector_hash(projector.parameter)
            problem = None if found == self.legacy_hash else "its projector W0 differs"
            recorded = self.legacy_hash
        if problem is None and self.text_fingerprint is not None:
            problem = self.text_fingerprint.mismatch(backbone.text_fingerprint, side="text")
            recorded, found = self.text_fingerprint.summary("W_t0"), backbone.text_fingerprint.summary("W_t0")
        if problem is None:
            return
        message = (
            f"{source} was trained on a different base model: {problem}. Recorded: {recorded}; "
            f"given model: {found}. Load it onto the base model it was made for, or pass strict=False "
            "to apply it anyway."
        )
        if strict:
            raise FingerprintMismatchError(message)
        warn(message)

    def base_model(self, pretrained: str | None, *, trust_file_model: bool, source: str) -> tuple[str, str | None]:
        """The base model name and pretrained weights this state names, if a file may choose them.

        See :func:`_recorded_base_model`.
        """
        return _recorded_base_model(
            self.model_name, self.pretrained, pretrained, trust_file_model=trust_file_model, source=source
        )

    def adapted_weight(self, projector: Projector) -> torch.Tensor:
        """W0 + delta (W0 when the vision projector was not trained), fp32 ``[d_in, d_out]`` on the projector's device."""
        w0 = projector.to_in_out(projector.parameter).detach().float()
        return w0 if self.delta is None else w0 + projector.to_in_out(self.delta).to(w0.device)

    def merged_copy(self, model: nn.Module, precision: str) -> nn.Module:
        """A copy of ``model`` in ``precision`` whose projectors are W0 + delta (``model`` is untouched).

        For a transformers model (:mod:`prolip.model.transformers_clip`) the copy is the transformers
        model itself, ready for ``save_pretrained``. Warns (PrecisionWarning) with the measured relative error of the merged update when the
        precision rounds it (fp16, bf16); fp32 keeps it exact.
        """
        check_params({"precision": precision})
        merged = copy.deepcopy(model).to(PRECISIONS[precision])
        lost = self.merge_into(merged)
        if lost > 0:
            warn(
                f"merging into {precision} rounded the trained update: its relative error is {lost:.2%}. "
                "Use merged_model(precision='fp32') to keep it exact.",
                PrecisionWarning,
            )
        return unwrap(merged)

    def merge_into(self, model: nn.Module) -> float:
        """Write W0 + delta into ``model``'s own projector parameter, and W_t0 + text delta into its text projection.

        Each in that parameter's own dtype; only the deltas the state holds are written.

        Returns:
            The relative error of the merged update, ‖(W0 + delta) rounded − W0 − delta‖ / ‖delta‖
            (both deltas together): 0 for an fp32 model, and what fp16 or bf16 rounding lost otherwise.
        """
        # The same architecture as the checked base, so the projectors need no second check.
        merged = []
        if self.delta is not None:
            merged.append((find_projector(model, verify=False).parameter, self.delta))
        if self.text_delta is not None:
            from prolip.model.towers.text import find_text_projector  # loaded for text deltas only

            merged.append((find_text_projector(model, verify=False).parameter, self.text_delta))
        lost = norm = 0.0
        with torch.no_grad():
            for param, delta in merged:
                w0 = param.detach().float().clone()
                delta = delta.to(param.device)
                param.copy_((w0 + delta).to(param.dtype))
                lost += float((param.detach().float() - w0 - delta).norm()) ** 2
                norm += float(delta.norm()) ** 2
        return (lost / norm) ** 0.5 if norm > 0 else 0.0


def _check_shape(source: str, what: str, key: str, delta: torch.Tensor | None, projector: LinearMap) -> None:
    """Refuse a delta whose key or shape is not the model's projector's (the key alone for an absent delta)."""
    shape = None if delta is None else tuple(delta.shape)
    if key != projector.key or (delta is not None and shape != tuple(projector.parameter.shape)):
        raise DeltaFileError(
            f"{source} holds a {what} for {key}" + (f" of shape {shape}" if shape else "") + ", "
            f"but the base model's projector is {projector.key} of shape {tuple(projector.parameter.shape)}."
        )


def _recorded_base_model(
    model_name: str, recorded: str, pretrained: str | None, *, trust_file_model: bool, source: str
) -> tuple[str, str | None]:
    """The base model name and pretrained weights a file records, if a file may choose them.

    ``pretrained`` (the caller's choice) overrides the ``recorded`` one.

    Raises:
        DeltaFileError: the file records no model name (it was fitted on a model object, or on
            embeddings from elsewhere), or it names a model a file may not choose
            (:func:`prolip.model.backbone.file_may_choose`) and ``trust_file_model`` is False.
    """
    if not model_name:
        raise DeltaFileError(f"{source} was fitted on a model object, not a named model; pass model= to load it.")
    # The caller's own pretrained choice leaves the file only the architecture to pick.
    if not (trust_file_model or file_may_choose(model_name, recorded if pretrained is None else "")):
        raise DeltaFileError(
            f"{source} names base model {model_name!r} with pretrained {recorded!r}, which is not one "
            "of open_clip's own models and tags: prolip does not let a file choose what to download or read. "
            "Pass model= and pretrained= yourself, or trust_file_model=True if you trust the file."
        )
    return model_name, pretrained if pretrained is not None else (recorded or None)


@dataclass(frozen=True, eq=False)
class LinearAdapterState:
    """What a regularised linear adapter (:class:`prolip.variants.linear_adapter.RegularizedLinearAdapter`) learned.

    Attributes:
        delta: A − I, float32 CPU ``[d, d]``: the adapted embedding is f A.
        classifier: the text classifier T, float32 CPU ``[K, d]``, unit rows.
        classes: the labels, in column order.
        class_names: the text put into the templates for each class (the labels as text when T
            was given directly without names).
        templates: the prompt templates T was built with (empty when T was given directly).
        n_shots: N, training images per class (n / K).
        reg_lambda: the λ training used.
        logit_scale: the s training used.
        hyperparameters: the estimator's hyperparameters at fit time (JSON-able values only).
        model_name: the open_clip model whose ``encode_image`` made the embeddings, or "" when
            they came from elsewhere.
        pretrained: that model's pretrained tag or checkpoint, or "".
        loss_history: training loss per step (empty for a loaded file).
        fingerprint: sketches of that model's vision tower (as projector files record), or None for
            embeddings from elsewhere; checked by :meth:`check_base` before the model embeds anything.
    """

    delta: torch.Tensor
    classifier: torch.Tensor
    classes: tuple[Hashable, ...]
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    n_shots: float
    reg_lambda: float
    logit_scale: float
    hyperparameters: Mapping[str, Any]
    model_name: str = ""
    pretrained: str = ""
    loss_history: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float32))
    fingerprint: Fingerprint | None = None

    def adapter_matrix(self) -> torch.Tensor:
        """A = I + delta, float32 CPU ``[d, d]``."""
        return self.delta + torch.eye(self.delta.shape[0])

    def base_model(self, pretrained: str | None, *, trust_file_model: bool, source: str) -> tuple[str, str | None]:
        """The open_clip model and weights that made the embeddings, if a file may choose them.

        See :func:`_recorded_base_model`.
        """
        if not self.model_name:
            raise DeltaFileError(
                f"{source} was fitted on embeddings from outside open_clip (it names no model); compute the "
                "embeddings of new images yourself and use RegularizedLinearAdapter.predict, or pass model=."
            )
        if not self.pretrained and pretrained is None:
            raise DeltaFileError(
                f"{source} names base model {self.model_name!r} without pretrained weights: prolip would embed "
                "images with randomly initialised weights. Pass pretrained= (the weights the file was fitted on)."
            )
        return _recorded_base_model(
            self.model_name, self.pretrained, pretrained, trust_file_model=trust_file_model, source=source
        )

    def check_base(self, backbone: Backbone, *, source: str) -> None:
        """Refuse a model whose embeddings this adapter was not fitted on: another width, or another fingerprint.

        Raises:
            DeltaFileError: the model's embedding width is not the adapter's.
            FingerprintMismatchError: the model's vision tower differs from the one the file records.
        """
        width, d = backbone.projector.out_features, self.delta.shape[0]
        if width != d:
            raise DeltaFileError(
                f"{source} adapts embeddings of width {d}, but the model {backbone.name or '(object)'!r} "
                f"embeds images with width {width}; load it onto the model it was fitted on."
            )
        if self.fingerprint is None:
            return
        problem = self.fingerprint.mismatch(backbone.fingerprint)
        if problem is not None:
            raise FingerprintMismatchError(
                f"{source} was fitted on embeddings of a different base model: {problem}. Recorded: "
                f"{self.fingerprint.summary()}; given model: {backbone.fingerprint.summary()}."
            )


class FittedAttributes:
    """The learned attributes (``name_``) of an estimator holding a :class:`FittedState`, read from it.

    The estimator provides ``_fitted()`` (the state, or NotFittedError — an AttributeError, so
    ``hasattr`` is False before fit) and ``backbone``.
    """

    @property
    def n_features_in_(self) -> int:
        """Width of the features predict_features takes: d_in (+ d_out for towers with a residual)."""
        self._fitted()
        return self.backbone.projector.feature_width

    fitted_ = Learned(lambda s: s, "The fitted state (:class:`FittedState`).")
    classes_ = Learned(lambda s: class_array(s.classes), "Labels, in the column order of predict_proba.")
    class_names_ = Learned(lambda s: list(s.class_names), "The text put into the templates for each class.")
    classifier_ = Learned(lambda s: s.classifier, "The classifier T, float32 [K, d_out].")
    delta_ = Learned(lambda s: s.delta, "W − W0, float32, in the model parameter's own orientation, or None.")
    text_delta_ = Learned(lambda s: s.text_delta, "W_t − W_t0 of the text projection, or None.")
    n_shots_ = Learned(lambda s: s.n_shots, "N, training images per class.")
    reg_lambda_ = Learned(lambda s: s.reg_lambda, "The λ training used.")
    logit_scale_ = Learned(lambda s: s.logit_scale, "The logit scale s training used.")
    loss_history_ = Learned(lambda s: s.loss_history, "Training loss per step (empty after load).")
    base_fingerprint_ = Learned(lambda s: s.fingerprint or s.legacy_hash, "The base model's fingerprint.")
