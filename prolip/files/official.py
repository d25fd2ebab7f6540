"""The authors' checkpoints: one file of the official ProLIP code as a prolip fitted state.

The official code (github.com/astra-vision/ProLIP, ``methods/ProLIP.py``) saves ``torch.save(proj.state_dict())``
at ``trained_models/<config>/<dataset>/<N>_shot/<dataset>_seed<k>.pth``, where ``<config>`` is the stem of the
experiment's YAML file. ``proj`` holds the trained projector, built from OpenAI CLIP's own, usually in fp16:

* RN50 / RN101: an ``nn.Linear`` copied from ``visual.attnpool.c_proj``, keys ``linear.weight`` ``[d_out, d_in]``
  (trained) and ``linear.bias`` ``[d_out]`` (frozen: ``requires_grad=False``, so the pretrained bias);
* ViT-B/16, ViT-B/32: a Parameter copied from ``visual.proj``, key ``vit_proj`` ``[d_in, d_out]``.

It predicts ``100 · normalize(x W (+ b)) · Tᵀ`` with T the zero-shot classifier of the dataset's templates.
:func:`import_official` reads such a file (``torch.load(weights_only=True)`` only, every key and shape checked
against the given model's projector), and records W − W0 with T and s = 100 as a :class:`FittedState` through
the same :func:`~prolip.training.fit.fitted_state` a fit uses; ``write_delta`` then saves it.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prolip.errors import DeltaFileError, InputError, UnsupportedModelError
from prolip.model.backbone import Backbone
from prolip.model.towers import Projector
from prolip.model.zeroshot import check_templates
from prolip.params import MAX_ABS_ENTRY
from prolip.training.engine import TrainConfig, TrainResult
from prolip.training.fit import FitTask, fitted_state
from prolip.training.fitted import FittedState

logger = logging.getLogger(__name__)

OFFICIAL_LOGIT_SCALE = 100.0
"""The logit scale the official code uses in training and at test time (written as ``100.``)."""
OFFICIAL_KEYS = {"modified_resnet": ("linear.weight", "linear.bias"), "vit": ("vit_proj",)}
"""The state-dict keys of an official checkpoint, per prolip tower family (the official code knows these two)."""
_OVERHEAD_BYTES = 1 << 20  # a torch zip file's headers and pickle around the tensors: a few KB in practice
_LAMBDAS = {"1_N": "auto", "1_N2": "1/N^2"}  # the official configs' λ = 1/N and 1/N² (lambda_funct_1_N, _1_N2)


@dataclass(frozen=True)
class OfficialRun:
    """What an official checkpoint's path says about its run (None where the path does not say).

    Attributes:
        config: the experiment's configuration name (the stem of its YAML file), e.g.
            ``few_shot_no_val_lr1e-5_lambda_1_N``.
        dataset: the dataset name, e.g. ``dtd``.
        n_shots: N, from the ``<N>_shot`` folder.
        seed: the few-shot draw, from ``<dataset>_seed<k>.pth``.
        lr: the learning rate the configuration's name states (``lr1e-5``).
        reg_lambda: the λ the configuration's name states: ``"auto"`` for ``lambda_1_N``, ``"1/N^2"`` for
            ``lambda_1_N2``, else the number (``lambda_1e-1``).
    """

    config: str | None = None
    dataset: str | None = None
    n_shots: int | None = None
    seed: int | None = None
    lr: float | None = None
    reg_lambda: float | str | None = None

    def recorded(self) -> dict[str, Any]:
        """The fields the path gave, as JSON values."""
        return {k: v for k, v in vars(self).items() if v is not None}


def parse_official_path(path: str | os.PathLike) -> OfficialRun:
    """The run an official checkpoint's path names: ``.../<config>/<dataset>/<N>_shot/<dataset>_seed<k>.pth``.

    Each part is read where it is there: a file moved out of that layout keeps what its name says (the dataset
    and seed of ``dtd_seed1.pth``). The learning rate and λ are read from the configuration's name, as the
    official experiment files are named (``few_shot_no_val_lr1e-5_lambda_1_N``); a name that does not state them
    (``few_shot_few_val``, whose lr and λ were searched) leaves them None.
    """
    p = Path(os.fspath(path))
    name = re.fullmatch(r"(?P<dataset>.+)_seed(?P<seed>\d+)\.pth", p.name)
    shots = re.fullmatch(r"(?P<n>\d+)_shot", p.parent.name)
    dataset = name["dataset"] if name else None
    # The configuration is the folder above the dataset's only when the layout is the official one.
    in_layout = shots is not None and dataset is not None and p.parent.parent.name == dataset
    config = p.parent.parent.parent.name if in_layout and p.parent.parent.parent.name else None
    lr = reg_lambda = None
    if config:
        found_lr = re.search(r"(?:^|_)lr(\d+(?:\.\d+)?(?:e-?\d+)?)(?:_|$)", config)
        found_lambda = re.search(r"(?:^|_)lambda_(1_N2|1_N|\d+(?:\.\d+)?(?:e-?\d+)?)(?:_|$)", config)
        lr = (float(found_lr[1]) or None) if found_lr else None  # lr0 is no learning rate: not recorded
        if found_lambda:
            reg_lambda = _LAMBDAS.get(found_lambda[1]) or float(found_lambda[1])
    return OfficialRun(
        config=config,
        dataset=dataset,
        n_shots=int(shots["n"]) if shots else None,
        seed=int(name["seed"]) if name else None,
        lr=lr,
        reg_lambda=reg_lambda,
    )


def read_official(path: str | os.PathLike, projector: Projector) -> torch.Tensor:
    """The trained projector W of an official checkpoint for ``projector``'s model: float32 CPU, in the model
    parameter's own orientation (``[d_out, d_in]`` for RN50's ``c_proj.weight``, ``[d_in, d_out]`` for ViT's
    ``visual.proj``), converted from the file's dtype (fp16 as the official code saves it).

    Only ``torch.load(path, map_location="cpu", weights_only=True)`` reads the file. It must hold a plain mapping
    of exactly :data:`OFFICIAL_KEYS` for the projector's family, each a finite floating-point tensor of the
    model's shape; an RN file's bias must be the model's own (the official code freezes it), within the rounding
    of the file's and the model's dtypes.

    Raises:
        UnsupportedModelError: the model's tower is not one the official code trains (OpenAI's ModifiedResNet or
            VisionTransformer).
        DeltaFileError: naming the file: unreadable, not a weights-only torch file, not a state dict, other keys,
            shapes or dtypes, NaN or Inf, or another bias than the model's.
    """
    source = os.fspath(path)
    expected = _expected_shapes(projector)
    # A bound before reading: the official projector's tensors at 8 bytes per entry, and the zip's headers.
    limit = 8 * sum(math.prod(shape) for _, shape in expected.values()) + _OVERHEAD_BYTES
    try:
        size = os.path.getsize(source)
    except OSError as exc:
        raise DeltaFileError(f"cannot read official checkpoint {source!r}: {exc.strerror or exc}.") from None
    if size > limit:
        raise DeltaFileError(
            f"{source} is {size} bytes, far more than an official checkpoint of this model's projector "
            f"(at most {limit}); it is not one, or not for this model."
        )
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except torch.serialization.pickle.UnpicklingError:  # weights_only refused an object: nothing was unpickled
        raise DeltaFileError(
            f"{source} is not a weights-only torch file (it pickles objects other than tensors, such as a whole "
            "nn.Module), and prolip never unpickles those; re-save it with torch.save(proj.state_dict(), path)."
        ) from None
    except Exception as exc:  # torch.load raises KeyError, EOFError, RuntimeError ... on files of other formats
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no detail"
        raise DeltaFileError(
            f"{source} is not a torch checkpoint (torch.load failed: {type(exc).__name__}: {reason}); give a .pth "
            "file that the official code saved."
        ) from None
    return _checked_weight(source, loaded, expected, projector)


def import_official(
    path: str | os.PathLike,
    backbone: Backbone,
    class_names: Sequence[str],
    templates: Sequence[str] | None = None,
    *,
    classes: Sequence[Hashable] | None = None,
    n_shots: float | None = None,
    reg_lambda: float | str | None = None,
) -> FittedState:
    """An official ProLIP checkpoint on ``backbone`` as the fitted state of a ProLIP fit (kind ``projector``).

    The state's delta is W − W0 (:func:`read_official`'s W, the model's W0), its classifier T the backbone's
    zero-shot classifier of ``class_names`` under ``templates``, its logit scale the official 100: an adapter
    made from it (``ProLIPAdapter.from_state(state, model, pretrained)``) predicts softmax(100 · normalize(x W + b)
    · Tᵀ), the official formula. Save it with :func:`prolip.files.delta.write_delta` (what ``save`` does).

    Args:
        path: the official ``.pth`` file.
        backbone: the base model the checkpoint was trained on (e.g. open_clip ``RN50`` with ``openai``), built by
            :func:`prolip.model.backbone.build_backbone`.
        class_names: the text put into the templates for each class, in the order of the official label indices
            (the dataset's class order). The official code replaces ``_`` by a space in each name first: pass the
            names as they appear in the prompts.
        templates: the prompt templates T is built with (the dataset's own in the official code); None:
            ``["a photo of a {}."]``.
        classes: the label of each class (same order); None: the class names.
        n_shots: N; None reads it from the path's ``<N>_shot`` folder.
        reg_lambda: the λ the checkpoint was trained with ("auto" = 1/N, "1/N^2" or a number), recorded only;
            None reads it from the configuration's name (:func:`parse_official_path`), else assumes 1/N, the
            official default.

    Raises:
        DeltaFileError: the file is refused (see :func:`read_official`), or W is so far from this model's W0
            (beyond ±1e4 per entry) that it was trained on another base model.
        UnsupportedModelError: the model is not of a family the official code trains.
        InputError: no N is given or in the path, or malformed class names, labels, templates or λ.
    """
    source = os.fspath(path)
    run = parse_official_path(source)
    names, labels = _classes(class_names, classes)
    templates = check_templates(templates)
    if n_shots is None:
        if run.n_shots is None:
            raise InputError(
                f"{source} is not in the official layout trained_models/<config>/<dataset>/<N>_shot/"
                "<dataset>_seed<k>.pth, so it does not say N: pass n_shots (the shots per class it was trained on)."
            )
        n_shots = run.n_shots
    if not (isinstance(n_shots, (int, float)) and not isinstance(n_shots, bool) and 0 < n_shots < math.inf):
        raise InputError(f"n_shots={n_shots!r} must be a positive number (training images per class).")
    lambda_from = "given" if reg_lambda is not None else "config name" if run.reg_lambda is not None else "assumed"
    rule = reg_lambda if reg_lambda is not None else run.reg_lambda if run.reg_lambda is not None else "auto"
    config = TrainConfig(reg_lambda=rule, logit_scale=OFFICIAL_LOGIT_SCALE).resolved(n_shots, OFFICIAL_LOGIT_SCALE)

    projector = backbone.projector
    weight = read_official(source, projector)
    # No features: the official run already trained W; the task only carries what the state records.
    task = FitTask(
        features=torch.empty(0, 0, projector.feature_width),
        classes=labels,
        labels=torch.empty(0, dtype=torch.long),
        class_names=names,
        templates=templates,
        n_shots=float(n_shots),
        config=config,
    )
    result = TrainResult(weight=projector.to_in_out(weight).contiguous(), losses=torch.empty(0))
    hyperparameters: dict[str, Any] = {
        "source": "official",
        "official": {"file": Path(source).name, **run.recorded(), "reg_lambda_from": lambda_from},
        "templates": list(templates),
        "logit_scale": OFFICIAL_LOGIT_SCALE,
        "reg_lambda": rule,
    }
    if run.lr is not None:
        hyperparameters["lr"] = run.lr
    classifier = backbone.classifier(names, templates)
    state = fitted_state(backbone, task, result, classifier, hyperparameters)
    largest = float(state.delta.abs().max())
    if largest > MAX_ABS_ENTRY:
        raise DeltaFileError(
            f"{source} holds a projector that differs from the model's W0 by up to {largest:.3g} per entry (beyond "
            f"±{MAX_ABS_ENTRY:g}): it was trained on another base model; pass the model and pretrained weights "
            "it was trained on."
        )
    logger.info("imported official checkpoint %s: %d classes, N=%g, |W - W0| max %.3g", source, len(names),
                n_shots, largest)  # fmt: skip
    return state


# ---------------------------------------------------------------------------- checks
_VARIANT_KEYS = {
    "linear2.weight": "the official regularised linear adapter's (RLA)",
    "linear1.weight": "the official ProLIP + TaskRes's",
    "R": "the official ProLIP + TaskRes's",
    "text_projection": "the official ProLIP-text's",
}  # keys of the official code's other files under trained_models/, which are not an image projector alone


def _expected_shapes(projector: Projector) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The official checkpoint's keys, each with the model parameter it stands for and that parameter's shape."""
    keys = OFFICIAL_KEYS.get(projector.family)
    if keys is None:
        raise UnsupportedModelError(
            f"the official ProLIP code trains OpenAI CLIP's ResNets (RN50, RN101) and ViTs (ViT-B/16, ViT-B/32) "
            f"only; this model's projector {projector.key} is of family {projector.family!r}. Pass the open_clip "
            "model the checkpoint was trained on, e.g. --model RN50 --pretrained openai."
        )
    shapes = {keys[0]: (projector.key, tuple(projector.parameter.shape))}
    if len(keys) == 2:  # the layer's bias, beside its weight
        shapes[keys[1]] = (projector.key.rsplit(".", 1)[0] + ".bias", (projector.out_features,))
    return shapes


def _checked_weight(
    source: str, loaded: Any, expected: Mapping[str, tuple[str, tuple[int, ...]]], projector: Projector
) -> torch.Tensor:
    """W, float32, after checking ``loaded`` (what torch.load returned) against the expected keys and shapes."""
    described = ", ".join(f"{k} {list(shape)}" for k, (_, shape) in expected.items())
    if not isinstance(loaded, Mapping):
        raise DeltaFileError(
            f"{source} holds a {type(loaded).__name__}, not a state dict; expected {described} "
            f"(torch.save(proj.state_dict()) of the official code)."
        )
    keys = list(loaded)
    if not all(isinstance(k, str) for k in keys) or set(keys) != set(expected):
        raise DeltaFileError(
            f"{source} holds keys {sorted(map(str, keys))[:10]}, expected {described}; {_keys_hint(keys, projector)}."
        )
    for key, (model_key, shape) in expected.items():
        value = loaded[key]
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided or not value.is_floating_point():
            found = (
                f"a {value.dtype} tensor"
                if isinstance(value, torch.Tensor)
                else f"a value of type {type(value).__name__}"
            )
            raise DeltaFileError(f"{source} holds {found} at {key!r}; expected a floating-point tensor {list(shape)}.")
        if tuple(value.shape) != shape:
            raise DeltaFileError(
                f"{source} holds {key} of shape {list(value.shape)}, but this model's {model_key} is {list(shape)}: "
                "the checkpoint was trained on another backbone; pass the model it was trained on."
            )
        if not torch.isfinite(value).all():
            raise DeltaFileError(f"{source} holds NaN or Inf values in {key}; it is damaged.")
    weight_key, *bias_key = expected
    if bias_key:
        _check_bias(source, loaded[bias_key[0]], projector)
    return loaded[weight_key].detach().to(torch.float32).contiguous()


def _keys_hint(keys: Sequence[Any], projector: Projector) -> str:
    """What a file of other keys is, where they say: another backbone's checkpoint, or another method's file."""
    for family, family_keys in OFFICIAL_KEYS.items():
        if family != projector.family and set(keys) == set(family_keys):
            backbone = "ResNet (e.g. --model RN50)" if family == "modified_resnet" else "ViT (e.g. --model ViT-B-16)"
            return f"it is the official checkpoint of a {backbone} backbone: pass that model"
    variant = next((_VARIANT_KEYS[k] for k in keys if k in _VARIANT_KEYS), None)
    if variant:
        return f"it is {variant} file, which holds more than an image projector"
    return "it is not a projector checkpoint of the official ProLIP code"


def _check_bias(source: str, bias: torch.Tensor, projector: Projector) -> None:
    """Refuse a file whose frozen bias is not the model's: trained on other weights, or by other code."""
    model_bias = projector.bias.detach().to("cpu", torch.float64)
    # Each side may be rounded to its own dtype (the file's fp16, the model's precision): at most half an eps
    # each, relative; a whole eps each leaves room for a bias that was rounded twice.
    eps = torch.finfo(bias.dtype).eps + torch.finfo(projector.bias.dtype).eps
    tolerance = eps * model_bias.abs() + 2**-24  # 2**-24: fp16's smallest subnormal, for entries near 0
    off = (bias.detach().to(torch.float64) - model_bias).abs()
    if bool((off > tolerance).any()):
        raise DeltaFileError(
            f"{source} holds a linear.bias that differs from this model's {projector.key.rsplit('.', 1)[0]}.bias by "
            f"up to {float(off.max()):.3g}: the official code keeps the bias frozen, so the checkpoint was trained "
            "on other weights (pass the model and pretrained weights it was trained on), and a prolip delta has no "
            "place for a trained bias."
        )


def _classes(class_names: Sequence[str], classes: Sequence[Hashable] | None) -> tuple[list[str], list[Hashable]]:
    """The class names and labels, checked: non-empty names, distinct labels, one per name, at least two."""
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence):
        raise InputError(f"class_names must be a list of strings, one per class, not {type(class_names).__name__}.")
    names = list(class_names)
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise InputError(f"class name {bad[0]!r} must be a non-empty string.")
    labels = names if classes is None else list(classes)
    if len(labels) != len(names):
        raise InputError(f"{len(labels)} classes were given for {len(names)} class names; give one label per name.")
    try:
        distinct = len(set(labels)) == len(labels)
    except TypeError:
        raise InputError("class labels must be hashable (strings or numbers).") from None
    if not distinct or len(labels) < 2:
        raise InputError(f"classes must be at least two distinct labels, one per class; got {labels[:10]!r}.")
    return names, labels
