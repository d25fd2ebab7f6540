"""Dataset objects as image input: a ``torch.utils.data.Dataset`` of ``(image, label)`` items, or a Hugging Face
``datasets.Dataset`` with an image column and a label column, read one item at a time (never all at once).

A Hugging Face ``Image`` column is read undecoded and decoded here: its bytes with Pillow, its path as a local
file. ``datasets`` itself would fetch a path that is a URL; prolip refuses it (nothing is ever downloaded), and
for a dataset read from a folder (:func:`load_hf_dataset`: a ``save_to_disk`` folder or an ``imagefolder``) a
path must name a file inside that folder.
"""

from __future__ import annotations

import io
import math
import operator
import os
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image

from prolip.errors import ImageLoadError, InputError, InputTypeError, ProLIPError, warn
from prolip.params import ON_ERROR
from prolip.progress import progress

IMAGE_COLUMNS = ("image", "img")
"""Image column names tried, in order, when a Hugging Face dataset has no single ``Image`` feature column."""
LABEL_COLUMNS = ("label", "labels")
"""Label column names tried, in order, when a Hugging Face dataset has no single ``ClassLabel`` column."""


class DatasetImages(Sequence):
    """The images of a dataset object, each read from the dataset only when asked for.

    Item ``i`` is the dataset's image ``i`` as the dataset gives it (a PIL image, an array, a
    tensor or a path), for :func:`prolip.features.images.load_image`. Reading it again reads the
    dataset again: nothing is kept. Make one with :func:`dataset_images`.

    Attributes:
        description: the dataset, as error messages name it.
        class_names: the names of integer labels 0..K-1 (a Hugging Face ``ClassLabel``), or None.
    """

    def __init__(
        self,
        read_image: Callable[[int], Any],
        length: int,
        read_labels: Callable[[], list[Hashable]] | None,
        class_names: Sequence[str] | None,
        description: str,
        read_item: Callable[[int], Any] | None = None,
    ) -> None:
        self._read_image, self._read_labels, self._length = read_image, read_labels, length
        self._read_item = read_item
        self._indices: Sequence[int] | None = None
        self._unreadable: dict[int, ProLIPError] = {}
        self.class_names = None if class_names is None else list(class_names)
        self.description = description

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        i = operator.index(index)
        if not -self._length <= i < self._length:
            raise IndexError(f"image {i} is out of range for {self.description} of {self._length} items.")
        i %= self._length
        if i in self._unreadable:  # found unreadable while reading labels: not read again
            raise self._unreadable[i]
        return self._guarded(self._read_image, i)

    def select(self, indices: Sequence[int]) -> DatasetImages:
        """The items at ``indices`` (in that order), as a dataset of their own: e.g. a few-shot draw."""
        chosen = [operator.index(i) % self._length for i in indices]
        labels = self._read_labels
        subset = DatasetImages(
            lambda k: self._read_image(chosen[k]),
            len(chosen),
            None if labels is None else (lambda: [labels()[i] for i in chosen]),
            self.class_names,
            self.description,
            None if self._read_item is None else (lambda k: self._read_item(chosen[k])),
        )
        subset._unreadable = {k: self._unreadable[i] for k, i in enumerate(chosen) if i in self._unreadable}
        return subset

    def _guarded(self, read: Callable[[int], Any], i: int) -> Any:
        """``read(i)``, a failure inside the dataset (a corrupt file, a transform's error) named by its index."""
        try:
            return read(i)
        except ProLIPError:
            raise
        except Exception as exc:  # a dataset's own decoding or transform can raise any type
            raise ImageLoadError(
                f"image {i} of {self.description} could not be read ({type(exc).__name__}: {exc}); "
                "fix or remove that item, or pass on_error='skip'."
            ) from exc

    def labels(self, on_error: str = "raise", verbose: bool = False) -> list[Hashable]:
        """Every item's label (``verbose``: a progress bar where items are read for it).

        Labels come from the label column (Hugging Face) or a ``targets`` attribute without reading
        any image; otherwise each item is read once, one at a time. An unreadable item raises with
        ``on_error="raise"``; with ``"skip"`` it gets a placeholder label (another item's label, so
        that it adds no class) and reading its image later raises the same error, so that the image
        loader skips it and its label with it.
        """
        if on_error not in ON_ERROR:
            raise InputError(f"on_error={on_error!r} must be one of {list(ON_ERROR)}.")
        if self._read_labels is not None:
            return self._read_labels()
        labels: list[Hashable | None] = []
        for i in progress(range(self._length), desc="reading labels", unit="item", verbose=verbose, leave=False):
            try:
                labels.append(self._guarded(lambda j: _pair(self._read_item(j), j, self.description)[1], i))
            except ProLIPError as exc:
                if on_error == "raise":
                    raise
                self._unreadable[i] = exc
                labels.append(None)
        good = next((lab for lab in labels if lab is not None), None)
        return [good if i in self._unreadable else lab for i, lab in enumerate(labels)]


