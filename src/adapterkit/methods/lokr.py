"""LoKr (LyCORIS's ``lokr``; Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning
to Model Evaluation", §3; the KronA idea of Edalati et al. 2022): the update is a Kronecker product::

    ΔW = s · (C ⊗ D)      C = W1: (a, c)    D = W2: (b, d)    out = a · b, in = c · d    s = alpha / r

        x ──────────────► W ─────────────────────┐
        │                                        (+) ──► y = W x + s · vec(C X Dᵀ)
        └─► X = x as (c, d) ─► C X Dᵀ ─► ·s ─────┘

* Factor sizes (peft's ``factorization(dim, decompose_factor)``): ``(a, b)`` from ``out`` and ``(c, d)`` from
  ``in``, each pair with the smaller number first; ``decompose_factor=-1`` picks the divisors closest to
  ``√dim``, a positive factor ``f`` dividing ``dim`` gives ``(f, dim / f)``.
* Low rank (peft's ``LoKrLayer`` rules): ``D = W2a W2b`` (``(b, r)``, ``(r, d)``) when ``r < max(b, d) / 2``, else
  a full ``W2``; with ``decompose_both``, ``C = W1a W1b`` (``(a, r)``, ``(r, c)``) when ``r < max(a, c) / 2``,
  else a full ``W1``. ``s = alpha / r`` in every case (as peft, unlike LyCORIS's full-matrix convention).
* Init as peft's ``LoKrConfig``: ``init_weights=True`` zeroes ``W1`` (or ``W1a``) and draws the rest
  Kaiming-uniform (``a = √5``); ``"lycoris"`` zeroes ``W2`` (or ``W2b``) instead; ``False`` draws everything
  (not an identity; for tests).
* Applied to the activations without building ΔW for linear-like modules: with ``x`` reshaped to
  ``X: (..., c, d)``, ``(C ⊗ D) vec(X) = vec(C X Dᵀ)`` (row-major), so the cost per token is
  ``O(c · d · b + a · c · b)`` (``O(in · (r + b))`` with a low-rank D) instead of ``O(out · in)``, and no
  ``(out, in)`` tensor is built in training. Convolutions (``groups=1``) likewise convolve each group of ``d``
  input channels with ``D`` and mix the groups with ``C`` (:meth:`LoKrLayer._conv_post`); grouped ones build
  ΔW (as peft).
* ``rank_dropout`` (peft/LyCORIS): in training, each output row of ΔW (each output feature) is kept with
  probability ``1 - rank_dropout``, rescaled by ``1 / mean(kept)`` with ``rank_dropout_scale``;
  ``module_dropout`` skips the whole update in a training forward with that probability.
* Mergeable: ΔW in the canonical ``(out, in)`` / ``(out, in, kh, kw)`` layout.

Works on ``nn.Linear``, GPT-2 ``Conv1D`` (not in peft: not exportable to peft) and ``nn.Conv2d`` with
flattened factors (peft's default ``use_effective_conv2d=False``; for a Conv2d, a full ``W2`` is
``(b, d, kh, kw)`` and a low-rank one ``W2a: (b, r)``, ``W2b: (r, d · kh · kw)``). The Tucker core ``lokr_t2``
is used with ``use_effective_conv2d=True`` on k×k kernels (k > 1) when D is low-rank:
``D = T ×₁ W2a ×₂ W2b`` with ``lokr_t2: (r, r, kh, kw)``, ``lokr_w2_a: (r, b)``, ``lokr_w2_b: (r, d)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..component import Component
from ..config import register
from .loha import LycorisBase, LycorisConfig

PUBLIC = ("LoKr",)
__all__ = ["LoKr", "LoKrLayer", "factorization"]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m · n = dimension`` and ``m <= n`` (LyCORIS's and peft's rule, same results).

    ``factor > 0`` dividing ``dimension`` gives ``(factor, dimension / factor)`` as is (not reordered);
    otherwise the largest ``m <= factor`` (``-1``: no bound) found while walking up the divisors while
    ``m + n`` shrinks, i.e. the divisor pair closest to ``√dimension``: ``256 -> (16, 16)``, ``128 -> (8, 16)``,
    ``127 -> (1, 127)``.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


@register("lokr")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoKr(LycorisConfig):
    """Low-rank Kronecker product adaptation of linear, Conv1D and Conv2d weights (defaults as peft's
    ``LoKrConfig``).

    Args:
        r: rank of the low-rank factor(s) (> 0); large ranks give full factors (see the module docstring).
        alpha: scaling numerator; ``s = alpha / r``.
        rank_dropout: probability of dropping an output row of ΔW in training.
        module_dropout: probability of skipping the whole update in a training forward.
        decompose_both: also factor ``C`` (``W1``) when the rank is small enough.
        decompose_factor: the factor size to aim at (``-1``: closest to ``√dim``).
        rank_dropout_scale: rescale kept rows by ``1 / mean(kept)``.
        use_effective_conv2d: peft's Tucker core of a low-rank D on k×k convolutions (k > 1).
        rank_pattern: module-name pattern -> rank, overriding ``r`` (peft's matching rule).
        alpha_pattern: module-name pattern -> alpha, overriding ``alpha``.
        init_weights: True (``W1`` zero), ``"lycoris"`` (``W2`` zero) or False (all random; for tests).
        targets: default ``["attn.q", "attn.v"]``, or ``"attn.qkv"`` on models with a fused projection (GPT-2).
    """

    r: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    use_effective_conv2d: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    init_weights: bool | str = True

    def __post_init__(self) -> None:
        super().__post_init__()
        f = self.decompose_factor
        if isinstance(f, bool) or not isinstance(f, int) or (f != -1 and f <= 0):
            raise ValueError(f"LoKr decompose_factor must be -1 or a positive integer, got {f!r}")
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"LoKr init_weights must be True, False or 'lycoris', got {self.init_weights!r}")

    def layer(self, module: nn.Module, name: str) -> Component:
        return LoKrLayer(self, module, name)


class LoKrLayer(LycorisBase):
    """LoKr on a linear-like module or a Conv2d.

    Shapes: ``lokr_w1: (a, c)`` or ``lokr_w1_a: (a, r)``, ``lokr_w1_b: (r, c)``; ``lokr_w2: (b, d[, kh, kw])`` or
    ``lokr_w2_a: (b, r)``, ``lokr_w2_b: (r, d · kh · kw)``; ``out = a · b``, ``in = c · d`` (per group).
    """

    def __init__(self, cfg: LoKr, module: nn.Module, name: str) -> None:
        super().__init__(cfg, module, name)
        r = self.r
        a, b = factorization(self.out_dim, cfg.decompose_factor)
        c, d = factorization(self.in_dim, cfg.decompose_factor)
        self.shape = (a, b, c, d)
        self.rank_dropout_scale = bool(cfg.rank_dropout_scale)
        self.init = cfg.init_weights
        self.use_w1 = not (cfg.decompose_both and r < max(a, c) / 2)
        self.use_w2 = not (r < max(b, d) / 2)
        if self.use_w1:
            self.lokr_w1 = self._param(a, c)
        else:
            self.lokr_w1_a = self._param(a, r)
            self.lokr_w1_b = self._param(r, c)
        self.cp = self.cp and not self.use_w2
        if self.use_w2:
            self.lokr_w2 = self._param(b, d, *self.kernel)
        elif self.cp:
            self.lokr_t2 = self._param(r, r, *self.kernel)
            self.lokr_w2_a = self._param(r, b)
            self.lokr_w2_b = self._param(r, d)
        else:
            self.lokr_w2_a = self._param(b, r)
            self.lokr_w2_b = self._param(r, d * math.prod(self.kernel))

    def extra_repr(self) -> str:
        a, b, c, d = self.shape
        return f"{super().extra_repr()}, C=({a}, {c}){'' if self.use_w1 else ' low-rank'}, D=({b}, {d})" + (
            "" if self.use_w2 else " low-rank"
        )

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        """Kaiming-uniform (a = √5) draws in peft's order (W1 factors, W2 factors, then the Tucker core), the
        zeroed factor not drawn at all: under one seed the random factors equal peft's ``LoKrConfig`` init."""
        w1 = [self.lokr_w1] if self.use_w1 else [self.lokr_w1_a, self.lokr_w1_b]
        w2 = [self.lokr_w2] if self.use_w2 else [self.lokr_w2_a, self.lokr_w2_b]
        zero = None
        if self.init is True:
            zero = w1[0]
        elif self.init == "lycoris":
            zero = w2[-1]
        for p in w1 + w2 + ([self.lokr_t2] if self.cp else []):
            if p is zero:
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def _w1(self) -> torch.Tensor:
        return self.lokr_w1 if self.use_w1 else self.lokr_w1_a @ self.lokr_w1_b

    def _w2(self) -> torch.Tensor:
        """D flattened to ``(b, d · kh · kw)``."""
        if self.cp:
            w2 = torch.einsum("ijkl,ip,jr->prkl", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
            return w2.reshape(w2.shape[0], -1)
        return self.lokr_w2.reshape(self.lokr_w2.shape[0], -1) if self.use_w2 else self.lokr_w2_a @ self.lokr_w2_b

    def _dense(self) -> torch.Tensor:
        return torch.kron(self._w1(), self._w2()) * self.scaling

    def _row_drop(self) -> torch.Tensor | None:
        if not (self.training and self.rank_dropout):
            return None
        drop = (torch.rand(self.out_dim) > self.rank_dropout).to(self._dtype())
        if self.rank_dropout_scale:
            drop = drop / drop.mean()
        return drop.to(next(self.parameters()).device)

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: torch.Tensor, key: Any) -> Any:
        """Per-row routing with the factors stacked as ``C: (G, a, c)`` (scaling folded in) and ``D: (G, b, d)``
        (low-rank ones multiplied out; both are small): the gathered rows ``X: (G, m·L, c, d)`` become
        ``C X Dᵀ`` in two batched matmuls. Adapters absent from this site are zeros. Convolutions, factor
        sizes that differ between the adapters (``decompose_factor``) and training-time dropouts fall back
        to one call per adapter."""
        live = [c for c in comps if c is not None]
        ref = live[0]
        if any(c.kernel or c._random_in_training() or c.shape != ref.shape for c in live):
            return None
        a, b, c_, d = ref.shape

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            dtype = ref._dtype()
            zero_c, zero_d = (
                torch.zeros(a, c_, dtype=dtype, device=y.device),
                torch.zeros(b, d, dtype=dtype, device=y.device),
            )
            C = [c._w1() * c.scaling if c is not None else zero_c for c in comps]
            D = [c._w2() if c is not None else zero_d for c in comps]
            return torch.stack(C)[:, None], torch.stack(D).transpose(1, 2)[:, None]  # (G, 1, a, c), (G, 1, d, b)

        C, Dt = plan.stacked(key, build)
        xs = plan.gather(x.to(C.dtype))  # (G, m * L, in)
        G, n = xs.shape[0], xs.shape[1]
        out = C @ (xs.reshape(G, n, c_, d) @ Dt)  # (G, m * L, a, b)
        return plan.scatter_add(y, out.reshape(G, n, a * b))

    def _conv_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Conv2d without building ΔW: with ``ΔW[(i,p), (j,q)] = s · C[i,j] · D[p,q]`` (``D[p,q]`` a ``kh×kw``
        kernel), the convolution with ΔW is, per input group ``j`` of ``d`` channels, the convolution with ``D``
        (``d -> b`` channels, the module's stride/padding/dilation) mixed over the groups by ``s · C``::

            x: (N, c·d, H, W) ─► (N·c, d, H, W) ─conv D─► (N·c, b, H', W') ─ s·C over c ─► (N, a·b, H', W')

        (or ``s · C`` first, then the convolution over ``N·a`` images, when ``a < c``). A low-rank ``D`` is a
        ``kh×kw`` convolution to ``r`` channels (``W2b``) then a 1×1 one (``W2a``); the Tucker form is 1×1
        (``W2b``), ``kh×kw`` (``lokr_t2``), 1×1 (``W2a``). Cost per output position ``min(a, c) · b · d · kh · kw
        + a · b · c`` (less with low rank) instead of ``a · b · c · d · kh · kw``: about ``√in`` times fewer
        multiplies, and no ΔW is built. Grouped convolutions use the dense ΔW."""
        if self._skipped():
            return y
        a, b, c, d = self.shape
        C = self._w1() * self.scaling
        args = {k: v for k, v in self.conv.items() if k != "groups"}
        unbatched = x.dim() == 3
        X = x.to(C.dtype)
        if unbatched:
            X = X[None]
        N, _, H, W = X.shape
        X = X.reshape(N, c, d, H, W)
        mix_first = a < c  # convolve the smaller number of d-channel images
        if mix_first:
            X = torch.einsum("ij,njdhw->nidhw", C, X)
        X = X.reshape(-1, d, H, W)
        if self.use_w2:
            Z = F.conv2d(X, self.lokr_w2, None, **args)
        elif self.cp:
            Z = F.conv2d(X, self.lokr_w2_b[:, :, None, None])  # (r, d): pointwise, before the spatial core
            Z = F.conv2d(Z, self.lokr_t2, None, **args)  # T[i, j]: out i, in j
            Z = F.conv2d(Z, self.lokr_w2_a.T[:, :, None, None])  # (b, r)
        else:
            Z = F.conv2d(X, self.lokr_w2_b.reshape(-1, d, *self.kernel), None, **args)
            Z = F.conv2d(Z, self.lokr_w2_a[:, :, None, None])
        Ho, Wo = Z.shape[-2:]
        if mix_first:
            out = Z.reshape(N, a * b, Ho, Wo)
        else:
            out = torch.einsum("ij,njbhw->nibhw", C, Z.reshape(N, c, b, Ho, Wo)).reshape(N, a * b, Ho, Wo)
        drop = self._row_drop()
        if drop is not None:
            out = out * drop[:, None, None]
        if unbatched:
            out = out[0]
        return y + out.to(y.dtype)

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kernel:
            if self.conv["groups"] != 1:
                return super().post(x, y)
            return self._conv_post(x, y)
        if self._skipped():
            return y
        a, b, c, d = self.shape
        X = x.to(self._dtype()).reshape(*x.shape[:-1], c, d)
        if self.use_w2:
            XD = X @ self.lokr_w2.T  # (..., c, b)
            out = ((self._w1() * self.scaling) @ XD).reshape(*x.shape[:-1], a * b)  # s C (X Dᵀ): (..., a, b)
        else:  # D = W2a W2b: s (C (X W2bᵀ)) W2aᵀ, C mixing the rank-r product (saves (c + a)·r per token, not c·b)
            Xr = X @ self.lokr_w2_b.T  # (..., c, r)
            out = (((self._w1() * self.scaling) @ Xr) @ self.lokr_w2_a.T).reshape(*x.shape[:-1], a * b)
        drop = self._row_drop()
        if drop is not None:
            out = out * drop
        return y + out.to(y.dtype)
