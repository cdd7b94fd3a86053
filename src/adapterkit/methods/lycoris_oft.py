"""LyCORIS's Diag-OFT (``algo=diag-oft``) as a component: a block-diagonal Cayley rotation of a module's *output*
channels, ``W' = rescale ⊙ (blockdiag(R_k)ᵀ W)``, bias unchanged (LyCORIS ``lycoris/modules/diag_oft.py``).

Created by the kohya/LyCORIS single-file reader (:mod:`adapterkit.formats.kohya`); not a standalone method (for new
adapters use :class:`~adapterkit.methods.oft.OFT`, peft's OFT v2, which rotates the *input* features: the two
forms do not convert into each other).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..component import Component
from ..config import AdapterConfig, register
from .lora import _finite_real
from .oft import apply_blocks

PUBLIC = ()
__all__ = ["LycorisOFT", "LycorisOFTLayer"]


# --- LyCORIS Diag-OFT -----------------------------------------------------------------------------------------
@register("lycoris_oft")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LycorisOFT(AdapterConfig):
    """LyCORIS's Diag-OFT (``algo=diag-oft``; Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal
    Finetuning", §3 in LyCORIS's form): a block-diagonal Cayley rotation of a module's *output* channels,
    ``W' = rescale ⊙ (blockdiag(R_k)ᵀ W)``, bias unchanged. Created by :func:`load` from kohya/LyCORIS files
    (not a standalone method: for new adapters use :class:`~adapterkit.methods.oft.OFT`).

    Args:
        block_size: rotation block size ``b`` (divides the output size); ``block_sizes`` overrides it per module.
        alpha: LyCORIS's ``constraint``: when > 0, ``‖Q‖_F`` (all blocks) is kept ``<= alpha · out``; ``alphas``
            overrides it per module.
        rescaled: a learned ``(out,)`` output scale (LyCORIS's ``rescaled=True``).
        block_sizes: exact module path -> block size.
        alphas: exact module path -> alpha.
    """

    standalone: ClassVar[bool] = False
    standalone_note: ClassVar[str] = (
        "it is LyCORIS's Diag-OFT as read from kohya/LyCORIS files (adapters.load(file)); train 'oft' instead"
    )

    block_size: int = 4
    alpha: float = 0.0
    rescaled: bool = False
    block_sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alphas: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "block_sizes", dict(self.block_sizes))
        object.__setattr__(self, "alphas", dict(self.alphas))
        for key, b in {"block_size": self.block_size, **self.block_sizes}.items():
            if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
                raise ValueError(f"LycorisOFT block size for {key!r} must be a positive integer, got {b!r}")
        for key, a in {"alpha": self.alpha, **self.alphas}.items():
            if not _finite_real(a) or a < 0:
                raise ValueError(f"LycorisOFT alpha for {key!r} must be a finite number >= 0, got {a!r}")
        if not isinstance(self.rescaled, bool):
            raise ValueError(f"LycorisOFT rescaled must be True or False, got {self.rescaled!r}")

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("attn.q", "attn.v")

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, nn.Conv2d))

    def build(self, module: nn.Module, name: str) -> Component:
        if not self.accepts(module):
            raise TypeError(
                f"LycorisOFT cannot act on {name!r} ({type(module).__name__}): it supports nn.Linear and nn.Conv2d"
            )
        return LycorisOFTLayer(self, module, name)


class LycorisOFTLayer(Component):
    """Diag-OFT at one ``nn.Linear``/``nn.Conv2d``: ``y = rescale ⊙ (Rᵀ (W x)) + bias`` (R block-diagonal over the
    output channels).

    Shapes: ``oft_blocks: (nb, b, b)`` with ``nb · b = out`` (not constrained to be skew: ``Q`` is its
    skew part), ``rescale: (out, 1)`` for linear and ``(out, 1, 1, 1)`` for convolutions (LyCORIS's shapes).
    Forward: a post-hook rotating the output (row vectors ``v_k ↦ v_k R_k``), ``O(out · b)`` per position.
    Merge: ``W ← rescale ⊙ (Rᵀ W)`` in float64; unmerge applies the inverse.
    """

    mergeable = True

    def __init__(self, cfg: LycorisOFT, module: nn.Module, name: str) -> None:
        super().__init__()
        self.conv = isinstance(module, nn.Conv2d)
        self.out_dim = module.out_channels if self.conv else module.out_features
        b = int(cfg.block_sizes.get(name, cfg.block_size))
        if self.out_dim % b != 0:
            raise ValueError(f"LycorisOFT block size {b} does not divide {name!r}'s output size {self.out_dim}")
        self.block_size, self.blocks = b, self.out_dim // b
        self.alpha = float(cfg.alphas.get(name, cfg.alpha))
        self.rescaled = cfg.rescaled
        weight = module.weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        self.oft_blocks = nn.Parameter(torch.zeros(self.blocks, b, b, **factory))
        if self.rescaled:
            self.rescale = nn.Parameter(torch.ones(self.out_dim, *([1] * (weight.dim() - 1)), **factory))
        # the bias is read at forward time (it is not rotated); kept outside the module tree on purpose
        object.__setattr__(self, "_module_ref", module)

    def extra_repr(self) -> str:
        return f"blocks={self.blocks}, block_size={self.block_size}, alpha={self.alpha:g}" + (
            ", rescaled" if self.rescaled else ""
        )

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        nn.init.zeros_(self.oft_blocks)
        if self.rescaled:
            nn.init.ones_(self.rescale)

    def rotation_blocks(self) -> torch.Tensor:
        """``R_k = (I + Q_k)(I - Q_k)⁻¹``: ``(nb, b, b)``, with LyCORIS's norm constraint on ``Q``."""
        q = self.oft_blocks - self.oft_blocks.transpose(1, 2)
        if self.alpha > 0:
            bound = self.alpha * self.out_dim
            norm = torch.linalg.norm(q) + 1e-8
            if bool(norm > bound):
                q = q * (bound / norm)
        eye = torch.eye(self.block_size, dtype=q.dtype, device=q.device).expand_as(q)
        return torch.linalg.solve(eye - q, eye + q, left=False)  # X (I - Q) = I + Q

    def _gain(self) -> torch.Tensor | None:
        return self.rescale.reshape(-1) if self.rescaled else None

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        blocks = self.rotation_blocks()
        bias = getattr(self._base, "bias", None)
        v = y.movedim(1, -1) if self.conv else y
        v = v.to(blocks.dtype)
        if bias is not None:
            v = v - bias.to(v.dtype)
        v = apply_blocks(v, blocks)  # (Rᵀ v) per block = row vector v_k R_k
        gain = self._gain()
        if gain is not None:
            v = v * gain
        if bias is not None:
            v = v + bias.to(v.dtype)
        v = v.to(y.dtype)
        return v.movedim(-1, 1) if self.conv else v

    @property
    def _base(self) -> nn.Module:
        return self.__dict__["_module_ref"]

    def _merged64(self, weight: torch.Tensor) -> torch.Tensor:
        blocks = self.rotation_blocks().detach().to(torch.float64)
        w = weight.to(torch.float64).reshape(self.blocks, self.block_size, -1)
        new = torch.einsum("knm,knj->kmj", blocks, w).reshape(weight.shape)
        gain = self._gain()
        if gain is not None:
            new = new * gain.detach().to(torch.float64).view(-1, *([1] * (weight.dim() - 1)))
        return new

    def check_merge(self, module: nn.Module) -> None:
        with torch.no_grad():
            if not bool(torch.isfinite(self.rotation_blocks()).all()):
                raise ValueError("cannot merge LycorisOFT: its rotation has non-finite values")
            gain = self._gain()
            if gain is not None and (bool((gain == 0).any()) or not bool(torch.isfinite(gain).all())):
                raise ValueError(
                    "cannot merge LycorisOFT: its rescale has zeros or non-finite values, which could not be "
                    "unmerged; keep the adapter unmerged"
                )

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        if self.merged:
            return
        self.check_merge(module)
        module.weight.copy_(self._merged64(module.weight).to(module.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        if not self.merged:
            return
        weight = module.weight.to(torch.float64)
        gain = self._gain()
        if gain is not None:
            weight = weight / gain.to(torch.float64).view(-1, *([1] * (weight.dim() - 1)))
        inv = torch.linalg.inv(self.rotation_blocks().detach().to(torch.float64))
        w = weight.reshape(self.blocks, self.block_size, -1)
        w = torch.einsum("kmn,kmj->knj", inv, w)  # W = (R⁻¹)ᵀ W' per block
        module.weight.copy_(w.reshape(module.weight.shape).to(module.weight.dtype))
        self.merged = False

    def delta_weight(self, module: nn.Module) -> torch.Tensor:
        """``W' - W`` for the module's current weight (for tools that need an additive delta)."""
        with torch.no_grad():
            return (self._merged64(module.weight) - module.weight.to(torch.float64)).to(module.weight.dtype)
