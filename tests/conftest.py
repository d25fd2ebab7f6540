"""Shared fixtures: tiny open_clip configs with random weights, and small synthetic image sets."""

from __future__ import annotations

import json
import os
import string
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import numpy as np
import pytest
import torch

CONFIGS = Path(__file__).parent / "configs"
# One tiny random-weight config per vision tower family of prolip.model.towers.
TINY_MODELS = {
    "vit": "test-vit-tiny",
    "modified_resnet": "test-rn-tiny",
    "timm_linear": "test-timm-tiny",
    "timm_mlp": "test-timm-mlp-tiny",
    "timm_classifier": "test-timm-classifier-tiny",
    "timm_map": "test-timm-map-tiny",  # SigLIP's attention-pool head: a residual beside x
}


def missing(what: str, reason: str) -> None:
    """Skip a test whose optional resource is absent, except under CI (``CI`` set), where it must fail.

    scripts/setup.sh installs everything the suite uses, so under CI a missing resource is a
    broken set-up, not a reason to pass silently.
    """
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing under CI, where scripts/setup.sh must have installed it: {reason}")
    pytest.skip(f"{what} is not installed: {reason}", allow_module_level=True)


def pytest_configure(config: pytest.Config) -> None:
    import open_clip

    open_clip.add_model_config(CONFIGS)


def run_prolip(*args: str) -> subprocess.CompletedProcess:
    """``prolip ARGS`` run in this process through :func:`prolip.cli.main`, as a finished process would report it.

    What a fresh process would see: stdout and stderr captured, the root logger without pytest's handlers (so the
    command's own ``basicConfig`` writes to the captured stderr), warnings shown once per run with the default
    filters, and all of it put back afterwards. Saves the torch import a subprocess pays (several seconds each);
    the entry point itself is tested as a process in tests/test_cli.py.
    """
    import contextlib
    import io
    import logging
    import warnings

    from prolip.cli import main

    out, err = io.StringIO(), io.StringIO()
    root, ours = logging.getLogger(), logging.getLogger("prolip")
    handlers, levels = root.handlers[:], (root.level, ours.level)
    root.handlers.clear()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()
            warnings.simplefilter("default")
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's --help and usage errors
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            finally:
                logging.captureWarnings(False)
                for handler in root.handlers:
                    handler.flush()
    finally:
        root.handlers[:] = handlers
        root.setLevel(levels[0])
        ours.setLevel(levels[1])
    return subprocess.CompletedProcess(["prolip", *args], code, out.getvalue(), err.getvalue())


def colour_images(n_per_class: int, seed: int = 0, size: int = 40) -> tuple[list[torch.Tensor], list[str]]:
    """Images whose classes differ visibly: mostly-red, mostly-green and mostly-blue noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k, name in enumerate(["red", "green", "blue"]):
        for _ in range(n_per_class):
            img = rng.integers(0, 90, size=(3, size, size))
            img[k] += 150
            images.append(torch.from_numpy(img.astype(np.uint8)))
            labels.append(name)
    return images, labels


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A fixed random-weight checkpoint per tiny model family, so base models can be rebuilt."""
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for family, name in TINY_MODELS.items():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = open_clip.create_model(name)
        paths[family] = str(folder / f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, paths[family])
    return paths


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    """A real CLIPTokenizer over a tiny character vocabulary (no Hub): ids 0 and 1 are start and end."""
    try:
        import transformers
    except ImportError as exc:  # an optional extra; scripts/setup.sh installs it
        missing("transformers", str(exc))
    folder = tmp_path_factory.mktemp("tokenizer")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + ".":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny problems, restored after.

    On tiny problems a second thread only adds synchronisation (and, on a busy machine, waits for
    a core). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def assert_no_near_ties(logits: torch.Tensor, margin: float) -> None:
    """Every row's top two ``logits`` are more than ``margin`` apart.

    Two computation paths (other kernels, other matrix shapes) agree only to rounding, which differs
    from one CPU to another: their predictions can differ only on a row whose top two logits are
    that close. Tests that compare predictions or accuracies across paths check their data has none.
    """
    top2 = logits.topk(2, dim=-1).values
    gap = float((top2[..., 0] - top2[..., 1]).min())
    assert gap > margin, f"near-tie in the test data: a row's top two logits are {gap:.3g} apart (<= {margin})"


