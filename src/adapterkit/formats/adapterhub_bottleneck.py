"""AdapterHub bottleneck adapters (no ``config.architecture`` key); dispatched from ``formats/adapterhub.py``.

What is read here is the part of AdapterHub's bottleneck family whose semantics our
:class:`~adapterkit.methods.bottleneck.Bottleneck` already has exactly:

- **Sequential adapters that leave the model's residual and LayerNorm where they are**: ``original_ln_before``
  false, ``original_ln_after`` true, ``residual_before_ln`` true (AdapterHub's ``DoubleSeqBn``/Houlsby defaults).
  AdapterHub then computes, on the sub-layer output ``f`` (after the projection and its dropout),
  ``out = f + s · up(act(down(f)))`` and hands ``out`` to the model's own residual (+ LayerNorm on BERT):
  our sequential adapter on the projection output (``placement="houlsby"`` on the roles ``attn.out`` and
  ``ffn.down``; ``mh_adapter`` is the attention one, ``output_adapter`` the FFN one).
- **SeqBn on GPT-2 and LLaMA** (``original_ln_before``, ``original_ln_after``, ``residual_before_ln`` all true,
  AdapterHub's default): these blocks have no LayerNorm where AdapterHub calls the output adapter, so it computes
  ``r + f + s · up(act(down(f + r)))`` with ``r`` the block residual and ``f`` the MLP output: ``y + s·g(y)`` on
  the block's output ``y``, i.e. our sequential adapter on the block module (explicit block targets).
- **SeqBnInv on LLaMA**: the SeqBn above plus the NICE coupling (``<p>invertible_adapters.<name>.{F,G}.{0,2}``)
  on the token embedding's output (LLaMA's ``embed_tokens``), as our :class:`~adapterkit.methods.invertible.
  Invertible` with ``inverse_at_output=False`` (a union): AdapterHub applies the inverse only inside its flex LM
  heads, not on a plain transformers model's ``lm_head`` under ``adapters.init``. GPT-2 (after the position
  embeddings) and BERT (after the embeddings' LayerNorm) are refused.
- **ParBn on BERT-like models** (``is_parallel``): AdapterHub's adapter reads the sub-layer's ``input_tensor``,
  which in ``BertOutput`` is the FFN input, and adds ``s · up(act(down(x)))`` to the FFN output before the
  residual and LayerNorm: our ``placement="parallel"`` on ``ffn.down`` with the input tapped at ``ffn.in``.

Keys: ``<location>.adapters.<name>.adapter_down.0.{weight,bias}`` (``Sequential(Linear, act)``) and
``adapter_up.{weight,bias}``; the location is BERT ``encoder.layer.{i}.output`` / ``.attention.output``, GPT-2
``h.{i}.output_adapters`` / ``.attention_adapters``, LLaMA ``layers.{i}.output_adapters`` / ``.attention_adapters``
(base-model prefix or not). Each location's layer is mapped onto this model, then onto our module of role
``ffn.down`` (FFN) or ``attn.out`` (attention) in that layer, through the model's profile.

Everything else is refused with the missing piece named: ``SeqBn`` on BERT-like models (``original_ln_before``:
the block's LayerNorm applied before the adapter and again after it, and the adapter input ``f + residual``),
ParBn on GPT-2/LLaMA-style blocks (the adapter reads the block residual before the MLP's LayerNorm), SeqBnInv
on GPT-2 and BERT, ``ln_before``/``ln_after``, gating and learned scaling. They need
hooks on the module that holds the residual and the LayerNorm (issue 16 item 2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..methods.bottleneck import Bottleneck, FFNInputTap, ParallelBottleneck, SequentialBottleneck
from ..methods.invertible import Invertible, InvertibleEmbedding
from ..methods.union import Union
from ..plan import Plan
from ..profiles import profile_for
from ..targeting import TargetError, base_modules, select
from .adapterhub_files import AdapterHubFile, bottleneck_kind, resolve_sites
from .io import AdapterFileError, require_float
from .peft import Fields

ARCHITECTURES = ("bottleneck",)
NEEDS_HOOKS = (
    "needs hooks on the module that holds the residual and the LayerNorm (original_ln_before/after, "
    "residual_before_ln, ...), issue 16 item 2"
)
# location suffix -> (which adapter, our role)
_LOCATIONS = (
    (".attention_adapters", "mh", "attn.out"),
    (".attention.output", "mh", "attn.out"),
    (".output_adapters", "output", "ffn.down"),
    (".output", "output", "ffn.down"),
)
_LEAVES = {
    "adapter_down.0.weight": "down.weight",
    "adapter_down.0.bias": "down.bias",
    "adapter_up.weight": "up.weight",
    "adapter_up.bias": "up.bias",
}
# Compacter's PHM layers: AdapterHub computes y = x @ H + b with H = sum_k kron(rule_k, W_k): (in, out) and
# W_k = W_left_k @ W_right_k: (in/n, out/n). Our PHMLinear computes y = x W^T + b with W = sum_k kron(A_k, B_k):
# (out, in) and B_k = B_left_k @ B_right_k: (out/n, in/n). H^T = sum_k kron(rule_k^T, W_k^T), so A_k = rule_k^T,
# B_left = W_right^T, B_right = W_left^T (each transposed in its last two axes) and B = W^T unfactorized.
_PHM_LEAVES = {"W_left": "B_right", "W_right": "B_left", "W": "B", "phm_rule": "rule.A", "b": "bias"}
for _proj, _stored in (("down", "adapter_down.0"), ("up", "adapter_up")):
    for _theirs, _ours in _PHM_LEAVES.items():
        _LEAVES[f"{_stored}.{_theirs}"] = f"{_proj}.{_ours}"


def _ours(key: str, value: torch.Tensor) -> torch.Tensor:
    """A stored tensor in our layout (PHM tensors transposed in their last two axes, see ``_PHM_LEAVES``)."""
    leaf = key.rpartition(".")[2]
    return value.transpose(-2, -1) if leaf in ("B_left", "B_right", "B", "A") else value


def refusal(config: dict[str, Any]) -> str | None:
    """Why this bottleneck config cannot be read exactly yet (None: it can)."""
    kind = bottleneck_kind(config)
    if kind == "SeqBnInv" and config.get("inv_adapter") != "nice":
        return f"AdapterHub invertible adapters of type {config.get('inv_adapter')!r} are not read (only 'nice')"
    if kind == "Compacter" and (
        config.get("shared_W_phm") or config.get("factorized_phm_rule") or config.get("phm_bias") is False
    ):
        return "AdapterHub Compacter with shared_W_phm, factorized_phm_rule or phm_bias false is not read yet"
    if config.get("ln_before") or config.get("ln_after"):
        return f"AdapterHub {kind} with ln_before/ln_after is not read yet ({NEEDS_HOOKS})"
    if config.get("use_gating"):
        return f"AdapterHub {kind} with use_gating (UniPELT) is not read yet"
    if not isinstance(config.get("scaling", 1.0), (int, float)) or isinstance(config.get("scaling"), bool):
        return f"AdapterHub {kind} with scaling {config.get('scaling')!r} (a trained scale) is not read yet"
    if kind == "ParBn" or _arrangement(config) is not None:
        return None  # the placement is checked against the model in load()
    return f"AdapterHub {kind} {NEEDS_HOOKS}"


def _arrangement(config: dict[str, Any]) -> str | None:
    """How a sequential adapter sits relative to the model's residual and LayerNorm, when we can place it:

    - ``"projection"``: ``original_ln_before`` false, ``original_ln_after`` true, ``residual_before_ln`` true
      (DoubleSeqBn): ``f + s·g(f)`` on the sub-layer output ``f``, then the model's own residual (+ LayerNorm).
    - ``"block"``: ``original_ln_before``, ``original_ln_after``, ``residual_before_ln`` all true (SeqBn): on
      blocks without a LayerNorm at that point (GPT-2, LLaMA), ``r + f + s·g(f + r)``, i.e. ``y + s·g(y)`` on
      the block's output ``y = r + f``.
    """
    after = config.get("original_ln_after", True) is True and config.get("residual_before_ln", True) is True
    if not after:
        return None
    return "projection" if config.get("original_ln_before") is False else "block"


# model types whose AdapterHub blocks call their output adapters without a LayerNorm, as the last step of the block
# (checked against the fixtures: GPT-2, LLaMA)
_BLOCK_END = ("gpt2", "llama")


def _split(info: AdapterHubFile, where: Path) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor | None]:
    """``(per location, shared rule)``: stored location -> {our tensor name: tensor in our layout}, from
    ``<location>.adapters.<name>.<leaf>``, and Compacter's shared ``<p>shared_parameters.<name>.phm_rule``."""
    marker = f".adapters.{info.saved_name}."
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
        if not sep or leaf not in _LEAVES:
            raise AdapterFileError(
                f"key {key!r} in {where} is not a bottleneck tensor of adapter {info.saved_name!r} read here "
                f"(expected '<location>{marker}adapter_down.0.weight' and so on)"
            )
        out.setdefault(location, {})[_LEAVES[leaf]] = _ours(_LEAVES[leaf], value)
    if not out:
        raise AdapterFileError(f"{where} holds no bottleneck tensors (keys '<location>{marker}...')")
    return out, rule


