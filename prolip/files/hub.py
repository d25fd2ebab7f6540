"""Sharing fitted estimators, the Hugging Face way: ``save_pretrained``, ``from_pretrained``, ``push_to_hub``, once.

:class:`HubMixin` gives every prolip estimator the same methods over one :class:`~prolip.training.fitted.FittedState`
and one file format (:mod:`prolip.files.delta`), as ``huggingface_hub.ModelHubMixin`` gives transformers' and
SetFit's models theirs: ``save`` / ``load`` (one file), ``save_pretrained`` / ``from_pretrained`` (a folder or a Hub
repository holding that file and a model card) and ``push_to_hub``. :data:`ESTIMATORS` is the one registry from a
file's kind to the estimator that reads it, which ``load``, the command line and these methods consult.

The model card is written from a template (``model_card.md`` beside this module) with ``huggingface_hub``'s
``ModelCard`` and ``ModelCardData``: a valid ``base_model`` where the base is on the Hub, ``library_name: prolip``,
the license, the datasets and ``model-index`` results where given, the exact loading snippet, intended use and
limits, and the paper's citation. huggingface_hub is optional and imported only here, when it is used; offline
and network failures are one-line :class:`~prolip.errors.ProLIPError` s.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from prolip._version import __version__
from prolip.atomic import atomic_write
from prolip.errors import DeltaFileError, InputError, ProLIPError
from prolip.files.delta import read_state, write_delta
from prolip.model.backbone import file_may_choose
from prolip.training.fitted import FittedState

logger = logging.getLogger(__name__)

DELTA_FILENAME = "prolip_delta.safetensors"
CARD_FILENAME = "README.md"
ESTIMATORS: dict[str, str] = {
    "projector": "prolip.adapter:ProLIPAdapter",
    "tip_adapter": "prolip.variants.tip_cache:ProLIPTipAdapter",
    "linear_adapter": "prolip.variants.linear_adapter:RegularizedLinearAdapter",
}
"""Which estimator reads each kind of fitted state: plain data, ``module:class``, imported only when asked for (the
file format never imports an estimator; the estimators import it)."""
_HUB_PREFIX = "hf-hub:"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_INSTALL_HINT = 'sharing on the Hugging Face Hub needs the hub extra: pip install "prolip[hub]"'


def estimator_for(kind: str) -> type:
    """The estimator class that reads fitted states of ``kind`` (:data:`ESTIMATORS`)."""
    module, name = ESTIMATORS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def estimator_name(kind: str) -> str:
    """The public name of the estimator that reads ``kind`` (e.g. ``ProLIPTipAdapter``), for messages and cards."""
    return ESTIMATORS[kind].split(":")[1]


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ProLIPError(_INSTALL_HINT) from None
    return huggingface_hub


class HubMixin:
    """``save`` / ``load`` / ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for an estimator of one kind.

    The estimator says which kind of fitted state it holds (``kind``), gives its state (``_fitted_state``) and
    rebuilds itself from one (``_from_state``); everything else is here, once.
    """

    kind: ClassVar[str]
    """The kind of fitted state the estimator holds (a key of :data:`ESTIMATORS`)."""

    def _fitted_state(self) -> FittedState:
        raise NotImplementedError

    @classmethod
    def _from_state(cls, state: FittedState, source: str, *args: Any, **kwargs: Any) -> HubMixin:
        raise NotImplementedError

    # ------------------------------------------------------------------ one file
    def save(self, path: str | os.PathLike) -> None:
        """Save what the fit learned as one ``.safetensors`` delta file (atomically; the same fit, the same bytes)."""
        write_delta(path, self._fitted_state())
        logger.info("saved %s to %s", self.kind, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """Rebuild a fitted estimator from a delta file written by :meth:`save`.

        Further arguments are the estimator's loading options (its ``_from_state``): for ProLIP's estimators
        ``model`` and ``pretrained`` (default: the ones the file names), ``strict=``, ``trust_file_model=`` and
        parameter overrides such as ``device="cpu"``.

        Raises:
            DeltaFileError: the file is damaged, or holds another kind of fit (the message names its estimator).
        """
        source = repr(os.fspath(path))
        state = read_state(path)
        if state.kind != cls.kind:
            raise DeltaFileError(
                f"{source} holds a {state.kind} fit, not a {cls.kind} one; load it with "
                f"prolip.{estimator_name(state.kind)}.load (or from_pretrained)."
            )
        return cls._from_state(state, source, *args, **kwargs)

    # ------------------------------------------------------------------ a folder, a repository
    def save_pretrained(
        self,
        folder: str | os.PathLike,
        *,
        metrics: Mapping[str, float] | None = None,
        datasets: Sequence[str] | None = None,
        license: str = "mit",
        repo_id: str | None = None,
    ) -> Path:
        """Write the delta file (``prolip_delta.safetensors``) and a model card (``README.md``) into ``folder``.

        Args:
            folder: created if needed.
            metrics: scores to report, e.g. ``{"accuracy": 0.91}`` (the model card's ``model-index``), measured on
                ``datasets[0]`` when given.
            datasets: the training data's names or Hub dataset ids.
            license: the card's license (prolip's MIT by default; name the base model's where it is stricter).
            repo_id: the repository the folder is for, used in the card's loading snippet (default: the folder).

        Returns:
            The folder.
        """
        folder = Path(folder)
        state = self._fitted_state()
        card = model_card(state, repo_id or str(folder), metrics=metrics, datasets=datasets, license=license)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the folder {str(folder)!r}: {exc.strerror or exc}.") from None
        write_delta(folder / DELTA_FILENAME, state)
        atomic_write(folder / CARD_FILENAME, [card.encode("utf-8")])
        return folder

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *args: Any,
        revision: str | None = None,
        token: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Load from a Hub repository id (``"user/repo"``, or ``"hf-hub:user/repo"``), a folder written by
        :meth:`save_pretrained`, or a delta file.

        Args:
            name_or_path: where the delta is.
            revision: a branch, tag or commit of the repository.
            token: a Hub token for a private repository.
            *args: as :meth:`load` (``model``, ``pretrained``).
            **kwargs: as :meth:`load` (``strict=``, ``trust_file_model=``, parameter overrides).
        """
        return cls.load(resolve(name_or_path, revision=revision, token=token), *args, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str = "Upload prolip delta",
        metrics: Mapping[str, float] | None = None,
        datasets: Sequence[str] | None = None,
        license: str = "mit",
    ) -> str:
        """Upload the folder :meth:`save_pretrained` writes to a Hub model repository (created if needed); returns its URL.

        Raises:
            ProLIPError: huggingface_hub is missing, the Hub is offline (``HF_HUB_OFFLINE``), or the upload failed.
        """
        hub = _hub()
        api = hub.HfApi(token=token)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, metrics=metrics, datasets=datasets, license=license, repo_id=repo_id)
            try:
                api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
                if revision is not None:  # uploading to a branch needs the branch
                    api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, repo_type="model")
                api.upload_folder(
                    repo_id=repo_id, folder_path=tmp, commit_message=commit_message, repo_type="model",
                    revision=revision,
                )  # fmt: skip
            except Exception as exc:  # offline mode, network, auth and permission errors all mean "not uploaded"
                raise ProLIPError(f"could not upload to Hub repository {repo_id!r}: {_reason(exc)}.") from None
        return f"https://huggingface.co/{repo_id}"


