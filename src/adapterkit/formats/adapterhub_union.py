"""AdapterHub unions (``config.architecture == "union"``: ``ConfigUnion``, MAM, UniPELT); dispatched from
``formats/adapterhub.py``.

``adapter_config.json`` lists the members under ``config.configs`` (each a full method config with its own
``architecture``; bottleneck members have none). One weights file holds every member's tensors, told apart by
their keys as the library's own loader does:

- prefix tuning: ``...prefix_tuning.prefix_tunings.<name>.`` (the pool, once per model and once per layer) and
  ``...prefix_tuning.prefix_gates.<name>.`` (UniPELT's per-layer gates);
- LoRA / (IA)^3: ``<module>.loras.<name>.``;
- bottleneck: ``<location>.adapters.<name>.``, ``shared_parameters.<name>.``, ``invertible_adapters.<name>.``.

Each member is read by its own reader (``formats/adapterhub_<method>.py``'s ``plan_of``) and the members become
one adapter, our :class:`~adapterkit.methods.union.Union` of their configs, in the file's member order (where two
members act on the same module their components run in that order, as a ``Chain``).

- **MAM** (He et al. 2022; ``MAMConfig``: prefix tuning + ParBn with ``scaling`` 4.0 on the FFN sub-layer):
  ``Union(PrefixTuning(positions="keep"), Bottleneck(placement="parallel", hook="sublayer", scaling=4.0))``.
- **UniPELT** (Mao et al. 2022; ``UniPELTConfig``: every member with ``use_gating``):
  ``Union(PrefixTuning(positions="keep", gated=True), SequenceGated(Bottleneck(placement="pfeiffer", ...)),
  SequenceGated(LoRA(alpha=r, ...)))``: AdapterHub's gates, averaged over the sequence (see
  ``methods/seq_gate.py`` and ``PrefixTuning.gated``). Not :class:`Union`'s own ``gated=True`` (a per-token gate
  around every member, UniPELT's released code).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ..methods.union import Union
from ..plan import TARGET, Plan
from ..targeting import base_modules
from . import adapterhub_bottleneck, adapterhub_lora, adapterhub_prefix
from .adapterhub_files import AdapterHubFile
from .io import AdapterFileError

ARCHITECTURES = ("union",)
__all__ = ["ARCHITECTURES", "refusal", "plan_of", "load"]

# member architecture -> reader (``plan_of(ctl, path, info) -> Plan``, optional ``refusal(config)``)
_READERS = {
    "prefix_tuning": adapterhub_prefix,
    "lora": adapterhub_lora,
    "bottleneck": adapterhub_bottleneck,
}


def _members(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``[(architecture, member config)]`` in the file's order (bottleneck members have no architecture key)."""
    members = config.get("configs")
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, dict) for m in members):
        raise AdapterFileError(
            f"an AdapterHub union needs 'configs': a list of two or more configs, got {members!r:.80}"
        )
    return [(str(m.get("architecture") or "bottleneck"), m) for m in members]


def refusal(config: dict[str, Any]) -> str | None:
    """Why this union cannot be read exactly (None: it can; checked before the weights are read)."""
    try:
        members = _members(config)
    except AdapterFileError as e:
        return str(e)
    archs = [a for a, _ in members]
    unknown = [a for a in archs if a not in _READERS]
    if unknown:
        return f"AdapterHub unions with {unknown} members are not read (members read: {', '.join(_READERS)})"
    if len(set(archs)) != len(archs):
        return f"an AdapterHub union with several members of one kind ({archs}) is not read"
    for arch, member in members:
        why = getattr(_READERS[arch], "refusal", None)
        reason = why(member) if why is not None else None
        if reason is not None:
            return reason
    return None


_MARKERS = {
    "prefix_tuning": (
        "prefix_tuning.prefix_tunings.{n}.",
        "prefix_tuning.pool.prefix_tunings.{n}.",
        "prefix_gates.{n}.",
    ),
    "lora": (".loras.{n}.",),
    "bottleneck": (".adapters.{n}.", "shared_parameters.{n}.", "invertible_adapters.{n}."),
}


def _split(info: AdapterHubFile, where: Path, archs: list[str]) -> dict[str, dict[str, Any]]:
    """The file's tensors per member architecture, by their key markers."""
    out: dict[str, dict[str, Any]] = {a: {} for a in archs}
    for key, value in info.tensors.items():
        owners = [a for a in archs if any(m.format(n=info.saved_name) in "." + key for m in _MARKERS[a])]
        if len(owners) != 1:
            raise AdapterFileError(
                f"key {key!r} in {where} belongs to {'none' if not owners else 'several'} of the union's members "
                f"({', '.join(archs)})"
            )
        out[owners[0]][key] = value
    empty = [a for a, t in out.items() if not t]
    if empty:
        raise AdapterFileError(f"{where}: the union's {empty} member(s) have no tensors in the file")
    return out


def plan_of(ctl: Any, path: str | os.PathLike, info: AdapterHubFile) -> Plan:
    """Our plan for the union: each member read by its reader, joined into one :class:`Union`."""
    where = Path(path)
    why = refusal(info.config)
    if why is not None:
        raise AdapterFileError(f"{where}: {why}")
    members = _members(info.config)
    tensors = _split(info, where, [a for a, _ in members])
    plans = [
        _READERS[arch].plan_of(ctl, path, dataclasses.replace(info, config=dict(member), tensors=tensors[arch]))
        for arch, member in members
    ]
    cfg = Union(*[p.config for p in plans])
    modules = base_modules(ctl.model)
    found: dict[str, list[tuple[str, Any]]] = {}
    for p in plans:
        for site, kc in p.components.items():
            found.setdefault(site, []).append(kc)
    comps = {
        site: (
            TARGET if any(k == TARGET for k, _ in found[site]) else found[site][0][0],
            cfg.combine(site, modules[site], [c for _, c in found[site]]),
        )
        for site in modules
        if site in found
    }
    return Plan(cfg, comps)


def load(ctl: Any, path: str | os.PathLike, info: AdapterHubFile, *, name: str | None, activate: bool) -> str:
    name = name or info.saved_name
    ctl._check_new_name(name)
    ctl.install(name, plan_of(ctl, path, info), activate=activate)
    return name
