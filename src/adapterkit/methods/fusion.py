"""AdapterFusion weights (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition", §3).

At each site, the output ``h`` of the module (the query) attends over the outputs ``o_i`` of the fused
adapters (keys and values)::

    s_i = (Q h) . (K o_i) / T          α = softmax_i(s)          h' = Σ_i α_i (V o_i)

``Q``, ``K``, ``V``: ``(d, d)`` linear maps; ``V`` starts as the identity and ``Q``/``K`` near zero, so at
initialization the fusion averages its adapters' outputs (§3.2: the value matrix is initialised so that
the adapters' representations pass through). Shapes: ``h, o_i: (..., d)``.

Fusions are added with ``Adapters.add_fusion([...])`` under the name ``fusion[a,b,...]`` and used through
``ak.Fuse("a", "b", ...)``; they are saved and loaded like any adapter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from ..backends import backend_for
from ..component import Component
from ..config import AdapterConfig, register
from ..targeting import CONTAINER

PUBLIC = ("Fusion",)
__all__ = ["Fusion", "FusionLayer"]


@register("fusion")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Fusion(AdapterConfig):
    """Fusion weights over ``adapters`` (created by ``Adapters.add_fusion``; not added on its own).

    Args:
        adapters: the fused adapters' names, in order.
        temperature: softmax temperature ``T``.
        init_weights: False starts Q, K and V random (for tests).
    """

    standalone: ClassVar[bool] = False
    standalone_note: ClassVar[str] = (
        "it combines adapters that are already trained (Adapters.add_fusion in Python)"
    )

    adapters: Sequence[str] = ()
    temperature: float = 1.0
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "adapters", tuple(self.adapters))
        if self.temperature <= 0:
            raise ValueError(f"fusion temperature must be positive, got {self.temperature}")

    def accepts(self, module: nn.Module) -> bool:
        return _site_width(module, self.adapters) is not None

    def build(self, module: nn.Module, name: str) -> Component:
        found = _site_width(module, self.adapters)
        if found is None:
            raise TypeError(
                f"AdapterFusion needs a linear-like module or a fused adapter's component with an out_dim at {name!r}, "
                f"got {type(module).__name__}"
            )
        return FusionLayer(found[0], self, found[1])


def _site_width(module: nn.Module, adapters: Sequence[str]) -> tuple[int, torch.Tensor] | None:
    """``(d, a tensor for device/dtype)`` of a fusion site: a linear-like module's output width, else the ``out_dim``
    of a fused adapter's component there (sub-layer bottleneck adapters sit on dropout/attention/MLP modules)."""
    backend = backend_for(module)
    if backend is not None:
        return backend.dims(module)[1], module.weight
    comps = getattr(module, CONTAINER, None)
    for n in adapters:
        c = comps[n] if comps is not None and n in comps else None
        dim = getattr(c, "out_dim", None)
        if dim is not None:
            return int(dim), next(c.parameters())
    return None


class FusionLayer(Component):
    """Attention over adapter outputs at one site; applied only inside an ``ak.Fuse`` block."""

    has_post = False  # as a plain active name it does nothing; ``Fuse`` calls :meth:`fuse`

    def __init__(self, dim: int, cfg: Fusion, like: torch.Tensor) -> None:
        super().__init__()
        dtype = like.dtype if like.is_floating_point() else torch.float32
        self.query = nn.Linear(dim, dim, device=like.device, dtype=dtype)
        self.key = nn.Linear(dim, dim, device=like.device, dtype=dtype)
        self.value = nn.Linear(dim, dim, device=like.device, dtype=dtype)
        self.temperature = cfg.temperature
        self._random = not cfg.init_weights

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        for lin in (self.query, self.key):
            nn.init.normal_(lin.weight, std=0.02 if not self._random else 0.3)
            nn.init.zeros_(lin.bias)
        nn.init.eye_(self.value.weight)
        nn.init.zeros_(self.value.bias)
        if self._random:
            self.value.weight.add_(0.1 * torch.randn_like(self.value.weight))

    def fuse(self, h: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
        """``h: (..., d)`` and ``outs``: N tensors ``(..., d)`` -> ``(..., d)``."""
        dtype = self.query.weight.dtype  # computed in the fusion weights' dtype, returned in h's
        o = torch.stack(outs, dim=-2).to(dtype)  # (..., N, d)
        q = self.query(h.to(dtype)).unsqueeze(-2)  # (..., 1, d)
        scores = (q * self.key(o)).sum(-1) / self.temperature  # (..., N)
        alpha = scores.softmax(-1).unsqueeze(-1)
        return (alpha * self.value(o)).sum(-2).to(h.dtype)