def resolve(name_or_path: str | os.PathLike, *, revision: str | None = None, token: str | None = None) -> str:
    """The local path of the delta file named by ``name_or_path``: a file, a folder holding ``prolip_delta.safetensors``,
    or a Hub repository id (downloaded, or taken from the local Hub cache when offline).

    Raises:
        InputError: a folder without the delta file, or something that is neither a path nor a repository id.
        ProLIPError: the repository or revision cannot be reached or lacks the file (one line, with the reason).
    """
    text = os.fspath(name_or_path)
    path = Path(text)
    if path.is_dir():
        if not (path / DELTA_FILENAME).is_file():
            raise InputError(f"folder {text!r} has no {DELTA_FILENAME}; pass the delta file itself or its folder.")
        return str(path / DELTA_FILENAME)
    if path.is_file():
        return text
    hub_named = text.startswith(_HUB_PREFIX)
    if not hub_named and _path_like(text):
        # A missing file is never looked up on the Hub ("hf-hub:" says a name is a repository).
        raise DeltaFileError(f"delta file {text!r} does not exist (or is not a file); check the path.")
    repo_id = text[len(_HUB_PREFIX) :] if hub_named else text
    if not _REPO_ID.match(repo_id):
        raise InputError(
            f"{text!r} is neither a delta file, a folder holding {DELTA_FILENAME}, nor a Hub repository id "
            "such as 'user/repo'."
        )
    hub = _hub()
    try:
        return hub.hf_hub_download(
            repo_id=repo_id, filename=DELTA_FILENAME, revision=revision, token=token, library_name="prolip",
            library_version=__version__,
        )  # fmt: skip
    except Exception as exc:  # offline mode, network, auth, missing repository / revision / file
        where = repo_id + (f" at revision {revision!r}" if revision else "")
        raise ProLIPError(
            f"could not get {DELTA_FILENAME} of Hub repository {where}: {_reason(exc)}. Check the name and your "
            "connection, or download the file and pass its path."
        ) from None


