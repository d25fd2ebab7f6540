"""Write a miniature few-shot suite in CoOp's layout from Fashion-MNIST, for offline runs of ``prolip bench``.

All 15 reader names of :data:`prolip.bench.data.COOP_DATASETS` get a folder laid out exactly as
CoOp's DATASETS.md says (split_zhou JSON files, FGVC-Aircraft's txt files, ImageNet's folders and
classnames.txt), filled with 28×28 Fashion-MNIST images under a different moderate, label-preserving
shift per dataset, so the stand-in CLIP's zero-shot accuracy spreads like CLIP's over the paper's
datasets. "imagenet" is the mildly shifted source of cross-dataset and domain generalisation; its
variants are further shifts of it on fresh test images (A and R on 5 of its 10 classes). Train and
val images come from Fashion-MNIST's train split, test images from its test split. Each dataset
orders its classes differently (real split files do too). The same ``--seed`` writes the same files.

    HF_HUB_OFFLINE=1 .venv/bin/python -m prolip.bench.data.mini_suite --out mini-suite --measure

``--measure`` then reads every dataset back with :func:`prolip.bench.data.read_coop` and prints the
stand-in's zero-shot accuracy on each test split (its 8 pretraining templates, which the script
also writes to ``<out>/standin-templates.txt`` for ``prolip bench --templates``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from prolip import standin
from prolip.bench.data import COOP_DATASETS, COOP_LAYOUTS, read_coop
from prolip.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist

Shift = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""A batch shift: float images ``[n, 1, 28, 28]`` in [0, 1] and a generator → ``[n, 1 or 3, 28, 28]`` in [0, 1]."""