_INVERTIBLE = "<invertible>"  # the per-model invertible adapter's entry in _split's result


def _layer_of(location: str, where: Path) -> tuple[str, str, str]:
    """``(layer path, "mh"/"output", our role)`` of a stored adapter location."""
    for suffix, which, role in _LOCATIONS:
        if location.endswith(suffix):
            return location[: -len(suffix)], which, role
    raise AdapterFileError(f"{where}: unknown bottleneck adapter location {location!r}")


def load(ctl: Any, path: str | os.PathLike, info: AdapterHubFile, *, name: str | None, activate: bool) -> str:
    where = Path(path)
    why = refusal(info.config)
    if why is not None:
        raise AdapterFileError(f"{path}: {why}")
    fields = Fields(info.config, where)
    kind = bottleneck_kind(info.config)
    name = name or info.saved_name
    ctl._check_new_name(name)
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
    layers = resolve_sites(sorted({layer for layer, _, _ in located.values()}), ctl.model, where)
    family, roles = profile_for(ctl.model)
    modules = base_modules(ctl.model)
    per_site: dict[str, dict[str, torch.Tensor]] = {}
    on_blocks = kind != "ParBn" and _arrangement(info.config) == "block"
    if on_blocks:
        model_type = getattr(getattr(ctl.model, "config", None), "model_type", None)
        if model_type not in _BLOCK_END or not all(loc.endswith(".output_adapters") for loc in located):
            raise AdapterFileError(
                f"{path}: AdapterHub {kind} (original_ln_before) on this {type(ctl.model).__name__} applies the "
                f"block's LayerNorm before the adapter and again after it, or sits mid-block; it {NEEDS_HOOKS}"
            )
        per_site = {layers[layer]: stored[loc] for loc, (layer, _, _) in located.items()}
    try:
        by_role: dict[str, list[str]] = {}
        for loc, (layer, _, role) in located.items():
            if on_blocks:
                break
            ours = layers[layer]
            if role not in by_role:
                by_role[role] = select(ctl.model, [role], family=family, roles=roles, modules=modules)
            inside = [n for n in by_role[role] if n.startswith(ours + ".")]
            if len(inside) != 1:
                raise TargetError(f"{len(inside)} modules of role {role!r} in layer {ours!r}")
            per_site[inside[0]] = stored[loc]
    except TargetError as e:
        raise AdapterFileError(
            f"AdapterHub {kind} adapter {str(path)!r}: cannot place its adapters on this "
            f"{type(ctl.model).__name__} ({e})"
        ) from None
    if kind == "ParBn":
        if "ffn" in roles or any(w == "mh" for _, w, _ in located.values()):
            raise AdapterFileError(
                f"{path}: AdapterHub ParBn on this {type(ctl.model).__name__} reads the block residual before the "
                f"MLP's LayerNorm; it {NEEDS_HOOKS}"
            )
        placement = "parallel"
    else:
        placement = "pfeiffer" if on_blocks else "houlsby"
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
    cfg: Any = fields.build(
        Bottleneck,
        **extra,
        placement=placement,
        bottleneck_size=size,
        non_linearity=_activation(fields, info),
        scaling=fields.number("scaling", 1.0),
        dropout=fields.number("dropout", 0.0),
        targets=tuple(per_site),
    )
    if coupling is not None:
        cfg = Union(configs=[cfg, _invertible(ctl, fields, info, path)])
    comps: dict[str, tuple[str, Any]] = {}
    try:
        plan = ctl.plan(cfg)
        for site, (k, comp) in plan.components.items():
            if isinstance(comp, (SequentialBottleneck, ParallelBottleneck)):
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
            elif not isinstance(comp, FFNInputTap):
                raise ValueError(f"unexpected component {type(comp).__name__} at {site!r}")
            comps[site] = (k, comp)
    except AdapterFileError:
        raise
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"AdapterHub adapter {str(path)!r} does not fit this model: {e}") from None
    ctl.install(name, Plan(cfg, comps), activate=activate)
    return name


