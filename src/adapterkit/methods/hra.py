"""HRA (Yuan et al. 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection
Adaptation", §3) with the ETHER and ETHER+ variants (Bini et al. 2024, "ETHER: Efficient Finetuning of Large-Scale
Models with Hyperplane Reflections", §3).

HRA multiplies the frozen weight by a chain of ``r`` Householder reflections (§3.1, Eq. 3)::

    W' = W H,   H = H_1 H_2 ... H_r,   H_i = I - 2 u_i u_iᵀ / ||u_i||²        u_i: (in,),  hra_u = [u_1 ... u_r]

        x ──► H_r ··· H_1 ──► W ──► y = W H x + b         (the reflections act on the layer's input)

* The product of ``r`` reflections has the compact "WY" form ``H = I - Û T Ûᵀ`` (Û the unit columns, ``T`` upper
  triangular with ``T⁻¹ = triu(ÛᵀÛ, 1) + I/2``), so the forward applies ``H x = x - Û (T (Ûᵀ x))`` as two
  ``(in, r)`` matmuls per token (``O(r · in)``) instead of building the ``(in, in)`` H and ``W H`` every step as peft
  does.
* ``apply_GS`` (§3.2): orthogonalize the ``u_i`` by Gram-Schmidt first; the reflections then commute and
  ``H = I - 2 Q Qᵀ``. Not an identity at init (it reflects an r-dimensional subspace), as in peft.
* Init as peft's ``HRAConfig`` (§3.3, "symmetric initialization"): ``u_{2i} = u_{2i+1}`` Kaiming-uniform, so each
  pair of reflections cancels and ``H = I``; an odd ``r`` warns and starts random (not an identity), as peft.
* Orthogonality regularizer (§3.2, Eq. 6): ``λ ||I - ÛᵀÛ||²_F`` pushes the reflection planes towards
  orthogonality; :func:`hra_orthogonality_loss` returns the sum over an adapter's layers, to be added to the loss
  (``loss + λ · ak.hra_orthogonality_loss(adapters, name)``).
* Merging (peft): ``W ← W H``, bias unchanged; unmerging applies ``H⁻¹ = Hᵀ`` (Woodbury form, exact to rounding).

ETHER (``variant="ether"``): one reflection ``H = I - 2 u uᵀ / ||u||²`` per diagonal block (``n_blocks`` blocks
of the input, ``ether_R: (n_blocks, in / n_blocks)``). A reflection is never the identity: ETHER starts at a fixed
distance ``||H - I||_F = 2`` from the base model (ETHER §3.1, "bounded perturbation"), so it is *not* an identity at
init. It is HRA with ``r = 1`` per block (same forward, same merge).

ETHER+ (``variant="ether_plus"``): the relaxed, two-sided form (ETHER §3.2): per block
``H⁺ = I - ûûᵀ + v̂v̂ᵀ`` (not orthogonal in general) on the input side and a second one on the output side,
``W' = H⁺_out W H⁺_in`` (bias unchanged, as the reference code): ``ether_R, ether_R2: (n_blocks, in / n_blocks)``,
``ether_R3, ether_R4: (n_blocks, out / n_blocks)``. Init ``v = -u`` gives ``H⁺ = I`` (an identity at init).
Unmerging inverts ``H⁺`` (Woodbury; a singular ``H⁺``, e.g. ``u ⟂ v``, is refused before any weight changes).

Every variant is ``x ↦ x - U T Uᵀ x`` with a small ``U: (in, m)`` (``m = r``, ``n_blocks`` or ``2 n_blocks``;
ETHER's blocks are zero outside their rows), so per-row routing (``adapters.route``) stacks ``U`` and ``U T`` of
all adapters and applies them with two batched matmuls over the gathered rows.

Works on ``nn.Linear`` and GPT-2 ``Conv1D`` (peft: ``nn.Linear`` only); HRA also on ``nn.Conv2d`` with
``groups == 1``, as peft: reflections of the flattened ``in · kh · kw`` input patches, applied as
``y + conv(x, W (H - I))``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import backend_for
from ..component import Component
from ..config import AdapterConfig, register

PUBLIC = ("HRA", "hra_orthogonality_loss")
__all__ = ["HRA", "HRAVariant", "HRALayer", "HRAConv2d", "hra_orthogonality_loss", "householder_wy"]


class HRAVariant(str, enum.Enum):
    """Which transformation: HRA's chain of reflections, ETHER's one reflection per block, ETHER+'s relaxed
    two-sided form."""

    HRA = "hra"
    ETHER = "ether"
    ETHER_PLUS = "ether_plus"


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@register("hra")
@dataclasses.dataclass(frozen=True, kw_only=True)
class HRA(AdapterConfig):
    """Householder reflection adaptation (defaults as peft's ``HRAConfig``), with ETHER/ETHER+ as variants.

    Args:
        r: number of reflections (HRA; even for the symmetric identity init). Unused by the ETHER variants.
        apply_GS: Gram-Schmidt orthogonalization of the reflection vectors (HRA §3.2; HRA variant only).
        variant: ``"hra"`` (default), ``"ether"`` (one reflection per block) or ``"ether_plus"`` (relaxed,
            two-sided).
        n_blocks: ETHER/ETHER+ block-diagonal blocks (must divide ``in`` and, for ETHER+, ``out``); more blocks
            cost less compute with the same number of parameters (the ETHER authors found 32 best on Llama-2-7B).
        init_weights: False starts from random, independent vectors (not an identity; for tests).
        targets: default ``["attn.q", "attn.v"]``, or ``"attn.qkv"`` on models with a fused projection (GPT-2).
    """

    r: int = 8
    apply_GS: bool = False
    variant: HRAVariant = HRAVariant.HRA
    n_blocks: int = 1
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            object.__setattr__(self, "variant", HRAVariant(self.variant))
        except ValueError:
            raise ValueError(
                f"HRA variant must be one of {[v.value for v in HRAVariant]}, got {self.variant!r}"
            ) from None
        if not _positive_int(self.r):
            raise ValueError(f"HRA rank r must be a positive integer, got r={self.r!r}")
        if not _positive_int(self.n_blocks):
            raise ValueError(f"HRA n_blocks must be a positive integer, got n_blocks={self.n_blocks!r}")
        if self.apply_GS and self.variant is not HRAVariant.HRA:
            raise ValueError(f"apply_GS is an option of variant='hra', not {self.variant.value!r}")
        if self.n_blocks != 1 and self.variant is HRAVariant.HRA:
            raise ValueError("n_blocks is an option of the ETHER variants; HRA reflects the whole input (r=...)")

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("attn.qkv",) if "attn.q" not in roles and "attn.qkv" in roles else ("attn.q", "attn.v")

    def accepts(self, module: nn.Module) -> bool:
        backend = backend_for(module)
        if backend is None:
            return False
        if backend.kind == "conv2d":
            return self.variant is HRAVariant.HRA and module.groups == 1
        return backend.kind == "linear"

    def build(self, module: nn.Module, name: str) -> Component:
        if not self.accepts(module):
            what = (
                "nn.Linear, Conv1D and nn.Conv2d (groups=1)"
                if self.variant is HRAVariant.HRA
                else ("nn.Linear and Conv1D")
            )
            raise TypeError(
                f"HRA ({self.variant.value}) cannot act on {name!r} ({type(module).__name__}): it supports {what}; "
                "pick other targets"
            )
        if backend_for(module).kind == "conv2d":
            return HRAConv2d(self, module, name)
        return HRALayer(self, module, name)


def householder_wy(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Û, T)`` with ``H_1 ··· H_r = I - Û T Ûᵀ`` for ``H_i = I - 2 û_i û_iᵀ``; ``u: (n, r)`` (columns need not be
    unit), ``Û`` its unit columns, ``T: (r, r)`` upper triangular, ``T⁻¹ = triu(ÛᵀÛ, 1) + I/2`` (the compact WY
    representation of a product of Householder reflections)."""
    unit = u / u.norm(dim=0)
    # T in float64: for the symmetric init (equal pairs) it is then exactly [[2, -4], [0, 2]] per pair, so each pair
    # cancels exactly in float32 too (H = I bit for bit up to the matmul's summation)
    wide = u.double() / u.double().norm(dim=0)
    eye = torch.eye(u.shape[1], dtype=torch.float64, device=u.device)
    inv_t = torch.triu(wide.T @ wide, 1) + 0.5 * eye
    return unit, torch.linalg.solve_triangular(inv_t, eye, upper=True).to(u.dtype)


def _gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns of ``u: (n, r)`` by Gram-Schmidt (peft's ``apply_GS``): a QR factorization with the
    signs fixed so that ``R`` has a positive diagonal, which is exactly the Gram-Schmidt result."""
    q, r = torch.linalg.qr(u)
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return q * sign


def _blocks(v: torch.Tensor) -> torch.Tensor:
    """``(n_blocks · k, n_blocks)``: the unit rows of ``v: (n_blocks, k)`` placed in their diagonal blocks."""
    unit = v / v.norm(dim=1, keepdim=True)
    nb, k = v.shape
    eye = torch.eye(nb, dtype=v.dtype, device=v.device)
    return (unit[:, :, None] * eye[:, None, :]).reshape(nb * k, nb)


class _Reflections(Component):
    """What the HRA components share: the vectors, ``x ↦ x - U T Uᵀ x`` factors, merging, the regularizer."""

    mergeable = True
    additive = False

    def __init__(self, cfg: HRA, module: nn.Module, name: str, n_in: int, out_dim: int) -> None:
        super().__init__()
        self.variant = cfg.variant
        self.r = cfg.r
        self.apply_GS = bool(cfg.apply_GS)
        self.n_blocks = cfg.n_blocks
        self.n_in, self.out_dim = n_in, out_dim
        self._random = not cfg.init_weights
        weight = module.weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        if self.variant is HRAVariant.HRA:
            if cfg.r > n_in:
                raise ValueError(
                    f"HRA r={cfg.r} exceeds the {n_in} inputs of {name!r}: at most {n_in} reflections are "
                    "independent there; pass a smaller r"
                )
            self.hra_u = nn.Parameter(torch.zeros(n_in, cfg.r, **factory))
            return
        sides = [("input", n_in)] + ([("output", out_dim)] if self.variant is HRAVariant.ETHER_PLUS else [])
        for side, size in sides:
            if size % cfg.n_blocks:
                raise ValueError(
                    f"HRA ({self.variant.value}) n_blocks={cfg.n_blocks} does not divide the {size} {side}s of "
                    f"{name!r}: pass an n_blocks that divides every target's {side} size"
                )
        k_in = n_in // cfg.n_blocks
        self.ether_R = nn.Parameter(torch.zeros(cfg.n_blocks, k_in, **factory))
        if self.variant is HRAVariant.ETHER_PLUS:
            k_out = out_dim // cfg.n_blocks
            self.ether_R2 = nn.Parameter(torch.zeros(cfg.n_blocks, k_in, **factory))
            self.ether_R3 = nn.Parameter(torch.zeros(cfg.n_blocks, k_out, **factory))
            self.ether_R4 = nn.Parameter(torch.zeros(cfg.n_blocks, k_out, **factory))

    def extra_repr(self) -> str:
        if self.variant is HRAVariant.HRA:
            return f"r={self.r}, in={self.n_in}" + (", apply_GS" if self.apply_GS else "")
        return f"{self.variant.value}, n_blocks={self.n_blocks}, in={self.n_in}, out={self.out_dim}"

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        if self.variant is HRAVariant.HRA:
            if self._random:
                nn.init.kaiming_uniform_(self.hra_u, a=math.sqrt(5))
            elif self.r % 2:
                warnings.warn(
                    f"HRA with odd r={self.r}: the symmetric initialization cannot be performed, so the adapter does "
                    "not start as an identity (as in peft); use an even r",
                    stacklevel=2,
                )
                nn.init.kaiming_uniform_(self.hra_u, a=math.sqrt(5))
            else:  # HRA §3.3: equal pairs of vectors, so each pair of reflections cancels
                half = torch.empty(self.n_in, self.r // 2, dtype=self.hra_u.dtype, device=self.hra_u.device)
                nn.init.kaiming_uniform_(half, a=math.sqrt(5))
                self.hra_u.copy_(torch.repeat_interleave(half, 2, dim=1))
            return
        nn.init.kaiming_uniform_(self.ether_R, a=math.sqrt(5))
        if self.variant is HRAVariant.ETHER_PLUS:
            nn.init.kaiming_uniform_(self.ether_R3, a=math.sqrt(5))
            if self._random:
                nn.init.kaiming_uniform_(self.ether_R2, a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.ether_R4, a=math.sqrt(5))
            else:  # ETHER+ init: v = -u, so I - ûûᵀ + v̂v̂ᵀ = I
                self.ether_R2.copy_(-self.ether_R)
                self.ether_R4.copy_(-self.ether_R3)

    # --- the transformation as x ↦ x - U T Uᵀ x ---------------------------------------------------------
    def input_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, T)``: ``U: (n_in, m)``, ``T: (m, m)`` with the input-side matrix ``H = I - U T Uᵀ``."""
        if self.variant is HRAVariant.HRA:
            if self.apply_GS:
                q = _gram_schmidt(self.hra_u)
                return q, 2.0 * torch.eye(self.r, dtype=q.dtype, device=q.device)
            return householder_wy(self.hra_u)
        return self._ether(self.ether_R, getattr(self, "ether_R2", None))

    def output_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(U, T)`` of ETHER+'s output-side ``H⁺_out = I - U T Uᵀ`` (``U: (out, 2 n_blocks)``), else None."""
        if self.variant is not HRAVariant.ETHER_PLUS:
            return None
        return self._ether(self.ether_R3, self.ether_R4)

    def _ether(self, minus: torch.Tensor, plus: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        nb = self.n_blocks
        u = _blocks(minus)
        if plus is None:  # ETHER: I - 2 ûûᵀ per block
            return u, 2.0 * torch.eye(nb, dtype=u.dtype, device=u.device)
        # ETHER+: I - ûûᵀ + v̂v̂ᵀ per block
        t = torch.diag(torch.cat([torch.ones(nb), -torch.ones(nb)]).to(dtype=u.dtype, device=u.device))
        return torch.cat([u, _blocks(plus)], dim=1), t

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense ``H_in: (n_in, n_in)`` and ETHER+'s ``H_out: (out, out)`` (tests and inspection only)."""
        dense = []
        for factors in (self.input_factors(), self.output_factors()):
            if factors is None:
                dense.append(None)
                continue
            u, t = factors
            dense.append(torch.eye(u.shape[0], dtype=u.dtype, device=u.device) - u @ t @ u.T)
        return dense[0], dense[1]

    def orthogonality_loss(self) -> torch.Tensor:
        """HRA §3.2 Eq. 6: ``||I - ÛᵀÛ||²_F`` over this layer's unit reflection vectors (0 for ETHER variants and
        with ``apply_GS``, whose vectors are orthogonal by construction)."""
        if self.variant is not HRAVariant.HRA or self.apply_GS:
            return self.parameters().__next__().new_zeros(())
        unit = self.hra_u / self.hra_u.norm(dim=0)
        eye = torch.eye(self.r, dtype=unit.dtype, device=unit.device)
        return (eye - unit.T @ unit).pow(2).sum()

    # --- merging: W ← H_out W H_in; unmerging with the Woodbury inverse (I - U T Uᵀ)⁻¹ = I + U S Uᵀ --------------
    @staticmethod
    def _inverse_core(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``S = (T⁻¹ - UᵀU)⁻¹`` (float64): ``(I - U T Uᵀ)⁻¹ = I + U S Uᵀ``."""
        u, t = u.double(), t.double()
        return torch.linalg.inv(torch.linalg.inv(t) - u.T @ u)

    def _factors64(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        out = [("in", *(f.detach().double() for f in self.input_factors()))]
        o = self.output_factors()
        if o is not None:
            out.append(("out", *(f.detach().double() for f in o)))
        return out

    def check_merge(self, module: nn.Module) -> None:
        """Refuse a transformation that could not be unmerged (singular or non-finite: ETHER+ with ``u ⟂ v``)."""
        if backend_for(module) is None:
            raise TypeError(f"cannot merge into {type(module).__name__}: no weight backend registered")
        with torch.no_grad():
            for _, u, t in self._factors64():
                try:
                    core = self._inverse_core(u, t)
                    ok = bool(torch.isfinite(core).all()) and bool(torch.isfinite(u).all())
                    ok = ok and float(torch.linalg.cond(torch.linalg.inv(t) - u.T @ u)) < 1e8
                except RuntimeError:  # torch.linalg raises on exactly singular matrices
                    ok = False
                if not ok:
                    raise ValueError(
                        f"cannot merge HRA ({self.variant.value}) into {type(module).__name__}: its transformation is "
                        "singular or not finite, so it could not be unmerged; keep the adapter unmerged"
                    )

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        if self.merged:
            return
        self.check_merge(module)  # before any weight changes
        self._transform(module, inverse=False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        if not self.merged:
            return
        self._transform(module, inverse=True)
        self.merged = False

    def _transform(self, module: nn.Module, inverse: bool) -> None:
        backend = backend_for(module)
        weight = backend.read(module)
        stash = self.__dict__.pop("_premerge", None)
        if inverse and stash is not None and torch.equal(self._transformed(stash, False), weight):
            backend.copy_(module, stash)  # ETHER+: nothing changed the weight since merge, restore it exactly
            return
        if not inverse and self.variant is HRAVariant.ETHER_PLUS:
            # H⁺ is not orthogonal: W ↦ H⁺ W H⁺ amplifies the float rounding of the merged weight by H⁺'s condition
            # number on unmerge, so the weight before merging is kept (outside the state dict) to restore it exactly
            self.__dict__["_premerge"] = weight.detach().clone()
        backend.copy_(module, self._transformed(weight, inverse))

    def _transformed(self, weight: torch.Tensor, inverse: bool) -> torch.Tensor:
        """``H_out W H_in`` (or with the inverses) computed in float64, in ``weight``'s shape and dtype."""
        w = weight.reshape(weight.shape[0], -1).double()  # (out, n_in)
        for side, u, t in self._factors64():
            core = self._inverse_core(u, t) if inverse else -t  # H = I - U T Uᵀ, H⁻¹ = I + U S Uᵀ
            if side == "in":  # W H_in
                w = w + (w @ u) @ core @ u.T
            else:  # H_out W
                w = w + u @ (core @ (u.T @ w))
        return w.reshape(weight.shape).to(weight.dtype)


class HRALayer(_Reflections):
    """HRA / ETHER / ETHER+ on a linear-like module: the input is transformed before the module runs
    (``x' = H_in x``); ETHER+ also transforms the output without its bias (``y' = H_out (y - b) + b``).

    Shapes: ``x: (..., in)``, ``y: (..., out)``; ``hra_u: (in, r)``; ``ether_R[2]: (n_blocks, in / n_blocks)``,
    ``ether_R3/4: (n_blocks, out / n_blocks)``.
    """

    has_pre = True
    has_post = False

    def __init__(self, cfg: HRA, module: nn.Module, name: str) -> None:
        in_dim, out_dim = backend_for(module).dims(module)
        super().__init__(cfg, module, name, in_dim, out_dim)
        self.has_post = self.variant is HRAVariant.ETHER_PLUS
        object.__setattr__(self, "_module_ref", module)  # ETHER+ reads the bias; kept outside the module tree

    def _bias(self) -> torch.Tensor | None:
        bias = getattr(self.__dict__["_module_ref"], "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    @staticmethod
    def _reflect(v: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``v - (v U) Tᵀ Uᵀ`` for row vectors ``v: (..., n)`` (that is ``H v`` for ``H = I - U T Uᵀ``)."""
        return v - F.linear(F.linear(v, u.T), u @ t)

    @staticmethod
    def _blockwise(v: torch.Tensor, minus: torch.Tensor, plus: torch.Tensor | None) -> torch.Tensor:
        """ETHER's ``v - 2 (v·û) û`` / ETHER+'s ``v - (v·û) û + (v·v̂) v̂`` in each block of ``v: (..., nb · k)``
        (``minus, plus: (nb, k)``): element-wise, ``O(n)`` per row whatever the number of blocks."""
        nb, k = minus.shape
        vb = v.reshape(*v.shape[:-1], nb, k)
        unit = minus / minus.norm(dim=1, keepdim=True)
        coef = 2.0 if plus is None else 1.0
        out = vb - (coef * (vb * unit).sum(-1, keepdim=True)) * unit
        if plus is not None:
            unit_v = plus / plus.norm(dim=1, keepdim=True)
            out = out + (vb * unit_v).sum(-1, keepdim=True) * unit_v
        return out.reshape(v.shape)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant is not HRAVariant.HRA:
            xx = x.to(self.ether_R.dtype)
            return self._blockwise(xx, self.ether_R, getattr(self, "ether_R2", None)).to(x.dtype)
        u, t = self.input_factors()
        return self._reflect(x.to(u.dtype), u, t).to(x.dtype)

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ETHER+'s output side: ``H⁺_out (y - b) + b``."""
        z = y.to(self.ether_R3.dtype)
        bias = self._bias()
        if bias is None:
            return self._blockwise(z, self.ether_R3, self.ether_R4).to(y.dtype)
        b = bias.to(z.dtype)
        return (self._blockwise(z - b, self.ether_R3, self.ether_R4) + b).to(y.dtype)

    # --- per-row routing: U and U T stacked over adapters, two batched matmuls over gathered rows ----------------
    @staticmethod
    def _stack(comps: list[Component | None], factors: Any, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G, size, m)`` stacks of ``U`` and ``U T`` (zero-padded to the largest ``m``; zeros for adapters
        without a component here)."""
        made = [None if c is None else factors(c) for c in comps]
        live = [f for f in made if f is not None]
        m = max(u.shape[1] for u, _ in live)
        ref = live[0][0]
        zero = ref.new_zeros(size, m)
        us, uts = [], []
        for f in made:
            if f is None:
                us.append(zero)
                uts.append(zero)
                continue
            u, t = f
            pad = m - u.shape[1]
            us.append(F.pad(u, (0, pad)))
            uts.append(F.pad(u @ t, (0, pad)))
        return torch.stack(us), torch.stack(uts)

    @staticmethod
    def _add_rows(plan: Any, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``v`` with ``delta: (G, m · rest, d)`` added to the rows it belongs to, out of place (the module's input
        may be a tensor the caller still uses, e.g. the residual stream)."""
        d = delta.reshape(len(plan.adapters) * plan.m, *v.shape[1:]).to(v.dtype)
        if plan.padded:
            d = d.index_select(0, plan.real)
        return v + d if plan.identity else v.index_add(0, plan.rows, d)

    @classmethod
    def routed_pre(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, key: Any) -> Any:
        live = [c for c in comps if c is not None]
        U, UT = plan.stacked(key, lambda: cls._stack(comps, lambda c: c.input_factors(), live[0].n_in))
        h = torch.bmm(plan.gather(x.to(U.dtype)), U)  # (G, m · L, m)
        return cls._add_rows(plan, x, -torch.bmm(h, UT.transpose(1, 2)))

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: torch.Tensor, key: Any) -> Any:
        """ETHER+'s output side: ``y - ((y - b) U) (U T)ᵀ`` per row."""
        live = [c for c in comps if c is not None and c.has_post]
        if not live:
            return y
        U, UT = plan.stacked(
            key, lambda: cls._stack([c if c is not None and c.has_post else None for c in comps],
                                    lambda c: c.output_factors(), live[0].out_dim)
        )  # fmt: skip
        bias = live[0]._bias()
        z = y.to(U.dtype)
        shift = z if bias is None else z - bias.to(z.dtype)
        h = torch.bmm(plan.gather(shift), U)
        return cls._add_rows(plan, y, -torch.bmm(h, UT.transpose(1, 2)))


class HRAConv2d(_Reflections):
    """HRA on a ``groups=1`` Conv2d: ``y + conv(x, W (H - I))`` with ``H`` acting on flattened ``in · kh · kw``
    patches (peft's layout: ``hra_u: (in · kh · kw, r)``, weight ``(out, in, kh, kw)`` flattened row-major)."""

    def __init__(self, cfg: HRA, module: nn.Module, name: str) -> None:
        n_in = module.in_channels * math.prod(module.kernel_size)
        super().__init__(cfg, module, name, n_in, module.out_channels)
        self.conv = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
        object.__setattr__(self, "_module_ref", module)

    def _delta(self) -> torch.Tensor:
        """``W (H - I) = -(W U) T Uᵀ`` as a ``(out, in, kh, kw)`` kernel (W frozen: gradients reach U only)."""
        module = self.__dict__["_module_ref"]
        u, t = self.input_factors()
        w = module.weight.detach().to(u.dtype)
        return (-((w.reshape(w.shape[0], -1) @ u) @ t) @ u.T).reshape(w.shape)

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = self._delta()
        return y + F.conv2d(x.to(delta.dtype), delta, None, **self.conv).to(y.dtype)

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: torch.Tensor, key: Any) -> Any:
        """One grouped convolution over the gathered rows: adapter ``g``'s rows meet ``W (H_g - I)`` as group
        ``g`` (``(m, G · in, H, W)`` input, ``(G · out, in, kh, kw)`` kernel)."""
        live = [c for c in comps if c is not None]
        ref = live[0]
        G = len(comps)

        def build() -> torch.Tensor:
            shape = ref.__dict__["_module_ref"].weight.shape
            zero = torch.zeros(shape, dtype=ref.hra_u.dtype, device=ref.hra_u.device)
            return torch.cat([c._delta() if c is not None else zero for c in comps])  # (G · out, in, kh, kw)

        kernel = plan.stacked(key, build)
        xs = x if plan.identity else x.index_select(0, plan.index)  # (G · m, C, H, W), adapter-major
        xs = xs.reshape(G, plan.m, *x.shape[1:]).transpose(0, 1).reshape(plan.m, G * x.shape[1], *x.shape[2:])
        out = F.conv2d(xs.to(kernel.dtype), kernel, None, groups=G, **ref.conv)  # (m, G · out, H', W')
        out = out.reshape(plan.m, G, -1, *out.shape[2:]).transpose(0, 1)  # (G, m, out, H', W')
        d = out.reshape(G * plan.m, *y.shape[1:]).to(y.dtype)
        if plan.padded:
            d = d.index_select(0, plan.real)
        return y + d if plan.identity else y.index_add(0, plan.rows, d)


def hra_orthogonality_loss(adapters: Any, name: str) -> torch.Tensor:
    """HRA §3.2 Eq. 6 summed over adapter ``name``'s layers: ``Σ ||I - ÛᵀÛ||²_F`` (differentiable; add
    ``λ ·`` this to the training loss). ETHER variants and ``apply_GS`` contribute 0.

    Raises:
        ValueError: ``name`` is not an HRA adapter.
    """
    comps = [c for c in adapters.components(name).values() if isinstance(c, _Reflections)]
    if not comps:
        raise ValueError(
            f"adapter {name!r} has no HRA layers ({adapters.config(name).method!r}): nothing to regularize"
        )
    return torch.stack([c.orthogonality_loss() for c in comps]).sum()
