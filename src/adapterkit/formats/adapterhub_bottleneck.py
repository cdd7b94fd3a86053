"""AdapterHub bottleneck adapters (no ``config.architecture`` key); dispatched from ``formats/adapterhub.py``.

AdapterHub's ``BottleneckLayer`` replaces each residual sub-layer ``out = norm?(f + r)`` of a block (``f`` the
sub-layer output, ``r`` its residual, ``norm`` the block's LayerNorm on post-LN models) by the adapter's
arrangement of the two (``original_ln_before``, ``original_ln_after``, ``residual_before_ln``, ``ln_before``,
``ln_after``, ``adapter_residual_before_ln``, ``is_parallel``, ``scaling``). Our
:class:`~adapterkit.methods.bottleneck.Bottleneck` with ``hook="sublayer"`` computes the same arrangement
(:mod:`~adapterkit.methods.bottleneck_sublayer`), so every SeqBn (Pfeiffer), DoubleSeqBn (Houlsby), ParBn and
Compacter/Compacter++ config loads as that, on the ``attn.sublayer`` (``mh_adapter``) and ``ffn.sublayer``
(``output_adapter``) module of each stored layer.

- **SeqBnInv**: the SeqBn plus the NICE coupling (``<p>invertible_adapters.<name>.{F,G}.{0,2}``) where the
  library's ``post_embedding_forward`` hook puts it: the token embedding's output on LLaMA (``embed_tokens``), the
  output of GPT-2's ``drop`` (after ``wte + wpe``) and of BERT's ``embeddings`` module (after the position
  embeddings and the LayerNorm), as our :class:`~adapterkit.methods.invertible.Invertible` (with ``dim`` for the
  last two) and ``inverse_at_output=False`` (a union): AdapterHub applies the inverse only inside its flex LM heads,
  not on a plain transformers model's ``lm_head`` under ``adapters.init``. Other model types are refused.

Keys: ``<location>.adapters.<name>.adapter_down.0.{weight,bias}`` (``Sequential(Linear, act)``; with ``ln_before``
``Sequential(LayerNorm, Linear, act)``, the LayerNorm also stored as ``adapter_norm_before``), ``adapter_up.*``,
``adapter_norm_after.*`` (``ln_after``) and ``scaling`` (learned scaling); the location is BERT
``encoder.layer.{i}.output`` / ``.attention.output``, GPT-2 ``h.{i}.output_adapters`` / ``.attention_adapters``,
LLaMA ``layers.{i}.output_adapters`` / ``.attention_adapters`` (base-model prefix or not). Each location's layer is
mapped onto this model, then onto our module of role ``ffn.sublayer`` (output adapter) or ``attn.sublayer``
(attention adapter) in that layer, through the model's profile.

``use_gating`` (UniPELT; keys ``...adapters.<name>.gate.{weight,bias}``): the branch is scaled by
``g = mean_t sigmoid(gate(h_t))`` of the adapter input ``h``; loaded as
:class:`~adapterkit.methods.seq_gate.SequenceGated` around the Bottleneck.

Refused with the reason: SeqBnInv with gating, Compacter with ``shared_W_phm``/``factorized_phm_rule``/no bias,
invertible adapters other than NICE, and ``original_ln_after`` false on a post-LN block (AdapterHub then drops the
block's LayerNorm, which a hook on the sub-layer output cannot undo). ``stochastic_depth`` acts only in training
and is not reproduced there (the loaded adapter's eval outputs are the library's).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..methods.bottleneck import Bottleneck, FFNInputTap, ParallelBottleneck, SequentialBottleneck
from ..methods.bottleneck_sublayer import ResidualTap, SublayerBottleneck
from ..methods.invertible import Invertible, InvertibleEmbedding
from ..methods.seq_gate import SequenceGated
from ..methods.union import Union
from ..plan import Plan
from ..profiles import profile_for
from ..targeting import TargetError, base_modules, select
from .adapterhub_files import AdapterHubFile, bottleneck_kind, renamed, resolve_sites
from .io import AdapterFileError, require_float
from .peft import Fields

ARCHITECTURES = ("bottleneck",)
# location suffix -> (which adapter, our role)
_LOCATIONS = (
    (".output.output_adapters", "output", "ffn.sublayer"),  # ViT: ViTOutput holds the output adapters
    (".cross_attention_adapters", "cross", "cross.sublayer"),
    (".attention_adapters", "mh", "attn.sublayer"),
    (".attention.output", "mh", "attn.sublayer"),
    (".output_adapters", "output", "ffn.sublayer"),
    (".output", "output", "ffn.sublayer"),
)
_LEAVES = {
    "adapter_down.0.weight": "down.weight",
    "adapter_down.0.bias": "down.bias",
    "adapter_up.weight": "up.weight",
    "adapter_up.bias": "up.bias",
    "adapter_norm_before.weight": "ln_before.weight",
    "adapter_norm_before.bias": "ln_before.bias",
    "adapter_norm_after.weight": "ln_after.weight",
    "adapter_norm_after.bias": "ln_after.bias",
    "scaling": "scale",
    "gate.weight": "gate.weight",  # use_gating (UniPELT)
    "gate.bias": "gate.bias",
}
# with ln_before, adapter_down is Sequential(LayerNorm, Linear, act): the LayerNorm again under index 0
_LEAVES_LN_BEFORE = {
    **{k: v for k, v in _LEAVES.items() if not k.startswith("adapter_down.")},
    "adapter_down.0.weight": "ln_before.weight",
    "adapter_down.0.bias": "ln_before.bias",
    "adapter_down.1.weight": "down.weight",
    "adapter_down.1.bias": "down.bias",
}
# Compacter's PHM layers: AdapterHub computes y = x @ H + b with H = sum_k kron(rule_k, W_k): (in, out) and
# W_k = W_left_k @ W_right_k: (in/n, out/n). Our PHMLinear computes y = x W^T + b with W = sum_k kron(A_k, B_k):
# (out, in) and B_k = B_left_k @ B_right_k: (out/n, in/n). H^T = sum_k kron(rule_k^T, W_k^T), so A_k = rule_k^T,
# B_left = W_right^T, B_right = W_left^T (each transposed in its last two axes) and B = W^T unfactorized.
_PHM_LEAVES = {"W_left": "B_right", "W_right": "B_left", "W": "B", "phm_rule": "rule.A", "b": "bias"}
for _proj, _stored, _stored_ln in (
    ("down", "adapter_down.0", "adapter_down.1"),
    ("up", "adapter_up", "adapter_up"),
):
    for _theirs, _ours in _PHM_LEAVES.items():
        _LEAVES[f"{_stored}.{_theirs}"] = f"{_proj}.{_ours}"
        _LEAVES_LN_BEFORE[f"{_stored_ln}.{_theirs}"] = f"{_proj}.{_ours}"


def _ours(key: str, value: torch.Tensor) -> torch.Tensor:
    """A stored tensor in our layout (PHM tensors transposed in their last two axes, see ``_PHM_LEAVES``)."""
    leaf = key.rpartition(".")[2]
    return value.transpose(-2, -1) if leaf in ("B_left", "B_right", "B", "A") else value


def refusal(config: dict[str, Any]) -> str | None:
    """Why this bottleneck config cannot be read exactly yet (None: it can; the model is checked in load())."""
    kind = bottleneck_kind(config)
    if kind == "SeqBnInv" and config.get("inv_adapter") != "nice":
        return f"AdapterHub invertible adapters of type {config.get('inv_adapter')!r} are not read (only 'nice')"
    if kind == "Compacter" and (
        config.get("shared_W_phm") or config.get("factorized_phm_rule") or config.get("phm_bias") is False
    ):
        return "AdapterHub Compacter with shared_W_phm, factorized_phm_rule or phm_bias false is not read yet"
    if config.get("use_gating") and kind == "SeqBnInv":
        return "AdapterHub SeqBnInv with use_gating is not read"
    scaling = config.get("scaling", 1.0)
    if isinstance(scaling, bool) or not (isinstance(scaling, (int, float)) or scaling in ("learned", "channel")):
        return f"AdapterHub {kind} with scaling {scaling!r} is not read (a number, 'learned' or 'channel')"
    if config.get("residual_before_ln", True) not in (True, False, "post_add"):
        return f"AdapterHub {kind} with residual_before_ln {config.get('residual_before_ln')!r} is not read"
    return None


def _split(info: AdapterHubFile, where: Path) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor | None]:
    """``(per location, shared rule)``: stored location -> {our tensor name: tensor in our layout}, from
    ``<location>.adapters.<name>.<leaf>``, and Compacter's shared ``<p>shared_parameters.<name>.phm_rule``."""
    marker = f".adapters.{info.saved_name}."
    leaves = _LEAVES_LN_BEFORE if info.config.get("ln_before") else _LEAVES
    shared = f"shared_parameters.{info.saved_name}.phm_rule"
    inv = f"invertible_adapters.{info.saved_name}."
    out: dict[str, dict[str, torch.Tensor]] = {}
    rule = None
    for key, value in info.tensors.items():
        if key == shared or key.endswith("." + shared):
            rule = value.transpose(-2, -1)
            continue
        if key.startswith(inv) or f".{inv}" in key:
            out.setdefault(_INVERTIBLE, {})["coupling." + key.partition(inv)[2]] = value
            continue
        location, sep, leaf = key.partition(marker)
        if not sep or leaf not in leaves:
            raise AdapterFileError(
                f"key {key!r} in {where} is not a bottleneck tensor of adapter {info.saved_name!r} read here "
                f"(expected '<location>{marker}adapter_down.0.weight' and so on)"
            )
        out.setdefault(location, {})[leaves[leaf]] = _ours(leaves[leaf], value)
    if not out:
        raise AdapterFileError(f"{where} holds no bottleneck tensors (keys '<location>{marker}...')")
    return out, rule


