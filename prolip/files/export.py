"""A standalone classifier file: preprocessed images ``[B, 3, H, W]`` to class probabilities, as ONNX or torch.export.

The file holds the vision tower with W0 + delta merged (:meth:`prolip.training.fitted.FittedState.merged_copy`),
the classifier T and the logit scale s baked in: ``softmax(s · normalize(visual(pixels)) · Tᵀ)``. No text
tower, no prolip needed to run it, and any batch size. Beside it, a small JSON file says how to make
the pixels (the model's own open_clip preprocessing, :class:`prolip.model.preprocessing.ViewConfig`)
and names the columns, so a client in any language can use it.

* ``onnx``: an ONNX model (torch's dynamo-based exporter, which needs ``onnxscript``), weights inside
  the one file; run it with onnxruntime.
* ``pt2``: a ``torch.export`` ExportedProgram (``torch.export.save``), loaded with ``torch.export.load``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prolip._version import __version__
from prolip.atomic import atomic_write
from prolip.errors import InputError, UnsupportedModelError
from prolip.model.backbone import Backbone
from prolip.model.transformers_clip import image_tower
from prolip.training.fitted import FittedState

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "pt2")
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
        path: the file to write; the JSON goes to the same name with suffix ``.json``.
        format: "onnx" or "pt2".

    Returns:
        The two paths written: the model file and the JSON.

    Raises:
        InputError: an unknown format, or a path whose JSON would be the file itself.
        UnsupportedModelError: the vision tower cannot be exported to ``format`` (the message names it).
        ImportError: ``format="onnx"`` without onnx and onnxscript (``pip install "prolip[export]"``).
    """
    if format not in FORMATS:
        raise InputError(f"export format {format!r} is not one of {list(FORMATS)}.")
    if state.cache is not None:
        raise InputError("this state holds ProLIP + Tip-Adapter's cache, which a standalone classifier would drop.")
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if sidecar == path:
        raise InputError(f"export path {str(path)!r} ends in .json, where its description goes; use .onnx or .pt2.")
    module = _standalone_classifier(state, backbone)
    size = backbone.view_config.size
    example = torch.zeros(_EXAMPLE_BATCH, 3, size, size)
    tower = f"{type(module.visual).__name__} ({state.projector_family}, model {state.model_name or 'object'})"
    try:
        data = _onnx_bytes(module, example) if format == "onnx" else _pt2_bytes(module, example)
    except ImportError:
        raise
    except Exception as exc:  # the exporters raise many types for what they cannot trace
        raise UnsupportedModelError(
            f"the vision tower {tower} cannot be exported to {format}: {type(exc).__name__}: {str(exc)[:300]}. "
            "Use the delta with prolip itself, or try the other format."
        ) from exc
    atomic_write(path, [data])
    atomic_write(sidecar, [json.dumps(_describe(state, backbone, format, path.name), indent=2).encode()])
    logger.info("exported %s (%.1f MB) and %s", path, len(data) / 1e6, sidecar)
    return path, sidecar


def _describe(state: FittedState, backbone: Backbone, format: str, file: str) -> dict[str, Any]:
    """The JSON written beside an exported classifier: its input, output, classes and preprocessing."""
    config = dataclasses.asdict(backbone.view_config)
    return {
        "format": format,
        "file": file,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, config["size"], config["size"]], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(state.classes)], "meaning": "class probabilities"},
        "classes": [_jsonable(c) for c in state.classes],
        "class_names": list(state.class_names),
        "preprocessing": {
            key: config[key] for key in ("size", "mean", "std", "resize_mode", "interpolation", "fill_color")
        },
        "model": state.model_name,
        "pretrained": state.pretrained,
        "prolip_version": __version__,
    }


def _jsonable(label: Any) -> Any:
    """A label as JSON has it: numbers and strings as they are, numpy scalars as Python ones, others as text."""
    label = label.item() if hasattr(label, "item") else label
    return label if isinstance(label, (str, int, float, bool)) else str(label)


def _batch_dim() -> dict[str, dict[int, Any]]:
    return {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=65536)}}


def _exported(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=_batch_dim(), strict=False)


def _pt2_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(_exported(module, example), buffer)
    return buffer.getvalue()


def _onnx_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    try:
        import onnx  # noqa: F401
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
        return Path(target).read_bytes()
