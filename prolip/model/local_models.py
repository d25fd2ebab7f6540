"""Model configurations that ship with their weights, as plain data: what open_clip's own tables hold for its models.

open_clip knows a model by its config (``open_clip.add_model_config``) and a pretrained tag by where its
weights are. An entry here is both, for a model whose weights are a local file: :data:`LOCAL_MODELS` maps
the model name to its config JSON and each of its tags to a checkpoint. prolip's stand-in CLIP
(:mod:`prolip.standin`) is one entry. The backbone builder resolves every name through :func:`resolve`, and
the delta loader asks :func:`pretrained_tags` which tags a file may name, so no code path knows a model by
its name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from prolip import standin


@dataclass(frozen=True)
class LocalModel:
    """A model config with weights on local disk.

    Attributes:
        config: the open_clip model config JSON (its file name, less ``.json``, is the model name).
        weights: pretrained tag → checkpoint file (an open_clip state dict, safetensors).
    """

    config: Path
    weights: Mapping[str, Path]


LOCAL_MODELS: dict[str, LocalModel] = {
    standin.MODEL_NAME: LocalModel(standin.config_path(), {standin.PRETRAINED_TAG: standin.checkpoint_path()}),
}
"""Every registered model, by open_clip name."""


def register_local_model(name: str, config: str | os.PathLike, weights: Mapping[str, str | os.PathLike]) -> None:
    """Add ``name`` to :data:`LOCAL_MODELS`: its config file and its tags' checkpoint files."""
    LOCAL_MODELS[name] = LocalModel(Path(config), {tag: Path(path) for tag, path in weights.items()})


def add_to_open_clip(name: str) -> None:
    """Make a registered model's config known to ``open_clip.create_model`` and friends (idempotent)."""
    import open_clip

    entry = LOCAL_MODELS.get(name)
    if entry is not None and name not in open_clip.list_models():
        open_clip.add_model_config(entry.config)


def resolve(name: str, pretrained: str | None) -> str | None:
    """What open_clip is given as ``pretrained`` for ``name``: a registered tag's checkpoint file, else ``pretrained``.

    A registered model's config is added to open_clip first.
    """
    add_to_open_clip(name)
    entry = LOCAL_MODELS.get(name)
    if entry is not None and pretrained in entry.weights:
        return os.fspath(entry.weights[pretrained])
    return pretrained


def pretrained_tags(name: str) -> list[str]:
    """Every pretrained tag of ``name``: open_clip's own, then a registered model's."""
    import open_clip

    entry = LOCAL_MODELS.get(name)
    return list(open_clip.list_pretrained_tags_by_model(name)) + (list(entry.weights) if entry else [])


def known_models() -> list[str]:
    """Every model name open_clip can build: its own configs and the registered ones."""
    import open_clip

    return list(dict.fromkeys([*open_clip.list_models(), *LOCAL_MODELS]))
