"""ProLIP + Tip-Adapter: Tip-Adapter's cache model on top of a fitted projector, its maths and its estimator.

Scores are ``s · f·Tᵀ + α · exp(−β (1 − f·Kᵀ)) · L`` for an L2-normalised image embedding f, the classifier T,
cache keys K (one per training image: its embedding averaged over ``key_views`` augmented views, normalised)
and values L, the one-hot labels of the keys (Zhang et al., ECCV 2022). α and β are chosen on a validation set
over one fixed grid (:data:`BETAS` × :data:`ALPHAS`), never on test data; with trained keys (Tip-Adapter-F)
the keys are then fine-tuned with cross-entropy on these scores and α, β searched again (:func:`fit_cache`).

:class:`ProLIPTipAdapter` runs it on the embeddings of a fitted ProLIP projector W0 + delta, from the features
the fit already extracted (no second pass through the trunk); the cache lives beside the projector delta in
one safetensors file of kind ``tip_adapter`` (:mod:`prolip.files.delta`). ``prolip bench``'s ``tip-adapter``
and ``tip-adapter-f`` baselines run :func:`fit_cache` on the frozen projector, and ``prolip+tip-adapter`` on
ProLIP's trained one: one cache model.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prolip.adapter import ProLIPAdapter
from prolip.errors import InputError, NotFittedError
from prolip.estimator import Estimator
from prolip.features.cache import CachedFeatures, check_features
from prolip.features.dataset_objects import labelled
from prolip.features.images import ImageLike, kept
from prolip.files.hub import HubMixin
from prolip.model.head import LinearHead
from prolip.params import COUNT, NON_NEGATIVE, NONE, Constraint, numbers, one_of
from prolip.training.engine import ADAM_EPS, build_optimizer, cosine_lr
from prolip.training.fit import fit_projector
from prolip.training.fitted import FittedState, TipCache
from prolip.training.labels import accuracy, check_lengths, label_indices, label_list
from prolip.variants.search import adapter_from_state

BETAS = torch.logspace(-1, math.log10(50), 40, dtype=torch.float64).tolist()
"""β grid: 40 log-spaced values from 0.1 to 50 (covering the original's per-dataset ranges)."""
ALPHAS = torch.logspace(-1, math.log10(50), 25, dtype=torch.float64).tolist()
"""α grid: 25 log-spaced values from 0.1 to 50."""
AUGMENT_VIEWS = 10
"""Augmented views averaged into each cache key (the original's ``augment_epoch``)."""
KEY_EPOCHS, KEY_LR, KEY_BATCH_SIZE = 20, 1e-3, 256
"""Tip-Adapter-F's key training: epochs (one augmented view of every image each), AdamW's lr, minibatch size."""
_SEARCH_BLOCK = 1024  # validation images scored at once in the search
_CHUNK = 4096  # test images scored at once: the affinity matrix is [chunk, cache size]
KEYS = ("cache", "trained")
"""The cache's keys: Tip-Adapter's (training-free) or Tip-Adapter-F's (fine-tuned)."""


def cache_scores(affinity: torch.Tensor, labels: torch.Tensor, classes: int, beta: float) -> torch.Tensor:
    """The cache term ``exp(−β (1 − A)) · L`` ``[n, K]`` from the affinities ``A = f·Kᵀ`` ``[n, cache]``.

    L is the one-hot matrix of the cache's ``labels``; adding each column into its class costs
    n·cache operations where the product with L would cost n·cache·K.
    """
    weights = torch.exp(-beta * (1 - affinity))
    return weights.new_zeros(affinity.shape[0], classes).index_add(1, labels, weights)


def _tip_logits(
    features: torch.Tensor,
    classifier: torch.Tensor,
    keys: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    logit_scale: float,
) -> torch.Tensor:
    """Tip-Adapter's scores ``s · f·Tᵀ + α · cache`` ``[n, K]`` of normalised embeddings ``[n, d]``.

    ``keys`` ``[cache, d]`` and their ``labels`` ``[cache]`` make the cache; T is ``[K, d]``.
    """
    cache = cache_scores(features @ keys.t(), labels, classifier.shape[0], beta)
    return logit_scale * features @ classifier.t() + alpha * cache


def cache_keys(head: LinearHead, features: Any, views: int = AUGMENT_VIEWS) -> torch.Tensor:
    """Keys ``[n, d_out]``: each image's unnormalised embedding ``x W + b + r`` averaged over the first ``views``
    augmented views of ``features`` ``[V, n, width]`` (cycling when there are fewer), L2-normalised."""
    n_views = features.shape[0]
    with torch.no_grad():
        total = sum(head.project(features[v % n_views].float()) for v in range(views))
    return F.normalize(total, dim=-1)


def cache_logits(
    embeddings: torch.Tensor, classifier: torch.Tensor, cache: TipCache, logit_scale: float
) -> torch.Tensor:
    """The cache model's scores ``s · f·Tᵀ + α · exp(−β (1 − f·Kᵀ)) · L`` ``[n, K]`` of normalised ``embeddings``.

    A chunk of images at a time bounds the ``[images, cache size]`` affinity matrix.
    """
    keys, labels = cache.keys.to(embeddings), cache.labels.to(embeddings.device)
    k = classifier.shape[0]
    with torch.no_grad():
        return torch.cat([
            logit_scale * f @ classifier.t() + cache.alpha * cache_scores(f @ keys.t(), labels, k, cache.beta)
            for f in embeddings.split(_CHUNK)
        ])  # fmt: skip


def search_alpha_beta(
    features: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.Tensor,
    keys: torch.Tensor,
    key_labels: torch.Tensor,
    logit_scale: float,
    betas: Sequence[float] = BETAS,
    alphas: Sequence[float] = ALPHAS,
) -> tuple[float, float, float]:
    """``(alpha, beta, accuracy)`` with the best accuracy on ``features`` (the validation draw).

    Ties go to the first in the order the original searches: β ascending, then α ascending.
    """
    alpha_grid = torch.tensor(alphas, dtype=features.dtype)[:, None, None]
    correct = torch.zeros(len(betas), len(alphas))
    with torch.no_grad():
        # A block of images at a time bounds the memory of the [α, images, K] scores.
        for rows in torch.arange(len(labels)).split(_SEARCH_BLOCK):
            f, y = features[rows], labels[rows]
            zero_shot, affinity = logit_scale * f @ classifier.t(), f @ keys.t()
            for i, beta in enumerate(betas):
                scores = zero_shot + alpha_grid * cache_scores(affinity, key_labels, classifier.shape[0], beta)
                correct[i] += (scores.argmax(dim=-1) == y).sum(dim=-1)
    best = int(correct.argmax())  # the first maximum in row-major, i.e. the original's, order
    b, a = divmod(best, len(alphas))
    return alphas[a], betas[b], float(correct.flatten()[best]) / len(labels)


def train_keys(
    keys: torch.Tensor,
    views: Callable[[int], torch.Tensor],
    labels: torch.Tensor,
    classifier: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    logit_scale: float,
    generator: torch.Generator,
    epochs: int = KEY_EPOCHS,
    lr: float = KEY_LR,
    batch_size: int = KEY_BATCH_SIZE,
) -> torch.Tensor:
    """Tip-Adapter-F: the cache keys fine-tuned with cross-entropy on the cache model's scores; returns them.

    Epoch e scores ``views(e)`` (normalised embeddings ``[n, d]`` of one augmented view of every
    training image, in ``labels`` order) in minibatches of a fresh random order drawn from
    ``generator``; AdamW (``lr``, eps 1e-4) with a cosine schedule over all iterations, as the
    original. ``keys`` itself is not modified.
    """
    keys = keys.detach().clone().requires_grad_(True)
    optimizer = build_optimizer("adamw", [keys], lr=lr, eps=ADAM_EPS)
    n = labels.numel()
    steps, step = epochs * math.ceil(n / batch_size), 0
    for epoch in range(epochs):
        with torch.no_grad():
            x = views(epoch)
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, step, steps)
            scores = _tip_logits(x[batch], classifier, keys, labels, alpha, beta, logit_scale)
            loss = F.cross_entropy(scores, labels[batch.to(labels.device)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return keys.detach()


def fit_cache(
    head: LinearHead,
    features: Any,
    labels: torch.Tensor,
    classifier: torch.Tensor,
    logit_scale: float,
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    trained: bool = False,
    key_views: int = AUGMENT_VIEWS,
    generator: torch.Generator | None = None,
    alphas: Sequence[float] = ALPHAS,
    betas: Sequence[float] = BETAS,
    epochs: int = KEY_EPOCHS,
    lr: float = KEY_LR,
    batch_size: int = KEY_BATCH_SIZE,
) -> TipCache:
    """Tip-Adapter's cache model on the projector ``head``: keys, then α and β, then (``trained``) Tip-Adapter-F.

    Args:
        head: the projector the embeddings come from (W0 for Tip-Adapter, ProLIP's W for ProLIP + Tip-Adapter).
        features: the training images' stored features ``[V, n, width]``.
        labels: their class indices ``[n]``.
        classifier: T.
        logit_scale: s.
        val: the validation images' normalised embeddings ``[m, d_out]`` and class indices, to search α and β on;
            None with ``alpha`` and ``beta`` given.
        alpha: fix α (with ``beta``) instead of searching it.
        beta: fix β (with ``alpha``) instead of searching it.
        trained: fine-tune the keys (Tip-Adapter-F): ``epochs`` epochs, epoch e on view ``key_views + e``,
            minibatch order from ``generator``; α and β are searched again after.
        key_views: augmented views averaged into each key.
        generator: the random generator of the key training's minibatch order.
        alphas: the α grid of the search.
        betas: the β grid of the search.
        epochs: the key training's epochs.
        lr: the key training's learning rate.
        batch_size: the key training's minibatch size.
    """
    keys = cache_keys(head, features, key_views)

    def choose(keys: torch.Tensor) -> tuple[float, float, dict[str, Any] | None]:
        """α, β: the given ones, or the first best on the validation set with these keys."""
        if alpha is not None:
            return float(alpha), float(beta), None
        found_alpha, found_beta, score = search_alpha_beta(
            val[0], val[1], classifier, keys, labels, logit_scale, betas=betas, alphas=alphas
        )
        return found_alpha, found_beta, {"val_accuracy": score, "alphas": list(alphas), "betas": list(betas)}

    chosen_alpha, chosen_beta, selection = choose(keys)
    if trained:
        n_views = features.shape[0]
        keys = train_keys(
            keys, lambda e: head.embed(features[(key_views + e) % n_views].float()), labels, classifier,
            alpha=chosen_alpha, beta=chosen_beta, logit_scale=logit_scale,
            generator=torch.Generator().manual_seed(0) if generator is None else generator,
            epochs=epochs, lr=lr, batch_size=batch_size,
        )  # fmt: skip
        chosen_alpha, chosen_beta, selection = choose(keys)
    return TipCache(keys, labels, chosen_alpha, chosen_beta, key_views, trained, selection)


class ProLIPTipAdapter(HubMixin, Estimator):
    """ProLIP + Tip-Adapter: a fitted projector and a cache model of the few-shot images on top.

    Args:
        adapter: the (unfitted) :class:`~prolip.ProLIPAdapter` whose parameters the ProLIP fit
            uses (model, views, epochs, ...); it is not modified.
        alpha: fix the cache's weight α (with ``beta``); None (both) searches α and β on the validation set
            given to ``fit`` over ``alphas`` × ``betas``, first best in β-major order.
        beta: fix the affinities' sharpness β (with ``alpha``); None (both): searched.
        keys: "cache" (Tip-Adapter: training-free) or "trained" (Tip-Adapter-F: the keys are
            fine-tuned for 20 epochs, epoch e on view ``key_views + e`` of the training features,
            minibatch order seeded by the adapter's ``random_state``).
        key_views: augmented views averaged into each cache key (Tip-Adapter's 10; the views of
            the training features are reused, cycling when there are fewer).
        alphas: the α grid of the search (default: 25 log-spaced values in [0.1, 50]).
        betas: the β grid of the search (default: 40 log-spaced values in [0.1, 50]).

    Attributes (after fit or load):
        adapter_: the fitted ProLIPAdapter (W0 + delta and T).
        cache_: the :class:`~prolip.variants.tip_cache.TipCache` (keys, labels, α, β, the search's result).
        classes_: labels, in the column order of ``predict_proba``.
        alpha_, beta_: the α and β in use.
        val_accuracy_: the validation accuracy of the chosen α, β (None when they were given).
    """

    _parameter_constraints: ClassVar[dict[str, Constraint]] = {
        "adapter": Constraint("a ProLIPAdapter", lambda v: isinstance(v, ProLIPAdapter)),
        "alpha": NONE | NON_NEGATIVE, "beta": NONE | NON_NEGATIVE, "keys": one_of(KEYS), "key_views": COUNT,
        "alphas": numbers(0, False, "[0.1, 1, 10]"), "betas": numbers(0, False, "[0.1, 1, 10]"),
    }  # fmt: skip
    kind: ClassVar[str] = "tip_adapter"

    def __init__(
        self,
        adapter: ProLIPAdapter,
        *,
        alpha: float | None = None,
        beta: float | None = None,
        keys: str = "cache",
        key_views: int = AUGMENT_VIEWS,
        alphas: Sequence[float] = ALPHAS,
        betas: Sequence[float] = BETAS,
    ) -> None:
        self.adapter = adapter
        self.alpha = alpha
        self.beta = beta
        self.keys = keys
        self.key_views = key_views
        self.alphas = alphas
        self.betas = betas

    # ------------------------------------------------------------------ learned attributes
    def _fitted(self) -> tuple[ProLIPAdapter, TipCache]:
        fitted = self.__dict__.get("_fit")
        if fitted is None:
            raise NotFittedError(
                "This ProLIPTipAdapter is not fitted yet; call fit(images, labels, val_images, val_labels), "
                "fit_features(...) or ProLIPTipAdapter.load(path) first."
            )
        return fitted

    @property
    def adapter_(self) -> ProLIPAdapter:
        """The fitted ProLIPAdapter."""
        return self._fitted()[0]

    @property
    def cache_(self) -> TipCache:
        """The cache model: keys, their labels, α and β."""
        return self._fitted()[1]

    @property
    def classes_(self) -> np.ndarray:
        """Labels, in the column order of ``predict_proba``."""
        return self.adapter_.classes_

    @property
    def alpha_(self) -> float:
        """The cache's weight α in use."""
        return self.cache_.alpha

    @property
    def beta_(self) -> float:
        """The affinities' sharpness β in use."""
        return self.cache_.beta

    @property
    def val_accuracy_(self) -> float | None:
        """Validation accuracy of the chosen α, β; None when they were given."""
        selection = self.cache_.selection
        return None if selection is None else float(selection["val_accuracy"])

    # ------------------------------------------------------------------ fitting
    def _check(self, has_val: bool) -> None:
        """The parameters, each against its constraint, and together: α and β both or neither, a validation set."""
        self.check_params()
        self.adapter.check_params()
        if (self.alpha is None) != (self.beta is None):
            raise InputError(
                f"give both alpha and beta, or neither (to search them); got alpha={self.alpha!r}, beta={self.beta!r}."
            )
        if self.alpha is None and not has_val:
            raise InputError(
                "ProLIPTipAdapter chooses alpha and beta on a validation set: pass val_images and val_labels "
                "(or val_features and val_labels), or fix alpha= and beta=."
            )

    def fit(
        self,
        images: Sequence[ImageLike],
        labels: Sequence[Hashable] | None = None,
        val_images: Sequence[ImageLike] | None = None,
        val_labels: Sequence[Hashable] | None = None,
        class_names: Mapping[Hashable, str] | Sequence[str] | None = None,
    ) -> ProLIPTipAdapter:
        """Extract the training views (and the validation images' plain views) once, then :meth:`fit_features`.

        ``images`` and ``val_images`` may be dataset objects, whose labels are used when ``labels`` /
        ``val_labels`` is None (see :func:`prolip.features.dataset_objects.labelled`).
        """
        self._check(val_images is not None)
        on_error = self.adapter.on_error
        images, labels, class_names, _ = labelled(images, labels, class_names, on_error, self.adapter.verbose)
        if val_images is not None:
            val_images, val_labels, *_ = labelled(val_images, val_labels, on_error=on_error)
        check_lengths(images, labels)
        train = self.adapter.extract(images)
        labels = kept(label_list(labels), train.skipped)
        val_features = None
        if val_images is not None:
            check_lengths(val_images, val_labels)
            val = self.adapter.extract(val_images, views=0)
            val_features, val_labels = val.features, kept(label_list(val_labels), val.skipped)
        return self.fit_features(train.features, labels, val_features, val_labels, class_names)

    def fit_features(
        self,
        features: torch.Tensor | CachedFeatures,
        labels: Sequence[Hashable],
        val_features: torch.Tensor | None = None,
        val_labels: Sequence[Hashable] | None = None,
        class_names: Mapping[Hashable, str] | Sequence[str] | None = None,
    ) -> ProLIPTipAdapter:
        """Fit on features from ``adapter.extract_features`` (training views; validation ``views=0``); returns self."""
        self._check(val_features is not None)
        self.__dict__.pop("_fit", None)  # a failed fit leaves the estimator unfitted
        adapter = self.adapter
        state = fit_projector(adapter.backbone, features, labels, class_names, adapter.fit_settings())
        fitted = adapter_from_state(adapter, state)
        head = _adapted_head(fitted)
        val = None
        if self.alpha is None:
            val = _validation(val_features, val_labels, state, fitted.backbone.projector.feature_width, head)
        seed = secrets.randbits(63) if adapter.random_state is None else int(adapter.random_state)
        cache = fit_cache(
            head, features, label_indices(labels, state.classes), state.classifier, state.logit_scale, val=val,
            alpha=self.alpha, beta=self.beta, trained=self.keys == "trained", key_views=self.key_views,
            generator=torch.Generator().manual_seed(seed), alphas=self.alphas, betas=self.betas,
        )  # fmt: skip
        self._fit = (fitted, cache)
        return self

    # ------------------------------------------------------------------ inference
    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``[n, K]`` (CPU, fp32) of plain-view features ``[n, d_in]`` or ``[1, n, d_in]``.

        ProLIP's logits plus the cache's term (with α = 0, ProLIP's alone).
        """
        adapter, cache = self._fitted()
        x = check_features(features, adapter.backbone.projector.feature_width)
        if x.shape[0] != 1:
            raise InputError(f"features hold {x.shape[0]} views; pass test-time features [1, n, d] (views=0).")
        embeddings = _adapted_head(adapter).embed(x[0].float())
        with torch.inference_mode():
            return cache_logits(embeddings, adapter.classifier_, cache, adapter.logit_scale_)

    def predict_features(self, features: torch.Tensor) -> np.ndarray:
        """Predicted labels from plain-view features (``adapter_.extract_features(images, views=0)``)."""
        return self.classes_[self.logits_from_features(features).argmax(dim=1).numpy()]

    def predict_proba(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Class probabilities ``(n, K)``; columns follow ``classes_``."""
        features = self.adapter_.extract(images, views=0).features
        return torch.softmax(self.logits_from_features(features), dim=-1).numpy()

    def predict(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Predicted label of each image, values from ``classes_``."""
        return self.predict_features(self.adapter_.extract(images, views=0).features)

    def score(self, images: Sequence[ImageLike], labels: Sequence[Hashable] | None = None) -> float:
        """Accuracy of :meth:`predict` on ``images`` against ``labels`` (readable images only; a dataset's own)."""
        images, labels, *_ = labelled(images, labels, on_error=self.adapter_.on_error)
        check_lengths(images, labels)
        extracted = self.adapter_.extract(images, views=0)
        return accuracy(self.predict_features(extracted.features), kept(label_list(labels), extracted.skipped))

    # ------------------------------------------------------------------ files (save, load, save_pretrained,
    # from_pretrained and push_to_hub come from HubMixin)
    def _fitted_state(self) -> FittedState:
        adapter, cache = self._fitted()
        return dataclasses.replace(adapter.fitted_, cache=cache)

    @classmethod
    def _from_state(
        cls,
        state: FittedState,
        source: str,
        model: str | nn.Module | None = None,
        pretrained: str | None = None,
        **kwargs: Any,
    ) -> ProLIPTipAdapter:
        """Loading options, for :meth:`load` and :meth:`from_pretrained`: as :meth:`prolip.ProLIPAdapter.load`
        (``model``, ``pretrained``, ``strict``, ``trust_file_model``; overrides are ProLIPAdapter parameters)."""
        cache = state.cache
        adapter = ProLIPAdapter.from_state(
            dataclasses.replace(state, cache=None), model, pretrained, source=source, **kwargs
        )
        searched = cache.selection is not None
        grid = {"alphas": cache.selection["alphas"], "betas": cache.selection["betas"]} if searched else {}
        fixed = {} if searched else {"alpha": cache.alpha, "beta": cache.beta}
        keys = "trained" if cache.trained_keys else "cache"
        loaded = cls(adapter, keys=keys, key_views=cache.key_views, **fixed, **grid)
        loaded._fit = (adapter, cache)  # its own class: the one place besides fit_features that sets it
        return loaded


def _validation(
    features: torch.Tensor | None,
    labels: Sequence[Hashable] | None,
    state: FittedState,
    width: int,
    head: LinearHead,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation images' adapted embeddings ``[n, d_out]`` and class indices ``[n]``."""
    val = check_features(features, width, "val_features")
    val_y = label_indices(labels, state.classes, "val_labels")
    if val.shape[0] != 1 or val.shape[1] != len(val_y):
        raise InputError(
            f"val_features are {tuple(val.shape)}; pass the plain view of each validation image "
            f"([1, {len(val_y)}, d], extract_features(val_images, views=0)) with one label each."
        )
    with torch.no_grad():
        return head.embed(val[0].float()), val_y


def _adapted_head(adapter: ProLIPAdapter) -> LinearHead:
    """The fitted projector W0 + delta and its frozen bias, fp32 on the CPU."""
    projector = adapter.backbone.projector
    bias = projector.bias
    return LinearHead(
        adapter.fitted_.adapted_weight(projector).cpu(), None if bias is None else bias.detach().float().cpu()
    )
