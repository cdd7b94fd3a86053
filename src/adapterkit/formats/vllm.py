"""Export for vLLM's ``--lora-modules`` (and LoRAX): a plain peft LoRA directory vLLM accepts, or a refusal that
names every module it cannot take and why.

vLLM serves LoRA only (``--enable-lora``). What it reads from a peft directory, from its source
(``vllm/lora/peft_helper.py`` ``PEFTHelper``, ``vllm/lora/lora_model.py`` ``LoRAModel.from_local_checkpoint``,
``vllm/lora/utils.py`` ``parse_fine_tuned_lora_name``, ``vllm/config/lora.py``; read 2026-12):

=============================  ===================================================================================
constraint                     what this module does
=============================  ===================================================================================
``--max-lora-rank`` is one of  one rank ``r >= 8`` of :data:`MAX_LORA_RANKS` for every module: factors are
``1 8 16 32 64 128 256 320``   zero-padded (``A' = [A; 0]``, ``B' = [B, 0]``, so ``B' A' = B A``: outputs unchanged)
``512``; ``r <= max``          and ``lora_alpha`` is set so that ``lora_alpha / r`` is the adapter's scaling
``use_dora`` must be false     DoRA and every other mergeable method (LoHa, LoKr, VeRA, (IA)^3, OFT, RoAd, unions):
                               truncated SVD of the module's weight change ``ΔW`` at ``rank`` (Eckart-Young: the
                               best rank-``rank`` approximation), with ``||ΔW - s B A||_F / ||ΔW||_F`` reported
``modules_to_save`` null       adapter-owned head copies are refused
``bias`` ``"none"``, no        bias deltas (LoRA ``bias="lora_only"/"all"``, BitFit, (IA)^3 output scaling of a
``lora_bias``                  module with a bias) are refused: a LoRA file has no bias term vLLM reads
tensor keys end in             the only keys written (``base_model.model.<module path>.lora_A.weight``, ...); no
``lora_A.weight``/``lora_B.    ``lora_magnitude_vector``, no ``base_layer.bias``
weight``/``lora_embedding_A``
/``_B``
LoRA layers exist for linear   ``nn.Linear``/GPT-2 ``Conv1D`` modules, the input embedding (``lora_embedding_A:
layers, the input embedding    (r, vocab)``, vocab = the model config's ``vocab_size``: vLLM checks it) and the
and ``lm_head``                output projection; Conv2d, position embeddings, norms and the rest are refused
``rank_pattern``/              not written: older vLLM releases read neither, so a file with one rank and one
``alpha_pattern``              scaling means the same to every version; per-module scalings are folded into ``B``
``use_rslora``                 always false: ``lora_alpha = s · r`` holds the scaling (vLLM versions before
                               ``PEFTHelper`` ignored ``use_rslora``)
=============================  ===================================================================================

Methods that do not change weights (prompt and prefix tuning, bottleneck adapters, LoReFT, fusion) have no LoRA
form and are refused (serve them with ``adapterkit serve``). PiSSA/OLoRA adapters are exported as peft converts
them (``[A; A0]``, ``[B, -B0]``, a plain LoRA on the original weights).

:func:`vllm_check` validates any peft directory against the same constraints.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backends import backend_for
from ..component import Component
from ..merging import svd_factorize
from ..methods.lora import LoRAEmbedding, LoRALinear
from ..targeting import base_modules
from .io import read_json, read_tensors
from .peft import PREFIX, adapter_task_type, write

__all__ = [
    "MAX_LORA_RANKS",
    "REPORT",
    "VllmExportError",
    "ModuleExport",
    "VllmExport",
    "allowed_rank",
    "truncated_svd",
    "export",
    "vllm_check",
]

MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's ``--max-lora-rank`` accepts (``MaxLoRARanks`` in ``vllm/config/lora.py``). Older releases
offered fewer (``possible_max_ranks``: 8-64, then 8-256, then also 320 and 512; 1 came last), so 320 and 512 need a
recent vLLM, and :func:`allowed_rank` never picks 1."""
REPORT = "vllm_export.json"
"""The report written next to the adapter: export rank, scaling and, per module, the rank and relative error."""
DEFAULT_RANK = 16  # vLLM's default --max-lora-rank: the SVD rank of methods whose config has no ``r``
_INITS_VLLM_TAKES = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # PEFTHelper._init_is_supported
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
# architectures whose vLLM implementation has no LoRA support (no LoRA mark in vLLM's supported-models table of
# v0.4-v0.7, no SupportsLoRA in its gpt2.py)
_NO_VLLM_LORA = {"GPT2LMHeadModel": "GPT-2"}


