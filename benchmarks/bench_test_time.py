"""Test-time ProLIP throughput ÷ the trunk's alone on the same 64 views per image.

One open_clip model (random weights; speed does not depend on them), ``--images`` images of
256×320, ``--classes`` classes (ImageNet's 1000 by default: the adaptation's cost grows with K).
Images per second, best of ``--repeats``, interleaved, in one run:

* trunk: the vision tower up to the projector (``projector.features``) on ready-made pixel
  batches, 64 per image — the model alone, no view rendering;
* views: ``TestTimeProLIP.extract_features`` — the plain view and 63 random crops rendered from
  the uint8 images, then the trunk: what any test-time method that looks at 64 views must run;
* test-time: ``TestTimeProLIP.predict`` end to end (views, trunk, per-image entropy step, prediction);
* adapt: ``TestTimeProLIP.logits_from_features`` on stored view features — the adaptation alone.

The ratios printed are test-time ÷ trunk, test-time ÷ views, and trunk ÷ (trunk + adapt), the last
from the separately timed parts, which is less exposed to noise than the end-to-end timing.

Run: ``.venv/bin/python benchmarks/bench_test_time.py`` (about 3–5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse

import open_clip
import torch
from timing import best_of

from prolip.features.views import plain_views
from prolip.model.backbone import build_backbone
from prolip.variants.test_time import TestTimeProLIP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (default: %(default)s)")
    parser.add_argument("--images", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--views", type=int, default=64, help="views per image (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=1000, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="views per forward pass (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=2, help="(default: %(default)s)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    backbone = build_backbone(open_clip.create_model(args.model), None, device=device)
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8, generator=gen) for _ in range(args.images)]
    names = [f"class {k}" for k in range(args.classes)]
    tt = TestTimeProLIP(backbone, names, views=args.views, batch_size=args.batch_size)
    # The trunk's input: as many ready-made pixel tensors as there are views (content does not change speed).
    pixels = plain_views([im.to(device) for im in images], backbone.view_config).repeat(args.views, 1, 1, 1)
    features = tt.extract_features(images)  # stored once for "adapt" (and a warm-up)

    def trunk() -> None:
        with torch.inference_mode():
            for start in range(0, len(pixels), args.batch_size):
                backbone.projector.features(pixels[start : start + args.batch_size])

    runs = {
        "trunk": trunk,
        "views": lambda: tt.extract_features(images),
        "test-time": lambda: tt.predict(images),
        "adapt": lambda: tt.logits_from_features(features),
    }
    best = best_of(runs, args.repeats, device)
    n = args.images
    print(
        f"{args.model} fp32 on {device} ({torch.get_num_threads()} threads), {n} images of 256x320, "
        f"{args.views} views each, {args.classes} classes, batch {args.batch_size}"
    )
    for name, seconds in best.items():
        print(f"{name:>10}: {n / seconds:8.3f} images/s  ({1000 * seconds / n:8.1f} ms per image)")
    print(f"test-time / trunk: {best['trunk'] / best['test-time']:.3f}")
    print(f"test-time / views: {best['views'] / best['test-time']:.3f}")
    print(f"trunk / (trunk + adapt): {best['trunk'] / (best['trunk'] + best['adapt']):.3f}")


if __name__ == "__main__":
    main()
