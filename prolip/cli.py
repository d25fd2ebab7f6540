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
    "export": "example:\n  prolip export pets.safetensors --format onnx --out pets.onnx   # and pets.json beside it\n"
    "  prolip export pets.safetensors --format pt2 --out pets.pt2",
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
        help="instead of DATA: a Hugging Face dataset (save_to_disk folder or imagefolder; its train split)",
    )
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
    tip = fit.add_argument_group("ProLIP + Tip-Adapter (--variant image+tip-adapter)")
    tip.add_argument("--val", default=None, help="validation images (folder or CSV) to choose the cache's α and β on")
    tip.add_argument("--val-shots", type=int, default=None, help="validation images drawn per class (default: all)")
    tip.add_argument("--tip-alpha", type=float, default=None, help="fix α instead of searching it (with --tip-beta)")
    tip.add_argument("--tip-beta", type=float, default=None, help="fix β instead of searching it (with --tip-alpha)")
    tip.add_argument(
        "--tip-keys",
        default="cache",
        choices=["cache", "trained"],
        help="Tip-Adapter's keys, or Tip-Adapter-F's (fine-tuned) (default: %(default)s)",
    )

    predict = command("predict", "Predict the class of images with a saved delta.")
    predict.add_argument("delta", help="delta file, a folder written by save_pretrained, or a Hub repository id (user/repo)")
    predict.add_argument(
        "images", nargs="+", help="image files, folders of images (recursively) and/or CSV files of paths"
    )
    predict.add_argument("--json", action="store_true", help="print JSON with per-class probabilities")
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

    evaluate = command("eval", "Accuracy, per-class accuracy and confusion matrix on labelled images.")
    evaluate.add_argument("delta", help="delta file, a folder written by save_pretrained, or a Hub repository id (user/repo)")
    evaluate.add_argument("data", nargs="+", help="folders with one sub-folder per class and/or path,label CSV files")
    _base_options(evaluate)

    info = command("info", "Show a delta file's base model, classes, hyperparameters and fingerprint.")
    info.add_argument("delta", help="delta file, a folder written by save_pretrained, or a Hub repository id (user/repo)")

    models = command(
        "models", "List the open_clip models prolip supports, by tower family (builds each config without weights)."
    )
    models.add_argument("--all", action="store_true", help="also list refused and unbuildable configs, with reasons")
    models.add_argument("--json", action="store_true", help="print one JSON object per config")

    bench = command("bench", "Run the paper's evaluation protocol (few-shot, base-to-new, cross-dataset, DG).")
    bench.add_argument("setting", choices=["few-shot", "base-to-new", "cross-dataset", "domain-generalisation"])
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
    bench.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="(default: %(default)s)")
    bench.add_argument(
        "--plan", action="store_true", help="dry run: print images, trunk passes, cells, cache size and time, and exit"
    )

    merge = command("merge", "Write a full open_clip state dict whose projector is W0 + delta.")
    merge.add_argument("delta", help="delta file, a folder written by save_pretrained, or a Hub repository id (user/repo)")
    merge.add_argument("--out", required=True, help="output .safetensors, loadable with open_clip pretrained=PATH")
    merge.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "fp16", "bf16"],
        help="of the written model (default: %(default)s)",
    )
    _base_options(merge)

    export = command("export", "Write a standalone classifier file: preprocessed images to class probabilities.")
    export.add_argument("delta", help="delta file, a folder written by save_pretrained, or a Hub repository id (user/repo)")
    export.add_argument("--out", required=True, help="the file to write (its JSON description goes beside it)")
    export.add_argument(
        "--format", default="onnx", choices=["onnx", "pt2"], help="ONNX or torch.export (default: %(default)s)"
    )
    _base_options(export)
    return parser


def _base_options(p: argparse.ArgumentParser) -> None:
    """Options choosing the base model a delta is loaded onto."""
    p.add_argument("--model", default=None, help="base model name, if not the one recorded in the delta")
    p.add_argument("--pretrained", default=None, help="base tag or checkpoint, if not the one recorded in the delta")
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
    return loader(
        path,
        model=args.model,
        pretrained=args.pretrained,
        trust_file_model=args.trust_file_model,
        device=args.device,
        verbose=not args.quiet,
    )


def _fit(args: argparse.Namespace) -> None:
    from prolip.adapter import ProLIPAdapter
    from prolip.datasets.generic import read_labelled, sample_shots
    from prolip.errors import InputError
    from prolip.params import TARGETS

    if (args.data is None) == (args.hf_dataset is None):
        raise InputError("give either DATA (an image folder or CSV) or --hf-dataset DIR, not both or neither.")
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
    )
    if args.variant == "rla":  # the adapter only embeds the images; the linear adapter trains on the embeddings
        from prolip.variants.linear_adapter import ModelRLA

        fitted = summary = ModelRLA.fit(adapter, paths, labels).rla
    elif args.variant == "image+tip-adapter":
        from prolip.variants.tip_cache import ProLIPTipAdapter

        val_paths = val_labels = None
        if args.val is not None:
            val_paths, val_labels = read_labelled(args.val)
            if args.val_shots is not None:
                val_paths, val_labels = sample_shots(val_paths, val_labels, args.val_shots, seed=args.seed)
        fitted = ProLIPTipAdapter(adapter, alpha=args.tip_alpha, beta=args.tip_beta, keys=args.tip_keys)
        fitted.fit(paths, labels, val_paths, val_labels)
        summary = fitted.adapter_
    else:
        fitted = summary = adapter.fit(paths, labels)
    fitted.save(args.out)
    if not args.quiet:
        print(f"saved {args.out}: {len(summary.classes_)} classes, {len(paths)} images (N={summary.n_shots_:g})")


