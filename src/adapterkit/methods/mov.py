"""MoV and MoLoRA: mixtures of (IA)^3 vectors / LoRA experts routed per token (Zadouri et al. 2024, "Pushing
Mixture of Experts to the Limit: Extremely Parameter Efficient MoE for Instruction Tuning", §2.2).

At every adapted layer a router ``W_g: (n_experts, in)`` turns each token's input ``x`` into gates
``g = softmax(W_g x)`` (soft merging, §2.2, Eq. 3-4), and the experts are mixed with them::

    MoV     (vectors E_i, (IA)^3's):   y = (Σ_i g_i E_i) ⊙ (W x)          output scaling (keys, values)
                                       y = W ((Σ_i g_i E_i) ⊙ x)          input scaling (the FFN's down projection)
    MoLoRA  (LoRAs (A_i, B_i)):        y = W x + s · Σ_i g_i B_i A_i x,   s = alpha / r

With ``top_k`` (the paper's §4 ablation of discrete routing) each token keeps its ``k`` largest gates, renormalized
to sum to one, and a load-balancing auxiliary loss (Switch Transformer, Fedus et al. 2022, §2.2:
``α · n · Σ_i f_i P_i`` with ``f_i`` the fraction of the token→expert assignments that go to expert ``i`` and ``P_i``
the mean router probability of expert ``i``; ``α = balance_coef``) is returned by ``Component.aux_loss`` (summed by
``adapters.aux_loss()``, added by the Trainer callback) from the latest training forward. Padding tokens count like
any other token (the components do not see the attention mask).

Init: experts as (IA)^3 (ones) and LoRA (A Kaiming-uniform, B = 0), so the adapted model starts as the base model;
the router ``W_g`` Kaiming-uniform as ``nn.Linear`` (a zero router would keep identical experts identical forever).
With ``n_experts=1`` there is no router (the gate is 1): the component computes exactly what (IA)^3 / LoRA compute
with the same tensors (bit for bit; tested). Not mergeable (the gates depend on the token), no per-row routing
batched path (routing falls back to one call per adapter).

Works on ``nn.Linear`` and GPT-2 ``Conv1D``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import backend_for
from ..component import Component
from ..config import AdapterConfig, register
from .ia3 import IA3

PUBLIC = ("MoV", "MoLoRA")
__all__ = ["MoV", "MoLoRA", "TokenRouter", "MoVScale", "MoLoRALinear", "balance_loss"]


def _check_mixture(cfg: Any, what: str) -> None:
    n, k = cfg.n_experts, cfg.top_k
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"{what} n_experts must be a positive integer, got {n!r}")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n):
        raise ValueError(
            f"{what} top_k must be None (soft merging) or an integer in [1, n_experts={n}], got {k!r}"
        )
    if (
        not isinstance(cfg.balance_coef, (int, float))
        or not math.isfinite(cfg.balance_coef)
        or cfg.balance_coef < 0
    ):
        raise ValueError(f"{what} balance_coef must be a finite number >= 0, got {cfg.balance_coef!r}")


def balance_loss(probs: torch.Tensor, chosen: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer's load-balancing loss ``n · Σ_i f_i P_i`` (1 when perfectly balanced).

    Args:
        probs: router probabilities ``(tokens, n)`` (with grad).
        chosen: the experts each token keeps, ``(tokens, k)`` indices.
    """
    counts = torch.zeros(n_experts, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs.device, dtype=probs.dtype))
    f = counts / chosen.numel()
    return n_experts * (f * probs.mean(dim=0)).sum()


