"""The keys of Tip-Adapter's cache model from the bench's features, for ``tip-adapter`` and ``tip-adapter-f``.

The scores and the α / β search are :mod:`prolip.training.tip_cache`, shared with the library's ProLIP + Tip-Adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prolip.bench.method_tools import embed_view
from prolip.bench.problem import FeatureSet
from prolip.model.head import LinearHead
from prolip.training.tip_cache import AUGMENT_VIEWS


def cache_keys(head: LinearHead, train: FeatureSet, views: int = AUGMENT_VIEWS) -> torch.Tensor:
    """Keys ``[n, d_out]``: the mean over the first ``views`` augmented views of each training
    image's unnormalised embedding, L2-normalised (as the original builds them)."""
    total = sum(embed_view(head, train, v) for v in range(views))
    return F.normalize(total, dim=-1)
