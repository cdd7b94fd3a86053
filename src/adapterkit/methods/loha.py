"""LoHa (Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning", §3; LyCORIS's ``loha``): the update is the Hadamard (element-wise) product of two low-rank matrices::

    ΔW = s · (W1a W1b) ⊙ (W2a W2b)      W1a, W2a: (out, r)    W1b, W2b: (r, in)    s = alpha / r

        x ─────────► W ─────────────────────┐
        │                                   (+) ──► y = W x + s · U (V x)
        └─► V: (r², in) ─► U: (out, r²) ─► ·s ┘      (U, V: row/column-wise products of the factors, below)

* Rank: the Hadamard product of two rank-``r`` matrices has rank up to ``r²`` (FedPara §3, Prop. 1) with
  ``2 r (out + in)`` trained numbers (LoRA needs ``r² (out + in)`` for that rank).
* Init as peft's ``LoHaConfig`` (FedPara's He init): ``W1a, W1b, W2a`` Kaiming-uniform (``a = √5``) and
  ``W2b = 0``, so ΔW = 0 at init; ``init_weights=False`` draws ``W2b`` too (not an identity; for tests).
* ``rank_dropout`` (peft/LyCORIS): in training, each output row of ΔW is kept with probability
  ``1 - rank_dropout`` and the kept rows are rescaled by ``1 / mean(kept)``; ``module_dropout``: in training,
  the whole branch is skipped with that probability.
* Mergeable: ΔW in the canonical ``(out, in)`` layout (``(out, in, kh, kw)`` for convolutions).

Works on ``nn.Linear``, GPT-2 ``Conv1D`` (not in peft: such adapters cannot be exported to peft) and
``nn.Conv2d`` with the flattened ``(out, in/groups · kh · kw)`` factors (peft's default
``use_effective_conv2d=False``) or, with ``use_effective_conv2d=True`` on k×k kernels (k > 1), peft's CP form:
each factor pair becomes ``T_i ×₁ W_ia ×₂ W_ib`` with a core ``hada_t{i}: (r, r, kh, kw)``,
``hada_w{i}_a: (r, out)``, ``hada_w{i}_b: (r, in)`` (FedPara §3.2, LyCORIS ``use_tucker``).

**ABBA** (Singhal et al. 2025, "ABBA: Highly Expressive Hadamard Product Adaptation for Large Language Models",
§3) is the same update with independently ranked pairs and another init, so it is an option of this component:
``ak.LoHa(r=r1, r2=r2, init_weights="abba")``::

    ΔW = s · (B1 A1) ⊙ (B2 A2)     B1: (out, r1)  A1: (r1, in)  B2: (out, r2)  A2: (r2, in)  (= W1a, W1b, W2a, W2b)

* ``r2`` (default ``r``): rank of the second pair; the update has rank up to ``r1 · r2`` (ABBA §3.1) and the
  scaling is ``s = alpha / √(r1 · r2)`` (``alpha / r`` when the ranks are equal, as LoHa's).
* ``init_weights="abba"`` (ABBA §3.3; the authors' ``init_weights_svd_mixed``): the first pair is the top-``r1``
  truncated SVD of the frozen weight split evenly, ``B1 = U √Σ``, ``A1 = √Σ Vᵀ`` (flattened ``(out, in·kh·kw)``
  for convolutions), ``A2`` Kaiming-uniform and ``B2 = 0``, so ΔW = 0 at init. The authors scale each pair by
  ``√alpha_i`` (``s = √(alpha1 · alpha2)``): their ``alpha1 = alpha2 = a`` with ``r1 = r2 = r`` is ``alpha = a · r``
  here.
* Forward: the row-wise Khatri–Rao factors below (ABBA §3.2) with ``r1 · r2`` columns.

Forward on linear-like modules: the Hadamard product of two rank-``r`` products is one rank-``r²`` product,
``(W1a W1b) ⊙ (W2a W2b) = U V`` with ``U[o, (i, j)] = W1a[o, i] W2a[o, j]`` and ``V[(i, j), n] = W1b[i, n] W2b[j, n]``,
so ``ΔW x = s · U (V x)`` costs ``O(r² (in + out))`` per token and never builds the ``(out, in)`` ΔW (nor keeps
it for backward) whenever ``r² (in + out) <= in · out``; otherwise (large ``r`` on small layers) and on
convolutions the dense ΔW is built per forward, as peft does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import backend_for
from ..component import Component
from ..config import AdapterConfig, register
from .lora import _finite_real, check_rank_alpha, pattern_value

PUBLIC = ("LoHa",)
__all__ = ["LoHa", "LoHaLayer", "LycorisBase", "LycorisConfig", "check_lycoris_config", "lycoris_shape"]


def check_lycoris_config(cfg: Any, what: str) -> None:
    """Validation shared by LoHa and LoKr: rank, alpha and patterns as LoRA's, and the two dropouts."""
    check_rank_alpha(cfg, what)
    for field in ("rank_dropout", "module_dropout"):
        value = getattr(cfg, field)
        if not _finite_real(value) or not 0.0 <= value < 1.0:
            raise ValueError(f"{what} {field} must be in [0, 1), got {value!r}")