def _pair(item: Any, index: int, description: str) -> tuple[Any, Hashable]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise InputTypeError(
            f"item {index} of {description} is a {type(item).__name__}; a torch Dataset must yield (image, label) pairs."
        )
    image, label = item
    return image, label.item() if isinstance(label, torch.Tensor) and label.numel() == 1 else label


def _is_hf_dataset(obj: object) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets" and hasattr(obj, "features")


def _pick_column(features: Mapping[str, Any], given: str | None, kind: str, names: Sequence[str], role: str) -> str:
    if given is not None:
        if given not in features:
            raise InputError(f"the dataset has no column {given!r}; its columns are {list(features)}.")
        return given
    typed = [name for name, feature in features.items() if type(feature).__name__ == kind]
    if len(typed) == 1:
        return typed[0]
    found = next((name for name in names if name in features), None)
    if found is None:
        raise InputError(
            f"cannot tell which column holds the {role} among {list(features)}; "
            f"pass {role}_column= to prolip.dataset_images(dataset, ...)."
        )
    return found


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _hf_image(value: Any, index: int, root: str | None) -> Any:
    """One undecoded Hugging Face ``Image`` entry (``{"bytes": ..., "path": ...}``) as an image prolip loads.

    Bytes are opened with Pillow (decoded, with its size limits, when the image is loaded); a path is a local
    file: a URL (``http://``, ``hf://``, a ``::``-chained path) is refused, and with ``root`` (the folder the
    dataset was read from) the file must lie inside it, links followed.

    Raises:
        ImageLoadError: naming the item and its path.
    """
    if not isinstance(value, Mapping):
        return value  # a plain value (a path string, an array): loaded as any image is
    data, path = value.get("bytes"), value.get("path")
    if data is not None:
        try:
            return Image.open(io.BytesIO(data))
        except Exception as exc:  # Pillow raises many types for what it cannot identify or for a bomb
            raise ImageLoadError(
                f"image {index} of the Hugging Face dataset could not be decoded ({type(exc).__name__}: {exc}); "
                "fix or remove that item, or pass on_error='skip'."
            ) from exc
    if not isinstance(path, str) or not path:
        raise ImageLoadError(f"image {index} of the Hugging Face dataset has neither bytes nor a path.")
    if _URL.match(path) or "::" in path:
        raise ImageLoadError(
            f"image {index} of the Hugging Face dataset names the URL {path[:200]!r}; prolip never downloads "
            "anything: give the dataset with its images' bytes or local files."
        )
    if root is None:
        return path
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([full, os.path.realpath(root)]) != os.path.realpath(root):
        raise ImageLoadError(
            f"image {index} of the Hugging Face dataset in {root!r} names {path[:200]!r}, a file outside the "
            "dataset's folder; prolip reads a dataset folder's images from inside it only."
        )
    return full


