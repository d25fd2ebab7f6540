"""The ``prolip`` command line: fit, predict, eval, info, models, bench, merge and export."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prolip.errors import ProLIPError

_EXAMPLES = {
    "fit": "example:\n  prolip fit photos/ --model ViT-B-32 --pretrained openai --shots 16 --out pets.safetensors\n"
    "  prolip fit photos/ --shots 16 --variant text --out pets-text.safetensors\n"
    "  prolip fit photos/ --shots 16 --variant image+tip-adapter --val photos_val/ --out pets-tip.safetensors",
    "predict": "example:\n  prolip predict pets.safetensors cat1.jpg dog2.png --json\n"
    "  prolip predict pets.safetensors photos/ more.csv  # folders (recursively) and CSV files of paths\n"
    "  prolip predict pets.safetensors photos/ --classes hamster rabbit --template 'a photo of a {}, a pet.'\n"
    "  prolip predict pets.safetensors cat1.jpg --test-time --tt-views 64 --tt-lr 5e-3",
    "eval": "example:\n  prolip eval pets.safetensors photos_test/\n  prolip eval pets.safetensors photos_test/ extra.csv",
    "info": "example:\n  prolip info pets.safetensors",
    "models": "example:\n  prolip models\n  prolip models --all --json > models.json",
    "bench": "example:\n  prolip bench few-shot --data-root ~/data --datasets caltech101 dtd --model RN50 --pretrained openai \\\n"
    "      --out-dir runs/rn50-few-shot",
    "merge": "example:\n  prolip merge pets.safetensors --out ViT-B-32-pets.safetensors\n"
    "  python -c \"import open_clip; open_clip.create_model('ViT-B-32', pretrained='ViT-B-32-pets.safetensors')\"",
    "export": "example:\n  prolip export pets.safetensors --format onnx --out pets.onnx   # and pets.onnx.json beside it\n"
    "  prolip export pets.safetensors --format pt2 --out pets.pt2",
    "import-official": "example:\n  prolip import-official trained_models/few_shot_rn50/oxford_pets/16_shot/oxford_pets_seed1.pth \\\n"
    "      --model RN50 --pretrained openai --classes-file pets-classes.txt --out pets.safetensors",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 1, like every other prolip error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _reg_lambda(text: str) -> str | float:
    """``--reg-lambda``: 'auto' (1/N), '1/N^2' or a number >= 0."""
    from prolip.params import REG_LAMBDA_RULES

    if text in REG_LAMBDA_RULES:
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'auto', '1/N^2' or a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be 'auto', '1/N^2' or a finite number >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="prolip",
        description="Few-shot adaptation of open_clip models by fine-tuning only the vision projector (ProLIP).",
    )
    parser.add_argument("--version", action="store_true", help="print the prolip version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log messages")
        p.add_argument("-v", "--verbose", action="store_true", help="also show open_clip's own log messages")
        p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
        return p

    fit = command("fit", "Fit a ProLIP delta (or a variant) on a labelled image folder or path,label CSV.")
    fit.add_argument("data", nargs="?", help="folder with one sub-folder per class, or a CSV file of path,label rows")
    fit.add_argument(
        "--hf-dataset",
        metavar="DIR",
        default=None,
        help="instead of DATA: a Hugging Face dataset (save_to_disk folder or imagefolder; see --split)",
    )
    fit.add_argument("--split", default="train", help="the split of --hf-dataset to fit on (default: %(default)s)")
    _on_error_option(fit)
    fit.add_argument("--out", required=True, help="where to write the delta (.safetensors)")
    fit.add_argument(
        "--model",
        default="ViT-B-32",
        help="open_clip model name, or hf-transformers:REPO_OR_FOLDER (default: %(default)s)",
    )
    fit.add_argument("--pretrained", default="openai", help="open_clip tag or local checkpoint (default: %(default)s)")
    fit.add_argument("--shots", type=int, default=None, help="images drawn per class (default: all)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the shot draw and the views (default: 0)")
    fit.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: %(default)s)")
    fit.add_argument(
        "--reg-lambda",
        default="auto",
        type=_reg_lambda,
        help="λ, or 'auto' for 1/N, '1/N^2' for 1/N² (default: %(default)s)",
    )
    fit.add_argument("--epochs", type=int, default=300, help="training steps (default: %(default)s)")
    fit.add_argument("--views", type=int, default=300, help="augmented views per image (default: %(default)s)")
    fit.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    fit.add_argument("--template", action="append", dest="templates", help="prompt template with {} (repeatable)")
    fit.add_argument("--cache-dir", default=None, help="reuse and store training-view features in this folder")
    fit.add_argument(
        "--variant",
        default="image",
        choices=["image", "text", "image+text", "image+taskres", "image+tip-adapter", "rla"],
        help="what to train: the vision projector (ProLIP), the text projection, both, the vision projector and a "
        "TaskRes residual on the classifier, the vision projector and Tip-Adapter's cache on top, or a regularised "
        "linear adapter on the image embeddings (see docs/variants.md; default: %(default)s)",
    )
    fit.add_argument(
        "--taskres-alpha",
        type=float,
        default=0.5,
        help="α of the TaskRes residual (image+taskres; default: %(default)s)",
    )
    fit.add_argument(
        "--train-dtype",
        default="fp32",
        choices=["fp32", "fp16"],
        help="fp16 keeps W, its gradient and Adam's moments in fp16 as the official code does on the GPU "
        "(not for --variant rla; default: %(default)s)",
    )
    val = fit.add_argument_group("validation: a held-out labelled folder or CSV")
    val.add_argument(
        "--val", default=None,
        help="held-out images: their accuracy is reported after the fit; with --search they choose lr and λ, with "
        "--variant image+tip-adapter the cache's α and β",
    )  # fmt: skip
    val.add_argument("--val-shots", type=int, default=None, help="validation images drawn per class (default: all)")
    val.add_argument(
        "--search", action="store_true",
        help="choose lr and λ on --val over the paper's 7 x 7 grid (lr 1e-2..1e-8, λ 10..0), as its main results do",
    )  # fmt: skip
    tip = fit.add_argument_group("ProLIP + Tip-Adapter (--variant image+tip-adapter)")
    tip.add_argument("--tip-alpha", type=float, default=None, help="fix α instead of searching it (with --tip-beta)")
    tip.add_argument("--tip-beta", type=float, default=None, help="fix β instead of searching it (with --tip-alpha)")
    tip.add_argument(
        "--tip-keys",
        default="cache",
        choices=["cache", "trained"],
        help="Tip-Adapter's keys, or Tip-Adapter-F's (fine-tuned) (default: %(default)s)",
    )

    predict = command("predict", "Predict the class of images with a saved delta.")
    predict.add_argument(
        "delta", help="delta file, a folder written by save_pretrained, or a Hub repository id (user/repo)"
    )
    predict.add_argument(
        "images", nargs="+", help="image files, folders of images (recursively) and/or CSV files of paths"
    )
    predict.add_argument("--json", action="store_true", help="print JSON with per-class probabilities")
    _on_error_option(predict)
    _base_options(predict)
    vocab = predict.add_argument_group("open vocabulary: score any class names with the adapted projector")
    names = vocab.add_mutually_exclusive_group()
    names.add_argument("--classes", nargs="+", metavar="NAME", help="class names to score instead of the delta's")
    names.add_argument("--classes-file", help="file of class names to score, one per line ('#' comments)")
    vocab.add_argument(
        "--template",
        action="append",
        dest="templates",
        help="prompt template with {} (repeatable; default: the delta's)",
    )
    tt = predict.add_argument_group("test-time ProLIP (see docs/test_time.md)")
    tt.add_argument("--test-time", action="store_true", help="adapt a projector copy to each image, then predict it")
    tt.add_argument("--tt-views", type=int, default=64, help="views per image, plain included (default: %(default)s)")
    tt.add_argument("--tt-rho", type=float, default=0.1, help="fraction of views kept (default: %(default)s)")
    tt.add_argument("--tt-steps", type=int, default=1, help="optimiser steps per image (default: %(default)s)")
    tt.add_argument("--tt-lr", type=float, default=5e-3, help="learning rate (default: %(default)s)")
    tt.add_argument("--tt-optimizer", default="adamw", help="adamw, adam or sgd (default: %(default)s)")
    tt.add_argument(
        "--tt-start",
        default="adapted",
        choices=["adapted", "pretrained"],
        help="start from W0 + delta or from W0 (default: %(default)s)",
    )
    tt.add_argument("--tt-seed", type=int, default=0, help="seed of the random views (default: %(default)s)")
    tt.add_argument(
        "--tt-template",
        action="append",
        dest="tt_templates",
        help="prompt template with {} for T (repeatable; default: the delta's own templates)",
    )

    evaluate = command(
        "eval", "Accuracy, per-class precision / recall / F1, the confusion matrix and the zero-shot baseline."
    )
    evaluate.add_argument(
        "delta", help="delta file, a folder written by save_pretrained, or a Hub repository id (user/repo)"
    )
    evaluate.add_argument("data", nargs="+", help="folders with one sub-folder per class and/or path,label CSV files")
    evaluate.add_argument("--json", action="store_true", help="print the whole report as JSON")
    evaluate.add_argument("--plot", metavar="FILE.png", help="also draw the confusion matrix (needs matplotlib)")
    _on_error_option(evaluate)
    _base_options(evaluate)

    info = command("info", "Show a delta file's base model, classes, hyperparameters and fingerprint.")
    info.add_argument(
        "delta", help="delta file, a folder written by save_pretrained, or a Hub repository id (user/repo)"
    )

    models = command(
        "models", "List the open_clip models prolip supports, by tower family (builds each config without weights)."
    )
    models.add_argument("--all", action="store_true", help="also list refused and unbuildable configs, with reasons")
    models.add_argument("--json", action="store_true", help="print one JSON object per config")

    bench = command("bench", "Run the paper's evaluation protocol (few-shot, base-to-new, cross-dataset, DG).")
    bench.add_argument(
        "setting", choices=["few-shot", "base-to-new", "cross-dataset", "domain-generalisation"],
        help="the paper's setting to run (docs/bench.md): few-shot on 11 datasets; base-to-new; training on one "
        "source (ImageNet) and scoring others (cross-dataset) or its shifted variants (domain-generalisation)",
    )  # fmt: skip
    bench.add_argument(
        "--data-root", required=True, help="folder with the datasets in CoOp's layout (docs/datasets.md)"
    )
    bench.add_argument("--datasets", nargs="+", default=None, help="reader names (default: the paper's)")
    bench.add_argument("--shots", nargs="+", type=int, default=None, help="N values (default: 1 2 4 8 16, or 16)")
    bench.add_argument("--seeds", nargs="+", type=int, default=None, help="draw seeds (default: 1 2 3)")
    bench.add_argument(
        "--methods", nargs="+", default=None, help="bench methods (default: zero-shot prolip prolip-val linear-probe)"
    )
    bench.add_argument("--model", required=True, help="open_clip model name")
    bench.add_argument("--pretrained", required=True, help="open_clip tag or local checkpoint")
    bench.add_argument("--out-dir", required=True, help="results.json, table.md, plot.png and draws go here")
    bench.add_argument("--source", default=None, help="training dataset of cross-dataset / DG (default: imagenet)")
    bench.add_argument("--cache-dir", default=None, help="feature cache (default: OUT_DIR/cache)")
    bench.add_argument(
        "--views", type=int, default=300, help="augmented views per training image (default: %(default)s)"
    )
    bench.add_argument("--epochs", type=int, default=300, help="training steps (default: %(default)s)")
    bench.add_argument(
        "--templates", default=None, help="file of prompt templates, one per line (default: CoOp's per dataset)"
    )
    bench.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    bench.add_argument(
        "--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
        help="the backbone's precision for feature extraction; training keeps W in fp32 (default: %(default)s)",
    )  # fmt: skip
    bench.add_argument(
        "--plan", action="store_true", help="dry run: print images, trunk passes, cells, cache size and time, and exit"
    )

    merge = command("merge", "Write a full open_clip state dict whose projector is W0 + delta.")
    merge.add_argument(
        "delta", help="delta file, a folder written by save_pretrained, or a Hub repository id (user/repo)"
    )
    merge.add_argument("--out", required=True, help="output .safetensors, loadable with open_clip pretrained=PATH")
    merge.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "fp16", "bf16"],
        help="of the written model (default: %(default)s)",
    )
    _base_options(merge)

    export = command("export", "Write a standalone classifier file: preprocessed images to class probabilities.")
    export.add_argument(
        "delta", help="delta file, a folder written by save_pretrained, or a Hub repository id (user/repo)"
    )
    export.add_argument("--out", required=True, help="the file to write (its JSON description goes beside it)")
    export.add_argument(
        "--format", default="onnx", choices=["onnx", "pt2"], help="ONNX or torch.export (default: %(default)s)"
    )
    _base_options(export)

    official = command("import-official", "Turn a checkpoint saved by the authors' code (ProLIP) into a prolip delta.")
    official.add_argument("file", help="the official .pth projector file (read weights-only: nothing is unpickled)")
    official.add_argument("--model", required=True, help="the open_clip model it was trained on (e.g. RN50, ViT-B-16)")
    official.add_argument(
        "--pretrained", default="openai", help="its pretrained tag or checkpoint (default: %(default)s)"
    )
    names = official.add_mutually_exclusive_group(required=True)
    names.add_argument("--classes", nargs="+", metavar="NAME", help="the class names, in the official label order")
    names.add_argument("--classes-file", help="file of class names, one per line, in the official label order")
    official.add_argument("--template", action="append", dest="templates", help="prompt template with {} (repeatable)")
    official.add_argument("--templates", dest="templates_file", default=None, help="file of prompt templates")
    official.add_argument("--n-shots", type=float, default=None, help="N, if the path does not say (<N>_shot)")
    official.add_argument("--reg-lambda", type=_reg_lambda, default=None, help="the λ it was trained with (recorded)")
    official.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="backbone precision")
    official.add_argument("--out", required=True, help="where to write the delta (.safetensors)")
    return parser


def _on_error_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--on-error", default="raise", choices=["raise", "skip"],
        help="an unreadable image: stop with its name (raise, default) or leave it out, counted and named (skip)",
    )  # fmt: skip


def _base_options(p: argparse.ArgumentParser) -> None:
    """Options choosing the base model a delta is loaded onto."""
    p.add_argument("--model", default=None, help="base model name, if not the one recorded in the delta")
    p.add_argument("--pretrained", default=None, help="base tag or checkpoint, if not the one recorded in the delta")
    p.add_argument(
        "--no-strict", action="store_true",
        help="load a delta onto a base model other than the one its fingerprint records (warns instead of refusing)",
    )  # fmt: skip
    p.add_argument(
        "--trust-file-model",
        action="store_true",
        help="let the delta choose a base model that is not an open_clip model and tag (see docs/security.md)",
    )


def _load(args: argparse.Namespace):
    """The classifier ``args.delta`` holds (a file, a folder or a Hub repository id), by its kind's estimator
    (:data:`prolip.files.hub.ESTIMATORS`); a linear adapter, which classifies embeddings, as a ModelRLA."""
    from prolip.files.delta import read_metadata
    from prolip.files.hub import estimator_for, resolve
    from prolip.variants.linear_adapter import ModelRLA

    path = resolve(args.delta)
    kind = read_metadata(path)["kind"]
    loader = ModelRLA.load if kind == "linear_adapter" else estimator_for(kind).load
    strict = {} if kind == "linear_adapter" else {"strict": not args.no_strict}  # an adapter's base is always checked
    return loader(
        path,
        **strict,
        model=args.model,
        pretrained=args.pretrained,
        trust_file_model=args.trust_file_model,
        device=args.device,
        verbose=not args.quiet,
        on_error=getattr(args, "on_error", "raise"),
    )


def _readable(call: Callable[[list[str]], Any], images: list[str]) -> tuple[Any, list[int]]:
    """``call(images)`` and the positions of the images it used: those its SkippedImagesWarning did not name.

    The warning is shown once (one log line counting and naming the skipped images), as the library gives it.
    """
    import warnings

    from prolip.errors import SkippedImagesWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedImagesWarning)
        out = call(images)
    skipped = set()
    for w in caught:
        if issubclass(w.category, SkippedImagesWarning):
            skipped.update(s.index for s in w.message.skipped)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out, [i for i in range(len(images)) if i not in skipped]


def _local(name: str) -> list[str]:
    """The delta argument as an input path to protect, when it is a local file or folder (not a Hub id)."""
    from prolip.files.hub import DELTA_FILENAME

    path = Path(name)
    return [str(path / DELTA_FILENAME) if path.is_dir() else str(path)] if path.exists() else []


def _fit(args: argparse.Namespace) -> None:
    from prolip.adapter import ProLIPAdapter
    from prolip.atomic import check_output
    from prolip.datasets.generic import read_labelled, sample_shots
    from prolip.errors import InputError
    from prolip.params import TARGETS

    if (args.data is None) == (args.hf_dataset is None):
        raise InputError("give either DATA (an image folder or CSV) or --hf-dataset DIR, not both or neither.")
    check_output(args.out, what="--out")  # before any image is read, not after the training
    if args.hf_dataset is not None:
        paths, labels = _hf_training_set(args), None  # the dataset brings its labels (and ClassLabel names)
    else:
        paths, labels = read_labelled(args.data)
        if args.shots is not None:
            paths, labels = sample_shots(paths, labels, args.shots, seed=args.seed)
    adapter = ProLIPAdapter(
        args.model,
        args.pretrained,
        templates=args.templates,
        lr=args.lr,
        reg_lambda=args.reg_lambda,
        epochs=args.epochs,
        views=args.views,
        batch_size=args.batch_size,
        device=args.device,
        random_state=args.seed,
        verbose=not args.quiet,
        cache_dir=args.cache_dir,
        target=args.variant if args.variant in TARGETS else "image",
        taskres_alpha=args.taskres_alpha if args.variant == "image+taskres" else None,
        train_dtype=args.train_dtype,
        on_error=args.on_error,
    )
    if args.search and (args.val is None or args.variant != "image"):
        raise InputError(
            "--search chooses lr and λ on --val for the image projector: give --val DIR (and no --variant)."
        )
    val_paths = val_labels = None
    if args.val is not None:
        val_paths, val_labels = read_labelled(args.val)
        if args.val_shots is not None:
            val_paths, val_labels = sample_shots(val_paths, val_labels, args.val_shots, seed=args.seed)
    if args.variant == "rla":  # the adapter only embeds the images; the linear adapter trains on the embeddings
        from prolip.variants.linear_adapter import ModelRLA

        fitted = summary = ModelRLA.fit(adapter, paths, labels).rla
        scorer = None
    elif args.variant == "image+tip-adapter":
        from prolip.variants.tip_cache import ProLIPTipAdapter

        fitted = ProLIPTipAdapter(adapter, alpha=args.tip_alpha, beta=args.tip_beta, keys=args.tip_keys)
        fitted.fit(paths, labels, val_paths, val_labels)
        summary = scorer = fitted.adapter_
    elif args.search:
        from prolip.variants.search import ProLIPSearch

        fitted = ProLIPSearch(adapter).fit(paths, labels, val_paths, val_labels)
        summary = scorer = fitted.best_estimator_
        chosen = fitted.best_params_
        if not args.quiet:
            print(f"chose lr={chosen['lr']:g}, lambda={chosen['reg_lambda']:g} on {args.val} (the paper's grid)")
    else:
        fitted = summary = scorer = adapter.fit(paths, labels)
    fitted.save(args.out)
    if not args.quiet:
        print(f"saved {args.out}: {len(summary.classes_)} classes, {len(paths)} images (N={summary.n_shots_:g})")
        if val_paths is not None and scorer is not None:
            print(f"accuracy on {args.val}: {fitted.score(val_paths, val_labels):.4f} ({len(val_paths)} images)")


def _hf_training_set(args: argparse.Namespace):
    """``--hf-dataset``: the dataset on disk, ``--shots`` per class drawn as for a folder."""
    from prolip.datasets.generic import sample_shots
    from prolip.features.dataset_objects import load_hf_dataset

    data = load_hf_dataset(args.hf_dataset, split=args.split)
    if args.shots is None:
        return data
    labels = data.labels()
    chosen, _ = sample_shots(list(range(len(labels))), labels, args.shots, seed=args.seed)
    return data.select(chosen)


def _escaped(text: str) -> str:
    """``text`` with its control characters escaped (``\\x1b``, ``\\n``): no terminal escape sequences, no forged lines."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class _EscapingStdout:
    """sys.stdout for commands that print text from files: each ``print`` argument escaped, its line end kept."""

    def __init__(self, out: Any) -> None:
        self.out = out

    def write(self, text: str) -> int:
        return self.out.write(text if text == "\n" else _escaped(text))  # print writes its end separately

    def __getattr__(self, name: str) -> Any:
        return getattr(self.out, name)


