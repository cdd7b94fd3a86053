"""VB-LoRA (Li et al. 2024, "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks").

VB-LoRA keeps LoRA's update ``ΔW = B A`` (``A: (r, in)``, ``B: (out, r)``) but stores no ``A`` or ``B``: every
sub-vector of length ``b = vector_length`` of every ``A`` and ``B`` of every adapted layer is a sparse mixture of
the vectors of ONE bank ``V: (h, b)`` (``h = num_vectors``) shared by the whole adapter, through the paper's
top-k admixture module (TKAM; the "divide-and-share" paradigm)::

    A[i, j·b:(j+1)·b]  = Σ_{s ∈ topk(ℓ_ij)} softmax_topk(ℓ_ij)_s · V_s          ℓ_ij ∈ R^h: per-site logits
    B[j·b:(j+1)·b, i]  = Σ_{s ∈ topk(ℓ'_ji)} softmax_topk(ℓ'_ji)_s · V_s
    y = W x + B A dropout(x)

        bank V (h, b) ─── shared by every site ───┐
        logits_A (r, in/b, h) ─► top-k softmax ─► A (r, in)
        logits_B (out/b, r, h) ─► top-k softmax ─► B (out, r)
        x ──────────► W ──────────┐
        │                         (+) ──► y
        └─► dropout ─► A ─► B ────┘

* Only the bank and the logits train; the top-k keeps the mixture sparse (peft's docs: k = 2 "typically provides
  the best performance and parameter efficiency"), so a trained adapter can be stored as the bank plus, per
  sub-vector, ``k`` indices and ``k − 1`` weights (``save_only_topk_weights``, written by the peft export; such an
  adapter serves and merges but cannot resume training, as in peft). Native files keep the full logits.
* Layouts, defaults, init and names follow peft 0.21's ``VBLoRAConfig``: ``logits_A: (r, in/b, h)``,
  ``logits_B: (out/b, r, h)``, bank ``U(−init_vector_bank_bound, init_vector_bank_bound)`` (0.02), logits
  ``N(0, init_logits_std²)`` (0.1); ``r=4, num_vectors=256, vector_length=256, topk=2``. peft files convert by
  renaming keys (``formats/peft_vblora.py``).
* Not an identity at init (neither in the paper nor in peft, which has no zero init for VB-LoRA): ``A`` and ``B``
  are both mixtures of the same small random bank, so the initial ``ΔW`` is small (entries ~1e-4 at the defaults)
  but not zero. ``init_vector_bank_bound=0`` makes it exactly the base model, but then nothing gets a gradient
  (peft's tests use a zero bank for their identity checks; decision recorded in DEVELOPERS.md).
* The bank is a :class:`~adapterkit.component.Bank` every component of the adapter shares (saved once, by the
  first site). ``A`` and ``B`` are built once per forward per site (and reused without gradients while the
  parameters are unchanged), never per row; routed mixed batches stack each adapter's ``A``/``B`` once.
* Mergeable: ``ΔW = B A`` in the canonical ``(out, in)`` layout.

Works on ``nn.Linear`` and GPT-2 ``Conv1D``; every adapted layer's input and output sizes must be multiples of
``vector_length``.
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
from ..component import Bank, Component
from ..config import AdapterConfig, register

PUBLIC = ("VBLoRA",)
__all__ = ["VBLoRA", "VectorBank", "VBLoRALinear", "mix", "topk_state", "logits_from_topk", "index_dtype"]

_LOGITS = ("logits_A", "logits_B")


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """The top-k softmax mixture of bank vectors (the paper's TKAM; peft's ``_get_low_rank_matrix``).

    Shapes: ``logits: (..., h)``, ``bank: (h, b)`` -> ``(..., b)``."""
    values, indices = logits.topk(topk, dim=-1)  # (..., k)
    weights = torch.softmax(values, dim=-1)
    return (weights.unsqueeze(-1) * bank[indices]).sum(-2)


def index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer dtype peft stores top-k indices in for a bank of ``num_vectors``."""
    if num_vectors < 2**8:
        return torch.uint8
    if num_vectors < 2**15:
        return torch.int16
    if num_vectors < 2**31:
        return torch.int32
    return torch.int64


