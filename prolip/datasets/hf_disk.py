"""A Hugging Face dataset on disk: a folder written by ``save_to_disk``, or an ``imagefolder`` of class folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prolip.errors import InputError


def load_hf_dataset(folder: str | os.PathLike, split: str = "train") -> Any:
    """The ``datasets.Dataset`` in ``folder``: one ``save_to_disk`` wrote (its ``split`` if it holds a
    ``DatasetDict``), else the folder read as an ``imagefolder`` (``<class>/<images>``, or with split
    folders ``train/<class>/<images>``), whose labels are a ``ClassLabel`` of the folder names.

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
    data = datasets.load_from_disk(str(root)) if saved else datasets.load_dataset("imagefolder", data_dir=str(root))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise InputError(f"{str(root)!r} has the splits {list(data)}, not {split!r}.")
        data = data[split]
    return data
