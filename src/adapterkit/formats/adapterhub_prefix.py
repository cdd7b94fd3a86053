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

Not loaded yet (``adapters.load`` refuses, see ``formats/adapterhub.py``): AdapterHub keeps the real tokens at
positions ``0 .. L-1`` behind the prefix, while our :class:`~adapterkit.methods.prefix.PrefixTuning` (peft's
semantics) moves them to ``P .. P+L-1`` (measured: logits differ by 0.02 to 2.6 on the fixtures). With that
option in ``methods/prefix.py``, :func:`plan_for` is the reader; the tests check it by passing
``position_ids = arange(L) - P``, which our prefix hook moves back to ``0 .. L-1``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..methods.bottleneck import activation
from ..methods.prefix import PrefixKV, PrefixTuning, kv_layout
from ..plan import Plan
from .adapterhub_files import AdapterHubFile
from .io import AdapterFileError, require_float
from .peft import Fields

__all__ = ["prefix_tensor", "plan_for", "POSITIONS"]

POSITIONS = (
    "AdapterHub prefix tuning keeps the real tokens at positions 0..L-1 behind the prefix, while adapterkit's "
    "PrefixTuning (peft's semantics) gives them P..P+L-1; reading it needs that option in methods/prefix.py "
    "(issue 16 item 1)"
)
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
            if ".prefix_gates." in key:
                raise AdapterFileError(f"{where}: gated prefix tuning (UniPELT) is not read ({key!r})")
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


def plan_for(ctl: Any, path: str | os.PathLike, info: AdapterHubFile) -> Plan:
    """Our plan for the file: ``PrefixTuning(num_virtual_tokens=P, prefix_projection=False)`` holding the prefix
    (peft's positions: see the module docstring for why ``adapters.load`` does not use it yet)."""
    where = Path(path)
    if info.config.get("use_gating"):
        raise AdapterFileError(f"{where}: gated prefix tuning (UniPELT) is not read")
    layout = kv_layout(ctl.model)
    prefix = prefix_tensor(info, where, layout.num_layers * 2 * layout.kv_dim)
    cfg = PrefixTuning(num_virtual_tokens=prefix.shape[0], prefix_projection=False)
    plan = ctl.plan(cfg)
    for _, comp in plan.components.values():
        if isinstance(comp, PrefixKV):
            comp.import_state({"prefix": prefix.to(comp.prefix.dtype)}, ctl.model)
    return plan
