"""Export to AdapterHub's format: a directory that ``adapters`` 1.3.0's ``model.load_adapter(dir)`` reads and
that reproduces our outputs (issue 16 item 4; the format: ../shared/formats/adapterhub.md).

``save(ctl, name, path)`` writes ``adapter_config.json`` (AdapterHub's metadata and a fully resolved method
config, as the library writes it) and ``adapter.safetensors`` (the library's ``use_safetensors=True`` file; it
reads it when called with ``use_safetensors=True``, and its safetensors check finds it by name). Keys are our
module paths (the library adds or strips the base-model prefix itself), in transformers 4.57's module names
(AdapterHub pins transformers ~=4.57; only ViT's differ: ``layers.{i}`` -> ``encoder.layer.{i}``,
``attention.q_proj`` -> ``attention.attention.query``, ``mlp.fc1`` -> ``intermediate.dense`` ...). The readers in
``formats/adapterhub_*.py`` map the same keys the other way.

What is written, per method (the inverse of the readers):

- :class:`~adapterkit.methods.lora.LoRA` -> ``LoRAConfig`` (``composition_mode: "add"``). AdapterHub places LoRA
  by flags: ``selfattn_lora`` + ``attn_matrices`` (q/k/v of every attention, cross-attention included),
  ``intermediate_lora`` and ``output_lora`` (LLaMA/Mistral: ``mlp.down_proj`` is its "intermediate",
  ``mlp.up_proj`` its "output"), in every layer not in ``leave_out``. So each of our LoRA modules must be one of
  those slots; the flags are the union of the slots used, ``leave_out`` the layers without any. A slot the flags
  imply but our adapter lacks (an irregular pattern, BART's cross-attention q/v) is written as an exact zero
  (``lora_A = lora_B = 0``), so the library loads no random tensor and adds nothing there. AdapterHub has one
  ``r`` and one ``alpha`` (scale ``alpha / r``, no rsLoRA): modules with another rank are zero-padded to the
  largest rank, and another scale (``rank_pattern``/``alpha_pattern``/rsLoRA) is folded into ``lora_B``.
  GPT-2's fused ``c_attn`` holds one pair for the enabled q/k/v in AdapterHub: group ``m`` is
  ``(lora_A, lora_B[rows of m])`` with the columns whose ``lora_B`` rows are all zero dropped (so a block LoRA read
  from AdapterHub goes back to rank ``r``). PiSSA/OLoRA are written as peft converts them (``[A; A0]``,
  ``[B, -B0]``): a LoRA on the original weights. Refused: DoRA (AdapterHub's ``use_dora`` computes another
  function, see formats/adapterhub_lora.py), a trained bias, LoRA on embeddings/convolutions/parameters.
- :class:`~adapterkit.methods.ia3.IA3` -> ``IA3Config`` (``composition_mode: "scale"``, ``lora_B = scale``): output
  scaling only. peft-style feedforward (input) scaling is refused: AdapterHub scales every target's output. Missing
  slots are written as ones.
- :class:`~adapterkit.methods.bottleneck.Bottleneck` with ``hook="sublayer"`` (ours computes AdapterHub's
  ``BottleneckLayer``) -> ``BnConfig`` (SeqBn, DoubleSeqBn, ParBn, Compacter/PHM, learned/channel scaling,
  ``ln_before``/``ln_after``, the ``original_ln_*``/``residual_before_ln`` arrangement, ``cross_adapter``). Every
  adapted layer must have the same kinds of sub-layer adapters (AdapterHub places ``mh_adapter``/
  ``output_adapter``/``cross_adapter`` in every layer not left out, and a zero bottleneck is not an identity under
  ``original_ln_before``). ``hook="projection"`` is refused: AdapterHub has no adapter on a projection's output.
- :class:`~adapterkit.methods.reft.LoReFT` on transformer blocks -> ``LoReftConfig`` (``orthogonality: true``).
  ``R`` is written in torch's ``parametrizations.orthogonal`` form: ``base`` an orthogonal ``(H, H)`` matrix whose
  first ``r`` columns are ``Rᵀ``, ``original`` the ``(r, H)`` matrix with ``-1`` on its diagonal (the
  householder map then gives the first ``r`` columns of the identity, so the weight is exactly ``R``). Position
  semantics differ on padded or short inputs (see formats/adapterhub_reft.py).

- SeqBnInv (our ``Union`` of a sub-layer ``Bottleneck`` and an ``Invertible`` with ``inverse_at_output=False``,
  what the reader makes of it) -> the bottleneck config with ``inv_adapter: "nice"``. The coupling must act where
  AdapterHub's does: LLaMA/Mistral's token embedding, BERT's ``embeddings`` module, GPT-2's ``drop`` (after
  ``wte + wpe``) (``Invertible(dim=H, targets=[...])`` for the last two).
- Head copies (``heads=[...]``) -> AdapterHub's static head of a transformers model with a head
  (``head_config.json`` with ``"config": null`` + ``model_head.safetensors``), which ``load_adapter`` loads into the
  model's own head when the model class matches. Heads inside the base model or tied to the input embeddings
  are refused.

- :class:`~adapterkit.methods.seq_gate.SequenceGated` LoRA / Bottleneck (AdapterHub's ``use_gating``) -> the inner
  method's config with ``use_gating: true`` and each module's ``gate.{weight, bias}``. A gated AdapterHub LoRA has
  no ``alpha / r`` (the gate replaces it): our scale is folded into ``lora_B`` and ``alpha = r`` is written. On
  GPT-2's ``c_attn`` the gate has one output per enabled matrix (a one-output gate is repeated); a matrix our
  gate leaves ungated (not in ``fused_qkv``) but changes is refused.
- Prefix tuning (``PrefixTuning(positions="keep")``, plain or reparametrized, gated) and prompt tuning
  (``EmbeddingPrompt``): formats/adapterhub_export_prompt.py. Unions (MAM, UniPELT as AdapterHub computes it):
  formats/adapterhub_export_union.py, each member written by the writers here.

Everything else (other methods and unions, peft-style prefix positions and prompts, ``Union(gated=True)``, trained
biases, model types AdapterHub does not support) raises :class:`AdapterHubExportError` naming why and the field to
change, before anything is written. Weights are always ``adapter.safetensors``, prefixes and unions included (the
library cannot save those as safetensors itself, but its ``load_adapter(..., use_safetensors=True)`` reads ours).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backends import backend_for
from ..methods.bottleneck import Bottleneck, Hook, Placement, Scaling
from ..methods.bottleneck_sublayer import ResidualTap, SublayerBottleneck
from ..methods.embedding_prompt import EmbeddingPrompt
from ..methods.heads import HeadCopy
from ..methods.ia3 import IA3, IA3InputScale, IA3OutputScale
from ..methods.invertible import Invertible, InvertibleEmbedding
from ..methods.lora import LoRA, LoRAInit, LoRALinear
from ..methods.prefix import PrefixTuning
from ..methods.prompt import PromptTuning
from ..methods.reft import LoReFT, LoReFTBlock, PositionRecorder
from ..methods.seq_gate import LoRAGate, SequenceGated
from ..methods.union import Union
from ..targeting import base_modules
from .adapterhub_export_common import (
    BERT_LIKE,
    KINDS,
    MODEL_TYPES,
    SWAPPED_MLP,
    VERSION,
    AdapterHubExportError,
    hub_path,
    layer_of,
    location,
    model_type,
    owner,
    role_sites,
    targets,
)
from .adapterhub_export_prompt import prefix, prompt, prompt_tuning_refusal
from .adapterhub_export_union import union
from .io import write_adapter

__all__ = ["save", "AdapterHubExportError", "VERSION", "MODEL_TYPES"]


WEIGHTS = "adapter.safetensors"
HEAD_WEIGHTS, HEAD_CONFIG = "model_head.safetensors", "head_config.json"
# ``writer(ctl, name, cfg, comps=None) -> (method config, tensors)``; ``comps``: a union member's components
Writer = Callable[..., tuple[dict[str, Any], dict[str, torch.Tensor]]]


# --- shared helpers ----------------------------------------------------------------------------------------------


def _blocks(ctl: Any, modules: dict[str, nn.Module]) -> list[str]:
    """The model's layers in AdapterHub's ``iter_layers`` order (encoder before decoder): their index is what
    ``leave_out`` / ReFT ``layers`` count."""
    blocks = role_sites(ctl, "block", modules)
    if not blocks:
        raise AdapterHubExportError(
            f"no transformer layers (role 'block') found in this {type(ctl.model).__name__}"
        )
    return blocks


def _metadata(ctl: Any, name: str, config: dict[str, Any]) -> dict[str, Any]:
    mcfg = ctl.model.config
    return {
        "config": config,
        "hidden_size": int(mcfg.hidden_size),
        "model_class": type(ctl.model).__name__,
        "model_name": getattr(mcfg, "name_or_path", None) or None,
        "model_type": mcfg.model_type,
        "name": name,
        "version": VERSION,
    }


def _check_sites(ctl: Any, name: str, method: str) -> None:
    kinds = ctl.sites(name)
    extra = sorted(s for s, k in kinds.items() if k not in ("target", "head"))
    if extra:
        raise AdapterHubExportError(
            f"adapter {name!r} ({method}) also trains the biases of {extra[:3]} (bias='all' / 'lora_only'), which "
            "an AdapterHub adapter file cannot hold"
        )


def _head(ctl: Any, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The adapter's head copies (``heads=[...]``) as AdapterHub's *static* head of a transformers model with a head
    (``head_config.json`` with ``"config": null`` + ``model_head.safetensors``, what ``save_adapter`` writes from
    ``adapters.init(BertForSequenceClassification(...))``): ``load_adapter`` puts those weights into the model's own
    head when the model class matches. None when the adapter has no head.

    Raises:
        AdapterHubExportError: a head inside the base model (AdapterHub's head files hold only what lies outside
            ``base_model_prefix``) or tied to the input embeddings (loading it would change them too).
    """
    heads = {s: c for s, c in ctl.components(name).items() if ctl.sites(name)[s] == "head"}
    if not heads:
        return None
    prefix = getattr(ctl.model, "base_model_prefix", "") or ""
    modules = base_modules(ctl.model)
    embeddings = ctl.model.get_input_embeddings() if hasattr(ctl.model, "get_input_embeddings") else None
    tensors: dict[str, torch.Tensor] = {}
    for site, comp in heads.items():
        if not isinstance(comp, HeadCopy):
            raise AdapterHubExportError(f"adapter {name!r}: head {site!r} is a {type(comp).__name__}")
        if prefix and (site == prefix or site.startswith(prefix + ".")):
            raise AdapterHubExportError(
                f"adapter {name!r}: its head copy {site!r} lies inside the base model ({prefix!r}); AdapterHub's head "
                "files hold only the modules outside it"
            )
        weight = getattr(modules[site], "weight", None)
        if embeddings is not None and weight is not None and weight is getattr(embeddings, "weight", None):
            raise AdapterHubExportError(
                f"adapter {name!r}: its head {site!r} is tied to the input embeddings; AdapterHub would load the "
                "trained copy into both"
            )
        for key, value in comp.head.state_dict().items():
            tensors[f"{site}.{key}"] = value.detach().contiguous()
    mcfg = ctl.model.config
    config = {
        "config": None,
        "hidden_size": int(mcfg.hidden_size),
        "label2id": {str(k): int(v) for k, v in (getattr(mcfg, "label2id", None) or {}).items()},
        "model_class": type(ctl.model).__name__,
        "model_name": getattr(mcfg, "name_or_path", None) or None,
        "model_type": mcfg.model_type,
        "name": None,
        "num_labels": int(getattr(mcfg, "num_labels", 0) or 0),
        "version": VERSION,
    }
    return config, tensors


