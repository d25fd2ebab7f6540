"""Feature extraction speed: ``prolip.features.extract.extract_features`` ÷ plain ``model.encode_image``.

Both run the same open_clip model (random weights; speed does not depend on them) on the same
images, batch size, precision and device. ``encode_image`` gets ready-made pixel batches, so it is
the model alone; ``extract_features`` also renders the views from uint8 images (resize and crop,
plus random crops and flips when views > 0) and stops before the projector. Images per second
count forward passes: with views > 0, each view is an image. Best of ``--repeats``, interleaved.

Run: ``.venv/bin/python benchmarks/bench_extraction.py`` (about 1–2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import open_clip
import torch
from timing import best_of

from prolip.features.extract import extract_features
from prolip.features.views import plain_views
from prolip.model.backbone import build_backbone
from prolip.params import PRECISIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (default: %(default)s)")
    parser.add_argument("--images", type=int, default=32, help="distinct images (default: %(default)s)")
    parser.add_argument("--views", type=int, default=2, help="augmented views per image (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS), help="(default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=2, help="(default: %(default)s)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), PRECISIONS[args.precision]

    torch.manual_seed(0)
    backbone = build_backbone(open_clip.create_model(args.model), None, precision=args.precision, device=device)
    model, config = backbone.model, backbone.view_config
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8, generator=gen) for _ in range(args.images)]
    pixels = plain_views([im.to(device) for im in images], config).to(dtype)  # ready-made, not timed

    def encode() -> None:
        with torch.inference_mode():
            for start in range(0, len(pixels), args.batch_size):
                model.encode_image(pixels[start : start + args.batch_size])

    def extract(views: int) -> Callable[[], object]:
        return lambda: extract_features(backbone, images, views, seed=0, batch_size=args.batch_size, verbose=False)

    runs = {
        "encode_image": (encode, len(images)),
        "extract_features views=0": (extract(0), len(images)),
        f"extract_features views={args.views}": (extract(args.views), len(images) * args.views),
    }
    encode()  # warm-up
    seconds = best_of({name: fn for name, (fn, _) in runs.items()}, args.repeats, device)
    best = {name: count / seconds[name] for name, (_, count) in runs.items()}  # items per second
    print(
        f"{args.model} {args.precision} on {device} ({torch.get_num_threads()} threads), "
        f"{args.images} images of 256x320, batch {args.batch_size}"
    )
    for name, rate in best.items():
        ratio = rate / best["encode_image"]
        print(f"{name:>28}: {rate:8.2f} images/s  ({ratio:.2f} x encode_image)")


if __name__ == "__main__":
    main()
