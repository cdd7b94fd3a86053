"""AdapterHub LoRA and (IA)^3 (``config.architecture: "lora"``); dispatched from ``formats/adapterhub.py``.

Both are AdapterHub's ``LoRAConfig``; ``composition_mode`` tells them apart:

- ``"add"`` (LoRA, Hu et al. 2021): ``y = W x + b + (alpha / r) · B (A x)``, ``A = lora_A: (r, in)``,
  ``B = lora_B: (out, r)``, in ``nn.Linear`` orientation even on GPT-2's ``Conv1D``; no bias. This is our
  :class:`~adapterkit.methods.lora.LoRA` with the same ``r`` and ``alpha``.
- ``"scale"`` ((IA)^3, Liu et al. 2022 §3.3): ``y = (W x + b) · (alpha · lora_B)``, ``lora_B: (out, 1)``, no
  ``lora_A`` in the file; the bias is scaled too. AdapterHub scales the *output* of every target, including the
  FFN one (``intermediate_lora``), so this is our :class:`~adapterkit.methods.ia3.IA3` with ``feedforward=()``
  and ``scale = alpha · lora_B``.

Where the modules are (the flags ``selfattn_lora`` + ``attn_matrices``, ``intermediate_lora``, ``output_lora``):
the key without ``.loras.<name>.lora_X`` is the wrapped module, so the reader takes the modules from the keys, as
the library's loader does (``leave_out`` layers simply have no keys). Per family this is BERT
``attention.self.{query,key,value}`` / ``intermediate.dense`` / ``output.dense``; GPT-2 ``attn.c_attn`` /
``mlp.c_fc`` / ``mlp.c_proj``; LLaMA ``self_attn.{q,k,v}_proj`` / ``mlp.down_proj`` (its "intermediate") /
``mlp.up_proj`` (its "output"): LLaMA swaps the two MLP names.

GPT-2's fused ``c_attn`` holds one pair for all enabled matrices (in q, k, v order): ``lora_A: (g·r, in)``,
``lora_B: (g·H, r)`` for ``g`` enabled matrices; group ``j`` (matrix ``m``) adds
``(alpha / r) · B[jH:(j+1)H] A[jr:(j+1)r] x`` to output slice ``"qkv".index(m)·H`` of the 3H outputs. We load it
as one LoRA of rank ``g·r`` with the block matrix ``B' : (3H, g·r)`` (group ``j``'s block in its rows and columns,
zeros elsewhere) and alpha ``g·alpha`` for that module (``rank_pattern``/``alpha_pattern``), so the scale stays
``alpha / r`` and the product is the library's exactly. (IA)^3 there is one ``(g·H, 1)`` vector, scattered into a
``3H`` vector of ones.

``use_gating`` (UniPELT's gated LoRA, keys ``...loras.<name>.gate.{weight,bias}``): ``B A x`` is scaled by
``g = mean_t sigmoid(gate(x_t))`` instead of ``alpha / r``; loaded as
:class:`~adapterkit.methods.seq_gate.SequenceGated` around the LoRA with ``alpha = r`` (GPT-2's fused
``c_attn``: one gate output per enabled matrix, ``fused_qkv``).

Not read yet (clear errors): ``use_dora`` (AdapterHub's DoRA), VeRA (``vera_b``/``vera_d``), gated (IA)^3.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..backends import backend_for
from ..component import Component
from ..methods.ia3 import IA3
from ..methods.lora import LoRA
from ..methods.seq_gate import LoRAGate, SequenceGated
from ..plan import Plan
from ..targeting import base_modules
from .adapterhub_files import AdapterHubFile, renamed, resolve_sites
from .io import AdapterFileError, import_checked, require_float
from .peft import Fields

ARCHITECTURES = ("lora",)
_LEAVES = ("lora_A", "lora_B")


def _split(info: AdapterHubFile, where: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Stored module path -> {"lora_A"/"lora_B": tensor}, from keys ``<module>.loras.<name>.<leaf>``."""
    marker = f".loras.{info.saved_name}."
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in info.tensors.items():
        module, sep, leaf = key.partition(marker)
        if not sep:
            raise AdapterFileError(
                f"key {key!r} in {where} is not a LoRA tensor of adapter {info.saved_name!r} "
                f"(expected '<module>{marker}lora_A' / 'lora_B')"
            )
        if leaf in ("gate.weight", "gate.bias"):
            if not info.config.get("use_gating"):
                raise AdapterFileError(f"{where}: {key!r} is a LoRA gate, but the config says use_gating false")
            out.setdefault(module, {})[leaf] = value
            continue
        if leaf.startswith("m."):
            raise AdapterFileError(f"{where}: AdapterHub DoRA (use_dora) is not read yet ({key!r})")
        if leaf not in _LEAVES:
            raise AdapterFileError(f"key {key!r} in {where}: unknown LoRA tensor {leaf!r}")
        out.setdefault(module, {})[leaf] = value
    if not out:
        raise AdapterFileError(f"{where} holds no LoRA tensors (keys '<module>{marker}lora_B')")
    return out


