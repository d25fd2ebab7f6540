"""The one linear-head type: a tower's last linear map ``y = x W + b (+ r)`` as tensors.

ProLIP trains such a map and leaves the rest of the model alone: the vision tower's projector (the image
side) or the text tower's final projection (the text side). A :class:`LinearHead` holds W in the ``x @ W``
orientation and the frozen bias b; for towers that add a per-input residual r after the map (SigLIP's
attention-pool head), the stored features hold r beside x (:meth:`prolip.model.towers.Projector.pack`),
and it enters like the bias. Training, the estimators, the files, export and the bench all compute
``x W + b + r`` here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LinearHead:
    """``y = x W + b (+ r)``: a tower's last linear map.

    Attributes:
        weight: W ``[d_in, d_out]`` (``x @ W``), e.g. W0 of the vision projector or of the text projection.
        bias: b ``[d_out]`` (frozen), or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        """d_in, the width of x."""
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        """d_out, the width of the embedding."""
        return self.weight.shape[1]

    def frozen(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LinearHead:
        """A detached copy on ``device`` in ``dtype`` (W contiguous), that nothing else shares."""
        weight = self.weight.detach().to(device, dtype).contiguous().clone()
        return LinearHead(weight, None if self.bias is None else self.bias.detach().to(device, dtype).clone())

    def split(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x, r)`` of stored features ``[..., d_in]`` or ``[..., d_in + d_out]`` (x, then the residual r)."""
        d_in = self.in_features
        if features.shape[-1] == d_in:
            return features, None
        return features[..., :d_in], features[..., d_in:]

    def project(self, features: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x W + b + r`` (before normalisation) of stored features ``[..., d_in (+ d_out)]``; W is this head's unless given."""
        x, residual = self.split(features)
        w = self.weight if weight is None else weight
        z = x @ w.to(x)
        if self.bias is not None:
            z = z + self.bias.to(z)
        if residual is not None:
            z = z + residual.to(z)
        return z

    def embed(self, features: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``normalize(x W + b + r)``: unit embeddings of stored features."""
        return F.normalize(self.project(features, weight), dim=-1)

    def logits(
        self, features: torch.Tensor, classifier: torch.Tensor, logit_scale: float, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``s · normalize(x W + b + r) · Tᵀ``: class scores ``[..., K]`` of stored features under the classifier T."""
        embedding = self.embed(features, weight)
        return logit_scale * embedding @ classifier.to(embedding).t()
