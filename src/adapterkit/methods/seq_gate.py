"""Sequence gates: AdapterHub's ``use_gating`` (UniPELT, Mao et al. 2022, §3) on a LoRA or bottleneck config.

UniPELT gates each submodule by a learned scalar per sequence. AdapterHub (``adapters`` 1.x) computes it from
the submodule's input ``x: (B, L, in)`` and averages over the positions (padding included)::

    g = mean_t sigmoid(W_g x_t + b_g)                  (B, heads);  W_g: (heads, in), b_g: (heads,)

- **LoRA** (``x`` the input of the adapted linear layer): ``y = W x + b + g · (B A x)``. AdapterHub's gated LoRA
  has no ``alpha / r`` (the gate replaces it); ours keeps the inner LoRA's scaling, so AdapterHub files load with
  ``alpha = r``. On a fused q/k/v projection (GPT-2's ``c_attn``) AdapterHub has one gate output per enabled matrix
  (``fused_qkv``, e.g. ``"qv"``), each scaling that matrix's third of the outputs.
- **Bottleneck** (``x`` the adapter's input ``h``, before ``ln_before``): the branch ``s · up(act(down(h)))`` is
  multiplied by ``g`` (after the scaling and dropout, before the adapter's residual and ``ln_after``), as
  AdapterHub's ``Adapter.forward``.

This differs from :class:`~adapterkit.methods.union.Union`'s ``gated=True`` (UniPELT's released code: a per-token
gate from the module input around every member); the prefix gate is ``PrefixTuning(gated=True)``.
``ak.SequenceGated(ak.LoRA(...))`` plans where its inner config does; gated components are not mergeable and run
each adapter on its own rows under per-row routing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..component import Component, first_input
from ..config import AdapterConfig, get_config, register
from .bottleneck import Bottleneck, _BottleneckBase
from .lora import LoRA, _LoRABase

PUBLIC = ("SequenceGated",)
__all__ = ["SequenceGated", "LoRAGate", "sequence_gate"]


@register("sequence_gated")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceGated(AdapterConfig):
    """A LoRA or bottleneck config whose effect is scaled by a per-sequence gate (see the module docstring).

    Args:
        config: the gated config (``ak.LoRA(...)`` or ``ak.Bottleneck(...)``, or a registered name/preset; default
            ``ak.LoRA()``); its ``targets``/``exclude``/``layers`` decide the sites (leave this config's unset).
        fused_qkv: for LoRA on fused q/k/v projections: the enabled matrices in q, k, v order (``"qv"``), one gate
            output each (AdapterHub's gating heads); ``""``: one gate output for all outputs.
        init_weights: False starts the gates from random values (tests); else ``N(0, 0.02²)`` weights and zero
            bias (g ≈ 0.5), AdapterHub's init.
    """

    config: AdapterConfig | None = None
    fused_qkv: str = ""
    init_weights: bool = True

    def __post_init__(self) -> None:
        if self.config is None:
            object.__setattr__(self, "config", LoRA())
        if isinstance(self.config, str):
            object.__setattr__(self, "config", get_config(self.config))
        if not self.init_weights and isinstance(self.config, (LoRA, Bottleneck)) and self.config.init_weights:
            object.__setattr__(self, "config", self.config.replace(init_weights=False))
        inner = self.config
        if not isinstance(inner, (LoRA, Bottleneck)):
            raise ValueError(
                f"SequenceGated gates a LoRA or Bottleneck config, got {type(inner).__name__}; for prefixes use "
                "PrefixTuning(gated=True)"
            )
        if isinstance(inner, LoRA) and inner.dora:
            raise ValueError("SequenceGated does not gate DoRA (its magnitude rescales the base output)")
        mirrored = (self.targets, self.exclude, self.layers) == (inner.targets, inner.exclude, inner.layers)
        if not mirrored and (self.targets is not None or self.exclude or self.layers is not None):
            # (equal to the gated config's: copied below by an earlier __post_init__, e.g. through replace())
            raise ValueError("set targets/exclude/layers on the gated config, not on SequenceGated")
        if inner.heads:
            raise ValueError("set heads on SequenceGated, not on the gated config")
        if self.fused_qkv and (
            not isinstance(inner, LoRA)
            or any(m not in "qkv" for m in self.fused_qkv)
            or list(self.fused_qkv) != sorted(set(self.fused_qkv), key="qkv".index)
        ):
            raise ValueError(
                f"fused_qkv must list LoRA's fused matrices in q, k, v order (e.g. 'qv'), got {self.fused_qkv!r}"
            )
        object.__setattr__(self, "targets", inner.targets)
        object.__setattr__(self, "exclude", inner.exclude)
        object.__setattr__(self, "layers", inner.layers)
        super().__post_init__()

    def default_targets(self, roles: Mapping[str, Any]) -> Sequence[Any]:
        return self.config.default_targets(roles)

    def parameter_targets(self) -> Sequence[str]:
        return self.config.parameter_targets()

    def accepts(self, module: nn.Module) -> bool:
        return self.config.accepts(module)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in ("targets", "exclude", "layers"):  # the inner config's: not fields of this one
            out.pop(name, None)
        return out

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        built = self.config.build_all(modules, targets, select)
        return {n: self._gated(n, modules[n], c) for n, c in built.items()}

    def extra_sites(self, modules: Mapping[str, nn.Module], targets: list[str]) -> dict[str, Component]:
        extra = self.config.extra_sites(modules, targets)
        return {n: self._gated(n, modules[n], c) for n, c in extra.items()}

    def _gated(self, name: str, module: nn.Module, comp: Component) -> Component:
        if isinstance(comp, _BottleneckBase):
            sequence_gate(comp, comp.in_dim, self.init_weights)
            return comp
        if isinstance(comp, _LoRABase):
            return LoRAGate(comp, module, self.fused_qkv, self.init_weights)
        return comp  # observers (residual / FFN-input taps), bias deltas: not gated


def _mean_gate(gate: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``mean_t sigmoid(gate(x_t))``: ``(B, heads)`` for ``x: (B, L, in)``, ``(1, heads)`` for ``x: (L, in)``."""
    g = torch.sigmoid(gate(x.to(gate.weight.dtype)))
    return g.mean(dim=1) if g.dim() == 3 else g.mean(dim=0, keepdim=True)


def _new_gate(in_dim: int, outputs: int, like: torch.Tensor, init_weights: bool) -> nn.Linear:
    dtype = like.dtype if like.is_floating_point() else torch.float32
    gate = nn.Linear(in_dim, outputs, device=like.device, dtype=dtype)
    with torch.no_grad():
        nn.init.normal_(gate.weight, std=0.02 if init_weights else 0.5)
        nn.init.zeros_(gate.bias)
    return gate


class _GatedBranch:
    """Mixin for bottleneck components: ``branch(h) · mean_t sigmoid(gate(h_t))``; never batched across adapters."""

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        out = super().branch(h)  # type: ignore[misc]
        g = _mean_gate(self.gate, h)  # type: ignore[attr-defined]
        return out * (g[:, None, :] if out.dim() == 3 else g).to(out.dtype)

    def _batchable(self) -> bool:
        return False

    def initialize(self, module: nn.Module) -> None:
        super().initialize(module)  # type: ignore[misc]
        with torch.no_grad():
            nn.init.normal_(self.gate.weight, std=0.02 if not self._gate_random else 0.5)  # type: ignore[attr-defined]
            nn.init.zeros_(self.gate.bias)  # type: ignore[attr-defined]


_GATED_CLASSES: dict[type, type] = {}


def sequence_gate(comp: _BottleneckBase, in_dim: int, init_weights: bool = True) -> _BottleneckBase:
    """Give a bottleneck component AdapterHub's gate in place (its class becomes a gated subclass, a ``gate``
    submodule ``Linear(in_dim, 1)`` is added); returns it."""
    cls = type(comp)
    if cls not in _GATED_CLASSES:
        _GATED_CLASSES[cls] = type(f"Gated{cls.__name__}", (_GatedBranch, cls), {"__module__": __name__})
    comp.__class__ = _GATED_CLASSES[cls]
    like = comp.down.bias if getattr(comp.down, "bias", None) is not None else next(comp.parameters())
    comp.gate = _new_gate(in_dim, 1, like, init_weights)
    comp._gate_random = not init_weights
    return comp


class LoRAGate(Component):
    """AdapterHub's gate around a LoRA component: ``y + g · (lora(x, y) - y)`` with ``g`` per sequence (and per
    fused matrix). Parameters: ``inner.*`` and ``gate.weight: (heads, in)``, ``gate.bias: (heads,)``."""

    def __init__(self, inner: _LoRABase, module: nn.Module, fused_qkv: str, init_weights: bool) -> None:
        super().__init__()
        self.inner = inner
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"SequenceGated LoRA needs a linear-like module, got {type(module).__name__}")
        from ..backends import backend_for

        backend = backend_for(module)
        in_dim, out_dim = backend.dims(module) if backend is not None else (weight.shape[1], weight.shape[0])
        heads = len(fused_qkv) or 1
        if fused_qkv and out_dim % 3:
            raise ValueError(
                f"fused_qkv {fused_qkv!r} needs a fused q/k/v projection (3·H outputs), got {out_dim}"
            )
        self.fused_qkv = fused_qkv
        self.out_dim = out_dim
        self.gate = _new_gate(in_dim, heads, weight, init_weights)
        self._random = not init_weights
        self.has_pre = inner.has_pre
        self.has_post = inner.has_post

    def extra_repr(self) -> str:
        return f"heads={self.gate.out_features}" + (f", fused_qkv={self.fused_qkv!r}" if self.fused_qkv else "")

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        self.inner.initialize(module)
        nn.init.normal_(self.gate.weight, std=0.02 if not self._random else 0.5)
        nn.init.zeros_(self.gate.bias)

    def _per_output(self, g: torch.Tensor) -> torch.Tensor:
        """``(B, heads) -> (B, out)``: each fused matrix's outputs get its head (matrices not enabled: 1)."""
        if not self.fused_qkv:
            return g
        h = self.out_dim // 3
        cols = [g[:, self.fused_qkv.index(m)] if m in self.fused_qkv else g.new_ones(g.shape[0]) for m in "qkv"]
        return torch.stack(cols, dim=-1).repeat_interleave(h, dim=-1)

    def pre_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return self.inner.pre_call(args, kwargs)

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        x = first_input(args, kwargs)
        y2 = self.inner.post_call(args, kwargs, y.clone())
        g = self._per_output(_mean_gate(self.gate, x)).to(y.dtype)
        return y + (g[:, None, :] if y.dim() == 3 else g) * (y2 - y)

    def on_attach(self, module: nn.Module) -> None:
        self.inner.on_attach(module)

    def on_detach(self, module: nn.Module, keep_merged: bool = False) -> None:
        self.inner.on_detach(module, keep_merged)
