"""Unions of methods: one adapter made of several configs (He et al. 2022; Mao et al. 2022).

``ak.Union(ak.LoRA(...), ak.Bottleneck(...))`` plans every member on the model and joins them into one
adapter: where several members act on the same module their components run in member order (a
:class:`~adapterkit.component.Chain`). It trains, saves, loads, composes and detaches like any adapter.

With ``gated=True`` (UniPELT, Mao et al. 2022, §3: "a gating mechanism ... learns to activate the
submodules"), each member's effect at a linear-like module is scaled by a learned gate computed from
that module's input ``x: (..., in)``::

    g = sigmoid(x · w + b)            (one scalar per token; w: (in,), b: scalar)
    y' = y + g * (member(x, y) - y)

Gates start at ``b = 0`` with small random ``w`` (g ≈ 0.5), as in UniPELT's released code. Components
on other modules (e.g. model-level prompts and prefixes, which act once on the whole model) are not
gated; UniPELT's per-layer prefix gate has no counterpart here (documented decision).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..backends import backend_for
from ..component import Chain, Component
from ..config import AdapterConfig, get_config, register

PUBLIC = ("Union",)
__all__ = ["Union", "Gate"]


@register("union")
@dataclasses.dataclass(frozen=True, kw_only=True, init=False)
class Union(AdapterConfig):
    """Several method configs acting as one adapter.

    Args:
        *configs: member configs (objects or registered names / presets); at least two.
        heads: trainable head copies of the whole adapter (see ``AdapterConfig``).
        gated: learn a UniPELT gate per member and linear-like module.
        init_weights: passed to every member (False: members start from non-identity values; gates too).
    """

    configs: Sequence[AdapterConfig] = ()
    gated: bool = False
    init_weights: bool = True

    def __init__(
        self,
        *configs: AdapterConfig | str,
        gated: bool = False,
        init_weights: bool = True,
        **base: Any,
    ) -> None:
        members = tuple(base.pop("configs", ())) + configs
        members = tuple(get_config(c) for c in members)
        if not init_weights:
            members = tuple(
                c.replace(init_weights=False) if "init_weights" in {f.name for f in dataclasses.fields(c)} else c
                for c in members
            )
        object.__setattr__(self, "configs", members)
        object.__setattr__(self, "gated", gated)
        object.__setattr__(self, "init_weights", init_weights)
        for f in dataclasses.fields(AdapterConfig):
            object.__setattr__(
                self,
                f.name,
                base.pop(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory()),
            )  # type: ignore[misc]
        if base:
            raise TypeError(f"Union got unexpected arguments {sorted(base)}")
        self.__post_init__()

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.configs) < 2:
            raise ValueError("a Union needs at least two member configs")
        if any(isinstance(c, Union) for c in self.configs):
            raise ValueError("Union members cannot themselves be unions; list their members instead")
        if self.targets is not None or self.exclude or self.layers is not None:
            raise ValueError("set targets/exclude/layers on the Union's members, not on the Union")
        if any(c.heads for c in self.configs):
            raise ValueError("set heads on the Union (they belong to the whole adapter), not on its members")

    def parts(self) -> Sequence[AdapterConfig]:
        """The members; the union's ``heads`` are planned with the first member."""
        if not self.heads:
            return self.configs
        return (self.configs[0].replace(heads=self.heads), *self.configs[1:])

    def combine(self, name: str, module: nn.Module, components: list[Component]) -> Component:
        if self.gated and backend_for(module) is not None:
            from .heads import HeadCopy  # head copies replace a module's output; they are never gated

            components = [
                c
                if isinstance(c, HeadCopy)
                else Gate(c, backend_for(module).dims(module)[0], module.weight, self.init_weights)
                for c in components
            ]
        return components[0] if len(components) == 1 else Chain(components)


class Gate(Component):
    """UniPELT gate around one member component at a linear-like module (see the module docstring)."""

    def __init__(self, inner: Component, in_dim: int, like: torch.Tensor, init_weights: bool = True) -> None:
        super().__init__()
        self.inner = inner
        dtype = like.dtype if like.is_floating_point() else torch.float32
        self.gate = nn.Linear(in_dim, 1, device=like.device, dtype=dtype)
        self.has_pre = inner.has_pre
        self.has_post = inner.has_post
        self._random = not init_weights

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        self.inner.initialize(module)
        nn.init.normal_(self.gate.weight, std=0.02 if not self._random else 0.5)
        nn.init.zeros_(self.gate.bias)

    def _g(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x.to(self.gate.weight.dtype)))  # (..., 1)

    def pre_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        x = args[0] if args else next(iter(kwargs.values()))
        new_args, new_kwargs = self.inner.pre_call(args, kwargs)
        x2 = new_args[0] if new_args else next(iter(new_kwargs.values()))
        gated = x + self._g(x).to(x.dtype) * (x2 - x)
        if new_args:
            return (gated, *new_args[1:]), new_kwargs
        key = next(iter(new_kwargs))
        return new_args, {**new_kwargs, key: gated}

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        y2 = self.inner.post_call(args, kwargs, y.clone())
        return y + self._g(x).to(y.dtype) * (y2 - y)

    def on_attach(self, module: nn.Module) -> None:
        self.inner.on_attach(module)

    def on_detach(self, module: nn.Module, keep_merged: bool = False) -> None:
        self.inner.on_detach(module, keep_merged)


def _presets() -> None:
    """MAM (He et al. 2022, §4.4: prefix tuning with l=30 on attention + a parallel adapter on the FFN, scaling 4)
    and UniPELT (Mao et al. 2022, §3: gated LoRA r=8 on q/v + prefix l=10 + sequential bottleneck, reduction 16),
    with AdapterHub's MAMConfig / UniPELTConfig member settings."""
    from ..config import register_preset
    from .bottleneck import Bottleneck
    from .lora import LoRA
    from .prefix import PrefixTuning

    register_preset(
        "mam",
        Union(
            PrefixTuning(num_virtual_tokens=30, prefix_projection=True, encoder_hidden_size=800),
            Bottleneck(placement="parallel", reduction_factor=2, non_linearity="relu", scaling=4.0),
        ),
    )
    register_preset(
        "unipelt",
        Union(
            LoRA(r=8, alpha=8, targets=["attn.q", "attn.v"]),
            PrefixTuning(num_virtual_tokens=10, prefix_projection=True, encoder_hidden_size=512),
            Bottleneck(placement="pfeiffer", reduction_factor=16, non_linearity="relu"),
            gated=True,
        ),
    )


_presets()