def _write_head(path: str | os.PathLike, head: tuple[dict[str, Any], dict[str, torch.Tensor]]) -> None:
    """``head_config.json`` + ``model_head.safetensors`` beside the adapter, each replaced in one rename."""
    from safetensors.torch import save_file

    directory = Path(path)
    config, tensors = head
    tmp = directory / f".{HEAD_WEIGHTS}.tmp"
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, directory / HEAD_WEIGHTS)
    tmp = directory / f".{HEAD_CONFIG}.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / HEAD_CONFIG)


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    """Write adapter ``name`` of controller ``ctl`` to directory ``path`` in AdapterHub's format.

    Raises:
        AdapterHubExportError: the method, model type or arrangement has no exact AdapterHub equivalent (nothing
            is written).
    """
    from . import adapterhub_export_fusion as compositions  # fusions, flex heads, setups (``name`` a block)

    if compositions.handles(ctl, name):
        return compositions.save(ctl, name, path, save)
    if "." in name or "," in name:
        raise AdapterHubExportError(
            f"adapter name {name!r}: AdapterHub finds an adapter's tensors by '.<name>.' and joins fusion members "
            "with ',', so its names cannot contain '.' or ','; rename it (adapters.rename) before exporting"
        )
    cfg = ctl.config(name)
    write = _writer(name, cfg)
    model_type(ctl)
    _check_sites(ctl, name, type(cfg).__name__)
    head = _head(ctl, name)
    config, tensors = write(ctl, name, cfg)
    write_adapter(path, WEIGHTS, tensors, _metadata(ctl, name, config))
    if head is not None:
        _write_head(path, head)


