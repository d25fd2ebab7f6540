"""The benchmark's data: CoOp's few-shot suite and a user's dataset folders as :class:`Dataset`, few-shot draws.

* :func:`read_dataset` / :func:`read_coop` read the 15 datasets of CoOp's layout by reader name
  (:data:`COOP_DATASETS`), and :func:`read_image_dataset` a user's folder; each gives a
  :class:`Dataset` of train / val / test :class:`Item` s with its class names and prompts.
* :func:`draw_shots` and :func:`draw_validation` draw N images per class, reproducibly on every
  machine; :func:`write_draw` / :func:`read_draw` keep them as JSON.
* :func:`base_new_split` is CoCoOp's base-to-new class split.
* :mod:`prolip.bench.data.mini_suite` writes the miniature suite (Fashion-MNIST in CoOp's layout).

The layouts are in docs/datasets.md. Nothing here downloads anything.
"""

from prolip.bench.data.catalog import TEMPLATES_FILE, read_dataset, read_image_dataset
from prolip.bench.data.coop import (
    COOP_DATASETS,
    COOP_LAYOUTS,
    IMAGENET_TEMPLATES,
    IMAGENET_VARIANTS,
    PAPER_DATASETS,
    CoOpLayout,
    read_coop,
)
from prolip.bench.data.dataset import SPLIT_NAMES, Dataset, Item
from prolip.bench.data.draws import (
    DRAW_FORMAT,
    DRAW_VERSION,
    Draw,
    draw_json,
    draw_shots,
    draw_validation,
    read_draw,
    write_draw,
)
from prolip.bench.data.splits import base_new_split, select_classes

__all__ = [
    "COOP_DATASETS",
    "COOP_LAYOUTS",
    "DRAW_FORMAT",
    "DRAW_VERSION",
    "IMAGENET_TEMPLATES",
    "IMAGENET_VARIANTS",
    "PAPER_DATASETS",
    "SPLIT_NAMES",
    "TEMPLATES_FILE",
    "CoOpLayout",
    "Dataset",
    "Draw",
    "Item",
    "base_new_split",
    "draw_json",
    "draw_shots",
    "draw_validation",
    "read_coop",
    "read_dataset",
    "read_draw",
    "read_image_dataset",
    "select_classes",
    "write_draw",
]
