"""AdapterHub export of prefix tuning and prompt tuning (the inverse of ``formats/adapterhub_prefix.py`` and
``formats/adapterhub_prompt.py``; called by ``formats/adapterhub_export.py``; the format:
../shared/formats/adapterhub.md).

- :class:`~adapterkit.methods.prefix.PrefixTuning` with ``positions="keep"`` -> ``PrefixTuningConfig``
  (``architecture: "prefix_tuning"``). AdapterHub concatenates its prefixes inside each attention layer, after the
  position embeddings / rotary positions, so the real tokens keep positions ``0 .. L-1``: that is
  ``positions="keep"``; ``"shift"`` (peft's semantics, our default) numbers them after the prefix and is refused.
  Forms:

  - plain prefix (``prefix_projection=False``, and every AdapterHub prefix we loaded) -> the flat form
    (``flat: true``): ``...self_prefix.control_trans: (P * n_layers * 2 * kv_dim,)``, our ``prefix: (P, width)``
    flattened (both are ``(P, n_layers, 2, kv_heads, head_dim)`` in memory).
  - reparametrized (``prefix_projection=True``, Li & Liang §4.3) -> the MLP form (``flat: false``,
    ``bottleneck_size`` = ``encoder_hidden_size``): ``wte.weight: (P, H)``, ``control_trans.0: Linear(H,
    bottleneck)``, ``control_trans.2: Linear(bottleneck, width)``, ``non_linearity: "tanh"``. Our embedding is
    ``(P, kv_dim)``; where ``kv_dim < H`` (grouped-query attention: LLaMA, Mistral) the embedding and
    ``control_trans.0``'s input columns are padded with zeros, which adds exactly nothing.

  The tensors go under ``<p>prefix_tuning.prefix_tunings.<name>.self_prefix.*`` (the pool on the base model)
  and again under every layer's ``<attention>.prefix_tuning.pool.prefix_tunings.<name>.self_prefix.*``: the
  library's ``load_adapter`` walks every path to the shared pool and reports the copies missing otherwise.
  ``gated=True`` (UniPELT) -> ``use_gating: true``, ``shared_gating: gate_outputs == 1``, each layer's gate under
  ``<attention>.prefix_tuning.prefix_gates.<name>.{weight, bias}``.

  The library's own safetensors save of a prefix fails (its 1 + n_layers keys share one storage; issue 16 item
  5), but its ``load_adapter(..., use_safetensors=True)`` reads a safetensors file whose keys are separate copies
  of the same values: that is what is written (``adapter.safetensors``, checked by
  tests/test_adapterhub_export_prompt.py's slow test with adapters 1.3.0).

  Models: the BERT-like encoders, GPT-2, LLaMA and Mistral (AdapterHub's ``self_prefix`` location), whose
  attention heads have the size AdapterHub assumes (``hidden_size // num_attention_heads``; a model with its own
  ``head_dim`` is refused).

  ``PrefixTuning(inject="attention")`` (a prefix inside each attention module; also DistilBERT, T5, mT5, BART,
  ViT) -> the flat form per location (``self_prefix``, DistilBERT's ``self``, ``encoder_prefix``,
  ``cross_prefix``: the layers' prefixes side by side), the pool's copies under every attention module, gates per
  prefixed attention; layers without a prefix -> ``leave_out`` (whole layers: encoder layers first, then the
  decoder's, whose self- and cross-attention go together), an encoder-decoder model without encoder/cross prefixes -> ``encoder_prefix`` /
  ``cross_prefix`` false (a prefix without the self-attention one is refused: AdapterHub always has it).

- :class:`~adapterkit.methods.embedding_prompt.EmbeddingPrompt` -> ``PromptTuningConfig`` (``combine:
  "prefix"``): ``<p>prompt_tuning.prompt_tunings.<name>.prompt_embedding.weight: (P, H)``. BERT-like encoders
  and DistilBERT only, as the reader (AdapterHub puts a decoder's prompt before the position embeddings, which our
  EmbeddingPrompt does not). Refused: :class:`~adapterkit.methods.prompt.PromptTuning` (peft's prompt tuning:
  the prompt joins ``inputs_embeds`` before the position embeddings and LayerNorm, and token-level outputs drop
  its positions).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..methods.embedding_prompt import EmbeddingPrompt, EmbeddingsOutputPrompt, PromptMask
from ..methods.prefix import (
    AttentionPrefix,
    PrefixGate,
    PrefixKV,
    PrefixTuning,
    attention_modules,
    self_attention_modules,
)
from ..targeting import base_modules
from .adapterhub_export_common import BERT_LIKE, AdapterHubExportError, hub_path, model_type, owner, targets
from .adapterhub_prefix import hub_layer
from .adapterhub_prompt import MODEL_TYPES as PROMPT_MODEL_TYPES

__all__ = ["prefix", "prompt", "prompt_tuning_refusal", "PREFIX_MODEL_TYPES"]

# model types whose AdapterHub prefix sits at the "self_prefix" location of each layer's self-attention
PREFIX_MODEL_TYPES = (*BERT_LIKE, "gpt2", "llama", "mistral")
_BOTTLENECK_DEFAULT = 512  # PrefixTuningConfig.bottleneck_size (unused by the flat form)


def _prefix_config(length: int, flat: bool, bottleneck: int, cfg: PrefixTuning) -> dict[str, Any]:
    """The resolved ``PrefixTuningConfig`` fields as the library writes them (its defaults where ours has no
    counterpart: ``encoder_prefix``/``cross_prefix`` only matter on encoder-decoder models, not exported)."""
    return {
        "architecture": "prefix_tuning",
        "bottleneck_size": int(bottleneck),
        "cross_prefix": True,
        "dropout": 0.0,
        "encoder_prefix": True,
        "flat": flat,
        "init_weights_seed": None,
        "leave_out": [],
        "non_linearity": "tanh",
        "prefix_length": int(length),
        "shared_gating": cfg.gate_outputs == 1,
        "use_gating": bool(cfg.gated),
    }


def _mlp_leaves(kv: PrefixKV, hidden: int) -> dict[str, torch.Tensor] | None:
    """AdapterHub's MLP form of our reparametrized prefix (``kv_dim <= H`` once :func:`_check_heads` passed), None
    where it has no exact one."""
    emb = kv.embedding.detach().float()
    first, act, last = kv.transform
    if not isinstance(act, nn.Tanh) or emb.shape[1] > hidden:
        return None
    pad = hidden - emb.shape[1]
    w0 = first.weight.detach().float()
    return {
        "wte.weight": torch.cat([emb, emb.new_zeros(emb.shape[0], pad)], 1),
        "control_trans.0.weight": torch.cat([w0, w0.new_zeros(w0.shape[0], pad)], 1),
        "control_trans.0.bias": first.bias.detach().float(),
        "control_trans.2.weight": last.weight.detach().float(),
        "control_trans.2.bias": last.bias.detach().float(),
    }


def _check_heads(ctl: Any, name: str, kv: PrefixKV) -> int:
    """The hidden size, once the model's key/value heads are what AdapterHub sizes its prefix by:
    ``num_key_value_heads`` (else ``num_attention_heads``) heads of ``d_kv`` (else ``hidden_size //
    num_attention_heads``) features.

    Raises:
        AdapterHubExportError: a model whose attention heads have another size (a ``head_dim`` of its own): the
            library would cut the prefix into heads of the wrong width.
    """
    mcfg = ctl.model.config
    hidden, heads = int(mcfg.hidden_size), int(mcfg.num_attention_heads)
    theirs = (
        int(getattr(mcfg, "num_key_value_heads", None) or heads),
        getattr(mcfg, "d_kv", None) or hidden // heads,
    )
    ours = (kv.layout.num_kv_heads, kv.layout.head_dim)
    if ours != theirs:
        raise AdapterHubExportError(
            f"adapter {name!r}: this model's self-attention has {ours[0]} key/value heads of {ours[1]} features, but "
            f"AdapterHub's prefix tuning cuts the prefix into {theirs[0]} heads of {theirs[1]} (num_key_value_heads, "
            "hidden_size // num_attention_heads), so it cannot hold this prefix"
        )
    return hidden


def prefix(
    ctl: Any, name: str, cfg: PrefixTuning, comps: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(PrefixTuningConfig dict, tensors)`` of prefix-tuning adapter ``name`` (module docstring).

    Raises:
        AdapterHubExportError: ``positions="shift"``, a model type without AdapterHub's ``self_prefix``, or
            components that are no prefix.
    """
    if cfg.positions != "keep":
        raise AdapterHubExportError(
            f"adapter {name!r} is a PrefixTuning with positions={cfg.positions!r} (peft's semantics: the real tokens "
            "are numbered after the prefix), which AdapterHub export does not write: AdapterHub's prefixes enter "
            "inside the attention, after the position embeddings, so the real tokens keep positions 0 .. L-1. "
            "Train with PrefixTuning(positions='keep') (the presets 'prefix_tuning', 'mam' and 'unipelt' use "
            "'shift') to export; the prefix learned for shifted positions computes something else there"
        )
    mtype = model_type(ctl)
    comps = targets(ctl, name) if comps is None else comps
    if cfg.inject == "attention":
        return _attention_prefix(ctl, name, cfg, comps, mtype)
    if mtype not in PREFIX_MODEL_TYPES:
        raise AdapterHubExportError(
            f"adapter {name!r}: AdapterHub prefix tuning is exported for {', '.join(PREFIX_MODEL_TYPES)} models "
            f"(its 'self_prefix' location), not {mtype!r}"
        )
    kvs = [c for s, c in comps.items() if isinstance(c, PrefixKV) and s == ""]
    gates = {s: c for s, c in comps.items() if isinstance(c, PrefixGate)}
    other = [f"{type(c).__name__} at {s!r}" for s, c in comps.items() if c not in kvs and s not in gates]
    if len(kvs) != 1 or other:
        raise AdapterHubExportError(f"adapter {name!r}: {other[:3] or 'no prefix'} have no AdapterHub prefix form")
    (kv,) = kvs
    modules = base_modules(ctl.model)
    names = {id(m): n for n, m in modules.items()}
    sites = [names[id(m)] for m in self_attention_modules(ctl.model)]
    if len(sites) != kv.layout.num_layers:
        raise AdapterHubExportError(
            f"adapter {name!r}: {len(sites)} self-attention modules for a prefix over {kv.layout.num_layers} layers"
        )
    hidden = _check_heads(ctl, name, kv)
    leaves = _mlp_leaves(kv, hidden) if kv.prefix is None else None
    if leaves is None:
        flat, bottleneck = True, cfg.encoder_hidden_size or _BOTTLENECK_DEFAULT
        leaves = {"control_trans": kv.values().detach().float().reshape(-1)}
    else:
        flat, bottleneck = False, leaves["control_trans.0.bias"].shape[0]
    tensors: dict[str, torch.Tensor] = {}
    pool = f"prefix_tunings.{name}.self_prefix"
    for leaf, value in leaves.items():  # separate copies: safetensors stores no shared storage
        tensors[f"{owner(ctl.model)}prefix_tuning.{pool}.{leaf}"] = value.contiguous().clone()
        for site in sites:
            tensors[f"{hub_path(mtype, site)}.prefix_tuning.pool.{pool}.{leaf}"] = value.contiguous().clone()
    if cfg.gated:
        if set(gates) != set(sites):
            raise AdapterHubExportError(
                f"adapter {name!r}: its prefix gates sit on {sorted(gates)}, not on every layer's self-attention "
                f"{sites}"
            )
        for site in sites:
            gate = gates[site].gate
            key = f"{hub_path(mtype, site)}.prefix_tuning.prefix_gates.{name}"
            tensors[f"{key}.weight"] = gate.weight.detach().float().contiguous().clone()
            tensors[f"{key}.bias"] = gate.bias.detach().float().contiguous().clone()
    elif gates:
        raise AdapterHubExportError(f"adapter {name!r}: prefix gates on a prefix whose config is not gated")
    return _prefix_config(kv.num_virtual_tokens, flat, bottleneck, cfg), tensors


