"""The exported standalone classifier against the merged open_clip model: file size and latency at batch 1 and 32.

One open_clip model (``--model``; random weights, ``pretrained=None``: size and speed do not depend on them) and
one fitted delta (``--classes`` classes, trained on random features). Three ways to turn
preprocessed pixels ``[B, 3, H, W]`` into class probabilities, measured in one run, best of
``--repeats``, interleaved:

* ``open_clip``: the merged model (``adapter.merged_model()``, fp32) — ``encode_image``, then
  ``softmax(s · normalize(z) · Tᵀ)`` in torch;
* ``pt2``: the ``torch.export`` file, ``torch.export.load(path).module()``;
* ``onnx``: the ONNX file in onnxruntime (CPU execution provider).

Sizes: the exported files on disk, and the merged model's full state dict (both towers, fp32),
which is what ``prolip merge`` writes. Prints ratios to ``open_clip``.

Run: ``.venv/bin/python benchmarks/bench_export.py`` (a few minutes on 2 CPU cores, mostly the exports).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import best_of

from prolip import ProLIPAdapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=10, help="(default: %(default)s)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime CPU threads")
    parser.add_argument("--repeats", type=int, default=5, help="(default: %(default)s)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime

    torch.manual_seed(0)
    adapter = ProLIPAdapter(args.model, pretrained=None, epochs=5, device="cpu", verbose=False)
    gen = torch.Generator().manual_seed(0)
    labels = [f"class {i % args.classes}" for i in range(4 * args.classes)]
    adapter.fit_features(torch.randn(3, len(labels), adapter.backbone.projector.in_features, generator=gen), labels)
    merged, state = adapter.merged_model(), adapter.fitted_
    classifier = state.classifier

    def open_clip_probabilities(pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            z = F.normalize(merged.encode_image(pixels), dim=-1)
            return torch.softmax(state.logit_scale * z @ classifier.t(), dim=-1)

    with tempfile.TemporaryDirectory() as tmp:
        seconds, paths = {}, {}
        for fmt in ("pt2", "onnx"):
            start = time.perf_counter()
            paths[fmt], _ = adapter.export(Path(tmp) / f"classifier.{fmt}", fmt)
            seconds[fmt] = time.perf_counter() - start
        sizes = {fmt: path.stat().st_size for fmt, path in paths.items()}
        program = torch.export.load(paths["pt2"]).module()
        options = onnxruntime.SessionOptions()
        if args.threads:
            options.intra_op_num_threads = args.threads
        session = onnxruntime.InferenceSession(str(paths["onnx"]), options, providers=["CPUExecutionProvider"])
    sizes["open_clip"] = sum(t.numel() * t.element_size() for t in merged.state_dict().values())

    def pt2_probabilities(pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return program(pixels)

    size = adapter.backbone.view_config.size
    print(f"{args.model} (random weights) on CPU ({torch.get_num_threads()} threads), {args.classes} classes; "
          f"export {seconds['pt2']:.1f} s (pt2), {seconds['onnx']:.1f} s (onnx)")  # fmt: skip
    print(
        f"{'what':>10} {'size MB':>8} {'÷ open_clip':>11}"
        + "".join(f" {f'B={b} ms':>9} {'÷':>6}" for b in args.batches)
    )
    latency = {}
    for batch in args.batches:
        pixels = torch.randn(batch, 3, size, size, generator=gen)
        array = pixels.numpy()
        runs = {
            "open_clip": lambda p=pixels: open_clip_probabilities(p),
            "pt2": lambda p=pixels: pt2_probabilities(p),
            "onnx": lambda a=array: session.run(None, {"pixels": a}),
        }
        for run in runs.values():
            run()  # warm-up: first-call allocations and graph set-up are not latency
        latency[batch] = best_of(runs, args.repeats)
    for what in ("open_clip", "pt2", "onnx"):
        row = f"{what:>10} {sizes[what] / 1e6:>8.1f} {sizes[what] / sizes['open_clip']:>11.2f}"
        for batch in args.batches:
            ms, base = 1e3 * latency[batch][what], latency[batch]["open_clip"]
            row += f" {ms:>9.1f} {latency[batch][what] / base:>6.2f}"
        print(row)


if __name__ == "__main__":
    main()