def _hf_training_set(args: argparse.Namespace):
    """``--hf-dataset``: the dataset on disk, ``--shots`` per class drawn as for a folder."""
    from prolip.datasets.generic import sample_shots
    from prolip.features.dataset_objects import load_hf_dataset

    data = load_hf_dataset(args.hf_dataset)
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
    proba = predictor.predict_proba(images)
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


@_escaping_output
def _eval(args: argparse.Namespace) -> None:
    from prolip.datasets.generic import read_labelled

    paths, labels = [], []
    for source in args.data:
        more_paths, more_labels = read_labelled(source)
        paths, labels = paths + more_paths, labels + more_labels
    adapter = _load(args)
    classes = [str(c) for c in adapter.classes_.tolist()]
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ProLIPError(
            f"{' '.join(map(repr, args.data))} hold labels the delta does not know: {unknown}; its classes are {classes}."
        )
    predicted = [str(p) for p in adapter.predict(paths)]
    index = {c: k for k, c in enumerate(classes)}
    confusion = [[0] * len(classes) for _ in classes]
    for truth, guess in zip(labels, predicted, strict=True):
        confusion[index[truth]][index[guess]] += 1
    correct = sum(confusion[k][k] for k in range(len(classes)))
    print(f"accuracy: {correct / len(labels):.4f} ({correct}/{len(labels)})")
    print("per-class accuracy:")
    width = max(len(c) for c in classes)
    for k, c in enumerate(classes):
        total = sum(confusion[k])
        print(
            f"  {c:<{width}}  {confusion[k][k] / total:.4f} ({confusion[k][k]}/{total})"
            if total
            else f"  {c:<{width}}  -"
        )
    print("confusion matrix (rows: true, columns: predicted):")
    cell = max(5, *(len(str(v)) for row in confusion for v in row)) + 1
    print(" " * (width + 2) + "".join(f"{k:>{cell}}" for k in range(len(classes))))
    for k, c in enumerate(classes):
        print(f"  {c:<{width}}" + "".join(f"{v:>{cell}}" for v in confusion[k]) + f"   [{k}]")


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
    from prolip.atomic import atomic_write
    from prolip.model.transformers_clip import is_transformers_model
    from prolip.variants.linear_adapter import ModelRLA

    adapter = _load(args)
    if isinstance(adapter, ModelRLA):
        raise ProLIPError(f"{args.delta!r} holds a linear adapter on image embeddings; there is no weight to merge.")
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
        merged.save_pretrained(args.out)
        if not args.quiet:
            print(f"wrote {args.out}: the transformers model with its projector adapted; load it with from_pretrained")
        return
    state = {k: v.detach().cpu().contiguous().clone() for k, v in merged.state_dict().items()}
    atomic_write(args.out, [save(state)])
    if not args.quiet:
        print(f"wrote {args.out}: the full model with its projector adapted; load it with open_clip pretrained=PATH")


def _export(args: argparse.Namespace) -> None:
    from prolip.adapter import ProLIPAdapter

    adapter = _load(args)
    if not isinstance(adapter, ProLIPAdapter):
        raise ProLIPError(
            f"{args.delta!r} holds a {type(adapter).__name__}, not a plain ProLIP delta; only those export "
            "(a linear adapter or a Tip-Adapter cache is not part of the vision tower)."
        )
    model, sidecar = adapter.export(args.out, args.format)
    if not args.quiet:
        print(f"wrote {model} ({args.format}: images [B, 3, H, W] to class probabilities) and {sidecar}")


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
        by_family.setdefault(report.family or report.status, []).append(report.name)
    for family, names in by_family.items():
        print(f"{family} ({len(names)}): {', '.join(names)}")
    for report in shown:
        if report.status != "supported":
            print(f"  {report.name}: {report.status}: {report.note}")
    supported = sum(r.status == "supported" for r in reports)
    print(f"{supported} of {len(reports)} open_clip configs supported (see docs/models.md)")


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
}


def _configure_logging(*, quiet: bool, verbose: bool) -> None:
    """prolip's own messages at INFO (WARNING with --quiet); other libraries' (open_clip's) only with --verbose."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("prolip").setLevel(logging.WARNING if quiet else logging.INFO)
    logging.captureWarnings(True)  # warnings as one log line each, not Python's two-line format


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
    try:
        _COMMANDS[args.command](args)
    except ProLIPError as exc:
        print(f"prolip {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader left (`prolip info FILE | head -1`): stop quietly, as `cat` would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush must not fail again
        return 128 + 13  # killed by SIGPIPE, as the shell reports it
    except OSError as exc:  # a missing file, a full disk, a read-only folder: one line, not a traceback
        print(f"prolip {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"prolip {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