def _path_like(text: str) -> bool:
    """Whether ``text`` reads as a file path, not a repository id: a ``.safetensors`` suffix, a leading ``.``, ``/`` or
    ``~``, more than one ``/``, or a backslash."""
    return text.endswith(".safetensors") or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text


def _reason(exc: Exception) -> str:
    """An exception in one line: its type and the first line of its message."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if type(exc).__name__ == "OfflineModeIsEnabled":
        return "the Hugging Face Hub is offline here (HF_HUB_OFFLINE is set)"
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def hub_base_model(model_name: str, pretrained: str) -> str | None:
    """The Hub repository id of a base model, where it has one: ``hf-hub:`` and ``hf-transformers:`` names, and
    open_clip's pretrained tags whose weights live on the Hub; None otherwise (a local checkpoint, the stand-in)."""
    for prefix in (_HUB_PREFIX, "hf-transformers:"):
        if model_name.startswith(prefix):
            repo = model_name[len(prefix) :]
            return repo if _REPO_ID.match(repo) and not Path(repo).exists() else None
    if not (model_name and pretrained):
        return None
    import open_clip

    try:
        hub = (open_clip.get_pretrained_cfg(model_name, pretrained) or {}).get("hf_hub", "")
    except Exception:  # an unknown model or tag: no repository to name
        return None
    repo = "/".join(hub.strip("/").split("/")[:2])
    return repo if _REPO_ID.match(repo) else None


