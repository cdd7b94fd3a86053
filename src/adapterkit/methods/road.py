"""RoAd (Liao et al. 2024, "2D Rotary Adaptation: Efficient Fine-Tuning, Batching and Composability", §3):
2×2 rotations with scales applied to pairs of a linear layer's outputs.

The outputs ``z = W x + b`` are split into groups of ``group_size`` elements; inside a group, element ``j`` of
the first half is paired with element ``j`` of the second half (``h = group_size / 2``), and each pair is
rotated by an angle θ and scaled by α (§3, Eq. 4)::

    [z'_j    ]   [α_j cos θ_j     -α_j sin θ_j  ] [z_j    ]
    [z'_{j+h}] = [α_{j+h} sin θ_{j+h}  α_{j+h} cos θ_{j+h}] [z_{j+h}]

        x ──► W ──► z ──► R z = z ⊙ f + flip(z) ⊙ s ──► y      (f, s: (out,) vectors, flip swaps the halves)

so the whole adapter is two ``(out,)`` vectors per layer and the forward is element-wise (§3.2: "RoAd only
requires element-wise multiplication", which is what makes batching many adapters cheap, §3.3).

Variants (peft's ``RoadConfig.variant``; §3.1 "RoAd_1/2/4"):

* ``road_1``: one (θ, α) per pair: ``road_theta, road_alpha: (out / 2,)``, each value used for both elements;
* ``road_2``: one (θ, α) per element: ``(out,)``, ``f = α cos θ``, ``s = α sin θ``;
* ``road_4``: separate (θ, α) for the cosine and sine entries: ``(2 · out,)``, per group the first
  ``group_size`` values drive ``f = α₁ cos θ₁``, the next ``group_size`` ``s = α₂ sin θ₂``.

Init as peft: θ = 0, α = 1 (the identity); ``init_weights=False`` draws θ ~ N(0, 0.5²), α ~ N(1, 0.5²).

Merging (peft): ``W ← R W``, ``b ← R b``. R is block 2×2 per pair, so merging and unmerging act element-wise on
the weight's rows; unmerging applies the exact inverse of each 2×2 block (``det = f_j f_{j+h} - s'_j s'_{j+h}``),
and a block with a zero or non-finite determinant is refused before any weight changes (:meth:`RoadLayer.check_merge`).

Per-row routing (``adapters.route``) gathers one ``f`` and one ``s`` vector per row (``(batch, out)``) and applies
the same element-wise formula: many RoAd adapters in one batch cost two gathers of small vectors.

Works on ``nn.Linear`` and GPT-2 ``Conv1D`` (peft: ``nn.Linear`` only, so adapters on ``Conv1D`` are not exported
to peft). ``out_features`` must be divisible by ``group_size``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..backends import backend_for
from ..component import Component
from ..config import AdapterConfig, register

PUBLIC = ("RoAd",)
__all__ = ["RoAd", "RoadVariant", "RoadLayer", "road_vectors", "rotate_pairs"]


class RoadVariant(str, enum.Enum):
    """How many angles and scales each pair of outputs gets (§3.1)."""

    ROAD_1 = "road_1"
    ROAD_2 = "road_2"
    ROAD_4 = "road_4"


_SIZE = {RoadVariant.ROAD_1: 0.5, RoadVariant.ROAD_2: 1, RoadVariant.ROAD_4: 2}  # parameters per output element


@register("road")
@dataclasses.dataclass(frozen=True, kw_only=True)
class RoAd(AdapterConfig):
    """2D rotary adaptation of linear-like modules' outputs (defaults as peft's ``RoadConfig``).

    Args:
        variant: ``"road_1"`` (one angle and scale per pair, ``out / 2`` each), ``"road_2"`` (per element,
            ``out``) or ``"road_4"`` (separate cosine and sine parameters, ``2 · out``).
        group_size: outputs are paired inside groups of this many elements (element ``j`` with ``j +
            group_size / 2``); even, and dividing every target's ``out_features``. peft's default 64 suits large
            models; small ones need a smaller value. It does not change what the method can learn (§3: the
            pairing is arbitrary), only memory access patterns.
        init_weights: False starts from random angles and scales (not an identity; for tests).
        targets: default ``["attn.q", "attn.v"]``, or ``"attn.qkv"`` on models with a fused projection (GPT-2).
    """

    variant: RoadVariant = RoadVariant.ROAD_1
    group_size: int = 64
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            object.__setattr__(self, "variant", RoadVariant(self.variant))
        except ValueError:
            raise ValueError(
                f"RoAd variant must be one of {[v.value for v in RoadVariant]}, got {self.variant!r}"
            ) from None
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % 2:
            raise ValueError(f"RoAd group_size must be a positive even integer, got group_size={g!r}")

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("attn.qkv",) if "attn.q" not in roles and "attn.qkv" in roles else ("attn.q", "attn.v")

    def accepts(self, module: nn.Module) -> bool:
        backend = backend_for(module)
        return backend is not None and backend.kind == "linear"

    def build(self, module: nn.Module, name: str) -> Component:
        if not self.accepts(module):
            raise TypeError(
                f"RoAd cannot act on {name!r} ({type(module).__name__}): it supports nn.Linear and Conv1D; "
                "pick other targets"
            )
        out_dim = backend_for(module).dims(module)[1]
        if out_dim % self.group_size:
            raise ValueError(
                f"RoAd group_size={self.group_size} does not divide the {out_dim} outputs of {name!r}: pass a "
                f"group_size that divides every target's out_features (e.g. group_size={_fitting(out_dim)})"
            )
        return RoadLayer(module, self.variant, self.group_size, self.init_weights)


def _fitting(out_dim: int) -> int:
    """The largest even divisor of ``out_dim`` up to 64 (for the error message)."""
    return max((g for g in range(2, 65, 2) if out_dim % g == 0), default=2)


def road_vectors(
    variant: RoadVariant, group_size: int, theta: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f, s)``, both ``(out,)``, with ``R z = z ⊙ f + flip(z) ⊙ s`` (see :func:`rotate_pairs`).

    ``f`` is the diagonal of R (``α cos θ``); ``s`` its off-diagonal entries, with the minus sign of the rotation
    folded in for the first half of each group (``-α sin θ`` there, ``+α sin θ`` in the second half).
    """
    h = group_size // 2
    if variant is RoadVariant.ROAD_1:  # one pair of parameters per (j, j + h), shared by both elements
        theta = theta.reshape(-1, 1, h).expand(-1, 2, h).reshape(-1)
        alpha = alpha.reshape(-1, 1, h).expand(-1, 2, h).reshape(-1)
        f, s = alpha * theta.cos(), alpha * theta.sin()
    elif variant is RoadVariant.ROAD_2:
        f, s = alpha * theta.cos(), alpha * theta.sin()
    else:  # road_4: per group, [group_size cosine parameters, group_size sine parameters]
        theta, alpha = theta.reshape(-1, 2, group_size), alpha.reshape(-1, 2, group_size)
        f = (alpha[:, 0] * theta[:, 0].cos()).reshape(-1)
        s = (alpha[:, 1] * theta[:, 1].sin()).reshape(-1)
    sign = torch.ones(2, h, dtype=s.dtype, device=s.device)
    sign[0] = -1
    return f, (s.reshape(-1, 2, h) * sign).reshape(-1)


