"""Bottleneck adapters on a block's residual sub-layers: AdapterHub's ``BottleneckLayer`` placement (``hook="sublayer"``).

A transformer block runs each sub-layer (self-attention, cross-attention, FFN) as ``out = norm?(f + r)``: ``f`` the
sub-layer output (after its dropout), ``r`` the residual stream it started from, ``norm`` the block's LayerNorm on
post-LN models (BERT, DistilBERT, BART; AdapterHub passes ``None`` on pre-LN models: GPT-2, LLaMA, T5, ViT).
AdapterHub (``adapters`` 1.3.0, ``methods/modeling.py`` ``Adapter.pre_forward/forward/post_forward``) replaces
that by, for a sequential adapter ``g(h) = dropout(s · up(act(down(LN_before?(h)))))``::

    s   = f + r
    h   = norm?(s) if original_ln_before else f            (no norm: h = s)
    res = f if residual_before_ln is True, s if "post_add", h if False
    a   = LN_after(g(h) + res) if adapter_residual_before_ln else LN_after?(g(h)) + res
    out = norm?(a + r) if original_ln_after else a

and for a parallel adapter (Houlsby-free ParBn, He et al. 2022 Eq. 6): ``a = LN_after?(g(r)) + f``, then the same
``out``. SeqBn (Pfeiffer) is ``original_ln_before=True``: the block's own LayerNorm runs twice on post-LN models.

Hooks. The adapter (:class:`SublayerBottleneck`) sits on the ``<kind>.sublayer`` module (profile role) and rewrites
its output ``f`` into ``f' = a``, so that the model's own ``norm?(f' + r)`` is AdapterHub's ``out`` (exactly: the same
operations on the same values; with ``original_ln_after=False`` on a pre-LN block ``f' = a - r``, equal up to
rounding; on a post-LN block that arrangement is refused, the block's norm cannot be undone). The residual ``r`` is
the sub-layer module's own first input where that is ``r`` (DistilBERT, BART attention), else the first input of
the ``<kind>.residual`` module, recorded by a :class:`ResidualTap` of the same adapter in its post hook (it runs
before the sub-layer finishes, so the value is there; observers change nothing and work under every composition
block and per-row routing, like the parallel adapter's FFN-input tap). The norm is the block's ``<kind>.norm``
module, held by reference (not a submodule: not saved, not trained, not cast).

Routing: a mixed batch runs as one gathered ``baddbmm`` pair over stacked weights (the taps record the whole batch
once); configurations with extra per-adapter modules (``ln_before``/``ln_after``, PHM, trained dropout) fall back
to one call per adapter on its rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..component import Component, first_input
from ..targeting import TargetError
from .bottleneck import (
    _BottleneckBase,
    _first_param,
    _io_dims,
    _main,
    _pair,
    _with_main,
    register_sublayer_builder,
)

__all__ = ["SublayerBottleneck", "ResidualTap", "ResidualHolder"]


class ResidualHolder:
    """The residual ``r`` of one sub-layer for one adapter, written by a :class:`ResidualTap` and consumed (cleared)
    by the adapter. Under per-row routing the tap records the whole batch and the rows of this adapter (``rows``),
    for a per-adapter fallback that sees only those rows."""

    __slots__ = ("value", "rows", "source")

    def __init__(self, source: str) -> None:
        self.value: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.source = source

    def take(self, site: str, batch: int | None = None) -> torch.Tensor:
        value, rows, self.value, self.rows = self.value, self.rows, None, None
        if value is None:
            raise RuntimeError(
                f"the bottleneck adapter at {site!r} found no residual: {self.source!r} did not run before it in this "
                "forward pass (call the model as a whole, not its submodules)"
            )
        if batch is not None and value.shape[0] != batch and rows is not None and rows.numel() == batch:
            value = value.index_select(0, rows)
        return value


class ResidualTap(Component):
    """Records its module's first input (the residual ``r`` of a sub-layer) for the sub-layer adapters of the same
    adapter. No parameters; returns the module's output unchanged."""

    additive = True
    observer = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.site = name
        self.holders: list[ResidualHolder] = []

    def extra_repr(self) -> str:
        return f"for {len(self.holders)} sub-layer(s)"

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        x = first_input(args, kwargs)
        for h in self.holders:
            h.value, h.rows = x, None
        return y

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: Any, key: Any) -> Any:
        """Record the whole batch for every routed adapter (with its rows, for a per-adapter fallback)."""
        for c, (_, rows) in zip(comps, plan.groups):
            if c is None:
                continue
            for h in c.holders:  # type: ignore[attr-defined]
                h.value, h.rows = x, rows
        return y


