"""(IA)^3: learned vectors that rescale activations (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning
is Better and Cheaper than In-Context Learning", §3.3).

(IA)^3 "rescales inner activations with learned vectors": the keys and values of attention and the
intermediate activation of the position-wise feed-forward network are multiplied elementwise by
``l_k``, ``l_v`` and ``l_ff`` (§3.3, Eq. in "(IA)^3")::

    keys:    y = l_k ⊙ (W_k x + b)              output scaling,  l_k: (out,)
    values:  y = l_v ⊙ (W_v x + b)              output scaling,  l_v: (out,)
    FFN:     y = W_down (l_ff ⊙ γ(W_up x))      input scaling of the down projection,  l_ff: (in,)

The vectors start at ones, so the adapted model starts as the base model ("we initialize each l to
ones so that the overall function computed by the model does not change when they are added").
As in peft, the FFN vector scales the *input* of the FFN's down projection (peft's
``feedforward_modules``); which targets scale their input is the config's ``feedforward`` selector.

Merging (§3.3: "(IA)^3 ... can be merged into the model's weights, so it adds no inference cost"):
output scaling multiplies the weight's rows and the bias; input scaling multiplies the weight's columns.
Unmerging divides them back (exact to float rounding), so a vector with zeros or non-finite values is refused
before any weight changes (:meth:`IA3Scale.check_merge`). The effect is multiplicative, so two (IA)^3
adapters on one module multiply rather than add.

Works on ``nn.Linear`` and GPT-2 ``Conv1D`` (canonical weight ``(out, in)``, see ``backends.py``).
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

PUBLIC = ("IA3",)
__all__ = ["IA3", "IA3Scale", "IA3OutputScale", "IA3InputScale"]

_DEFAULT_FEEDFORWARD = ("ffn.down",)


@register("ia3")
@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3(AdapterConfig):
    """(IA)^3 on linear-like modules.

    Args:
        feedforward: selectors (roles, names, suffixes, regexes, types) of the targets whose *input* is scaled
            (§3.3: the FFN's intermediate activation). ``None``: the ``"ffn.down"`` role where the model has one.
            Selected modules that are not targets are ignored; an explicit selector that picks none of the
            targets is an error.
        init_weights: False starts the vectors at random values around one (not an identity; for tests).
        targets: default ``["attn.k", "attn.v", "ffn.down"]`` (§3.3), or ``["attn.qkv", "ffn.down"]`` on models with
            a fused projection (GPT-2, as peft: the whole ``c_attn`` output is scaled).
    """

    feedforward: Sequence[Any] | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward, (str, type)):
            object.__setattr__(self, "feedforward", (self.feedforward,))
        elif self.feedforward is not None:
            object.__setattr__(self, "feedforward", tuple(self.feedforward))

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        if "attn.k" in roles:
            return ("attn.k", "attn.v", "ffn.down")
        if "attn.qkv" in roles:
            return ("attn.qkv", "ffn.down")
        if "ffn.down" in roles and not any(r.startswith("attn.") for r in roles):
            return ("ffn.down",)  # no attention (ConvNeXt-like): the FFN input scaling alone
        return super().default_targets(roles)

    def accepts(self, module: nn.Module) -> bool:
        backend = backend_for(module)
        return backend is not None and backend.kind == "linear"

    def build(self, module: nn.Module, name: str, *, feedforward: bool = False) -> Component:
        """One vector for ``module``: scaling its input with ``feedforward``, else its output."""
        if not self.accepts(module):
            raise TypeError(
                f"(IA)^3 cannot act on {name!r} ({type(module).__name__}): it supports nn.Linear and Conv1D"
            )
        return (IA3InputScale if feedforward else IA3OutputScale)(module, self.init_weights)

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        feedforward = self._feedforward_sites(targets, select)
        return {n: self.build(modules[n], n, feedforward=n in feedforward) for n in targets}

    def _feedforward_sites(self, targets: list[str], select: Callable[[Sequence[Any]], list[str]]) -> set[str]:
        if self.feedforward is None:
            try:
                return set(select(_DEFAULT_FEEDFORWARD)) & set(targets)
            except TargetError:  # no profile, or no FFN role: every target scales its output
                return set()
        if not self.feedforward:
            return set()
        chosen = set(select(self.feedforward)) & set(targets)
        if not chosen:
            raise TargetError(
                f"(IA)^3 feedforward={list(self.feedforward)!r} selects none of the targets; feedforward modules "
                "must also be targets (add them to `targets`, or pass feedforward=() to scale only outputs)"
            )
        return chosen


class IA3Scale(Component):
    """Shared part of the (IA)^3 components: one learned vector ``scale`` in the weight's dtype and device.

    Subclasses say which axis of the canonical weight ``(out, in)`` the vector scales.
    """

    mergeable = True
    additive = False
    axis: int = 0  # 0: rows (outputs), 1: columns (inputs)

    def __init__(self, module: nn.Module, init_weights: bool = True) -> None:
        super().__init__()
        in_dim, out_dim = backend_for(module).dims(module)
        weight = module.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        size = out_dim if self.axis == 0 else in_dim
        self.scale = nn.Parameter(torch.ones(size, dtype=dtype, device=weight.device))
        self._random = not init_weights

    def extra_repr(self) -> str:
        return f"{'output' if self.axis == 0 else 'input'} scaling, size={self.scale.numel()}"

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        if self._random:
            self.scale.copy_(1.0 + 0.2 * torch.randn_like(self.scale))

    # --- merging: W <- W * l along `axis` (and b <- b * l for output scaling) ---------------------
    def _on_weight(self) -> torch.Tensor:
        s = self.scale.detach()
        return s[:, None] if self.axis == 0 else s[None, :]

    def check_merge(self, module: nn.Module) -> None:
        """Refuse vectors with zeros or non-finite values: unmerging divides by them. Nothing is changed."""
        if backend_for(module) is None:
            raise TypeError(f"cannot merge into {type(module).__name__}: no weight backend registered")
        s = self.scale.detach()
        if bool((s == 0).any()) or not bool(torch.isfinite(s).all()):
            raise ValueError(
                f"cannot merge (IA)^3 into {type(module).__name__}: its scaling vector has zeros or non-finite "
                "values, which could not be unmerged; keep the adapter unmerged"
            )

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        if self.merged:
            return
        self.check_merge(module)  # before any weight changes: a refused merge leaves them bit-identical
        self._rescale(module, self._on_weight(), divide=False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        if not self.merged:
            return
        self._rescale(module, self._on_weight(), divide=True)
        self.merged = False

    def _rescale(self, module: nn.Module, factor: torch.Tensor, divide: bool) -> None:
        backend = backend_for(module)
        if backend is None:
            raise TypeError(f"cannot merge into {type(module).__name__}: no weight backend registered")
        weight = backend.read(module)
        f = factor.to(weight.dtype)
        backend.copy_(module, weight / f if divide else weight * f)
        bias = getattr(module, "bias", None)
        if self.axis == 0 and isinstance(bias, torch.Tensor):
            fb = self.scale.detach().to(bias.dtype)
            bias.data.copy_(bias.data / fb if divide else bias.data * fb)

    # --- per-row routing: one gathered vector per row ---------------------------------------
    @classmethod
    def _row_scales(cls, comps: list[Component | None], plan: Any, key: Any, like: torch.Tensor) -> torch.Tensor:
        """``(batch, 1, ..., 1, d)`` scales broadcasting against ``like: (batch, ..., d)``: each row gets its
        adapter's vector (ones for rows of the base or of adapters without a component here)."""
        live = [c for c in comps if c is not None]

        def build() -> torch.Tensor:
            ones = torch.ones_like(live[0].scale)
            return torch.stack([c.scale if c is not None else ones for c in comps] + [ones])  # (G + 1, d)

        rows = plan.stacked(key, build).index_select(0, plan.row_group)  # (batch, d)
        return rows.view(rows.shape[0], *([1] * (like.dim() - 2)), rows.shape[1]).to(like.dtype)


class IA3OutputScale(IA3Scale):
    """Scales a module's output: ``y' = l ⊙ y``. Shapes: ``y: (..., out)``, ``scale: (out,)``."""

    axis = 0

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale.to(y.dtype)

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: torch.Tensor, key: Any) -> Any:
        return y * cls._row_scales(comps, plan, key, y)


class IA3InputScale(IA3Scale):
    """Scales a module's input (peft's feedforward): ``x' = l ⊙ x``. Shapes: ``x: (..., in)``, ``scale: (in,)``."""

    axis = 1
    has_pre = True
    has_post = False

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype)

    @classmethod
    def routed_pre(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, key: Any) -> Any:
        return x * cls._row_scales(comps, plan, key, x)