class TokenRouter(nn.Module):
    """``W_g: (n_experts, in)``: per-token gates ``(..., n_experts)`` from inputs ``(..., in)``; softmax (soft
    merging) or top-k renormalized, recording the balance loss of the latest training forward."""

    def __init__(self, in_dim: int, n_experts: int, top_k: int | None, balance_coef: float, factory: dict) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, in_dim, **factory))
        self.n_experts, self.top_k, self.balance_coef = n_experts, top_k, float(balance_coef)
        self.last_balance: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, top_k={self.top_k}"

    @torch.no_grad()
    def reset(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(F.linear(x.to(self.weight.dtype), self.weight), dim=-1)  # (..., n)
        k = self.top_k
        if k is None or k >= self.n_experts:
            self.last_balance = None
            return probs
        top, idx = probs.topk(k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(dim=-1, keepdim=True))
        if self.training and torch.is_grad_enabled() and self.balance_coef > 0:
            flat = probs.reshape(-1, self.n_experts)
            self.last_balance = self.balance_coef * balance_loss(
                flat, idx.reshape(flat.shape[0], k), self.n_experts
            )
        else:
            self.last_balance = None
        return gates


class _Mixture(Component):
    """What MoV and MoLoRA components share: the router (absent with one expert) and the auxiliary loss."""

    router: TokenRouter | None

    def _make_router(self, cfg: Any, in_dim: int, factory: dict) -> None:
        self.router = (
            TokenRouter(in_dim, cfg.n_experts, cfg.top_k, cfg.balance_coef, factory) if cfg.n_experts > 1 else None
        )

    def aux_loss(self) -> torch.Tensor | None:
        """The load-balancing loss of the latest training forward (top-k only), or None."""
        return None if self.router is None else self.router.last_balance


@register("mov")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MoV(IA3):
    """Mixture of (IA)^3 vectors, routed per token.

    Args:
        n_experts: vectors per site (the paper uses 10-30; 1 is exactly (IA)^3).
        top_k: keep the ``k`` largest gates per token (None: soft merging of all experts, the paper's method).
        balance_coef: weight of the load-balancing auxiliary loss with ``top_k`` (0 turns it off).
        feedforward, targets, init_weights: as :class:`~adapterkit.methods.ia3.IA3` (same default sites).
    """

    n_experts: int = 4
    top_k: int | None = None
    balance_coef: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_mixture(self, "MoV")

    def build(self, module: nn.Module, name: str, *, feedforward: bool = False) -> Component:
        if not self.accepts(module):
            raise TypeError(
                f"MoV cannot act on {name!r} ({type(module).__name__}): it supports nn.Linear and Conv1D"
            )
        return MoVScale(self, module, input_side=feedforward)

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        feedforward = self._feedforward_sites(targets, select)
        return {n: self.build(modules[n], n, feedforward=n in feedforward) for n in targets}


class MoVScale(_Mixture):
    """A mixture of (IA)^3 vectors on one module: scales its output (``y' = (Σ g_i E_i) ⊙ y``) or, for the FFN's
    down projection, its input (``x' = (Σ g_i E_i) ⊙ x``). The router reads the module's input ``x``.

    Shapes: ``x: (..., in)``, ``y: (..., out)``, ``experts: (n_experts, d)`` with ``d = out`` (output side) or
    ``in`` (input side), router ``(n_experts, in)``.
    """

    def __init__(self, cfg: MoV, module: nn.Module, input_side: bool) -> None:
        super().__init__()
        in_dim, out_dim = backend_for(module).dims(module)
        weight = module.weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        self.input_side = input_side
        self.has_pre, self.has_post = input_side, not input_side
        self.experts = nn.Parameter(torch.ones(cfg.n_experts, in_dim if input_side else out_dim, **factory))
        self._make_router(cfg, in_dim, factory)
        self._random = not cfg.init_weights

    def extra_repr(self) -> str:
        side = "input" if self.input_side else "output"
        return f"{side} scaling, n_experts={self.experts.shape[0]}, size={self.experts.shape[1]}"

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        if self.router is not None:
            self.router.reset()
        if self._random:
            self.experts.copy_(1.0 + 0.2 * torch.randn_like(self.experts))

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """``Σ_i g_i E_i``: ``(..., d)``, or ``E_0`` ``(d,)`` with one expert."""
        if self.router is None:
            return self.experts[0]
        # 1 + Σ g_i (E_i - 1): equal to Σ g_i E_i since the gates sum to one, and exactly 1 where every E_i is
        # (at init), where the rounded sum of the gates is not
        return 1.0 + self.router(x) @ (self.experts - 1.0)  # (..., n) @ (n, d)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._scale(x).to(x.dtype)

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * self._scale(x).to(y.dtype)


@register("molora")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MoLoRA(AdapterConfig):
    """Mixture of LoRA experts, routed per token.

    Args:
        r: rank of every expert.
        alpha: scaling numerator, ``s = alpha / r`` (as :class:`~adapterkit.methods.lora.LoRA`).
        n_experts: LoRAs per site (1 is exactly LoRA).
        top_k: keep the ``k`` largest gates per token (None: soft merging of all experts).
        balance_coef: weight of the load-balancing auxiliary loss with ``top_k`` (0 turns it off).
        dropout: dropout probability on the experts' input.
        init_weights: False starts ``B`` random too (not an identity; for tests).
        targets: default ``["attn.q", "attn.v"]``, or ``"attn.qkv"`` on models with a fused projection.
    """

    r: int = 4
    alpha: float = 4.0
    n_experts: int = 4
    top_k: int | None = None
    balance_coef: float = 0.01
    dropout: float = 0.0
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"MoLoRA rank r must be a positive integer, got r={self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"MoLoRA alpha must be a finite number, got alpha={self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoLoRA dropout must be in [0, 1), got {self.dropout!r}")
        _check_mixture(self, "MoLoRA")

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("attn.qkv",) if "attn.q" not in roles and "attn.qkv" in roles else ("attn.q", "attn.v")

    def accepts(self, module: nn.Module) -> bool:
        backend = backend_for(module)
        return backend is not None and backend.kind == "linear"

    def build(self, module: nn.Module, name: str) -> Component:
        if not self.accepts(module):
            raise TypeError(
                f"MoLoRA cannot act on {name!r} ({type(module).__name__}): it supports nn.Linear and Conv1D"
            )
        return MoLoRALinear(self, module)


class MoLoRALinear(_Mixture):
    """A mixture of LoRA experts on a linear-like module: ``y + s Σ_i g_i B_i A_i x``.

    Shapes: ``x: (..., in)``, ``y: (..., out)``, ``lora_A: (n_experts, r, in)``, ``lora_B: (n_experts, out, r)``,
    router ``(n_experts, in)``. The experts run as one ``(n·r, in)`` matmul, gates scale the ``n·r`` hidden units,
    then one fused ``addmm`` with the ``(out, n·r)`` concatenation of the B's (with one expert: LoRA's own calls).
    """

    additive = True

    def __init__(self, cfg: MoLoRA, module: nn.Module) -> None:
        super().__init__()
        in_dim, out_dim = backend_for(module).dims(module)
        weight = module.weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        n, r = cfg.n_experts, cfg.r
        self.n, self.r, self.in_dim, self.out_dim = n, r, in_dim, out_dim
        self.scaling = cfg.alpha / r
        self.lora_A = nn.Parameter(torch.empty(n, r, in_dim, **factory))
        self.lora_B = nn.Parameter(torch.zeros(n, out_dim, r, **factory))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self._make_router(cfg, in_dim, factory)
        self._random = not cfg.init_weights

    def extra_repr(self) -> str:
        return f"n_experts={self.n}, r={self.r}, scaling={self.scaling:g}"

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        for i in range(self.n):  # each expert as LoRA's A (Kaiming-uniform over its (r, in) matrix)
            nn.init.kaiming_uniform_(self.lora_A[i], a=math.sqrt(5))
        if self._random:
            nn.init.normal_(self.lora_B, std=0.1)
        if self.router is not None:
            self.router.reset()

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xd = x if self.dropout is None else self.dropout(x)
        xd = xd if xd.dtype == self.lora_A.dtype else xd.to(self.lora_A.dtype)
        n, r = self.n, self.r
        if n == 1:
            h, B = F.linear(xd, self.lora_A[0]), self.lora_B[0]  # (..., r), (out, r): LoRA's calls
        else:
            gates = self.router(x)  # (..., n), from the undropped input
            h = F.linear(xd, self.lora_A.reshape(n * r, self.in_dim))  # (..., n·r)
            h = (h.unflatten(-1, (n, r)) * gates.unsqueeze(-1).to(h.dtype)).flatten(-2)
            B = self.lora_B.permute(1, 0, 2).reshape(self.out_dim, n * r)  # (out, n·r)
        if y.dtype != B.dtype:
            return y + (F.linear(h, B) * self.scaling).to(y.dtype)
        y2 = y.reshape(-1, self.out_dim)
        h2 = h.reshape(-1, h.shape[-1])
        return torch.addmm(y2, h2, B.t(), alpha=self.scaling).view(y.shape)
