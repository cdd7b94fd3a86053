"""Adapters for convolutional networks (issue 19, item 4): Conv-Adapter and residual adapters, plus the
AdaptFormer preset of the parallel bottleneck for vision transformers.

**Conv-Adapter** (Chen et al. 2022, "Conv-Adapter: Exploring Parameter Efficient Transfer Learning for
ConvNets", §3.2, the *conv-parallel* placement): beside each ``k×k`` convolution ``y = K * x`` a bottleneck
whose down projection is a depth-wise convolution with the same kernel size, stride, padding and dilation
(``C_in -> C_in/γ`` channels, groups ``gcd(C_in, C_in/γ)``: each hidden channel sees ``γ`` input channels), a
non-linearity, a point-wise up projection (``C_in/γ -> C_out``) and a channel-wise scale ``α``::

    y' = y + α ⊙ W_up * σ(W_down * x)          α: (C_out,), init 1; W_up init 0 (identity at init)

Not mergeable (the non-linearity).

**Residual adapters** (Rebuffi et al. 2017, "Learning multiple visual domains with residual adapters", §3, the
*series* form; Rebuffi et al. 2018, "Efficient parametrization of multi-domain deep neural networks", §3, the
*parallel* form): a ``1×1`` convolution ``W`` beside (parallel: ``y' = K * x + W * x``, ``W: C_in -> C_out``
with the convolution's stride) or after (series: ``y' = y + W * y``, ``W: C_out -> C_out``) a convolution,
``W`` zero at init. Both merge exactly into the convolution: parallel adds ``W`` at the kernel's centre tap
(needs ``2·padding == dilation·(k - 1)``, so that ``1×1`` and ``k×k`` outputs align), series replaces
``K, b`` by ``(I + W) K, (I + W) b``. The papers' batch norm inside the adapter is left out (a frozen network's
own normalization follows the convolution); their domain-specific BN layers can be trained with
``heads=[...]`` copies.

**AdaptFormer** (Chen et al. 2022, "AdaptFormer: Adapting Vision Transformers for Scalable Visual
Recognition", §3.2) is the parallel bottleneck beside the ViT MLP with bottleneck 64, ReLU, scale 0.1: the
preset ``"adaptformer"`` of :class:`~adapterkit.methods.bottleneck.Bottleneck`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..component import Component
from ..config import AdapterConfig, register, register_preset
from .bottleneck import Bottleneck

PUBLIC = ("ConvAdapter", "ResidualAdapter")

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}


def _check_conv(module: nn.Module, name: str, what: str) -> None:
    if not isinstance(module, nn.Conv2d):
        raise TypeError(f"{what} acts on nn.Conv2d; {name!r} is a {type(module).__name__}: pick convolutions")
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        raise TypeError(
            f"{what} on {name!r} needs numeric zero padding (got {module.padding!r}/{module.padding_mode})"
        )


def _is_kxk(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and max(module.kernel_size) > 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class _OnConvolutions(AdapterConfig):
    """Targets of the convolution adapters: ``nn.Conv2d`` modules; by default every ``k×k`` one (``k > 1``), not
    the ``1×1`` shortcuts (the papers' placement)."""

    def default_targets(self, roles: Mapping[str, Any]) -> Sequence[Any]:
        return [nn.Conv2d]

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d)

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        """The default selection keeps the ``k×k`` convolutions (not ``1×1`` shortcuts)."""
        keep = targets if self.targets is not None else [n for n in targets if _is_kxk(modules[n])]
        return {n: self.build(modules[n], n) for n in keep}


# --- Conv-Adapter ------------------------------------------------------------------------------------------------
@register("conv_adapter")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvAdapter(_OnConvolutions):
    """Conv-Adapter (Chen et al. 2022) beside convolutions.

    Args:
        targets: convolutions to adapt (default: every ``k×k`` convolution, ``k > 1``).
        reduction_factor: ``γ``: the hidden width is ``max(1, C_in // γ)`` (the paper's default 4).
        non_linearity: ``relu`` (default), ``gelu``, ``silu``/``swish`` or ``tanh``.
        init_weights: True: zero up projection (identity at init); False: random (for tests).
    """

    reduction_factor: int = 4
    non_linearity: str = "relu"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be a positive integer, got {self.reduction_factor!r}")
        if self.non_linearity not in _ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {sorted(_ACTIVATIONS)}, got {self.non_linearity!r}")

    def build(self, module: nn.Module, name: str) -> Component:
        _check_conv(module, name, "Conv-Adapter")
        return ConvAdapterComponent(self, module)


