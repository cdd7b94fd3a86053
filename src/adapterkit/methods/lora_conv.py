"""LoRA and DoRA on ``nn.Conv1d``, ``nn.Conv3d`` and grouped/depthwise ``nn.Conv2d`` (peft's ``lora.ConvNd``).

Wav2Vec2's feature encoder and Mamba's mixer use ``nn.Conv1d``; ConvNeXt's and Mamba's convolutions are depthwise
(``groups = channels``). ``methods/lora.py``'s ``LoRAConv2d`` covers ungrouped ``nn.Conv2d``; this module covers the
rest, with peft's layout so that files convert without a key change (``formats/peft_lora.py`` reads ``lora_A``,
``lora_B``, ``magnitude`` and ``bias`` of any LoRA component)::

        x ──► W (groups g) ───────────────────────┐
        │                                         (+) ──► y = W * x + s · B_g * (A * x)
        └─► dropout ─► A (k-conv, in → r) ─► B (1-conv, r → out, groups g) ─► ·s

* ``A: (r, in, *kernel)``: a full convolution (``groups=1``) with the base's stride, padding and dilation;
  ``B: (out, r / g, 1, …)``: a 1×…×1 convolution with the base's ``groups`` (peft: ``lora_B = Conv(r, out, 1,
  groups=base.groups)``), so ``r`` must be a multiple of ``g`` (peft refuses other ranks too).
* With ``g = 1`` the branch is the weight change ``ΔW[o, i, …] = s Σ_k B[o, k] A[k, i, …]`` (Hu et al. 2021, §4.1)
  and merges. With ``g > 1`` A mixes every input channel while the grouped base weight only connects channels of
  one group: no ``ΔW`` of the base's shape equals the branch, so merging is refused (as peft:
  "Merging is not supported for _ConvNd layers with groups > 1").
* DoRA (Liu et al. 2024, §4.1): ``m · (W + ΔW) / ||W + ΔW||`` with one magnitude per output channel, shaped
  ``(1, out, 1, …)`` as peft's ``lora_magnitude_vector``, the norm detached (§4.3). Only for ``g = 1``: peft's DoRA
  reshapes ``B A`` of a grouped convolution into the weight's shape without regard to the groups (a norm of
  reshuffled entries), which we do not reproduce.
* Init (peft's): A Kaiming-uniform (a = √5, fan-in ``in · prod(kernel)``), B = 0; ``gaussian``: A ~ N(0, 1/r).

Hook-up (one line each in ``LoRA.accepts`` and at the top of ``LoRA.build`` in ``methods/lora.py``)::

    accepts: return backend_for(module) is not None or ... or lora_conv.handles(module)
    build:   if lora_conv.handles(module): return lora_conv.LoRAConv(self, module, name)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..component import Component

__all__ = ["LoRAConv", "handles"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def handles(module: nn.Module) -> bool:
    """``nn.Conv1d``/``nn.Conv3d`` of any groups, and ``nn.Conv2d`` with ``groups > 1`` (``LoRAConv2d`` takes the
    ungrouped ones)."""
    if isinstance(module, (nn.Conv1d, nn.Conv3d)):
        return True
    return isinstance(module, nn.Conv2d) and module.groups > 1


class LoRAConv(Component):
    """LoRA/DoRA on a convolution (see the module docstring).

    Shapes (``d`` spatial dims, ``g`` groups): ``x: (N, in, *S)``, ``y: (N, out, *S')``, ``lora_A: (r, in,
    *kernel)``, ``lora_B: (out, r / g, 1, …)``, ``magnitude: (1, out, 1, …)`` with DoRA, ``bias: (out,)`` with
    ``bias="lora_only"``/``"all"`` on a module that has one.

    Raises:
        TypeError: the rank is not a multiple of ``groups``, non-zero padding modes, DoRA on a grouped convolution,
            PiSSA/OLoRA inits (naming what to change).
    """

    def __init__(self, cfg: Any, module: nn.Module, name: str) -> None:
        super().__init__()
        groups, r = module.groups, cfg.rank_for(name)
        if r % groups:
            fit = groups * max(1, round(r / groups))
            raise TypeError(
                f"LoRA on {name!r} ({type(module).__name__}, groups={groups}) needs a rank that is a multiple of the "
                f"groups (as peft), got r={r}; e.g. rank_pattern={{{name!r}: {fit}}}, or exclude it"
            )
        if module.padding_mode != "zeros":
            raise TypeError(f"LoRA on {name!r} needs zero padding (padding_mode={module.padding_mode!r})")
        init = getattr(cfg.init, "value", cfg.init)
        if init in ("pissa", "olora"):
            raise TypeError(f"{init} init is available for linear-like modules only, not {type(module).__name__}")
        if cfg.dora and groups > 1:
            raise TypeError(
                f"DoRA on the grouped convolution {name!r} (groups={groups}) is not supported: its weight norm would "
                "need ΔW in the grouped weight's shape, which LoRA's full-rank A does not have; use plain LoRA there"
            )
        weight = module.weight
        dims = weight.dim() - 2
        ones = (1,) * dims
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.cfg = cfg
        self.r = r
        self.scaling = cfg.scaling_for(name)
        self.groups = groups
        self.conv = _CONV[dims]
        self.args = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
        self.lora_A = nn.Parameter(torch.empty((r, module.in_channels, *module.kernel_size), **factory))
        self.lora_B = nn.Parameter(torch.empty((module.out_channels, r // groups, *ones), **factory))
        self.magnitude = nn.Parameter(torch.ones((1, module.out_channels, *ones), **factory)) if cfg.dora else None
        has_bias = isinstance(getattr(module, "bias", None), torch.Tensor)
        wants_bias = getattr(cfg.bias, "value", cfg.bias) != "none"
        self.bias = nn.Parameter(torch.zeros(module.bias.shape, **factory)) if wants_bias and has_bias else None
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.additive = self.magnitude is None
        self.mergeable = groups == 1
        self._merge_gain: torch.Tensor | None = None
        object.__setattr__(self, "_module_ref", module)  # DoRA reads the base weight; kept out of the module tree

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, groups={self.groups}" + (
            ", dora" if self.magnitude is not None else ""
        )

    @property
    def _base(self) -> nn.Module:
        return self.__dict__["_module_ref"]

    # --- init ------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        if getattr(self.cfg.init, "value", self.cfg.init) == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if self.cfg.init_weights:
            nn.init.zeros_(self.lora_B)
        else:
            nn.init.normal_(self.lora_B, std=0.1)
        if self.magnitude is not None:
            self.magnitude.copy_(self._norm(module.weight))

    # --- forward ---------------------------------------------------------------------------
    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        """``s · B_g * (A * dropout(x))`` in the adapter's dtype."""
        x = x if self.dropout is None else self.dropout(x)
        x = x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)
        h = self.conv(x, self.lora_A, None, **self.args)
        return self.conv(h, self.lora_B, None, groups=self.groups) * self.scaling

    def _bias_view(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.dtype).view(1, -1, *([1] * (like.dim() - 2)))

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lora = self._branch(x)
        if self.magnitude is not None:
            gain = self.magnitude / self._norm(self._base.weight)  # (1, out, 1, ...)
            if self.dropout is not None and self.training:  # DoRA's base term on the dropped input (as peft)
                xd = self.dropout(x)
                base = self.conv(xd, self._base.weight.to(xd.dtype), None, groups=self.groups, **self.args)
            else:
                bias = self._base.bias
                base = y if bias is None else y - self._bias_view(bias, y)
            y = y + ((gain - 1) * base.to(gain.dtype) + gain * lora).to(y.dtype)
        else:
            y = y + lora.to(y.dtype)
        return y if self.bias is None else y + self._bias_view(self.bias, y)

    # --- weight change, DoRA norm, merging -------------------------------------------------
    def _delta(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``s · B A`` as a weight of the base's shape (``groups == 1`` only)."""
        return torch.einsum("or,ri...->oi...", B.flatten(1), A) * self.scaling

    def _norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W + ΔW||`` per output channel, ``(1, out, 1, ...)``, float32, detached (DoRA §4.3)."""
        w = weight.detach().float() + self._delta(self.lora_A.detach(), self.lora_B.detach()).float()
        norm = w.norm(p=2, dim=tuple(range(1, w.dim())))
        return norm.to(self.lora_A.dtype).view(self.magnitude.shape)

    def delta_weight(self, module: nn.Module) -> torch.Tensor | None:
        return self._delta(self.lora_A.detach(), self.lora_B.detach()) if self.groups == 1 else None

    def delta_bias(self, module: nn.Module) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.detach()

    def check_merge(self, module: nn.Module) -> None:
        if self.groups != 1:
            raise TypeError(
                f"LoRA on a grouped convolution (groups={self.groups}) has no weight change of the base's shape"
            )
        if parametrize.is_parametrized(module, "weight"):  # e.g. weight_norm: .weight is computed, not stored
            raise TypeError(f"the weight of this {type(module).__name__} is parametrized; merging would not stick")

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        if self.merged:
            return
        self.check_merge(module)
        weight = module.weight.data
        delta = self.delta_weight(module).to(weight.dtype)
        if self.magnitude is None:
            weight.add_(delta)
        else:
            gain = (self.magnitude / self._norm(weight)).transpose(0, 1).to(weight.dtype)  # (out, 1, 1, ...)
            weight.copy_((weight + delta) * gain)
            self._merge_gain = gain
        if self.bias is not None:
            module.bias.data.add_(self.bias.to(module.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        if not self.merged:
            return
        weight = module.weight.data
        delta = self.delta_weight(module).to(weight.dtype)
        if self._merge_gain is None:
            weight.sub_(delta)
        else:
            weight.copy_(weight / self._merge_gain - delta)
            self._merge_gain = None
        if self.bias is not None:
            module.bias.data.sub_(self.bias.to(module.bias.dtype))
        self.merged = False
