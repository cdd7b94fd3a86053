"""OFT v2 (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"; Qiu et al. 2025,
"Orthogonal Finetuning Made Scalable"): the frozen weight is rotated by a learned block-diagonal orthogonal
matrix, and OFT v2 applies the rotation to the *input* instead of building the rotated weight::

    y = W (R x) + b          R = diag(R_1, ..., R_nb)ᵀ      R_j = Cayley(Q_j): (b, b)     Q_j = -Q_jᵀ

    (peft's convention: row vectors x ↦ x · diag(R_j), hence the transpose in column form)

        x ──► nb blocks x_j of b features ──► x_j ↦ x_j R_j (row vectors) ──► W ──► + b ──► y

* Parameters: one skew-symmetric ``Q_j`` per block, stored as its strict upper triangle (``oft_R``:
  ``(nb, b (b - 1) / 2)``, peft's ``oft_R.weight``); ``block_share`` keeps one block for the whole layer
  (``(1, b (b - 1) / 2)``). ``Q = 0`` at init, so ``R = I`` (an exact identity).
* Cayley transform (OFT §3.2): ``R = (I + Q)(I - Q)⁻¹`` is orthogonal for any skew-symmetric ``Q``. OFT v2's
  Cayley–Neumann approximation (2025, §4.2) replaces the inverse by a truncated Neumann series,
  ``R ≈ I + 2Q + 2Q² + ... + 2Q^(k-2) + Q^(k-1)`` with ``k = num_cayley_neumann_terms`` (peft ≥ 0.18's form, whose
  last term has coefficient 1); it is orthogonal up to ``O(‖Q‖^k)``. The exact form (``use_cayley_neumann=False``)
  is computed as peft computes it, ``(I - Q)(I + Q)⁻¹``: the rotation the Neumann form approximates for ``-Q``
  (peft's two forms differ in the sign of ``Q``; we keep peft's so its files load unchanged).
* Cost (OFT v2 §4.1): the rotation acts on the activations block by block, ``O(d · b)`` per token for
  ``d = in_features``, and ``R`` itself costs ``O(nb · b³)`` per forward; the dense ``W R`` is never built for
  linear layers.
* COFT (OFT §3.3, ``coft=True``): before each use, every ``Q_j`` is projected onto the Frobenius ball
  ``‖Q_j‖_F ≤ ε / √(number of stored blocks)`` (as peft; ``eps`` is that ε), bounding ``‖R - I‖``.
* ``module_dropout`` (OFT's multiplicative dropout): in training, ``⌊p · nb⌋`` randomly chosen blocks are
  replaced by the identity (not with ``block_share``). peft 0.21 builds this layer but never calls it; here it
  acts as documented.
* Merge (peft's semantics): ``W ← W Rᵀ`` in the canonical ``(out, in)`` layout (the same function as the
  unmerged forward); unmerge multiplies by the inverse (block-wise, float64), exact to float rounding.

Module kinds: ``nn.Linear`` and GPT-2 ``Conv1D`` (rotation of the input features; peft has no Conv1D OFT, so such
adapters cannot be exported to peft), ``nn.Embedding`` (the looked-up vectors are rotated, ``e ↦ e R``; merged
``W ← W R``, as peft's OFT ``Embedding``), ``nn.Conv2d`` with ``groups=1``: the rotation acts on the flattened
``in · kh · kw`` patch. 1×1 convolutions rotate the input channels (peft's forward); k×k convolutions run
``conv(x, W Rᵀ)`` (as ``y + conv(x, W Rᵀ - W)``), which is what peft's merged model computes. peft 0.21's unmerged
forward on k×k kernels folds overlapping patches back into the input (``F.fold`` sums them), so it is not even
the identity at init; our outputs equal peft's merged ones there.

The block-rotation machinery (:class:`RotationLayer`) is shared with BOFT (``methods/boft.py``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import backend_for
from ..component import Component, grad_epoch
from ..config import AdapterConfig, register
from .lora import _finite_real

PUBLIC = ("OFT",)
__all__ = ["OFT", "OFTLayer", "RotationLayer", "Stage", "cayley_neumann", "cayley_exact", "skew", "adjust_block"]

# one factor of a rotation: blocks (nb or 1 shared, b, b) acting on row vectors block by block, optionally conjugated
# by a permutation (perm, inverse perm): v ↦ ((v P) blockdiag(blocks)) Pᵀ with P[i, perm[i]] = 1
Stage = tuple[torch.Tensor, "tuple[torch.Tensor, torch.Tensor] | None"]


# --- the equations ------------------------------------------------------------------------------------------
def skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """Skew-symmetric ``(B, b, b)`` matrices from their strict upper triangles ``vec: (B, b (b - 1) / 2)``
    (row-major, ``torch.triu_indices(b, b, 1)`` order, as peft)."""
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    q = vec.new_zeros(vec.shape[0], b, b)
    q[:, rows, cols] = vec
    return q - q.transpose(-2, -1)


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """OFT v2's Cayley–Neumann rotation for skew ``q: (B, b, b)``: ``I + 2Q + 2Q² + ... + 2Q^(k-2) + Q^(k-1)``
    for ``k = terms`` (peft ≥ 0.18, same additions in the same order; ``terms=3`` equals ``terms=4`` there)."""
    b = q.shape[-1]
    r = torch.eye(b, dtype=q.dtype, device=q.device).expand_as(q)
    if terms <= 1:
        return r.clone()
    r = r + 2.0 * q
    if terms > 2:
        power = torch.bmm(q, q)
        r = r + 2.0 * power
        for _ in range(3, terms - 1):
            power = torch.bmm(power, q)
            r = r + 2.0 * power
        r = r + torch.bmm(power, q)
    return r


def cayley_exact(q: torch.Tensor) -> torch.Tensor:
    """The exact Cayley transform as peft computes it: ``(I - Q)(I + Q)⁻¹`` (orthogonal for skew ``q``)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def adjust_block(dim: int, value: int) -> int:
    """peft's ``adjust_oft_parameters``: the divisor of ``dim`` nearest to ``value`` (ties: the smaller)."""
    if value >= dim:
        return dim
    higher = value
    while higher <= dim and dim % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and dim % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


