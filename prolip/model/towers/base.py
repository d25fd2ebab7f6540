"""What every trained linear map has in common, and the check that it is the one the tower uses.

A tower family knows where its last linear map lives and how to compute that map's input; the
classes here turn that knowledge into the few operations ProLIP needs (the weight in a fixed
``[d_in, d_out]`` orientation, the frozen bias: a :class:`~prolip.model.head.LinearHead`) and check, on a
random input, that ``x W + b + r`` reproduces what open_clip itself computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch import nn

from prolip.errors import InputError, UnsupportedModelError
from prolip.model.head import LinearHead

# Largest accepted relative error (per row, Euclidean) between open_clip's embedding and x W + b + r.
# Reduced precision and TF32 kernels may sum in another order than the tower; a wrong layer is off by O(1).
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
CHECK_SEED = 0
CHECK_ROWS = 2


class LinearMap:
    """A linear layer ``y = x W + b (+ r)`` at the end of an open_clip tower.

    ``key`` is the state-dict key of the weight W relative to the full CLIP model, ``transposed`` is
    True where W is stored ``[d_out, d_in]`` (``nn.Linear``), and ``has_residual`` says whether the
    tower adds a per-input residual r, independent of W, after the map (like the bias b, r stays frozen).
    """

    family: ClassVar[str]
    has_residual: ClassVar[bool] = False
    key: str
    transposed: bool

    @property
    def parameter(self) -> nn.Parameter:
        """The model's own weight, in its own orientation (never modified by prolip)."""
        raise NotImplementedError

    @property
    def bias(self) -> torch.Tensor | None:
        """The frozen bias added after the map, or None."""
        return None

    def to_in_out(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight in the parameter's orientation, seen as ``[d_in, d_out]``."""
        return weight.t() if self.transposed else weight

    def from_in_out(self, weight: torch.Tensor) -> torch.Tensor:
        """A ``[d_in, d_out]`` matrix put back into the parameter's orientation."""
        return weight.t() if self.transposed else weight

    @property
    def in_features(self) -> int:
        """Width of the map's input (the pre-projection features)."""
        return self.to_in_out(self.parameter).shape[0]

    @property
    def out_features(self) -> int:
        """Width of the map's output (the image-text embedding space)."""
        return self.to_in_out(self.parameter).shape[1]

    @property
    def head(self) -> LinearHead:
        """The map as a :class:`~prolip.model.head.LinearHead` over the model's own tensors (W0 seen ``[d_in, d_out]``, b)."""
        return LinearHead(self.to_in_out(self.parameter), self.bias)


class LinearLayerMap(LinearMap):
    """A map stored as an ``nn.Linear``: weight ``[d_out, d_in]``, optional bias."""

    transposed = True

    @property
    def layer(self) -> nn.Linear:
        """The ``nn.Linear`` holding the map."""
        raise NotImplementedError

    @property
    def parameter(self) -> nn.Parameter:
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias


class Projector(LinearMap):
    """The last linear map of an open_clip vision tower: ``encode_image = x W + b + r``.

    Subclasses form the registry of tower families (see ``prolip.model.towers.registry``): ``recognises``
    tells whether a vision tower is of the family, ``features`` runs the tower up to, but not
    through, the map. The tower must be in eval mode for ``features`` (dropout, drop-path).
    """

    description: ClassVar[str]

    def __init__(self, visual: nn.Module) -> None:
        self.visual = visual

    @classmethod
    def recognises(cls, visual: nn.Module) -> bool:
        """Whether ``visual`` is a vision tower of this family."""
        raise NotImplementedError

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x [n, d_in], r [n, d_out] or None)`` for normalised images ``[n, 3, H, W]``."""
        raise NotImplementedError

    @property
    def feature_width(self) -> int:
        """Width of the stored pre-projection features: ``d_in``, plus ``d_out`` for a residual (see :meth:`pack`)."""
        return self.in_features + (self.out_features if self.has_residual else 0)

    def pack(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """One row per image holding x and, beside it, r: ``[..., feature_width]``.

        prolip stores, caches and trains on features in this form, so a tower with a residual
        needs nothing else carried around; :meth:`prolip.model.head.LinearHead.split` takes it apart.
        """
        return x if residual is None else torch.cat([x, residual.to(x.dtype)], dim=-1)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the block, then restore each one's own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def check_generator() -> torch.Generator:
    """The seeded CPU generator of the random inputs used by the reproduction checks."""
    return torch.Generator().manual_seed(CHECK_SEED)


def check_device(model: nn.Module, what: str) -> None:
    """Refuse to run a reproduction check on a model without data (the meta device)."""
    if any(p.is_meta for p in model.parameters()):
        raise InputError(
            f"{what} is on the meta device, so it cannot be run to check its projector; pass verify=False."
        )


def check_reproduces(
    expected: torch.Tensor | tuple[torch.Tensor, ...], got: torch.Tensor, dtype: torch.dtype, what: str, why: str
) -> None:
    """Raise UnsupportedModelError unless ``got`` matches ``expected`` row by row to ``dtype``'s tolerance.

    Args:
        expected: what open_clip computes, ``[n, d_out]`` or a tuple whose first element it is
            (towers built with ``output_tokens`` also return their tokens).
        got: ``x W + b + r`` as prolip computes it.
        dtype: the model's dtype, which sets the tolerance.
        what: the tower, as named in the error.
        why: what was compared, for the error message.
    """
    if isinstance(expected, tuple):
        expected = expected[0]
    expected, got = expected.detach().double(), got.detach().double()
    tolerance = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    if expected.shape != got.shape:
        error = f"shapes differ: {tuple(expected.shape)} from open_clip, {tuple(got.shape)} from prolip"
    else:
        scale = expected.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
        relative = float(((got - expected).norm(dim=-1) / scale).max())
        if relative <= tolerance:  # False for NaN
            return
        error = f"relative error {relative:.2g} (tolerance {tolerance:g})"
    raise UnsupportedModelError(
        f"prolip located the projector of {what} but could not reproduce its output: {why}: {error}. This open_clip "
        "or timm version computes the tower differently from what prolip expects, so training that layer would be "
        "wrong; please report it with the model name and your open_clip and timm versions."
    )


def captured(run: Callable[[], object], hooks: dict[str, tuple[nn.Module, bool]]) -> dict[str, torch.Tensor]:
    """Run ``run()`` (e.g. a transformers forward pass); per name, the hooked module's first input or output.

    ``hooks`` maps a name to ``(module, True)`` for the module's first input, ``(module, False)`` for its
    (first) output.
    """
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, (module, want_input) in hooks.items():

        def hook(_m, args, out, name=name, want_input=want_input):
            seen[name] = args[0] if want_input else (out[0] if isinstance(out, tuple) else out)

        handles.append(module.register_forward_hook(hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen
