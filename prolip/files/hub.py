"""Sharing deltas: a Hugging Face Hub repository or a local folder holding one delta and a model card.

Works on a :class:`~prolip.training.fitted.FittedState` (what an adapter learned) or a delta file, never on
an estimator, so imports run one way: the adapter uses this module, not the reverse.
huggingface_hub is optional and imported only when the Hub is used.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from prolip.errors import InputError, ProLIPError
from prolip.files.delta import write_delta
from prolip.training.fitted import FittedState, LinearAdapterState

DELTA_FILENAME = "prolip_delta.safetensors"
HUB_PREFIX = "hf-hub:"


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ProLIPError(
            "sharing on the Hugging Face Hub needs the huggingface_hub package: pip install huggingface_hub"
        ) from None
    return huggingface_hub


def model_card(state: FittedState | LinearAdapterState, metrics: dict[str, float] | None = None) -> str:
    """A README.md (with Hub front matter) describing a fitted delta or regularised linear adapter."""
    from prolip._version import __version__

    base = state.model_name or "an open_clip model"
    classes = ", ".join(
        f"`{c}`" + (f" ({n})" if str(c) != n else "") for c, n in zip(state.classes, state.class_names, strict=True)
    )
    keys = ("lr", "reg_lambda", "epochs", "views", "random_state", "target")
    hyper = {k: state.hyperparameters[k] for k in keys if k in state.hyperparameters}
    if isinstance(state, LinearAdapterState):
        title = "Regularised linear adapter"
        summary = (
            "regularised linear adapter: a d×d matrix A applied to the image embeddings, with the stored text "
            "classifier, gives a few-shot image classifier (for models whose weights cannot be touched)."
        )
        usage = [
            "from prolip import RegularizedLinearAdapter",
            'rla = RegularizedLinearAdapter.from_pretrained("hf-hub:<this repo>")',
            "rla.predict(embeddings)  # [n, d]: image embeddings of the same model",
        ]
        source = f"`{base}`, pretrained `{state.pretrained or '-'}`" if state.model_name else "outside open_clip"
        about = [f"- embeddings from: {source}"]
    else:
        title = "ProLIP delta" if state.cache is None else "ProLIP + Tip-Adapter"
        summary = (
            f"projector delta (target {state.target}): the base model's projector(s) plus this delta, with the "
            "stored classifier, gives a few-shot image classifier."
        )
        estimator = "ProLIPAdapter" if state.cache is None else "ProLIPTipAdapter"
        if state.cache is not None:
            summary += (
                f" A Tip-Adapter cache of {state.cache.keys.shape[0]} adapted training embeddings adds to its scores."
            )
        usage = [
            f"from prolip import {estimator}",
            f'adapter = {estimator}.from_pretrained("hf-hub:<this repo>", model="<base model>", pretrained="<tag>")',
            'adapter.predict(["image.jpg"])',
        ]
        fingerprint = state.fingerprint.summary() if state.fingerprint is not None else f"SHA-256 {state.legacy_hash}"
        about = [
            f"- base model: `{base}`, pretrained `{state.pretrained or '-'}`",
            f"- base model fingerprint: {fingerprint}",
        ]
    front = {
        "library_name": "prolip",
        "base_model": f"open_clip:{base}" + (f" ({state.pretrained})" if state.pretrained else ""),
        "tags": ["prolip", "open_clip", "clip", "few-shot", "image-classification"],
        "pipeline_tag": "image-classification",
    }
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in front.items()), "---", ""]
    lines += [
        f"# {title} for {base}",
        "",
        f"A [prolip](https://pypi.org/project/prolip/) {__version__} {summary}",
        "",
        "```python",
        *usage,
        "```",
        "",
        *about,
        f"- classes ({len(state.classes)}): {classes}",
        f"- shots per class: {state.n_shots:g}; λ used: {state.reg_lambda:.4g}",
        f"- hyperparameters: `{json.dumps(hyper)}`",
    ]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"


def save_folder(
    state: FittedState | LinearAdapterState, folder: str | os.PathLike, metrics: dict[str, float] | None = None
) -> Path:
    """Write ``prolip_delta.safetensors`` and a model card README.md into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_delta(folder / DELTA_FILENAME, state)
    (folder / "README.md").write_text(model_card(state, metrics), encoding="utf-8")
    return folder


def push_to_hub(
    state: FittedState | LinearAdapterState,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    metrics: dict[str, float] | None = None,
    commit_message: str = "Upload ProLIP delta",
) -> str:
    """Upload a delta and its model card to a Hub model repository; returns its URL."""
    hub = _hub()
    api = hub.HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as tmp:
        save_folder(state, tmp, metrics)
        api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message, repo_type="model")
    return f"https://huggingface.co/{repo_id}"


def resolve(source: str | os.PathLike, *, revision: str | None = None, token: str | None = None) -> str:
    """The local path of the delta file named by ``source``.

    ``source`` is ``"hf-hub:user/repo"`` (downloaded, or taken from the local Hub cache when
    offline), a local folder written by :func:`save_folder`, or a ``.safetensors`` file.
    """
    text = os.fspath(source)
    if text.startswith(HUB_PREFIX):
        hub = _hub()
        repo_id = text[len(HUB_PREFIX) :]
        try:
            return hub.hf_hub_download(repo_id=repo_id, filename=DELTA_FILENAME, revision=revision, token=token)
        except Exception as exc:  # network, auth and missing-file errors all mean "cannot get it"
            raise ProLIPError(
                f"could not fetch {DELTA_FILENAME} from Hub repository {repo_id!r}: {exc}. "
                "Check the name and your connection, or download it and pass the local path."
            ) from exc
    path = Path(text)
    if path.is_dir():
        path = path / DELTA_FILENAME
        if not path.is_file():
            raise InputError(f"folder {text!r} has no {DELTA_FILENAME}; pass the delta file itself or its folder.")
    elif not path.is_file():
        raise InputError(f"{text!r} is neither an 'hf-hub:user/repo' name, a folder, nor a delta file.")
    return str(path)