def topk_state(logits: torch.Tensor, topk: int, num_vectors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``save_only_topk_weights``' form of ``logits: (..., h)``: the top-k indices ``(..., k)`` (in
    :func:`index_dtype`) and the first ``k − 1`` softmax weights ``(..., k − 1)`` (the last is ``1 − Σ``), as peft
    writes them."""
    values, indices = logits.detach().topk(topk, dim=-1)
    weights = torch.softmax(values, dim=-1)[..., :-1].contiguous()
    return indices.to(index_dtype(num_vectors)), weights


def logits_from_topk(indices: torch.Tensor, weights: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """Inverse of :func:`topk_state` up to the mixture it gives: ``log w`` at the kept indices, ``−inf`` elsewhere
    (peft's ``_remap_adapter_state_dict_for_load``). ``indices: (..., k)``, ``weights: (..., k − 1)`` ->
    ``(..., h)`` float32."""
    w = weights.float()
    w = torch.cat([w, 1 - w.sum(-1, keepdim=True)], dim=-1)
    out = torch.full((*w.shape[:-1], num_vectors), float("-inf"), device=w.device)
    return out.scatter(-1, indices.long(), torch.log(w))


def _sole_owner(y: torch.Tensor) -> torch.Tensor | None:
    """The tensor whose storage ``y`` is exactly (itself, or the base of a whole-tensor view such as
    ``F.linear``'s 3-D output with a bias), when accumulating into it in place is safe for autograd: a non-leaf (or a
    tensor that needs no gradient), contiguous, covering the same elements. None otherwise."""
    owner = y if y._base is None else y._base
    if owner._base is not None or not owner.is_contiguous() or owner.numel() != y.numel():
        return None
    if owner.storage_offset() != y.storage_offset() or (owner.is_leaf and owner.requires_grad):
        return None
    return owner


class _AddLowRank(torch.autograd.Function):
    """``y += h Bᵀ`` in place for a layer output ``y`` nothing else holds (a site's first post sees the module's
    fresh output; no linear layer saves its output for backward, and autograd's version check would refuse a
    backward if something had).

    An out-of-place ``addmm`` first copies ``y`` (one read and one write of the whole ``(tokens, out)`` output per
    site and step) and peft's ``y + B(A x)`` reads two such tensors and writes a third; accumulating into ``y`` saves
    those passes. Shapes: ``y: (tokens·…, out)`` in any shape with that many elements, ``h: (tokens, r)``,
    ``B: (out, r)``."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, B)
        y.view(-1, B.shape[0]).addmm_(h, B.t())
        ctx.mark_dirty(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        h, B = ctx.saved_tensors
        g = grad.reshape(-1, B.shape[0])
        grad_h = g @ B if ctx.needs_input_grad[1] else None  # (tokens, r)
        grad_B = g.t() @ h if ctx.needs_input_grad[2] else None  # (out, r)
        return grad, grad_h, grad_B


@register("vblora")
@dataclasses.dataclass(frozen=True, kw_only=True)
class VBLoRA(AdapterConfig):
    """VB-LoRA of linear-like modules: every sub-vector of every ``A`` and ``B`` is a top-k mixture of one
    adapter-wide vector bank.

    Args:
        r: rank of ``A`` and ``B`` (peft's default 4).
        num_vectors: vectors in the bank (``h``; 256); peft's docs advise more for larger models.
        vector_length: length ``b`` of each bank vector (256); must divide the input and output size of every
            adapted layer.
        topk: vectors mixed per sub-vector (``k``, 1 ≤ k ≤ num_vectors; 2 as peft and the paper advise).
        save_only_topk_weights: peft exports store each sub-vector's top-k indices and ``k − 1`` weights instead
            of its logits (much smaller files; loaded back, by peft or by us, the adapter serves and merges but
            refuses to train). Native files always keep the full logits (they are what training resumes from).
        dropout: dropout probability on the VB-LoRA branch input (peft's ``vblora_dropout``).
        init_vector_bank_bound: the bank starts ``U(−bound, bound)`` (0.02; 0 gives an exact identity with no
            gradients, which peft warns against).
        init_logits_std: the logits start ``N(0, std²)`` (0.1).
        init_weights: False starts the bank ``U(−0.5, 0.5)`` and the logits ``N(0, 1)`` (far from the base model;
            for tests). True follows peft.
        targets: default ``["attn.q", "attn.v"]`` (peft's mapping for LLaMA/BERT), or ``"attn.qkv"`` on models
            with a fused projection (GPT-2).
    """

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    save_only_topk_weights: bool = False
    dropout: float = 0.0
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("r", "num_vectors", "vector_length", "topk"):
            if not _positive_int(getattr(self, field)):
                raise ValueError(
                    f"VBLoRA {field} must be a positive integer, got {field}={getattr(self, field)!r}"
                )
        if self.topk > self.num_vectors:
            raise ValueError(
                f"VBLoRA topk={self.topk} exceeds num_vectors={self.num_vectors}: a sub-vector mixes at most every "
                "vector of the bank; lower topk or raise num_vectors"
            )
        if not isinstance(self.save_only_topk_weights, bool):
            raise ValueError(
                f"VBLoRA save_only_topk_weights must be True or False, got {self.save_only_topk_weights!r}"
            )
        if not _number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VBLoRA dropout must be in [0, 1), got dropout={self.dropout!r}")
        for field in ("init_vector_bank_bound", "init_logits_std"):
            value = getattr(self, field)
            if not _number(value) or value < 0:
                raise ValueError(f"VBLoRA {field} must be a non-negative number, got {field}={value!r}")

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("attn.qkv",) if "attn.q" not in roles and "attn.qkv" in roles else ("attn.q", "attn.v")

    def accepts(self, module: nn.Module) -> bool:
        backend = backend_for(module)
        return backend is not None and backend.kind == "linear"

    def check_site(self, module: nn.Module, name: str) -> None:
        """Raise naming ``name`` when VB-LoRA cannot act on ``module`` (type, or sizes not multiples of
        ``vector_length``)."""
        if not self.accepts(module):
            raise TypeError(
                f"VBLoRA cannot act on {name!r} ({type(module).__name__}): it supports nn.Linear and Conv1D"
            )
        in_dim, out_dim = backend_for(module).dims(module)
        bad = [
            f"{what} size {n}" for what, n in (("input", in_dim), ("output", out_dim)) if n % self.vector_length
        ]
        if bad:
            common = math.gcd(in_dim, out_dim)
            raise ValueError(
                f"VBLoRA vector_length={self.vector_length} does not divide the {' and '.join(bad)} of {name!r} "
                f"({type(module).__name__} {in_dim} -> {out_dim}): every sub-vector of A and B is one bank vector "
                f"long; pick a vector_length that divides both (a divisor of {common}) or leave {name!r} out of "
                "targets"
            )

    def bank_for(self, modules: Sequence[nn.Module]) -> VectorBank:
        """A new bank for components on ``modules`` (on the first one's device, in its weight's dtype)."""
        weight = modules[0].weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        return VectorBank(self, weight.device, dtype)

    def build(self, module: nn.Module, name: str, bank: VectorBank | None = None) -> Component:
        """The component for ``module``; ``bank`` is the adapter's shared one (default: a bank of its own)."""
        self.check_site(module, name)
        return VBLoRALinear(self, module, bank if bank is not None else self.bank_for([module]))

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        for n in targets:
            self.check_site(modules[n], n)  # every refusal before any bank is drawn
        if not targets:
            return {}
        bank = self.bank_for([modules[n] for n in targets])
        return {n: self.build(modules[n], n, bank) for n in targets}


class VectorBank(Bank):
    """The vector bank ``vector_bank: (num_vectors, vector_length)`` shared by every site of one VB-LoRA adapter
    (peft's ``base_model.vblora_vector_bank``). Drawn ``U(−bound, bound)`` when built."""

    def __init__(
        self, cfg: VBLoRA, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.vector_bank = nn.Parameter(
            torch.empty(cfg.num_vectors, cfg.vector_length, device=device, dtype=dtype)
        )
        bound = float(cfg.init_vector_bank_bound) if cfg.init_weights else 0.5
        with torch.no_grad():
            nn.init.uniform_(self.vector_bank, -bound, bound)

    def extra_repr(self) -> str:
        h, b = self.vector_bank.shape
        return f"num_vectors={h}, vector_length={b}"


class VBLoRALinear(Component):
    """VB-LoRA on a linear-like module: ``y + B A dropout(x)`` with ``A``, ``B`` mixed from the shared bank.

    Shapes: ``x: (..., in)``, ``y: (..., out)``, ``logits_A: (r, in/b, h)``, ``logits_B: (out/b, r, h)``,
    ``bank.vector_bank: (h, b)``; factors ``A: (r, in)``, ``B: (out, r)``.
    """

    mergeable = True
    additive = True

    def __init__(self, cfg: VBLoRA, module: nn.Module, bank: VectorBank) -> None:
        super().__init__()
        in_dim, out_dim = backend_for(module).dims(module)
        h, b = bank.vector_bank.shape
        if (h, b) != (cfg.num_vectors, cfg.vector_length) or in_dim % b or out_dim % b:
            raise ValueError(
                f"VBLoRA bank {(h, b)} does not fit a ({out_dim}, {in_dim}) weight with num_vectors="
                f"{cfg.num_vectors}, vector_length={cfg.vector_length}"
            )
        self.in_dim, self.out_dim, self.r, self.topk, self.num_vectors = in_dim, out_dim, cfg.r, cfg.topk, h
        factory = {"device": bank.vector_bank.device, "dtype": bank.vector_bank.dtype}
        self.logits_A = nn.Parameter(torch.zeros(cfg.r, in_dim // b, h, **factory))
        self.logits_B = nn.Parameter(torch.zeros(out_dim // b, cfg.r, h, **factory))
        self.share(bank, "bank")
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self._std = float(cfg.init_logits_std) if cfg.init_weights else 1.0
        self._topk_only = False  # logits rebuilt from top-k weights (−inf elsewhere): serve and merge, never train

    def extra_repr(self) -> str:
        return f"r={self.r}, in={self.in_dim}, out={self.out_dim}, topk={self.topk}"

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        """peft's ``reset_vblora_logits``: both logits ``N(0, init_logits_std²)`` (the bank is drawn when built)."""
        nn.init.normal_(self.logits_A, 0.0, self._std)
        nn.init.normal_(self.logits_B, 0.0, self._std)

    def _trainable(self) -> tuple[nn.Parameter, ...]:
        return (self.logits_A, self.logits_B, self.bank.vector_bank)

    # --- the factors ------------------------------------------------------------------------------------------
    def _build(self) -> tuple[torch.Tensor, torch.Tensor]:
        bank = self.bank.vector_bank
        A = mix(self.logits_A, bank, self.topk).reshape(self.r, self.in_dim)  # (r, in/b, b) -> (r, in)
        # (out/b, r, b) -> (out/b, b, r) -> (out, r)
        B = mix(self.logits_B, bank, self.topk).transpose(1, 2).reshape(self.out_dim, self.r)
        return A, B

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A: (r, in)`` and ``B: (out, r)``: built from the bank on every call that records gradients (training),
        reused without gradients while the logits and the bank are unchanged (same storage and version, and no
        grad-enabled forward since: fused optimizers update parameters without bumping their versions)."""
        if self._topk_only and torch.is_grad_enabled() and any(p.requires_grad for p in self._trainable()):
            raise RuntimeError(
                "this VB-LoRA adapter was loaded from a save_only_topk_weights file (only the top-k weights of each "
                "sub-vector were kept, the other logits are -inf), so it can serve and merge but not train; load a "
                "file with full logits (a native save of the trained adapter) to resume training"
            )
        if torch.is_grad_enabled():
            # a training forward: an optimizer may update the parameters next without bumping their versions
            # (fused AdamW), so nothing cached before it may be reused after it
            self.__dict__.pop("_factor_cache", None)
            return self._build()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self._trainable())
        cached = self.__dict__.get("_factor_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        value = self._build()
        object.__setattr__(self, "_factor_cache", (key, value))
        return value

    # --- forward ----------------------------------------------------------------------------------------------
    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        A, B = self.factors()
        x = x if self.dropout is None else self.dropout(x)
        h = F.linear(x if x.dtype == A.dtype else x.to(A.dtype), A)  # (..., r)
        if y.dtype != B.dtype or not y.is_contiguous():
            return y + F.linear(h, B).to(y.dtype)
        h2 = h.reshape(-1, self.r)
        if not torch.is_grad_enabled():
            return y.view(-1, self.out_dim).addmm_(h2, B.t()).view(y.shape)
        owner = _sole_owner(y)
        if owner is None:  # one fused GEMM: y + h @ Bᵀ (a copy of y, then accumulated into)
            return torch.addmm(y.reshape(-1, self.out_dim), h2, B.t()).view(y.shape)
        # accumulated into y's own storage: no copy of the layer's output (see _AddLowRank)
        return _AddLowRank.apply(owner, h2, B).view(y.shape)

    def delta_weight(self, module: nn.Module) -> torch.Tensor:
        """``B A``: ``(out, in)``."""
        with torch.no_grad():
            A, B = self._build()
        return B @ A

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: torch.Tensor, key: Any) -> Any:
        """Per-row routing: each adapter's ``A`` and ``B`` built once for the batch and stacked as ``(G, in, R)`` and
        ``(G, R, out)`` (``R`` the largest rank, zero-padded; adapters absent from this site are zeros), then two
        batched matmuls over the gathered rows. Training-time dropout falls back to one call per adapter."""
        live = [c for c in comps if c is not None]
        if any(c.dropout is not None and c.training for c in live):
            return None
        ref = live[0]
        R = max(c.r for c in live)

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            dtype, device = ref.logits_A.dtype, ref.logits_A.device
            At, Bt = [], []
            for c in comps:
                if c is None:
                    At.append(torch.zeros(ref.in_dim, R, dtype=dtype, device=device))
                    Bt.append(torch.zeros(R, ref.out_dim, dtype=dtype, device=device))
                    continue
                A, B = c.factors()
                At.append(F.pad(A, (0, 0, 0, R - c.r)).T)
                Bt.append(F.pad(B, (0, R - c.r)).T)
            return torch.stack(At), torch.stack(Bt)  # (G, in, R), (G, R, out)

        At, Bt = plan.stacked(key, build)
        h = torch.bmm(plan.gather(x.to(At.dtype)), At)  # (G, m * L, R)
        return plan.scatter_bmm(y, h, Bt)

    # --- saving -----------------------------------------------------------------------------------------------
    def topk_state(self) -> dict[str, torch.Tensor]:
        """``save_only_topk_weights``' form of the logits: ``logits_X_topk_indices: (..., k)`` and
        ``logits_X_topk_weights: (..., k − 1)`` for X in A, B (peft's file form; the bank is not included)."""
        state: dict[str, torch.Tensor] = {}
        for name in _LOGITS:
            indices, weights = topk_state(getattr(self, name), self.topk, self.num_vectors)
            state[f"{name}_topk_indices"], state[f"{name}_topk_weights"] = indices, weights
        return state

    def import_state(self, state: dict[str, torch.Tensor], module: nn.Module) -> None:
        """Inverse of :meth:`export_state`; also accepts the logits' top-k form (:meth:`topk_state`), rebuilt as
        ``log w`` at the kept indices and ``−inf`` elsewhere. Logits with ``−inf`` entries (rebuilt here or saved so)
        make the component refuse to train."""
        state = dict(state)
        topk_only = False
        for name in _LOGITS:
            ik, wk = f"{name}_topk_indices", f"{name}_topk_weights"
            if ik not in state and wk not in state:
                continue
            if ik not in state or wk not in state or name in state:
                given = sorted(k for k in (name, ik, wk) if k in state)
                raise ValueError(f"{name} needs either itself or both {ik!r} and {wk!r}, got {given}")
            indices, weights = state.pop(ik), state.pop(wk)
            rows = tuple(getattr(self, name).shape[:-1])
            if tuple(indices.shape) != (*rows, self.topk) or tuple(weights.shape) != (*rows, self.topk - 1):
                raise ValueError(
                    f"shape mismatch for {name}'s top-k form: indices {tuple(indices.shape)} and weights "
                    f"{tuple(weights.shape)}, expected {(*rows, self.topk)} and {(*rows, self.topk - 1)} (topk="
                    f"{self.topk})"
                )
            if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
                raise ValueError(f"{ik!r} is {indices.dtype}; top-k indices are integers")
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_vectors):
                raise ValueError(f"{ik!r} holds indices outside the bank's [0, {self.num_vectors})")
            state[name] = logits_from_topk(indices, weights, self.num_vectors)
            topk_only = True
        super().import_state(state, module)
        self._topk_only = topk_only or bool(torch.isinf(self.logits_A).any() or torch.isinf(self.logits_B).any())