class SublayerBottleneck(_BottleneckBase):
    """A sequential or parallel bottleneck adapter on a residual sub-layer (see the module docstring).

    ``f: (..., d)`` the sub-layer output (first element of a tuple output), ``r: (..., d)`` its residual,
    ``norm`` the block's post-LN LayerNorm or None. Returns ``f'`` with ``norm?(f' + r)`` AdapterHub's output.
    """

    def __init__(
        self,
        cfg: Any,
        dim: int,
        like: torch.Tensor,
        name: str,
        *,
        parallel: bool,
        norm: nn.Module | None,
        residual: str,
    ) -> None:
        super().__init__(cfg, dim, dim, like, name)
        # read by _BottleneckBase.initialize (Kaiming init of the parallel down projection)
        self.parallel = parallel
        self.site = name
        self.additive = parallel  # f' - f = LN_after?(g(r)): independent of f
        self.__dict__["norm"] = norm  # the block's LayerNorm, by reference: not a submodule of the adapter
        self.own_input = residual == name
        self.holder = ResidualHolder(residual)
        self.ln_before_original = bool(cfg.original_ln_before_resolved)
        self.ln_after_original = bool(cfg.original_ln_after)
        self.residual_before_ln = cfg.residual_before_ln

    def extra_repr(self) -> str:
        kind = "parallel" if self.parallel else "sequential"
        where = "own input" if self.own_input else self.holder.source
        return f"{super().extra_repr()}, {kind}, residual from {where}, norm={'yes' if self.norm is not None else 'no'}"

    def _residual(self, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int) -> torch.Tensor:
        if self.own_input:
            return first_input(args, kwargs)
        return self.holder.take(self.site, batch)

    def _h_and_res(self, f: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's input ``h`` and its skip value ``res`` (AdapterHub's ``pre_forward``)."""
        norm = self.norm
        if self.parallel:
            return r, f
        s = None
        if self.ln_before_original:
            s = f + r
            h = norm(s) if norm is not None else s
        else:
            h = f
        if self.residual_before_ln is True:
            res = f
        elif self.residual_before_ln == "post_add":
            res = s if s is not None else f + r
        else:
            res = h
        return h, res

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        f = _main(y)
        r = self._residual(args, kwargs, f.shape[0])
        if self._skipped():
            return y
        return _with_main(y, self._adapt(f, r))

    def _adapt(self, f: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``f'`` for the sub-layer output ``f`` and residual ``r`` (both ``(..., d)``)."""
        if r.shape != f.shape:
            raise RuntimeError(
                f"the bottleneck adapter at {self.site!r} got a residual of shape {tuple(r.shape)} for a sub-layer "
                f"output of shape {tuple(f.shape)}"
            )
        h, res = self._h_and_res(f, r)
        g = self.branch(self._cast(h))
        if self.parallel:
            a = (self.ln_after(g) if self.ln_after is not None else g).to(f.dtype) + f
        elif self.ln_after is None:
            a = res + g.to(f.dtype)
        elif self.cfg.adapter_residual_before_ln:
            a = self.ln_after(g + self._cast(res)).to(f.dtype)
        else:
            a = res + self.ln_after(g).to(f.dtype)
        if not self.ln_after_original:  # the model adds r (no norm here: refused at build time on post-LN blocks)
            a = a - r
        return a

    # --- per-row routing ----------------------------------------------------------------------------------
    def _batchable(self) -> bool:
        plain = isinstance(self.down, nn.Linear) and self.ln_before is None and self.ln_after is None
        train_only = self.dropout is not None or self.layer_drop is not None
        return plain and not (self.training and train_only)

    def _arrangement(self) -> tuple[Any, ...]:
        return (
            self.parallel,
            self.ln_before_original,
            self.ln_after_original,
            self.residual_before_ln,
            self.own_input,
        )

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: Any, key: Any) -> Any:
        """A mixed batch: one gathered call for the whole batch when every adapter here is plain and arranged alike
        (``h`` and ``res`` do not depend on the adapter then), else each adapter on its rows (tuple outputs such as
        an attention module's are handled here, the site's generic fallback needs a tensor)."""
        f = _main(y)
        rs = [None if c is None else x if c.own_input else c.holder.take(c.site) for c in comps]  # type: ignore[union-attr]
        live: list[SublayerBottleneck] = [c for c in comps if c is not None]  # type: ignore[misc]
        r = next(v for v in rs if v is not None)
        if any(v is not None and v.shape[0] != f.shape[0] for v in rs):
            raise RuntimeError(f"the bottleneck adapter at {live[0].site!r} got a residual for another batch")
        ref = live[0]
        same = len({c._arrangement() for c in live}) == 1 and len({id(c.norm) for c in live}) == 1
        delta = None
        if same and all(c._batchable() for c in live) and len({type(c.act) for c in live}) == 1:
            h, res = ref._h_and_res(f, r)
            delta = cls._routed_delta(comps, plan, h, key)
        if delta is None:  # each adapter on its rows
            out = f
            for c, v, (_, rows) in zip(comps, rs, plan.groups):
                if c is None or c._skipped():  # type: ignore[union-attr]
                    continue
                part = c._adapt(f.index_select(0, rows), v.index_select(0, rows))  # type: ignore[union-attr]
                out = out.index_copy(0, rows, part.to(f.dtype))
            return _with_main(y, out)
        base = f
        if res is not f or not ref.ln_after_original:  # adapter rows start from res (- r); base rows keep f
            start = res - r if not ref.ln_after_original else res
            routed_rows = (plan.row_group < len(plan.adapters)).view(-1, *([1] * (f.dim() - 1)))
            base = torch.where(routed_rows, start.to(f.dtype), f)
        return _with_main(y, plan.scatter_add(base, delta))