def model_card(
    state: FittedState,
    repo_id: str,
    *,
    metrics: Mapping[str, float] | None = None,
    datasets: Sequence[str] | None = None,
    license: str = "mit",
) -> str:
    """A README.md with Hub front matter for a fitted state, loaded from ``repo_id`` (a Hub id or a folder)."""
    hub = _hub()
    estimator = estimator_name(state.kind)
    base_id = hub_base_model(state.model_name, state.pretrained)
    base = (
        f"`{state.model_name}`, pretrained `{state.pretrained or '-'}`"
        if state.model_name
        else ("embeddings from outside open_clip" if state.kind == "linear_adapter" else "a model object")
    )
    dataset = list(datasets or [])
    results = [
        hub.EvalResult(
            task_type="image-classification", dataset_type=dataset[0] if dataset else "custom",
            dataset_name=dataset[0] if dataset else "held-out images", metric_type=name, metric_value=float(value),
        )
        for name, value in (metrics or {}).items()
    ]  # fmt: skip
    title = {"projector": "ProLIP delta", "tip_adapter": "ProLIP + Tip-Adapter", "linear_adapter": "Regularised linear adapter"}[state.kind]  # fmt: skip
    card_data = hub.ModelCardData(
        library_name="prolip",
        license=license,
        base_model=base_id,
        datasets=dataset or None,
        tags=["prolip", "open_clip", "clip", "few-shot", "image-classification"],
        pipeline_tag="image-classification",
        model_name=f"{title} for {state.model_name or 'a CLIP model'}",
        eval_results=results or None,
        # The base as open_clip names it, also where it has no Hub id (a local checkpoint, a registered model).
        prolip={"kind": state.kind, "model": state.model_name or None, "pretrained": state.pretrained or None},
    )
    template = Path(__file__).with_name("model_card.md")
    card = hub.ModelCard.from_template(
        card_data,
        template_path=str(template),
        title=f"{title} for {state.model_name or 'a CLIP model'}",
        summary=_summary(state),
        install='"prolip[hub]"',
        usage=_usage(state, estimator, repo_id),
        base=base + (f" ([{base_id}](https://huggingface.co/{base_id}))" if base_id else ""),
        fingerprint=state.fingerprint.summary() if state.fingerprint is not None else "-",
        n_classes=len(state.classes),
        classes=", ".join(
            f"`{c}`" + (f" ({n})" if str(c) != n else "") for c, n in zip(state.classes, state.class_names, strict=True)
        ),
        templates=", ".join(f"`{t}`" for t in state.templates) or "-",
        n_shots=f"{state.n_shots:g}",
        reg_lambda=f"{state.reg_lambda:.4g}",
        logit_scale=f"{state.logit_scale:g}",
        hyperparameters=json.dumps(dict(state.hyperparameters), sort_keys=True),
        results=results,
        open_vocabulary="its adapted projector scores other class names too, with prolip's OpenVocabularyClassifier"
        if state.kind == "projector"
        else "its cache or adapter belongs to these classes",
        version=__version__,
    )
    return str(card) + "\n"


def _summary(state: FittedState) -> str:
    if state.kind == "linear_adapter":
        return (
            "A regularised linear adapter: a d×d matrix A applied to a CLIP model's image embeddings, with the stored "
            "text classifier, gives a few-shot image classifier (for models whose weights cannot be touched)."
        )
    summary = (
        f"A [ProLIP](https://arxiv.org/abs/2410.05270) delta (target {state.target}): the base model's projector(s) "
        "plus this delta, with the stored text classifier, give a few-shot image classifier. The file holds only "
        "the trained difference W − W0 and the classifier T (safetensors: nothing in it runs)."
    )
    if state.cache is not None:
        summary += (
            f" A Tip-Adapter cache of {state.cache.keys.shape[0]} adapted training embeddings adds to its scores."
        )
    return summary


def _usage(state: FittedState, estimator: str, repo_id: str) -> str:
    """The exact lines that load this file and predict with it."""
    args = [repr(repo_id)]
    if state.kind == "linear_adapter":
        return "\n".join([
            f"from prolip import {estimator}",
            f"rla = {estimator}.from_pretrained({args[0]})",
            "rla.predict(embeddings)  # [n, d]: image embeddings (encode_image) of the same model",
        ])  # fmt: skip
    if not state.model_name:
        args.append("model=model  # the model object it was fitted on")
    elif not file_may_choose(state.model_name, state.pretrained):  # the file cannot choose its base: the caller does
        args += [f"model={state.model_name!r}", f"pretrained={state.pretrained!r}"]
    return "\n".join([
        f"from prolip import {estimator}",
        f"adapter = {estimator}.from_pretrained({', '.join(args)})",
        'adapter.predict(["image.jpg"])',
    ])  # fmt: skip
