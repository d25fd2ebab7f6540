"""A standalone classifier file: preprocessed images ``[B, 3, H, W]`` to class probabilities, as ONNX or torch.export.

The file holds the vision tower with W0 + delta merged (:meth:`prolip.training.fitted.FittedState.merged_copy`),
the classifier T and the logit scale s baked in: ``softmax(s · normalize(visual(pixels)) · Tᵀ)``. No text
tower, no prolip needed to run it, and any batch size (the input's first axis is named ``batch``).

The file describes itself: the description (:func:`description`: input, output, classes and names in column order,
the base model actually exported, and every step of the test view a client must reproduce, :func:`test_view`) is
inside it — the ONNX model's ``metadata_props`` (key ``prolip``), or the pt2 archive's extra file
``prolip.json`` — and, for readers that want plain JSON, in a copy beside it named after the file
(``m.onnx.json``) with the model file's SHA-256: a reader that finds another digest holds a mismatched pair
(a writer killed between the two files) and must not use it. :mod:`prolip.files.client` is a reference client in
numpy and PIL only.

* ``onnx``: an ONNX model (torch's dynamo-based exporter, which needs ``onnxscript``), weights inside
  the one file; run it with onnxruntime. The format to share with people you do not trust: loading it runs no code.
* ``pt2``: a ``torch.export`` ExportedProgram (``torch.export.save``). A pt2 archive is a program, and
  ``torch.export.load`` unpickles whatever entries the archive marks as pickles: load files from others only with
  :func:`load_exported_program`, which refuses such archives first (docs/security.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prolip._version import __version__
from prolip.atomic import atomic_write, check_output
from prolip.errors import InputError, UnsupportedModelError
from prolip.features.decode import ALPHA_BACKGROUND
from prolip.model.backbone import Backbone
from prolip.model.preprocessing import ViewConfig
from prolip.model.transformers_clip import image_tower
from prolip.training.fitted import FittedState

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "pt2")
DESCRIPTION_KEY = "prolip"
"""The ONNX ``metadata_props`` key of the description."""
DESCRIPTION_FILE = "prolip.json"
"""The pt2 archive's extra file holding the description."""
BICUBIC_A = -0.5  # torch's antialiased bicubic (and PIL's) uses Keys' a = -0.5
INPUT_NAME, OUTPUT_NAME = "pixels", "probabilities"
OPSET = 18  # onnxruntime runs it; the lowest opset torch's dynamo exporter writes without a conversion pass
_EXAMPLE_BATCH = 2  # not 0 or 1: torch.export specialises those sizes, and the batch must stay dynamic


