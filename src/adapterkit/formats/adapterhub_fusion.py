"""AdapterHub AdapterFusion directories (``model.save_adapter_fusion(dir, Fuse("a", "b"))``); dispatched from
``formats/adapterhub.py``. See ../shared/formats/adapterhub.md and issue 16 item 3.

A directory holds ``adapter_fusion_config.json``::

    {"adapter_names": ["a", "b"], "config": {"key": true, "query": true, "value": true, "query_before_ln": false,
     "regularization": true, "residual_before": false, "temperature": false, "value_before_softmax": true,
     "value_initialized": true, "dropout_prob": null}, "name": "a,b", "model_class": ..., "version": ...}

and ``model_adapter_fusion.safetensors`` (``use_safetensors=True``) or ``pytorch_model_adapter_fusion.bin`` (pickle,
read only with ``allow_pickle=True``, then ``weights_only=True``) with, per bottleneck location (the same locations as
the members' adapters: BERT ``encoder.layer.{i}.output`` / ``.attention.output``, GPT-2/LLaMA
``h.{i}.output_adapters`` / ``.attention_adapters``)::

    <location>.adapter_fusion_layer.<a,b>.query.{weight,bias}    (H, H), (H,)
    <location>.adapter_fusion_layer.<a,b>.key.{weight,bias}
    <location>.adapter_fusion_layer.<a,b>.value.weight           (H, H)   (no bias)

The members must be loaded first (``adapters.load`` of their directories, or of a whole
``save_adapter_setup`` directory, which does it in order). The fusion loads as our
:class:`~adapterkit.methods.fusion.Fusion` over them, named ``fusion[a,b]`` (``ak.Fuse("a", "b").name``) unless
``name=`` says otherwise, with AdapterHub's equations through its config fields: ``query_input="adapter_input"``
unless ``query_before_ln``, ``values="changes"`` unless ``residual_before``, no value bias, ``temperature: true`` as
``T = 50`` annealed by 0.05 per forward, ``dropout_prob`` (else the model's ``attention_probs_dropout_prob``) on the
scores in training, ``regularization`` as ``λ = 0.01``. The configs the library has no layer for (no query, key and
value at all: its unused ``dense``) load too (identity maps).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..compose import Fuse
from ..methods.fusion import Fusion, FusionLayer
from ..plan import Plan
from ..profiles import profile_for
from ..targeting import TargetError, base_modules, select
from .adapterhub_bottleneck import _layer_of
from .adapterhub_files import renamed, resolve_sites
from .io import AdapterFileError, read_json, read_tensors, require_float

__all__ = ["CONFIG", "is_fusion", "load", "plan_of"]

CONFIG = "adapter_fusion_config.json"
_WEIGHTS = (("model_adapter_fusion", "safetensors"), ("pytorch_model_adapter_fusion", "bin"))
_LEAVES = ("query.weight", "query.bias", "key.weight", "key.bias", "value.weight", "value.bias")
_FLAGS = (
    "key",
    "query",
    "value",
    "query_before_ln",
    "regularization",
    "residual_before",
    "temperature",
    "value_before_softmax",
)


def is_fusion(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``save_adapter_fusion``."""
    return (Path(path) / CONFIG).is_file()


def _config(path: Path) -> tuple[dict[str, Any], list[str], str]:
    """``(config fields, member names, saved fusion name)`` of ``adapter_fusion_config.json``."""
    data = read_json(path / CONFIG)
    where = path / CONFIG
    config = data.get("config")
    names = data.get("adapter_names")
    saved = data.get("name")
    if not isinstance(config, dict):
        raise AdapterFileError(f"{where}: 'config' must be an object (the AdapterFusionConfig)")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n for n in names):
        raise AdapterFileError(
            f"{where}: 'adapter_names' must list the two or more fused adapters, got {names!r:.80}"
        )
    if not isinstance(saved, str) or not saved:
        saved = ",".join(names)
    for flag in _FLAGS:
        if not isinstance(config.get(flag, False), bool):
            raise AdapterFileError(f"{where}: '{flag}' must be true or false, got {config.get(flag)!r:.40}")
    dropout = config.get("dropout_prob")
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))):
        raise AdapterFileError(f"{where}: 'dropout_prob' must be a number or null, got {dropout!r:.40}")
    return config, names, saved


def fusion_config(config: dict[str, Any], members: list[str], model: Any, sites: list[str]) -> Fusion:
    """Our :class:`Fusion` with AdapterHub's equations for an ``AdapterFusionConfig`` (``config``)."""
    dropout = config.get("dropout_prob")
    if dropout is None:  # the library's BottleneckLayer.add_fusion_layer
        dropout = getattr(getattr(model, "config", None), "attention_probs_dropout_prob", 0.0) or 0.0
    hot = bool(config.get("temperature", False))
    return Fusion(
        adapters=tuple(members),
        targets=tuple(sites),
        query=bool(config.get("query", True)),
        key=bool(config.get("key", True)),
        value=bool(config.get("value", True)),
        value_bias=False,
        value_before_softmax=bool(config.get("value_before_softmax", True)),
        query_input="output" if config.get("query_before_ln", False) else "adapter_input",
        values="outputs" if config.get("residual_before", False) else "changes",
        temperature=50.0 if hot else 1.0,
        temperature_decay=0.05 if hot else 0.0,
        dropout=float(dropout),
        regularization=0.01 if config.get("regularization", False) else 0.0,
    )


