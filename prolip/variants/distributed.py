"""Feature extraction sharded over the processes of a ``torch.distributed`` job (e.g. ``torchrun``).

Every process loads and hashes the whole image list (cheap next to the forward passes), computes
the views of its share of the images into a feature cache that all processes can reach (a local
folder on one machine, a shared filesystem across machines), waits for the others at a barrier,
and gets the same lazy :class:`~prolip.features.cache.CachedFeatures` over all images. Typically rank 0
then fits and saves. Only a barrier is communicated: no tensors or Python objects travel between
processes, so the result does not depend on the backend (NCCL on GPUs, Gloo on CPUs).

Example (``torchrun --nproc_per_node=4 train.py``)::

    from prolip import ProLIPAdapter
    from prolip.variants.distributed import extract_distributed, init_distributed

    device = init_distributed()
    adapter = ProLIPAdapter("ViT-B-32", "openai", device=device, cache_dir="/shared/prolip-cache")
    features = extract_distributed(adapter, images)
    if torch.distributed.get_rank() == 0:
        adapter.fit_features(features, labels).save("delta.safetensors")
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from prolip.errors import InputError
from prolip.features.cache import CachedFeatures
from prolip.features.extract import feature_cache, fill_cache, image_hash
from prolip.features.images import ImageLike, load_for_model, report_skipped
from prolip.params import VIEWS, validate_params

if TYPE_CHECKING:
    from prolip.adapter import ProLIPAdapter

logger = logging.getLogger(__name__)


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised default process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(backend: str | None = None, timeout_minutes: float = 120.0) -> torch.device:
    """Join the job ``torchrun`` describes in the environment and return this process's device.

    ``backend=None`` picks NCCL when CUDA is available (each process then uses GPU
    ``LOCAL_RANK``) and Gloo otherwise. Outside ``torchrun`` (no ``RANK`` in the environment)
    nothing is initialised and the default device is returned. The barrier after extraction
    waits for the slowest shard, so the timeout is long by default.
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if "RANK" not in os.environ or dist.is_initialized():
        return device
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend or ("nccl" if cuda else "gloo"),
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    logger.info("joined process group: rank %d of %d on %s", dist.get_rank(), dist.get_world_size(), device)
    return device


def barrier() -> None:
    """Wait for every process of the default group (a no-op outside a distributed job)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def extract_distributed(
    adapter: ProLIPAdapter,
    images: Sequence[ImageLike],
    cache_dir: str | os.PathLike | None = None,
    views: int | None = None,
) -> CachedFeatures:
    """Extract the training features of ``images`` with every process of the job; all get the result.

    Each process computes the views of the distinct images at positions ``rank, rank + world,
    ...`` that the cache lacks, writes them to the cache, and waits at a barrier for the others.
    Without an initialised process group this is ``adapter.extract_features(images)`` with a cache.

    Args:
        adapter: the (unfitted) adapter; its model, precision, views and ``random_state`` define
            the features. ``random_state`` must be an int so that every process draws the same views.
        images: the training images, the same list in every process.
        cache_dir: the feature cache every process can reach; None uses ``adapter.cache_dir``
            (which this sets when given).
        views: views per image; None uses ``adapter.views``.

    Returns:
        Lazy features ``[V, n, d_in]`` for :meth:`~prolip.ProLIPAdapter.fit_features`.
    """
    if cache_dir is not None:
        adapter.set_params(cache_dir=cache_dir)
    if adapter.cache_dir is None:
        raise InputError("extract_distributed needs a feature cache: pass cache_dir, a folder every process can reach.")
    if adapter.random_state is None:
        raise InputError("random_state=None would give each process different views; set random_state to an int.")
    params = adapter.get_params(deep=False)
    views = params["views"] if views is None else views
    adapter.check_params()
    validate_params({"views": views}, {"views": VIEWS})
    backbone = adapter.backbone
    cache = feature_cache(
        backbone, params["cache_dir"], views=views, seed=params["random_state"], storage=params["cache_dtype"]
    )
    loaded = load_for_model(images, params["on_error"], backbone.draft_size, verbose=params["verbose"])
    adapter.skipped_ = loaded.skipped  # as extract_features records them, so labels can be aligned
    report_skipped(loaded)
    images = loaded.images
    hashes = [image_hash(im) for im in images]
    rank, world = rank_and_world_size()
    computed = fill_cache(
        backbone,
        images,
        cache,
        batch_size=params["batch_size"],
        verbose=params["verbose"],
        hashes=hashes,
        rank=rank,
        world_size=world,
    )
    logger.info("rank %d of %d computed %d of %d images", rank, world, len(computed), len(hashes))
    barrier()  # every shard is in the cache past this point
    return cache.features(hashes)
