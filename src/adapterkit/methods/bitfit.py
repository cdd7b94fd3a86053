"""Bias deltas (BitFit, Ben-Zaken et al. 2022): learn only bias terms, kept apart from the base.

BitFit §3 trains the bias vectors of a frozen model. adapterkit learns a *delta* ``Δb`` per module and
adds it to the module's output, so the base stays bit-identical, several adapters can carry their own
biases, and merging adds ``Δb`` into the base bias. Shapes: ``y: (..., out)`` (linear-like,
LayerNorm) or ``(N, out, H, W)`` (conv), ``delta: (out,)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..component import Component

__all__ = ["BiasDelta"]


class BiasDelta(Component):
    """Adds a trainable bias delta to the output of a module that has a bias."""

    mergeable = True
    additive = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        bias = module.bias
        self.delta = nn.Parameter(torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device))
        # channel axis is dim 1 for convolutions, the last dim otherwise
        self._conv = isinstance(module, nn.modules.conv._ConvNd)

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = self.delta.to(y.dtype)
        if self._conv:
            d = d.view(-1, *([1] * (y.dim() - 2)))
        return y + d

    def delta_bias(self, module: nn.Module) -> torch.Tensor:
        return self.delta.detach()