def apply_blocks(v: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``v: (..., n)`` row vectors times ``blockdiag(blocks)``; ``blocks: (nb, b, b)`` with ``nb · b = n``, or
    ``(1, b, b)`` shared by every block. Costs ``O(n · b)`` per row."""
    b = blocks.shape[-1]
    shape = v.shape
    if blocks.shape[0] == 1:
        return (v.reshape(-1, b) @ blocks[0]).reshape(shape)
    nb = blocks.shape[0]
    t = v.reshape(-1, nb, b).transpose(0, 1)  # (nb, T, b)
    return torch.bmm(t, blocks).transpose(0, 1).reshape(shape)


def apply_stage(
    v: torch.Tensor, blocks: torch.Tensor, perm: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """``v ↦ ((v P) blockdiag(blocks)) Pᵀ`` (no permutation when ``perm`` is None)."""
    if perm is not None:
        v = v.index_select(-1, perm[1])
    v = apply_blocks(v, blocks)
    if perm is not None:
        v = v.index_select(-1, perm[0])
    return v


def apply_rows(v: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Per-row block rotations: ``v: (batch, ..., n)``, ``blocks: (batch, nb, b, b)`` -> ``(batch, ..., n)``."""
    batch, nb, b = blocks.shape[0], blocks.shape[1], blocks.shape[-1]
    shape = v.shape
    t = v.reshape(batch, -1, nb, b).transpose(1, 2).reshape(batch * nb, -1, b)  # (batch · nb, T, b)
    out = torch.bmm(t, blocks.reshape(batch * nb, b, b))
    return out.view(batch, nb, -1, b).transpose(1, 2).reshape(shape)


def widen(blocks: torch.Tensor, n: int, size: int) -> torch.Tensor:
    """The same block-diagonal matrix with blocks of ``size`` (a multiple of the block size): ``(n / size, size,
    size)``; shared blocks are repeated first."""
    b = blocks.shape[-1]
    if blocks.shape[0] == 1 and n // b > 1:
        blocks = blocks.expand(n // b, b, b)
    k = size // b
    if k == 1:
        return blocks
    small = blocks.reshape(n // size, k, b, b)
    eye = torch.eye(k, dtype=blocks.dtype, device=blocks.device)
    return torch.einsum("gjab,jl->gjalb", small, eye).reshape(n // size, size, size)


# --- the component shared with BOFT ---------------------------------------------------------------------------
class RotationLayer(Component):
    """A learned rotation of a module's input features: ``y = W (x Rot) + b`` for row vectors ``x``, with ``Rot`` a
    product of (permuted) block-diagonal factors (:meth:`_stages`), optionally followed by an output scale ``s``
    (:meth:`_scale`: ``y = s ⊙ (W (x Rot)) + b``, BOFT's magnitude).

    Linear-like modules and 1×1 convolutions rotate their input (a pre-hook, ``O(n · b)`` per token); k×k
    convolutions add ``conv(x, W Rotᵀ - W)`` after the module (a post-hook); embeddings (OFT only) rotate the
    looked-up vectors (a post-hook). Merging rewrites the weight as ``s ⊙ (W Rotᵀ)`` (embeddings: ``W Rot``);
    unmerging applies the inverse factors (float64), so merge → unmerge is exact to rounding.

    Subclasses set the parameters and implement :meth:`_stages` (and :meth:`_scale` where there is one).
    """

    mergeable = True
    scaled = False  # the subclass has an output scale (BOFT)
    kinds: tuple[str, ...] = ("linear", "conv2d")  # the module kinds (backends.py) the subclass supports

    def __init__(self, module: nn.Module, name: str, what: str) -> None:
        super().__init__()
        backend = backend_for(module)
        if backend is None or backend.kind not in self.kinds:
            supported = "nn.Linear, Conv1D, nn.Conv2d" + (" and nn.Embedding" if "embedding" in self.kinds else "")
            raise TypeError(
                f"{what} cannot act on {name!r} ({type(module).__name__}): it supports {supported}; pick other targets"
            )
        # embeddings: the looked-up vectors are rotated (a post-hook), as peft's OFT Embedding layer does
        self.embedding = backend.kind == "embedding"
        if self.embedding:
            self.kernel = ()
            self.out_dim, self.in_dim = backend.dims(module)  # (num_embeddings, embedding_dim)
        elif backend.kind == "conv2d":
            if module.groups != 1:
                raise ValueError(
                    f"{what} cannot act on {name!r}: a grouped convolution (groups={module.groups}) cannot be "
                    "rotated across its input channels; exclude it from the targets"
                )
            self.kernel: tuple[int, ...] = tuple(module.kernel_size)
            self.in_dim = module.in_channels * math.prod(self.kernel)
            self.out_dim = module.out_channels
        else:
            self.kernel = ()
            self.in_dim, self.out_dim = backend.dims(module)
        # k×k convolutions: the rotated weight (post); embeddings: the rotated output (post); else the rotated input
        self.fused = bool(self.kernel) and self.kernel != (1, 1)
        self.has_pre = not (self.fused or self.embedding)
        self.has_post = self.fused or self.embedding or self.scaled
        weight = module.weight
        self._factory = {
            "device": weight.device,
            "dtype": weight.dtype if weight.is_floating_point() else torch.float32,
        }
        # the module is needed at forward time by k×k convolutions; kept outside the module tree on purpose
        object.__setattr__(self, "_module_ref", module)

    @property
    def _base(self) -> nn.Module:
        return self.__dict__["_module_ref"]

    # --- subclass interface -------------------------------------------------------------------------------------
    def _stages(self, dropout: bool = True) -> list[Stage]:
        """The factors in the order they act on row vectors: ``x Rot = x M_1 M_2 ...`` (``dropout``: apply the
        training-time dropout, if any)."""
        raise NotImplementedError

    def _scale(self) -> torch.Tensor | None:
        """The ``(out,)`` output scale, or None."""
        return None

    def _random_in_training(self) -> bool:
        """Whether a training forward draws random numbers (then routed calls run one adapter at a time)."""
        return False

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _current_stages(self) -> list[Stage]:
        """:meth:`_stages`, reused while no gradient is recorded and the parameters are unchanged (same storage and
        version): a decode step then rotates its token without rebuilding the blocks, which costs ``O(nb · b³)``
        (more than the layer's own matmul for one token); training forwards always rebuild them."""
        if torch.is_grad_enabled() or (self.training and self._random_in_training()):
            return self._stages()

        def key() -> tuple:
            return (grad_epoch(), *((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters()))

        cached = self.__dict__.get("_stage_cache")
        if cached is not None and cached[0] == key():
            return cached[1]
        stages = self._stages()  # may project COFT blocks in place: the key is taken after
        object.__setattr__(self, "_stage_cache", (key(), stages))
        return stages

    # --- forward ------------------------------------------------------------------------------------------------
    def _rotate(self, x: torch.Tensor, stages: list[Stage]) -> torch.Tensor:
        """``x Rot`` on the feature axis (dim 1 for 1×1 convolutions), in the adapter's dtype, returned in ``x``'s."""
        dtype = stages[0][0].dtype
        v = x.movedim(1, -1) if self.kernel else x
        v = v.to(dtype)
        for blocks, perm in stages:
            v = apply_stage(v, blocks, perm)
        v = v.to(x.dtype)
        return v.movedim(-1, 1) if self.kernel else v

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return self._rotate(x, self._current_stages())

    def _rotated_weight(self, weight: torch.Tensor, stages: list[Stage]) -> torch.Tensor:
        """``W Rotᵀ`` for the flat ``weight: (out, n)``: the transposed factors in reverse order."""
        for blocks, perm in reversed(stages):
            weight = apply_stage(weight, blocks.transpose(-2, -1), perm)
        return weight

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """The base convolution's geometry (stride, padding and its mode, dilation) with another weight, no bias."""
        conv = self._base
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            return F.conv2d(x, weight, None, conv.stride, 0, conv.dilation, groups)
        return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, groups)

    def _conv_delta_weight(self, stages: list[Stage]) -> torch.Tensor:
        """``W Rotᵀ - W`` of a k×k convolution, ``(out, in, kh, kw)``, in the adapter's dtype."""
        base = backend_for(self._base).read(self._base)
        flat = base.reshape(self.out_dim, self.in_dim).to(stages[0][0].dtype)
        return (self._rotated_weight(flat, stages) - flat).reshape(base.shape)

    def _apply_scale(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``s ⊙ (y - b) + b`` with ``s`` broadcasting against ``y`` (the bias is not scaled)."""
        bias = getattr(self._base, "bias", None)
        if bias is None:
            return y * s.to(y.dtype)
        b = bias.view(-1, *([1] * len(self.kernel))).to(y.dtype)
        return (y - b) * s.to(y.dtype) + b

    def _scale_view(self, s: torch.Tensor) -> torch.Tensor:
        return s.view(-1, *([1] * len(self.kernel)))

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.embedding:
            return self._rotate(y, self._current_stages())
        if self.fused:
            stages = self._current_stages()
            delta = self._conv_delta_weight(stages)
            y = y + self._conv(x.to(delta.dtype), delta).to(y.dtype)
        s = self._scale()
        return y if s is None else self._apply_scale(y, self._scale_view(s))

    # --- per-row routing ----------------------------------------------------------------------------------------
    @classmethod
    def _row_layout(cls, live: list[RotationLayer]) -> list[tuple[int, Any]] | None:
        """``(block size, permutation)`` per stage shared by all ``live`` components, or None when their stage
        structures differ (then routing falls back to one call per adapter)."""
        return None

    @classmethod
    def _row_blocks(
        cls, comps: list[Component | None], plan: Any, key: Any, layout: list[tuple[int, Any]], n: int
    ) -> list[torch.Tensor]:
        """Per stage, the ``(batch, n / b, b, b)`` blocks of each row's adapter (identity for base rows and for
        adapters without a component here)."""
        live = [c for c in comps if c is not None]
        ref = live[0]

        def build() -> list[torch.Tensor]:
            stages = {id(c): c._stages() for c in live}
            out = []
            for i, (size, _) in enumerate(layout):
                eye = torch.eye(size, dtype=ref._dtype(), device=ref._base.weight.device)
                eye = eye.expand(n // size, size, size)
                per = [widen(stages[id(c)][i][0], n, size) if c is not None else eye for c in comps]
                out.append(torch.stack(per + [eye]))  # (G + 1, n / b, b, b): the last one for base rows
            return out

        return [s.index_select(0, plan.row_group) for s in plan.stacked(key, build)]

    @classmethod
    def routed_pre(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, key: Any) -> Any:
        """Each row rotated by its adapter's blocks in one batched matmul per factor (blocks stacked per row)."""
        return cls._rotate_rows(comps, plan, x, key)

    @classmethod
    def _rotate_rows(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, key: Any) -> Any:
        """``x Rot`` with each row's adapter's ``Rot`` (feature axis: dim 1 for convolutions, else the last), or None
        when the components cannot be batched."""
        live = [c for c in comps if c is not None]
        if any(c.training and c._random_in_training() for c in live):
            return None
        layout = cls._row_layout(live)
        if layout is None:
            return None
        ref = live[0]
        blocks = cls._row_blocks(comps, plan, key, layout, ref.in_dim)
        v = x.movedim(1, -1) if ref.kernel else x
        v = v.to(blocks[0].dtype)
        for rows, (_, perm) in zip(blocks, layout, strict=True):
            if perm is not None:
                v = v.index_select(-1, perm[1])
            v = apply_rows(v, rows)
            if perm is not None:
                v = v.index_select(-1, perm[0])
        v = v.to(x.dtype)
        return v.movedim(-1, 1) if ref.kernel else v

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: torch.Tensor, key: Any) -> Any:
        """k×k convolutions: the gathered rows of the ``G`` adapters run one grouped convolution (``groups=G``) with
        the stacked ``W Rotᵀ - W``, added back to their rows; output scales: one gathered ``(out,)`` vector per row."""
        live = [c for c in comps if c is not None]
        if any(c.training and c._random_in_training() for c in live):
            return None
        ref = live[0]
        if ref.embedding:
            return cls._rotate_rows(comps, plan, y, key)
        if ref.fused:

            def build() -> torch.Tensor:
                deltas = {id(c): c._conv_delta_weight(c._stages()) for c in live}
                zero = torch.zeros_like(next(iter(deltas.values())))
                return torch.stack(
                    [deltas[id(c)] if c is not None else zero for c in comps]
                )  # (G, out, in, kh, kw)

            delta = plan.stacked((key, "delta"), build)
            G, m = len(plan.adapters), plan.m
            xs = x if plan.identity else x.index_select(0, plan.index)  # (G · m, C, H, W)
            xg = xs.reshape(G, m, *x.shape[1:]).transpose(0, 1).reshape(m, G * x.shape[1], *x.shape[2:])
            out = ref._conv(xg.to(delta.dtype), delta.reshape(G * ref.out_dim, *delta.shape[2:]), groups=G)
            out = (
                out.reshape(m, G, ref.out_dim, *out.shape[2:])
                .transpose(0, 1)
                .reshape(G * m, ref.out_dim, *out.shape[2:])
            )
            y = plan.scatter_add(y, out)
        if not cls.scaled:
            return y

        def scales() -> torch.Tensor:
            one = torch.ones(ref.out_dim, dtype=ref._dtype(), device=y.device)
            return torch.stack([c._scale() if c is not None else one for c in comps] + [one])  # (G + 1, out)

        s = plan.stacked((key, "scale"), scales).index_select(0, plan.row_group)  # (batch, out)
        s = s.view(s.shape[0], *([1] * (y.dim() - 2)), s.shape[1]) if not ref.kernel else s[:, :, None, None]
        return ref._apply_scale(y, s)

    # --- merging ------------------------------------------------------------------------------------------------
    def check_merge(self, module: nn.Module) -> None:
        with torch.no_grad():
            stages = self._stages(dropout=False)
            if not all(bool(torch.isfinite(b).all()) for b, _ in stages):
                raise ValueError(f"cannot merge {type(self).__name__}: its rotation has non-finite values")
            s = self._scale()
            if s is not None and (bool((s == 0).any()) or not bool(torch.isfinite(s).all())):
                raise ValueError(
                    f"cannot merge {type(self).__name__}: its output scale has zeros or non-finite values, which "
                    "could not be unmerged; keep the adapter unmerged"
                )

    def _weight64(self, module: nn.Module) -> tuple[Any, torch.Tensor, torch.Tensor]:
        backend = backend_for(module)
        if backend is None:
            raise TypeError(f"cannot merge into {type(module).__name__}: no weight backend registered")
        weight = backend.read(module)
        return backend, weight, weight.reshape(self.out_dim, self.in_dim).to(torch.float64)

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        """``W ← s ⊙ (W Rotᵀ)`` (float64, cast back to the weight's dtype)."""
        if self.merged:
            return
        self.check_merge(module)
        backend, weight, flat = self._weight64(module)
        new = self._merged64(flat)
        backend.copy_(module, new.reshape(weight.shape).to(weight.dtype))
        self.merged = True

    def _merged64(self, flat: torch.Tensor) -> torch.Tensor:
        """The merged float64 weight: ``s ⊙ (W Rotᵀ)``; for embeddings (rows are outputs) ``W Rot``."""
        stages = [(b.to(torch.float64), p) for b, p in self._stages(dropout=False)]
        if self.embedding:
            for blocks, perm in stages:
                flat = apply_stage(flat, blocks, perm)
            return flat
        new = self._rotated_weight(flat, stages)
        s = self._scale()
        return new if s is None else new * s.to(torch.float64)[:, None]

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        """``W ← (W / s) Rot⁻ᵀ``: the inverse blocks, transposed, in forward order (float64)."""
        if not self.merged:
            return
        backend, weight, flat = self._weight64(module)
        if self.embedding:  # W Rot⁻¹: the inverse factors in reverse order
            for blocks, perm in reversed(self._stages(dropout=False)):
                flat = apply_stage(flat, torch.linalg.inv(blocks.to(torch.float64)), perm)
            backend.copy_(module, flat.reshape(weight.shape).to(weight.dtype))
            self.merged = False
            return
        s = self._scale()
        if s is not None:
            flat = flat / s.to(torch.float64)[:, None]
        for blocks, perm in self._stages(dropout=False):
            inv = torch.linalg.inv(blocks.to(torch.float64)).transpose(-2, -1)
            flat = apply_stage(flat, inv, perm)
        backend.copy_(module, flat.reshape(weight.shape).to(weight.dtype))
        self.merged = False

    def delta_weight(self, module: nn.Module) -> torch.Tensor:
        """``s ⊙ (W Rotᵀ) - W`` for the module's current weight (canonical layout), for tools that need an additive
        delta; merging itself multiplies (see :meth:`merge`)."""
        with torch.no_grad():
            _, weight, flat = self._weight64(module)
            return (self._merged64(flat) - flat).reshape(weight.shape).to(weight.dtype)


# --- OFT ----------------------------------------------------------------------------------------------------------
@register("oft")
@dataclasses.dataclass(frozen=True, kw_only=True)
class OFT(AdapterConfig):
    """Orthogonal finetuning, v2 (defaults as peft's ``OFTConfig``): ``y = W (R x) + b`` with a block-diagonal
    rotation ``R`` applied to the input.

    Args:
        oft_block_size: size ``b`` of each rotation block (default 32). A size that does not divide a layer's
            input dimension is moved to the nearest divisor, with a warning (as peft).
        r: number of blocks per layer instead (``b = in / r``); give exactly one of ``r`` and ``oft_block_size``
            (the other 0), as in peft: ``OFT(r=4, oft_block_size=0)``.
        use_cayley_neumann: OFT v2's Neumann-series Cayley transform (fast, orthogonal up to ``O(‖Q‖^k)``); False:
            the exact transform (a batched solve).
        num_cayley_neumann_terms: ``k``, the number of Neumann terms (>= 1).
        coft: constrained OFT (OFT §3.3): keep every skew block within ``‖Q‖_F ≤ eps / √blocks``.
        eps: COFT's radius ε (> 0); unused without ``coft``.
        block_share: one rotation block shared by all blocks of a layer.
        module_dropout: in training, the share of blocks replaced by the identity (OFT's multiplicative dropout).
        init_weights: True: ``Q = 0`` (identity); False: ``Q ~ N(0, 0.1²)`` (not an identity; for tests).
        targets: default ``["attn.q", "attn.v"]``, or ``"attn.qkv"`` on models with a fused projection (GPT-2).
    """

    r: int = 0
    oft_block_size: int = 32
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    module_dropout: float = 0.0
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("r", "oft_block_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"OFT {field} must be a non-negative integer, got {value!r}")
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(
                f"OFT takes exactly one of r (blocks per layer) and oft_block_size (block size), the other 0; got "
                f"r={self.r}, oft_block_size={self.oft_block_size} (e.g. OFT(r=4, oft_block_size=0) or "
                "OFT(oft_block_size=16))"
            )
        terms = self.num_cayley_neumann_terms
        if isinstance(terms, bool) or not isinstance(terms, int) or terms < 1:
            raise ValueError(f"OFT num_cayley_neumann_terms must be an integer >= 1, got {terms!r}")
        if not _finite_real(self.eps) or self.eps <= 0:
            raise ValueError(f"OFT eps must be a positive number, got {self.eps!r}")
        if not _finite_real(self.module_dropout) or not 0.0 <= self.module_dropout < 1.0:
            raise ValueError(f"OFT module_dropout must be in [0, 1), got {self.module_dropout!r}")
        for field in ("use_cayley_neumann", "coft", "block_share", "init_weights"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"OFT {field} must be True or False, got {getattr(self, field)!r}")

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("attn.qkv",) if "attn.q" not in roles and "attn.qkv" in roles else ("attn.q", "attn.v")

    def accepts(self, module: nn.Module) -> bool:
        backend = backend_for(module)
        return backend is not None and backend.kind in OFTLayer.kinds

    def build(self, module: nn.Module, name: str) -> Component:
        return OFTLayer(self, module, name)


class OFTLayer(RotationLayer):
    """OFT at one module. ``oft_R: (nb, b (b - 1) / 2)`` (``(1, ...)`` with ``block_share``): the strict upper
    triangles of the skew blocks ``Q_j``; ``R_j = Cayley(Q_j)`` acts on the input block ``j`` as ``x_j ↦ x_j R_j``
    (on an embedding: on the looked-up vectors, as peft's OFT ``Embedding``)."""

    kinds = ("linear", "conv2d", "embedding")

    def __init__(self, cfg: OFT, module: nn.Module, name: str) -> None:
        super().__init__(module, name, "OFT")
        n = self.in_dim
        if cfg.r == 0:
            b = cfg.oft_block_size
            if n % b != 0 or b > n:
                b = adjust_block(n, b)
                warnings.warn(
                    f"OFT oft_block_size={cfg.oft_block_size} does not divide {name!r}'s input size {n}; using {b}",
                    stacklevel=2,
                )
        else:
            r = cfg.r
            if n % r != 0 or r > n:
                r = adjust_block(n, r)
                warnings.warn(
                    f"OFT r={cfg.r} does not divide {name!r}'s input size {n}; using {r} blocks", stacklevel=2
                )
            b = n // r
        self.block_size = b
        self.blocks = n // b
        self.block_share = cfg.block_share
        self.neumann = cfg.use_cayley_neumann
        self.terms = cfg.num_cayley_neumann_terms
        self.coft = cfg.coft
        self.eps = float(cfg.eps)
        self.module_dropout = float(cfg.module_dropout)
        self._random = not cfg.init_weights
        stored = 1 if self.block_share else self.blocks
        self.oft_R = nn.Parameter(torch.empty(stored, b * (b - 1) // 2, **self._factory))

    def extra_repr(self) -> str:
        shared = ", shared" if self.block_share else ""
        form = f"neumann={self.terms}" if self.neumann else "exact cayley"
        return f"blocks={self.blocks}, block_size={self.block_size}{shared}, {form}" + (
            ", coft" if self.coft else ""
        )

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        if self._random:
            nn.init.normal_(self.oft_R, mean=0.0, std=0.1)
        else:
            nn.init.zeros_(self.oft_R)

    @torch.no_grad()
    def _project_(self) -> None:
        """COFT: scale every stored skew block with ``‖Q_j‖_F > ε / √(stored blocks)`` back onto that sphere (in
        place, as peft; ``‖Q_j‖_F = √2 ‖vec_j‖``). Blocks already on the sphere (to 1e-6 relative) are left
        as they are, so projecting is idempotent (a saved and reloaded adapter keeps bit-identical tensors)."""
        radius = self.eps / math.sqrt(self.oft_R.shape[0])
        norm = math.sqrt(2.0) * self.oft_R.norm(dim=1, keepdim=True)
        over = norm > radius * (1 + 1e-6)
        if bool(over.any()):
            self.oft_R.copy_(torch.where(over, self.oft_R * (radius / norm), self.oft_R))

    def rotation_blocks(self) -> torch.Tensor:
        """``R_j``: ``(nb, b, b)`` (``(1, b, b)`` with ``block_share``), without dropout."""
        if self.coft:
            self._project_()
        q = skew(self.oft_R, self.block_size)
        return cayley_neumann(q, self.terms) if self.neumann else cayley_exact(q)

    def _random_in_training(self) -> bool:
        return self.module_dropout > 0 and not self.block_share and self.blocks > 1

    def _stages(self, dropout: bool = True) -> list[Stage]:
        blocks = self.rotation_blocks()
        if dropout and self.training and self._random_in_training():
            # multiplicative dropout: floor(p · nb) random blocks become the identity
            nb, b = self.blocks, self.block_size
            drop = int(self.module_dropout * nb)
            mask = torch.cat([torch.ones(drop), torch.zeros(nb - drop)])[torch.randperm(nb)]
            mask = mask.to(device=blocks.device, dtype=blocks.dtype).view(nb, 1, 1)
            eye = torch.eye(b, dtype=blocks.dtype, device=blocks.device)
            blocks = (1 - mask) * blocks + mask * eye
        return [(blocks, None)]

    @classmethod
    def _row_layout(cls, live: list[RotationLayer]) -> list[tuple[int, Any]] | None:
        """One stage with blocks of the least common multiple of the adapters' block sizes (it divides the input
        size, and a block-diagonal matrix is also block-diagonal with coarser blocks)."""
        return [(math.lcm(*(c.block_size for c in live)), None)]
