"""How to read and write a module's dense weight: one small entry per module type.

Adapters act through hooks and never need to know a module's class, except to *merge*: then they
need the weight in a canonical layout. The table maps module types to accessors (minLoRA's idea).
Canonical layouts:

=============  ==========================  ====================
kind           canonical weight            module example
=============  ==========================  ====================
``linear``     ``(out_features, in_features)``  ``nn.Linear``, GPT-2 ``Conv1D`` (stored transposed)
``conv2d``     ``(out, in, kh, kw)``       ``nn.Conv2d``
``embedding``  ``(num_embeddings, dim)``   ``nn.Embedding``
=============  ==========================  ====================

Quantized backends (issue: quantized bases) register entries whose ``read`` dequantizes and
whose ``write`` requantizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Backend", "backend_for", "register_backend"]


@dataclass(frozen=True)
class Backend:
    """Accessors for one module type.

    Attributes:
        kind: ``"linear"``, ``"conv2d"`` or ``"embedding"``.
        dims: ``module -> (in_dim, out_dim)``; for embeddings ``(num_embeddings, embedding_dim)``.
        view: ``module -> Tensor`` writable view of the weight in the canonical layout.
    """

    kind: str
    dims: Callable[[nn.Module], tuple[int, int]]
    view: Callable[[nn.Module], torch.Tensor]

    def read(self, module: nn.Module) -> torch.Tensor:
        """The dense weight in canonical layout (a view; clone before changing it)."""
        return self.view(module)

    @torch.no_grad()
    def add_(self, module: nn.Module, delta: torch.Tensor, alpha: float = 1.0) -> None:
        """``W += alpha * delta`` in place, in the weight's dtype."""
        w = self.view(module)
        w.add_(delta.to(w.dtype), alpha=alpha)

    @torch.no_grad()
    def copy_(self, module: nn.Module, value: torch.Tensor) -> None:
        self.view(module).copy_(value)

    def shape(self, module: nn.Module) -> tuple[int, ...]:
        """Shape of ``module.weight`` as a dense tensor (quantized backends: before packing)."""
        return tuple(module.weight.shape)


_TABLE: list[tuple[type, Backend]] = []


def register_backend(module_type: type, backend: Backend) -> None:
    """Register accessors for ``module_type`` (later registrations win over earlier ones)."""
    _TABLE.insert(0, (module_type, backend))


def backend_for(module: nn.Module) -> Backend | None:
    """The accessors for ``module``, or None when adapterkit cannot address its weight."""
    for cls, backend in _TABLE:
        if isinstance(module, cls):
            return backend
    return None


register_backend(nn.Linear, Backend("linear", lambda m: (m.in_features, m.out_features), lambda m: m.weight.data))
register_backend(nn.Conv2d, Backend("conv2d", lambda m: (m.in_channels, m.out_channels), lambda m: m.weight.data))
register_backend(
    nn.Embedding,
    Backend("embedding", lambda m: (m.num_embeddings, m.embedding_dim), lambda m: m.weight.data),
)

try:  # GPT-2 style Conv1D stores its weight as (in, out)
    from transformers.pytorch_utils import Conv1D

    register_backend(
        Conv1D, Backend("linear", lambda m: (m.weight.shape[0], m.weight.shape[1]), lambda m: m.weight.data.T)
    )
except ImportError:  # pragma: no cover - transformers is a core dependency
    pass
