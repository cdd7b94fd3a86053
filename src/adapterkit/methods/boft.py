"""BOFT (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization", ICLR 2024):
OFT whose rotation is a butterfly product of ``m`` permuted block-diagonal orthogonal factors, plus a learned
output scale::

    y = s ⊙ (W (B x)) + b      Bᵀ = M_{m-1} ··· M_1 M_0      M_i = P_i diag(R_i1, ..., R_iD) P_iᵀ
                               R_ij = Cayley(A_ij) = (I - S)(I + S)⁻¹,  S = (A_ij - A_ijᵀ) / 2

        x ──► M_{m-1} ──► ... ──► M_0 ──► W ──► s ⊙ · ──► + b ──► y     (each M_i: permute, D blocks of b, unpermute)

* Butterfly (BOFT §4): ``P_i`` is the block butterfly permutation of level ``i`` (``P_0 = I``); with ``m`` factors of
  ``D`` blocks of size ``b`` the product is dense over blocks of ``b · 2^(m-1)`` features, with
  ``m · D · b²`` parameters (``boft_n_butterfly_factor = 1`` is OFT with exact Cayley and unconstrained blocks).
* Parameters as peft's ``BOFTLayer``: ``boft_R: (m, D, b, b)`` (any square matrices; their skew parts are used),
  ``boft_s``: the output scale, ``(out, 1)`` for linear layers and ``(1, out)`` for convolutions. Init: ``R = 0``
  (identity factors), ``s = 1``; ``init_weights=False`` draws ``R ~ N(0, 0.1²)`` and ``s ~ N(1, 0.1²)``.
* Sizes (peft's rules, raised as errors): give ``boft_block_size`` or ``boft_block_num`` (the other 0); ``b · D``
  must equal the layer's input size (``in · kh · kw`` for convolutions); with several butterfly factors,
  ``b`` and ``D`` are even and ``D`` is a multiple of ``2^(m-1)``.
* ``boft_dropout`` (peft's multiplicative dropout): in training, one randomly chosen factor gets ``⌊p · D⌋`` of its
  blocks replaced by the identity (same random draws as peft: ``randint`` then ``randperm``).
* Cost: peft builds the dense ``(in, in)`` product (dense permutation matrices and ``m`` dense matmuls,
  ``O(m · in³)``) every forward and multiplies the activations by it (``O(in²)`` per token). Here each factor acts on
  the activations (``O(m · in · b)`` per token; permutations are index selects), as OFT v2 does.
* Merge: ``W ← s ⊙ (W B)`` (peft's ``s ⊙ (B_peft Wᵀ)ᵀ``, ``B_peft = Bᵀ`` acting on row vectors); unmerge with the
  inverse factors (float64), exact to rounding.

Module kinds, forward forms and routing as OFT's (``methods/oft.py``, :class:`RotationLayer`): ``nn.Linear`` and
GPT-2 ``Conv1D`` (not exportable to peft) rotate the input; ``nn.Conv2d`` (``groups=1``) rotates the flattened
``in · kh · kw`` patch through the weight (k×k) or the input channels (1×1). peft 0.21 without its CUDA extension
(any CPU machine) silently trains one butterfly factor whatever ``boft_n_butterfly_factor`` says; its files then
hold ``boft_R: (1, D, b, b)``, which load here as the one-factor model peft ran.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..backends import backend_for
from ..component import Component
from ..config import AdapterConfig, register
from .lora import _finite_real
from .oft import RotationLayer, Stage

PUBLIC = ("BOFT",)
__all__ = ["BOFT", "BOFTLayer", "butterfly_perm", "boft_sizes"]


def butterfly_perm(n: int, blocks: int, r: int, factors: int) -> list[int]:
    """peft's ``block_butterfly_perm(n, b, r, n_butterfly_factor)``: the permutation ``perm`` (``P[i, perm[i]] = 1``)
    that regroups ``n`` features in chunks of ``n / blocks``, interleaving sub-blocks of ``r`` (evens first, then
    odds) inside each chunk; the identity when ``factors == 0`` (one factor)."""
    if factors == 0:
        return list(range(n))
    if blocks * r * 2 > n:
        raise ValueError(f"invalid butterfly: {blocks} blocks of 2 × {r} exceed {n} features")
    size = n // blocks
    step = size / r
    seq = [float(v) for v in torch.arange(0, step, 2).tolist()] + [
        float(v) for v in torch.arange(1, step, 2).tolist()
    ]
    order = list(range(size))
    for i, pos in enumerate(seq):
        order[int(i * r) : int(i * r + r)] = list(range(size))[int(pos * r) : int(pos * r + r)]
    out = []
    for start in range(0, n, size):
        out += [start + o for o in order]
    return out


def boft_sizes(n: int, block_size: int, block_num: int, factors: int, where: str) -> tuple[int, int]:
    """``(b, D)`` for an input of ``n`` features, checked as peft checks them (``factors``: butterfly factors - 1).

    Raises:
        ValueError: naming the layer, the sizes and what to change.
    """
    if block_size == 0:
        if n % block_num != 0:
            raise ValueError(f"BOFT at {where}: its input size {n} is not divisible by boft_block_num={block_num}")
        if factors and (factors > int(math.log2(block_num)) or block_num % (2**factors) != 0):
            raise ValueError(
                f"BOFT at {where}: boft_block_num={block_num} must be a multiple of 2^{factors} for "
                f"boft_n_butterfly_factor={factors + 1}"
            )
        block_size = n // block_num
    else:
        if n % block_size != 0:
            raise ValueError(
                f"BOFT at {where}: its input size {n} is not divisible by boft_block_size={block_size}"
            )
        if factors and n % (block_size * 2**factors) != 0:
            raise ValueError(
                f"BOFT at {where}: its input size {n} must be a multiple of boft_block_size · 2^{factors} = "
                f"{block_size * 2**factors} for boft_n_butterfly_factor={factors + 1}"
            )
        block_num = n // block_size
    if factors and (block_num % 2 or block_size % 2):
        raise ValueError(
            f"BOFT at {where}: with several butterfly factors the block size ({block_size}) and the number of blocks "
            f"({block_num}) must be even"
        )
    return block_size, block_num


@register("boft")
@dataclasses.dataclass(frozen=True, kw_only=True)
class BOFT(AdapterConfig):
    """Butterfly orthogonal finetuning (defaults as peft's ``BOFTConfig``).

    Args:
        boft_block_size: size ``b`` of each orthogonal block (default 4); must divide every target's input size.
        boft_block_num: number of blocks ``D`` per factor instead (``b = in / D``); give exactly one of the two (the
            other 0), as peft: ``BOFT(boft_block_num=8, boft_block_size=0)``.
        boft_n_butterfly_factor: number ``m`` of butterfly factors (1: block-diagonal OFT).
        boft_dropout: in training, the share of one random factor's blocks replaced by the identity.
        init_weights: True: identity factors and unit scale; False: random (not an identity; for tests).
        targets: default ``["attn.q", "attn.v"]``, or ``"attn.qkv"`` on models with a fused projection (GPT-2).
    """

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("boft_block_size", "boft_block_num"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"BOFT {field} must be a non-negative integer, got {value!r}")
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ValueError(
                "BOFT takes exactly one of boft_block_size and boft_block_num, the other 0; got "
                f"boft_block_size={self.boft_block_size}, boft_block_num={self.boft_block_num} (e.g. "
                "BOFT(boft_block_num=8, boft_block_size=0))"
            )
        m = self.boft_n_butterfly_factor
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"BOFT boft_n_butterfly_factor must be an integer >= 1, got {m!r}")
        if not _finite_real(self.boft_dropout) or not 0.0 <= self.boft_dropout < 1.0:
            raise ValueError(f"BOFT boft_dropout must be in [0, 1), got {self.boft_dropout!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"BOFT init_weights must be True or False, got {self.init_weights!r}")

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("attn.qkv",) if "attn.q" not in roles and "attn.qkv" in roles else ("attn.q", "attn.v")

    def accepts(self, module: nn.Module) -> bool:
        backend = backend_for(module)
        return backend is not None and backend.kind in ("linear", "conv2d")

    def build(self, module: nn.Module, name: str) -> Component:
        return BOFTLayer(self, module, name)


class BOFTLayer(RotationLayer):
    """BOFT at one module: ``boft_R: (m, D, b, b)``, ``boft_s: (out, 1)`` (linear) or ``(1, out)`` (conv)."""

    scaled = True

    def __init__(self, cfg: BOFT, module: nn.Module, name: str) -> None:
        super().__init__(module, name, "BOFT")
        extra = cfg.boft_n_butterfly_factor - 1
        b, D = boft_sizes(self.in_dim, cfg.boft_block_size, cfg.boft_block_num, extra, repr(name))
        self.block_size, self.blocks, self.factors = b, D, extra + 1
        self.dropout = float(cfg.boft_dropout)
        self._random = not cfg.init_weights
        # the permutation of each factor (None for the identity, always factor 0), as (perm, inverse) index tensors
        self._perms: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for i in range(self.factors):
            perm = butterfly_perm(self.in_dim, D // 2**i, b // 2, extra)
            if perm == list(range(self.in_dim)):
                self._perms.append(None)
                continue
            p = torch.tensor(perm, dtype=torch.long, device=self._factory["device"])
            self.register_buffer(f"_perm{i}", p, persistent=False)
            self.register_buffer(f"_inv{i}", torch.argsort(p), persistent=False)
            self._perms.append((i,))  # resolved to the buffers in _perm (they follow .to())
        self.boft_R = nn.Parameter(torch.empty(self.factors, D, b, b, **self._factory))
        shape = (1, self.out_dim) if self.kernel else (self.out_dim, 1)
        self.boft_s = nn.Parameter(torch.empty(shape, **self._factory))

    def extra_repr(self) -> str:
        return f"factors={self.factors}, blocks={self.blocks}, block_size={self.block_size}"

    def _perm(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._perms[i] is None:
            return None
        return getattr(self, f"_perm{i}"), getattr(self, f"_inv{i}")

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        if self._random:
            nn.init.normal_(self.boft_R, mean=0.0, std=0.1)
            nn.init.normal_(self.boft_s, mean=1.0, std=0.1)
        else:
            nn.init.zeros_(self.boft_R)
            nn.init.ones_(self.boft_s)

    def rotation_blocks(self) -> torch.Tensor:
        """``R_ij = (I - S)(I + S)⁻¹`` with ``S`` the skew part of ``boft_R``: ``(m, D, b, b)``, without dropout."""
        m, D, b = self.factors, self.blocks, self.block_size
        a = self.boft_R.reshape(m * D, b, b)
        s = 0.5 * (a - a.transpose(-2, -1))
        eye = torch.eye(b, dtype=a.dtype, device=a.device).expand_as(s)
        return torch.linalg.solve(eye + s, eye - s, left=False).reshape(m, D, b, b)

    def _random_in_training(self) -> bool:
        return self.dropout > 0

    def _stages(self, dropout: bool = True) -> list[Stage]:
        blocks = self.rotation_blocks()
        if dropout and self.training and self.dropout > 0:
            m, D, b = self.factors, self.blocks, self.block_size
            pick = int(torch.randint(0, m, (1,)).item())
            drop = int(self.dropout * D)
            mask = torch.cat([torch.ones(drop), torch.zeros(D - drop)])[torch.randperm(D)]
            full = torch.zeros(m, D, 1, 1)
            full[pick] = mask.view(D, 1, 1)
            full = full.to(device=blocks.device, dtype=blocks.dtype)
            eye = torch.eye(b, dtype=blocks.dtype, device=blocks.device)
            blocks = (1 - full) * blocks + full * eye
        # on row vectors peft computes x B_peft with B_peft = M_{m-1} ··· M_0: factor m-1 acts first
        return [(blocks[i], self._perm(i)) for i in reversed(range(self.factors))]

    def _scale(self) -> torch.Tensor:
        return self.boft_s.reshape(-1)

    @classmethod
    def _row_layout(cls, live: list[RotationLayer]) -> list[tuple[int, Any]] | None:
        """The stages of the first component when every component has the same factors, blocks and permutations."""
        ref = live[0]
        if any((c.factors, c.blocks, c.block_size) != (ref.factors, ref.blocks, ref.block_size) for c in live):
            return None
        return [(ref.block_size, ref._perm(i)) for i in reversed(range(ref.factors))]
