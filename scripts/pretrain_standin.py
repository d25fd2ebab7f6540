#!/usr/bin/env python
"""Pretrain the stand-in CLIP (``prolip-standin-vit``) contrastively on Fashion-MNIST.

The stand-in replaces real CLIP weights in offline demos and tests; it is not a real
CLIP. See ``docs/standin.md``.

Recipe (deterministic for a given ``--seed`` and thread count):

* data: Fashion-MNIST TRAIN split only; grayscale replicated to 3 channels;
* captions: the class name in a template drawn at random from ``TEMPLATES``;
* augmentation: ProLIP's training view, RandomResizedCrop(image_size, scale=(0.5, 1),
  ratio=(3/4, 4/3), bicubic, antialias) + horizontal flip (p=0.5), then the model's
  mean/std. No vertical flips or intensity inversion (those are downstream shifts);
* loss: CLIP's symmetric InfoNCE where every same-class pair in the batch counts as
  a positive (soft targets = row-normalised same-label mask); learnable logit scale
  initialised at ln(1/0.07) and clamped at ln(100);
* optimiser: AdamW, linear warmup then cosine decay.

At the end it writes the full open_clip state dict as fp16 safetensors (atomically),
reloads it, and prints zero-shot accuracy on the TEST split, in domain and under
each shift in ``prolip.datasets.SHIFTS``.

Usage::

    .venv/bin/python scripts/pretrain_standin.py            # writes prolip/standin/prolip-standin-vit.safetensors
    .venv/bin/python scripts/pretrain_standin.py --out /tmp/standin.safetensors --epochs 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import open_clip  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from prolip.datasets import FASHION_MNIST_CLASSES, SHIFTS, apply_shift, load_fashion_mnist  # noqa: E402
from prolip.model.local_models import add_to_open_clip  # noqa: E402
from prolip.standin import MODEL_NAME, PRETRAINED_TAG, TEMPLATES, checkpoint_path  # noqa: E402

CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
FLIP_P = 0.5
MAX_LOGIT_SCALE = math.log(100.0)


# --------------------------------------------------------------------------- views


def sample_crop_boxes(n: int, size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop boxes ``[n, 4]`` (top, left, height, width) as torchvision draws them.

    Up to ten tries of (area, log-ratio); the first box that fits wins; otherwise the
    whole image trimmed to the ratio range (centre crop).
    """
    img_h, img_w = size
    tries = 10
    area = img_h * img_w * torch.empty(n, tries, dtype=torch.float64).uniform_(*CROP_SCALE, generator=gen)
    log_r = torch.empty(n, tries, dtype=torch.float64).uniform_(
        math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=gen
    )
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (h > 0) & (w <= img_w) & (h <= img_h)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
    any_fit = fits.any(dim=1)
    in_ratio = img_w / img_h
    fb_w = round(img_h * CROP_RATIO[1]) if in_ratio > CROP_RATIO[1] else img_w
    fb_h = round(img_w / CROP_RATIO[0]) if in_ratio < CROP_RATIO[0] else img_h
    w = torch.where(any_fit, w.gather(1, first).squeeze(1), float(fb_w))
    h = torch.where(any_fit, h.gather(1, first).squeeze(1), float(fb_h))
    u_top = torch.rand(n, generator=gen, dtype=torch.float64)
    u_left = torch.rand(n, generator=gen, dtype=torch.float64)
    top = torch.where(any_fit, torch.floor(u_top * (img_h - h + 1)), ((img_h - h) / 2).round())
    left = torch.where(any_fit, torch.floor(u_left * (img_w - w + 1)), ((img_w - w) / 2).round())
    return torch.stack([top, left, h, w], dim=1).long()


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """float ``[n, 1, H, W]`` in 0..255 -> normalised ``[n, 3, H, W]`` (grayscale replicated)."""
    return (images.expand(-1, 3, -1, -1) / 255.0 - mean) / std