def _escaping_output(command: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """Run ``command`` with its printed text escaped (:class:`_EscapingStdout`)."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> None:
        out, sys.stdout = sys.stdout, _EscapingStdout(sys.stdout)
        try:
            command(args)
        finally:
            sys.stdout = out

    return run


def _predict(args: argparse.Namespace) -> None:
    import numpy as np

    from prolip.datasets.generic import read_images

    images = read_images(args.images)  # a bad folder or CSV fails before the model loads
    adapter = _load(args)
    predictor = adapter
    if args.classes or args.classes_file or args.templates:
        predictor = _open_vocabulary(args, adapter)
    if args.test_time:
        from prolip.adapter import ProLIPAdapter
        from prolip.variants.test_time import TestTimeProLIP

        if not isinstance(adapter, ProLIPAdapter):
            raise ProLIPError(
                f"{args.delta!r} is not a plain ProLIP delta ({type(adapter).__name__}); "
                "--test-time adapts a ProLIP projector delta."
            )

        predictor = TestTimeProLIP(
            adapter,
            start=args.tt_start,
            views=args.tt_views,
            rho=args.tt_rho,
            steps=args.tt_steps,
            lr=args.tt_lr,
            optimizer=args.tt_optimizer,
            random_state=args.tt_seed,
            templates=args.tt_templates,
            verbose=not args.quiet,
        )
    proba, kept = _readable(predictor.predict_proba, images)
    images = [images[i] for i in kept]
    classes = predictor.classes_.tolist()
    if not np.isfinite(np.asarray(proba, dtype=np.float64)).all():  # never print NaN (invalid JSON) as a result
        raise ProLIPError(
            f"{args.delta!r} gives non-finite probabilities on these images; the file holds values "
            "no training produces (see docs/format.md): it is damaged or was edited."
        )
    if args.json:
        rows = [
            {
                "image": path,
                "label": classes[p.argmax()],
                "probabilities": dict(zip(map(str, classes), p.tolist(), strict=True)),
            }
            for path, p in zip(images, proba, strict=True)
        ]
        print(json.dumps(rows, indent=2, allow_nan=False))
    else:
        for path, p in zip(images, proba, strict=True):
            print(f"{_escaped(path)}\t{_escaped(str(classes[p.argmax()]))}\t{p.max():.3f}")  # tabs kept as separators


def _open_vocabulary(args: argparse.Namespace, adapter):
    """``--classes``/``--classes-file``/``--template``: the delta's adapted projector scoring those names."""
    from prolip.adapter import ProLIPAdapter
    from prolip.datasets.templates import read_class_names
    from prolip.variants.open_vocab import OpenVocabularyClassifier

    if args.test_time or not isinstance(adapter, ProLIPAdapter):
        what = "--test-time" if args.test_time else f"{args.delta!r} ({type(adapter).__name__})"
        raise ProLIPError(f"--classes, --classes-file and --template score a plain ProLIP delta; not with {what}.")
    names = read_class_names(args.classes_file) if args.classes_file else args.classes or adapter.class_names_
    return OpenVocabularyClassifier(adapter, names, args.templates)


def _eval(args: argparse.Namespace) -> None:
    from prolip.datasets.generic import read_labelled
    from prolip.training.metrics import classification_report

    paths, labels = [], []
    for source in args.data:
        more_paths, more_labels = read_labelled(source)
        paths, labels = paths + more_paths, labels + more_labels
    if args.plot:
        from prolip.atomic import check_output

        check_output(args.plot, what="--plot")
        _pyplot()  # a missing matplotlib fails before the model loads
    adapter = _load(args)
    classes = [str(c) for c in adapter.classes_.tolist()]
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ProLIPError(
            f"{' '.join(map(repr, args.data))} hold labels the delta does not know: {unknown}; its classes are {classes}."
        )
    (predicted, zero_shot), kept = _readable(lambda images: _predictions(adapter, images), paths)
    skipped = len(paths) - len(kept)
    paths, labels = [paths[i] for i in kept], [labels[i] for i in kept]
    report = classification_report(labels, [str(p) for p in predicted], classes)
    base = None if zero_shot is None else classification_report(labels, [str(p) for p in zero_shot], classes)
    wrong = [
        {"image": path, "true": truth, "predicted": str(guess)}
        for path, truth, guess in zip(paths, labels, predicted, strict=True)
        if str(guess) != truth
    ]
    if args.plot:
        _plot_confusion(report, args.plot, f"{Path(args.delta).name}: accuracy {report.accuracy:.4f}")
    if args.json:
        zero = None if base is None else base.accuracy
        out = {**report.as_dict(), "images": len(paths), "skipped": skipped, "zero_shot_accuracy": zero}
        print(json.dumps({**out, "misclassified": wrong}, indent=2, allow_nan=False))
        return
    _print_report(report, base, wrong, skipped)


def _predictions(adapter: Any, images: list[str]) -> tuple[list[Any], list[Any] | None]:
    """The adapted model's predictions of ``images`` and, for a ProLIP fit, the zero-shot model's (W0 and the
    zero-shot T of the same classes and templates) on the same features: whether the fit helped."""
    import torch

    from prolip.adapter import ProLIPAdapter
    from prolip.variants.tip_cache import ProLIPTipAdapter

    base = adapter.adapter_ if isinstance(adapter, ProLIPTipAdapter) else adapter
    if not isinstance(base, ProLIPAdapter):  # a linear adapter on embeddings: no zero-shot of its own here
        return list(adapter.predict(images)), None
    features = base.extract(images, views=0).features
    logits = adapter.logits_from_features(features)
    backbone, state = base.backbone, base.fitted_
    classifier = backbone.classifier(list(state.class_names), list(state.templates))
    with torch.inference_mode():
        rows = features[0].to(backbone.device, torch.float32)
        zero = backbone.projector.head.logits(rows, classifier.to(backbone.device), state.logit_scale).cpu()
    classes = base.classes_
    return list(classes[logits.argmax(dim=1).numpy()]), list(classes[zero.argmax(dim=1).numpy()])


def _print_report(report: Any, base: Any, wrong: list[dict[str, str]], skipped: int) -> None:
    """``prolip eval``'s text report (labels and file names escaped: they come from files)."""
    n = sum(map(sum, report.confusion))
    correct = sum(report.confusion[k][k] for k in range(len(report.classes)))
    print(
        f"accuracy: {report.accuracy:.4f} ({correct}/{n})"
        + (f"; {skipped} unreadable images left out" if skipped else "")
    )
    if base is not None:
        change = report.accuracy - base.accuracy
        print(f"zero-shot accuracy (the same model without the fit): {base.accuracy:.4f} ({change:+.4f} from the fit)")
    print(f"balanced accuracy: {report.balanced_accuracy:.4f}; macro precision {report.macro_precision:.4f}, "
          f"recall {report.macro_recall:.4f}, F1 {report.macro_f1:.4f}")  # fmt: skip
    names = [_escaped(str(c)) for c in report.classes]
    width = max(5, *map(len, names))
    print(f"  {'class':<{width}}  precision  recall      F1  support")
    for name, row in zip(names, report.per_class, strict=True):
        cells = [f"{v:9.4f}" if v is not None else f"{'-':>9}" for v in (row.precision, row.recall, row.f1)]
        print(f"  {name:<{width}}  {cells[0]} {cells[1][1:]} {cells[2][1:]}  {row.support:7d}")
    print("confusion matrix (rows: true, columns: predicted):")
    cell = max(5, *(len(str(v)) for row in report.confusion for v in row)) + 1
    print(" " * (width + 2) + "".join(f"{k:>{cell}}" for k in range(len(report.classes))))
    for k, c in enumerate(names):
        print(f"  {c:<{width}}" + "".join(f"{v:>{cell}}" for v in report.confusion[k]) + f"   [{k}]")
    if wrong:
        print(f"misclassified ({len(wrong)}):")
        for row in wrong[:50]:
            print(
                "  "
                + "\t".join(_escaped(v) for v in (row["image"], f"true {row['true']}", f"predicted {row['predicted']}"))
            )
        if len(wrong) > 50:
            print(f"  ... and {len(wrong) - 50} more (--json lists them all)")


def _pyplot() -> Any:
    """matplotlib's pyplot for ``--plot``, or the install hint as an error."""
    from prolip.figures import INSTALL_HINT, pyplot

    plt = pyplot()
    if plt is None:
        raise ProLIPError(f"--plot needs matplotlib: {INSTALL_HINT}")
    return plt


def _plot_confusion(report: Any, path: str, title: str) -> None:
    """The confusion matrix as a picture: rows true, columns predicted, each row as fractions of its images."""
    from prolip.figures import write_png

    plt = _pyplot()
    k = len(report.classes)
    rows = [[v / max(1, sum(row)) for v in row] for row in report.confusion]
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * k, 1.0 + 0.5 * k), dpi=110)
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    labels = [str(c) for c in report.classes]
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for t in range(k):
        for p_ in range(k):
            if report.confusion[t][p_]:
                ax.text(p_, t, str(report.confusion[t][p_]), ha="center", va="center",
                        color="white" if rows[t][p_] > 0.5 else "black", fontsize=8)  # fmt: skip
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    write_png(plt, fig, path)


