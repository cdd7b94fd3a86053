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

Refused with the reason: ``leave_out`` (our prefix covers every layer), prefixes of encoder-decoder models'
encoder or cross-attention (``encoder_prefix``/``cross_prefix`` locations; ours acts on the decoder's
self-attention only).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..methods.bottleneck import activation
from ..methods.prefix import PrefixGate, PrefixKV, PrefixTuning, kv_layout
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


def _leaves(info: AdapterHubFile, where: Path) -> dict[str, torch.Tensor]:
    """The pool's tensors of this adapter's self-attention prefix, by leaf name (one copy of each shared tensor)."""
    marker = f"prefix_tunings.{info.saved_name}."
    out: dict[str, torch.Tensor] = {}
    for key, value in info.tensors.items():
        _, sep, rest = key.partition(marker)
        if not sep:
            if f"prefix_gates.{info.saved_name}." in key:
                continue  # read by _gates
            raise AdapterFileError(f"key {key!r} in {where} is not a prefix tensor of adapter {info.saved_name!r}")
        location, _, leaf = rest.partition(".")
        if location != "self_prefix":
            raise AdapterFileError(
                f"{where}: prefixes at {location!r} (cross-attention of encoder-decoder models) are not read"
            )
        out.setdefault(leaf, value)
    return out


def prefix_tensor(info: AdapterHubFile, where: str | os.PathLike, width: int) -> torch.Tensor:
    """The prefix ``(P, width)``, ``width = n_layers * 2 * kv_dim``, from whichever form the file holds (decided by
    the tensors: an ejected prefix is flat whatever ``flat`` says)."""
    where = Path(where)
    fields = Fields(info.config, where)
    length = fields.integer("prefix_length", 30)
    leaves = _leaves(info, where)
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
    for key in info.tensors:
        for marker in (".prefix_tuning.pool.", ".prefix_tuning.prefix_gates."):
            if marker in key:
                stored = key.partition(marker)[0]
                paths[stored] = renamed(stored, model)
    resolved = resolve_sites(sorted(set(paths.values())), model, where)
    return {stored: resolved[ours] for stored, ours in paths.items()}


def refusal(config: dict[str, Any]) -> str | None:
    """Why this prefix-tuning config cannot be read exactly (None: it can; checked before the weights are read)."""
    if config.get("leave_out"):
        return (
            f"AdapterHub prefix tuning with leave_out {config.get('leave_out')!r} is not read: adapterkit's prefix "
            "covers every layer, and no prefix is a no-op on a layer (a zero key still takes attention weight)"
        )
    return None


def plan_of(ctl: Any, path: str | os.PathLike, info: AdapterHubFile) -> Plan:
    """Our plan for the file: ``PrefixTuning(num_virtual_tokens=P, prefix_projection=False, positions="keep")``
    holding the computed prefix (the MLP form is folded into it, as our saves do; further training then updates
    the prefix directly). ``dropout`` acts only in training and is not kept."""
    where = Path(path)
    why = refusal(info.config)
    if why is not None:
        raise AdapterFileError(f"{where}: {why}")
    sites = attention_sites(info, ctl.model, where)  # the stored layers exist here (else: wrong base model)
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
    try:
        plan = ctl.plan(cfg)
    except TargetError as e:
        raise AdapterFileError(f"AdapterHub prefix tuning {str(path)!r} does not fit this model: {e}") from None
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
