"""Readers for the datasets of CoOp's few-shot suite, laid out under one root the way CoOp's DATASETS.md says.

Nothing is downloaded: each reader only reads the dataset's fixed split (a ``split_zhou_*.json``
file, FGVC-Aircraft's own txt files, or ImageNet's folders and ``classnames.txt``) and pairs it
with the dataset's prompts: CoOp's prompt, or for ImageNet and its four variants the 7-template
ensemble of ProLIP's code (:data:`IMAGENET_TEMPLATES`). docs/datasets.md shows every layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from prolip.atomic import read_json
from prolip.bench.data.dataset import SPLIT_NAMES, Dataset, Item, classnames_of, path_inside
from prolip.datasets.generic import read_labelled
from prolip.errors import InputError

__all__ = [
    "COOP_DATASETS",
    "COOP_LAYOUTS",
    "IMAGENET_TEMPLATES",
    "IMAGENET_VARIANTS",
    "PAPER_DATASETS",
    "CoOpLayout",
    "read_coop",
]


@dataclass(frozen=True)
class CoOpLayout:
    """Where one dataset of the suite lives under the data root, and its prompt.

    Attributes:
        folder: the dataset's folder under the data root (e.g. ``"caltech-101"``).
        images: the folder, under ``folder``, that image paths are relative to (``""``: ``folder`` itself).
        template: CoOp's prompt for the dataset (CoOp's ``CUSTOM_TEMPLATES``).
        split_file: the dataset's ``split_zhou_*.json`` file in ``folder``; None for the datasets
            read from folders (the ImageNet family) or from FGVC-Aircraft's txt files.
        ensemble: the prompts the dataset is read with instead of ``template`` when not empty:
            :data:`IMAGENET_TEMPLATES` for ImageNet and its variants, as ProLIP's code reads them.
    """

    folder: str
    images: str
    template: str
    split_file: str | None = None
    ensemble: tuple[str, ...] = ()

    @property
    def templates(self) -> tuple[str, ...]:
        """The dataset's prompts: the ensemble, or CoOp's one prompt."""
        return self.ensemble or (self.template,)


def _require(name: str, files: Sequence[Path] = (), folders: Sequence[Path] = (), one_of: Sequence[Path] = ()) -> None:
    """Raise one error naming every expected path and the ones that are missing.

    ``one_of`` lists alternative places of one file, at least one of which must exist.
    """
    expected = [f"file {p}" for p in files] + [f"folder {p}/" for p in folders]
    missing = [f"file {p}" for p in files if not p.is_file()] + [f"folder {p}/" for p in folders if not p.is_dir()]
    if one_of:
        expected.append("file " + " or ".join(map(str, one_of)))
        if not any(p.is_file() for p in one_of):
            missing.append(expected[-1])
    if missing:
        raise InputError(
            f"dataset {name!r} is not laid out as CoOp's DATASETS.md says: expected {'; '.join(expected)}. "
            f"Missing: {'; '.join(missing)}. See the layout of each dataset in docs/datasets.md."
        )


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {str(path)!r}: {exc}") from None


def _split_json_items(split: object, key: str, image_dir: Path, path: Path) -> tuple[Item, ...]:
    entries = split.get(key) if isinstance(split, dict) else None
    if not isinstance(entries, list):
        raise InputError(f"{str(path)!r} must be a JSON object with a list under {key!r} (CoOp's split_zhou format).")
    items = []
    for i, entry in enumerate(entries):
        ok = isinstance(entry, list) and len(entry) == 3
        ok = ok and isinstance(entry[0], str) and isinstance(entry[2], str)
        if not ok or not isinstance(entry[1], int) or isinstance(entry[1], bool):
            raise InputError(f"{str(path)!r}: {key}[{i}] = {entry!r} is not [image path, integer label, class name].")
        items.append(Item(path_inside(image_dir, entry[0], f"{str(path)!r}: {key}[{i}]"), entry[1], entry[2]))
    return tuple(items)


def _read_split_json(name: str, layout: CoOpLayout, data_root: Path) -> Dataset:
    folder = data_root / layout.folder
    image_dir = folder / layout.images
    split_path = folder / str(layout.split_file)
    _require(name, files=[split_path], folders=[image_dir])
    split = read_json(split_path, InputError, "split file")
    splits = {key: _split_json_items(split, key, image_dir, split_path) for key in SPLIT_NAMES}
    classnames = classnames_of(chain(*splits.values()), where=str(split_path))
    return Dataset(name, folder, classnames, layout.templates, **splits)


def _read_aircraft(name: str, layout: CoOpLayout, data_root: Path) -> Dataset:
    folder = data_root / layout.folder
    image_dir = folder / layout.images
    variants_path = folder / "variants.txt"
    split_paths = {key: folder / f"images_variant_{key}.txt" for key in SPLIT_NAMES}
    _require(name, files=[variants_path, *split_paths.values()], folders=[image_dir])
    classnames = tuple(line.strip() for line in _read_lines(variants_path) if line.strip())
    label_of = {variant: label for label, variant in enumerate(classnames)}
    splits = {}
    for key, path in split_paths.items():
        items = []
        for line_no, line in enumerate(_read_lines(path), start=1):
            if not line.strip():
                continue
            image, _, variant = line.strip().partition(" ")  # "<image id> <variant, may contain spaces>"
            if variant not in label_of:
                raise InputError(f"{str(path)!r} line {line_no}: variant {variant!r} is not in {str(variants_path)!r}.")
            where = f"{str(path)!r} line {line_no}"
            items.append(Item(path_inside(image_dir, f"{image}.jpg", where), label_of[variant], variant))
        splits[key] = tuple(items)
    return Dataset(name, folder, classnames, layout.templates, **splits)


def _classnames_files(folder: Path, data_root: Path) -> list[Path]:
    """Where a variant's ``classnames.txt`` may be: a copy in its folder (CoOp's instructions), or ImageNet's."""
    return [folder / "classnames.txt", data_root / COOP_LAYOUTS["imagenet"].folder / "classnames.txt"]