_INVERTIBLE = "<invertible>"  # the per-model invertible adapter's entry in _split's result


def _layer_of(location: str, where: Path) -> tuple[str, str, str | None]:
    """``(layer path, "mh"/"cross"/"output", our role)`` of a stored adapter location. A location that is the
    sub-layer module itself (T5's ``block.{i}.layer.{j}``: ``T5LayerSelfAttention``/``T5LayerCrossAttention``/
    ``T5LayerFF`` are AdapterHub's bottleneck layers) gives ``(location, "", None)``: the one sub-layer role module
    inside it decides."""
    for suffix, which, role in _LOCATIONS:
        if location.endswith(suffix):
            return location[: -len(suffix)], which, role
    if location.split(".")[-1].isdigit():
        return location, "", None
    raise AdapterFileError(f"{where}: unknown bottleneck adapter location {location!r}")


# transformers 5 renamed ViT's ``encoder.layer.{i}`` (4.x, what AdapterHub saved) to ``layers.{i}``
def load(ctl: Any, path: str | os.PathLike, info: AdapterHubFile, *, name: str | None, activate: bool) -> str:
    name = name or info.saved_name
    ctl._check_new_name(name)
    ctl.install(name, plan_of(ctl, path, info), activate=activate)
    return name


def plan_of(ctl: Any, path: str | os.PathLike, info: AdapterHubFile) -> Plan:
    """Our plan (config + components holding the file's tensors) for an AdapterHub bottleneck file."""
    where = Path(path)
    why = refusal(info.config)
    if why is not None:
        raise AdapterFileError(f"{path}: {why}")
    fields = Fields(info.config, where)
    kind = bottleneck_kind(info.config)
    stored, rule = _split(info, where)
    phm = fields.flag("phm_layer", False)
    shared_rule = phm and fields.flag("shared_phm_rule", True)
    if shared_rule and rule is None:
        raise AdapterFileError(
            f"{where}: this Compacter's shared phm_rule is missing from the file. adapters <= 1.3.0 drops it when "
            "saving from a bare base model (adapters.init(BertModel(...)): its save filter looks for "
            "'.shared_parameters.'), and its own load_adapter then quietly keeps a random rule. The adapter cannot be "
            "reproduced without it: save it again from a model with a prefix (e.g. BertAdapterModel or "
            "BertForSequenceClassification) where the rule is saved"
        )
    require_float({f"{s}.{k}": v for s, state in stored.items() for k, v in state.items()}, where)
    coupling = stored.pop(_INVERTIBLE, None)
    if (coupling is not None) != (kind == "SeqBnInv"):
        raise AdapterFileError(
            f"{where}: the config {'asks for' if kind == 'SeqBnInv' else 'has no'} an invertible adapter but the file "
            f"{'holds none' if coupling is None else 'holds one'}"
        )
    located = {loc: _layer_of(loc, where) for loc in stored}
    located = {loc: (renamed(layer, ctl.model), w, r) for loc, (layer, w, r) in located.items()}
    layers = resolve_sites(sorted({layer for layer, _, _ in located.values()}), ctl.model, where)
    family, roles = profile_for(ctl.model)
    modules = base_modules(ctl.model)
    per_site: dict[str, dict[str, torch.Tensor]] = {}
    try:
        by_role: dict[str, list[str]] = {}

        def of_role(role: str) -> list[str]:
            if role not in by_role:
                try:
                    by_role[role] = select(ctl.model, [role], family=family, roles=roles, modules=modules)
                except TargetError:
                    if role == "ffn.sublayer":
                        raise
                    by_role[role] = []
            return by_role[role]

        for loc, (layer, _, role) in located.items():
            ours = layers[layer]
            wanted = [role] if role is not None else [f"{k}.sublayer" for k in ("attn", "cross", "ffn")]
            inside = [n for r in wanted for n in of_role(r) if n.startswith(ours + ".")]
            if len(inside) != 1:
                raise TargetError(f"{len(inside)} modules of role(s) {wanted} in {ours!r}")
            per_site[inside[0]] = stored[loc]
    except TargetError as e:
        raise AdapterFileError(
            f"AdapterHub {kind} adapter {str(path)!r}: cannot place its adapters on this "
            f"{type(ctl.model).__name__} ({e})"
        ) from None
    parallel = fields.flag("is_parallel", False)
    mh = any(w == "mh" for _, w, _ in located.values()) or fields.flag("mh_adapter", False)
    placement = "parallel" if parallel else ("houlsby" if mh else "pfeiffer")
    sizes = {state["down.bias"].shape[0] for state in per_site.values() if "down.bias" in state}
    if len(sizes) != 1:
        raise AdapterFileError(f"{where}: bottleneck down projections of several sizes {sorted(sizes)} (or none)")
    (size,) = sizes
    extra: dict[str, Any] = {}
    if phm:
        factorized = fields.flag("factorized_phm_W", True)
        extra = {
            "phm_dim": fields.integer("phm_dim", 4),
            "shared_phm_rule": shared_rule,
            "factorized_phm_W": factorized,
            "phm_rank": fields.integer("phm_rank", 1),
        }
    scaling = info.config.get("scaling", 1.0)
    if not isinstance(scaling, str):
        scaling = fields.number("scaling", 1.0)
    arrangement: dict[str, Any] = {
        "original_ln_after": fields.flag("original_ln_after", True),
        "ln_before": fields.flag("ln_before", False),
        "ln_after": fields.flag("ln_after", False),
    }
    if not parallel:
        arrangement["original_ln_before"] = fields.flag("original_ln_before", False)
        arrangement["residual_before_ln"] = info.config.get("residual_before_ln", True)
        arrangement["adapter_residual_before_ln"] = fields.flag("adapter_residual_before_ln", False)
    cfg: Any = fields.build(
        Bottleneck,
        **extra,
        **arrangement,
        placement=placement,
        hook="sublayer",
        cross_adapter=fields.flag("cross_adapter", False),
        bottleneck_size=size,
        non_linearity=_activation(fields, info),
        scaling=scaling,
        dropout=fields.number("dropout", 0.0),
        targets=tuple(per_site),
    )
    if fields.flag("use_gating", False):
        cfg = SequenceGated(config=cfg)
    if coupling is not None:
        cfg = Union(configs=[cfg, _invertible(ctl, fields, info, path)])
    comps: dict[str, tuple[str, Any]] = {}
    try:
        plan = ctl.plan(cfg)
        for site, (k, comp) in plan.components.items():
            if isinstance(comp, (SequentialBottleneck, ParallelBottleneck, SublayerBottleneck)):
                own = comp.state_dict()
                state = dict(per_site[site])
                if shared_rule and "down.rule.A" in own:  # the first PHM layer in model order owns the rule
                    state["down.rule.A"] = rule
                missing = sorted(set(own) - set(state))
                if missing:
                    raise ValueError(f"{site!r} lacks {missing}")
                comp.import_state({key: state[key].to(own[key].dtype) for key in own}, modules[site])
            elif isinstance(comp, InvertibleEmbedding) and coupling is not None:
                own = comp.state_dict()
                missing = sorted(set(own) - set(coupling))
                if missing:
                    raise ValueError(f"the invertible adapter lacks {missing}")
                comp.import_state({key: coupling[key].to(own[key].dtype) for key in own}, modules[site])
            elif not isinstance(comp, (FFNInputTap, ResidualTap)):
                raise ValueError(f"unexpected component {type(comp).__name__} at {site!r}")
            comps[site] = (k, comp)
    except AdapterFileError:
        raise
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"AdapterHub adapter {str(path)!r} does not fit this model: {e}") from None
    return Plan(cfg, comps)