def rotate_pairs(z: torch.Tensor, f: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """``z ⊙ f + flip(z) ⊙ s`` along the last dim of ``z: (..., out)``, where ``flip`` swaps the two halves of
    every group of ``group_size`` elements. ``f, s`` broadcast against ``z`` (``(out,)`` or ``(batch, 1.., out)``)."""
    h = group_size // 2
    out = z * f
    zv = z.unflatten(-1, (-1, 2, h))
    sv = s.unflatten(-1, (-1, 2, h))
    halves = out.unflatten(-1, (-1, 2, h))  # a view of out: the two in-place updates below write into it
    halves[..., 0, :].addcmul_(zv[..., 1, :], sv[..., 0, :])
    halves[..., 1, :].addcmul_(zv[..., 0, :], sv[..., 1, :])
    return out


class RoadLayer(Component):
    """RoAd on one linear-like module: ``y' = R y`` with ``R`` block 2×2 per pair of outputs.

    Shapes: ``y: (..., out)``; ``road_theta, road_alpha: (out / 2,)`` (road_1), ``(out,)`` (road_2) or
    ``(2 · out,)`` (road_4).
    """

    mergeable = True
    additive = False

    def __init__(
        self, module: nn.Module, variant: RoadVariant, group_size: int, init_weights: bool = True
    ) -> None:
        super().__init__()
        self.variant = RoadVariant(variant)
        self.group_size = int(group_size)
        self.out_dim = backend_for(module).dims(module)[1]
        weight = module.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        size = int(self.out_dim * _SIZE[self.variant])
        self.road_theta = nn.Parameter(torch.zeros(size, dtype=dtype, device=weight.device))
        self.road_alpha = nn.Parameter(torch.ones(size, dtype=dtype, device=weight.device))
        self._random = not init_weights

    def extra_repr(self) -> str:
        return f"variant={self.variant.value}, group_size={self.group_size}, out={self.out_dim}"

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        if self._random:  # peft's init_weights=False
            nn.init.normal_(self.road_theta, mean=0.0, std=0.5)
            nn.init.normal_(self.road_alpha, mean=1.0, std=0.5)
        else:
            nn.init.zeros_(self.road_theta)
            nn.init.ones_(self.road_alpha)

    def vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, s)``: ``(out,)`` each, see :func:`road_vectors`."""
        return road_vectors(self.variant, self.group_size, self.road_theta, self.road_alpha)

    def matrix(self) -> torch.Tensor:
        """The dense ``(out, out)`` R (for tests and inspection; the forward never builds it)."""
        eye = torch.eye(self.out_dim, dtype=self.road_theta.dtype, device=self.road_theta.device)
        f, s = self.vectors()
        return rotate_pairs(eye, f, s, self.group_size).T  # row i of eye is e_i: column i of R

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f, s = self.vectors()
        return rotate_pairs(y.to(f.dtype), f, s, self.group_size).to(y.dtype)

    # --- merging: W <- R W, b <- R b (element-wise on the rows) ------------------------------------------
    def _inverse(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f', s')`` of R⁻¹ (same form): per pair ``[[f_a, s_a], [s_b, f_b]]⁻¹ = [[f_b, -s_a], [-s_b, f_a]] / det``."""
        f, s = (v.detach() for v in self.vectors())
        h = self.group_size // 2
        swap = lambda v: v.reshape(-1, 2, h).flip(-2).reshape(-1)  # noqa: E731
        det = f * swap(f) - s * swap(s)
        return swap(f) / det, -s / det

    def check_merge(self, module: nn.Module) -> None:
        """Refuse rotations that could not be unmerged (a 2×2 block with zero or non-finite determinant)."""
        if backend_for(module) is None:
            raise TypeError(f"cannot merge into {type(module).__name__}: no weight backend registered")
        with torch.no_grad():
            fi, si = self._inverse()
        if not bool(torch.isfinite(fi).all() and torch.isfinite(si).all()):
            raise ValueError(
                f"cannot merge RoAd into {type(module).__name__}: a 2x2 block has a zero scale (determinant 0) or "
                "non-finite values, so it could not be unmerged; keep the adapter unmerged"
            )

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        if self.merged:
            return
        self.check_merge(module)  # before any weight changes
        f, s = (v.detach() for v in self.vectors())
        self._rotate(module, f, s)
        self.merged = True

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        if not self.merged:
            return
        self._rotate(module, *self._inverse())
        self.merged = False

    def _rotate(self, module: nn.Module, f: torch.Tensor, s: torch.Tensor) -> None:
        backend = backend_for(module)
        weight = backend.read(module)  # (out, in)
        rows = rotate_pairs(weight.T.to(f.dtype), f, s, self.group_size).T
        backend.copy_(module, rows.to(weight.dtype))
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.data.copy_(rotate_pairs(bias.data.to(f.dtype), f, s, self.group_size).to(bias.dtype))

    # --- per-row routing: one gathered (f, s) pair of vectors per row ------------------------------------
    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: torch.Tensor, key: Any) -> Any:
        """``y ⊙ f[row] + flip(y) ⊙ s[row]`` with each row's vectors gathered from a ``(2, G + 1, out)`` stack
        (base rows and adapters without a component here get ``f = 1, s = 0``). Adapters with different
        ``group_size`` pair other elements: they fall back to one call per adapter."""
        live = [c for c in comps if c is not None]
        group = live[0].group_size
        if any(c.group_size != group for c in live):
            return None

        def build() -> torch.Tensor:
            ref = live[0].road_theta
            ones = torch.ones(live[0].out_dim, dtype=ref.dtype, device=ref.device)
            fs = [c.vectors() if c is not None else (ones, torch.zeros_like(ones)) for c in comps]
            fs.append((ones, torch.zeros_like(ones)))  # rows of the base model
            return torch.stack([torch.stack([f for f, _ in fs]), torch.stack([s for _, s in fs])])

        def gather() -> torch.Tensor:  # (2, batch, 1.., out): this plan's rows, kept across its decode steps
            rows = plan.stacked(key, build).index_select(1, plan.row_group)
            return rows.view(2, rows.shape[1], *([1] * (y.dim() - 2)), rows.shape[2])

        rows = plan.stacked((key, "rows", y.dim()), gather, per_plan=True)
        return rotate_pairs(y.to(rows.dtype), rows[0], rows[1], group).to(y.dtype)