IMAGENET_FAMILY = ("imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
SUBSET_CLASSES = 5  # ImageNet-A/R hold 200 of ImageNet's 1000 classes; here 5 of 10


# ---------------------------------------------------------------------------- shifts
def _uniform(g: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp each image by its 2×3 affine matrix (output → input coordinates in [-1, 1]), black outside."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _rotation(angles_deg: torch.Tensor) -> torch.Tensor:
    a = torch.deg2rad(angles_deg)
    theta = torch.zeros(len(a), 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    return theta


def rotate(max_deg: float) -> Shift:
    """Rotations by a uniform angle in ±max_deg."""
    return lambda x, g: _affine(x, _rotation(_uniform(g, len(x), -max_deg, max_deg)))


def translate(max_px: float) -> Shift:
    """Translations by up to ±max_px pixels in each direction."""

    def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        theta = torch.eye(2, 3).repeat(len(x), 1, 1)
        theta[:, :, 2] = _uniform(g, 2 * len(x), -1, 1).view(-1, 2) * (2 * max_px / x.shape[-1])
        return _affine(x, theta)

    return shift


def zoom(scale: float) -> Shift:
    """Zoomed crops: a random square of ``scale`` × the side, resized back to full size."""

    def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        theta = torch.zeros(len(x), 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = scale
        theta[:, :, 2] = _uniform(g, 2 * len(x), -(1 - scale), 1 - scale).view(-1, 2)
        return _affine(x, theta)

    return shift


def blur(sigma: float) -> Shift:
    """Gaussian blur."""
    return lambda x, g: TF.gaussian_blur(x, kernel_size=[7, 7], sigma=[sigma, sigma])


def low_contrast(factor: float) -> Shift:
    """Contrast scaled by ``factor`` around mid-grey (the black background turns grey)."""
    return lambda x, g: 0.5 + factor * (x - 0.5)


def noise(sigma: float) -> Shift:
    """Additive Gaussian pixel noise."""
    return lambda x, g: (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def tint(strength: float) -> Shift:
    """Colour: each image multiplied by a random colour whose channels lie in [1 - strength, 1]."""

    def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        colour = 1 - strength * torch.rand(len(x), 3, 1, 1, generator=g)
        return x.expand(-1, 3, -1, -1) * colour

    return shift


def elastic(alpha: float, sigma: float) -> Shift:
    """Elastic warps: a random displacement field smoothed by a Gaussian, ``alpha`` pixels strong."""

    def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        field = torch.rand(n, 2, h, w, generator=g) * 2 - 1
        size = 2 * math.ceil(3 * sigma) + 1
        field = TF.gaussian_blur(field, kernel_size=[size, size], sigma=[sigma, sigma])
        field = field / field.abs().amax(dim=(1, 2, 3), keepdim=True) * (2 * alpha / w)
        grid = F.affine_grid(torch.eye(2, 3).repeat(n, 1, 1), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid + field.permute(0, 2, 3, 1), padding_mode="zeros", align_corners=False)

    return shift


def quarter_turns(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Overhead views: a random multiple of 90° and a random mirror, as satellite images come."""
    turns = torch.randint(0, 4, (len(x),), generator=g).tolist()
    mirror = torch.rand(len(x), generator=g) < 0.5
    out = torch.stack([torch.rot90(img, k, dims=(-2, -1)) for img, k in zip(x, turns, strict=True)])
    return torch.where(mirror.view(-1, 1, 1, 1), out.flip(-1), out)


def sketch(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Line drawings: the Sobel edge magnitude, normalised per image."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    edges = torch.hypot(F.conv2d(x, kx, padding=1), F.conv2d(x, kx.transpose(-1, -2), padding=1))
    return edges / edges.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def motion_blur(length: int) -> Shift:
    """Horizontal motion blur over ``length`` pixels."""
    kernel = torch.full((1, 1, 1, length), 1.0 / length)
    return lambda x, g: F.conv2d(x, kernel, padding=(0, length // 2))


def occlude(side: int) -> Shift:
    """A grey square of ``side`` pixels pasted at a random place."""

    def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        out = x.clone()
        corners = torch.randint(0, x.shape[-1] - side + 1, (len(x), 2), generator=g).tolist()
        for img, (top, left) in zip(out, corners, strict=True):
            img[..., top : top + side, left : left + side] = 0.5
        return out

    return shift


def posterise(levels: int) -> Shift:
    """Flat renditions: intensities quantised to ``levels`` grey levels."""
    return lambda x, g: torch.round(x * (levels - 1)) / (levels - 1)


def upside_down(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Vertical flips (the stand-in never saw one in pretraining)."""
    return x.flip(-2)


def chain(*shifts: Shift) -> Shift:
    """The shifts applied one after the other."""

    def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        for s in shifts:
            x = s(x, g)
        return x

    return shift


# ---------------------------------------------------------------------------- the suite
@dataclass(frozen=True)
class MiniDataset:
    """One dataset of the miniature suite: its shift, and how its images are stored."""

    description: str
    shift: Shift
    jpeg_quality: int | None = None  # None: PNG


_IMAGENET_SHIFT = chain(rotate(25), low_contrast(0.75))

SUITE: dict[str, MiniDataset] = {
    "imagenet": MiniDataset("rotations ±25°, contrast ×0.75", _IMAGENET_SHIFT),
    "caltech101": MiniDataset("Gaussian blur σ=0.8", blur(0.8)),
    "oxford_pets": MiniDataset("translations ±3 px", translate(3)),
    "stanford_cars": MiniDataset("zoomed crops, half the side", zoom(0.5)),
    "oxford_flowers": MiniDataset("colour tints, channels ×[0.4, 1]", tint(0.6)),
    "food101": MiniDataset("low contrast ×0.7", low_contrast(0.7)),
    "fgvc_aircraft": MiniDataset("upside down, JPEG quality 20", upside_down, jpeg_quality=20),
    "sun397": MiniDataset("Gaussian noise σ=0.25", noise(0.25)),
    "dtd": MiniDataset("elastic warps, 7 px, σ=2", elastic(7, 2)),
    "eurosat": MiniDataset("quarter turns and mirrors", quarter_turns),
    "ucf101": MiniDataset("horizontal motion blur, 9 px", motion_blur(9)),
    "imagenetv2": MiniDataset("imagenet's shift + noise σ=0.1", chain(_IMAGENET_SHIFT, noise(0.1))),
    "imagenet_sketch": MiniDataset("imagenet's shift as Sobel edge drawings", chain(_IMAGENET_SHIFT, sketch)),
    "imagenet_a": MiniDataset(
        "imagenet's shift + rotations ±20° + a 20 px grey occluder", chain(_IMAGENET_SHIFT, rotate(20), occlude(20))
    ),
    "imagenet_r": MiniDataset(
        "imagenet's shift as 2-level tinted renditions", chain(_IMAGENET_SHIFT, posterise(2), tint(0.9))
    ),
}
"""Reader name → the shift that makes it."""


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _pick(pools: list[torch.Tensor], per_class: int, g: torch.Generator, offset: int = 0) -> list[torch.Tensor]:
    """For each class's pool of image indices, ``per_class`` of them (a seeded permutation from ``offset``)."""
    picks = []
    for pool in pools:
        perm = torch.randperm(len(pool), generator=g)
        picks.append(pool[perm[(offset + torch.arange(per_class)) % len(pool)]])
    return picks


def _render(images: torch.Tensor, index: torch.Tensor, spec: MiniDataset, g: torch.Generator) -> list[Image.Image]:
    x = spec.shift(images[index].float().div(255).unsqueeze(1), g).clamp(0, 1)
    arrays = x.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]


def _save(image: Image.Image, path: Path, spec: MiniDataset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec.jpeg_quality is None:
        image.save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=spec.jpeg_quality)


class _Writer:
    """Renders and stores the images of one dataset; records ``(split, label, file stem, image)``."""

    def __init__(self, name: str, spec: MiniDataset, seed: int) -> None:
        self.name, self.spec, self.g = name, spec, _generator(seed, name)
        self.records: list[tuple[str, int, str, Image.Image]] = []

    def add(self, split: str, source: str, images: torch.Tensor, picks: list[torch.Tensor], label_of: dict) -> None:
        """Render ``images[picks[k]]`` for each Fashion-MNIST class ``k`` in ``label_of`` (one batch)."""
        chosen = [(label_of[k], i) for k, index in enumerate(picks) if k in label_of for i in index.tolist()]
        rendered = _render(images, torch.tensor([i for _, i in chosen]), self.spec, self.g)
        for (label, i), image in zip(chosen, rendered, strict=True):
            self.records.append((split, label, f"{source}{i:05d}", image))


def _write_split_json(root: Path, name: str, writer: _Writer, classnames: list[str]) -> None:
    layout = COOP_LAYOUTS[name]
    folder = root / layout.folder
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    ext = ".png" if writer.spec.jpeg_quality is None else ".jpg"
    for part, label, stem, image in writer.records:
        if name == "stanford_cars":  # the real one keeps cars_train/ and cars_test/ beside its split file
            rel = f"cars_{'test' if part == 'test' else 'train'}/{stem}{ext}"
        else:
            rel = f"{classnames[label].replace(' ', '_')}/{stem}{ext}"
        _save(image, folder / layout.images / rel, writer.spec)
        split[part].append([rel, label, classnames[label]])
    (folder / str(layout.split_file)).write_text(json.dumps(split, indent=1), encoding="utf-8")


def _write_aircraft(root: Path, writer: _Writer, classnames: list[str]) -> None:
    folder = root / COOP_LAYOUTS["fgvc_aircraft"].folder
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for part, label, stem, image in writer.records:
        _save(image, folder / "images" / f"{stem}.jpg", writer.spec)
        lines[part].append(f"{stem} {classnames[label]}")
    (folder / "variants.txt").write_text("".join(f"{c}\n" for c in classnames), encoding="utf-8")
    for part, rows in lines.items():
        (folder / f"images_variant_{part}.txt").write_text("".join(f"{r}\n" for r in rows), encoding="utf-8")


def _write_imagenet_family(root: Path, name: str, writer: _Writer, wnids: list[str], classnames_txt: str) -> None:
    layout = COOP_LAYOUTS[name]
    folder = root / layout.folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text(classnames_txt, encoding="utf-8")  # CoOp's instructions copy it
    for part, label, stem, image in writer.records:
        if name == "imagenet":
            sub = f"{'val' if part == 'test' else 'train'}/{wnids[label]}"
        elif name == "imagenetv2":
            sub = str(label)  # V2's folders are ImageNet's label numbers
        else:
            sub = wnids[label]
        _save(image, folder / layout.images / sub / f"{stem}.png", writer.spec)


def make_suite(out: Path, seed: int = 0, train: int = 64, val: int = 32, test: int = 100) -> None:
    """Write every dataset of :data:`SUITE` under ``out`` (per class: ``train``/``val``/``test`` images)."""
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    k = len(FASHION_MNIST_CLASSES)
    # ImageNet family: ImageNet's classes in sorted-wnid order, a seeded permutation of Fashion-MNIST's
    family = _generator(seed, "imagenet-family")
    position = torch.randperm(k, generator=family).tolist()
    wnid_of = {c: f"n{(position[c] + 1) * 1_000_000:08d}" for c in range(k)}
    by_wnid = sorted(range(k), key=wnid_of.__getitem__)  # Fashion-MNIST class of each ImageNet label
    classnames_txt = "".join(f"{wnid_of[c]} {FASHION_MNIST_CLASSES[c]}\n" for c in by_wnid)
    subsets = {v: sorted(torch.randperm(k, generator=family)[:SUBSET_CLASSES].tolist()) for v in ("a", "r")}
    train_pools = [torch.nonzero(train_y == c).flatten() for c in range(k)]
    test_pools = [torch.nonzero(test_y == c).flatten() for c in range(k)]
    family_train = _pick(train_pools, train, family)
    family_test = {v: _pick(test_pools, test, family, offset=i * test) for i, v in enumerate(IMAGENET_FAMILY)}

    for name in COOP_DATASETS:
        writer = _Writer(name, SUITE[name], seed)
        if name in IMAGENET_FAMILY:
            members = by_wnid
            if name in ("imagenet_a", "imagenet_r"):
                members = [c for c in by_wnid if c in subsets[name[-1]]]
            label_of = {c: label for label, c in enumerate(members)}
            if name == "imagenet":
                writer.add("train", "train", train_x, family_train, label_of)
            writer.add("test", "test", test_x, family_test[name], label_of)
            wnids = [wnid_of[c] for c in members]
            _write_imagenet_family(out, name, writer, wnids, classnames_txt)
            continue
        order = torch.randperm(k, generator=writer.g).tolist()  # label → Fashion-MNIST class
        label_of = {c: label for label, c in enumerate(order)}
        trainval = _pick(train_pools, train + val, writer.g)
        writer.add("train", "train", train_x, [p[:train] for p in trainval], label_of)
        writer.add("val", "train", train_x, [p[train:] for p in trainval], label_of)
        writer.add("test", "test", test_x, _pick(test_pools, test, writer.g), label_of)
        classnames = [FASHION_MNIST_CLASSES[c] for c in order]
        if name == "fgvc_aircraft":
            _write_aircraft(out, writer, classnames)
        else:
            _write_split_json(out, name, writer, classnames)
    (out / "standin-templates.txt").write_text("".join(f"{t}\n" for t in standin.TEMPLATES), encoding="utf-8")


def measure(out: Path) -> dict[str, float]:
    """The stand-in's zero-shot accuracy on each dataset's test split, read back with the CoOp readers."""
    from prolip import ProLIPAdapter

    adapter = ProLIPAdapter(
        standin.MODEL_NAME, standin.PRETRAINED_TAG, templates=standin.TEMPLATES, epochs=0, views=1, verbose=False
    )
    accuracy = {}
    for name in COOP_DATASETS:
        dataset = read_coop(name, out)
        features = adapter.extract_features([item.path for item in dataset.test], views=0)
        labels = [item.label for item in dataset.test]
        adapter.fit_features(features, labels, class_names=dataset.classnames)
        accuracy[name] = adapter.score_features(features, labels)
    return accuracy


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder to write the suite into (the bench's --data-root)")
    p.add_argument("--seed", type=int, default=0, help="seed of image choice, class order and shifts (default 0)")
    p.add_argument("--train", type=int, default=64, help="train images per class (default 64)")
    p.add_argument("--val", type=int, default=32, help="val images per class (default 32; ImageNet has none)")
    p.add_argument("--test", type=int, default=100, help="test images per class (default 100)")
    p.add_argument("--measure", action="store_true", help="print the stand-in's zero-shot accuracy on each test split")
    args = p.parse_args(argv)
    start = time.perf_counter()
    make_suite(args.out, seed=args.seed, train=args.train, val=args.val, test=args.test)
    print(f"wrote {len(COOP_DATASETS)} datasets under {args.out} in {time.perf_counter() - start:.1f} s")
    if args.measure:
        start = time.perf_counter()
        accuracy = measure(args.out)
        print("| dataset | shift | zero-shot accuracy |\n| --- | --- | --- |")
        for name, acc in accuracy.items():
            print(f"| {name} | {SUITE[name].description} | {100 * acc:.1f}% |")
        paper = [accuracy[name] for name in COOP_DATASETS[:11]]
        print(f"| average of the 11 | | {100 * sum(paper) / len(paper):.1f}% |")
        print(f"measured in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