class ConvAdapterComponent(Component):
    """``y + α ⊙ up(σ(down(x)))``. Shapes: ``x: (N, C_in, H, W)``, ``y: (N, C_out, H', W')``, ``down.weight:
    (h, C_in / groups, kh, kw)``, ``up.weight: (C_out, h, 1, 1)``, ``alpha: (C_out,)``."""

    def __init__(self, cfg: ConvAdapter, module: nn.Conv2d) -> None:
        super().__init__()
        c_in, c_out = module.in_channels, module.out_channels
        hidden = max(1, c_in // cfg.reduction_factor)
        w = module.weight
        factory = {"device": w.device, "dtype": w.dtype}
        self.down = nn.Conv2d(c_in, hidden, module.kernel_size, stride=module.stride, padding=module.padding,
                              dilation=module.dilation, groups=math.gcd(c_in, hidden), bias=True, **factory)  # fmt: skip
        self.up = nn.Conv2d(hidden, c_out, 1, bias=True, **factory)
        self.alpha = nn.Parameter(torch.ones(c_out, **factory))
        self.act = cfg.non_linearity
        self.random = not cfg.init_weights

    def initialize(self, module: nn.Module) -> None:
        if self.random:
            nn.init.normal_(self.up.weight, std=0.1)
            nn.init.normal_(self.up.bias, std=0.1)
            nn.init.normal_(self.alpha, mean=1.0, std=0.1)
        else:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.to(self.down.weight.dtype)
        h = self.up(_ACTIVATIONS[self.act](self.down(x)))
        return y + (h * self.alpha.view(1, -1, 1, 1)).to(y.dtype)


# --- residual adapters -------------------------------------------------------------------------------------------
@register("residual_adapter")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ResidualAdapter(_OnConvolutions):
    """Residual adapters (Rebuffi et al. 2017/2018): a ``1×1`` convolution beside or after convolutions.

    Args:
        targets: convolutions to adapt (default: every ``k×k`` convolution, ``k > 1``).
        mode: ``"parallel"`` (2018: ``K * x + W * x``; the ``1×1`` and ``k×k`` outputs must align:
            ``2·padding == dilation·(k - 1)``) or ``"series"`` (2017: ``y + W * y``).
        init_weights: True: ``W = 0`` (identity at init); False: random (for tests).
    """

    mode: str = "parallel"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("parallel", "series"):
            raise ValueError(f"mode must be 'parallel' or 'series', got {self.mode!r}")

    def build(self, module: nn.Module, name: str) -> Component:
        _check_conv(module, name, "a residual adapter")
        if self.mode == "parallel":
            for pad, dil, k in zip(module.padding, module.dilation, module.kernel_size, strict=True):
                if 2 * pad != dil * (k - 1):
                    raise TypeError(
                        f"a parallel residual adapter on {name!r} needs outputs that align with a 1×1 convolution "
                        f"(2·padding == dilation·(k-1); it has padding {module.padding}, kernel {module.kernel_size}"
                        f", dilation {module.dilation}): use mode='series' there or leave it out of targets"
                    )
            if module.groups != 1:
                raise TypeError(f"a parallel residual adapter on {name!r} needs groups=1 (it has {module.groups})")
        return ResidualAdapterComponent(self, module)


class ResidualAdapterComponent(Component):
    """Parallel: ``y + W * x`` (``W: (C_out, C_in, 1, 1)``, the convolution's stride); series: ``y + W * y``
    (``W: (C_out, C_out, 1, 1)``). Mergeable (see the module docstring); unmerge restores the saved weights."""

    mergeable = True
    additive = True

    def __init__(self, cfg: ResidualAdapter, module: nn.Conv2d) -> None:
        super().__init__()
        c_in = module.in_channels if cfg.mode == "parallel" else module.out_channels
        w = module.weight
        self.weight = nn.Parameter(torch.zeros(module.out_channels, c_in, 1, 1, device=w.device, dtype=w.dtype))
        self.mode = cfg.mode
        self.stride = tuple(module.stride) if cfg.mode == "parallel" else (1, 1)
        self.additive = cfg.mode == "parallel"
        self.random = not cfg.init_weights
        self._saved: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def initialize(self, module: nn.Module) -> None:
        if self.random:
            nn.init.normal_(self.weight, std=0.1)

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        src = x if self.mode == "parallel" else y
        return y + F.conv2d(src.to(self.weight.dtype), self.weight, stride=self.stride).to(y.dtype)

    def check_merge(self, module: nn.Module) -> None:
        if self.mode == "series" and module.groups != 1:
            raise TypeError(
                f"a series residual adapter merges into groups=1 convolutions only (groups={module.groups})"
            )

    def delta_weight(self, module: nn.Module) -> torch.Tensor:
        K = module.weight
        W = self.weight[:, :, 0, 0].to(K.dtype)
        if self.mode == "series":
            return torch.einsum("oc,cikl->oikl", W, K)
        delta = torch.zeros_like(K)
        kh, kw = module.kernel_size
        delta[:, :, kh // 2, kw // 2] = W
        return delta

    def delta_bias(self, module: nn.Module) -> torch.Tensor | None:
        if self.mode == "series" and module.bias is not None:
            return self.weight[:, :, 0, 0].to(module.bias.dtype) @ module.bias
        return None

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        if self.merged:
            return
        self.check_merge(module)
        bias = module.bias.detach().clone() if module.bias is not None else None
        self._saved = (module.weight.detach().clone(), bias)
        delta_w, delta_b = self.delta_weight(module), self.delta_bias(module)
        module.weight.add_(delta_w)
        if delta_b is not None:
            module.bias.add_(delta_b)
        self.merged = True

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        if not self.merged:
            return
        assert self._saved is not None
        weight, bias = self._saved
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
        self._saved = None
        self.merged = False


# AdaptFormer (Chen et al. 2022, §3.2, "AdaptMLP"): parallel to the MLP, bottleneck 64, ReLU, scale s = 0.1
register_preset(
    "adaptformer", Bottleneck(placement="parallel", bottleneck_size=64, non_linearity="relu", scaling=0.1)
)