# model types where AdapterHub applies the invertible adapter to the token embedding's output (LLaMA hooks
# embed_tokens); GPT-2 applies it after the position embeddings (on `drop`), BERT after the embeddings' LayerNorm
_INVERTIBLE_ON_TOKENS = ("llama",)


def _invertible(ctl: Any, fields: Fields, info: AdapterHubFile, path: Any) -> Invertible:
    """Our invertible adapter for a SeqBnInv: on the token embedding, without the inverse at the output embeddings
    (AdapterHub registers that inverse only on its flex language-modelling heads; a plain transformers model under
    ``adapters.init`` runs its LM head on the un-inverted hidden states)."""
    model_type = getattr(getattr(ctl.model, "config", None), "model_type", None)
    if model_type not in _INVERTIBLE_ON_TOKENS:
        raise AdapterFileError(
            f"{path}: AdapterHub applies the invertible adapter of a {model_type!r} model after the position "
            "embeddings (GPT-2) or the embeddings' LayerNorm (BERT), where ours cannot act yet: it needs an "
            "'after the embeddings' site, issue 16 item 2"
        )
    family, roles = profile_for(ctl.model)
    try:
        embed = select(ctl.model, ["embed"], family=family, roles=roles)
    except TargetError as e:
        raise AdapterFileError(f"{path}: no token embedding for the invertible adapter ({e})") from None
    factor = info.config.get("inv_adapter_reduction_factor") or 2
    return fields.build(
        Invertible,
        reduction_factor=factor,
        non_linearity=_activation(fields, info),
        inverse_at_output=False,
        targets=tuple(embed),
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
