"""Datasets: CoOp's few-shot suite and a user's own images as :class:`Dataset`, few-shot draws, Fashion-MNIST.

* :func:`read_dataset` / :func:`read_coop` read the 15 datasets of CoOp's layout by reader name
  (:data:`COOP_DATASETS`), and :func:`read_image_dataset` a user's folder; each gives a
  :class:`Dataset` of train / val / test :class:`Item` s with its class names and prompts.
* :func:`draw_shots` and :func:`draw_validation` draw N images per class, reproducibly on every
  machine; :func:`write_draw` / :func:`read_draw` keep them as JSON.
* :func:`base_new_split` is CoCoOp's base-to-new class split.
* :func:`load_fashion_mnist`, :data:`SHIFTS` and :func:`export_image_folder` serve the offline demos.

The layouts are in docs/datasets.md. Nothing here downloads anything except
``load_fashion_mnist(download=True)``.
"""

from prolip.datasets.catalog import read_dataset
from prolip.datasets.coop import (
    COOP_DATASETS,
    COOP_LAYOUTS,
    IMAGENET_TEMPLATES,
    IMAGENET_VARIANTS,
    PAPER_DATASETS,
    CoOpLayout,
    read_coop,
)
from prolip.datasets.dataset import SPLIT_NAMES, Dataset, Item
from prolip.datasets.draws import (
    DRAW_FORMAT,
    DRAW_VERSION,
    Draw,
    draw_json,
    draw_shots,
    draw_validation,
    read_draw,
    write_draw,
)
from prolip.datasets.fashion_mnist import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    SHIFTS,
    SPLITS,
    apply_shift,
    default_data_root,
    export_image_folder,
    few_shot_indices,
    load_fashion_mnist,
)
from prolip.datasets.generic import TEMPLATES_FILE, read_image_dataset
from prolip.datasets.splits import base_new_split, select_classes
from prolip.datasets.templates import read_templates

__all__ = [
    "COOP_DATASETS",
    "COOP_LAYOUTS",
    "DEBIAN_FASHION_MNIST_DIR",
    "DRAW_FORMAT",
    "DRAW_VERSION",
    "FASHION_MNIST_CLASSES",
    "IMAGENET_TEMPLATES",
    "IMAGENET_VARIANTS",
    "PAPER_DATASETS",
    "SHIFTS",
    "SPLITS",
    "SPLIT_NAMES",
    "TEMPLATES_FILE",
    "CoOpLayout",
    "Dataset",
    "Draw",
    "Item",
    "apply_shift",
    "base_new_split",
    "default_data_root",
    "draw_json",
    "draw_shots",
    "draw_validation",
    "export_image_folder",
    "few_shot_indices",
    "load_fashion_mnist",
    "read_coop",
    "read_dataset",
    "read_draw",
    "read_image_dataset",
    "read_templates",
    "select_classes",
    "write_draw",
]