def _imagenet_classnames(candidates: Sequence[Path]) -> dict[str, str]:
    """``wnid -> class name`` from the first existing ``classnames.txt`` (lines ``n01440764 tench``), in file order."""
    path = next(p for p in candidates if p.is_file())
    names = {}
    for line in _read_lines(path):
        wnid, _, classname = line.strip().partition(" ")
        if wnid:
            names[wnid] = classname.strip()
    return names


def _folder_items(
    image_dir: Path, label_of: dict[str, int], classnames: tuple[str, ...], where: str
) -> tuple[Item, ...]:
    """Items of a class-per-folder tree whose folder names ``label_of`` maps to labels."""
    paths, folders = read_labelled(image_dir)
    unknown = sorted(set(folders) - label_of.keys())
    if unknown:
        raise InputError(f"{str(image_dir)!r}: class folders {unknown[:5]} are not in {where}.")
    return tuple(Item(p, label_of[f], classnames[label_of[f]]) for p, f in zip(paths, folders, strict=True))


def _wnid_classes(name: str, wnids: list[str], names: dict[str, str]) -> tuple[tuple[str, ...], dict[str, int]]:
    """Class names and ``wnid -> label`` for the given wnids, labelled in the given order."""
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise InputError(
            f"dataset {name!r}: folders {unknown[:5]} have no line in classnames.txt; see docs/datasets.md."
        )
    return tuple(names[w] for w in wnids), {w: label for label, w in enumerate(wnids)}


def _read_imagenet(name: str, layout: CoOpLayout, data_root: Path) -> Dataset:
    folder = data_root / layout.folder
    train_dir, val_dir = folder / layout.images / "train", folder / layout.images / "val"
    _require(name, files=[folder / "classnames.txt"], folders=[train_dir, val_dir])
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    classnames, label_of = _wnid_classes(name, wnids, _imagenet_classnames([folder / "classnames.txt"]))
    train = _folder_items(train_dir, label_of, classnames, f"{train_dir}/")
    # CoOp has no ImageNet val split: its test split is ImageNet's val folder.
    test = _folder_items(val_dir, label_of, classnames, f"{train_dir}/")
    return Dataset(name, folder, classnames, layout.templates, train=train, test=test, class_ids=tuple(wnids))