@_escaping_output
def _info(args: argparse.Namespace) -> None:
    from prolip.files.delta import read_metadata, read_state
    from prolip.files.hub import estimator_name, resolve

    path = resolve(args.delta)
    state, meta = read_state(path), read_metadata(path)
    print(f"file:              {path}")
    print(f"format:            {meta['format']} v{meta['format_version']} (prolip {meta['prolip_version']})")
    print(f"kind:              {state.kind} (read by {estimator_name(state.kind)})")
    if state.kind == "linear_adapter":
        print(f"embeddings of:     {state.model_name or '(outside open_clip)'}  pretrained={state.pretrained or '-'}")
        print(f"adapter:           A = I + delta, {tuple(state.delta.shape)}")
    else:
        shape = "(not trained)" if state.delta is None else tuple(state.delta.shape)
        print(f"target:            {state.target}")
        print(f"base model:        {state.model_name or '(a model object)'}  pretrained={state.pretrained or '-'}")
        print(f"projector:         {state.projector_key} {shape} ({state.projector_family})")
        print(f"base fingerprint:  {state.fingerprint.summary()}")
        if state.text_delta is not None:
            text = f"{state.text_projector_key} {tuple(state.text_delta.shape)} ({state.text_projector_family})"
            print(f"text projection:   {text}")
            print(f"text fingerprint:  {state.text_fingerprint.summary('W_t0')}")
        if state.cache is not None:
            cache = state.cache
            chosen = "given" if cache.selection is None else f"val accuracy {cache.selection['val_accuracy']:.4f}"
            print(f"tip-adapter cache: {tuple(cache.keys.shape)} keys (mean of {cache.key_views} views)")
            print(f"cache alpha, beta: {cache.alpha:g}, {cache.beta:g} ({chosen})")
    print(
        f"classes ({len(state.classes)}):       "
        + ", ".join(
            f"{c!s}" + (f" ({n})" if str(c) != n else "") for c, n in zip(state.classes, state.class_names, strict=True)
        )
    )
    print(f"templates:         {list(state.templates)}")
    print(f"shots per class:   {state.n_shots:g}")
    print(f"lambda used:       {state.reg_lambda:g}")
    print(f"logit scale:       {state.logit_scale:g}")
    print(f"hyperparameters:   {json.dumps(dict(state.hyperparameters))}")
    for name, delta in (("delta", state.delta), ("text delta", state.text_delta)):
        if delta is not None:
            print(f"{name + ' norm:':<19}{float(delta.norm()):.6g}")


