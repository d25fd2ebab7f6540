"""Which open_clip configs prolip supports, found by building each one on the meta device.

Nothing is hand-written: every name in ``open_clip.list_models()`` is built without weights (under
``torch.device("meta")``, so even the largest take well under a second) and handed to the family
registry. Configs whose Hugging Face text tower needs the optional ``transformers`` package are
built with a small stand-in text tower when ``transformers`` is missing, since only the vision
tower decides the family.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from prolip.errors import UnsupportedModelError
from prolip.model.towers.registry import find_projector
from prolip.model.towers.text import find_text_projector
from prolip.progress import progress

logger = logging.getLogger(__name__)

# A minimal open_clip text transformer, standing in for a Hugging Face one that cannot be built here.
STANDIN_TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 8, "heads": 1, "layers": 1}
NEEDS_TRANSFORMERS = "text tower needs `transformers` (not installed): vision tower built with a stand-in text tower"


@dataclass(frozen=True)
class ModelReport:
    """What prolip makes of one open_clip model config.

    Attributes:
        name: the open_clip model name.
        status: ``"supported"``, ``"refused"`` (built, but no projector of a supported family) or
            ``"unbuildable"`` (open_clip could not build it here).
        family: the vision projector's family, if supported.
        key: the vision projector's state-dict key, if supported.
        in_features: width of the pre-projection features, if supported.
        out_features: width of the embedding, if supported.
        residual: whether the tower adds a per-image residual after the projector.
        text_key: the text projection's state-dict key, or None (none, or the text tower was not built).
        note: why it is refused or unbuildable, or what was built in place of the text tower.
    """

    name: str
    status: str
    family: str | None = None
    key: str | None = None
    in_features: int | None = None
    out_features: int | None = None
    residual: bool = False
    text_key: str | None = None
    note: str = ""


class _DropRandomInitWarning(logging.Filter):
    """Drops open_clip's per-model warning that no (or not all) weights were loaded: true of every meta build."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "No pretrained weights loaded" not in message and "initialized partially" not in message


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Silence open_clip's random-initialisation warning (logged on the root logger) for the block."""
    root, dropper = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(dropper)
    try:
        yield
    finally:
        root.removeFilter(dropper)


def build_on_meta(name: str) -> tuple[nn.Module, str]:
    """``(model, note)``: open_clip config ``name`` built on the meta device, allocating no weights.

    ``open_clip.create_model(name, device="meta")`` alone would build on the CPU first (minutes and
    tens of GB for the largest configs); the ``torch.device("meta")`` context avoids that. The note
    says when the text tower was replaced by a stand-in because ``transformers`` is missing.
    """
    import open_clip

    text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    needs_standin = bool(text_cfg.get("hf_model_name")) and not _has_transformers()
    overrides = {}
    if needs_standin:
        overrides["text_cfg"] = STANDIN_TEXT_CFG
    elif text_cfg.get("hf_model_name"):  # never download the Hugging Face tower's own weights
        overrides["text_cfg"] = {**text_cfg, "hf_model_pretrained": False}
    with torch.device("meta"), _quiet_open_clip():
        model = open_clip.create_model(name, device="meta", **overrides)
    return model, NEEDS_TRANSFORMERS if needs_standin else ""


def _has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def survey_model(name: str) -> ModelReport:
    """Build open_clip config ``name`` on the meta device and report its projector (no weights, no check)."""
    try:
        model, note = build_on_meta(name)
    except Exception as error:  # any failure of open_clip or timm to build the config is reported, not raised
        return ModelReport(name, "unbuildable", note=f"{type(error).__name__}: {error}")
    try:
        projector = find_projector(model, verify=False)
    except UnsupportedModelError as error:
        return ModelReport(name, "refused", note=str(error))
    try:
        text_key = None if note else find_text_projector(model, verify=False).key
    except UnsupportedModelError:
        text_key = None
    return ModelReport(
        name,
        "supported",
        family=projector.family,
        key=projector.key,
        in_features=projector.in_features,
        out_features=projector.out_features,
        residual=projector.has_residual,
        text_key=text_key,
        note=note,
    )


def survey_models(names: Iterable[str] | None = None, *, verbose: bool = False) -> list[ModelReport]:
    """A :class:`ModelReport` per open_clip config (default: every name in ``open_clip.list_models()``)."""
    import open_clip

    names = list(open_clip.list_models() if names is None else names)
    return [survey_model(name) for name in progress(names, desc="open_clip configs", verbose=verbose)]


@functools.lru_cache(maxsize=1)
def _survey_all(names: tuple[str, ...]) -> tuple[ModelReport, ...]:
    return tuple(survey_models(names))


def supported_models() -> dict[str, list[str]]:
    """The open_clip model names prolip supports, by projector family (built on the meta device once, then cached).

    Refused and unbuildable configs, with their reasons, are in :func:`survey_models`.
    """
    import open_clip

    supported: dict[str, list[str]] = {}
    for report in _survey_all(tuple(open_clip.list_models())):
        if report.status == "supported":
            supported.setdefault(report.family, []).append(report.name)
    return supported