# model types with AdapterHub prefix tuning inside each attention module (PrefixTuning(inject="attention"))
ATTENTION_MODEL_TYPES = (*PREFIX_MODEL_TYPES, "distilbert", "t5", "mt5", "bart", "vit")


def _location_key(mtype: str, location: str) -> str:
    """AdapterHub's location key of our ``PrefixTuning.locations`` entry (DistilBERT's self-attention is
    ``"self"``, everywhere else ``"<location>_prefix"``)."""
    return "self" if mtype == "distilbert" else f"{location}_prefix"


def _attention_path(mtype: str, site: str) -> str:
    """The 4.57 path of the module holding AdapterHub's ``PrefixTuningLayer`` for our attention module ``site``
    (ViT: 5's ``layers.{i}.attention`` is 4.57's ``encoder.layer.{i}.attention.attention``)."""
    path = hub_path(mtype, site)
    return path + ".attention" if mtype == "vit" else path


def _attention_prefix(
    ctl: Any, name: str, cfg: PrefixTuning, comps: dict[str, Any], mtype: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``PrefixTuning(inject="attention")``: the flat form per location (its layers' prefixes side by side, layer
    ``j`` at slots ``2j``, ``2j + 1``), the pool's copies under every attention module, the gates under each
    prefixed one; layers without a prefix -> ``leave_out`` (AdapterHub's numbering: the decoder's layers after the
    encoder's), absent cross/encoder prefixes -> ``cross_prefix``/``encoder_prefix`` false."""
    if mtype not in ATTENTION_MODEL_TYPES:
        raise AdapterHubExportError(
            f"adapter {name!r}: AdapterHub prefix tuning is exported for {', '.join(ATTENTION_MODEL_TYPES)} models, "
            f"not {mtype!r}"
        )
    mine = {s: c for s, c in comps.items() if isinstance(c, AttentionPrefix)}
    other = [f"{type(c).__name__} at {s!r}" for s, c in comps.items() if s not in mine]
    if not mine or other:
        raise AdapterHubExportError(f"adapter {name!r}: {other[:3] or 'no prefix'} have no AdapterHub prefix form")
    model = ctl.model
    all_attn = attention_modules(model)
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    hidden = int(model.config.hidden_size)
    heads = int(model.config.num_attention_heads)
    theirs = (
        int(getattr(model.config, "num_key_value_heads", None) or heads),
        getattr(model.config, "d_kv", None) or hidden // heads,
    )
    by_loc: dict[str, list[tuple[str, AttentionPrefix]]] = {}
    for site, comp in mine.items():
        if (comp.kv_heads, comp.head_dim) != theirs:
            raise AdapterHubExportError(
                f"adapter {name!r}: the attention at {site!r} has {comp.kv_heads} key/value heads of {comp.head_dim} "
                f"features, AdapterHub's prefix tuning cuts the prefix into {theirs[0]} heads of {theirs[1]}"
            )
        by_loc.setdefault(comp.location, []).append((site, comp))
    if "self" not in by_loc:
        raise AdapterHubExportError(
            f"adapter {name!r}: a prefix without one on the (decoder) self-attention, which AdapterHub's prefix tuning "
            "always has (only encoder_prefix and cross_prefix can be switched off)"
        )
    ranges: dict[str, set[int | None]] = {}
    missing: dict[str, set[int | None]] = {}
    for loc, found in by_loc.items():
        found.sort(key=lambda sc: sc[1].layer)
        ranges[loc] = {hub_layer(n, lk, all_attn) for n, lk, _ in all_attn if lk == loc}
        missing[loc] = ranges[loc] - {hub_layer(s, loc, all_attn) for s, _ in found}
        if [c.layer for _, c in found] != list(range(len(found))):
            raise AdapterHubExportError(f"adapter {name!r}: prefix layers out of order at {loc!r}")
    leave_out = set().union(*missing.values())
    if None in leave_out or any(missing[loc] != leave_out & ranges[loc] for loc in by_loc):
        raise AdapterHubExportError(
            f"adapter {name!r}: prefixes on different layers per attention kind ({ {k: sorted(v) for k, v in missing.items()} } "
            "left out), which AdapterHub's leave_out cannot say (it leaves out whole layers: the decoder's "
            "self- and cross-attention together)"
        )
    lengths = {c.num_virtual_tokens for c in mine.values()}
    if len(lengths) != 1:
        raise AdapterHubExportError(f"adapter {name!r}: prefixes of several lengths {sorted(lengths)}")
    leaves: dict[str, torch.Tensor] = {}
    for loc, found in by_loc.items():
        flat = torch.cat([c.prefix.detach().float() for _, c in found], dim=1).reshape(-1)
        leaves[f"prefix_tunings.{name}.{_location_key(mtype, loc)}.control_trans"] = flat
    tensors: dict[str, torch.Tensor] = {}
    base = owner(model)
    for leaf, value in leaves.items():  # separate copies: safetensors stores no shared storage
        tensors[f"{base}prefix_tuning.{leaf}"] = value.contiguous().clone()
        for site, _, _ in all_attn:
            tensors[f"{_attention_path(mtype, site)}.prefix_tuning.pool.{leaf}"] = value.contiguous().clone()
    gated = {s for s, c in mine.items() if c.gate is not None}
    if cfg.gated != bool(gated) or (gated and gated != set(mine)):
        raise AdapterHubExportError(f"adapter {name!r}: prefix gates on some prefixed attention modules only")
    for site in sorted(gated):
        gate = mine[site].gate
        key = f"{_attention_path(mtype, site)}.prefix_tuning.prefix_gates.{name}"
        tensors[f"{key}.weight"] = gate.weight.detach().float().contiguous().clone()
        tensors[f"{key}.bias"] = gate.bias.detach().float().contiguous().clone()
    config = _prefix_config(lengths.pop(), True, cfg.encoder_hidden_size or _BOTTLENECK_DEFAULT, cfg)
    config["leave_out"] = sorted(leave_out)  # type: ignore[type-var]
    if enc_dec:
        config["encoder_prefix"] = "encoder" in by_loc
        config["cross_prefix"] = "cross" in by_loc
    return config, tensors


def prompt(
    ctl: Any, name: str, cfg: EmbeddingPrompt, comps: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(PromptTuningConfig dict, tensors)`` of an :class:`EmbeddingPrompt` adapter (module docstring).

    Raises:
        AdapterHubExportError: a model type AdapterHub puts the prompt elsewhere on.
    """
    mtype = model_type(ctl)
    if mtype not in PROMPT_MODEL_TYPES:
        raise AdapterHubExportError(
            f"adapter {name!r}: AdapterHub prompt tuning is exported for {', '.join(PROMPT_MODEL_TYPES)} models "
            f"(the prompt after the embeddings module, as EmbeddingPrompt), not {mtype!r}"
        )
    comps = targets(ctl, name) if comps is None else comps
    prompts = [c for c in comps.values() if isinstance(c, EmbeddingsOutputPrompt)]
    other = [f"{type(c).__name__} at {s!r}" for s, c in comps.items() if not isinstance(c, (EmbeddingsOutputPrompt, PromptMask))]  # fmt: skip
    if len(prompts) != 1 or other:
        raise AdapterHubExportError(f"adapter {name!r}: {other[:3] or 'no prompt'} have no AdapterHub prompt form")
    weight = prompts[0].prompt.detach().float()
    key = f"{owner(ctl.model)}prompt_tuning.prompt_tunings.{name}.prompt_embedding.weight"
    config = {
        "architecture": "prompt_tuning",
        "combine": "prefix",
        "init_weights_seed": None,
        "prompt_init": "random_uniform",
        "prompt_init_text": None,
        "prompt_length": int(weight.shape[0]),
    }
    return config, {key: weight.contiguous().clone()}


def prompt_tuning_refusal(name: str) -> str:
    """Why a peft-style :class:`~adapterkit.methods.prompt.PromptTuning` adapter is not exported."""
    return (
        f"adapter {name!r} is PromptTuning (peft's prompt tuning: the prompt joins inputs_embeds before the position "
        "embeddings and LayerNorm, and token-level outputs drop its positions), which AdapterHub export does not "
        "write: AdapterHub's prompt tuning is ak.EmbeddingPrompt (the prompt after the embeddings module, its "
        "positions kept in the outputs). Train ak.EmbeddingPrompt(num_virtual_tokens=...) to export"
    )