# --- LoRA and (IA)^3 ---------------------------------------------------------------------------------------------


def _slots(ctl: Any, mtype: str, modules: dict[str, nn.Module]) -> dict[str, str]:
    """Module -> AdapterHub LoRA slot (``q``/``k``/``v``, ``qkv`` for GPT-2's fused ``c_attn``, ``intermediate``,
    ``output``) for every module AdapterHub can wrap in this model."""
    swapped = mtype in SWAPPED_MLP
    table = {
        "q": "attn.q",
        "k": "attn.k",
        "v": "attn.v",
        "qkv": "attn.qkv",
        "intermediate": "ffn.down" if swapped else "ffn.up",
        "output": "ffn.up" if swapped else "ffn.down",
    }
    out: dict[str, str] = {}
    for slot, role in table.items():
        for site in role_sites(ctl, role, modules):
            if slot == "qkv" and not re.search(r"(^|\.)h\.\d+\.attn\.c_attn$", site):
                continue  # GPT-2's self-attention only
            if swapped and slot in ("intermediate", "output") and not site.endswith(("down_proj", "up_proj")):
                continue  # a fused gate_up_proj is no AdapterHub slot
            out.setdefault(site, slot)
    return out


def _placement(
    ctl: Any, name: str, method: str, sites: list[str]
) -> tuple[dict[str, str], list[int], list[str], dict[str, str]]:
    """``(site -> slot, leave_out, blocks, every slot module -> slot)`` of a LoRA-like adapter.

    Raises:
        AdapterHubExportError: a module that is no AdapterHub slot.
    """
    mtype = model_type(ctl)
    modules = base_modules(ctl.model)
    every = _slots(ctl, mtype, modules)
    blocks = _blocks(ctl, modules)
    wrong = [s for s in sites if s not in every or layer_of(s, blocks) is None]
    if wrong:
        names = "mlp.down_proj, mlp.up_proj" if mtype in SWAPPED_MLP else "the FFN's input and output projections"
        raise AdapterHubExportError(
            f"adapter {name!r} ({method}) acts on {wrong[:3]}, where AdapterHub cannot put it: its {method} sits only "
            f"on the attention's q/k/v projections (GPT-2: attn.c_attn), and {names} of each layer. Target those "
            f"(e.g. targets=['attn.q', 'attn.v']) to export"
        )
    used = {layer_of(s, blocks) for s in sites}
    leave_out = [i for i in range(len(blocks)) if i not in used]
    return {s: every[s] for s in sites}, leave_out, blocks, every


def _flags(slots: set[str], matrices: list[str], default: list[str]) -> dict[str, Any]:
    return {
        "selfattn_lora": bool(matrices),
        "attn_matrices": matrices or default,
        "intermediate_lora": "intermediate" in slots,
        "output_lora": "output" in slots,
    }


def _required(
    every: dict[str, str], blocks: list[str], leave_out: list[int], slots: set[str], matrices: list[str]
) -> list[str]:
    """The modules ``adapters`` will wrap for these flags (``slots``, ``matrices``) and ``leave_out``."""
    out = []
    for site, slot in every.items():
        layer = layer_of(site, blocks)
        if layer is None or layer in leave_out:
            continue
        if slot in ("q", "k", "v") and slot not in matrices:
            continue
        if slot in ("intermediate", "output") and slot not in slots:
            continue
        if slot == "qkv" and not matrices:
            continue
        out.append(site)
    return out