def _merge(args: argparse.Namespace) -> None:
    from safetensors.torch import save

    from prolip.adapter import ProLIPAdapter
    from prolip.atomic import atomic_write, check_output
    from prolip.model.transformers_clip import is_transformers_model, unwrap
    from prolip.variants.linear_adapter import ModelRLA

    adapter = _load(args)
    if isinstance(adapter, ModelRLA):
        raise ProLIPError(f"{args.delta!r} holds a linear adapter on image embeddings; there is no weight to merge.")
    transformers = isinstance(adapter, ProLIPAdapter) and is_transformers_model(unwrap(adapter.backbone.model))
    check_output(args.out, inputs=_local(args.delta), what="--out", folder=transformers)
    if not isinstance(adapter, ProLIPAdapter):
        raise ProLIPError(
            f"{args.delta!r} holds ProLIP + Tip-Adapter: its cache model is not a weight of the model, and a merged "
            "model would predict without it. Use the file itself with 'prolip predict' or ProLIPTipAdapter.load."
        )
    if adapter.taskres_alpha is not None:
        raise ProLIPError(
            f"{args.delta!r} holds ProLIP + TaskRes: its residual lives in the stored classifier, not in a weight of "
            "the model, and a merged model would predict without it. Use the file itself with 'prolip predict' "
            "or ProLIPAdapter.load."
        )
    merged = adapter.merged_model(precision=args.precision)
    if is_transformers_model(merged):  # a Hugging Face model: a from_pretrained folder, not a checkpoint file
        try:
            merged.save_pretrained(args.out)
        except Exception as exc:  # a full disk or a read-only folder, as transformers and safetensors raise them
            raise ProLIPError(f"cannot write the merged model to {args.out!r}: {type(exc).__name__}: {exc}.") from None
        if not args.quiet:
            print(f"wrote {args.out}: the transformers model with its projector adapted; load it with from_pretrained")
        return
    state = {k: v.detach().cpu().contiguous().clone() for k, v in merged.state_dict().items()}
    atomic_write(args.out, [save(state)])
    if not args.quiet:
        print(f"wrote {args.out}: the full model with its projector adapted; load it with open_clip pretrained=PATH")