def _read_imagenet_variant(name: str, layout: CoOpLayout, data_root: Path) -> Dataset:
    """ImageNet-Sketch, -A, -R: test-only ``<wnid>/`` folders, labelled in sorted wnid order (CoOp)."""
    folder = data_root / layout.folder
    image_dir = folder / layout.images
    candidates = _classnames_files(folder, data_root)
    _require(name, folders=[image_dir], one_of=candidates)
    wnids = sorted(p.name for p in image_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    classnames, label_of = _wnid_classes(name, wnids, _imagenet_classnames(candidates))
    test = _folder_items(image_dir, label_of, classnames, "its wnid folders")
    return Dataset(name, folder, classnames, layout.templates, test=test, class_ids=tuple(wnids))


def _read_imagenetv2(name: str, layout: CoOpLayout, data_root: Path) -> Dataset:
    """ImageNetV2: test-only folders ``0..999`` named by ImageNet label, in classnames.txt's order."""
    folder = data_root / layout.folder
    image_dir = folder / layout.images
    candidates = _classnames_files(folder, data_root)
    _require(name, folders=[image_dir], one_of=candidates)
    names = _imagenet_classnames(candidates)
    wnids = list(names)
    classnames = tuple(names.values())
    test = _folder_items(image_dir, {str(i): i for i in range(len(wnids))}, classnames, "0..K-1 of classnames.txt")
    return Dataset(name, folder, classnames, layout.templates, test=test, class_ids=tuple(wnids))


_PHOTO = "a photo of a {}."
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
"""The 7-prompt ensemble of ImageNet and its four variants in ProLIP's code (``datasets/imagenet.py``, from
Tip-Adapter), for every method; T averages their normalised embeddings (:func:`prolip.model.zeroshot.average_prompts`)."""

COOP_LAYOUTS: dict[str, CoOpLayout] = {
    "imagenet": CoOpLayout("imagenet", "images", _PHOTO, ensemble=IMAGENET_TEMPLATES),
    "caltech101": CoOpLayout("caltech-101", "101_ObjectCategories", _PHOTO, "split_zhou_Caltech101.json"),
    "oxford_pets": CoOpLayout("oxford_pets", "images", "a photo of a {}, a type of pet.", "split_zhou_OxfordPets.json"),
    "stanford_cars": CoOpLayout("stanford_cars", "", _PHOTO, "split_zhou_StanfordCars.json"),
    "oxford_flowers": CoOpLayout(
        "oxford_flowers", "jpg", "a photo of a {}, a type of flower.", "split_zhou_OxfordFlowers.json"
    ),
    "food101": CoOpLayout("food-101", "images", "a photo of {}, a type of food.", "split_zhou_Food101.json"),
    "fgvc_aircraft": CoOpLayout("fgvc_aircraft", "images", "a photo of a {}, a type of aircraft."),
    "sun397": CoOpLayout("sun397", "SUN397", _PHOTO, "split_zhou_SUN397.json"),
    "dtd": CoOpLayout("dtd", "images", "{} texture.", "split_zhou_DescribableTextures.json"),
    "eurosat": CoOpLayout("eurosat", "2750", "a centered satellite photo of {}.", "split_zhou_EuroSAT.json"),
    "ucf101": CoOpLayout("ucf101", "UCF-101-midframes", "a photo of a person doing {}.", "split_zhou_UCF101.json"),
    "imagenetv2": CoOpLayout(
        "imagenetv2", "imagenetv2-matched-frequency-format-val", _PHOTO, ensemble=IMAGENET_TEMPLATES
    ),
    "imagenet_sketch": CoOpLayout("imagenet-sketch", "images", _PHOTO, ensemble=IMAGENET_TEMPLATES),
    "imagenet_a": CoOpLayout("imagenet-adversarial", "imagenet-a", _PHOTO, ensemble=IMAGENET_TEMPLATES),
    "imagenet_r": CoOpLayout("imagenet-rendition", "imagenet-r", _PHOTO, ensemble=IMAGENET_TEMPLATES),
}
"""Reader name → where the dataset lives under the data root and its prompts (CoOp's; the ImageNet family: ProLIP's 7)."""

_READERS: dict[str, Callable[[str, CoOpLayout, Path], Dataset]] = {
    "imagenet": _read_imagenet,
    "fgvc_aircraft": _read_aircraft,
    "imagenetv2": _read_imagenetv2,
    "imagenet_sketch": _read_imagenet_variant,
    "imagenet_a": _read_imagenet_variant,
    "imagenet_r": _read_imagenet_variant,
}

COOP_DATASETS: tuple[str, ...] = tuple(COOP_LAYOUTS)
"""Every reader name: the 11 datasets of the paper's tables, then ImageNet's four variants."""

PAPER_DATASETS: tuple[str, ...] = COOP_DATASETS[:11]
"""The 11 datasets of the few-shot, base-to-new and cross-dataset tables (ImageNet first)."""

IMAGENET_VARIANTS: tuple[str, ...] = COOP_DATASETS[11:]
"""The test-only targets of domain generalisation: ImageNet-V2, -Sketch, -A, -R."""


def read_coop(name: str, data_root: str | os.PathLike) -> Dataset:
    """Read dataset ``name`` (a key of :data:`COOP_LAYOUTS`) from CoOp's layout under ``data_root``.

    Image files are not opened or checked here; paths are ``data_root/<folder>/<images>/<path>``.
    ImageNet has no val split (CoOp's test split is ImageNet's val folder); the four ImageNet
    variants are test-only, labelled as CoOp labels them (ImageNet-A/R: 0..199 over their sorted
    wnids; V2: ImageNet's label order), with ImageNet's WordNet ids as ``class_ids``.

    Raises:
        InputError: ``name`` is unknown; or the dataset's folder, split file or ``classnames.txt``
            is missing (one error naming everything expected and what is missing), or malformed.
    """
    layout = COOP_LAYOUTS.get(name)
    if layout is None:
        raise InputError(f"unknown CoOp dataset {name!r}; the readers are {list(COOP_LAYOUTS)}.")
    return _READERS.get(name, _read_split_json)(name, layout, Path(data_root).expanduser().absolute())
