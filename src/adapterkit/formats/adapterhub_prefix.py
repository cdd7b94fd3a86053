"""AdapterHub prefix tuning (``config.architecture == "prefix_tuning"``): the tensors, read by their shapes.

AdapterHub keeps one ``PrefixTuningPool`` per model; each prefix is stored under 1 + n_layers keys that share one
storage (``<p>prefix_tuning.prefix_tunings.<name>.self_prefix.*`` and the same under every attention layer's
``...prefix_tuning.pool.``). Its forms:

- **MLP** (``flat: false``, the default): ``wte.weight: (P, H)``, ``control_trans.0: Linear(H, bottleneck)``,
  ``control_trans.2: Linear(bottleneck, n_layers * 2 * kv_dim)``; the prefix is
  ``control_trans.2(act(control_trans.0(wte.weight)))`` with ``act`` the config's ``non_linearity`` (tanh).
- **flat** (``flat: true``): ``control_trans: (P * n_layers * 2 * kv_dim,)``.
- **ejected** (``model.eject_prefix_tuning(name)``): the flat tensor, but ``adapter_config.json`` still says
  ``flat: false`` (the library's own ``load_adapter`` then builds the MLP form and quietly loads nothing into it).
  The form is therefore decided by the tensors present, never by ``flat`` (issue 16 item 5).

Layout: ``view(P, n_layers * 2, kv_heads, head_dim)``, slot ``2l`` the keys and ``2l + 1`` the values of layer
``l``: that is peft's ``(P, n_layers, 2, kv_heads, head_dim)``, our :class:`~adapterkit.methods.prefix.PrefixKV`'s
``prefix`` as it is.

Positions: AdapterHub concatenates the prefix inside each attention layer, after the position embeddings (BERT,
GPT-2) and rotary positions (LLaMA), so the real tokens keep positions ``0 .. L-1``; peft's semantics (our
default) move them to ``P .. P+L-1`` (logits differ by 0.02 to 2.6 on the fixtures). The file therefore loads as
``PrefixTuning(positions="keep")``, with the library's outputs.

Locations: AdapterHub keeps one prefix per location key, ``(P, n_layers_at_location * 2 * kv_dim)``:
``self_prefix`` (BERT-likes, GPT-2, LLaMA, ViT, and the decoder self-attention of T5/BART), ``self`` (DistilBERT),
``encoder_prefix`` and ``cross_prefix`` (T5/BART's encoder self-attention and decoder cross-attention, present
when the config's ``encoder_prefix``/``cross_prefix`` are true). ``leave_out`` layers get no prefix and no slot.

Two routes, the same outputs (tests/test_adapterhub_prefix_encdec.py checks both against each other):

- BERT-likes, GPT-2, LLaMA, Mistral without ``leave_out``: ``PrefixTuning(positions="keep")`` through the KV
  cache (one prefix tensor for all layers; as before).
- everything else (T5, BART: all three locations; DistilBERT, which ignores a KV cache; ViT, which has no token
  input; and any file with ``leave_out``): ``PrefixTuning(inject="attention", positions="keep", locations=...,
  layers=...)``, each attention module holding its layer's slice and joining it after its own key/value
  projections, as the library does. T5's relative position bias then sees the prefix at key positions ``0 .. P-1``
  and the real keys after it (the library's ``compute_bias(L, P + L)``). Checked against adapters 1.3.0 on T5
  (``T5Model``), BART, DistilBERT and ViT: prefix (MLP, flat, self-only, no cross), MAM, UniPELT, leave_out;
  <= 3e-6, left-padded batches included.

``leave_out`` on encoder-decoder models counts the encoder's layers first, then the decoder's (the library's
``iter_layers``): the kept attention modules become explicit ``targets``. Refused with the reason: unknown location
keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..methods.bottleneck import activation
from ..methods.prefix import AttentionPrefix, PrefixGate, PrefixKV, PrefixTuning, attention_modules, kv_layout
from ..plan import Plan
from ..targeting import TargetError
from .adapterhub_files import AdapterHubFile, renamed, resolve_sites
from .io import AdapterFileError, require_float
from .peft import Fields

ARCHITECTURES = ("prefix_tuning",)
__all__ = ["ARCHITECTURES", "prefix_tensor", "plan_of", "load", "refusal"]
_MLP = (
    "wte.weight",
    "control_trans.0.weight",
    "control_trans.0.bias",
    "control_trans.2.weight",
    "control_trans.2.bias",
)


# AdapterHub's location keys (``prefix_tunings.<name>.<location>.``) -> PrefixTuning.locations: BERT-likes, GPT-2,
# LLaMA, ViT, and the decoder self-attention of T5/BART are "self_prefix", DistilBERT's "self"
LOCATIONS = {"self_prefix": "self", "self": "self", "encoder_prefix": "encoder", "cross_prefix": "cross"}
_THEIRS = {"encoder": "encoder_prefix", "cross": "cross_prefix"}


def locations(info: AdapterHubFile, where: Path) -> list[str]:
    """The AdapterHub location keys the file holds prefixes at."""
    marker = f"prefix_tunings.{info.saved_name}."
    found = []
    for key in info.tensors:
        _, sep, rest = key.partition(marker)
        if sep:
            loc = rest.partition(".")[0]
            if loc not in LOCATIONS:
                raise AdapterFileError(f"{where}: a prefix at the unknown location {loc!r} ({key!r})")
            if loc not in found:
                found.append(loc)
    return found


def _leaves(info: AdapterHubFile, where: Path, location: str = "self_prefix") -> dict[str, torch.Tensor]:
    """The pool's tensors of this adapter's prefix at ``location``, by leaf name (one copy of each shared tensor)."""
    marker = f"prefix_tunings.{info.saved_name}."
    out: dict[str, torch.Tensor] = {}
    for key, value in info.tensors.items():
        _, sep, rest = key.partition(marker)
        if not sep:
            if f"prefix_gates.{info.saved_name}." in key:
                continue  # read by _gates
            raise AdapterFileError(f"key {key!r} in {where} is not a prefix tensor of adapter {info.saved_name!r}")
        loc, _, leaf = rest.partition(".")
        if loc not in LOCATIONS:
            raise AdapterFileError(f"{where}: a prefix at the unknown location {loc!r} ({key!r})")
        if loc == location:
            out.setdefault(leaf, value)
    return out


def prefix_tensor(
    info: AdapterHubFile, where: str | os.PathLike, width: int, location: str = "self_prefix"
) -> torch.Tensor:
    """The prefix ``(P, width)``, ``width = n_layers * 2 * kv_dim``, from whichever form the file holds (decided by
    the tensors: an ejected prefix is flat whatever ``flat`` says)."""
    where = Path(where)
    fields = Fields(info.config, where)
    length = fields.integer("prefix_length", 30)
    leaves = _leaves(info, where, location)
    require_float(leaves, where)
    flat = leaves.get("control_trans")
    if flat is not None and flat.dim() == 1:
        if set(leaves) != {"control_trans"}:
            raise AdapterFileError(
                f"{where}: a flat prefix with other tensors {sorted(set(leaves) - {'control_trans'})}"
            )
        if flat.numel() != length * width:
            raise AdapterFileError(
                f"{where}: the flat prefix has {flat.numel()} values, but prefix_length {length} x n_layers x 2 x "
                f"key/value width = {length * width} for this model: wrong base model?"
            )
        return flat.view(length, width)
    missing = [leaf for leaf in _MLP if leaf not in leaves]
    if missing:
        raise AdapterFileError(
            f"{where}: neither a flat prefix ('control_trans') nor the MLP form (missing {missing})"
        )
    name = info.config.get("non_linearity", "tanh")
    try:
        act = activation(str(name))
    except ValueError as e:
        raise fields.error("non_linearity", name, str(e)) from None
    with torch.no_grad():
        h = act(
            torch.nn.functional.linear(
                leaves["wte.weight"], leaves["control_trans.0.weight"], leaves["control_trans.0.bias"]
            )
        )
        out = torch.nn.functional.linear(h, leaves["control_trans.2.weight"], leaves["control_trans.2.bias"])
    if out.shape != (length, width):
        raise AdapterFileError(
            f"{where}: the prefix MLP gives {tuple(out.shape)}, expected ({length}, {width}) for this model: wrong base "
            "model?"
        )
    return out


def attention_sites(info: AdapterHubFile, model: Any, where: str | os.PathLike) -> dict[str, str]:
    """Stored attention module path (``encoder.layer.0.attention.self``, ``transformer.h.0.attn``,
    ``model.layers.0.self_attn``: where the pool's per-layer copies and the gates are stored) -> this model's
    module name.

    Raises:
        AdapterFileError: a path this model does not have (wrong base model?).
    """
    paths: dict[str, str] = {}
    vit = getattr(getattr(model, "config", None), "model_type", None) == "vit"
    for key in info.tensors:
        for marker in (".prefix_tuning.pool.", ".prefix_tuning.prefix_gates."):
            if marker in key:
                stored = key.partition(marker)[0]
                ours = renamed(stored, model)
                if vit and ours.endswith(".attention.attention"):  # 4.57's ViTSelfAttention is 5's ViTAttention
                    ours = ours[: -len(".attention")]
                paths[stored] = ours
    resolved = resolve_sites(sorted(set(paths.values())), model, where)
    return {stored: resolved[ours] for stored, ours in paths.items()}


def refusal(config: dict[str, Any]) -> str | None:
    """Why this prefix-tuning config cannot be read exactly (None: it can; checked before the weights are read)."""
    leave_out = config.get("leave_out") or []
    if not isinstance(leave_out, list) or not all(isinstance(i, int) and i >= 0 for i in leave_out):
        return f"AdapterHub prefix tuning with leave_out {leave_out!r}: expected a list of layer indices"
    return None


# model types whose AdapterHub prefix loads through the KV cache (PrefixTuning(positions="keep")); every other
# model, and files with leave_out, load with the prefix inside each attention module (inject="attention")
CACHE_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "gpt2", "llama", "mistral")


def _inside_attention(model: Any, info: AdapterHubFile, where: Path) -> bool:
    cfg = getattr(model, "config", None)
    return (
        bool(getattr(cfg, "is_encoder_decoder", False))
        or getattr(cfg, "model_type", None) not in CACHE_MODEL_TYPES
        or bool(info.config.get("leave_out"))
        or any(loc != "self_prefix" for loc in locations(info, where))
    )


def plan_of(ctl: Any, path: str | os.PathLike, info: AdapterHubFile) -> Plan:
    """Our plan for the file: ``PrefixTuning(num_virtual_tokens=P, prefix_projection=False, positions="keep")``
    holding the computed prefix (the MLP form is folded into it, as our saves do; further training then updates
    the prefix directly). ``dropout`` acts only in training and is not kept."""
    where = Path(path)
    why = refusal(info.config)
    if why is not None:
        raise AdapterFileError(f"{where}: {why}")
    sites = attention_sites(info, ctl.model, where)  # the stored layers exist here (else: wrong base model)
    if _inside_attention(ctl.model, info, where):
        return _attention_plan(ctl, path, info, sites)
    layout = kv_layout(ctl.model)
    prefix = prefix_tensor(info, where, layout.num_layers * 2 * layout.kv_dim)
    fields = Fields(info.config, where)
    gated = fields.flag("use_gating", False)
    cfg = PrefixTuning(
        num_virtual_tokens=prefix.shape[0],
        prefix_projection=False,
        positions="keep",
        gated=gated,
        gate_outputs=1 if fields.flag("shared_gating", True) else 2,
    )
    plan = _plan(ctl, cfg, path)
    gates = _gates(info, sites, where) if gated else {}
    ours = {site for site, (_, comp) in plan.components.items() if isinstance(comp, PrefixGate)}
    if gated and ours != set(gates):
        raise AdapterFileError(
            f"{where}: the file gates the prefix at {sorted(gates)}, this model's self-attention modules are "
            f"{sorted(ours)}"
        )
    for site, (_, comp) in plan.components.items():
        if isinstance(comp, PrefixKV):
            comp.import_state({"prefix": prefix.to(comp.prefix.dtype)}, ctl.model)
        elif isinstance(comp, PrefixGate):
            own = comp.state_dict()
            state = gates[site]
            if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
                raise AdapterFileError(
                    f"{where}: the prefix gate for {site!r} holds { ({k: tuple(v.shape) for k, v in state.items()}) }, "
                    f"expected { ({k: tuple(v.shape) for k, v in own.items()}) }"
                )
            comp.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return plan


def _attention_plan(ctl: Any, path: str | os.PathLike, info: AdapterHubFile, sites: dict[str, str]) -> Plan:
    """``PrefixTuning(inject="attention", positions="keep", locations=..., layers=...)``: each attention module's
    slice of its location's prefix (AdapterHub's ``(P, n_layers * 2, kv_heads, head_dim)``, layer ``j`` of the
    location at slots ``2j``, ``2j + 1``; ``leave_out`` layers have no slice and no prefix)."""
    where = Path(path)
    fields = Fields(info.config, where)
    model = ctl.model
    found = locations(info, where)
    ours = tuple(sorted({LOCATIONS[loc] for loc in found}, key=("self", "encoder", "cross").index))
    if len(ours) != len(found):
        raise AdapterFileError(f"{where}: prefixes at {found}, two of them for the same attention")
    leave_out = sorted(set(info.config.get("leave_out") or []))
    layers = targets = None
    if leave_out and getattr(model.config, "is_encoder_decoder", False):
        # the library numbers the encoder's layers 0 .. N-1, the decoder's N .. (self- and cross-attention alike)
        found_modules = attention_modules(model)
        targets = [n for n, loc, _ in found_modules if hub_layer(n, loc, found_modules) not in leave_out]
    elif leave_out:
        indices = sorted({i for n, _, _ in attention_modules(model) if (i := _layer_of(n)) is not None})
        layers = [i for i in indices if i not in leave_out]
    gated = fields.flag("use_gating", False)
    cfg = PrefixTuning(
        num_virtual_tokens=fields.integer("prefix_length", 30),
        prefix_projection=False,
        positions="keep",
        inject="attention",
        locations=ours,
        layers=layers,
        targets=targets,
        gated=gated,
        gate_outputs=1 if fields.flag("shared_gating", True) else 2,
    )
    plan = _plan(ctl, cfg, path)
    comps = {site: comp for site, (_, comp) in plan.components.items() if isinstance(comp, AttentionPrefix)}
    for loc in found:
        mine = sorted((c for c in comps.values() if c.location == LOCATIONS[loc]), key=lambda c: c.layer)
        width = 2 * mine[0].kv_heads * mine[0].head_dim
        prefix = prefix_tensor(info, where, width * len(mine), loc)
        with torch.no_grad():
            for c in mine:
                c.prefix.copy_(prefix[:, c.layer * width : (c.layer + 1) * width].to(c.prefix.dtype))
    if gated:
        gates = _gates(info, sites, where)
        have = {site for site, c in comps.items() if c.gate is not None}
        if set(gates) != have:
            raise AdapterFileError(
                f"{where}: the file gates the prefix at {sorted(gates)}, this model's prefixed attention modules are "
                f"{sorted(have)}"
            )
        for site, state in gates.items():
            gate = comps[site].gate
            if state["gate.weight"].shape != gate.weight.shape:
                raise AdapterFileError(
                    f"{where}: the prefix gate for {site!r} is {tuple(state['gate.weight'].shape)}, expected "
                    f"{tuple(gate.weight.shape)}"
                )
            with torch.no_grad():
                gate.weight.copy_(state["gate.weight"])
                gate.bias.copy_(state["gate.bias"])
    return plan


def _layer_of(name: str) -> int | None:
    return next((int(p) for p in name.split(".") if p.isdigit()), None)


def hub_layer(name: str, location: str, found: list[tuple[str, str, Any]]) -> int | None:
    """AdapterHub's layer index of our attention module ``name`` (``found``: :func:`attention_modules` of the
    model): its block's index, after the encoder's blocks for the decoder of an encoder-decoder model (the
    library's ``iter_layers``)."""
    i = _layer_of(name)
    if i is None or location == "encoder" or not any(loc == "encoder" for _, loc, _ in found):
        return i
    return i + len({_layer_of(n) for n, loc, _ in found if loc == "encoder"})


def _gates(info: AdapterHubFile, sites: dict[str, str], where: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Our attention module -> {"gate.weight", "gate.bias"} from ``<attention>.prefix_tuning.prefix_gates.<name>.*``."""
    marker = f".prefix_tuning.prefix_gates.{info.saved_name}."
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in info.tensors.items():
        stored, sep, leaf = key.partition(marker)
        if sep:
            if leaf not in ("weight", "bias"):
                raise AdapterFileError(f"key {key!r} in {where}: unknown prefix gate tensor {leaf!r}")
            out.setdefault(sites[stored], {})["gate." + leaf] = value
    require_float({f"{s}.{k}": v for s, state in out.items() for k, v in state.items()}, where)
    return out


def load(ctl: Any, path: str | os.PathLike, info: AdapterHubFile, *, name: str | None, activate: bool) -> str:
    name = name or info.saved_name
    ctl._check_new_name(name)
    ctl.install(name, plan_of(ctl, path, info), activate=activate)
    return name


def _plan(ctl: Any, cfg: PrefixTuning, path: Any) -> Any:
    """``ctl.plan(cfg)``, a target error named as the file's: the prefix does not fit this model."""
    try:
        return ctl.plan(cfg)
    except TargetError as e:
        raise AdapterFileError(f"AdapterHub prefix tuning {str(path)!r} does not fit this model: {e}") from None