def _export(args: argparse.Namespace) -> None:
    from prolip.adapter import ProLIPAdapter
    from prolip.atomic import check_output

    for target in (args.out, f"{args.out}.json"):
        check_output(target, inputs=_local(args.delta), what="--out")
    adapter = _load(args)
    if not isinstance(adapter, ProLIPAdapter):
        raise ProLIPError(
            f"{args.delta!r} holds a {type(adapter).__name__}, not a plain ProLIP delta; only those export "
            "(a linear adapter or a Tip-Adapter cache is not part of the vision tower)."
        )
    model, sidecar = adapter.export(args.out, args.format)
    if not args.quiet:
        print(f"wrote {model} ({args.format}: images [B, 3, H, W] to class probabilities) and {sidecar}")


def _import_official(args: argparse.Namespace) -> None:
    from prolip.atomic import check_output
    from prolip.datasets.templates import read_class_names, read_templates
    from prolip.files.delta import write_delta
    from prolip.files.official import import_official
    from prolip.model.backbone import build_backbone

    check_output(args.out, inputs=[args.file], what="--out")
    names = read_class_names(args.classes_file) if args.classes_file else args.classes
    templates = read_templates(args.templates_file) if args.templates_file else args.templates
    backbone = build_backbone(args.model, args.pretrained, precision=args.precision, device=args.device)
    state = import_official(args.file, backbone, names, templates, n_shots=args.n_shots, reg_lambda=args.reg_lambda)
    write_delta(args.out, state)
    if not args.quiet:
        print(f"wrote {args.out}: {len(state.classes)} classes (N={state.n_shots:g}) from {args.file}")