# where AdapterHub applies the invertible adapter (its ``post_embedding_forward`` hooks), by model type: the token
# embedding's output (LLaMA's embed_tokens: our `embed` role), or the output of a base-model module: GPT-2's
# `drop` (after wte + wpe), BERT's `embeddings` (after the position embeddings and the LayerNorm)
_INVERTIBLE_ON_TOKENS = ("llama",)
_INVERTIBLE_AFTER = {"gpt2": "drop", "bert": "embeddings"}


def _invertible(ctl: Any, fields: Fields, info: AdapterHubFile, path: Any) -> Invertible:
    """Our invertible adapter for a SeqBnInv: on the token embedding, without the inverse at the output embeddings
    (AdapterHub registers that inverse only on its flex language-modelling heads; a plain transformers model under
    ``adapters.init`` runs its LM head on the un-inverted hidden states)."""
    model_type = getattr(getattr(ctl.model, "config", None), "model_type", None)
    factor = info.config.get("inv_adapter_reduction_factor") or 2
    extra: dict[str, Any] = {}
    if model_type in _INVERTIBLE_AFTER:
        base = getattr(ctl.model, getattr(ctl.model, "base_model_prefix", "") or "", ctl.model)
        module = getattr(base, _INVERTIBLE_AFTER[model_type], None)
        names = [n for n, m in base_modules(ctl.model).items() if m is module and module is not None]
        width = getattr(ctl.model.config, "hidden_size", None)
        if len(names) != 1 or not isinstance(width, int):
            raise AdapterFileError(
                f"{path}: no {_INVERTIBLE_AFTER[model_type]!r} module (or hidden_size) in this "
                f"{type(ctl.model).__name__} for AdapterHub's invertible adapter"
            )
        targets, extra = tuple(names), {"dim": width}
    elif model_type in _INVERTIBLE_ON_TOKENS:
        family, roles = profile_for(ctl.model)
        try:
            targets = tuple(select(ctl.model, ["embed"], family=family, roles=roles))
        except TargetError as e:
            raise AdapterFileError(f"{path}: no token embedding for the invertible adapter ({e})") from None
    else:
        raise AdapterFileError(
            f"{path}: AdapterHub's invertible adapter on a {model_type!r} model is not read (read for "
            f"{', '.join(sorted((*_INVERTIBLE_AFTER, *_INVERTIBLE_ON_TOKENS)))}: where the library hooks it is "
            "checked per model type)"
        )
    return fields.build(
        Invertible,
        reduction_factor=factor,
        non_linearity=_activation(fields, info),
        inverse_at_output=False,
        targets=targets,
        **extra,
    )


# AdapterHub's activation names (transformers' ``get_activation``, lower-cased) that ours mean the same by
_ACTIVATIONS = ("relu", "swish", "silu", "tanh", "sigmoid", "gelu", "gelu_new", "leakyrelu", "linear")


def _activation(fields: Fields, info: AdapterHubFile) -> str:
    """Our name for the config's ``non_linearity``; files without ``version`` (adapter-transformers) meant
    ``gelu_new`` by ``"gelu"`` and ``gelu`` by ``"gelu_orig"`` (the library renames them on load)."""
    value = fields.data.get("non_linearity", "relu")
    if isinstance(value, str):
        value = value.lower()
        if not info.data.get("version"):
            value = {"gelu": "gelu_new", "gelu_orig": "gelu"}.get(value, value)
    if value not in _ACTIVATIONS:
        raise fields.error("non_linearity", value, "one of " + ", ".join(_ACTIVATIONS))
    return value