class StandaloneClassifier(nn.Module):
    """``softmax(s · normalize(visual(pixels)) · Tᵀ)``: class probabilities ``[B, K]`` of pixels ``[B, 3, H, W]``.

    Args:
        visual: the vision tower (its projector already W0 + delta), fp32, in eval mode.
        classifier: T, float32 ``[K, d_out]``.
        logit_scale: s.
    """

    def __init__(self, visual: nn.Module, classifier: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("scaled_classes", (logit_scale * classifier.float()).t().contiguous())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class probabilities of preprocessed images."""
        embedding = F.normalize(self.visual(pixels), dim=-1)
        return torch.softmax(embedding @ self.scaled_classes, dim=-1)


def _standalone_classifier(state: FittedState, backbone: Backbone) -> StandaloneClassifier:
    """The fitted classifier as one fp32 CPU module on the merged vision tower (the base model is untouched)."""
    visual = image_tower(state.merged_copy(backbone.model, "fp32"))
    return StandaloneClassifier(visual.cpu().eval(), state.classifier, state.logit_scale).eval()


def export_classifier(
    state: FittedState, backbone: Backbone, path: str | os.PathLike, format: str = "onnx"
) -> tuple[Path, Path]:
    """Write ``state`` on ``backbone`` as a standalone classifier file ``path``, and its JSON beside it.

    Args:
        state: a fitted ProLIP state (``ProLIPAdapter.fitted_``).
        backbone: the base model it was checked against.
        path: the file to write (``.onnx`` or ``.pt2`` for those formats; another suffix is kept); the JSON goes
            to ``path`` + ``.json``.
        format: "onnx" or "pt2".

    Returns:
        The two paths written: the model file and the JSON.

    Raises:
        InputError: an unknown format, a suffix of the other format, a path ending in .json, or an output that is
            not a regular file or a new path (:func:`prolip.atomic.check_output`).
        UnsupportedModelError: the vision tower cannot be exported to ``format`` (the message names it).
        ImportError: ``format="onnx"`` without onnx and onnxscript (``pip install "prolip[export]"``).
    """
    if format not in FORMATS:
        raise InputError(f"export format {format!r} is not one of {list(FORMATS)}.")
    if state.cache is not None:
        raise InputError("this state holds ProLIP + Tip-Adapter's cache, which a standalone classifier would drop.")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        raise InputError(f"export path {str(path)!r} ends in .json, where its description goes; use .onnx or .pt2.")
    if suffix in (".onnx", ".pt2") and suffix != f".{format}":
        raise InputError(
            f"export path {str(path)!r} names a {suffix[1:]} file but the format is {format}; use "
            f"{str(path.with_suffix('.' + format))!r} or --format {suffix[1:]}."
        )
    sidecar = Path(f"{path}.json")
    for target in (path, sidecar):
        check_output(target, what="export path")
    module = _standalone_classifier(state, backbone)
    size = backbone.view_config.size
    example = torch.zeros(_EXAMPLE_BATCH, 3, size, size)
    tower = f"{type(module.visual).__name__} ({state.projector_family}, model {state.model_name or 'object'})"
    described = description(state, backbone, format, path.name)
    try:
        data = _onnx_bytes(module, example, described) if format == "onnx" else _pt2_bytes(module, example, described)
    except ImportError:
        raise
    except Exception as exc:  # the exporters raise many types for what they cannot trace
        raise UnsupportedModelError(
            f"the vision tower {tower} cannot be exported to {format}: {type(exc).__name__}: {str(exc)[:300]}. "
            "Use the delta with prolip itself, or try the other format."
        ) from exc
    copy = {**described, "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write(path, [data])
    atomic_write(sidecar, [json.dumps(copy, indent=2).encode()])
    logger.info("exported %s (%.1f MB) and %s", path, len(data) / 1e6, sidecar)
    return path, sidecar


def description(state: FittedState, backbone: Backbone, format: str, file: str) -> dict[str, Any]:
    """What an exported classifier holds about itself: input, output, classes, base model and test view."""
    model_name, pretrained = backbone.recorded  # the model exported, whatever the delta recorded
    return {
        "format": format,
        "file": file,
        "input": {
            "name": INPUT_NAME, "shape": ["batch", 3, backbone.view_config.size, backbone.view_config.size],
            "dtype": "float32", "layout": "NCHW",
        },
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(state.classes)], "meaning": "class probabilities"},
        "classes": [_jsonable(c) for c in state.classes],
        "class_names": list(state.class_names),
        "preprocessing": test_view(backbone.view_config, backbone.draft_size),
        "model": model_name,
        "pretrained": pretrained,
        "prolip_version": __version__,
    }  # fmt: skip


def test_view(config: ViewConfig, draft_size: int) -> dict[str, Any]:
    """Every step prolip's test view takes from an image file to the model's input, as data a client can follow.

    The steps, in order (:mod:`prolip.files.client` implements them in numpy and PIL, to 1e-5 of prolip's own):

    1. decode: JPEG files at 1/2 or 1/4 scale where the shorter side stays at least ``jpeg_draft_min_side``
       (PIL's ``draft``, never 1/8), then the EXIF orientation;
    2. to 8-bit RGB: 16-bit data scaled by 255/65535 (data that fits 8 bits kept), float data in [0, 1] by 255,
       rounded; palette images expanded; transparency composited onto ``alpha_background``;
    3. resize, as float, antialiased: each axis resampled separably with the filter ``kernel`` (``bicubic``:
       Keys' cubic with a = ``bicubic_a``, support 2; ``bilinear``: the triangle, support 1), the support widened by
       the downscale factor when shrinking (torch's ``interpolate(antialias=True)``, not PIL's 8-bit resize), the
       result clamped to [0, 255]. The sizes: ``shortest``: the shorter side to ``size``, the longer to
       floor(size · long / short); ``longest``: each side to round(side / (longer / size)); ``squash``: both to
       ``size``. An axis already of its target size is kept as is;
    4. centre crop (or pad with ``fill_color`` where smaller, the extra pixel of odd padding at the end): offsets
       round((side − size) / 2), Python's round (half to even);
    5. ``(value / 255 − mean) / std`` per channel, channels first.
    """
    return {
        "size": config.size,
        "mean": list(config.mean),
        "std": list(config.std),
        "resize_mode": config.resize_mode,
        "interpolation": config.interpolation,
        "fill_color": config.fill_color,
        "kernel": config.interpolation,
        "bicubic_a": BICUBIC_A,
        "antialias": True,
        "jpeg_draft_min_side": draft_size,
        "exif_orientation": True,
        "alpha_background": list(ALPHA_BACKGROUND),
        "value_range": [0, 255],
        "steps": " ".join(line.strip() for line in (test_view.__doc__ or "").split("\n")[2:] if line.strip()),
    }


def load_exported_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """``torch.export.load`` of a pt2 archive, after refusing archives whose loading would unpickle anything.

    ``torch.export.load`` unpickles (``weights_only=False``) weights and constants the archive flags as pickles,
    custom and opaque objects, legacy constant files, and sample inputs that ``weights_only`` refuses: any of them
    can run code. This loader reads the archive's own configuration first and refuses all of those, so the
    remaining load reads tensors and the program's JSON only. A pt2 archive is still a program that torch runs:
    prefer ONNX for files from people you do not trust.

    Raises:
        InputError: the file is not a pt2 archive, or holds an entry whose loading would unpickle.
    """
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            _check_archive(path, archive, names)
    except (zipfile.BadZipFile, OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path!r} is not a readable pt2 archive ({type(exc).__name__}: {exc}).") from None
    return torch.export.load(path)


def _check_archive(path: str, archive: zipfile.ZipFile, names: list[str]) -> None:
    """Refuse a pt2 archive with an entry ``torch.export.load`` would unpickle (see :func:`load_exported_program`)."""

    def refuse(what: str) -> InputError:
        return InputError(f"{path!r} holds {what}, which loading would unpickle (it can run code); refused.")

    for name in names:
        inner = name.split("/", 1)[-1]
        if inner.startswith("data/constants/") and inner.endswith(".pt"):
            raise refuse(f"a legacy constants file ({name})")
        if inner.endswith("_config.json") and inner.startswith(("data/weights/", "data/constants/")):
            config = json.loads(archive.read(name)).get("config", {})
            for key, entry in config.items():
                path_name = str(entry.get("path_name", ""))
                if entry.get("use_pickle") or path_name.startswith(("custom_obj", "opaque_obj")):
                    raise refuse(f"{key!r} stored as a pickled object")
        if inner.startswith("data/sample_inputs/") and archive.getinfo(name).file_size:
            try:
                torch.load(io.BytesIO(archive.read(name)), weights_only=True)
            except Exception:  # weights_only refuses what is not tensors and plain containers
                raise refuse(f"sample inputs ({name}) that are not plain tensors") from None


def _jsonable(label: Any) -> Any:
    """A label as JSON has it: numbers and strings as they are, numpy scalars as Python ones, others as text."""
    label = label.item() if hasattr(label, "item") else label
    return label if isinstance(label, (str, int, float, bool)) else str(label)


def _batch_dim() -> dict[str, dict[int, Any]]:
    return {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=65536)}}


def _exported(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=_batch_dim(), strict=False)


def _pt2_bytes(module: nn.Module, example: torch.Tensor, described: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(_exported(module, example), buffer, extra_files={DESCRIPTION_FILE: json.dumps(described)})
    return buffer.getvalue()


def _onnx_bytes(module: nn.Module, example: torch.Tensor, described: dict[str, Any]) -> bytes:
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError(f'ONNX export needs onnx and onnxscript ({exc}); pip install "prolip[export]"') from None
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own progress chatter and deprecation notes
        target = os.path.join(folder, "model.onnx")
        torch.onnx.export(
            _exported(module, example), (example,), target, dynamo=True, external_data=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False,
        )  # fmt: skip
        model = onnx.load(target)
    _name_batch_axis(model.graph)
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = DESCRIPTION_KEY, json.dumps(described)
    return model.SerializeToString()


def _name_batch_axis(graph: Any) -> None:
    """Rename the exporter's symbol for the batch axis (e.g. ``s81``) to ``batch``, everywhere in the graph."""
    symbol = graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not symbol:
        return
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"