def _models(args: argparse.Namespace) -> None:
    import dataclasses

    from prolip.model.towers.survey import survey_models

    reports = survey_models(verbose=not args.quiet)
    shown = [r for r in reports if args.all or r.status == "supported"]
    if args.json:
        for report in shown:
            print(json.dumps(dataclasses.asdict(report)))
        return
    by_family: dict[str, list[str]] = {}
    for report in shown:
        if report.status == "supported":
            by_family.setdefault(report.family, []).append(report.name)
    print("supported, by tower family:")
    for family, names in by_family.items():
        print(f"  {family} ({len(names)}): {', '.join(names)}")
    titles = {"refused": "built, but no projector prolip can train", "unbuildable": "not buildable offline here"}
    for status, title in titles.items():
        rows = [r for r in shown if r.status == status]
        if rows:
            print(f"{title} ({len(rows)}):")
            for report in rows:
                print(f"  {report.name}: {report.note.splitlines()[0][:200] if report.note else '-'}")
    counts = {s: sum(r.status == s for r in reports) for s in ("supported", "refused", "unbuildable")}
    print(
        f"{counts['supported']} of {len(reports)} open_clip configs supported, {counts['refused']} refused, "
        f"{counts['unbuildable']} not buildable offline (see docs/models.md; --all lists the others)"
    )