def _fused_rows(module: nn.Module, m: str) -> slice:
    _, out_dim = backend_for(module).dims(module)
    h = out_dim // 3
    return slice("qkv".index(m) * h, ("qkv".index(m) + 1) * h)


def _lora(
    ctl: Any, name: str, cfg: LoRA, comps: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    comps = targets(ctl, name) if comps is None else comps
    gates = {s: c for s, c in comps.items() if isinstance(c, LoRAGate)}  # SequenceGated: AdapterHub's use_gating
    if gates and len(gates) != len(comps):
        raise AdapterHubExportError(f"adapter {name!r}: some of its LoRA modules are gated and some are not")
    comps = {s: c.inner if isinstance(c, LoRAGate) else c for s, c in comps.items()}
    for site, comp in comps.items():
        why = None
        if not isinstance(comp, LoRALinear):
            why = f"a {type(comp).__name__} (AdapterHub has LoRA on linear layers only)"
        elif comp.magnitude is not None:
            why = (
                "DoRA: AdapterHub's use_dora computes m / ||W + B A|| (W x + b + s B A x), without the scale in the "
                "norm and with the bias rescaled, which is not DoRA (see formats/adapterhub_lora.py)"
            )
        elif comp.bias is not None:
            why = "a trained bias (bias=...), which AdapterHub's LoRA does not have"
        if why is not None:
            raise AdapterHubExportError(f"adapter {name!r}: its LoRA at {site!r} is {why}")
    if cfg.target_parameters:
        raise AdapterHubExportError(
            f"adapter {name!r}: LoRA on parameters (target_parameters) has no AdapterHub form"
        )
    per_site, leave_out, blocks, every = _placement(ctl, name, "LoRA", list(comps))
    modules = base_modules(ctl.model)
    s_hub = 1.0 if gates else cfg.alpha / cfg.r  # a gated AdapterHub LoRA has no alpha / r: the gate replaces it
    converted = cfg.init in (LoRAInit.PISSA, LoRAInit.OLORA)

    def factors(comp: Any) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = comp.lora_A.detach().float(), comp.lora_B.detach().float()
        if converted:  # a LoRA on the original weights (the attached base holds W - s B0 A0)
            A, B = torch.cat([A, comp.init_A.float()], 0), torch.cat([B, -comp.init_B.float()], 1)
        if comp.scaling != s_hub:
            B = B * (comp.scaling / s_hub)
        return A, B

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    groups: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # fused site -> matrix -> (A, B)
    for site, comp in comps.items():
        A, B = factors(comp)
        if per_site[site] != "qkv":
            pairs[site] = (A, B)
            continue
        groups[site] = {}
        for m in "qkv":
            Bm = B[_fused_rows(modules[site], m)]
            keep = Bm.abs().sum(0) != 0  # drop the rank-one terms that add nothing to this group's rows
            groups[site][m] = (A[keep], Bm[:, keep])
    slots = set(per_site.values())
    if groups:
        matrices = _fused_matrices(name, groups, gates)
    else:
        matrices = [m for m in "qkv" if m in slots]
    ranks = [A.shape[0] for A, _ in pairs.values()] + [g[m][0].shape[0] for g in groups.values() for m in matrices]
    r_hub = max([cfg.r, *ranks])
    alpha = r_hub if gates else cfg.alpha if r_hub == cfg.r else s_hub * r_hub
    alpha = int(alpha) if float(alpha).is_integer() else float(alpha)

    def padded(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        extra = r_hub - A.shape[0]
        if extra:
            A = torch.cat([A, A.new_zeros(extra, A.shape[1])], 0)
            B = torch.cat([B, B.new_zeros(B.shape[0], extra)], 1)
        return A, B

    tensors: dict[str, torch.Tensor] = {}
    mtype = model_type(ctl)
    for site in _required(every, blocks, leave_out, slots, matrices):
        module = modules[site]
        in_dim, out_dim = backend_for(module).dims(module)
        if every[site] == "qkv":
            h = out_dim // 3
            parts = [padded(*groups[site][m]) if site in groups else (torch.zeros(r_hub, in_dim), torch.zeros(h, r_hub))
                     for m in matrices]  # fmt: skip
            A, B = torch.cat([a for a, _ in parts], 0), torch.cat([b for _, b in parts], 0)
        elif site in pairs:
            A, B = padded(*pairs[site])
        else:  # a slot these flags wrap that the adapter leaves alone: an exact zero
            A, B = torch.zeros(r_hub, in_dim), torch.zeros(out_dim, r_hub)
        key = f"{hub_path(mtype, site)}.loras.{name}"
        tensors[f"{key}.lora_A"], tensors[f"{key}.lora_B"] = A.contiguous(), B.contiguous()
        if gates:
            heads = len(matrices) if every[site] == "qkv" else 1
            W, b = _lora_gate(gates.get(site), matrices if every[site] == "qkv" else None, heads, in_dim)
            tensors[f"{key}.gate.weight"], tensors[f"{key}.gate.bias"] = W, b
    config = {
        "alpha": alpha,
        "architecture": "lora",
        **_flags(slots, matrices, ["q", "v"]),
        "composition_mode": "add",
        "dropout": float(cfg.dropout),
        "dtype": None,
        "init_weights": "lora",
        "init_weights_seed": None,
        "leave_out": leave_out,
        "r": r_hub,
        "use_dora": False,
        "use_gating": bool(gates),
        "vera_b": None,
        "vera_d": None,
    }
    return config, tensors


def _fused_matrices(
    name: str, groups: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], gates: dict[str, LoRAGate]
) -> list[str]:
    """The q/k/v matrices AdapterHub enables on GPT-2's fused ``c_attn``: those with a nonzero group, and with gates
    those that have a gate output (``fused_qkv``).

    Raises:
        AdapterHubExportError: a gated LoRA whose nonzero group has no gate output (ours leaves it ungated; every
            enabled AdapterHub matrix is gated).
    """
    used = {m for g in groups.values() for m in "qkv" if g[m][1].numel()}
    for site, gate in gates.items():
        if site in groups and gate.fused_qkv:
            ungated = [m for m in "qkv" if groups[site][m][1].numel() and m not in gate.fused_qkv]
            if ungated:
                raise AdapterHubExportError(
                    f"adapter {name!r}: its LoRA at {site!r} changes the {ungated} outputs, which its gate "
                    f"(fused_qkv={gate.fused_qkv!r}) leaves ungated; AdapterHub gates every matrix it enables. "
                    f"List them in SequenceGated(fused_qkv=...) to export"
                )
            used |= set(gate.fused_qkv)
    return [m for m in "qkv" if m in used] or ["q", "k", "v"]


def _lora_gate(
    gate: LoRAGate | None, matrices: list[str] | None, heads: int, in_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """AdapterHub's ``gate.weight: (heads, in)``, ``gate.bias: (heads,)`` of one LoRA module: one row per enabled
    matrix on a fused ``c_attn`` (``matrices``; a one-output gate is repeated), zeros where the adapter has no
    LoRA (its delta is zero there, so any gate gives the same output)."""
    if gate is None:
        return torch.zeros(heads, in_dim), torch.zeros(heads)
    W, b = gate.gate.weight.detach().float(), gate.gate.bias.detach().float()
    if matrices is not None:
        if gate.fused_qkv:
            rows = [gate.fused_qkv.index(m) if m in gate.fused_qkv else None for m in matrices]
            W = torch.stack([W[i] if i is not None else W.new_zeros(W.shape[1]) for i in rows])
            b = torch.stack([b[i] if i is not None else b.new_zeros(()) for i in rows])
        else:
            W, b = W.expand(heads, -1), b.expand(heads)
    return W.contiguous().clone(), b.contiguous().clone()


def _ia3(
    ctl: Any, name: str, cfg: IA3, comps: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    comps = targets(ctl, name) if comps is None else comps
    for site, comp in comps.items():
        if isinstance(comp, IA3InputScale):
            raise AdapterHubExportError(
                f"adapter {name!r}: its (IA)^3 vector at {site!r} scales the module's input (peft's feedforward "
                "scaling); AdapterHub's (IA)^3 scales every target's output. Use ak.IA3(feedforward=()) with the "
                "targets AdapterHub has (attn.k, attn.v, and the FFN's input projection) to export"
            )
        if not isinstance(comp, IA3OutputScale):
            raise AdapterHubExportError(
                f"adapter {name!r}: {type(comp).__name__} at {site!r} has no AdapterHub form"
            )
    per_site, leave_out, blocks, every = _placement(ctl, name, "(IA)^3", list(comps))
    modules = base_modules(ctl.model)
    scales = {site: comp.scale.detach().float().reshape(-1) for site, comp in comps.items()}
    slots = set(per_site.values())
    fused = [s for s in scales if per_site[s] == "qkv"]
    if fused:
        matrices = [
            m for m in "qkv" if any(bool((scales[s][_fused_rows(modules[s], m)] != 1).any()) for s in fused)
        ] or ["q", "k", "v"]
    else:
        matrices = [m for m in "qkv" if m in slots]
    tensors: dict[str, torch.Tensor] = {}
    mtype = model_type(ctl)
    for site in _required(every, blocks, leave_out, slots, matrices):
        module = modules[site]
        _, out_dim = backend_for(module).dims(module)
        vec = scales.get(site, torch.ones(out_dim))
        if every[site] == "qkv":
            vec = torch.cat([vec[_fused_rows(module, m)] for m in matrices])
        tensors[f"{hub_path(mtype, site)}.loras.{name}.lora_B"] = vec.reshape(-1, 1).contiguous()
    config = {
        "alpha": 1,
        "architecture": "lora",
        **_flags(slots, matrices, ["k", "v"]),
        "composition_mode": "scale",
        "dropout": 0.0,
        "dtype": None,
        "init_weights": "ia3",
        "init_weights_seed": None,
        "leave_out": leave_out,
        "r": 1,
        "use_dora": False,
        "use_gating": False,
        "vera_b": None,
        "vera_d": None,
    }
    return config, tensors


# --- bottleneck adapters ---------------------------------------------------------------------------------------

# our tensor name -> AdapterHub's (PHM tensors transposed in their last two axes, see adapterhub_bottleneck.py)
_BN_LEAVES = {
    "down.weight": "adapter_down.0.weight",
    "down.bias": "adapter_down.0.bias",
    "up.weight": "adapter_up.weight",
    "up.bias": "adapter_up.bias",
    "ln_after.weight": "adapter_norm_after.weight",
    "ln_after.bias": "adapter_norm_after.bias",
    "scale": "scaling",
    "gate.weight": "gate.weight",  # SequenceGated (AdapterHub's use_gating)
    "gate.bias": "gate.bias",
}
_PHM_LEAVES = {
    f"{proj}.{ours}": f"{theirs}.{t}"
    for proj, theirs in (("down", "adapter_down.0"), ("up", "adapter_up"))
    for ours, t in {"B_right": "W_left", "B_left": "W_right", "B": "W", "rule.A": "phm_rule", "bias": "b"}.items()
}


def _reduction_factor(hidden: int, size: int) -> int | float:
    """A ``reduction_factor`` for which AdapterHub's ``int(hidden // reduction_factor)`` is ``size``."""
    if hidden % size == 0:
        return hidden // size
    rf = hidden / size
    for cand in (rf, math.nextafter(rf, 0.0), math.nextafter(rf, math.inf)):
        if int(hidden // cand) == size:
            return cand
    raise AdapterHubExportError(f"no reduction_factor gives a bottleneck of {size} for hidden size {hidden}")


_ACTIVATIONS = ("relu", "swish", "silu", "tanh", "sigmoid", "gelu", "gelu_new", "leakyrelu", "linear")


def _bottleneck(
    ctl: Any,
    name: str,
    cfg: Bottleneck,
    invertible: Invertible | None = None,
    comps: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if cfg.hook is not Hook.SUBLAYER:
        raise AdapterHubExportError(
            f"adapter {name!r} is a Bottleneck with hook='projection' (the adapter on a projection's output), a "
            "placement AdapterHub does not have: its adapters sit on the block's residual sub-layers, as ours with "
            "hook='sublayer' (the default); train with that hook to export"
        )
    if cfg.non_linearity.lower() not in _ACTIVATIONS:
        raise AdapterHubExportError(f"adapter {name!r}: activation {cfg.non_linearity!r} has no AdapterHub name")
    mtype = model_type(ctl)
    modules = base_modules(ctl.model)
    blocks = _blocks(ctl, modules)
    role_of = {s: role for role in KINDS for s in role_sites(ctl, role, modules)}
    comps = targets(ctl, name) if comps is None else comps
    adapters = {s: c for s, c in comps.items() if isinstance(c, SublayerBottleneck)}
    allowed = (
        (SublayerBottleneck, ResidualTap, InvertibleEmbedding) if invertible else (SublayerBottleneck, ResidualTap)
    )
    other = [f"{type(c).__name__} at {s!r}" for s, c in comps.items() if not isinstance(c, allowed)]
    if other:
        raise AdapterHubExportError(f"adapter {name!r}: {other[:3]} have no AdapterHub form")
    placed: dict[str, tuple[int, str]] = {}
    for site in adapters:
        layer = layer_of(site, blocks)
        if site not in role_of or layer is None:
            raise AdapterHubExportError(
                f"adapter {name!r} sits on {site!r}, which is no sub-layer of a layer (roles attn.sublayer, "
                "ffn.sublayer, cross.sublayer), where AdapterHub's adapters are"
            )
        placed[site] = (layer, KINDS[role_of[site]])
    kinds = {k for _, k in placed.values()}
    used = {layer for layer, _ in placed.values()}
    leave_out = [i for i in range(len(blocks)) if i not in used]
    have: dict[int, set[str]] = {}
    for site, role in role_of.items():
        layer = layer_of(site, blocks)
        if layer is not None:
            have.setdefault(layer, set()).add(KINDS[role])
    for layer in sorted(used):
        got = {k for lay, k in placed.values() if lay == layer}
        if got != kinds & have.get(layer, set()):
            raise AdapterHubExportError(
                f"adapter {name!r} has {sorted(got)} sub-layer adapters in layer {layer} but {sorted(kinds)} in "
                "others: AdapterHub places the same kinds (mh_adapter/output_adapter/cross_adapter) in every layer "
                "it does not leave out"
            )
    hidden = int(ctl.model.config.hidden_size)
    tensors: dict[str, torch.Tensor] = {}
    sizes: set[int] = set()
    rule: torch.Tensor | None = None
    for site, comp in adapters.items():
        layer, kind = placed[site]
        loc = f"{location(mtype, kind, site, blocks[layer])}.adapters.{name}"
        state = {k: v.detach() for k, v in comp.state_dict().items()}
        sizes.add(int(state["down.bias"].shape[0]))
        for ours, value in state.items():
            if ours == "down.rule.A" and cfg.shared_phm_rule:
                rule = value.transpose(-2, -1)
                continue
            if ours.startswith("ln_before."):
                leaf = ours.partition(".")[2]
                tensors[f"{loc}.adapter_norm_before.{leaf}"] = value.clone()
                tensors[f"{loc}.adapter_down.0.{leaf}"] = value.clone()  # Sequential(LayerNorm, Linear, act)
                continue
            theirs = (_PHM_LEAVES if cfg.phm_dim is not None and ours in _PHM_LEAVES else _BN_LEAVES).get(ours)
            if theirs is None:
                raise AdapterHubExportError(
                    f"adapter {name!r}: tensor {ours!r} at {site!r} has no AdapterHub name"
                )
            if cfg.ln_before and theirs.startswith("adapter_down.0."):
                theirs = "adapter_down.1." + theirs[len("adapter_down.0.") :]
            if ours.rpartition(".")[2] in ("B_left", "B_right", "B", "A"):
                value = value.transpose(-2, -1)
            tensors[f"{loc}.{theirs}"] = value.contiguous()
    if len(sizes) != 1:
        raise AdapterHubExportError(f"adapter {name!r}: bottlenecks of several sizes {sorted(sizes)}")
    gated = {hasattr(c, "gate") for c in adapters.values()}
    if len(gated) != 1:
        raise AdapterHubExportError(f"adapter {name!r}: some of its bottlenecks are gated and some are not")
    if cfg.phm_dim is not None and cfg.shared_phm_rule:
        if rule is None:
            raise AdapterHubExportError(f"adapter {name!r}: its shared PHM rule was not found")
        tensors[f"{owner(ctl.model)}shared_parameters.{name}.phm_rule"] = rule.contiguous()
    if invertible is not None:
        couplings = [c for c in comps.values() if isinstance(c, InvertibleEmbedding)]
        if len(couplings) != 1:
            raise AdapterHubExportError(
                f"adapter {name!r}: {len(couplings)} invertible adapters; AdapterHub has one"
            )
        base = owner(ctl.model)
        for key, value in couplings[0].state_dict().items():
            if not key.startswith("coupling."):
                raise AdapterHubExportError(
                    f"adapter {name!r}: invertible adapter tensor {key!r} has no AdapterHub name"
                )
            tensors[f"{base}invertible_adapters.{name}.{key[len('coupling.') :]}"] = value.detach().contiguous()
    parallel = cfg.placement is Placement.PARALLEL
    scaling: Any = cfg.scaling if cfg.scaling_mode is Scaling.FIXED else cfg.scaling_mode.value
    phm = cfg.phm_dim is not None
    config = {
        "adapter_residual_before_ln": bool(cfg.adapter_residual_before_ln),
        "cross_adapter": "cross" in kinds,
        "dropout": float(cfg.dropout),
        "factorized_phm_W": bool(cfg.factorized_phm_W),
        "factorized_phm_rule": False,
        "hypercomplex_nonlinearity": "glorot-uniform",
        "init_weights": "mam_adapter" if parallel else "bert",
        "init_weights_seed": None,
        "inv_adapter": "nice" if invertible is not None else None,
        "inv_adapter_reduction_factor": _number(invertible.reduction_factor) if invertible is not None else None,
        "is_parallel": parallel,
        "learn_phm": True,
        "leave_out": leave_out,
        "ln_after": bool(cfg.ln_after),
        "ln_before": bool(cfg.ln_before),
        "mh_adapter": "mh" in kinds,
        "non_linearity": cfg.non_linearity.lower(),
        "original_ln_after": bool(cfg.original_ln_after),
        "original_ln_before": bool(cfg.original_ln_before_resolved),
        "output_adapter": "output" in kinds,
        "phm_bias": True,
        "phm_c_init": "normal",
        "phm_dim": int(cfg.phm_dim) if phm else 4,
        "phm_init_range": 0.0001,
        "phm_layer": phm,
        "phm_rank": int(cfg.phm_rank),
        "reduction_factor": _reduction_factor(hidden, sizes.pop()),
        "residual_before_ln": cfg.residual_before_ln,
        "scaling": scaling,
        "shared_W_phm": False,
        "shared_phm_rule": bool(cfg.shared_phm_rule),
        "stochastic_depth": 0.0,
        "use_gating": gated.pop(),
    }
    return config, tensors


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _is_seq_bn_inv(cfg: Union) -> bool:
    kinds = sorted(type(c).__name__ for c in cfg.configs)
    return not cfg.gated and kinds == ["Bottleneck", "Invertible"]


def _invertible_site(ctl: Any, mtype: str) -> tuple[str | None, str]:
    """``(our module, in words)`` whose output AdapterHub's invertible adapter transforms (its
    ``post_embedding_forward`` hook; formats/adapterhub_bottleneck.py): the token embedding (LLaMA, Mistral), the
    embeddings module after its LayerNorm and dropout (BERT-like), ``drop`` after ``wte + wpe`` (GPT-2); None
    where not checked (other model types)."""
    base = owner(ctl.model)
    if mtype in SWAPPED_MLP:
        emb = ctl.model.get_input_embeddings()
        return next((n for n, m in base_modules(ctl.model).items() if m is emb), None), "the token embedding"
    if mtype in BERT_LIKE:
        return f"{base}embeddings", "the embeddings module (after the position embeddings and LayerNorm)"
    if mtype == "gpt2":
        return f"{base}drop", "the embeddings' dropout after the position embeddings (wte + wpe)"
    return None, ""


def _seq_bn_inv(ctl: Any, name: str, cfg: Union) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SeqBnInv (or any bottleneck + NICE invertible adapter): the bottleneck config with ``inv_adapter: "nice"``
    and the coupling under ``<p>invertible_adapters.<name>.{F,G}.{0,2}``. Our coupling must sit where AdapterHub's
    acts (:func:`_invertible_site`: what the reader makes of a SeqBnInv file,
    ``Invertible(dim=H, targets=["embeddings"])`` on BERT, ``["transformer.drop"]`` on GPT-2)."""
    bn = next(c for c in cfg.configs if isinstance(c, Bottleneck))
    inv = next(c for c in cfg.configs if isinstance(c, Invertible))
    mtype = model_type(ctl)
    site, where = _invertible_site(ctl, mtype)
    ours = sorted(s for s, c in targets(ctl, name).items() if isinstance(c, InvertibleEmbedding))
    if site is None:
        raise AdapterHubExportError(
            f"adapter {name!r}: AdapterHub's invertible adapter (SeqBnInv) is exported for LLaMA, Mistral, BERT-like "
            f"and GPT-2 models (where its position is known), not {mtype!r}"
        )
    if ours != [site]:
        raise AdapterHubExportError(
            f"adapter {name!r}: its invertible adapter acts on {ours}, but AdapterHub applies a {mtype!r} model's "
            f"after {where}: {site!r} (position embeddings included where the model has them); use "
            f"Invertible(targets=[{site!r}], dim=<hidden size>) to export"
        )
    if inv.inverse_at_output:
        raise AdapterHubExportError(
            f"adapter {name!r}: its invertible adapter also runs inverted before the LM head (inverse_at_output), "
            "which AdapterHub does only in its own flex heads, not on a transformers model under adapters.init; "
            "use Invertible(inverse_at_output=False) to export"
        )
    if inv.non_linearity.lower() != bn.non_linearity.lower():
        raise AdapterHubExportError(
            f"adapter {name!r}: the invertible adapter's activation {inv.non_linearity!r} differs from the "
            f"bottleneck's {bn.non_linearity!r}; AdapterHub's config has one non_linearity for both"
        )
    return _bottleneck(ctl, name, bn, invertible=inv)


# --- LoReFT ----------------------------------------------------------------------------------------------------


def _orthogonal_form(R: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(original (r, H), base (H, H))`` whose torch ``parametrizations.orthogonal`` weight is ``R: (r, H)``.

    ``base = [Rᵀ | C]`` (``C`` an orthonormal complement, from a seeded QR) and ``original`` zero with ``-1`` on
    its diagonal: the householder map of that is ``-I[:, :r]``, times the diagonal's signs ``I[:, :r]``, so the
    weight is ``(base @ I[:, :r])ᵀ = R`` exactly."""
    r, h = R.shape
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.cat([R.T.double(), torch.randn(h, h - r, generator=g, dtype=torch.float64)], 1))
    base = torch.cat([R.T, q[:, r:].to(R.dtype)], 1)
    original = torch.zeros(r, h, dtype=R.dtype)
    original.diagonal().fill_(-1.0)
    return original, base.contiguous()


def _loreft(ctl: Any, name: str, cfg: LoReFT) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if cfg.prompt_from_labels:
        raise AdapterHubExportError(f"adapter {name!r}: LoReFT with prompt_from_labels has no AdapterHub form")
    mtype = model_type(ctl)
    modules = base_modules(ctl.model)
    blocks = _blocks(ctl, modules)
    comps = targets(ctl, name)
    units: dict[str, LoReFTBlock] = {}
    for site, comp in comps.items():
        if isinstance(comp, PositionRecorder):
            continue
        if not isinstance(comp, LoReFTBlock) or site not in blocks:
            raise AdapterHubExportError(
                f"adapter {name!r}: LoReFT at {site!r}; AdapterHub's ReFT sits on whole layers' outputs only "
                "(role 'block')"
            )
        units[site] = comp
    layers = sorted(blocks.index(s) for s in units)
    tensors: dict[str, torch.Tensor] = {}
    for site, comp in units.items():
        ivs = (
            [comp.shared]
            if cfg.share_weights
            else [getattr(comp, "prefix", None) or comp.suffix, getattr(comp, "suffix", None) or comp.prefix]
        )  # AdapterHub keeps units.0 and units.1 even for 0 positions: the unused one is a copy
        for u, iv in enumerate(ivs):
            key = f"{hub_path(mtype, site)}.reft_layer.refts.{name}.units.{u}"
            R = iv.rotation_matrix().detach().float()
            original, base = _orthogonal_form(R, seed=blocks.index(site) * 2 + u)
            tensors[f"{key}.learned_source.weight"] = iv.weight.detach().float().clone()  # units may be copies
            tensors[f"{key}.learned_source.bias"] = iv.bias.detach().float().clone()
            tensors[f"{key}.projection.parametrizations.weight.original"] = original
            tensors[f"{key}.projection.parametrizations.weight.0.base"] = base
    config = {
        "architecture": "reft",
        "dropout": float(cfg.dropout),
        "dtype": None,
        "init_weights_seed": None,
        "layers": "all" if layers == list(range(len(blocks))) else layers,
        "non_linearity": None,
        "orthogonality": True,
        "output_reft": True,
        "prefix_positions": int(cfg.prefix),
        "r": int(cfg.r),
        "suffix_positions": int(cfg.suffix),
        "tied_weights": bool(cfg.share_weights),
    }
    return config, tensors


# --- dispatch ----------------------------------------------------------------------------------------------------


def _sequence_gated(
    ctl: Any, name: str, cfg: SequenceGated, comps: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``SequenceGated(LoRA)`` / ``SequenceGated(Bottleneck)``: the inner method's config with ``use_gating: true``
    (the writers find the gates on the components)."""
    inner = cfg.config
    if isinstance(inner, LoRA):
        return _lora(ctl, name, inner, comps=comps)
    return _bottleneck(ctl, name, inner, comps=comps)


# the writers of one method each (a union's members are written by these too, formats/adapterhub_export_union.py)
WRITERS: dict[type, Writer] = {
    LoRA: _lora,
    IA3: _ia3,
    Bottleneck: _bottleneck,
    LoReFT: _loreft,
    PrefixTuning: prefix,
    EmbeddingPrompt: prompt,
    SequenceGated: _sequence_gated,
}


def _writer(name: str, cfg: Any) -> Writer:
    """The writer for adapter ``name``'s config.

    Raises:
        AdapterHubExportError: a method AdapterHub's format has no exact form for.
    """
    if type(cfg) is Union:
        return _seq_bn_inv if _is_seq_bn_inv(cfg) else partial(union, writers=WRITERS)
    write = WRITERS.get(type(cfg))
    if type(cfg) is PromptTuning:
        raise AdapterHubExportError(prompt_tuning_refusal(name))
    if write is None:
        raise AdapterHubExportError(
            f"adapter {name!r} is {type(cfg).__name__}, which AdapterHub export does not write; it writes LoRA, "
            "(IA)^3, Bottleneck (hook='sublayer': SeqBn/DoubleSeqBn/ParBn/Compacter), LoReFT, prefix tuning "
            "(PrefixTuning(positions='keep')), prompt tuning (EmbeddingPrompt), SequenceGated LoRA/Bottleneck and "
            "their unions (MAM, UniPELT), the methods both libraries have"
        )
    return write
