"""A user's images on disk, and the demo data.

* :func:`read_labelled` and :func:`read_images` read class-per-folder trees and CSV files of paths
  (what ``prolip fit``, ``predict`` and ``eval`` take); :func:`sample_shots` draws N per class.
* :func:`read_templates` and :func:`read_class_names` read prompt-template and class-name files.
* :func:`load_fashion_mnist`, :data:`SHIFTS` and :func:`export_image_folder` serve the offline demos
  with the packaged stand-in CLIP (:mod:`prolip.standin`).

The benchmark's datasets (CoOp's suite, draws, class splits) are :mod:`prolip.bench.data`. Nothing here
downloads anything except ``load_fashion_mnist(download=True)``.
"""

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
from prolip.datasets.generic import IMAGE_SUFFIXES, read_images, read_labelled, sample_shots
from prolip.datasets.templates import read_class_names, read_templates

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "IMAGE_SUFFIXES",
    "SHIFTS",
    "SPLITS",
    "apply_shift",
    "default_data_root",
    "export_image_folder",
    "few_shot_indices",
    "load_fashion_mnist",
    "read_class_names",
    "read_images",
    "read_labelled",
    "read_templates",
    "sample_shots",
]
