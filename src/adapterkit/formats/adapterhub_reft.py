"""AdapterHub LoReFT (``config.architecture: "reft"``, ``orthogonality: true``); dispatched from
``formats/adapterhub.py``.

AdapterHub hooks a ``ReftLayer`` on every layer's output (``<layer>.reft_layer.refts.<name>.units.{u}``) and, at
the first ``prefix_positions`` and last ``suffix_positions`` tokens, replaces ``h`` by
``h + (act(learned_source(h)) - projection(h)) @ projection.weight`` (Wu et al. 2024, Eq. 2 with
``W, b = learned_source`` and ``R = projection.weight: (r, H)``). ``units.0`` acts on the prefix positions and
``units.1`` on the suffix ones (``tied_weights``: ``units.0`` on both). This is our
:class:`~adapterkit.methods.reft.LoReFT` on the same blocks with ``prefix``/``suffix``/``share_weights``, ``W``
and ``b`` as stored, and ``rotation = R``: an orthonormal ``rotation`` is its own ``R`` in our QR parametrization.

``R`` is stored in torch's ``parametrizations.orthogonal`` form (``projection.parametrizations.weight.original``
``(r, H)`` and ``...weight.0.base`` ``(H, H)``); the reader rebuilds the parametrized ``nn.Linear`` and reads its
``weight``, which is what AdapterHub computes in its forward.

Refused: ``orthogonality: false`` (NoReft and DiReft cannot be told apart on disk, AdapterHub does not save
``subtract_projection``, and a non-orthonormal ``R`` is not our LoReFT) and a ``non_linearity`` (our LoReFT is
linear). Differences that do not show on unpadded inputs of at least ``2 · max(prefix, suffix)`` tokens: we count
positions on the attention mask's real tokens and cap each count at half of them when both are set (so prefix and
suffix never overlap); AdapterHub takes the sequence's first and last positions. In training mode AdapterHub's
dropout drops entries of the whole output, ours only of the edit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..methods.reft import LoReFT, LoReFTBlock
from ..plan import Plan
from ..targeting import base_modules
from .adapterhub_files import AdapterHubFile, resolve_sites
from .io import AdapterFileError, require_float
from .peft import Fields

ARCHITECTURES = ("reft",)
_ORIGINAL = "projection.parametrizations.weight.original"
_BASE = "projection.parametrizations.weight.0.base"
_LEAVES = ("learned_source.weight", "learned_source.bias", _ORIGINAL, _BASE, "projection.weight")


def _split(info: AdapterHubFile, where: Path) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    """Stored layer path -> unit index -> {leaf: tensor}, from ``<layer>.reft_layer.refts.<name>.units.{u}.<leaf>``."""
    marker = f".reft_layer.refts.{info.saved_name}.units."
    out: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in info.tensors.items():
        layer, sep, rest = key.partition(marker)
        unit, _, leaf = rest.partition(".")
        if not sep or not unit.isdigit() or leaf not in _LEAVES:
            raise AdapterFileError(
                f"key {key!r} in {where} is not a ReFT tensor of adapter {info.saved_name!r} "
                f"(expected '<layer>{marker}<u>.learned_source.weight' and so on)"
            )
        out.setdefault(layer, {}).setdefault(int(unit), {})[leaf] = value
    if not out:
        raise AdapterFileError(f"{where} holds no ReFT tensors (keys '<layer>{marker}...')")
    return out


def _projection(unit: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    """``R: (r, H)``: the weight of the orthogonally parametrized ``nn.Linear(H, r)`` the unit stored."""
    if "projection.weight" in unit:
        raise ValueError(f"{where}: a plain projection.weight is NoReft/DiReft's (orthogonality false)")
    if _ORIGINAL not in unit or _BASE not in unit:
        raise ValueError(f"{where}: lacks {_ORIGINAL} or {_BASE}")
    original = unit[_ORIGINAL].float()
    if original.dim() != 2:
        raise ValueError(f"{where}: {_ORIGINAL} has shape {tuple(original.shape)}; expected (r, H)")
    r, h = original.shape
    lin = nn.utils.parametrizations.orthogonal(nn.Linear(h, r, bias=False))
    try:
        lin.load_state_dict(
            {"parametrizations.weight.original": original, "parametrizations.weight.0.base": unit[_BASE].float()}
        )
    except RuntimeError as e:
        raise ValueError(f"{where}: the orthogonal projection does not fit ({e})") from None
    with torch.no_grad():
        return lin.weight.detach().clone()


def load(ctl: Any, path: str | os.PathLike, info: AdapterHubFile, *, name: str | None, activate: bool) -> str:
    where = Path(path)
    fields = Fields(info.config, where)
    if not fields.flag("orthogonality", True):
        raise AdapterFileError(
            f"{fields.where}: AdapterHub NoReft/DiReft (orthogonality false) is not read: the two cannot be told "
            "apart on disk (subtract_projection is not saved) and our LoReFT keeps R orthonormal"
        )
    if info.config.get("non_linearity") not in (None, "linear", "identity"):
        raise AdapterFileError(
            f"{fields.where}: ReFT with non_linearity {info.config.get('non_linearity')!r} is not read yet "
            "(our LoReFT is linear)"
        )
    if not fields.flag("output_reft", True):
        raise AdapterFileError(f"{fields.where}: ReFT with output_reft false is not read")
    r = fields.integer("r", 1)
    prefix = fields.integer("prefix_positions", 3, minimum=0)
    suffix = fields.integer("suffix_positions", 0, minimum=0)
    tied = fields.flag("tied_weights", False)
    name = name or info.saved_name
    ctl._check_new_name(name)
    stored = _split(info, where)
    require_float(
        {f"{s}.{u}.{k}": v for s, units in stored.items() for u, t in units.items() for k, v in t.items()}, where
    )
    mapping = resolve_sites(sorted(stored), ctl.model, where)
    per_site = {mapping[s]: units for s, units in stored.items()}
    cfg = fields.build(
        LoReFT,
        r=r,
        prefix=prefix,
        suffix=suffix,
        share_weights=tied,
        dropout=fields.number("dropout", 0.0),
        targets=tuple(per_site),
    )
    roles = {"shared": 0} if tied else {k: u for k, u in (("prefix", 0), ("suffix", 1)) if getattr(cfg, k)}
    comps: dict[str, tuple[str, Any]] = {}
    modules = base_modules(ctl.model)
    try:
        plan = ctl.plan(cfg)
        for site, (kind, comp) in plan.components.items():
            if isinstance(comp, LoReFTBlock):
                state: dict[str, torch.Tensor] = {}
                for role, u in roles.items():
                    unit = per_site[site].get(u)
                    if unit is None or "learned_source.weight" not in unit or "learned_source.bias" not in unit:
                        raise ValueError(f"{site!r} lacks units.{u}.learned_source")
                    state[f"{role}.rotation"] = _projection(unit, f"{site!r} units.{u}")
                    state[f"{role}.weight"] = unit["learned_source.weight"]
                    state[f"{role}.bias"] = unit["learned_source.bias"]
                own = comp.state_dict()
                comp.import_state({k: v.to(own[k].dtype) for k, v in state.items() if k in own}, modules[site])
            comps[site] = (kind, comp)
    except AdapterFileError:
        raise
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"AdapterHub adapter {str(path)!r} does not fit this model: {e}") from None
    ctl.install(name, Plan(cfg, comps), activate=activate)
    return name