def lycoris_shape(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """``(out, in, kernel)`` of a linear-like module (``kernel = ()``) or a Conv2d (``in`` per group)."""
    backend = backend_for(module)
    if backend.kind == "conv2d":
        return module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size)
    in_dim, out_dim = backend.dims(module)
    return out_dim, in_dim, ()


def _accepts(module: nn.Module) -> bool:
    backend = backend_for(module)
    return backend is not None and backend.kind in ("linear", "conv2d")


class LycorisConfig(AdapterConfig):
    """What the LoHa and LoKr configs share: validation, default targets, accepted modules (linear-like and
    Conv2d), per-module rank and scaling ``alpha / r``. Subclasses name their component in :meth:`layer`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lycoris_config(self, type(self).__name__)

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("attn.qkv",) if "attn.q" not in roles and "attn.qkv" in roles else ("attn.q", "attn.v")

    def accepts(self, module: nn.Module) -> bool:
        return _accepts(module)

    def rank_for(self, name: str) -> int:
        return int(pattern_value(self.rank_pattern, name, self.r))

    def scaling_for(self, name: str) -> float:
        return float(pattern_value(self.alpha_pattern, name, self.alpha)) / self.rank_for(name)

    def layer(self, module: nn.Module, name: str) -> Component:
        raise NotImplementedError

    def build(self, module: nn.Module, name: str) -> Component:
        if not self.accepts(module):
            raise TypeError(
                f"{type(self).__name__} cannot act on {name!r} ({type(module).__name__}): it supports nn.Linear, "
                "Conv1D and nn.Conv2d; pick other targets"
            )
        return self.layer(module, name)


@register("loha")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoHa(LycorisConfig):
    """Low-rank Hadamard product adaptation of linear, Conv1D and Conv2d weights (defaults as peft's
    ``LoHaConfig``).

    Args:
        r: rank of each of the two factor pairs (> 0).
        alpha: scaling numerator; ``s = alpha / r``.
        rank_dropout: probability of dropping an output row of ΔW in training (rescaled by the kept share).
        module_dropout: probability of skipping the whole update in a training forward.
        use_effective_conv2d: peft's CP decomposition of k×k convolutions (k > 1; 1×1 ones stay flat).
        rank_pattern: module-name pattern -> rank, overriding ``r`` (peft's matching rule).
        alpha_pattern: module-name pattern -> alpha, overriding ``alpha``.
        init_weights: False draws ``W2b`` too (not an identity; for tests).
        targets: default ``["attn.q", "attn.v"]``, or ``"attn.qkv"`` on models with a fused projection (GPT-2).
    """

    r: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    init_weights: bool | str = True
    r2: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r2 is not None and (isinstance(self.r2, bool) or not isinstance(self.r2, int) or self.r2 <= 0):
            raise ValueError(f"LoHa r2 (the second pair's rank, ABBA) must be a positive integer, got {self.r2!r}")
        if not isinstance(self.init_weights, bool) and self.init_weights != "abba":
            raise ValueError(
                f"LoHa init_weights must be True, False or 'abba' (SVD init of the first pair), got {self.init_weights!r}"
            )
        if self.init_weights == "abba" and self.use_effective_conv2d:
            raise ValueError("LoHa init_weights='abba' needs flat factors: drop use_effective_conv2d=True")

    def rank2_for(self, name: str) -> int:
        """Rank of the second pair at ``name``: ``r2``, else the module's ``r`` (LoHa)."""
        return self.r2 if self.r2 is not None else self.rank_for(name)

    def scaling_for(self, name: str) -> float:
        alpha = float(pattern_value(self.alpha_pattern, name, self.alpha))
        return alpha / math.sqrt(self.rank_for(name) * self.rank2_for(name))

    def layer(self, module: nn.Module, name: str) -> Component:
        return LoHaLayer(self, module, name)


class LycorisBase(Component):
    """What LoHa and LoKr components share: scaling, dropouts, and applying a dense ΔW to the input."""

    mergeable = True
    additive = True

    def __init__(self, cfg: Any, module: nn.Module, name: str) -> None:
        super().__init__()
        self.out_dim, self.in_dim, self.kernel = lycoris_shape(module)
        self.r = cfg.rank_for(name)
        self.scaling = cfg.scaling_for(name)
        self.rank_dropout = float(cfg.rank_dropout)
        self.module_dropout = float(cfg.module_dropout)
        self._random = cfg.init_weights is False
        weight = module.weight
        self._factory = {
            "device": weight.device,
            "dtype": weight.dtype if weight.is_floating_point() else torch.float32,
        }
        self.cp = bool(cfg.use_effective_conv2d) and bool(self.kernel) and self.kernel != (1, 1)
        self.conv = (
            {
                "stride": module.stride,
                "padding": module.padding,
                "dilation": module.dilation,
                "groups": module.groups,
            }
            if self.kernel
            else None
        )

    def extra_repr(self) -> str:
        kernel = f", kernel={self.kernel}" if self.kernel else ""
        return f"r={self.r}, in={self.in_dim}, out={self.out_dim}{kernel}, scaling={self.scaling:g}"

    def _param(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(shape, **self._factory))

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _row_drop(self) -> torch.Tensor | None:
        """peft's rank dropout in training: a ``(out,)`` keep mask (rescaled by its mean) or None."""
        if not (self.training and self.rank_dropout):
            return None
        drop = (torch.rand(self.out_dim) > self.rank_dropout).to(self._dtype())
        return (drop / drop.mean()).to(next(self.parameters()).device)

    def _skipped(self) -> bool:
        """peft's module dropout: in training with any dropout configured, one ``torch.rand(1)`` draw per forward
        (as peft, even when only ``rank_dropout`` is set, so the same seed gives the same masks in both
        libraries). Without dropouts nothing is drawn (peft draws anyway; the global RNG then advances
        differently, which only matters to other random layers of a model in training)."""
        return self._random_in_training() and not bool(torch.rand(1) > self.module_dropout)

    def _dense(self) -> torch.Tensor:
        """The flat ``(out, in · kh · kw)`` ΔW including the scaling (no dropout)."""
        raise NotImplementedError

    def _full(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.reshape(self.out_dim, self.in_dim, *self.kernel) if self.kernel else flat

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._skipped():
            return y
        delta = self._dense()
        drop = self._row_drop()
        if drop is not None:
            delta = delta * drop[:, None]
        x = x.to(delta.dtype)
        if self.kernel:
            out = F.conv2d(x, self._full(delta), None, **self.conv)
        else:
            out = F.linear(x, delta)
        return y + out.to(y.dtype)

    def _random_in_training(self) -> bool:
        return self.training and (self.rank_dropout > 0 or self.module_dropout > 0)

    def delta_weight(self, module: nn.Module) -> torch.Tensor:
        """ΔW in the canonical layout: ``(out, in)`` or ``(out, in, kh, kw)``."""
        with torch.no_grad():
            return self._full(self._dense().detach())


class LoHaLayer(LycorisBase):
    """LoHa on a linear-like module or a Conv2d: ``y + x ΔWᵀ`` (or the convolution with ΔW).

    Shapes (``n = in · kh · kw``): ``hada_w1_a: (out, r)``, ``hada_w1_b: (r, n)``, ``hada_w2_a: (out, r2)``,
    ``hada_w2_b: (r2, n)`` (``r2 = r`` unless ABBA's ``r2`` is set).
    """

    def __init__(self, cfg: LoHa, module: nn.Module, name: str) -> None:
        super().__init__(cfg, module, name)
        r, r2 = self.r, cfg.rank2_for(name)
        self.r2 = r2
        self.abba = cfg.init_weights == "abba"
        if self.cp:
            self.hada_t1 = self._param(r, r, *self.kernel)
            self.hada_w1_a = self._param(r, self.out_dim)
            self.hada_w1_b = self._param(r, self.in_dim)
            self.hada_t2 = self._param(r2, r2, *self.kernel)
            self.hada_w2_a = self._param(r2, self.out_dim)
            self.hada_w2_b = self._param(r2, self.in_dim)
            return
        n = self.in_dim * math.prod(self.kernel)
        self.hada_w1_a = self._param(self.out_dim, r)
        self.hada_w1_b = self._param(r, n)
        self.hada_w2_a = self._param(self.out_dim, r2)
        self.hada_w2_b = self._param(r2, n)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", r2={self.r2}" if self.r2 != self.r else "")

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        if self.abba:  # ABBA §3.3: first pair = truncated SVD of W0 (split as U√Σ, √ΣVᵀ); A2 Kaiming, B2 = 0
            weight = backend_for(module).read(module).float().reshape(self.out_dim, -1)  # (out, in · kh · kw)
            U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            k = min(self.r, S.numel())
            root = S[:k].sqrt()
            self.hada_w1_a.zero_()[:, :k].copy_((U[:, :k] * root).to(self.hada_w1_a.dtype))
            self.hada_w1_b.zero_()[:k].copy_((root[:, None] * Vh[:k]).to(self.hada_w1_b.dtype))
            nn.init.kaiming_uniform_(self.hada_w2_b)  # A2: (r2, n), Kaiming-uniform with a = 0 as the authors'
            nn.init.zeros_(self.hada_w2_a)  # B2: (out, r2) = 0, so ΔW = 0 at init
            return
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a) + (
            (self.hada_t1, self.hada_t2) if self.cp else ()
        ):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        if self._random:
            nn.init.kaiming_uniform_(self.hada_w2_b, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.hada_w2_b)

    def _dense(self) -> torch.Tensor:
        if self.cp:
            one = torch.einsum("ijkl,jr,ip->prkl", self.hada_t1, self.hada_w1_b, self.hada_w1_a)
            two = torch.einsum("ijkl,jr,ip->prkl", self.hada_t2, self.hada_w2_b, self.hada_w2_a)
            return (one * two * self.scaling).reshape(self.out_dim, -1)
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling

    def _factored(self) -> bool:
        """Apply the rank-r² factors (linear-like modules) when that is cheaper per token than ΔW."""
        return not self.kernel and self.r * self.r2 * (self.in_dim + self.out_dim) <= self.in_dim * self.out_dim

    def _uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``U: (out, r·r2)`` (scaling not included) and ``V: (r·r2, in)`` with ``(W1a W1b) ⊙ (W2a W2b) = U V``
        (the row-wise Khatri–Rao products of ABBA §3.2)."""
        u = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(self.out_dim, -1)
        v = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(-1, self.in_dim)
        return u, v

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: torch.Tensor, key: Any) -> Any:
        """Per-row routing as two batched matmuls over the rank-r² factors stacked as ``(G, in, R)`` and
        ``(G, R, out)`` (``R`` the largest r², zero-padded; scaling folded into U; adapters absent from this site
        are zeros). Convolutions and training-time dropouts fall back to one call per adapter."""
        live = [c for c in comps if c is not None]
        if any(c.kernel or c._random_in_training() for c in live):
            return None
        ref = live[0]
        R = max(c.r * c.r2 for c in live)

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            zero_v, zero_u = ref.hada_w1_b.new_zeros(ref.in_dim, R), ref.hada_w1_a.new_zeros(R, ref.out_dim)
            V, U = [], []
            for c in comps:
                if c is None:
                    V.append(zero_v)
                    U.append(zero_u)
                    continue
                u, v = c._uv()
                pad = R - c.r * c.r2
                V.append(F.pad(v, (0, 0, 0, pad)).T)
                U.append(F.pad(u * c.scaling, (0, pad)).T)
            return torch.stack(V), torch.stack(U)  # (G, in, R), (G, R, out)

        V, U = plan.stacked(key, build)
        h = torch.bmm(plan.gather(x.to(V.dtype)), V)  # (G, m * L, R)
        return plan.scatter_bmm(y, h, U)

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self._factored():
            return super().post(x, y)
        if self._skipped():
            return y
        # (W1a W1b) ⊙ (W2a W2b) = U V with U = W1a ⊙ W2a (row-wise Kronecker, (out, r²)), V = W1b ⊙ W2b ((r², in))
        u, v = self._uv()
        out = F.linear(F.linear(x.to(v.dtype), v), u * self.scaling)
        drop = self._row_drop()
        if drop is not None:
            out = out * drop
        return y + out.to(y.dtype)