def _bench(args: argparse.Namespace) -> None:
    from prolip.bench.config import DEFAULT_METHODS, BenchConfig
    from prolip.bench.runner import run_bench
    from prolip.datasets import read_templates

    config = BenchConfig(  # one configuration for the run and its --plan
        args.setting, args.data_root, args.out_dir, args.model, args.pretrained, datasets=args.datasets,
        shots=args.shots, seeds=args.seeds, methods=args.methods or DEFAULT_METHODS, source=args.source,
        cache_dir=args.cache_dir, views=args.views, epochs=args.epochs,
        templates=read_templates(args.templates) if args.templates else None, device=args.device,
        precision=args.precision, batch_size=args.batch_size, verbose=not args.quiet,
    )  # fmt: skip
    if args.plan:
        from prolip.bench.estimate import estimate_bench

        print(estimate_bench(config).report(int(os.environ.get("WORLD_SIZE", 1))))
        return
    run_bench(config)
    if not args.quiet and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 prints
        print((Path(args.out_dir) / "table.md").read_text(encoding="utf-8"))


_COMMANDS = {
    "fit": _fit,
    "predict": _predict,
    "eval": _eval,
    "info": _info,
    "models": _models,
    "bench": _bench,
    "merge": _merge,
    "export": _export,
    "import-official": _import_official,
}


