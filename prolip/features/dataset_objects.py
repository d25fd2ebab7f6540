"""Dataset objects as image input: a ``torch.utils.data.Dataset`` of ``(image, label)`` items, or a Hugging Face
``datasets.Dataset`` with an image column and a label column, read one item at a time (never all at once)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from prolip.errors import ImageLoadError, InputError, InputTypeError, ProLIPError
from prolip.params import ON_ERROR

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
        for i in tqdm(range(self._length), desc="reading labels", unit="item", disable=not verbose, leave=False):
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


def _from_hf(dataset: Any, image_column: str | None, label_column: str | None) -> DatasetImages:
    if type(dataset).__name__ != "Dataset":
        raise InputTypeError(
            f"a Hugging Face {type(dataset).__name__} cannot be read by index; pass a datasets.Dataset "
            "(e.g. load_dataset(..., split='train'), not streaming)."
        )
    features = dataset.features
    image_column = _pick_column(features, image_column, "Image", IMAGE_COLUMNS, "image")
    label_column = _pick_column(features, label_column, "ClassLabel", LABEL_COLUMNS, "label")
    label_feature = features[label_column]
    names = label_feature.names if type(label_feature).__name__ == "ClassLabel" else None
    images = dataset.select_columns([image_column])  # reading an item then decodes its image only
    return DatasetImages(
        lambda i: images[i][image_column],
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


def dataset_images(dataset: Any, image_column: str | None = None, label_column: str | None = None) -> DatasetImages:
    """A dataset object as prolip's image input (what every ``images`` argument accepts).

    Args:
        dataset: a map-style ``torch.utils.data.Dataset`` yielding ``(image, label)``, or a Hugging
            Face ``datasets.Dataset``.
        image_column: the Hugging Face column of images; default: the one ``Image`` column, else
            ``"image"`` or ``"img"``.
        label_column: the Hugging Face column of labels; default: the one ``ClassLabel`` column,
            else ``"label"`` or ``"labels"``. A ``ClassLabel``'s names become the class names.

    Passing the dataset itself as ``images`` is the same as passing ``dataset_images(dataset)``.
    """
    if isinstance(dataset, DatasetImages):
        return dataset
    if _is_hf_dataset(dataset):
        return _from_hf(dataset, image_column, label_column)
    if image_column is not None or label_column is not None:
        raise InputError("image_column and label_column name columns of a Hugging Face datasets.Dataset only.")
    if isinstance(dataset, torch.utils.data.Dataset):
        return _from_torch(dataset)
    raise InputTypeError(
        f"{type(dataset).__name__} is not a dataset object; pass a torch.utils.data.Dataset or a datasets.Dataset."
    )


def as_dataset_images(images: Any) -> DatasetImages | None:
    """``images`` as :class:`DatasetImages` when it is a dataset object, else None (a plain sequence)."""
    if isinstance(images, (DatasetImages, torch.utils.data.Dataset)) or _is_hf_dataset(images):
        return dataset_images(images)
    return None


class Labelled(NamedTuple):
    """Images with their labels and class names, as :func:`labelled` returns them."""

    images: Any
    labels: Sequence[Hashable]
    class_names: Mapping[Hashable, str] | Sequence[str] | None


def labelled(
    images: Any,
    labels: Sequence[Hashable] | None,
    class_names: Mapping[Hashable, str] | Sequence[str] | None = None,
    on_error: str = "raise",
    verbose: bool = False,
) -> Labelled:
    """Images, labels and class names from what a user passed to ``fit`` or ``score``.

    A dataset object brings its own labels (when ``labels`` is None) and, with a Hugging Face
    ``ClassLabel``, its class names (when ``class_names`` is None). Items that cannot be read
    for their label are skipped by the image loader later under ``on_error="skip"``.
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
    names = source.class_names if class_names is None else class_names
    return Labelled(source, source.labels(on_error, verbose), names)
