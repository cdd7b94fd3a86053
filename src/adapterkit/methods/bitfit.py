"""BitFit (Ben-Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models"): learn only bias terms, kept apart from the base.

BitFit §3 freezes the model and trains "only the bias-terms" (of the attention projections, the FFN
layers and the LayerNorms). adapterkit learns a *delta* ``Δb`` per module and adds it to the module's
output, so the base stays bit-identical, several adapters can carry their own biases, and merging adds
``Δb`` into the base bias (exactly reversible up to float rounding)::

    y = W x + b            ──►   y = W x + b + Δb        (Δb: (out,), starts at 0)

Sites: by default every linear-like module (``nn.Linear``, GPT-2 ``Conv1D``), ``nn.Conv2d`` and
``nn.LayerNorm`` that has a bias, except output heads (the profile's ``head`` role and modules named
``lm_head``/``classifier``/``score``; train heads with ``heads=[...]``). Models whose linears have no bias
(LLaMA, T5) need ``add_missing=True``: those modules get a fresh zero bias added to their output. Such an
added bias has no base bias to merge into, so merging it is refused (TypeError naming the module).

Shapes: ``y: (..., out)`` (linear-like, LayerNorm) or ``(N, out, H, W)`` (conv), ``delta: (out,)``.
The :class:`BiasDelta` component is also LoRA's ``bias="lora_only"|"all"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..backends import backend_for
from ..component import Component
from ..config import AdapterConfig, register
from ..targeting import TargetError

PUBLIC = ("BitFit",)
__all__ = ["BitFit", "BiasDelta", "AddedBias"]

_GENERIC_HEADS = ("lm_head", "classifier", "score")


class BiasDelta(Component):
    """Adds a trainable bias delta to the output of a module that has a bias.

    Args:
        module: the module (its ``bias: (out,)`` gives the delta's shape, dtype and device).
        init_weights: False starts the delta at small random values (not an identity; for tests).
    """

    mergeable = True
    additive = True

    def __init__(self, module: nn.Module, init_weights: bool = True) -> None:
        super().__init__()
        bias = module.bias
        self.delta = nn.Parameter(torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device))
        # channel axis is dim 1 for convolutions, the last dim otherwise
        self._conv = isinstance(module, nn.modules.conv._ConvNd)
        self._random = not init_weights

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        if self._random:
            nn.init.normal_(self.delta, std=0.1)

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = self.delta.to(y.dtype)
        if self._conv:
            d = d.view(-1, *([1] * (y.dim() - 2)))
        return y + d

    def delta_bias(self, module: nn.Module) -> torch.Tensor:
        return self.delta.detach()


class AddedBias(BiasDelta):
    """A learned bias added to the output of a linear-like or conv module that has none (``add_missing``).

    Not mergeable: the module has no bias parameter to fold it into (adding one would change the base
    model's parameter names).
    """

    mergeable = False

    def __init__(self, module: nn.Module, init_weights: bool = True) -> None:
        Component.__init__(self)
        _, out_dim = backend_for(module).dims(module)
        w = module.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32
        self.delta = nn.Parameter(torch.zeros(out_dim, dtype=dtype, device=w.device))
        self._conv = isinstance(module, nn.modules.conv._ConvNd)
        self._random = not init_weights

    def delta_bias(self, module: nn.Module) -> None:
        return None


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)


def _bias_kind(module: nn.Module) -> str | None:
    """``"linear"``/``"conv2d"``/``"norm"`` for the module types whose bias is added at the output, else None."""
    if isinstance(module, nn.LayerNorm):
        return "norm"
    backend = backend_for(module)
    return backend.kind if backend is not None and backend.kind in ("linear", "conv2d") else None


@register("bitfit")
@dataclasses.dataclass(frozen=True, kw_only=True)
class BitFit(AdapterConfig):
    """Bias-only fine-tuning with bias deltas.

    Args:
        add_missing: give linear-like and conv modules without a bias a fresh zero bias (LLaMA, T5 linears).
            Those biases cannot be merged.
        init_weights: False starts the deltas at small random values (not an identity; for tests).
        targets: default: every module whose bias BitFit trains (see the module docstring), except output heads.
            Explicit targets must have a bias (or ``add_missing=True``) and be linear-like, conv or LayerNorm.
    """

    add_missing: bool = False
    init_weights: bool = True

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        """A pattern matching every module except output heads; :meth:`build_all` keeps those with work to do."""
        heads = [*roles.get("head", ()), *_GENERIC_HEADS]
        return (rf"(?!(?:.*\.)?(?:{'|'.join(heads)})$).+",)

    def _wants(self, module: nn.Module) -> bool:
        kind = _bias_kind(module)
        return kind is not None and (_has_bias(module) or (self.add_missing and kind != "norm"))

    def build(self, module: nn.Module, name: str) -> Component:
        kind = _bias_kind(module)
        if kind is None:
            raise TargetError(
                f"BitFit cannot learn a bias for {name!r} ({type(module).__name__}): it supports linear-like, conv "
                "and LayerNorm modules; drop it from `targets`"
            )
        if _has_bias(module):
            return BiasDelta(module, self.init_weights)
        if not self.add_missing or kind == "norm":
            raise TargetError(
                f"{name!r} ({type(module).__name__}) has no bias for BitFit to train; use BitFit(add_missing=True) to "
                "give it one, or drop it from `targets`"
            )
        return AddedBias(module, self.init_weights)

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        if self.targets is not None:  # explicit: every target must be usable
            return {n: self.build(modules[n], n) for n in targets}
        chosen = [n for n in targets if self._wants(modules[n])]
        if not chosen:
            raise TargetError(
                "BitFit found no module with a bias to train in this model (LLaMA and T5 linears have none); "
                "use BitFit(add_missing=True) to add fresh biases"
            )
        return {n: self.build(modules[n], n) for n in chosen}
