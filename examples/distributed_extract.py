"""Distributed feature extraction under torchrun: every process extracts a shard, rank 0 trains.

Offline by default: prolip's stand-in CLIP (a tiny ViT pretrained on Fashion-MNIST) on
upside-down Fashion-MNIST few-shot images. Every process computes the augmented views of its
share of the images into one feature cache; after a barrier, rank 0 fits ProLIP streaming the
views from the cache, saves the delta and reports the test accuracy.

One machine, two processes (Gloo on CPU, NCCL on GPUs):

    torchrun --nproc_per_node=2 examples/distributed_extract.py --cache-dir /tmp/prolip-cache

Two machines, 4 GPUs each, the cache on a filesystem both mount (run on each, node_rank 0 and 1):

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 --master_addr=10.0.0.1 --master_port=29500 \\
        examples/distributed_extract.py --cache-dir /shared/prolip-cache

Rerunning reuses the cache: nothing is recomputed. ``--synthetic`` uses a small generated image
set instead of Fashion-MNIST (for tests and machines without the data).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from prolip import ProLIPAdapter, standin
from prolip.datasets import FASHION_MNIST_CLASSES, apply_shift, few_shot_indices, load_fashion_mnist
from prolip.variants.distributed import extract_distributed, init_distributed, rank_and_world_size


def synthetic(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """28x28 grey images, one brightness band per class: ``(uint8 [n, 28, 28], int64 [n])``."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(n_per_class)
    noise = torch.randint(0, 40, (len(labels), 28, 28), generator=gen)
    return (noise + 20 * labels[:, None, None]).to(torch.uint8), labels


def main() -> None:
    """Parse options, extract with every process, fit and save on rank 0."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, required=True, help="feature cache every process can reach")
    parser.add_argument("--out", type=Path, default=None, help="where rank 0 saves the delta (default: none)")
    parser.add_argument("--shots", type=int, default=16, help="labelled images per class (default: %(default)s)")
    parser.add_argument("--views", type=int, default=30, help="augmented views per image (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=300, help="training steps (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shot draw and the views (default: 0)")
    parser.add_argument("--test-size", type=int, default=2000, help="test images rank 0 scores (default: %(default)s)")
    parser.add_argument("--synthetic", action="store_true", help="use generated images, not Fashion-MNIST")
    parser.add_argument("--data-root", default=None, help="folder holding torchvision's FashionMNIST/ layout")
    args = parser.parse_args()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("prolip").setLevel(logging.INFO)  # prolip's progress, not open_clip's chatter

    device = init_distributed()
    rank, world = rank_and_world_size()
    if args.synthetic:
        shots_x, shots_y = synthetic(args.shots, args.seed)
        test_x, test_y = synthetic(max(1, args.test_size // 10), args.seed + 1)
    else:
        train_x, train_y = load_fashion_mnist("train", root=args.data_root)
        test_x, test_y = load_fashion_mnist("test", root=args.data_root)
        pick = few_shot_indices(train_y, args.shots, args.seed)
        shots_x, shots_y = apply_shift(train_x[pick], "upside_down"), train_y[pick]
        test_x, test_y = apply_shift(test_x[: args.test_size], "upside_down"), test_y[: args.test_size]

    adapter = ProLIPAdapter(
        standin.MODEL_NAME,
        standin.PRETRAINED_TAG,
        templates=standin.TEMPLATES,
        lr=args.lr,
        views=args.views,
        epochs=args.epochs,
        device=device,
        random_state=args.seed,
        verbose=rank == 0,
    )
    features = extract_distributed(adapter, list(shots_x), cache_dir=args.cache_dir)
    if rank == 0:
        adapter.fit_features(features, shots_y.tolist(), class_names=FASHION_MNIST_CLASSES)
        accuracy = adapter.score(list(test_x), test_y.tolist())
        print(f"{world} processes; features {tuple(features.shape)}; test accuracy {accuracy:.2%}")
        if args.out is not None:
            adapter.save(args.out)
            print(f"saved {args.out}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
