"""LoRA and its variants: rsLoRA, DoRA, PiSSA/OLoRA inits, rank/alpha patterns, bias deltas.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") keeps a frozen weight
``W`` and learns a low-rank update ``ΔW = s · B A`` with ``A: (r, in)``, ``B: (out, r)``::

        x ──────────► W ──────────┐
        │                         (+) ──► y = W x + s · B A dropout(x)
        └─► dropout ─► A ─► B ─► ·s

* ``s = alpha / r`` (§4.1: "scaling helps reduce the need to retune hyperparameters when we vary r");
  rsLoRA (Kalajdzievski 2023, §3) uses ``s = alpha / sqrt(r)`` so that larger ranks keep learning.
* Init (§4.1): ``A`` Kaiming-uniform, ``B = 0``, so the adapted model starts as the base model.
  ``gaussian`` draws ``A ~ N(0, 1/r)``. PiSSA (Meng et al. 2024, §3) initializes ``B A`` from the top
  ``r`` singular triplets of ``W`` and trains on the residual ``W - s B A``; OLoRA (Büyükakyüz 2024)
  does the same with a QR decomposition. Both change the base weight on attach and restore it
  bit-for-bit on detach (the original is kept).
* DoRA (Liu et al. 2024, §4.1) splits the weight into magnitude and direction:
  ``W' = m · (W + s B A) / ||W + s B A||_row`` with a trainable magnitude ``m: (out,)`` initialized to
  the row norms; the norm is detached from the graph (§4.3) to save memory.
* Bias: ``"lora_only"`` learns a bias delta on each adapted module that has a bias; ``"all"`` also
  on every other module with a bias. Deltas keep the base untouched (peft trains the base bias
  itself); peft files carry ``base + delta`` and are converted on load/export.

Works on ``nn.Linear``, GPT-2 ``Conv1D`` (weight stored ``(in, out)``), ``nn.Conv2d`` (A is a
``k×k`` conv with the base's stride/padding/dilation, B a ``1×1`` conv) and ``nn.Embedding``
(``A: (r, num_embeddings)``, ``B: (dim, r)``, looked up rather than multiplied).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import backend_for
from ..component import Component
from ..config import AdapterConfig, register
from ..targeting import CONTAINER
from . import lora_conv, lora_params
from .bitfit import BiasDelta

PUBLIC = ("LoRA",)
__all__ = ["LoRA", "LoRAInit", "Bias", "LoRALinear", "LoRAEmbedding", "LoRAConv2d", "pattern_value"]


class LoRAInit(str, enum.Enum):
    """How A and B start (see the module docstring)."""

    DEFAULT = "default"
    GAUSSIAN = "gaussian"
    PISSA = "pissa"
    OLORA = "olora"
    EVA = "eva"  # from activations: methods/lora_data_init.py (adapters.calibrate)
    CORDA = "corda"  # from activations and the weight: methods/lora_data_init.py (adapters.calibrate)


# EVA/CorDA live in methods/lora_data_init.py, which builds on this module and registers itself here when
# imported (methods/__init__ imports every method module), so this module never imports it back (no cycle)
_DATA_INIT: Any = None


def register_data_init(module: Any) -> None:
    """Called by ``methods/lora_data_init.py`` on import: the module implementing ``init="eva" | "corda"``."""
    global _DATA_INIT
    _DATA_INIT = module


def _data_init() -> Any:
    assert _DATA_INIT is not None, "adapterkit.methods imports lora_data_init with every method module"
    return _DATA_INIT


class Bias(str, enum.Enum):
    NONE = "none"
    LORA_ONLY = "lora_only"
    ALL = "all"


def pattern_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    """Value of the first key of ``pattern`` that matches module ``name``.

    A key matches when it equals the name, or when ``re.fullmatch(r"(.*\\.)?" + key, name)`` succeeds
    (so ``"q_proj"`` and ``"layers.0.self_attn.q_proj"`` and ``r".*\\.0\\.self_attn\\.q_proj"`` all work),
    which is how peft resolves ``rank_pattern`` / ``alpha_pattern`` keys.
    """
    for key, value in pattern.items():
        if key == name or re.fullmatch(rf"(.*\.)?(?:{key})", name):
            return value
    return default


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _finite_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_rank_alpha(cfg: Any, what: str) -> None:
    """Validation shared by the low-rank configs (LoRA, LoHa, LoKr): ``r`` and the ``rank_pattern`` values are
    positive integers, ``alpha`` and the ``alpha_pattern`` values finite numbers; the patterns become dicts.

    Raises:
        ValueError: naming ``what`` (the method) and the offending field.
    """
    object.__setattr__(cfg, "rank_pattern", dict(cfg.rank_pattern))
    object.__setattr__(cfg, "alpha_pattern", dict(cfg.alpha_pattern))
    if not _positive_int(cfg.r):
        raise ValueError(f"{what} rank r must be a positive integer, got r={cfg.r!r}")
    for key, r in cfg.rank_pattern.items():
        if not _positive_int(r):
            raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {r!r}")
    if not _finite_real(cfg.alpha):
        raise ValueError(f"{what} alpha must be a finite number, got alpha={cfg.alpha!r}")
    for key, a in cfg.alpha_pattern.items():
        if not _finite_real(a):
            raise ValueError(f"alpha_pattern[{key!r}] must be a finite number, got {a!r}")


@register("lora")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA(AdapterConfig):
    """Low-rank adaptation of linear, Conv1D, Conv2d and embedding weights.

    Args:
        r: rank of the update (> 0).
        alpha: scaling numerator; ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``rslora``).
        dropout: dropout probability on the LoRA branch input.
        rslora: rank-stabilized scaling ``alpha / sqrt(r)``.
        rank_pattern: module-name pattern -> rank, overriding ``r`` for matching modules.
        alpha_pattern: module-name pattern -> alpha, overriding ``alpha`` for matching modules.
        dora: weight-decomposed LoRA (linear-like modules).
        bias: which bias deltas to learn, see :class:`Bias`.
        init: initialization of A and B, see :class:`LoRAInit`. ``"eva"`` (Paischer et al. 2024) and ``"corda"``
            (Yang et al. 2024) are set from activations by ``adapters.calibrate(name, batches)``, which must run
            before the first forward (``methods/lora_data_init.py``).
        eva: with ``init="eva"``, peft's ``EvaConfig`` fields: ``rho`` (2.0), ``tau`` (0.99), ``use_label_mask``
            (True), ``label_mask_value`` (-100), ``whiten`` (False), ``adjust_scaling_factors`` (True).
        corda: with ``init="corda"``, peft's ``CordaConfig.corda_method``: ``{"corda_method": "ipm"}`` (default,
            instruction-previewed: the largest context-oriented components) or ``"kpm"`` (knowledge-preserving: the
            smallest).
        init_weights: False starts B random too (the adapter is not an identity; for tests).
        targets: default ``["attn.q", "attn.v"]`` (as in the LoRA paper's GPT-3 experiments, §7.1), or the
            fused ``"attn.qkv"`` on models that have no separate projections (GPT-2).
        target_parameters: parameters adapted in place of modules (peft's field), e.g.
            ``["experts.gate_up_proj", "experts.down_proj"]`` for MoE experts stored as 3-D tensors, or a router's
            ``"mlp.gate.weight"``; names or dotted suffixes, adapted besides ``targets`` (which then default to
            none, as in peft). See ``methods/lora_params.py``.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    dora: bool = False
    bias: Bias = Bias.NONE
    init: LoRAInit = LoRAInit.DEFAULT
    init_weights: bool = True
    target_parameters: Sequence[str] = ()
    eva: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    corda: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "bias", Bias(self.bias))
        object.__setattr__(self, "init", LoRAInit(self.init))
        check_rank_alpha(self, "LoRA")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        lora_params.check_config(self)  # parameter targets (MoE experts, routers): methods/lora_params.py
        object.__setattr__(self, "eva", dict(self.eva))
        object.__setattr__(self, "corda", dict(self.corda))
        if self.eva or self.corda or self.init in (LoRAInit.EVA, LoRAInit.CORDA):
            _data_init().check_options(self)

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        if self.target_parameters:  # as peft: target_parameters without targets adapts no module
            return ()
        if "attn.q" not in roles and "attn.qkv" in roles:
            return ("attn.qkv",)
        if "attn.q" not in roles and "ffn.up" in roles and "ffn.down" in roles:
            return (
                "ffn.up",
                "ffn.down",
            )  # no attention (ConvNeXt-like: a depthwise token mixer): the FFN's linears
        return ("attn.q", "attn.v")

    def parameter_targets(self) -> Sequence[str]:
        return self.target_parameters

    def accepts(self, module: nn.Module) -> bool:
        return (
            backend_for(module) is not None
            or lora_conv.handles(module)
            or bool(lora_params.module_parameters(module))
        )

    def rank_for(self, name: str) -> int:
        return int(pattern_value(self.rank_pattern, name, self.r))

    def scaling_for(self, name: str) -> float:
        r = self.rank_for(name)
        alpha = float(pattern_value(self.alpha_pattern, name, self.alpha))
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def hotswap_fields(self) -> tuple[str, ...]:
        """Ranks and alphas: a hot-swapped LoRA of rank ``<=`` the padded rank is zero-padded and its scaling
        folded into ``B`` (peft's ``hotswap_adapter`` does the same for compiled models)."""
        return ("r", "alpha", "rank_pattern", "alpha_pattern")

    def padded(self, r: int, scalings: Mapping[str, float]) -> LoRA:
        """Rank ``r`` everywhere; ``alpha`` keeps the most common site scaling, ``alpha_pattern`` the others."""
        to_alpha = (lambda s: s * math.sqrt(r)) if self.rslora else (lambda s: s * r)
        common = Counter(scalings.values()).most_common(1)[0][0] if scalings else self.alpha / r
        others = {site: to_alpha(s) for site, s in scalings.items() if s != common}
        return dataclasses.replace(self, r=r, alpha=to_alpha(common), rank_pattern={}, alpha_pattern=others)

    def build(self, module: nn.Module, name: str) -> Component:
        if self.init in (LoRAInit.EVA, LoRAInit.CORDA):  # set by adapters.calibrate: methods/lora_data_init.py
            return _data_init().LoRADataInit(self, module, name)
        if lora_conv.handles(module):  # Conv1d, Conv3d, grouped/depthwise Conv2d: methods/lora_conv.py
            return lora_conv.LoRAConv(self, module, name)
        backend = backend_for(module)
        if backend is None:
            raise TypeError(
                f"LoRA cannot act on {name!r} ({type(module).__name__}): it supports nn.Linear, Conv1D, "
                "nn.Conv1d/2d/3d (grouped too) and nn.Embedding; pick other targets"
            )
        cls = {"linear": LoRALinear, "embedding": LoRAEmbedding, "conv2d": LoRAConv2d}[backend.kind]
        return cls(self, module, name)

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        """:meth:`build` for each target, except parameters (``target_parameters``, and module targets that are MoE
        expert stacks or routers): ``lora_params.build_parameter_sites``."""
        built = {n: self.build(modules[n], n) for n in targets if not lora_params.module_parameters(modules[n])}
        if self.init is LoRAInit.EVA:  # one calibration state for the adapter (EVA's rank budget is global)
            _data_init().link(self, modules, built)
        return lora_params.build_parameter_sites(self, modules, targets, built, select)

    def extra_sites(self, modules: Mapping[str, nn.Module], targets: list[str]) -> dict[str, Component]:
        """With ``bias="all"``: a bias delta on every non-target module that has a bias."""
        if self.bias is not Bias.ALL:
            return {}
        chosen = set(targets)
        return {
            n: BiasDelta(m)
            for n, m in modules.items()
            if n not in chosen and isinstance(getattr(m, "bias", None), nn.Parameter)
        }


class _LoRABase(Component):
    """Shared state of the LoRA components: rank, scaling, dropout, bias delta, DoRA magnitude and
    PiSSA/OLoRA offsets. Subclasses give the shapes, ``_delta`` and ``post``; DoRA differs between
    them only by the axes of the norm (``norm_dims``) and the magnitude's shape.

    Parameters are created with the base weight's device and dtype.
    """

    mergeable = True
    norm_dims: tuple[int, ...] = (1,)

    def __init__(
        self,
        cfg: LoRA,
        module: nn.Module,
        name: str,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
        magnitude_shape: tuple[int, ...],
    ):
        super().__init__()
        weight = module.weight
        self.cfg = cfg
        self.r = cfg.rank_for(name)
        self.scaling = cfg.scaling_for(name)
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        self.lora_A = nn.Parameter(torch.empty(a_shape, **factory))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **factory))
        self.magnitude = nn.Parameter(torch.ones(magnitude_shape, **factory)) if cfg.dora else None
        self.additive = not cfg.dora  # DoRA rescales the base output
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        has_bias = isinstance(getattr(module, "bias", None), torch.Tensor)
        if cfg.bias is not Bias.NONE and has_bias:
            self.bias = nn.Parameter(torch.zeros(module.bias.shape, **factory))
        else:
            self.bias = None
        if cfg.init in (LoRAInit.PISSA, LoRAInit.OLORA):
            # the initial factors; the base weight holds W - s * init_B @ init_A while attached
            self.register_buffer("init_A", torch.zeros(a_shape, **factory))
            self.register_buffer("init_B", torch.zeros(b_shape, **factory))
        self._original: torch.Tensor | None = None
        self._merge_gain: torch.Tensor | None = None
        # the module is needed at forward time by DoRA; kept outside the module tree on purpose
        object.__setattr__(self, "_module_ref", module)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}" + (", dora" if self.magnitude is not None else "")

    # --- hot-swapping ---------------------------------------------------------------------------------------
    def pad_rank_(self, r: int) -> bool:
        """``A: (r0, ...) -> (r, ...)`` and ``B: (out, r0, ...) -> (out, r, ...)`` with zeros (``B A`` unchanged)."""
        if r < self.r:
            raise ValueError(f"cannot pad rank {self.r} down to {r}")
        if self.cfg.init in (LoRAInit.PISSA, LoRAInit.OLORA):
            raise ValueError("PiSSA/OLoRA adapters change the base weight; they cannot be padded for hot-swapping")
        if r > self.r:
            A, B = self.lora_A.detach(), self.lora_B.detach()
            self.lora_A = nn.Parameter(_pad(A, 0, r), requires_grad=self.lora_A.requires_grad)
            self.lora_B = nn.Parameter(_pad(B, 1, r), requires_grad=self.lora_B.requires_grad)
            self.r = r
        return True

    def hotswap_state(self, other: Component) -> dict[str, torch.Tensor]:
        """``other``'s factors zero-padded to this rank, its scaling folded into ``B`` (``B' = B s'/s``), so this
        component's rank and scaling (constants of a compiled graph) stay."""
        if type(other) is not type(self):
            raise ValueError(f"a {type(other).__name__} cannot replace a {type(self).__name__}")
        assert isinstance(other, _LoRABase)
        for what, mine, theirs in (
            ("DoRA", self.magnitude is not None, other.magnitude is not None),
            ("a bias delta", self.bias is not None, other.bias is not None),
            ("dropout", self.dropout.p if self.dropout else 0.0, other.dropout.p if other.dropout else 0.0),
            ("PiSSA/OLoRA init", hasattr(self, "init_A"), hasattr(other, "init_A")),
        ):
            if mine != theirs:
                raise ValueError(f"{what} differs ({theirs!r} in the new adapter, {mine!r} here)")
        if hasattr(self, "init_A"):
            raise ValueError("PiSSA/OLoRA adapters change the base weight; they cannot be hot-swapped")
        if other.r > self.r:
            raise ValueError(
                f"rank {other.r} > {self.r}: call adapters.prepare_hotswap(max_rank={other.r}) before compiling"
            )
        if self.scaling == 0:
            raise ValueError("this adapter's scaling is 0 (alpha=0): nothing can be folded into it")
        state = {
            "lora_A": _pad(other.lora_A.detach(), 0, self.r),
            "lora_B": _pad(other.lora_B.detach() * (other.scaling / self.scaling), 1, self.r),
        }
        if other.magnitude is not None:
            state["magnitude"] = other.magnitude.detach()
        if other.bias is not None:
            state["bias"] = other.bias.detach()
        return state

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.dropout is None else self.dropout(x)
        return x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def delta_bias(self, module: nn.Module) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.detach()

    @property
    def _base(self) -> nn.Module:
        return self.__dict__["_module_ref"]

    # --- init ------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        init = self.cfg.init
        if init in (LoRAInit.PISSA, LoRAInit.OLORA):
            self._init_from_weight(module, init)
        else:
            self._init_default()
            if not self.cfg.init_weights:
                self._init_random()
        if self.magnitude is not None:
            weight = backend_for(module).read(module)
            if hasattr(self, "init_A"):  # DoRA on top of PiSSA: the attached base is W - s B0 A0
                weight = weight - self._delta(self.init_A, self.init_B)
            self.magnitude.copy_(self._norm(weight))

    def _init_default(self) -> None:
        if self.cfg.init is LoRAInit.GAUSSIAN:
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _init_random(self) -> None:
        nn.init.normal_(self.lora_B, std=0.1)

    def _init_from_weight(self, module: nn.Module, init: LoRAInit) -> None:
        raise TypeError(f"{init.value} init is available for linear-like modules only")

    # --- DoRA ------------------------------------------------------------------------------
    def _norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W + s B A||`` over ``norm_dims`` (DoRA §4.1), in float32, detached (§4.3), magnitude-shaped."""
        delta = self._delta(self.lora_A.detach(), self.lora_B.detach())
        norm = (weight.detach().float() + delta.float()).norm(p=2, dim=self.norm_dims)
        return norm.to(self.lora_A.dtype).view(self.magnitude.shape)

    def _gain(self) -> torch.Tensor:
        """DoRA's ``m / ||W + s B A||``, shaped to broadcast against the module output."""
        return self.magnitude / self._norm(backend_for(self._base).read(self._base))

    def _gain_on_weight(self, gain: torch.Tensor) -> torch.Tensor:
        """Reshape a gain to broadcast against the canonical weight (one value per output row)."""
        return gain.reshape(-1, *([1] * (self.lora_A.dim() - 1)))

    # --- attach/detach: PiSSA/OLoRA move the principal part out of the base weight --------
    @torch.no_grad()
    def on_attach(self, module: nn.Module) -> None:
        if not hasattr(self, "init_A"):
            return
        siblings = getattr(module, CONTAINER, {})
        if any(c is not self and getattr(c, "_original", None) is not None for c in siblings.values()):
            raise ValueError(
                f"{type(module).__name__} already carries a PiSSA/OLoRA adapter, which changed its weight; "
                "only one such adapter per module can be restored exactly: delete it first or use init='default'"
            )
        backend = backend_for(module)
        self._original = backend.read(module).clone()
        backend.add_(module, self._delta(self.init_A, self.init_B), alpha=-1.0)

    @torch.no_grad()
    def on_detach(self, module: nn.Module, keep_merged: bool = False) -> None:
        if self._original is None:
            super().on_detach(module, keep_merged)
            return
        if not (keep_merged and self.merged):
            if self.merged and self.bias is not None:
                module.bias.data.sub_(self.bias.to(module.bias.dtype))
            backend_for(module).copy_(module, self._original)
            self.merged = False
        self._original = None

    # --- merging ---------------------------------------------------------------------------
    def _delta(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``s * B A`` in the module's canonical weight layout."""
        raise NotImplementedError

    def delta_weight(self, module: nn.Module) -> torch.Tensor:
        return self._delta(self.lora_A.detach(), self.lora_B.detach())

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        if self.merged or self.magnitude is None:
            return super().merge(module)
        backend = backend_for(module)
        weight = backend.read(module)
        gain = self._gain_on_weight(self.magnitude / self._norm(weight)).to(weight.dtype)
        backend.copy_(module, (weight + self.delta_weight(module).to(weight.dtype)) * gain)
        if self.bias is not None:
            module.bias.data.add_(self.bias.to(module.bias.dtype))
        self._merge_gain = gain
        self.merged = True

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        if not self.merged or self.magnitude is None:
            return super().unmerge(module)
        backend = backend_for(module)
        weight = backend.read(module)
        backend.copy_(module, weight / self._merge_gain - self.delta_weight(module).to(weight.dtype))
        if self.bias is not None:
            module.bias.data.sub_(self.bias.to(module.bias.dtype))
        self._merge_gain = None
        self.merged = False


class LoRALinear(_LoRABase):
    """LoRA on a linear-like module (``nn.Linear``, GPT-2 ``Conv1D``; canonical weight ``(out, in)``).

    Shapes: ``x: (..., in)``, ``y: (..., out)``, ``lora_A: (r, in)``, ``lora_B: (out, r)``,
    ``magnitude: (out,)`` with DoRA.
    """

    def __init__(self, cfg: LoRA, module: nn.Module, name: str):
        in_dim, out_dim = backend_for(module).dims(module)
        r = cfg.rank_for(name)
        super().__init__(cfg, module, name, (r, in_dim), (out_dim, r), (out_dim,))
        self.out_dim = out_dim

    def _init_from_weight(self, module: nn.Module, init: LoRAInit) -> None:
        weight = backend_for(module).read(module).float()  # (out, in)
        r, s = self.r, self.scaling
        if init is LoRAInit.PISSA:
            U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            root = (S[:r] / s).sqrt()
            A = root[:, None] * Vh[:r]  # (r, in)
            B = U[:, :r] * root[None, :]  # (out, r)
        else:
            Q, R = torch.linalg.qr(weight)
            A, B = R[:r], Q[:, :r]
        for p, v in ((self.lora_A, A), (self.lora_B, B), (self.init_A, A), (self.init_B, B)):
            p.copy_(v.to(p.dtype))

    def _delta(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return (B @ A) * self.scaling

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xd = self._drop(x)
        h = F.linear(xd, self.lora_A)  # (..., r)
        B = self.lora_B
        if self.magnitude is not None:
            gain = self._gain()  # (out,)
            if self.dropout is not None and self.training:  # DoRA recomputes the base on dropped inputs
                base = F.linear(xd, backend_for(self._base).read(self._base).to(xd.dtype)).to(y.dtype)
            else:
                bias = getattr(self._base, "bias", None)
                base = y if bias is None else y - bias
            lora = F.linear(h, B) * self.scaling
            return self._add_bias(y + (gain - 1).to(y.dtype) * base + (gain * lora).to(y.dtype))
        if y.dtype != B.dtype or self.bias is not None:
            return self._add_bias(y + (F.linear(h, B) * self.scaling).to(y.dtype))
        # one fused GEMM: y + s * h @ B^T, without materializing the LoRA output separately
        y2 = y.reshape(-1, self.out_dim)
        h2 = h.reshape(-1, self.r)
        if torch.is_grad_enabled():
            return torch.addmm(y2, h2, B.t(), alpha=self.scaling).view(y.shape)
        return y2.addmm_(h2, B.t(), alpha=self.scaling).view(y.shape)

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: torch.Tensor, key: Any) -> Any:
        """Per-row routing. Without gradients (serving), :meth:`_routed_segments`. With gradients (training on a
        mixed batch), two batched matmuls over factors stacked as ``(G + 1, in, r_max)`` and
        ``(G + 1, r_max, out)`` (ranks zero-padded to ``r_max``, scaling folded into B; the last entry, and
        adapters absent from this site, are zeros for rows of the base model).

        Two layouts, whichever moves fewer bytes: long sequences (``L >= r_max``, e.g. prefill) gather the
        *weights* per row (``(batch, in, r)``) and update ``y`` in place with ``baddbmm``; short ones (decode)
        gather the *rows* per adapter (``(G, m·L, in)``, see ``RoutePlan``). DoRA, bias deltas and
        training-time dropout fall back to one call per adapter."""
        live = [c for c in comps if c is not None]
        if any(
            c.magnitude is not None or c.bias is not None or (c.dropout is not None and c.training) for c in live
        ):
            return None
        ref = live[0]
        r_max = max(c.r for c in live)
        if not torch.is_grad_enabled() and y.is_contiguous():
            return cls._routed_segments(comps, plan, x.to(ref.lora_A.dtype), y)

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            in_dim, out_dim = ref.lora_A.shape[1], ref.out_dim
            zero_A, zero_B = ref.lora_A.new_zeros(r_max, in_dim), ref.lora_B.new_zeros(out_dim, r_max)
            A = [F.pad(c.lora_A, (0, 0, 0, r_max - c.r)) if c is not None else zero_A for c in comps] + [zero_A]
            B = [F.pad(c.lora_B * c.scaling, (0, r_max - c.r)) if c is not None else zero_B for c in comps]
            B.append(zero_B)
            return torch.stack(A).transpose(1, 2), torch.stack(B).transpose(1, 2)  # (G+1, in, r), (G+1, r, out)

        A, B = plan.stacked(key, build)
        x = x.to(A.dtype)
        batch, length = y.shape[0], y[0].numel() // y.shape[-1]
        if length >= r_max:  # per-row weights: no activation copies, the add fused into the second GEMM
            Ar, Br = plan.stacked(
                key, lambda: (A.index_select(0, plan.row_group), B.index_select(0, plan.row_group)), per_plan=True
            )
            h = torch.bmm(x.reshape(batch, length, -1), Ar)  # (batch, L, r_max)
            if not torch.is_grad_enabled() and y.is_contiguous() and y.dtype == h.dtype:
                y.view(batch, length, -1).baddbmm_(h, Br)
                return y
            return y + torch.bmm(h, Br).view(y.shape).to(y.dtype)
        G = len(plan.adapters)
        h = torch.bmm(plan.gather(x), A[:G])  # (G, m * L, r_max)
        return plan.scatter_bmm(y, h, B[:G])

    @staticmethod
    def _routed_segments(comps: list[Component | None], plan: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        """Routing without gradients (serving: prefill and decode): the rows of each adapter, contiguous after
        one gather (:meth:`RoutePlan.segments`), run one ``mm`` pair against that adapter's own factors, ranks
        as they are; the products land in one buffer added back with one ``index_add_`` (in place in ``y`` when
        the rows are already in order). Nothing is stacked, so nothing is rebuilt when continuous batching
        changes the batch at every step. ``x: (batch, *rest, in)``, ``y: (batch, *rest, out)``, updated in place."""
        batch, length = y.shape[0], y[0].numel() // y.shape[-1]
        seg = plan.segments(tuple(c is not None for c in comps))
        x2 = x.reshape(batch, length, -1)
        if not seg.identity:
            x2 = x2.index_select(0, seg.order)
        x2 = x2.view(-1, x2.shape[-1])  # (rows * L, in), adapter by adapter
        direct = seg.identity and y.dtype == x2.dtype
        out = y.view(-1, y.shape[-1]) if direct else x2.new_empty(x2.shape[0], y.shape[-1])
        for g, start, count in seg.spans:
            c = comps[g]
            h = torch.mm(x2.narrow(0, start * length, count * length), c.lora_A.t())  # (count * L, r)
            # beta=0: the buffer's uninitialized values are ignored (NaN included)
            out.narrow(0, start * length, count * length).addmm_(
                h, c.lora_B.t(), beta=1 if direct else 0, alpha=c.scaling
            )
        if not direct:
            y.view(batch, length, -1).index_add_(0, seg.order, out.view(-1, length, y.shape[-1]).to(y.dtype))
        return y


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` zero-padded along ``dim`` to ``size``."""
    if t.shape[dim] == size:
        return t.clone()
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_zeros(shape)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


class LoRAEmbedding(_LoRABase):
    """LoRA on ``nn.Embedding``: ``y = E[x] + s * A^T[x] B^T``.

    Shapes: ``x: (...)`` token ids, ``y: (..., dim)``, ``lora_A: (r, num_embeddings)``,
    ``lora_B: (dim, r)``. Default init follows peft: ``A = 0``, ``B ~ N(0, 1)``.
    """

    norm_dims = (0,)  # DoRA: one magnitude per embedding column

    def __init__(self, cfg: LoRA, module: nn.Module, name: str):
        num, dim = module.num_embeddings, module.embedding_dim
        r = cfg.rank_for(name)
        super().__init__(cfg, module, name, (r, num), (dim, r), (dim,))

    def _init_default(self) -> None:
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)

    def _init_random(self) -> None:
        nn.init.normal_(self.lora_A, std=0.1)

    def _gain_on_weight(self, gain: torch.Tensor) -> torch.Tensor:
        return gain.reshape(1, -1)

    def _delta(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return (B @ A).t() * self.scaling  # (num_embeddings, dim)

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.embedding(x, self.lora_A.t())  # (..., r); dropout does not apply to ids
        y = y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)
        return y if self.magnitude is None else y * self._gain().to(y.dtype)


class LoRAConv2d(_LoRABase):
    """LoRA on ``nn.Conv2d``: A is a ``kh×kw`` conv (base stride/padding/dilation), B a ``1×1`` conv.

    Shapes: ``x: (N, in, H, W)``, ``lora_A: (r, in, kh, kw)``, ``lora_B: (out, r, 1, 1)``,
    ``magnitude: (1, out, 1, 1)`` with DoRA (peft's layout).
    """

    norm_dims = (1, 2, 3)

    def __init__(self, cfg: LoRA, module: nn.Module, name: str):
        if module.groups != 1:
            raise TypeError(f"LoRA on grouped convolutions is not supported ({name!r} has groups={module.groups})")
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise TypeError(
                f"LoRA on {name!r} needs numeric zero padding (got {module.padding!r}/{module.padding_mode!r})"
            )
        r = cfg.rank_for(name)
        kh, kw = module.kernel_size
        out = module.out_channels
        super().__init__(cfg, module, name, (r, module.in_channels, kh, kw), (out, r, 1, 1), (1, out, 1, 1))
        self.conv = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}

    def _delta(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A) * self.scaling

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xd = self._drop(x)
        lora = F.conv2d(F.conv2d(xd, self.lora_A, None, **self.conv), self.lora_B) * self.scaling
        if self.magnitude is not None:
            gain = self._gain()  # (1, out, 1, 1)
            if self.dropout is not None and self.training:
                base = F.conv2d(xd, self._base.weight.to(xd.dtype), None, **self.conv).to(y.dtype)
            else:
                bias = self._base.bias
                base = y if bias is None else y - bias.view(-1, 1, 1)
            y = y + (gain - 1).to(y.dtype) * base + (gain * lora).to(y.dtype)
        else:
            y = y + lora.to(y.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype).view(-1, 1, 1)