_FLAGS = (
    ("pass strict=False", "pass --no-strict"),
    ("Pass model= and pretrained= yourself, or trust_file_model=True", "Pass --model and --pretrained yourself, or "
     "--trust-file-model"),
    ("Pass pretrained=", "Pass --pretrained"),
    ("pass on_error='skip'", "pass --on-error skip"),
    ("on_error='skip'", "--on-error skip"),
)  # fmt: skip
"""The library's messages name Python arguments; on the command line they name the flags that do the same."""


def _in_flags(message: str) -> str:
    for python, flag in _FLAGS:
        message = message.replace(python, flag)
    return message


class _EscapingFormatter(logging.Formatter):
    """Log lines with their control characters escaped: a file name cannot forge lines or send terminal escapes."""

    def format(self, record: logging.LogRecord) -> str:
        return _escaped(_in_flags(super().format(record)))


def _configure_logging(*, quiet: bool, verbose: bool) -> None:
    """prolip's own messages at INFO (WARNING with --quiet); other libraries' (open_clip's) only with --verbose.

    Hugging Face's progress bars (transformers, huggingface_hub, datasets) are off with --quiet and when stderr is
    not a terminal, as prolip's own are.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_EscapingFormatter("%(message)s"))
    logging.getLogger("prolip").setLevel(logging.WARNING if quiet else logging.INFO)
    if quiet or not sys.stderr.isatty():
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when those libraries are imported, later


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prolip`` command; returns the process exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        from prolip._version import __version__

        print(f"prolip {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    _configure_logging(quiet=args.quiet, verbose=args.verbose)
    # Warnings as one log line each, not Python's two-line format; put back at the end, so that main() called from
    # Python (a notebook, a test) leaves the process's warnings as it found them.
    logging.captureWarnings(True)
    try:
        _COMMANDS[args.command](args)
    except ProLIPError as exc:
        print(f"prolip {args.command}: error: {_escaped(_in_flags(str(exc)))}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader left (`prolip info FILE | head -1`): stop quietly, as `cat` would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush must not fail again
        return 128 + 13  # killed by SIGPIPE, as the shell reports it
    except OSError as exc:  # a missing file, a full disk, a read-only folder: one line, not a traceback
        print(f"prolip {args.command}: error: {_escaped(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"prolip {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        logging.captureWarnings(False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