def _matrices(fields: Fields) -> list[str]:
    """The enabled attention matrices, in the q, k, v order of GPT-2's fused projection."""
    chosen = fields.names("attn_matrices")
    bad = [m for m in chosen if m not in ("q", "k", "v")]
    if bad:
        raise fields.error("attn_matrices", chosen, "a list of 'q', 'k', 'v'")
    return [m for m in "qkv" if m in chosen]


def _fused_groups(site: str, rows: int, out_dim: int, matrices: list[str], per_group: int) -> list[slice]:
    """Output slices of the enabled matrices of a fused q/k/v projection whose file holds ``rows`` rows.

    Raises:
        ValueError: the rows fit neither the module nor its fused layout.
    """
    if out_dim % 3 or not matrices or rows != len(matrices) * (out_dim // 3) or per_group != out_dim // 3:
        raise ValueError(
            f"{site!r}: the file has {rows} output rows; the module has {out_dim} (a fused q/k/v projection with "
            f"attn_matrices {matrices} would need {len(matrices)} x {out_dim // 3 if out_dim % 3 == 0 else '?'})"
        )
    h = out_dim // 3
    return [slice("qkv".index(m) * h, ("qkv".index(m) + 1) * h) for m in matrices]


def load(ctl: Any, path: str | os.PathLike, info: AdapterHubFile, *, name: str | None, activate: bool) -> str:
    name = name or info.saved_name
    ctl._check_new_name(name)
    ctl.install(name, plan_of(ctl, path, info), activate=activate)
    return name


def plan_of(ctl: Any, path: str | os.PathLike, info: AdapterHubFile) -> Plan:
    """Our plan (config + components holding the file's tensors) for an AdapterHub LoRA / (IA)^3 file."""
    where = Path(path)
    fields = Fields(info.config, where)
    mode = fields.choice("composition_mode", "add", ("add", "scale"))
    gated = fields.flag("use_gating", False)
    if gated and mode == "scale":
        raise AdapterFileError(
            f"{fields.where}: gated AdapterHub (IA)^3 (use_gating with composition_mode 'scale') is not read"
        )
    if fields.flag("use_dora", False):
        raise AdapterFileError(f"{fields.where}: AdapterHub DoRA (use_dora) is not read yet")
    if info.config.get("vera_b") is not None or info.config.get("vera_d") is not None:
        raise AdapterFileError(f"{fields.where}: AdapterHub VeRA (vera_b/vera_d) is not read yet")
    stored = {renamed(s, ctl.model): state for s, state in _split(info, where).items()}
    require_float({f"{s}.{k}": v for s, state in stored.items() for k, v in state.items()}, where)
    mapping = resolve_sites(sorted(stored), ctl.model, where)
    per_site = {mapping[s]: state for s, state in stored.items()}
    matrices = _matrices(fields)
    modules = base_modules(ctl.model)
    try:
        if mode == "scale":
            cfg, comps = _ia3(ctl, fields, per_site, modules, matrices)
        elif gated:
            cfg, comps = _gated(ctl, fields, per_site, modules, matrices)
        else:
            cfg, comps = _lora(ctl, fields, per_site, modules, matrices)
    except (TypeError, ValueError) as e:
        if isinstance(e, AdapterFileError):
            raise
        raise AdapterFileError(f"AdapterHub adapter {str(path)!r} does not fit this model: {e}") from None
    return Plan(cfg, comps)


def _lora(
    ctl: Any,
    fields: Fields,
    per_site: dict[str, dict[str, torch.Tensor]],
    modules: dict[str, Any],
    matrices: list[str],
) -> tuple[LoRA, dict[str, tuple[str, Component]]]:
    r = fields.integer("r", 8)
    alpha = fields.number("alpha", 8)
    states: dict[str, dict[str, torch.Tensor]] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for site, state in per_site.items():
        if "lora_A" not in state or "lora_B" not in state:
            raise ValueError(f"{site!r} lacks lora_A or lora_B")
        A, B = state["lora_A"], state["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r or A.shape[0] % r:
            raise ValueError(
                f"{site!r}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit r={r} "
                "(expected (r, in) and (out, r))"
            )
        backend = backend_for(modules[site])
        if backend is None:
            raise TypeError(f"{site!r} is a {type(modules[site]).__name__}, which LoRA cannot act on")
        _, out_dim = backend.dims(modules[site])
        if A.shape[0] == r and B.shape[0] == out_dim:
            states[site] = {"lora_A": A, "lora_B": B}
            continue
        groups = A.shape[0] // r
        slices = _fused_groups(site, B.shape[0], out_dim, matrices, B.shape[0] // max(groups, 1))
        if len(slices) != groups:
            raise ValueError(f"{site!r}: lora_A has {groups} groups of rank {r}; attn_matrices {matrices}")
        h = out_dim // 3
        block = B.new_zeros(out_dim, groups * r)
        for j, rows in enumerate(slices):
            block[rows, j * r : (j + 1) * r] = B[j * h : (j + 1) * h]
        states[site] = {"lora_A": A, "lora_B": block}
        rank_pattern[re.escape(site)] = groups * r
        alpha_pattern[re.escape(site)] = groups * alpha
    cfg = fields.build(
        LoRA,
        r=r,
        alpha=alpha,
        dropout=fields.number("dropout", 0.0),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        targets=tuple(per_site),
    )
    comps: dict[str, tuple[str, Component]] = {}
    for site in modules:
        if site in states:
            comp = cfg.build(modules[site], site)
            if ctl.autocast_adapter_dtype:  # float32 before the import, so the file's values stay exact
                comp.upcast_()
            import_checked(comp, states[site], modules[site])
            comps[site] = ("target", comp)
    return cfg, comps


def _gated(
    ctl: Any,
    fields: Fields,
    per_site: dict[str, dict[str, torch.Tensor]],
    modules: dict[str, Any],
    matrices: list[str],
) -> tuple[SequenceGated, dict[str, tuple[str, Component]]]:
    """Gated LoRA (UniPELT): AdapterHub scales ``B A x`` by the gate instead of ``alpha / r``, so the LoRA loads
    with ``alpha = r`` inside :class:`~adapterkit.methods.seq_gate.SequenceGated`; a fused q/k/v projection has one
    gate output per enabled matrix (``fused_qkv``)."""
    gates = {
        site: {k: state.pop(k) for k in ("gate.weight", "gate.bias") if k in state}
        for site, state in per_site.items()
    }
    r = fields.integer("r", 8)
    lora, comps = _lora(ctl, Fields({**fields.data, "alpha": r}, fields.where.parent), per_site, modules, matrices)
    fused = {site for site in per_site if lora.rank_for(site) != r}
    if fused and fused != set(per_site):
        raise ValueError(f"a gated LoRA on fused q/k/v projections {sorted(fused)} and other modules is not read")
    cfg = SequenceGated(config=lora, fused_qkv="".join(matrices) if fused else "")
    out: dict[str, tuple[str, Component]] = {}
    for site, (kind, comp) in comps.items():
        gate = LoRAGate(comp, modules[site], cfg.fused_qkv, True)
        if set(gates[site]) != {"gate.weight", "gate.bias"}:
            raise ValueError(
                f"{site!r} lacks its gate (gate.weight, gate.bias) although the config sets use_gating"
            )
        if gates[site]["gate.weight"].shape != gate.gate.weight.shape:
            raise ValueError(
                f"{site!r}: gate.weight {tuple(gates[site]['gate.weight'].shape)}, expected {tuple(gate.gate.weight.shape)}"
            )
        with torch.no_grad():
            gate.gate.weight.copy_(gates[site]["gate.weight"])
            gate.gate.bias.copy_(gates[site]["gate.bias"])
        out[site] = (kind, gate)
    return cfg, out


def _ia3(
    ctl: Any,
    fields: Fields,
    per_site: dict[str, dict[str, torch.Tensor]],
    modules: dict[str, Any],
    matrices: list[str],
) -> tuple[IA3, dict[str, tuple[str, Component]]]:
    if fields.integer("r", 1) != 1:
        raise fields.error("r", fields.data.get("r"), "1 with composition_mode 'scale' ((IA)^3)")
    alpha = fields.number("alpha", 1)
    cfg = fields.build(IA3, targets=tuple(per_site), feedforward=())
    comps: dict[str, tuple[str, Component]] = {}
    for site in modules:
        if site not in per_site:
            continue
        state = per_site[site]
        if "lora_B" not in state:
            raise ValueError(f"{site!r} lacks lora_B (the (IA)^3 vector)")
        vec = state["lora_B"]
        if vec.dim() != 2 or vec.shape[1] != 1:
            raise ValueError(f"{site!r}: lora_B has shape {tuple(vec.shape)}; (IA)^3 needs (out, 1)")
        comp = cfg.build(modules[site], site)
        if ctl.autocast_adapter_dtype:
            comp.upcast_()
        out_dim = comp.scale.numel()
        vec = vec.reshape(-1).to(comp.scale.dtype) * alpha
        if vec.numel() != out_dim:
            full = torch.ones(out_dim, dtype=vec.dtype)
            slices = _fused_groups(site, vec.numel(), out_dim, matrices, vec.numel() // max(len(matrices), 1))
            h = out_dim // 3
            for j, rows in enumerate(slices):
                full[rows] = vec[j * h : (j + 1) * h]
            vec = full
        comp.import_state({"scale": vec}, modules[site])
        comps[site] = ("target", comp)
    return cfg, comps
