"""VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation", §3).

VeRA freezes one pair of random low-rank matrices ``A: (r, in_max)`` and ``B: (out_max, r)`` shared by
every adapted layer and learns only two scaling vectors per layer (§3, Eq. 2)::

    y = W x + Λ_b B Λ_d A x        Λ_d = diag(d), d: (r,)      Λ_b = diag(b), b: (out,)

        x ─────────────► W ───────────────┐
        │                                 (+) ──► y
        └─► A[:, :in] ─► ·d ─► B[:out] ─► ·b

* Shared projections (§3: "a single pair of randomly initialized matrices ... shared across all layers"):
  generated once per adapter from the seed ``projection_prng_key`` with Kaiming-uniform init, sized to the
  largest input and output among the adapter's targets; each layer uses the leading slice ``A[:, :in]``,
  ``B[:out, :]``. Generation matches peft exactly (a CPU ``torch.Generator`` seeded with the key draws A,
  then B), so the same seed gives the same matrices in both libraries. They are buffers that are never
  saved natively: loading regenerates them from the seed kept in the config.
* Init (§3.2 and peft): ``b = 0`` (the adapted model starts as the base model), ``d = d_initial``
  (0.1: "we initialize d with a small constant"); only ``b`` and ``d`` train.
* Mergeable: ``ΔW = diag(b) B diag(d) A`` in the canonical ``(out, in)`` layout.

Works on ``nn.Linear`` and GPT-2 ``Conv1D``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import backend_for
from ..component import Component
from ..config import AdapterConfig, register

PUBLIC = ("VeRA",)
__all__ = ["VeRA", "VeRAProjection", "VeRALinear", "kaiming_uniform"]


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain √2, fan-in = ``shape[1]``) drawn from ``generator``: ``U(-b, b)``, ``b = √(6 / fan_in)``
    (the matrices peft's VeRA draws for a given ``projection_prng_key``)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjection(nn.Module):
    """The frozen shared matrices of one VeRA adapter (a child of every one of its components).

    Shapes: ``A: (r, in_max)``, ``B: (out_max, r)``. Non-persistent buffers: regenerated from ``seed``.
    """

    def __init__(
        self, r: int, in_max: int, out_max: int, seed: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        A = kaiming_uniform((r, in_max), generator)
        B = kaiming_uniform((out_max, r), generator)
        self.register_buffer("A", A.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("B", B.to(device=device, dtype=dtype), persistent=False)

    def extra_repr(self) -> str:
        return f"A={tuple(self.A.shape)}, B={tuple(self.B.shape)}"


@register("vera")
@dataclasses.dataclass(frozen=True, kw_only=True)
class VeRA(AdapterConfig):
    """Vector-based random matrix adaptation of linear-like modules.

    Args:
        r: rank of the shared projections (> 0; §4 uses ranks of 256-1024 since only ``r`` values per layer train).
        projection_prng_key: seed of the shared projections (peft's field of the same name).
        d_initial: initial value of every entry of ``d`` (§3.2; 0.1 as in peft).
        dropout: dropout probability on the VeRA branch input.
        init_weights: False starts ``b = 1`` and ``d ~ N(0, 1)`` as peft does (not an identity; for tests).
        targets: default ``["attn.q", "attn.v"]`` (§4), or ``"attn.qkv"`` on models with a fused projection (GPT-2).
    """

    r: int = 256
    projection_prng_key: int = 0
    d_initial: float = 0.1
    dropout: float = 0.0
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"VeRA rank r must be a positive integer, got r={self.r!r}")
        if not isinstance(self.projection_prng_key, int):
            raise ValueError(f"projection_prng_key must be an integer seed, got {self.projection_prng_key!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VeRA dropout must be in [0, 1), got {self.dropout!r}")

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("attn.qkv",) if "attn.q" not in roles and "attn.qkv" in roles else ("attn.q", "attn.v")

    def accepts(self, module: nn.Module) -> bool:
        backend = backend_for(module)
        return backend is not None and backend.kind == "linear"

    def projection_for(self, modules: Sequence[nn.Module]) -> VeRAProjection:
        """The shared matrices for components on ``modules`` (sized to their largest input and output)."""
        dims = [backend_for(m).dims(m) for m in modules]
        weight = modules[0].weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        in_max, out_max = max(d[0] for d in dims), max(d[1] for d in dims)
        return VeRAProjection(self.r, in_max, out_max, self.projection_prng_key, weight.device, dtype)

    def build(self, module: nn.Module, name: str, projection: VeRAProjection | None = None) -> Component:
        """The component for ``module``; ``projection`` is the adapter's shared one (default: sized to ``module``)."""
        if not self.accepts(module):
            raise TypeError(
                f"VeRA cannot act on {name!r} ({type(module).__name__}): it supports nn.Linear and Conv1D"
            )
        return VeRALinear(self, module, projection if projection is not None else self.projection_for([module]))

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        for n in targets:
            if not self.accepts(modules[n]):
                self.build(modules[n], n)  # raises with the module's name
        projection = self.projection_for([modules[n] for n in targets]) if targets else None
        return {n: self.build(modules[n], n, projection) for n in targets}


class VeRALinear(Component):
    """VeRA on a linear-like module: ``y + b ⊙ (B[:out] (d ⊙ (A[:, :in] x)))``.

    Shapes: ``x: (..., in)``, ``y: (..., out)``, ``lambda_d: (r,)``, ``lambda_b: (out,)``; ``projection`` holds the
    shared ``A: (r, in_max)`` and ``B: (out_max, r)``.
    """

    mergeable = True
    additive = True

    def __init__(self, cfg: VeRA, module: nn.Module, projection: VeRAProjection) -> None:
        super().__init__()
        in_dim, out_dim = backend_for(module).dims(module)
        if projection.A.shape[1] < in_dim or projection.B.shape[0] < out_dim or projection.A.shape[0] != cfg.r:
            raise ValueError(
                f"VeRA projections {tuple(projection.A.shape)}/{tuple(projection.B.shape)} are too small for a "
                f"({out_dim}, {in_dim}) weight with r={cfg.r}"
            )
        self.in_dim, self.out_dim, self.r = in_dim, out_dim, cfg.r
        factory = {"device": projection.A.device, "dtype": projection.A.dtype}
        self.lambda_d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial), **factory))
        self.lambda_b = nn.Parameter(torch.zeros(out_dim, **factory))
        self.projection = projection  # shared with the adapter's other components
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self._random = not cfg.init_weights

    def extra_repr(self) -> str:
        return f"r={self.r}, in={self.in_dim}, out={self.out_dim}"

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        if self._random:
            self.lambda_b.fill_(1.0)
            self.lambda_d.normal_()

    def _A(self) -> torch.Tensor:
        return self.projection.A[:, : self.in_dim]  # (r, in)

    def _B(self) -> torch.Tensor:
        return self.projection.B[: self.out_dim, :]  # (out, r)

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x if self.dropout is None else self.dropout(x)
        h = F.linear(x.to(self.lambda_d.dtype), self._A()) * self.lambda_d  # (..., r)
        return y + (F.linear(h, self._B()) * self.lambda_b).to(y.dtype)

    def delta_weight(self, module: nn.Module) -> torch.Tensor:
        """``diag(b) B diag(d) A``: ``(out, in)``."""
        b, d = self.lambda_b.detach(), self.lambda_d.detach()
        return (b[:, None] * self._B()) @ (d[:, None] * self._A())