# model types whose module names match a post-LN profile although they normalize *before* each sub-layer
_PRE_LN_UNDER_POST_LN_NAMES = ("mbart",)
KINDS = ("attn", "cross", "ffn")


def _role(select: Callable[[Sequence[Any]], list[str]], role: str, cache: dict[str, list[str]]) -> list[str]:
    if role not in cache:
        try:
            cache[role] = select([role])
        except TargetError:
            cache[role] = []
    return cache[role]


def _width(module: nn.Module) -> int | None:
    """The hidden size a norm (1-D ``weight``) or a linear-like module (its input) works on."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return int(weight.shape[0])
    dims = _io_dims(module)
    return dims[0] if dims is not None else None


def build_sublayer(
    cfg: Any, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
) -> dict[str, Component]:
    """One :class:`SublayerBottleneck` per target sub-layer plus one :class:`ResidualTap` per residual module that
    is not the sub-layer itself. Targets must be ``attn.sublayer`` / ``cross.sublayer`` / ``ffn.sublayer`` modules;
    each is paired with the ``<kind>.residual`` and ``<kind>.norm`` module of its layer (longest common prefix)."""
    root = modules.get("")
    model_type = getattr(getattr(root, "config", None), "model_type", None)
    if model_type in _PRE_LN_UNDER_POST_LN_NAMES:
        raise TargetError(
            f"hook='sublayer' is not available for {model_type!r} models: they normalize before each sub-layer but "
            "share BART's module names, whose profile describes post-LN blocks; use hook='projection'"
        )
    cache: dict[str, list[str]] = {}
    kind_of = {n: kind for kind in reversed(KINDS) for n in _role(select, f"{kind}.sublayer", cache)}
    comps: dict[str, Component] = {}
    taps: dict[str, ResidualTap] = {}
    for n in targets:
        kind = kind_of.get(n)
        if kind is None:
            raise TargetError(
                f"with hook='sublayer' a bottleneck adapter sits on a block's sub-layer outputs (roles "
                f"'attn.sublayer', 'cross.sublayer', 'ffn.sublayer'), but {n!r} is not one; target those roles, or "
                "pass hook='projection' to put the adapter on the output of any linear layer or block"
            )
        residual = _pair(n, _role(select, f"{kind}.residual", cache))
        if residual is None:
            raise TargetError(f"no '{kind}.residual' module in the same layer as {n!r} to read the residual from")
        norm_name = _pair(n, _role(select, f"{kind}.norm", cache))
        norm = modules[norm_name] if norm_name is not None else None
        if norm is not None and not cfg.original_ln_after:
            raise ValueError(
                f"original_ln_after=False at {n!r}: this block applies its LayerNorm to the sub-layer output plus the "
                "residual, which an adapter on the sub-layer output cannot undo; keep original_ln_after=True here "
                "(AdapterHub recommends it too)"
            )
        module = modules[n]
        dims = _io_dims(module)
        dim = dims[1] if dims is not None else None
        for other in (norm, modules[residual]):
            if dim is None and other is not None:
                dim = _width(other)
        if dim is None:
            raise TargetError(f"cannot tell the hidden size of the sub-layer {n!r}")
        like = next(
            (
                _first_param(m)
                for m in (module, norm, modules[residual])
                if m is not None and next(m.parameters(), None) is not None
            ),
            None,
        )
        if like is None:
            like = torch.empty(0)
        comp = SublayerBottleneck(
            cfg, dim, like, n, parallel=cfg.placement.value == "parallel", norm=norm, residual=residual
        )
        comps[n] = comp
        if residual != n:
            taps.setdefault(residual, ResidualTap(residual)).holders.append(comp.holder)
    both = sorted(set(comps) & set(taps))
    if both:
        raise TargetError(f"{both[0]!r} is both an adapted sub-layer and the residual source of another one")
    return {**comps, **taps}


register_sublayer_builder(build_sublayer)