def assert_same_argmax(predicted, logits: torch.Tensor, margin: float, classes=None) -> None:
    """``predicted`` (labels from another computation path) are the argmax of ``logits`` (named by ``classes``).

    Exact, on data without near-ties (:func:`assert_no_near_ties`), where rounding cannot flip a label.
    """
    assert_no_near_ties(logits, margin)
    expected = logits.argmax(dim=-1).cpu().numpy()
    if classes is not None:
        expected = np.asarray(classes)[expected]
    np.testing.assert_array_equal(np.asarray(predicted), expected)


def engine_train(features, labels, classifier, w0, bias, *, side=None, train_image=True, extra=None, **settings):
    """:func:`prolip.training.engine.train_projector` on W0 ``[d_in, d_out]`` and bias, T or a side, settings as keywords
    (``lr``, ``reg_lambda``, ``epochs``, ``logit_scale``, ``train_dtype``, ``optimizer``, ``device``, ``verbose``)."""
    from prolip.model.head import LinearHead
    from prolip.training.engine import TrainConfig, train_projector

    config = TrainConfig(**{"device": "cpu", "verbose": False, **settings})
    head = LinearHead(w0, bias)
    return train_projector(
        features, labels, head, classifier if side is None else side, config, train_image=train_image, extra=extra
    )


def engine_grid(features, labels, classifier, w0, bias, *, points, **settings):
    """:func:`prolip.training.engine.train_grid` at ``points``, settings as :func:`engine_train`'s (lr and λ from the points)."""
    from prolip.model.head import LinearHead
    from prolip.training.engine import TrainConfig, train_grid

    config = TrainConfig(**{"device": "cpu", "verbose": False, "reg_lambda": 0.0, **settings})
    return train_grid(features, labels, LinearHead(w0, bias), classifier, config, points)


def edit_delta(path, out, meta=None, tensors=None, config=None):
    """A copy of the safetensors file ``path`` at ``out``, changed in place by ``meta(dict)`` (the header's text
    fields: format, format_version, kind, config as JSON text, ...), ``config(dict)`` (the decoded configuration of
    a format 3 file, written back as JSON) and ``tensors(dict)``: how tests make damaged delta files."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        m, t = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if config:
        decoded = json.loads(m["config"])
        config(decoded)
        m["config"] = json.dumps(decoded)
    if meta:
        meta(m)
    if tensors:
        tensors(t)
    save_file(t, str(out), metadata=m)
    return out


@pytest.fixture
def colours() -> tuple[list[torch.Tensor], list[str]]:
    """Four images per class of three colour classes."""
    return colour_images(4)


def tiny_adapter(checkpoint: str | None, family: str = "vit", **kwargs):
    """A ProLIPAdapter on a tiny random-weight model, with few views and steps."""
    from prolip import ProLIPAdapter

    params = dict(
        model=TINY_MODELS[family], pretrained=checkpoint, views=3, epochs=20, lr=1e-2, device="cpu", verbose=False
    )
    params.update(kwargs)
    return ProLIPAdapter(**params)


@pytest.fixture(scope="session")
def mini_suite():
    """:mod:`prolip.bench.data.mini_suite`, once Fashion-MNIST is known to be there (it needs it)."""
    from prolip.bench.data import mini_suite as module

    try:
        module.load_fashion_mnist("test")
    except FileNotFoundError as exc:  # bash scripts/setup.sh installs it
        missing("Fashion-MNIST", str(exc))
    return module