def _from_hf(dataset: Any, image_column: str | None, label_column: str | None, root: str | None) -> DatasetImages:
    if type(dataset).__name__ != "Dataset":
        raise InputTypeError(
            f"a Hugging Face {type(dataset).__name__} cannot be read by index; pass a datasets.Dataset "
            "(e.g. load_dataset(..., split='train'), not streaming)."
        )
    features = dataset.features
    image_column = _pick_column(features, image_column, "Image", IMAGE_COLUMNS, "image")
    label_column = _pick_column(features, label_column, "ClassLabel", LABEL_COLUMNS, "label")
    label_feature, image_feature = features[label_column], features[image_column]
    names = label_feature.names if type(label_feature).__name__ == "ClassLabel" else None
    images = dataset.select_columns([image_column])  # reading an item then reads its image only
    if type(image_feature).__name__ == "Image":  # decoded here, not by datasets (which would fetch a URL)
        images = images.cast_column(image_column, type(image_feature)(decode=False))
    return DatasetImages(
        lambda i: _hf_image(images[i][image_column], i, root),
        len(dataset),
        lambda: list(dataset[label_column]),
        names,
        f"the Hugging Face dataset (column {image_column!r})",
    )


def _from_torch(dataset: torch.utils.data.Dataset) -> DatasetImages:
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise InputTypeError(
            f"{type(dataset).__name__} has no length or cannot be read by index; pass a map-style "
            "torch.utils.data.Dataset (with __len__ and __getitem__) yielding (image, label)."
        )
    description = f"the {type(dataset).__name__} dataset"
    n = len(dataset)
    targets = getattr(dataset, "targets", None)  # torchvision's datasets hold their labels without images
    has_targets = targets is not None and hasattr(targets, "__len__") and len(targets) == n
    classes = getattr(dataset, "classes", None)
    return DatasetImages(
        lambda i: _pair(dataset[i], i, description)[0],
        n,
        (lambda: [t.item() if isinstance(t, torch.Tensor) else t for t in targets]) if has_targets else None,
        classes if has_targets and isinstance(classes, Sequence) and not isinstance(classes, str) else None,
        description,
        read_item=dataset.__getitem__,
    )


def dataset_images(
    dataset: Any, image_column: str | None = None, label_column: str | None = None, *, root: str | None = None
) -> DatasetImages:
    """A dataset object as prolip's image input (what every ``images`` argument accepts).

    Args:
        dataset: a map-style ``torch.utils.data.Dataset`` yielding ``(image, label)``, or a Hugging
            Face ``datasets.Dataset``.
        image_column: the Hugging Face column of images; default: the one ``Image`` column, else
            ``"image"`` or ``"img"``.
        label_column: the Hugging Face column of labels; default: the one ``ClassLabel`` column,
            else ``"label"`` or ``"labels"``. A ``ClassLabel``'s names become the class names.
        root: for a Hugging Face dataset read from a folder, that folder: image paths must lie inside it
            (see :func:`_hf_image`).

    Passing the dataset itself as ``images`` is the same as passing ``dataset_images(dataset)``.
    """
    if isinstance(dataset, DatasetImages):
        return dataset
    if _is_hf_dataset(dataset):
        return _from_hf(dataset, image_column, label_column, root)
    if image_column is not None or label_column is not None or root is not None:
        raise InputError("image_column, label_column and root apply to a Hugging Face datasets.Dataset only.")
    if isinstance(dataset, torch.utils.data.Dataset):
        return _from_torch(dataset)
    raise InputTypeError(
        f"{type(dataset).__name__} is not a dataset object; pass a torch.utils.data.Dataset or a datasets.Dataset."
    )


def load_hf_dataset(folder: str | os.PathLike, split: str = "train") -> DatasetImages:
    """The images and labels of the ``datasets.Dataset`` in ``folder``, read one at a time.

    The dataset is the one ``save_to_disk`` wrote (its ``split`` if it holds a ``DatasetDict``), else the
    folder read as an ``imagefolder`` (``<class>/<images>``, or with split folders
    ``train/<class>/<images>``), whose labels are a ``ClassLabel`` of the folder names. Its images are
    decoded by prolip: an entry naming a URL, or a file outside ``folder``, is refused when read
    (:func:`prolip.features.dataset_objects.hf_image`).

    Needs ``datasets`` (``pip install "prolip[datasets]"``).

    Raises:
        InputError: the folder does not exist, or has no ``split``.
    """
    try:
        import datasets
    except ImportError as exc:
        raise InputError(
            'reading a Hugging Face dataset needs the datasets package: pip install "prolip[datasets]"'
        ) from exc
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InputError(f"{str(root)!r} is not a folder; give a folder written by save_to_disk or an image folder.")
    saved = (root / "state.json").is_file() or (root / "dataset_dict.json").is_file()
    try:
        data = datasets.load_from_disk(str(root)) if saved else datasets.load_dataset("imagefolder", data_dir=str(root))
    except Exception as exc:  # a damaged state.json, an unknown feature type, no data files: datasets' own types
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        raise InputError(
            f"{str(root)!r} could not be read as a Hugging Face dataset ({type(exc).__name__}: {reason}); give a "
            "folder written by save_to_disk, or an image folder of class folders."
        ) from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise InputError(f"{str(root)!r} has the splits {list(data)}, not {split!r}; choose one with --split.")
        data = data[split]
    if len(data) == 0:
        raise InputError(f"the dataset in {str(root)!r} (split {split!r}) has no rows.")
    return dataset_images(data, root=str(root.resolve()))


