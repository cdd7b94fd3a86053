"""AdapterFusion weights (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition", §3).

At each site the fused adapters ``i = 1..N`` give outputs ``o_i``; a query attends over them::

    s_i = (Q q) . (K v_i) / T          α = softmax_i(s)          h' = Σ_i α_i (V v_i)  (+ res)

``Q``, ``K``, ``V``: ``(d, d)`` linear maps (each optional: ``query``/``key``/``value`` False uses the identity);
``V`` starts as the identity and ``Q``/``K`` near zero, so at initialization the fusion averages what it attends
over (§3.2: the value matrix is initialised so that the adapters' representations pass through). Shapes: ``(..., d)``.

What ``q`` and ``v_i`` are (config fields; the defaults are adapterkit's fusion, the other values give AdapterHub's
``BertFusion`` of ``adapters`` 1.3.0, ``methods/modeling.py`` + ``BottleneckLayer.compose_fuse``):

* ``query_input="output"``: ``q`` is the site's output without adapters (for a sub-layer adapter the sub-layer
  output ``f``; AdapterHub's ``query_before_ln: true``). ``"adapter_input"``: the fused adapters' input ``h`` (for
  AdapterHub's SeqBn ``h = LN(f + r)``, the block's LayerNorm over the sub-layer output plus its residual; the
  paper's and AdapterHub's default ``query_before_ln: false``). With hook-on-output adapters ``h`` is the output.
* ``values="outputs"``: ``v_i = o_i`` and nothing is added (AdapterHub's ``residual_before: true``).
  ``"changes"``: ``v_i = o_i - res`` (the adapter's change: AdapterHub's ``bottleneck_up``) and the adapters' skip
  value ``res`` is added after the attention (AdapterHub's default ``residual_before: false``; ``res`` is ``f``
  for SeqBn/DoubleSeqBn, the output for hook-on-output adapters).
* ``temperature`` ``T`` with ``temperature_decay``: ``T ← max(T − decay, 1)`` after every forward of a layer
  (AdapterHub's ``temperature: true`` is ``T = 50``, ``decay = 0.05``; the current value is not saved, as there).
* ``dropout`` on the scores in training (AdapterHub: its ``dropout_prob``, else the model's attention dropout),
  ``regularization`` ``λ``: ``aux_loss = λ ||I − V||²`` while ``V`` trains (AdapterHub's ``regularization: true``
  is ``λ = 0.01``, added by its ``AdapterTrainer``), ``value_bias`` (AdapterHub's ``V`` has none).
  ``value_before_softmax`` False computes ``V(Σ α_i v_i)``, equal to ``Σ α_i V v_i`` up to rounding (Σ α = 1).

The AdapterHub forms (``query_input="adapter_input"`` or ``values="changes"``) fuse bottleneck adapters: for
sub-layer adapters (``hook="sublayer"``) the fusion reads ``h`` and ``res`` from the last fused adapter
(AdapterHub's ``adapter_setup.last()``), given the sub-layer's residual ``r``, which the last adapter's residual tap
also hands to the fusion layer (registered on attach, removed on detach), or, where the residual is the sub-layer's
own input (DistilBERT, BART's attention), from the call ``ak.Fuse`` hands to :meth:`FusionLayer.fuse`. Sequential
adapters without ``ln_after`` whose block keeps its LayerNorm after the adapter (``original_ln_after``) only: others
are refused when the fusion is built. AdapterHub's Fuse over parallel adapters adds the residual twice
(adapters 1.3.0); it is not reproduced.

Fusions are added with ``Adapters.add_fusion([...])`` under the name ``fusion[a,b,...]`` and used through
``ak.Fuse("a", "b", ...)``; they are saved and loaded like any adapter; ``adapters.load`` also reads AdapterHub's
``save_adapter_fusion`` directories (``formats/adapterhub_fusion.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..backends import backend_for
from ..component import Component, first_input
from ..config import AdapterConfig, register
from ..targeting import CONTAINER
from .bottleneck_sublayer import ResidualHolder, ResidualTap, SublayerBottleneck

PUBLIC = ("Fusion",)
__all__ = ["Fusion", "FusionLayer"]


_QUERY_INPUTS = ("output", "adapter_input")
_VALUES = ("outputs", "changes")


@register("fusion")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Fusion(AdapterConfig):
    """Fusion weights over ``adapters`` (created by ``Adapters.add_fusion``; not added on its own).

    Args:
        adapters: the fused adapters' names, in order.
        temperature: softmax temperature ``T``.
        init_weights: False starts Q, K and V random (for tests).
        query, key, value: use a ``(d, d)`` matrix there (False: the identity).
        value_bias: the value matrix has a bias.
        value_before_softmax: ``Σ α_i V v_i`` (True) or ``V Σ α_i v_i``.
        query_input: ``"output"`` or ``"adapter_input"`` (module docstring).
        values: ``"outputs"`` or ``"changes"`` (module docstring).
        temperature_decay: subtracted from ``T`` after every forward, down to 1 (AdapterHub's annealing).
        dropout: dropout probability on the attention scores (training only).
        regularization: weight ``λ`` of ``λ ||I − V||²`` in ``aux_loss`` (AdapterHub: 0.01).
    """

    standalone: ClassVar[bool] = False
    standalone_note: ClassVar[str] = (
        "it combines adapters that are already trained (Adapters.add_fusion in Python)"
    )

    adapters: Sequence[str] = ()
    temperature: float = 1.0
    init_weights: bool = True
    query: bool = True
    key: bool = True
    value: bool = True
    value_bias: bool = True
    value_before_softmax: bool = True
    query_input: str = "output"
    values: str = "outputs"
    temperature_decay: float = 0.0
    dropout: float = 0.0
    regularization: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "adapters", tuple(self.adapters))
        if self.temperature <= 0:
            raise ValueError(f"fusion temperature must be positive, got {self.temperature}")
        if self.query_input not in _QUERY_INPUTS:
            raise ValueError(f"fusion query_input must be one of {_QUERY_INPUTS}, got {self.query_input!r}")
        if self.values not in _VALUES:
            raise ValueError(f"fusion values must be one of {_VALUES}, got {self.values!r}")
        if self.temperature_decay < 0 or not 0 <= self.dropout < 1 or self.regularization < 0:
            raise ValueError(
                "fusion temperature_decay and regularization must be >= 0 and dropout in [0, 1), got "
                f"{self.temperature_decay}, {self.regularization}, {self.dropout}"
            )

    @property
    def reads_members(self) -> bool:
        """The AdapterHub forms: the fusion needs the last fused adapter's input and skip value."""
        return self.query_input == "adapter_input" or self.values == "changes"

    def accepts(self, module: nn.Module) -> bool:
        return _site_width(module, self.adapters) is not None

    def build(self, module: nn.Module, name: str) -> Component:
        found = _site_width(module, self.adapters)
        if found is None:
            raise TypeError(
                f"AdapterFusion needs a linear-like module or a fused adapter's component with an out_dim at {name!r}, "
                f"got {type(module).__name__}"
            )
        return FusionLayer(found[0], self, found[1])

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        out: dict[str, Component] = {}
        for n in targets:
            layer = self.build(modules[n], n)
            if self.reads_members and self.adapters:
                layer.bind(modules, n, self.adapters[-1])  # type: ignore[attr-defined]
            out[n] = layer
        return out


def _site_width(module: nn.Module, adapters: Sequence[str]) -> tuple[int, torch.Tensor] | None:
    """``(d, a tensor for device/dtype)`` of a fusion site: a linear-like module's output width, else the ``out_dim``
    of a fused adapter's component there (sub-layer bottleneck adapters sit on dropout/attention/MLP modules)."""
    backend = backend_for(module)
    if backend is not None:
        return backend.dims(module)[1], module.weight
    comps = getattr(module, CONTAINER, None)
    for n in adapters:
        c = comps[n] if comps is not None and n in comps else None
        dim = getattr(c, "out_dim", None)
        if dim is not None:
            return int(dim), next(c.parameters())
    return None


def _member(module: nn.Module, name: str) -> Component | None:
    comps = getattr(module, CONTAINER, None)
    return comps[name] if comps is not None and name in comps else None


class FusionLayer(Component):
    """Attention over adapter outputs at one site; applied only inside an ``ak.Fuse`` block."""

    has_post = False  # as a plain active name it does nothing; ``Fuse`` calls :meth:`fuse`

    def __init__(self, dim: int, cfg: Fusion, like: torch.Tensor) -> None:
        super().__init__()
        dtype = like.dtype if like.is_floating_point() else torch.float32
        kw = {"device": like.device, "dtype": dtype}
        self.query = nn.Linear(dim, dim, **kw) if cfg.query else None
        self.key = nn.Linear(dim, dim, **kw) if cfg.key else None
        self.value = nn.Linear(dim, dim, bias=cfg.value_bias, **kw) if cfg.value else None
        self.temperature = cfg.temperature
        self.decay = cfg.temperature_decay
        self.scores_dropout = cfg.dropout
        self.regularization = cfg.regularization
        self.value_before_softmax = cfg.value_before_softmax
        self.query_input = cfg.query_input
        self.values = cfg.values
        self._random = not cfg.init_weights
        self._dtype = dtype
        # the AdapterHub forms (``bind``): the site module, the last fused adapter's name, its residual source
        self.__dict__["_site"] = None
        self.__dict__["_residual_module"] = None
        self.last: str | None = None
        self.holder: ResidualHolder | None = None

    def extra_repr(self) -> str:
        return f"query_input={self.query_input!r}, values={self.values!r}, T={self.temperature}"

    # --- the AdapterHub forms: the last fused adapter's view of the site --------------------------------------
    def bind(self, modules: Mapping[str, nn.Module], name: str, last: str) -> None:
        """Read the adapter input and skip value of adapter ``last`` at site ``name`` (``modules``: the model's)."""
        member = _member(modules[name], last)
        self.__dict__["_site"] = modules[name]
        self.last = last
        if isinstance(member, SublayerBottleneck):
            why = None
            if member.parallel:
                why = "AdapterHub's Fuse over parallel adapters adds the residual twice (adapters 1.3.0)"
            elif member.ln_after is not None or not member.ln_after_original:
                why = "the fused adapters have ln_after or original_ln_after=False"
            if why is not None:
                raise TypeError(f"AdapterHub-style fusion at {name!r} is not available: {why}")
            if not member.own_input:  # else the residual is the site's own first input, handed to fuse()
                self.holder = ResidualHolder(member.holder.source)
                self.__dict__["_residual_module"] = modules[member.holder.source]

    def on_attach(self, module: nn.Module) -> None:
        tap = self._tap()
        if tap is not None and not any(h is self.holder for h in tap.holders):
            tap.holders.append(self.holder)

    def on_detach(self, module: nn.Module, keep_merged: bool = False) -> None:
        tap = self._tap()
        if tap is not None:
            tap.holders[:] = [h for h in tap.holders if h is not self.holder]
        super().on_detach(module, keep_merged)

    def _tap(self) -> ResidualTap | None:
        where = self.__dict__.get("_residual_module")
        tap = _member(where, self.last) if where is not None and self.last is not None else None
        return tap if isinstance(tap, ResidualTap) else None

    def _view(
        self, f: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, res)``: the last fused adapter's input and skip value for site output ``f`` (``args``/``kwargs``:
        the site module's call)."""
        site = self.__dict__.get("_site")
        member = _member(site, self.last) if site is not None and self.last is not None else None
        if isinstance(member, SublayerBottleneck):
            if member.own_input:
                r = first_input(args, kwargs)
            elif self.holder is not None:
                r = self.holder.take(member.site, f.shape[0])
            else:
                raise RuntimeError(f"the fusion layer at {member.site!r} has no residual (it was not bound)")
            return member._h_and_res(f, r)
        return f, f  # adapters on a module's output: their input and skip value are that output

    # --- forward ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        for lin in (self.query, self.key):
            if lin is not None:
                nn.init.normal_(lin.weight, std=0.02 if not self._random else 0.3)
                nn.init.zeros_(lin.bias)
        if self.value is not None:
            nn.init.eye_(self.value.weight)
            if self.value.bias is not None:
                nn.init.zeros_(self.value.bias)
            if self._random:
                self.value.weight.add_(0.1 * torch.randn_like(self.value.weight))

    def fuse(
        self,
        h: torch.Tensor,
        outs: list[torch.Tensor],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """``h: (..., d)`` the site's output without adapters and ``outs``: N tensors ``(..., d)`` -> ``(..., d)``;
        ``args``/``kwargs``: the site module's call (``ak.Fuse`` passes them; the AdapterHub forms read the residual
        there when it is the sub-layer's own input)."""
        dtype = self._dtype  # computed in the fusion weights' dtype, returned in h's
        res = None
        q_in = h
        if self.query_input == "adapter_input" or self.values == "changes":
            a_in, skip = self._view(h, args, kwargs or {})
            if self.query_input == "adapter_input":
                q_in = a_in
            if self.values == "changes":
                res = skip.to(dtype)
        o = torch.stack(outs, dim=-2).to(dtype)  # (..., N, d)
        if res is not None:
            o = o - res.unsqueeze(-2)
        q = q_in.to(dtype)
        q = (self.query(q) if self.query is not None else q).unsqueeze(-2)  # (..., 1, d)
        k = self.key(o) if self.key is not None else o
        scores = (q * k).sum(-1)  # (..., N)
        if self.training and self.scores_dropout > 0:
            scores = nn.functional.dropout(scores, self.scores_dropout)
        alpha = (scores / self.temperature).softmax(-1).unsqueeze(-1)
        if self.decay:
            self.temperature = max(self.temperature - self.decay, 1.0)
        if self.value is None:
            out = (alpha * o).sum(-2)
        elif self.value_before_softmax:
            out = (alpha * self.value(o)).sum(-2)
        else:
            out = self.value((alpha * o).sum(-2))
        if res is not None:
            out = out + res
        return out.to(h.dtype)

    def aux_loss(self) -> torch.Tensor | None:
        """``λ ||I − V||²`` while the value matrix trains (AdapterHub's fusion regularization)."""
        if not self.regularization or self.value is None or not self.value.weight.requires_grad:
            return None
        w = self.value.weight
        eye = torch.eye(w.shape[0], device=w.device, dtype=w.dtype)
        return self.regularization * (eye - w).pow(2).sum()
