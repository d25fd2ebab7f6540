"""Fashion-MNIST loading and the fixed distribution shifts used by the offline demos.

The data is read with torchvision's :class:`torchvision.datasets.FashionMNIST` class.
Where the files come from, in order:

1. ``root`` (or the default cache dir) already holds torchvision's layout
   ``<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``;
2. Debian's ``dataset-fashion-mnist`` package is installed
   (``/usr/share/datasets/fashion-mnist/*.gz``): the files are gunzipped once
   into that layout and then read from there;
3. ``download=True``: torchvision downloads them (needs internet);
4. otherwise :class:`FileNotFoundError` explains how to get the data.

The default cache dir is ``$PROLIP_DATA`` if set, else ``~/.cache/prolip/data``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.datasets import FashionMNIST
from torchvision.datasets.utils import extract_archive

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "SHIFTS",
    "SPLITS",
    "apply_shift",
    "default_data_root",
    "export_image_folder",
    "few_shot_indices",
    "load_fashion_mnist",
]

FASHION_MNIST_CLASSES: list[str] = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
"""Class names in label order (0-9), lowercase, phrased to read well in "a photo of a {}."."""

SPLITS: tuple[str, ...] = ("train", "test")
"""Valid values of the ``split`` argument of :func:`load_fashion_mnist`."""

DEBIAN_FASHION_MNIST_DIR: Path = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the gzipped IDX files."""

_RAW_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

_HOW_TO_GET = (
    "Fashion-MNIST not found. Either install Debian's package "
    "(`apt-get install dataset-fashion-mnist`, which puts the files in "
    f"{DEBIAN_FASHION_MNIST_DIR}), or call load_fashion_mnist(..., download=True) "
    "on a machine with internet access. Looked in: {where}."
)


def default_data_root() -> Path:
    """Return the data cache dir: ``$PROLIP_DATA`` if set, else ``~/.cache/prolip/data``."""
    env = os.environ.get("PROLIP_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "prolip" / "data"


def _raw_dir(root: Path) -> Path:
    return root / "FashionMNIST" / "raw"


def _has_torchvision_layout(root: Path) -> bool:
    raw = _raw_dir(root)
    return all((raw / name).is_file() for name in _RAW_FILES)


def _debian_files_present() -> bool:
    return all((DEBIAN_FASHION_MNIST_DIR / f"{name}.gz").is_file() for name in _RAW_FILES)


def _stage_debian_files(root: Path) -> None:
    """Gunzip Debian's files into ``<root>/FashionMNIST/raw/`` (each file written atomically)."""
    raw = _raw_dir(root)
    raw.mkdir(parents=True, exist_ok=True)
    for name in _RAW_FILES:
        target = raw / name
        if target.is_file():
            continue
        with tempfile.TemporaryDirectory(dir=raw, prefix=".staging-") as tmp:
            extracted = Path(extract_archive(str(DEBIAN_FASHION_MNIST_DIR / f"{name}.gz"), tmp))
            os.replace(extracted, target)


def load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one Fashion-MNIST split as tensors.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: directory in torchvision's layout (``<root>/FashionMNIST/raw/``);
            defaults to :func:`default_data_root`. Debian's files are staged
            into it, and torchvision downloads into it, when it lacks the data.
        download: allow torchvision to download the data if it is found nowhere.

    Returns:
        ``(images, labels)``: uint8 ``[n, 28, 28]`` and int64 ``[n]`` (values 0-9,
        indexing :data:`FASHION_MNIST_CLASSES`).

    Raises:
        ValueError: ``split`` is not one of :data:`SPLITS`.
        FileNotFoundError: the data is not available and ``download`` is False.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    data_root = Path(root).expanduser() if root is not None else default_data_root()

    if not _has_torchvision_layout(data_root):
        if _debian_files_present():
            _stage_debian_files(data_root)
        elif not download:
            where = f"{_raw_dir(data_root)} and {DEBIAN_FASHION_MNIST_DIR}"
            raise FileNotFoundError(_HOW_TO_GET.format(where=where))

    dataset = FashionMNIST(
        str(data_root),
        train=(split == "train"),
        download=download and not _has_torchvision_layout(data_root),
    )
    images = dataset.data.to(torch.uint8).contiguous()
    labels = dataset.targets.to(torch.int64).contiguous()
    return images, labels


def _identity(images: torch.Tensor) -> torch.Tensor:
    return images.clone()


def _upside_down(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-2)


def _inverted(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return 255 - images
    return 1.0 - images


SHIFTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": _identity,
    "upside_down": _upside_down,
    "inverted": _inverted,
}
"""Fixed distribution shifts, applied to raw images ``[..., H, W]``.

* ``"none"``: unchanged (a copy).
* ``"upside_down"``: vertical flip (``images.flip(-2)``). The stand-in CLIP never
  sees vertical flips in pretraining, so this is the downstream shift of the demos.
* ``"inverted"``: intensity inversion (``255 - x`` for uint8, ``1 - x`` for floats in [0, 1]).

See ``docs/standin.md`` for the stand-in's zero-shot accuracy under each.
"""


def apply_shift(images: torch.Tensor, shift: str) -> torch.Tensor:
    """Apply the named distribution shift from :data:`SHIFTS` to ``images`` ``[..., H, W]``.

    Returns a new tensor; ``images`` is not modified.

    Raises:
        ValueError: ``shift`` is not a key of :data:`SHIFTS`.
    """
    try:
        fn = SHIFTS[shift]
    except KeyError:
        raise ValueError(f"shift must be one of {list(SHIFTS)}, got {shift!r}") from None
    return fn(images)


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int = 0) -> torch.Tensor:
    """``shots`` random indices of each class (in label order), drawn with a local generator.

    Class-major: the result viewed as ``[K, shots]`` holds one class per row, and its first N
    columns are an N-shot draw nested in the ``shots``-shot one.
    """
    gen = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(labels == k).flatten() for k in labels.unique().tolist()]
    return torch.cat([idx[torch.randperm(len(idx), generator=gen)[:shots]] for idx in per_class])


def export_image_folder(
    root: str | os.PathLike,
    split: str = "test",
    per_class: int = 20,
    *,
    shift: str = "none",
    seed: int = 0,
    data_root: str | os.PathLike | None = None,
) -> Path:
    """Write ``per_class`` random Fashion-MNIST images per class as PNGs in ``root/<class name>/``.

    Gives the examples a real image folder (the layout ``prolip fit`` and
    :func:`prolip.datasets.generic.read_labelled` take) without any download. Returns ``root``.
    """
    from PIL import Image

    images, labels = load_fashion_mnist(split, root=data_root)
    images = apply_shift(images, shift)
    root = Path(root)
    for i in few_shot_indices(labels, per_class, seed).tolist():
        folder = root / FASHION_MNIST_CLASSES[int(labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].numpy()).save(folder / f"{split}-{i:05d}.png")
    return root
