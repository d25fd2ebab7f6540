"""Base-model fingerprints that do not depend on the precision the model was loaded in.

A delta only makes sense on the model it was trained from: the same projector W0 *and* the same
trunk before it (the features W was trained on). A hash of the weights cannot tell "the same
checkpoint loaded in bf16" from "another checkpoint": rounding changes the bytes. So a fingerprint
here is a *sketch*: for the projector (every value) and for the whole vision tower (a sample of
each tensor), 16 signed sums of the values
(value ``i`` of each tensor goes to bucket ``i mod 16`` with a sign from a fixed pseudo-random
pattern, offset by a hash of the tensor's name), computed in float64, with each bucket's norm.

Rounding a weight to a precision with unit roundoff u moves it by at most u·|w|, so a bucket sum
moves by a random walk of size at most u·(bucket norm); two copies of the same weights therefore
agree within ``8 · u · norm`` in every bucket (u of the coarser of the two precisions), while
different weights differ by about their distance ‖W − W'‖. In fp32 the test is as strict as fp32
itself; in bf16 it cannot see changes below bf16's resolution, which no bf16 model can either.
This detects mistakes, not forgeries: it is not a cryptographic hash.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BUCKETS = 16
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8}
_FP16_FLOOR = 2.0**-25  # fp16 stores values below its subnormal spacing with this absolute error
_SIGMAS = 8.0  # tolerance in standard deviations of the rounding random walk
TOWER_SAMPLE = 1 << 16  # values sketched per tower tensor: any real change of checkpoint shows in them
_PERIOD = 1 << 16  # length of the sign pattern; a multiple of BUCKETS
_CHUNK = 1 << 22  # values per pass (a multiple of _PERIOD), to bound the float64 temporaries


def _sign_table(device: torch.device) -> torch.Tensor:
    """A fixed pseudo-random ±1 pattern of :data:`_PERIOD` values from an integer hash: the same on every device."""
    h = torch.arange(_PERIOD, dtype=torch.int64)
    h = (h * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    h = ((h ^ (h >> 12)) * 0x297A2D39) & 0xFFFFFFFF
    return (1.0 - 2.0 * ((h >> 31) & 1).to(torch.float64)).to(device)


@dataclass(frozen=True)
class Sketch:
    """Signed bucket sums and bucket norms of a set of named tensors (see the module docstring)."""

    count: int
    sums: tuple[float, ...]
    norms: tuple[float, ...]

    @classmethod
    def of(cls, tensors: Iterable[tuple[str, torch.Tensor]], sample: int | None = None) -> Sketch:
        """The sketch of ``(name, tensor)`` pairs (order does not matter).

        ``sample`` caps the values taken from each tensor at that many, evenly spaced (all of them
        when None); ``count`` still counts every value, so a change of shape always shows.
        """
        sums = torch.zeros(_PERIOD, dtype=torch.float64)
        squares = torch.zeros(_PERIOD, dtype=torch.float64)
        count, tables = 0, {}
        for name, tensor in tensors:
            flat = tensor.detach().reshape(-1)
            count += flat.numel()
            if sample is not None and flat.numel() > sample:
                flat = flat[:: -(-flat.numel() // sample)]
            # float64 where the device has it (CUDA, CPU); MPS has none, so its tensors come to the CPU.
            if flat.device.type not in ("cpu", "cuda"):
                flat = flat.cpu()
            if flat.device not in tables:
                tables[flat.device] = _sign_table(flat.device)
            # Each tensor's own offset into the pattern, so equal tensors under other names sum differently.
            signs = tables[flat.device].roll(zlib.crc32(name.encode()) % _PERIOD)
            for start in range(0, flat.numel(), _CHUNK):
                part = flat[start : start + _CHUNK].to(torch.float64)
                part = torch.nn.functional.pad(part, (0, -part.numel() % _PERIOD)).view(
                    -1, _PERIOD
                )  # zeros add nothing
                rows = torch.ones(part.shape[0], dtype=torch.float64, device=part.device)
                # Column sums as matrix-vector products: far faster than .sum(0) on a tall matrix.
                sums += (part.t().mv(rows) * signs).cpu()
                squares += part.square_().t().mv(rows).cpu()
        sums, squares = sums.view(-1, BUCKETS).sum(0), squares.view(-1, BUCKETS).sum(0)  # value i → bucket i mod 16
        return cls(count, tuple(sums.tolist()), tuple(squares.sqrt().tolist()))

    def distance(self, other: Sketch, precisions: tuple[str, str]) -> float:
        """How far apart the two sketches are, in units of the rounding tolerance (≤ 1: the same weights)."""
        if self.count != other.count:
            return math.inf
        u = max(UNIT_ROUNDOFF[p] for p in precisions)
        floor = _FP16_FLOOR * math.sqrt(self.count / BUCKETS) if "fp16" in precisions else 0.0
        worst = 0.0
        for s, t, n, m in zip(self.sums, other.sums, self.norms, other.norms, strict=True):
            tolerance = _SIGMAS * (u * max(n, m) + floor) + 1e-300
            worst = max(worst, abs(s - t) / tolerance)
        return worst

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"count": self.count, "sums": list(self.sums), "norms": list(self.norms)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sketch:
        """Inverse of :meth:`as_dict`; raises ValueError on a malformed value."""
        count, sums, norms = data["count"], data["sums"], data["norms"]
        numbers = [*sums, *norms]
        if not (
            isinstance(count, int)
            and count > 0
            and len(sums) == len(norms) == BUCKETS
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers)
            and min(norms) >= 0
        ):
            raise ValueError("malformed sketch")
        return cls(count, tuple(float(v) for v in sums), tuple(float(v) for v in norms))


@dataclass(frozen=True)
class Fingerprint:
    """What a delta records of its base model: sketches of W0 and of the whole vision tower.

    Attributes:
        projector: sketch of the projector weight W0.
        tower: sketch of every parameter and buffer of the vision tower (trunk and projector),
            :data:`TOWER_SAMPLE` evenly spaced values of each.
        precision: the precision the base was loaded in when the sketches were taken.
    """

    projector: Sketch
    tower: Sketch
    precision: str

    @classmethod
    def of(
        cls,
        projector_key: str,
        weight: torch.Tensor,
        tower: nn.Module | Iterable[tuple[str, torch.Tensor]],
        precision: str,
    ) -> Fingerprint:
        """The fingerprint of a loaded tower whose projector weight is ``weight``.

        ``tower`` is the tower module (a vision tower) or its named tensors (the text tower, whose
        parts may sit on the CLIP model itself).
        """
        tensors = tower.state_dict().items() if isinstance(tower, nn.Module) else tower
        return cls(Sketch.of([(projector_key, weight)]), Sketch.of(tensors, sample=TOWER_SAMPLE), precision)

    def mismatch(self, other: Fingerprint, side: str = "vision") -> str | None:
        """None when ``other`` is the same base model (up to both precisions' rounding), else what differs.

        ``side`` ("vision" or "text") names the tower in the message.
        """
        precisions = (self.precision, other.precision)
        projector = self.projector.distance(other.projector, precisions)
        name, short = ("projector W0", "projector") if side == "vision" else (f"{side} projection",) * 2
        if projector > 1:
            return f"its {name} differs ({projector:.3g} times the rounding tolerance)"
        tower = self.tower.distance(other.tower, precisions)
        if tower > 1:
            times = f"{tower:.3g} times the rounding tolerance"
            return f"its {short} matches but the {side} tower before it differs ({times})"
        return None

    def summary(self, weight: str = "W0") -> str:
        """A short human-readable line: sizes and norms of the sketched tensors (``weight`` names the projector)."""
        w_norm = math.sqrt(sum(n * n for n in self.projector.norms))
        t_norm = math.sqrt(sum(n * n for n in self.tower.norms))
        return (
            f"{weight}: {self.projector.count:,} values, norm {w_norm:.6g}; "
            f"tower: {self.tower.count:,} values, norm {t_norm:.6g} (taken in {self.precision})"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form, as stored in delta files."""
        return {"precision": self.precision, "projector": self.projector.as_dict(), "tower": self.tower.as_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> Fingerprint:
        """Inverse of :meth:`as_dict`; raises ValueError on a malformed value."""
        try:
            if data["precision"] not in UNIT_ROUNDOFF:
                raise ValueError("unknown precision")
            return cls(Sketch.from_dict(data["projector"]), Sketch.from_dict(data["tower"]), data["precision"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed fingerprint ({type(exc).__name__})") from None