def as_dataset_images(images: Any) -> DatasetImages | None:
    """``images`` as :class:`DatasetImages` when it is a dataset object, else None (a plain sequence)."""
    if isinstance(images, (DatasetImages, torch.utils.data.Dataset)) or _is_hf_dataset(images):
        return dataset_images(images)
    return None


class Labelled(NamedTuple):
    """Images with their labels and class names, as :func:`labelled` returns them.

    ``label_ids``: for a dataset whose labels are integer ids of named classes (a ``ClassLabel``), each name's id:
    the labels are then the names.
    """

    images: Any
    labels: Sequence[Hashable]
    class_names: Mapping[Hashable, str] | Sequence[str] | None
    label_ids: Mapping[str, int] | None = None


def labelled(
    images: Any,
    labels: Sequence[Hashable] | None,
    class_names: Mapping[Hashable, str] | Sequence[str] | None = None,
    on_error: str = "raise",
    verbose: bool = False,
) -> Labelled:
    """Images, labels and class names from what a user passed to ``fit`` or ``score``.

    A dataset object brings its own labels (when ``labels`` is None). Where they are integer ids of named classes
    (a Hugging Face ``ClassLabel``, a torchvision dataset's ``classes``), the labels are the names — what
    ``predict`` returns and a folder of class folders is scored against — and ``label_ids`` maps each name to its
    id. Rows without a label (a ``ClassLabel``'s −1, None, NaN) are left out, with one warning counting them.
    Items that cannot be read for their label are skipped by the image loader later under ``on_error="skip"``.
    """
    source = as_dataset_images(images)
    if source is None:
        if labels is None:
            raise InputTypeError(
                "labels must be a sequence with one label per image, not None; only a dataset object "
                "(a torch or Hugging Face Dataset) brings its own labels."
            )
        return Labelled(images, labels, class_names)
    if labels is not None:
        return Labelled(source, labels, class_names)
    raw = source.labels(on_error, verbose)
    missing = [i for i, label in enumerate(raw) if is_unlabelled(label, named_ids=source.class_names is not None)]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        warn(f"{len(missing)} of {len(raw)} items of {source.description} have no label (-1, None or NaN): "
             f"rows {shown}; they are left out.")  # fmt: skip
        kept = [i for i in range(len(raw)) if i not in set(missing)]
        source, raw = source.select(kept), [raw[i] for i in kept]
    names = source.class_names
    if names is None or class_names is not None:
        return Labelled(source, raw, class_names if class_names is not None else names)
    bad = next((label for label in raw if not (isinstance(label, int) and 0 <= label < len(names))), None)
    if bad is not None:
        raise InputError(
            f"{source.description} has label {bad!r}, which is not one of its {len(names)} class ids 0..{len(names) - 1}."
        )
    return Labelled(source, [names[i] for i in raw], None, {name: i for i, name in enumerate(names)})


def is_unlabelled(label: Any, named_ids: bool = False) -> bool:
    """A dataset's "no label": None or NaN; with ``named_ids`` (labels are ids of named classes) also −1, a
    ``ClassLabel``'s "no label"."""
    label = label.item() if hasattr(label, "item") and not isinstance(label, (str, bytes)) else label
    if label is None or (isinstance(label, float) and math.isnan(label)):
        return True
    return named_ids and isinstance(label, int) and not isinstance(label, bool) and label == -1