class VllmExportError(ValueError):
    """The adapter (or some of its modules) cannot be served by vLLM.

    Attributes:
        refusals: module path (or ``"<adapter>"``) -> the reason vLLM cannot take it.
    """

    def __init__(self, adapter: str, refusals: dict[str, str]) -> None:
        self.refusals = dict(refusals)
        lines = "\n".join(f"  {site}: {why}" for site, why in refusals.items())
        n = len(refusals)
        super().__init__(
            f"adapter {adapter!r} cannot be exported for vLLM; {n} module{'s' if n != 1 else ''} refused:\n{lines}"
        )


@dataclass
class ModuleExport:
    """One exported module.

    Attributes:
        module: module path in the model (the file's key is ``base_model.model.<module>.lora_*``).
        source: what it was (``"lora r=8"``, ``"dora r=8"``, ``"loha"``, ...).
        conversion: ``"pad"`` (LoRA factors, zero-padded: exact) or ``"svd"`` (truncated SVD of ΔW).
        rank: rank of the factors before zero padding to the file's ``r`` (the SVD truncation rank).
        error: ``||ΔW - s B A||_F / ||ΔW||_F`` of the written factors (0 when ΔW = 0).
    """

    module: str
    source: str
    conversion: str
    rank: int
    error: float


@dataclass
class VllmExport:
    """What :func:`export` wrote.

    Attributes:
        adapter: the adapter's name; method: its registered method.
        rank: ``r`` in the file (one of :data:`MAX_LORA_RANKS`): serve with ``--max-lora-rank >= rank``.
        lora_alpha: ``lora_alpha`` in the file; ``lora_alpha / rank`` is the scaling of every module.
        modules: one entry per exported module.
        notes: how to serve it, and what vLLM may still refuse that the file cannot settle (architecture,
            LoRA on ``lm_head``/``embed_tokens``, ranks only recent releases offer).
    """

    adapter: str
    method: str
    rank: int
    lora_alpha: float
    modules: list[ModuleExport]
    notes: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((m.error for m in self.modules), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "method": self.method,
            "target": "vllm",
            "r": self.rank,
            "lora_alpha": self.lora_alpha,
            "scaling": self.lora_alpha / self.rank,
            "max_lora_rank_choices": list(MAX_LORA_RANKS),
            "max_relative_error": self.max_error,
            "modules": [asdict(m) for m in self.modules],
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """A text table: module, source, conversion, rank -> file rank, relative error."""
        head = ("module", "source", "conversion", "rank", "relative error")
        rows = [
            (m.module, m.source, m.conversion, f"{m.rank} -> {self.rank}", f"{m.error:.3g}") for m in self.modules
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def allowed_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` choice of vLLM that is ``>= rank``, but at least 8: rank 1 is the newest
    choice, and padding a rank-1 adapter to 8 (free: vLLM sizes its LoRA slots by ``--max-lora-rank`` anyway)
    keeps the file loadable by every release.

    Raises:
        ValueError: ``rank`` is not a positive integer or exceeds vLLM's largest choice (512).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"the LoRA rank must be a positive integer, got {rank!r}")
    for choice in MAX_LORA_RANKS:
        if choice >= max(rank, 8):
            return choice
    raise ValueError(
        f"rank {rank} exceeds vLLM's largest --max-lora-rank ({MAX_LORA_RANKS[-1]}): pass --rank "
        f"{MAX_LORA_RANKS[-1]} or less (modules above it are truncated by SVD, with the error reported)"
    )


# --- what one module becomes -------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """One module on its way to the file: ``ΔW ≈ scaling · B A`` in the layout ``M`` of the file (linear: ``(out,
    in)``; embedding: ``(dim, vocab)``, the transpose of the canonical ``(vocab, dim)`` weight)."""

    site: str
    source: str
    embedding: bool
    A: torch.Tensor | None = None  # (k, in) exact LoRA factors, or None: factorize ``delta``
    B: torch.Tensor | None = None  # (out, k)
    scaling: float = 1.0
    delta: torch.Tensor | None = None  # M, float64 (only for SVD conversions)
    dtype: torch.dtype = torch.float32
    conv1d: bool = False

    def reference(self) -> torch.Tensor:
        """The module's ΔW in the file layout, float64."""
        if self.delta is not None:
            return self.delta
        return (self.B.double() @ self.A.double()) * self.scaling


def _pissa_factors(comp: Component) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors on the *original* weight: PiSSA/OLoRA keep ``W - s B0 A0`` as the base while attached, so
    the change to the original weight is ``s (B A - B0 A0) = s [B, -B0] [A; A0]`` (peft's conversion)."""
    A, B = comp.lora_A.detach(), comp.lora_B.detach()
    if hasattr(comp, "init_A"):
        A, B = torch.cat([A, comp.init_A], dim=0), torch.cat([B, -comp.init_B], dim=1)
    return A, B


def _scratch(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` with its own float64 copies of its parameters and no children (no adapter
    container): merging a component into it computes the merged weight without touching the model."""
    clone = copy.copy(module)
    clone._parameters = {
        k: None if v is None else nn.Parameter(v.detach().to(torch.float64, copy=True), requires_grad=False)
        for k, v in module._parameters.items()
    }
    clone._buffers = dict(module._buffers)
    clone._modules = {}
    return clone


def _weight_change(comp: Component, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ΔW, Δb)`` of a mergeable component, float64, ΔW in the backend's canonical layout.

    A copy of the component is merged into (or, when the adapter is merged, unmerged from) a scratch copy of the
    module, and the merged weight compared with the unmerged one; for PiSSA/OLoRA the reference is the weight
    before attach (``_original``). Neither the model nor the component changes, so forwards may run meanwhile.

    Raises:
        TypeError, ValueError: the component refuses to merge (e.g. (IA)^3 with a zero scale).
    """
    backend = backend_for(module)
    scratch = _scratch(module)
    work = copy.deepcopy(comp, {id(module): scratch})  # DoRA's reference to its module -> the scratch copy

    def state(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = getattr(m, "bias", None)
        w = backend.read(m).detach().double().clone()
        return w, bias.detach().double().clone() if isinstance(bias, torch.Tensor) else None

    if comp.merged:
        w1, b1 = state(module)
        work.unmerge(scratch)
        w0, b0 = state(scratch)
    else:
        w0, b0 = state(module)
        work.check_merge(scratch)
        work.merge(scratch)
        w1, b1 = state(scratch)
    original = getattr(comp, "_original", None)
    if original is not None:
        w0 = original.detach().double()
    return w1 - w0, None if b0 is None else b1 - b0


def _source(comp: Component, method: str) -> str:
    if isinstance(comp, (LoRALinear, LoRAEmbedding)):
        kind = "dora" if comp.magnitude is not None else method
        return f"{kind} r={comp.r}"
    return method


def _plan_site(
    site: str, kind: str, comp: Component, module: nn.Module, model: nn.Module, method: str
) -> _Plan | str:
    """What module ``site`` becomes, or the reason vLLM cannot take it."""
    if kind == "head":
        return (
            "a trained copy of the whole module (peft's modules_to_save); vLLM only accepts modules_to_save: null "
            "(PEFTHelper: 'vLLM only supports modules_to_save being None')"
        )
    if not comp.mergeable:
        return (
            f"{method} puts a {type(comp).__name__} here, which is not a weight change (not mergeable), so it has "
            "no LoRA form; vLLM serves LoRA weight deltas only (serve this adapter with `adapterkit serve`)"
        )
    backend = backend_for(module)
    if backend is None or backend.kind == "conv2d":
        return f"a {type(module).__name__}: vLLM has LoRA layers for linear layers and the input embedding only"
    embedding = backend.kind == "embedding"
    if embedding:
        token_embedding = _embeddings(model, input=True)
        if token_embedding is None:
            return (
                f"an embedding of a {type(model).__name__}, which does not name its token embedding "
                "(get_input_embeddings); vLLM puts LoRA on the token embedding (embed_tokens) only"
            )
        if module is not token_embedding:
            return (
                f"an embedding other than the input embedding ({type(module).__name__}); vLLM puts LoRA on the "
                "token embedding (embed_tokens) only"
            )
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and module.num_embeddings != vocab:
            return (
                f"the embedding has {module.num_embeddings} rows but the model config's vocab_size is {vocab}; vLLM "
                "requires lora_embedding_A to have vocab_size columns"
            )
    conv1d = type(module).__name__ == "Conv1D"
    source = _source(comp, method)
    if isinstance(comp, (LoRALinear, LoRAEmbedding)) and comp.magnitude is None:
        if comp.bias is not None:
            return (
                "a LoRA bias delta (bias='lora_only' or 'all'); vLLM refuses adapter biases (bias must be 'none')"
            )
        A, B = _pissa_factors(comp)
        return _Plan(site, source, embedding, A=A, B=B, scaling=float(comp.scaling), dtype=A.dtype, conv1d=conv1d)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return (
            f"the base weight is not a float tensor ({getattr(weight, 'dtype', None)}): its ΔW cannot be computed"
        )
    try:
        dw, db = _weight_change(comp, module)
    except (TypeError, ValueError) as e:
        return f"its weight change cannot be computed: {e}"
    if db is not None and bool((db != 0).any()):
        return (
            f"{source} changes the module's bias too (max |Δb| = {db.abs().max().item():.3g}); a LoRA file has no "
            "bias term vLLM reads"
        )
    return _Plan(site, source, embedding, delta=dw.t() if embedding else dw, conv1d=conv1d)


def truncated_svd(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``k`` factors ``A: (k, n)``, ``B: (m, k)`` with ``B A ≈ M: (m, n)`` (zero rows/columns past
    ``min(m, n)``).

    The best approximation (Eckart-Young) from the exact SVD (:func:`adapterkit.merging.svd_factorize`), except
    for large matrices truncated far below their size (``min(m, n) >= 512`` and ``k + 10 <= min(m, n) / 2``):
    there a randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4: ``k + 10`` samples, 6 power iterations,
    seeded, so the export is reproducible and the global RNG untouched) costs ``O(mnk)`` instead of
    ``O(mn min(m, n))``. Its error is within a hair of the optimum; the error reported is always measured on the
    factors written.
    """
    n = min(M.shape)
    q = k + 10
    if n < 512 or 2 * q > n:
        return svd_factorize(M, k, full_matrices=False)
    with torch.random.fork_rng(devices=[M.device] if M.device.type == "cuda" else []):
        torch.manual_seed(0)
        U, S, V = torch.svd_lowrank(M, q=q, niter=6)
    return V[:, :k].t().contiguous(), U[:, :k] * S[:k]


def _embeddings(model: nn.Module, *, input: bool) -> nn.Module | None:
    """The model's input (or output) embedding module, None for models that do not say (not transformers)."""
    get = getattr(model, "get_input_embeddings" if input else "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _default_rank(cfg: Any) -> int:
    r = getattr(cfg, "r", None)
    pattern = getattr(cfg, "rank_pattern", None) or {}
    ranks = [v for v in [r, *pattern.values()] if isinstance(v, int) and not isinstance(v, bool)]
    return max(ranks) if ranks else DEFAULT_RANK


def _pad(A: torch.Tensor, B: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``A: (k, in)`` to ``(r, in)`` and ``B: (out, k)`` to ``(out, r)``: ``B' A' = B A`` exactly."""
    k = A.shape[0]
    if k < r:
        A = torch.cat([A, A.new_zeros(r - k, A.shape[1])], dim=0)
        B = torch.cat([B, B.new_zeros(B.shape[0], r - k)], dim=1)
    return A.contiguous(), B.contiguous()


def _relative_error(reference: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> float:
    norm = torch.linalg.matrix_norm(reference).item()
    residual = torch.linalg.matrix_norm(reference - (B.double() @ A.double()) * scaling).item()
    return residual / norm if norm > 0 else residual


def _formatted_alpha(alpha: float) -> float | int:
    return int(alpha) if float(alpha).is_integer() else alpha


# --- export ---------------------------------------------------------------------------------------------------
def export(
    ctl: Any, name: str, path: str | os.PathLike, *, rank: int | None = None, report: bool = True
) -> VllmExport:
    """Write adapter ``name`` as a peft LoRA directory that vLLM's ``--lora-modules`` (and LoRAX) accept.

    Args:
        ctl: the :class:`~adapterkit.Adapters` holding the adapter.
        name: the adapter.
        path: output directory (``adapter_config.json``, ``adapter_model.safetensors`` and, with ``report``,
            :data:`REPORT`).
        rank: the largest rank of any module. LoRA modules of rank ``<= rank`` are zero-padded (exact), larger ones
            and every converted method (DoRA, LoHa, LoKr, VeRA, (IA)^3, ...) are truncated SVDs of their ΔW at
            ``rank``. None: LoRA modules keep their rank; conversions use the adapter's ``r`` (its largest
            ``rank_pattern`` value), or 16 when its config has none. The file's ``r`` is the smallest vLLM
            ``--max-lora-rank`` choice >= the largest module rank (:func:`allowed_rank`).
        report: also write :data:`REPORT` (the returned report as JSON).

    Returns:
        The export report (:class:`VllmExport`; ``table()`` formats it).

    Raises:
        VllmExportError: some modules cannot be served by vLLM (each named with the reason); nothing is written.
        ValueError: ``rank`` is not a positive integer or exceeds 512.
    """
    if rank is not None:
        allowed_rank(rank)  # validates
    cfg = ctl.config(name)
    method = str(cfg.method)
    kinds = ctl.sites(name)
    comps = ctl.components(name)
    modules = base_modules(ctl.model)
    plans: list[_Plan] = []
    refusals: dict[str, str] = {}
    for site, comp in comps.items():
        planned = _plan_site(site, kinds[site], comp, modules[site], ctl.model, method)
        if isinstance(planned, str):
            refusals[site] = planned
        else:
            plans.append(planned)
    if not plans and not refusals:
        refusals["<adapter>"] = f"adapter {name!r} ({method}) has no modules"
    if refusals:
        raise VllmExportError(name, refusals)

    svd_rank = rank if rank is not None else _default_rank(cfg)
    ranks = {}
    for p in plans:
        if p.delta is None and (rank is None or p.A.shape[0] <= rank):
            ranks[p.site] = p.A.shape[0]
        else:
            ranks[p.site] = svd_rank
    file_rank = allowed_rank(rank if rank is not None else max(ranks.values()))
    exact = [p.scaling for p in plans if p.delta is None and ranks[p.site] == p.A.shape[0]]
    scaling = Counter(exact).most_common(1)[0][0] if exact else 1.0

    tensors: dict[str, torch.Tensor] = {}
    rows: list[ModuleExport] = []
    for p in plans:
        k = ranks[p.site]
        if p.delta is None and k == p.A.shape[0]:
            A, B = p.A, p.B
            if p.scaling != scaling:  # fold this module's own scaling into B: one scaling for the file
                B = (B.double() * (p.scaling / scaling)).to(p.dtype)
            conversion = "pad"
        else:
            A, B = truncated_svd(p.reference(), k)  # B = U_k S_k, A = V_k^T
            A, B = A.to(p.dtype), (B / scaling).to(p.dtype)
            conversion = "svd"
        error = _relative_error(p.reference(), A, B, scaling)
        A, B = _pad(A.cpu(), B.cpu(), file_rank)
        key = PREFIX + p.site
        if p.embedding:
            tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = A, B
        else:
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = A, B
        rows.append(ModuleExport(p.site, p.source, conversion, k, error))

    alpha = _formatted_alpha(scaling * file_rank)
    result = VllmExport(
        name, method, file_rank, alpha, rows, _notes(ctl.model, plans, file_rank, f"{name}={Path(path).resolve()}")
    )
    config = {
        "peft_type": "LORA",
        "task_type": adapter_task_type(ctl, name),
        "base_model_name_or_path": getattr(ctl.model, "name_or_path", None) or None,
        "r": file_rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "lora_bias": False,
        "target_modules": sorted(p.site for p in plans),
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": any(p.conv1d for p in plans),
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }
    write(path, tensors, config)
    if report:
        (Path(path) / REPORT).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _notes(model: nn.Module, plans: list[_Plan], rank: int, module: str) -> list[str]:
    out = [f"serve with: vllm serve BASE_MODEL --enable-lora --max-lora-rank {rank} --lora-modules {module}"]
    arch = type(model).__name__
    if arch in _NO_VLLM_LORA:
        out.append(
            f"vLLM's {_NO_VLLM_LORA[arch]} implementation ({arch}) is not marked as supporting LoRA in vLLM's "
            "supported-models table: vLLM may refuse --enable-lora for this base (peft and LoRAX load the file)"
        )
    output, modules = _embeddings(model, input=False), base_modules(model)
    heads = [p.site for p in plans if output is not None and modules.get(p.site) is output]
    if heads:
        out.append(
            f"LoRA on the output projection {heads[0]!r}: vLLM applies it only for model classes that declare it "
            "in embedding_modules (LLaMA, Mistral, Qwen2, ... do)"
        )
    if any(p.embedding for p in plans):
        out.append(
            "LoRA on the input embedding: vLLM applies it only for model classes that declare embed_tokens in "
            "embedding_modules (LLaMA, Mistral, Qwen2, ... do)"
        )
    if rank > 256:
        out.append(f"--max-lora-rank {rank} needs a recent vLLM (older releases offered 8-64, later 8-256)")
    elif rank > 64:
        out.append(f"--max-lora-rank {rank} needs a vLLM that offers ranks above 64 (the first releases did not)")
    return out


# --- checking an existing directory -------------------------------------------------------------------------------
def vllm_check(
    path: str | os.PathLike, *, max_lora_rank: int = MAX_LORA_RANKS[-1], model: nn.Module | None = None
) -> list[str]:
    """Problems vLLM would have with the peft directory ``path`` (empty: vLLM's checks pass).

    Checks what vLLM's ``PEFTHelper`` and LoRA loader check (see the module docstring): the required fields
    ``r``/``lora_alpha``/``target_modules``; ``r`` (and ``rank_pattern`` values) ``<= max_lora_rank``; no
    ``modules_to_save``, DoRA, bias, ``lora_bias``, weight-modifying inits, aLoRA, layer replication, BD-LoRA or
    QALoRA; only ``lora_A.weight``/``lora_B.weight``/``lora_embedding_A``/``lora_embedding_B`` keys; A and B of
    every module, with the config's rank. Also flags ``rank_pattern``/``alpha_pattern`` (older vLLM releases
    ignore them). With ``model``, every module must exist and be a linear layer or the input embedding (with
    ``vocab_size`` columns).

    Raises:
        AdapterFileError: the directory has no readable config or tensors file.
    """
    directory = Path(path)
    data = read_json(directory / "adapter_config.json")
    problems: list[str] = []
    if not isinstance(data, dict):
        return ["adapter_config.json: not a JSON object"]
    if data.get("peft_type") != "LORA":
        problems.append(f"peft_type is {data.get('peft_type')!r}: vLLM serves LORA adapters only")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in data]
    if missing:
        problems.append(f"missing required fields {missing} (PEFTHelper.from_dict)")
    if max_lora_rank not in MAX_LORA_RANKS:
        problems.append(f"--max-lora-rank {max_lora_rank} is not one of vLLM's choices {list(MAX_LORA_RANKS)}")
    r = data.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(f"r must be a positive integer, got {r!r}")
        r = None
    pattern = data.get("rank_pattern") or {}
    ranks = [v for v in [r, *pattern.values()] if isinstance(v, int)]
    if ranks and max(ranks) > max_lora_rank:
        problems.append(f"LoRA rank {max(ranks)} is greater than max_lora_rank {max_lora_rank}")
    alpha = data.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        problems.append(f"lora_alpha must be a finite number, got {alpha!r}")
    if data.get("rank_pattern") or data.get("alpha_pattern"):
        problems.append(
            "rank_pattern/alpha_pattern are set: older vLLM releases ignore them (one rank, one scaling)"
        )
    if data.get("modules_to_save"):
        problems.append(f"modules_to_save is {data['modules_to_save']!r}: vLLM only supports modules_to_save None")
    if data.get("use_dora"):
        problems.append("use_dora is true: vLLM does not support DoRA")
    if data.get("bias", "none") != "none":
        problems.append(f"bias is {data.get('bias')!r}: vLLM does not support adapter bias")
    if data.get("lora_bias"):
        problems.append("lora_bias is true: vLLM does not support LoRA bias")
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _INITS_VLLM_TAKES:
        problems.append(f"init_lora_weights={init!r} modifies the base weights: vLLM refuses it")
    for key, what in (
        ("alora_invocation_tokens", "Activated LoRA"),
        ("layer_replication", "layer_replication"),
        ("use_bdlora", "block-diagonal LoRA"),
        ("use_qalora", "QALoRA"),
    ):
        if data.get(key):
            problems.append(f"{key} is set: vLLM does not support {what}")
    problems += _check_tensors(directory, r, pattern, model)
    return problems


def _check_tensors(directory: Path, r: int | None, pattern: dict[str, Any], model: nn.Module | None) -> list[str]:
    if not (directory / "adapter_model.safetensors").is_file():
        return ["adapter_model.safetensors is missing (vLLM reads it, else a pickled adapter_model.bin/.pt)"]
    tensors = read_tensors(directory, "adapter_model")
    problems: list[str] = []
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            problems.append(f"{key}: not a LoRA weight vLLM reads (parse_fine_tuned_lora_name refuses it)")
            continue
        if not key.startswith(PREFIX):
            problems.append(f"{key}: peft keys start with {PREFIX!r}")
            continue
        if value.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            problems.append(f"{key}: dtype {value.dtype} is not float32/float16/bfloat16")
        part = "A" if suffix in (".lora_A.weight", ".lora_embedding_A") else "B"
        module = key[len(PREFIX) : -len(suffix)]
        per_module.setdefault(module, {})[part] = value
        per_module[module]["embedding"] = "embedding" in suffix  # type: ignore[assignment]
    if not per_module:
        problems.append("the file holds no LoRA tensors")
    modules = base_modules(model) if model is not None else {}
    for module, parts in sorted(per_module.items()):
        if "A" not in parts or "B" not in parts:
            problems.append(f"{module}: lora_{'A' if 'A' not in parts else 'B'} is missing")
            continue
        A, B, embedding = parts["A"], parts["B"], bool(parts["embedding"])
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            problems.append(f"{module}: factor shapes {tuple(A.shape)}/{tuple(B.shape)} do not form B A")
            continue
        expected = _pattern_rank(pattern, module, r)
        if expected is not None and A.shape[0] != expected:
            problems.append(f"{module}: rank {A.shape[0]} in the file, {expected} in the config")
        if model is not None:
            problems += _check_module(module, modules.get(module), model, A, B, embedding)
    return problems


def _pattern_rank(pattern: dict[str, Any], module: str, r: int | None) -> int | None:
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):  # PEFTHelper._match_pattern
            return value
    return r


def _check_module(
    name: str, module: nn.Module | None, model: nn.Module, A: torch.Tensor, B: torch.Tensor, embedding: bool
) -> list[str]:
    if module is None:
        return [f"{name}: the model has no such module"]
    backend = backend_for(module)
    kind = backend.kind if backend is not None else None
    if embedding:
        if kind != "embedding" or module is not _embeddings(model, input=True):
            return [f"{name}: lora_embedding_* on a module that is not the input embedding"]
        vocab = getattr(getattr(model, "config", None), "vocab_size", module.num_embeddings)
        if A.shape[1] != vocab:
            return [f"{name}: lora_embedding_A has {A.shape[1]} columns, the vocabulary {vocab} (vLLM checks it)"]
        if B.shape[0] != module.embedding_dim:
            return [f"{name}: lora_embedding_B has {B.shape[0]} rows, the embedding dim is {module.embedding_dim}"]
        return []
    if kind != "linear":
        return [f"{name}: a {type(module).__name__}; vLLM has LoRA layers for linear layers and embeddings only"]
    in_dim, out_dim = backend.dims(module)
    if A.shape[1] != in_dim or B.shape[0] != out_dim:
        return [f"{name}: factors {tuple(A.shape)}/{tuple(B.shape)} do not fit a ({out_dim}, {in_dim}) weight"]
    return []