def train_views(
    images: torch.Tensor, side: int, gen: torch.Generator, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """ProLIP's training view of uint8 ``[n, H, W]``: random resized crop + h-flip + normalise."""
    n, img_h, img_w = images.shape
    boxes = sample_crop_boxes(n, (img_h, img_w), gen).tolist()
    flips = (torch.rand(n, generator=gen) < FLIP_P).tolist()
    out = torch.empty(n, 1, side, side)
    for k, ((t, lft, h, w), flip) in enumerate(zip(boxes, flips, strict=True)):
        crop = images[k, t : t + h, lft : lft + w].float()[None, None]
        view = F.interpolate(crop, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
        out[k] = view[0].flip(-1) if flip else view[0]
    return normalize(out.clamp_(0, 255), mean, std)


def test_views(images: torch.Tensor, side: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Plain test view of uint8 ``[n, H, W]``: bicubic resize to ``side`` + normalise."""
    x = images.float()[:, None]
    if tuple(x.shape[-2:]) != (side, side):
        x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    return normalize(x.clamp_(0, 255), mean, std)


# --------------------------------------------------------------------------- zero-shot


@torch.no_grad()
def zero_shot_classifier(model: open_clip.CLIP, tokenizer) -> torch.Tensor:
    """``[num_classes, embed_dim]``: per class, mean of the L2-normalised template embeddings, re-normalised."""
    weights = []
    for name in FASHION_MNIST_CLASSES:
        emb = F.normalize(model.encode_text(tokenizer([t.format(name) for t in TEMPLATES])), dim=-1)
        weights.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def zero_shot_accuracy(
    model: open_clip.CLIP,
    classifier: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int = 1000,
) -> float:
    """Top-1 zero-shot accuracy of ``model`` on uint8 ``images`` ``[n, H, W]``."""
    side = model.visual.image_size[0]
    correct = 0
    for start in range(0, len(images), batch_size):
        x = test_views(images[start : start + batch_size], side, mean, std)
        feats = F.normalize(model.encode_image(x), dim=-1)
        correct += (feats @ classifier.T).argmax(-1).eq(labels[start : start + batch_size]).sum().item()
    return correct / len(images)


# --------------------------------------------------------------------------- training


def contrastive_loss(
    img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with every same-class (image, caption) pair as a positive."""
    logits = logit_scale.exp() * img @ txt.T
    same = labels[:, None].eq(labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)  # same-label mask is symmetric: one target for both directions
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases, embeddings-as-vectors, logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "ln" in name or "bias" in name or "embedding" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_checkpoint(model: torch.nn.Module, out: Path, metadata: dict[str, str]) -> None:
    """Write the full state dict as fp16 safetensors, atomically (temp file + os.replace)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=checkpoint_path(), help="checkpoint path (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=8, help="passes over the 60k training images (default: %(default)s)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of init, shuffling, views, captions (default: %(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--data-root", type=Path, default=None, help="Fashion-MNIST root (default: see prolip.datasets)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Pretrain, save, reload and evaluate the stand-in."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # model init
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)  # data order, views, captions
    t_start = time.perf_counter()

    add_to_open_clip(MODEL_NAME)
    model = open_clip.create_model(MODEL_NAME)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    side = model.visual.image_size[0]
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)

    images, labels = load_fashion_mnist("train", root=args.data_root)
    # Every (class, template) caption, row index = class * len(TEMPLATES) + template.
    captions = tokenizer([t.format(c) for c in FASHION_MNIST_CLASSES for t in TEMPLATES])

    steps_per_epoch = len(images) // args.batch_size  # drop the last partial batch
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
        return 0.5 * args.lr * (1 + math.cos(math.pi * progress))

    model.train()
    step = 0
    bar = tqdm(total=total, desc="pretrain", unit="step", dynamic_ncols=True)
    for _epoch in range(args.epochs):
        order = torch.randperm(len(images), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            y = labels[idx]
            x = train_views(images[idx], side, gen, mean, std)
            template = torch.randint(len(TEMPLATES), (len(idx),), generator=gen)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)

            img = F.normalize(model.encode_image(x), dim=-1)
            txt_all = F.normalize(model.encode_text(captions), dim=-1)
            txt = txt_all[y * len(TEMPLATES) + template]
            loss = contrastive_loss(img, txt, y, model.logit_scale)

            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    bar.close()
    train_s = time.perf_counter() - t_start

    # One metadata key holding sorted JSON, so the file is byte-for-byte reproducible.
    info = {
        "model_name": MODEL_NAME,
        "pretrained_tag": PRETRAINED_TAG,
        "seed": args.seed,
        "epochs": args.epochs,
        "note": "stand-in for real CLIP weights, for demos and tests only",
    }
    metadata = {"prolip_standin": json.dumps(info, sort_keys=True)}
    save_checkpoint(model, args.out, metadata)

    # Evaluate what was shipped: reload the fp16 checkpoint into a fresh model.
    model = open_clip.create_model(MODEL_NAME)
    model.load_state_dict({k: v.float() for k, v in load_file(args.out).items()})
    model.eval()
    test_images, test_labels = load_fashion_mnist("test", root=args.data_root)
    classifier = zero_shot_classifier(model, tokenizer)
    print(f"checkpoint: {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    print(f"training time: {train_s:.0f} s ({total} steps, {args.epochs} epochs, batch {args.batch_size})")
    print(f"logit scale: {model.logit_scale.exp().item():.1f}")
    for shift in SHIFTS:
        shifted = apply_shift(test_images, shift)
        acc = zero_shot_accuracy(model, classifier, shifted, test_labels, mean, std)
        print(f"zero-shot test accuracy [{shift}]: {100 * acc:.2f}%")
    print(f"total time: {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
