"""Bottleneck adapters: Houlsby, Pfeiffer, parallel (He et al.), Compacter/PHM layers and AdapterDrop.

A bottleneck adapter (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", §2.1) is a small
two-layer network with a skip connection, inserted into a frozen model::

    h ──► LN? ─► down (d → m) ─► act ─► up (m → d) ─► ·s ─► dropout ─┐
    │                                                               (+) ──► h' = h + s · up(act(down(h)))
    └───────────────────────────────────────────────────────────────┘

``m = d // reduction_factor`` (or ``bottleneck_size``).

What the hooks see (``hook``). ``"sublayer"`` (the default, AdapterHub's ``BottleneckLayer``): the adapter sits on a
block's residual sub-layer ``out = norm?(f + r)`` and sees the sub-layer output ``f``, its residual ``r`` and, on
post-LN blocks, the block's LayerNorm, so AdapterHub's ``original_ln_before``/``original_ln_after``/
``residual_before_ln`` arrangements are available and the presets mean exactly AdapterHub's configs (equations and
hooks in :mod:`~adapterkit.methods.bottleneck_sublayer`; the profile roles ``attn.sublayer``, ``ffn.sublayer``,
``cross.sublayer`` with their ``.residual`` and ``.norm``). ``"projection"`` (adapterkit's placement before schema
2): the adapter acts on one module's output, as described below; the block's residual and norm stay where they are.

Where it sits (``placement``; the roles named are ``hook="projection"``'s, with ``hook="sublayer"`` the same
sub-layers' ``*.sublayer`` modules):

* ``"houlsby"`` (Houlsby §2.1, Fig. 2; AdapterHub ``double_seq_bn``): sequentially on the output of the
  attention output projection *and* of the FFN output projection (roles ``attn.out``, ``ffn.down``), before the
  model adds its residual and applies its layer norm. On encoder-decoder models ``attn.out`` includes the
  cross-attention output (AdapterHub's ``cross_adapter=True``); ``exclude`` it if unwanted.
* ``"pfeiffer"`` (Pfeiffer et al. 2021, "AdapterFusion", §3 / AdapterHub ``seq_bn``): sequentially on the FFN
  output projection only (``ffn.down``).
* ``"parallel"`` (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning", §3.3, Eq. 6;
  AdapterHub ``par_bn``): parallel to the whole FFN block, ``h' = FFN(x) + s · up(act(down(x)))`` with ``x`` the
  FFN's input. Where the profile has an ``ffn`` module (GPT-2, LLaMA, T5, ViT) the adapter sits on it and reads
  its input directly. Where the FFN is split over modules (BERT: ``intermediate.dense`` takes the FFN input,
  ``output.dense`` produces the FFN output, then ``BertOutput`` adds the residual and normalizes) the adapter
  sits on ``ffn.down`` and a second component of the same adapter, on the layer's ``ffn.in`` module, *taps* the
  FFN input for it (:class:`FFNInputTap`; it is listed among the adapter's sites and changes nothing there).

Options (AdapterHub ``BnConfig`` names where they exist):

* ``ln_before`` / ``ln_after``: a new LayerNorm on the adapter's input / on its output; with
  ``adapter_residual_before_ln`` the adapter's own skip connection is added before ``ln_after``
  (``h' = LN(h + s·f(h))``, not an identity at init) instead of after it (``h' = h + LN(s·f(h))``).
  AdapterHub's ``original_ln_before``/``original_ln_after``/``residual_before_ln`` re-arrange the *model's* residual
  and layer norm around the adapter: ``hook="sublayer"`` only (a hook on the projection output does not see them).
* ``scaling`` (He et al. §3.3 "scaled parallel adapter", s = 4): a constant, or trainable with
  ``scaling_mode="learned"`` (one scalar starting at ``scaling``) or ``"channel"`` (one per output feature).
* Compacter (Karimi Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers", §3): with
  ``phm_dim=n`` the down and up projections are PHM layers ``W = Σ_{i=1..n} A_i ⊗ B_i`` (:class:`PHMLinear`).
  ``shared_phm_rule``: the ``A_i`` (``(n, n, n)``) are one tensor shared by every PHM layer of the adapter
  ("shared information", §3.2); it is owned by the first PHM layer in model order and referenced by the others,
  so it is trained, counted and saved once. ``factorized_phm_W``: ``B_i = s_i t_i^T`` of rank ``phm_rank``
  (Compacter §3.3; rank 1 is Compacter). Presets ``compacter`` (Houlsby placement) and ``compacter++`` (Pfeiffer).
* AdapterDrop (Rücklé et al. 2021, "AdapterDrop", §3): ``skip_layers=k`` puts no adapter into layers ``0..k-1``
  (the layer index is the first number in a module path; on encoder-decoder models both stacks skip their first
  ``k`` layers), at training and inference. ``drop_prob=p`` skips each layer's adapters with probability ``p`` on
  every training forward pass (all of one layer's components share the draw; encoder and decoder layers draw
  separately; never in eval mode).

Init (``init_weights=True``): the up projection is zero, so the adapter starts as an exact identity (Houlsby §2.1:
"near-identity initialization"); the down projection is a truncated normal with std 1e-2 (Houlsby §3.6) for the
sequential placements and Kaiming-uniform for the parallel one (He et al.'s MAM code, AdapterHub ``par_bn``'s
``init_weights="mam_adapter"``). AdapterHub's default ``"bert"`` init (N(0, 0.02) for both) is not an identity.
``init_weights=False`` starts every weight random (for tests).

Presets (AdapterHub's names, defaults and placement, ``hook="sublayer"``): ``seq_bn`` (alias ``pfeiffer``:
``SeqBnConfig``: FFN sub-layer, ``original_ln_before``, reduction 16, ReLU: on post-LN blocks the block's LayerNorm
runs before the adapter and again after it), ``double_seq_bn`` (alias ``houlsby``: ``DoubleSeqBnConfig``: attention
and FFN sub-layers on ``f``, reduction 16, swish), ``par_bn`` (``ParBnConfig``: parallel to the FFN sub-layer,
reading its residual ``r``, i.e. the input of the pre-norm on pre-LN blocks; reduction 2, ReLU, scaling 4, He et
al.'s scaled parallel adapter), ``compacter`` (``CompacterConfig``: DoubleSeqBn-based) and ``compacter++``
(``CompacterPlusPlusConfig``: SeqBn-based), both reduction 32, GELU, ``phm_dim=4``, shared rule, factorized ``B_i``
of rank 1. ``hook="projection"`` on any preset gives the placement these presets had before.

Bottleneck adapters are not mergeable (the non-linearity sits between the projections). The FFN-input tap of a
parallel adapter on a split FFN reads its module's input in the post hook (not a pre hook), so it works under every
composition block and per-row routing; the value is cleared when the adapter uses it, and activation checkpointing
re-runs tap and adapter together. ``add_fusion`` counts the tap's module as a fusion site (the fused outputs there
are all equal, so the fusion layer starts as an identity there).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import backend_for
from ..component import Component, first_input
from ..config import AdapterConfig, register, register_preset
from ..targeting import TargetError, base_modules, layer_index

PUBLIC = ("Bottleneck",)
__all__ = [
    "Bottleneck",
    "Hook",
    "Placement",
    "Scaling",
    "PHMLinear",
    "SequentialBottleneck",
    "ParallelBottleneck",
    "FFNInputTap",
    "activation",
]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leakyrelu": nn.LeakyReLU,
    "linear": nn.Identity,
}


def activation(name: str) -> nn.Module:
    """The activation module called ``name`` (``relu``, ``gelu``, ``gelu_new``, ``swish``/``silu``, ``tanh``, ...)."""
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown non_linearity {name!r}; choose one of {', '.join(_ACTIVATIONS)}") from None


class Placement(str, enum.Enum):
    """Where the adapter sits (see the module docstring)."""

    HOULSBY = "houlsby"
    PFEIFFER = "pfeiffer"
    PARALLEL = "parallel"


class Hook(str, enum.Enum):
    """What the adapter's hooks see: the block's residual sub-layer (AdapterHub's placement) or one module's output."""

    SUBLAYER = "sublayer"
    PROJECTION = "projection"


class Scaling(str, enum.Enum):
    """Whether the output scaling ``s`` is a constant or trained (AdapterHub ``scaling="learned"|"channel"``)."""

    FIXED = "fixed"
    LEARNED = "learned"
    CHANNEL = "channel"


@register("bottleneck")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Bottleneck(AdapterConfig):
    """Bottleneck adapters (Houlsby, Pfeiffer, parallel) with optional PHM (Compacter) projections.

    Args:
        placement: ``"houlsby"``, ``"pfeiffer"`` or ``"parallel"`` (see :class:`Placement`).
        reduction_factor: bottleneck size ``m = d // reduction_factor`` (at least 1), ``d`` the adapted hidden size.
        bottleneck_size: ``m`` directly; overrides ``reduction_factor``.
        non_linearity: activation between the projections (``relu``, ``gelu``, ``swish``, ``tanh``, ...).
        scaling: factor ``s`` on the adapter's output (He et al. §3.3 use 4 for the parallel adapter). The strings
            ``"learned"`` / ``"channel"`` are accepted as AdapterHub spells them and mean ``scaling=1.0`` with that
            ``scaling_mode``.
        scaling_mode: ``"fixed"``, ``"learned"`` (a trainable scalar starting at ``scaling``) or ``"channel"`` (a
            trainable vector, one per output feature).
        ln_before: a new LayerNorm on the adapter's input (inside the branch).
        ln_after: a new LayerNorm on the adapter's output.
        adapter_residual_before_ln: sequential only: add the adapter's skip connection before ``ln_after``.
        dropout: dropout on the adapter branch's output.
        skip_layers: AdapterDrop: no adapter in layers ``0 .. skip_layers - 1``.
        drop_prob: AdapterDrop: probability of skipping a layer's adapters on a training forward pass.
        phm_dim: ``n`` of Compacter's PHM layers (``None``: ordinary linear projections). ``d`` and ``m`` must be
            divisible by it.
        shared_phm_rule: one set of ``A_i`` shared by every PHM layer of the adapter.
        factorized_phm_W: ``B_i = s_i t_i^T`` of rank ``phm_rank``.
        phm_rank: rank of the factorized ``B_i``.
        init_weights: True: exact identity at init (zero up projection); False: random (for tests).
        hook: ``"sublayer"`` (default; AdapterHub's ``BottleneckLayer``): the adapter sits on a block's residual
            sub-layer and sees its output ``f``, its residual ``r`` and, on post-LN blocks, its LayerNorm (module
            :mod:`~adapterkit.methods.bottleneck_sublayer`). ``"projection"`` (the placement of config schema 1):
            the adapter acts on one module's output (the projection; a parallel adapter reads the FFN's input), where
            the ``original_ln_*`` options below do not exist.
        original_ln_before: sublayer hook, sequential: the adapter reads ``norm?(f + r)`` (the block's own residual
            and LayerNorm, applied again after the adapter) instead of ``f``. None: True for ``pfeiffer``
            (AdapterHub ``SeqBn``), False for ``houlsby`` (``DoubleSeqBn``).
        original_ln_after: sublayer hook: the block adds ``r`` (and normalizes) after the adapter (AdapterHub's
            default). False on pre-LN blocks only: the sub-layer's output is then the adapter's output alone.
        residual_before_ln: sublayer hook, sequential: the adapter's skip connection adds ``f`` (True), ``f + r``
            (``"post_add"``) or the adapter's input (False).
        cross_adapter: sublayer hook: also adapt the cross-attention sub-layers of encoder-decoder models.
        targets: default by placement: with ``hook="sublayer"`` houlsby ``["attn.sublayer", "ffn.sublayer"]``,
            pfeiffer and parallel ``["ffn.sublayer"]`` (plus ``"cross.sublayer"`` with ``cross_adapter``); with
            ``hook="projection"`` houlsby ``["attn.out", "ffn.down"]``, pfeiffer ``["ffn.down"]``, parallel
            ``["ffn"]`` (or ``["ffn.down"]`` with the input tapped at ``ffn.in`` where the profile has no ``ffn``).
            With ``placement="parallel"`` a target that is a linear layer is taken as the FFN's output projection.
    """

    # 2: ``hook`` added; version-1 files meant ``hook="projection"`` (see :meth:`migrate`)
    schema_version: ClassVar[int] = 2

    placement: Placement = Placement.PFEIFFER
    reduction_factor: float = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    scaling: float = 1.0
    scaling_mode: Scaling = Scaling.FIXED
    ln_before: bool = False
    ln_after: bool = False
    adapter_residual_before_ln: bool = False
    dropout: float = 0.0
    skip_layers: int = 0
    drop_prob: float = 0.0
    phm_dim: int | None = None
    shared_phm_rule: bool = True
    factorized_phm_W: bool = True
    phm_rank: int = 1
    init_weights: bool = True
    hook: Hook = Hook.SUBLAYER
    original_ln_before: bool | None = None
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    cross_adapter: bool = False

    @staticmethod
    def migrate(data: dict[str, Any], version: int) -> dict[str, Any]:
        """Fields of a config saved under schema ``version`` as this version reads them: version 1 had no ``hook``
        and always meant ``hook="projection"``."""
        if version < 2 and "hook" not in data:
            data = {**data, "hook": Hook.PROJECTION.value}
        return data

    @property
    def original_ln_before_resolved(self) -> bool:
        """``original_ln_before`` with None resolved by placement (True for pfeiffer, False otherwise)."""
        if self.original_ln_before is None:
            return self.placement is Placement.PFEIFFER and self.hook is Hook.SUBLAYER
        return self.original_ln_before

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            object.__setattr__(self, "hook", Hook(self.hook))
        except ValueError:
            raise ValueError(f"unknown hook {self.hook!r}; choose one of {[h.value for h in Hook]}") from None
        if self.residual_before_ln not in (True, False, "post_add") or not isinstance(
            self.residual_before_ln, (bool, str)
        ):
            raise ValueError(
                f"residual_before_ln must be True, False or 'post_add', got {self.residual_before_ln!r}"
            )
        if self.hook is Hook.PROJECTION:
            changed = [
                f
                for f, v in (
                    ("original_ln_before", self.original_ln_before not in (None, False)),
                    ("original_ln_after", self.original_ln_after is not True),
                    ("residual_before_ln", self.residual_before_ln is not True),
                    ("cross_adapter", self.cross_adapter),
                )
                if v
            ]
            if changed:
                raise ValueError(
                    f"{', '.join(changed)} re-arrange the block's residual and LayerNorm around the adapter, which "
                    "needs hook='sublayer'; with hook='projection' leave them at their defaults"
                )
        try:
            object.__setattr__(self, "placement", Placement(self.placement))
        except ValueError:
            raise ValueError(
                f"unknown placement {self.placement!r}; choose one of {[p.value for p in Placement]}"
            ) from None
        if isinstance(self.scaling, str):
            if self.scaling not in ("learned", "channel"):
                raise ValueError(f"scaling must be a number, 'learned' or 'channel', got {self.scaling!r}")
            object.__setattr__(self, "scaling_mode", self.scaling)
            object.__setattr__(self, "scaling", 1.0)
        try:
            object.__setattr__(self, "scaling_mode", Scaling(self.scaling_mode))
        except ValueError:
            raise ValueError(
                f"unknown scaling_mode {self.scaling_mode!r}; choose one of {[s.value for s in Scaling]}"
            ) from None
        object.__setattr__(self, "scaling", float(self.scaling))
        activation(self.non_linearity)  # validates the name
        if not self.reduction_factor > 0:
            raise ValueError(f"reduction_factor must be positive, got {self.reduction_factor!r}")
        if self.bottleneck_size is not None and (
            not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1
        ):
            raise ValueError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {self.drop_prob!r}")
        if not isinstance(self.skip_layers, int) or self.skip_layers < 0:
            raise ValueError(f"skip_layers must be a non-negative integer, got {self.skip_layers!r}")
        if self.phm_dim is not None and (not isinstance(self.phm_dim, int) or self.phm_dim < 1):
            raise ValueError(f"phm_dim must be a positive integer or None, got {self.phm_dim!r}")
        if not isinstance(self.phm_rank, int) or self.phm_rank < 1:
            raise ValueError(f"phm_rank must be a positive integer, got {self.phm_rank!r}")
        if self.adapter_residual_before_ln and self.placement is Placement.PARALLEL:
            raise ValueError(
                "adapter_residual_before_ln applies to sequential adapters only; drop it for 'parallel'"
            )
        if self.original_ln_before and self.placement is Placement.PARALLEL:
            raise ValueError("original_ln_before applies to sequential adapters only; drop it for 'parallel'")

    # --- the method interface -------------------------------------------------------------
    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        if self.hook is Hook.SUBLAYER:
            if "ffn.sublayer" not in roles:
                raise TargetError(
                    "hook='sublayer' places the adapter by the model profile's sub-layer roles ('attn.sublayer', "
                    "'ffn.sublayer', ...), which this model does not have; pass targets=[...] naming the sub-layer "
                    "modules, or hook='projection' to put the adapter on linear layers' outputs"
                )
            kinds = ("attn", "ffn") if self.placement is Placement.HOULSBY else ("ffn",)
            if self.cross_adapter:
                kinds = (*kinds, "cross")
            return tuple(f"{k}.sublayer" for k in kinds)
        if self.placement is Placement.HOULSBY:
            return ("attn.out", "ffn.down")
        if self.placement is Placement.PFEIFFER:
            return ("ffn.down",)
        return ("ffn",) if "ffn" in roles else ("ffn.down",)

    def accepts(self, module: nn.Module) -> bool:
        return self.hook is Hook.SUBLAYER or _io_dims(module) is not None

    def size_for(self, dim: int) -> int:
        """Bottleneck size ``m`` for hidden size ``dim``."""
        return (
            self.bottleneck_size if self.bottleneck_size is not None else max(1, int(dim // self.reduction_factor))
        )

    def build(self, module: nn.Module, name: str) -> Component:
        dims = _io_dims(module)
        if dims is None:
            raise TypeError(
                f"a bottleneck adapter cannot act on {name!r} ({type(module).__name__}): it needs a linear layer or a "
                "block containing linear layers; pick other targets"
            )
        in_dim, out_dim = dims
        like = _first_param(module)
        if self.placement is Placement.PARALLEL:
            if backend_for(module) is not None:  # the FFN's output projection: the FFN input is tapped elsewhere
                in_dim = out_dim
            return ParallelBottleneck(self, in_dim, out_dim, like, name)
        return SequentialBottleneck(self, out_dim, like, name)

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        """Build every target, then: drop AdapterDrop's skipped layers, add the FFN-input taps of parallel adapters
        on split FFNs, share the PHM rule, and give each layer's components one AdapterDrop draw."""
        kept = [n for n in targets if layer_index(n) is None or layer_index(n) >= self.skip_layers]
        if not kept:
            raise TargetError(
                f"skip_layers={self.skip_layers} leaves none of the {len(targets)} targets; lower it"
            )
        if self.hook is Hook.SUBLAYER:
            if _SUBLAYER_BUILDER is None:  # methods/__init__ imports every method module, that one included
                raise RuntimeError("adapterkit.methods.bottleneck_sublayer was not imported")
            comps: dict[str, Component] = _SUBLAYER_BUILDER(self, modules, kept, select)
        else:
            comps = {n: self.build(modules[n], n) for n in kept}
        if self.placement is Placement.PARALLEL and self.hook is Hook.PROJECTION:
            comps.update(self._taps(modules, comps, select))
        if self.phm_dim is not None and self.shared_phm_rule:
            layers = [lay for c in comps.values() for lay in c.modules() if isinstance(lay, PHMLinear)]
            for lay in layers[1:]:
                lay.share_rule(layers[0])
        if self.drop_prob > 0:
            groups: dict[Any, _LayerDrop] = {}
            for n, c in comps.items():
                if isinstance(c, _BottleneckBase):
                    key = _layer_path(n)
                    c.layer_drop = groups.setdefault(key, _LayerDrop(self.drop_prob))
        return comps

    def _taps(
        self,
        modules: Mapping[str, nn.Module],
        comps: dict[str, Component],
        select: Callable[[Sequence[Any]], list[str]],
    ) -> dict[str, Component]:
        """One :class:`FFNInputTap` per FFN whose output projection carries a parallel adapter."""
        needy = {n: c for n, c in comps.items() if isinstance(c, ParallelBottleneck) and backend_for(modules[n])}
        if not needy:
            return {}
        try:
            candidates = select(["ffn.in"])
        except TargetError as e:
            raise TargetError(
                f"a parallel adapter on {next(iter(needy))!r} needs the FFN's input, found through the role "
                f"'ffn.in', but: {e}. Target the whole FFN module instead (role 'ffn' or its name)"
            ) from None
        try:
            outputs = set(select(["ffn.down"]))
        except TargetError:
            outputs = set()
        wrong = [n for n in needy if n not in outputs]
        if wrong:
            raise TargetError(
                f"a parallel adapter on a linear layer sits on the FFN's output projection (role 'ffn.down'), but "
                f"{wrong[0]!r} is not one; target 'ffn.down' or the whole FFN module ('ffn')"
            )
        taps: dict[str, FFNInputTap] = {}
        for n, comp in needy.items():
            src = _pair(n, candidates)
            if src is None:
                raise TargetError(f"no 'ffn.in' module in the same layer as {n!r} to read the FFN input from")
            if src in comps:
                raise TargetError(f"{src!r} is both a target and the FFN input of {n!r}; remove it from targets")
            dims = _io_dims(modules[src])
            if dims is None or dims[0] != comp.in_dim:
                raise TargetError(
                    f"the FFN input read at {src!r} has size {dims and dims[0]}, but the adapter on {n!r} expects "
                    f"{comp.in_dim}; target the whole FFN module instead"
                )
            tap = taps.setdefault(src, FFNInputTap(src))
            tap.holders.append(comp.holder)
            comp.holder.source = src
        return dict(taps)


def _io_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` features of a linear-like module, or of a block (first and last linear-like submodule)."""
    backend = backend_for(module)
    if backend is not None:
        return backend.dims(module) if backend.kind == "linear" else None
    inner = [m for m in base_modules(module).values() if m is not module]  # not other adapters' modules
    linears = [m for m in inner if getattr(backend_for(m), "kind", None) == "linear"]
    if not linears:
        return None
    return backend_for(linears[0]).dims(linears[0])[0], backend_for(linears[-1]).dims(linears[-1])[1]


def _layer_path(name: str) -> str:
    """The module path up to its layer index (``decoder.block.1`` for ``decoder.block.1.layer.0.SelfAttention.o``),
    so that encoder and decoder layers draw separately; the name itself when it has no layer index."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return name


def _first_param(module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    return next(module.parameters())


def _pair(name: str, candidates: list[str]) -> str | None:
    """The candidate in the same layer as ``name`` sharing the longest dotted prefix with it (first on ties)."""
    idx, parts = layer_index(name), name.split(".")
    best, best_len = None, 0
    for c in candidates:
        if layer_index(c) != idx:
            continue
        common = 0
        for a, b in zip(parts, c.split(".")):
            if a != b:
                break
            common += 1
        if common > best_len:
            best, best_len = c, common
    return best


# --- PHM layers (Compacter §3) ---------------------------------------------------------------------------------
class _PHMRule(nn.Module):
    """The ``A_i`` of a PHM layer: ``A: (n, n, n)`` (``A[i]`` is ``A_i``)."""

    def __init__(self, n: int, factory: dict[str, Any]) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(n, n, n, **factory))


class PHMLinear(nn.Module):
    """A parameterized hypercomplex multiplication layer (Compacter §3.1): ``y = x W^T + b`` with

        W = Σ_{i=1..n} A_i ⊗ B_i,   A_i: (n, n),   B_i: (out/n, in/n),   W: (out, in)

    and, with ``factorized``, ``B_i = s_i t_i`` (``s_i: (out/n, r)``, ``t_i: (r, in/n)``; §3.3). Parameters:
    ``rule.A: (n, n, n)`` (unless shared from another layer), ``B: (n, out/n, in/n)`` or ``B_left: (n, out/n, r)`` and
    ``B_right: (n, r, in/n)``, ``bias: (out,)``. ``x: (..., in)`` -> ``(..., out)``.
    """

    def __init__(self, in_dim: int, out_dim: int, n: int, factorized: bool, rank: int, factory: dict[str, Any]):
        super().__init__()
        if in_dim % n or out_dim % n:
            raise ValueError(
                f"phm_dim={n} must divide both sizes of a PHM layer, got {in_dim} -> {out_dim}; change phm_dim, "
                "reduction_factor or bottleneck_size"
            )
        self.n, self.in_dim, self.out_dim = n, in_dim, out_dim
        p, q = out_dim // n, in_dim // n
        self.rule = _PHMRule(n, factory)
        if factorized:
            self.B_left = nn.Parameter(torch.empty(n, p, rank, **factory))
            self.B_right = nn.Parameter(torch.empty(n, rank, q, **factory))
        else:
            self.B = nn.Parameter(torch.empty(n, p, q, **factory))
        self.bias = nn.Parameter(torch.zeros(out_dim, **factory))
        self.factorized = factorized

    def share_rule(self, owner: PHMLinear) -> None:
        """Use ``owner``'s ``A`` (held by reference, outside this layer's parameters and state_dict)."""
        del self._modules["rule"]
        self.__dict__["_shared_rule"] = owner.rule_module

    @property
    def rule_module(self) -> _PHMRule:
        own = self._modules.get("rule")
        return own if own is not None else self.__dict__["_shared_rule"]

    @property
    def owns_rule(self) -> bool:
        return "rule" in self._modules

    def blocks(self) -> torch.Tensor:
        """``B: (n, out/n, in/n)``."""
        return self.B_left @ self.B_right if self.factorized else self.B

    def weight(self) -> torch.Tensor:
        """``W = Σ_i A_i ⊗ B_i: (out, in)``: ``W[a p + c, b q + d] = Σ_i A[i, a, b] B[i, c, d]``."""
        A, B = self.rule_module.A, self.blocks()
        return torch.einsum("iab,icd->acbd", A, B).reshape(self.out_dim, self.in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    @torch.no_grad()
    def reset(self, zero: bool, random: bool) -> None:
        """Rule ``A ~ N(0, 0.01²)`` (AdapterHub's per-layer ``phm_c_init="normal"``), ``B`` (factors) Glorot-uniform
        per ``i``; ``zero`` makes ``W = 0`` (zero ``B`` / ``B_right``); ``random`` uses larger values (tests)."""
        if self.owns_rule:
            nn.init.normal_(self.rule_module.A, std=0.5 if random else 0.01)
        for p in (self.B_left, self.B_right) if self.factorized else (self.B,):
            for i in range(self.n):
                nn.init.xavier_uniform_(p[i])
        if zero:
            (self.B_right if self.factorized else self.B).zero_()
        if random:
            nn.init.normal_(self.bias, std=0.1)
        else:
            nn.init.zeros_(self.bias)


# --- components ---------------------------------------------------------------------------------------------
class _LayerDrop:
    """One AdapterDrop draw per layer and forward pass, shared by the layer's components.

    A component asking twice means a new forward pass started; the draw uses torch's RNG, so activation
    checkpointing (which restores the RNG state) recomputes the same decision."""

    def __init__(self, p: float) -> None:
        self.p = p
        self._asked: set[int] = set()
        self._drop = False

    def skip(self, who: object) -> bool:
        if id(who) in self._asked or not self._asked:
            self._asked = set()
            self._drop = bool(torch.rand(()).item() < self.p)
        self._asked.add(id(who))
        return self._drop


class _BottleneckBase(Component):
    """The bottleneck branch ``f(h) = dropout(s · up(act(down(LN_before(h)))))``; ``h: (..., in)`` -> ``(..., out)``.

    Submodules: ``down``, ``up`` (``nn.Linear`` or :class:`PHMLinear`), optional ``ln_before``/``ln_after``;
    parameter ``scale`` (``(1,)`` or ``(out,)``) when the scaling is trained.
    """

    parallel = False

    def __init__(self, cfg: Bottleneck, in_dim: int, out_dim: int, like: torch.Tensor, name: str) -> None:
        super().__init__()
        factory = {"device": like.device, "dtype": like.dtype if like.is_floating_point() else torch.float32}
        size = cfg.size_for(in_dim)
        self.cfg = cfg
        self.in_dim, self.out_dim, self.size = in_dim, out_dim, size
        self.ln_before = nn.LayerNorm(in_dim, **factory) if cfg.ln_before else None
        self.down = self._projection(cfg, in_dim, size, factory)
        self.act = activation(cfg.non_linearity)
        self.up = self._projection(cfg, size, out_dim, factory)
        self.ln_after = nn.LayerNorm(out_dim, **factory) if cfg.ln_after else None
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.scaling = cfg.scaling
        if cfg.scaling_mode is Scaling.FIXED:
            self.scale = None
        else:
            shape = (1,) if cfg.scaling_mode is Scaling.LEARNED else (out_dim,)
            self.scale = nn.Parameter(torch.full(shape, cfg.scaling, **factory))
        self.layer_drop: _LayerDrop | None = None

    @staticmethod
    def _projection(cfg: Bottleneck, in_dim: int, out_dim: int, factory: dict[str, Any]) -> nn.Module:
        if cfg.phm_dim is None:
            return nn.Linear(in_dim, out_dim, **factory)
        return PHMLinear(in_dim, out_dim, cfg.phm_dim, cfg.factorized_phm_W, cfg.phm_rank, factory)

    def extra_repr(self) -> str:
        return f"{self.in_dim} -> {self.size} -> {self.out_dim}, scaling={self.scaling:g}"

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        random = not self.cfg.init_weights
        for proj, is_up in ((self.down, False), (self.up, True)):
            if isinstance(proj, PHMLinear):
                proj.reset(zero=is_up and not random, random=random)
                continue
            if random:
                nn.init.normal_(proj.weight, std=0.3 / math.sqrt(proj.in_features))
                nn.init.normal_(proj.bias, std=0.1)
                continue
            nn.init.zeros_(proj.bias)
            if is_up:
                nn.init.zeros_(proj.weight)
            elif self.parallel:
                nn.init.kaiming_uniform_(proj.weight, a=math.sqrt(5))
            else:
                nn.init.trunc_normal_(proj.weight, std=1e-2, a=-2e-2, b=2e-2)

    def _skipped(self) -> bool:
        return self.layer_drop is not None and self.training and self.layer_drop.skip(self)

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        """``s · up(act(down(LN_before(h))))`` (with dropout), in the adapter's dtype."""
        if self.ln_before is not None:
            h = self.ln_before(h)
        out = self.up(self.act(self.down(h)))
        out = out * (self.scale if self.scale is not None else self.scaling)
        return self.dropout(out) if self.dropout is not None else out

    def _cast(self, h: torch.Tensor) -> torch.Tensor:
        dtype = self.down.bias.dtype
        return h if h.dtype == dtype else h.to(dtype)

    # --- per-row routing: two gathered baddbmm calls over stacked projections ------------------------
    def _batchable(self) -> bool:
        plain = isinstance(self.down, nn.Linear) and self.ln_before is None and self.ln_after is None
        train_only = self.dropout is not None or self.layer_drop is not None
        return plain and not (self.training and train_only) and not getattr(self, "holder", _Holder()).source

    @classmethod
    def _routed_delta(cls, comps: list[Component | None], plan: Any, h: torch.Tensor, key: Any) -> Any:
        """``s · up(act(down(h)))`` for each row with its adapter's weights, as ``(G, m·L, out)``; bottleneck
        sizes zero-padded to the largest (a padded unit gets zero weights in and out, so it adds nothing;
        adapters absent from the site get all-zero weights). None when some component needs the slow path."""
        live = [c for c in comps if c is not None]
        if not all(c._batchable() for c in live) or len({type(c.act) for c in live}) != 1:
            return None
        ref = live[0]

        def build() -> tuple[torch.Tensor, ...]:
            size = max(c.size for c in live)
            wd, bd, wu, bu = [], [], [], []
            for c in comps:
                if c is None:
                    wd.append(ref.down.weight.new_zeros(size, ref.in_dim))
                    bd.append(ref.down.bias.new_zeros(size))
                    wu.append(ref.up.weight.new_zeros(ref.out_dim, size))
                    bu.append(ref.up.bias.new_zeros(ref.out_dim))
                    continue
                s = c.scale if c.scale is not None else c.scaling
                pad = size - c.size
                wd.append(F.pad(c.down.weight, (0, 0, 0, pad)))
                bd.append(F.pad(c.down.bias, (0, pad)))
                wu.append(
                    F.pad(c.up.weight * (s[:, None] if torch.is_tensor(s) and s.numel() > 1 else s), (0, pad))
                )
                bu.append(c.up.bias * s)
            return (
                torch.stack(wd).transpose(1, 2),  # (G, in, size)
                torch.stack(bd).unsqueeze(1),  # (G, 1, size)
                torch.stack(wu).transpose(1, 2),  # (G, size, out)
                torch.stack(bu).unsqueeze(1),  # (G, 1, out)
            )

        wd, bd, wu, bu = plan.stacked(key, build)
        z = ref.act(torch.baddbmm(bd, plan.gather(h.to(wd.dtype)), wd))
        return torch.baddbmm(bu, z, wu)


def _main(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, tuple) else y


def _with_main(y: Any, value: torch.Tensor) -> Any:
    return (value, *y[1:]) if isinstance(y, tuple) else value


class SequentialBottleneck(_BottleneckBase):
    """Houlsby/Pfeiffer adapter on a module's output ``y: (..., d)`` (first element when the output is a tuple)::

    y' = y + f(y)            (or  y + LN_after(f(y))  /  LN_after(y + f(y))  with ``ln_after``)
    """

    def __init__(self, cfg: Bottleneck, dim: int, like: torch.Tensor, name: str) -> None:
        super().__init__(cfg, dim, dim, like, name)

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        if self._skipped():
            return y
        h = _main(y)
        delta = self.branch(self._cast(h))
        if self.ln_after is None:
            out = h + delta.to(h.dtype)
        elif self.cfg.adapter_residual_before_ln:
            out = self.ln_after(self._cast(h) + delta).to(h.dtype)
        else:
            out = h + self.ln_after(delta).to(h.dtype)
        return _with_main(y, out)

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: Any, key: Any) -> Any:
        h = _main(y)
        delta = cls._routed_delta(comps, plan, h, key)
        return None if delta is None else _with_main(y, plan.scatter_add(h, delta))


class _Holder:
    """The FFN input of one layer, written by a :class:`FFNInputTap` and consumed (cleared) by the adapter."""

    __slots__ = ("value", "source")

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.source = ""

    def take(self, site: str) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError(
                f"the parallel adapter at {site!r} found no FFN input: {self.source!r} did not run before it in this "
                "forward pass (call the model as a whole, not its submodules)"
            )
        return value


class ParallelBottleneck(_BottleneckBase):
    """Parallel adapter (He et al. 2022, Eq. 6): ``y' = y + LN_after?(f(x))``, ``x: (..., in)`` the FFN input,
    ``y: (..., out)`` the FFN output.

    On an FFN module ``x`` is the module's own input. On an FFN output projection (``holder.source`` set) ``x`` is
    read from the holder an :class:`FFNInputTap` filled earlier in the same forward pass, and cleared.
    The change ``y' - y`` does not depend on ``y``, so several parallel adapters add up (``additive``).
    """

    parallel = True
    additive = True

    def __init__(self, cfg: Bottleneck, in_dim: int, out_dim: int, like: torch.Tensor, name: str) -> None:
        super().__init__(cfg, in_dim, out_dim, like, name)
        self.holder = _Holder()
        self.site = name

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        x = self.holder.take(self.site) if self.holder.source else first_input(args, kwargs)
        if self._skipped():
            return y
        h = _main(y)
        if x.shape[:-1] != h.shape[:-1]:
            raise RuntimeError(
                f"the parallel adapter at {self.site!r} got an FFN input of shape {tuple(x.shape)} for an output of "
                f"shape {tuple(h.shape)}"
            )
        delta = self.branch(self._cast(x))
        if self.ln_after is not None:
            delta = self.ln_after(delta)
        return _with_main(y, h + delta.to(h.dtype))

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: Any, key: Any) -> Any:
        h = _main(y)
        delta = cls._routed_delta(comps, plan, x, key)
        return None if delta is None else _with_main(y, plan.scatter_add(h, delta))


class FFNInputTap(Component):
    """Records the input of the FFN's first module for the parallel adapters of the same adapter (split FFNs such
    as BERT's). Has no parameters and returns the module's output unchanged."""

    additive = True
    observer = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.site = name
        self.holders: list[_Holder] = []

    def extra_repr(self) -> str:
        return f"for {len(self.holders)} adapter(s)"

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        x = first_input(args, kwargs)
        for h in self.holders:
            h.value = x
        return y


# --- presets (AdapterHub names and defaults) ------------------------------------------------------------------------
_PRESETS: dict[str, Bottleneck] = {
    # Pfeiffer et al. 2021 / AdapterHub SeqBnConfig: reduction 16, ReLU
    "seq_bn": Bottleneck(placement="pfeiffer", reduction_factor=16, non_linearity="relu"),
    # Houlsby et al. 2019 / AdapterHub DoubleSeqBnConfig: reduction 16, swish
    "double_seq_bn": Bottleneck(placement="houlsby", reduction_factor=16, non_linearity="swish"),
    # He et al. 2022 / AdapterHub ParBnConfig: reduction 2, ReLU, scaling 4, MAM init
    "par_bn": Bottleneck(placement="parallel", reduction_factor=2, non_linearity="relu", scaling=4.0),
    # Karimi Mahabadi et al. 2021 / AdapterHub CompacterConfig and CompacterPlusPlusConfig: reduction 32, GELU, n = 4
    "compacter": Bottleneck(
        placement="houlsby",
        reduction_factor=32,
        non_linearity="gelu",
        phm_dim=4,
        shared_phm_rule=True,
        factorized_phm_W=True,
        phm_rank=1,
    ),  # fmt: skip
    "compacter++": Bottleneck(
        placement="pfeiffer",
        reduction_factor=32,
        non_linearity="gelu",
        phm_dim=4,
        shared_phm_rule=True,
        factorized_phm_W=True,
        phm_rank=1,
    ),  # fmt: skip
}
_ALIASES = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn", "parallel_bn": "par_bn"}

for _name, _cfg in _PRESETS.items():
    register_preset(_name, _cfg)
for _alias, _name in _ALIASES.items():
    register_preset(_alias, _PRESETS[_name])


# hook="sublayer": the components live in methods/bottleneck_sublayer.py, which builds on the classes above and
# registers its builder here when imported (no import back from this module, so no cycle)
_SUBLAYER_BUILDER: Callable[..., dict[str, Component]] | None = None


def register_sublayer_builder(build: Callable[..., dict[str, Component]]) -> None:
    global _SUBLAYER_BUILDER
    _SUBLAYER_BUILDER = build
