"""AdapterHub export of unions: MAM, UniPELT and other ``ConfigUnion`` s (the inverse of
``formats/adapterhub_union.py``; called by ``formats/adapterhub_export.py``, whose per-method writers it is given).

Our :class:`~adapterkit.methods.union.Union` of members AdapterHub can hold -> ``{"architecture": "union",
"configs": [<member config>, ...]}`` in member order, one weights file with every member's tensors (told apart by
their keys, ``prefix_tunings``/``prefix_gates``, ``loras``, ``adapters``/``shared_parameters``):

- **MAM** (He et al. 2022): ``Union(PrefixTuning(positions="keep", ...), Bottleneck(placement="parallel",
  scaling=4.0, ...))``; the ``"mam"`` preset has ``positions="shift"`` and is refused by the prefix writer with
  the field to change.
- **UniPELT** (Mao et al. 2022) as AdapterHub computes it: ``Union(PrefixTuning(positions="keep", gated=True),
  SequenceGated(Bottleneck(placement="pfeiffer")), SequenceGated(LoRA(...)))``: per-sequence gates
  (``use_gating: true`` on every member). Refused: ``Union(gated=True)`` (the ``"unipelt"`` preset: UniPELT's
  released code, a per-token gate from each linear module's input around every member, which AdapterHub has not).

Members: one prefix tuning, one LoRA/(IA)^3 (gated or not) and one bottleneck at most (AdapterHub's union
reader and ours take one member per architecture); prompt tuning, ReFT and other methods are refused. Each member
is written by its own writer with its own components (parts of a :class:`~adapterkit.component.Chain` where two
members share a module).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..component import Chain
from ..methods.bottleneck import Bottleneck
from ..methods.bottleneck_sublayer import ResidualTap, SublayerBottleneck
from ..methods.ia3 import IA3, IA3InputScale, IA3OutputScale
from ..methods.lora import LoRA, LoRALinear
from ..methods.prefix import AttentionPrefix, PrefixGate, PrefixKV, PrefixTuning
from ..methods.seq_gate import LoRAGate, SequenceGated
from ..methods.union import Union
from .adapterhub_export_common import AdapterHubExportError, targets

__all__ = ["union"]

Writer = Callable[..., tuple[dict[str, Any], dict[str, torch.Tensor]]]

# AdapterHub architecture of a member -> the component classes it owns
_OWNS: dict[str, tuple[type, ...]] = {
    "prefix_tuning": (PrefixKV, PrefixGate, AttentionPrefix),
    "lora": (LoRALinear, LoRAGate, IA3OutputScale, IA3InputScale),
    "bottleneck": (SublayerBottleneck, ResidualTap),
}


def _architecture(member: Any) -> str | None:
    """The AdapterHub architecture a member is written as (exact types: subclasses such as MoV compute more)."""
    inner = member.config if type(member) is SequenceGated else member
    kinds = {PrefixTuning: "prefix_tuning", LoRA: "lora", IA3: "lora", Bottleneck: "bottleneck"}
    return kinds.get(type(inner))


def union(
    ctl: Any, name: str, cfg: Union, writers: Mapping[type, Writer]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(ConfigUnion dict, tensors)`` of union adapter ``name`` (module docstring).

    Raises:
        AdapterHubExportError: a gated union, a member AdapterHub's unions cannot hold, two members of one kind.
    """
    if cfg.gated:
        raise AdapterHubExportError(
            f"adapter {name!r} is a Union with gated=True (UniPELT's released code: a per-token gate around every "
            "member at each linear module, the 'unipelt' preset), which AdapterHub export does not write: "
            "AdapterHub's UniPELT gates each member per sequence. Build it as ak.Union(ak.PrefixTuning(positions="
            "'keep', gated=True), ak.SequenceGated(ak.Bottleneck(placement='pfeiffer')), "
            "ak.SequenceGated(ak.LoRA(targets=['attn.q', 'attn.v']))) to export"
        )
    archs = [_architecture(m) if type(m) in writers else None for m in cfg.configs]
    bad = [type(m).__name__ for m, a in zip(cfg.configs, archs, strict=True) if a is None]
    if bad:
        raise AdapterHubExportError(
            f"adapter {name!r}: a union with {bad} members, which AdapterHub export does not write (members written: "
            "PrefixTuning, LoRA, IA3, Bottleneck, SequenceGated LoRA/Bottleneck)"
        )
    if len(set(archs)) != len(archs):
        raise AdapterHubExportError(
            f"adapter {name!r}: a union with several members of one AdapterHub kind {archs}, which AdapterHub export "
            "does not write (AdapterHub's union loader tells members apart by kind: one prefix, one LoRA/(IA)^3, "
            "one bottleneck)"
        )
    parts: dict[str, dict[str, Any]] = {a: {} for a in archs if a is not None}
    for site, comp in targets(ctl, name).items():
        for part in comp.parts if isinstance(comp, Chain) else [comp]:
            owners = [a for a in parts if isinstance(part, _OWNS[a])]
            if len(owners) != 1 or site in parts[owners[0]]:
                raise AdapterHubExportError(
                    f"adapter {name!r}: {type(part).__name__} at {site!r} belongs to no single member AdapterHub "
                    "can hold"
                )
            parts[owners[0]][site] = part
    configs: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    for member, arch in zip(cfg.configs, archs, strict=True):
        config, own = writers[type(member)](ctl, name, member, comps=parts[arch])
        clash = sorted(set(own) & set(tensors))
        if clash:
            raise AdapterHubExportError(f"adapter {name!r}: members write the same tensors {clash[:3]}")
        configs.append(config)
        tensors.update(own)
    return {"architecture": "union", "configs": configs}, tensors