def _read_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    for stem, ext in _WEIGHTS:
        if (path / f"{stem}.{ext}").is_file():
            return read_tensors(path, stem, allow_pickle=allow_pickle)
    raise AdapterFileError(
        f"{str(path)!r} has an AdapterHub {CONFIG} but neither model_adapter_fusion.safetensors nor "
        "pytorch_model_adapter_fusion.bin"
    )


def _split(tensors: dict[str, torch.Tensor], saved: str, where: Path) -> dict[str, dict[str, torch.Tensor]]:
    """stored location -> {leaf: tensor} from ``<location>.adapter_fusion_layer.<saved>.<leaf>``."""
    marker = f".adapter_fusion_layer.{saved}."
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        location, sep, leaf = key.partition(marker)
        if not sep or leaf not in _LEAVES:
            raise AdapterFileError(
                f"key {key!r} in {where} is not a tensor of fusion {saved!r} (expected "
                f"'<location>{marker}query.weight' and so on)"
            )
        out.setdefault(location, {})[leaf] = value
    if not out:
        raise AdapterFileError(f"{where} holds no fusion tensors (keys '<location>{marker}...')")
    return out


def _sites(ctl: Any, stored: dict[str, dict[str, torch.Tensor]], where: Path) -> dict[str, str]:
    """stored location -> our module (the sub-layer module the members' adapters sit on)."""
    located = {loc: _layer_of(loc, where) for loc in stored}
    located = {loc: (renamed(layer, ctl.model), w, r) for loc, (layer, w, r) in located.items()}
    layers = resolve_sites(sorted({layer for layer, _, _ in located.values()}), ctl.model, where)
    family, roles = profile_for(ctl.model)
    modules = base_modules(ctl.model)
    out: dict[str, str] = {}
    try:
        for loc, (layer, _, role) in located.items():
            ours = layers[layer]
            wanted = [role] if role is not None else [f"{k}.sublayer" for k in ("attn", "cross", "ffn")]
            inside = []
            for r in wanted:
                try:
                    inside += [
                        n
                        for n in select(ctl.model, [r], family=family, roles=roles, modules=modules)
                        if n.startswith(ours + ".")
                    ]
                except TargetError:
                    continue
            if len(inside) != 1:
                raise TargetError(f"{len(inside)} modules of role(s) {wanted} in {ours!r}")
            out[loc] = inside[0]
    except TargetError as e:
        raise AdapterFileError(
            f"AdapterHub fusion {str(where)!r}: cannot place its layers on this {type(ctl.model).__name__} ({e})"
        ) from None
    return out


def plan_of(
    ctl: Any, path: str | os.PathLike, *, allow_pickle: bool, members: list[str] | None = None
) -> tuple[str, Plan, list[str]]:
    """``(saved name, plan, member names)`` of a fusion directory, over the already loaded ``members`` (default:
    the saved names)."""
    where = Path(path)
    config, saved_members, saved = _config(where)
    members = list(members) if members is not None else saved_members
    missing = [n for n in members if n not in ctl.names]
    if missing:
        raise AdapterFileError(
            f"AdapterHub fusion {str(where)!r} fuses {members}, but {missing} are not loaded: load the members' "
            "directories first (or the whole save_adapter_setup directory)"
        )
    tensors = _read_weights(where, allow_pickle)
    require_float(tensors, where)
    stored = _split(tensors, saved, where)
    sites = _sites(ctl, stored, where)
    cfg = fusion_config(config, members, ctl.model, [sites[loc] for loc in stored])
    modules = base_modules(ctl.model)
    try:
        plan = ctl.plan(cfg)
        comps: dict[str, tuple[str, Any]] = {}
        by_site = {site: stored[loc] for loc, site in sites.items()}
        for site, (kind, comp) in plan.components.items():
            if not isinstance(comp, FusionLayer) or site not in by_site:
                raise ValueError(f"unexpected {type(comp).__name__} at {site!r}")
            own = comp.state_dict()
            state = by_site[site]
            extra = sorted(set(state) - set(own))
            lacking = sorted(set(own) - set(state))
            if extra or lacking:
                raise ValueError(f"{site!r}: the file has {sorted(state)}, the fusion layer needs {sorted(own)}")
            comp.import_state({k: state[k].to(own[k].dtype) for k in own}, modules[site])
            comps[site] = (kind, comp)
        left = sorted(set(by_site) - set(comps))
        if left:
            raise ValueError(f"no fusion layer at {left} (the fused adapters have no component there)")
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"AdapterHub fusion {str(where)!r} does not fit this model: {e}") from None
    return saved, Plan(cfg, comps), members


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    """Load the fusion in ``path`` over its (already loaded) members; returns its name (``name``, else
    ``fusion[a,b]``, the name ``ak.Fuse("a", "b")`` uses)."""
    _, plan, members = plan_of(ctl, path, allow_pickle=allow_pickle)
    name = name or Fuse(*members).name
    ctl._check_new_name(name)
    ctl.install(name, plan, activate=False)
    return name
