"""Datasets by name under one data root: CoOp's reader names, or any other folder in the generic layout."""

from __future__ import annotations

import os
from pathlib import Path

from prolip.datasets.coop import COOP_LAYOUTS, read_coop
from prolip.datasets.dataset import Dataset
from prolip.datasets.generic import read_image_dataset
from prolip.errors import InputError


def read_dataset(name: str, data_root: str | os.PathLike) -> Dataset:
    """The dataset called ``name`` under ``data_root``.

    A reader name of :data:`prolip.datasets.COOP_LAYOUTS` (``"imagenet"``, ``"caltech101"``, ...)
    reads CoOp's layout (:func:`prolip.datasets.read_coop`); any other name is the folder
    ``data_root/name`` in the generic layout (:func:`prolip.datasets.read_image_dataset`).

    Raises:
        InputError: the dataset is missing or malformed; the message says what was expected where.
    """
    if name in COOP_LAYOUTS:
        return read_coop(name, data_root)
    folder = Path(data_root).expanduser() / name
    if not folder.is_dir():
        raise InputError(
            f"dataset {name!r} is neither a CoOp reader name ({', '.join(COOP_LAYOUTS)}) nor a folder "
            f"{str(folder)!r} of your own data (train/, val/, test/ of class folders, or train.csv, val.csv, "
            "test.csv); see docs/datasets.md."
        )
    return read_image_dataset(folder, name=name)
