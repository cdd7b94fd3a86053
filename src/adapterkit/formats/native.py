"""Native format: ``adapter_config.json`` + ``adapter.safetensors``.

``adapter_config.json``::

    {"format": "adapterkit", "format_version": 1, "name": "sst2",
     "config": {"method": "lora", "schema_version": 1, "r": 8, ...},
     "sites": {"bert.encoder.layer.0.attention.self.query": "target", "classifier": "head", ...},
     "fingerprint": {"architecture": "BertForSequenceClassification", "model_type": "bert",
                     "hidden_size": 384, "shapes": "<sha256 of the adapted modules' weight shapes>"}}

``adapter.safetensors`` keys are ``<module name>.<component tensor name>`` (e.g.
``...query.lora_A``). A save is all-or-nothing (``io.write_adapter``: the tensors' metadata holds a copy of
the config they were saved with, and ``load`` never pairs them with another config).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backends import backend_for
from ..component import Component
from ..config import config_from_dict
from ..plan import Plan
from ..targeting import base_modules
from .io import CONFIG, AdapterFileError, import_checked, read_adapter, write_adapter

FORMAT = "adapterkit"
FORMAT_VERSION = 1


def fingerprint(model: nn.Module, sites: list[str]) -> dict[str, Any]:
    """What identifies a compatible base model: architecture, sizes, and the adapted weights' shapes."""
    modules = base_modules(model)
    cfg = getattr(model, "config", None)
    archs = getattr(cfg, "architectures", None) or [type(model).__name__]
    shapes = []
    for s in sorted(sites):
        module = modules.get(s)
        w, shape = getattr(module, "weight", None), None
        if isinstance(w, torch.Tensor):  # the dense shape, also for quantized (packed) weights
            backend = backend_for(module)
            shape = backend.shape(module) if backend is not None else tuple(w.shape)
        shapes.append(f"{s}:{shape}")
    return {
        "architecture": archs[0],
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "shapes": hashlib.sha256("\n".join(shapes).encode()).hexdigest(),
    }


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    record = ctl._record(name)
    comps = ctl.components(name)
    tensors: dict[str, torch.Tensor] = {}
    for site, comp in comps.items():
        for k, v in comp.export_state().items():
            tensors[f"{site}.{k}"] = v
    write_adapter(
        path,
        "adapter.safetensors",
        tensors,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name,
            "config": record.config.to_dict(),
            "sites": dict(record.kinds),
            "fingerprint": fingerprint(ctl.model, list(record.kinds)),
        },
    )


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    directory = Path(path)
    where = directory / CONFIG

    def check_version(data: dict[str, Any]) -> None:
        version = data.get("format_version", 1)
        if not isinstance(version, int) or isinstance(version, bool):
            raise AdapterFileError(f"{where}: 'format_version' must be an integer, not {version!r}")
        if version > FORMAT_VERSION:
            raise AdapterFileError(f"{directory} was written by a newer adapterkit (format {version})")

    data, tensors = read_adapter(directory, "adapter", allow_pickle=allow_pickle, check=check_version)
    sites = data.get("sites")
    if not isinstance(sites, dict) or not all(isinstance(v, str) for v in sites.values()):
        raise AdapterFileError(
            f"{where} is invalid: 'sites' must map module names to site kinds, not {sites!r:.80}"
        )
    if not isinstance(data.get("config"), dict):
        raise AdapterFileError(f"{where} is invalid: 'config' must be an object, not {data.get('config')!r:.80}")
    try:
        cfg = config_from_dict(data["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise AdapterFileError(f"{where} is invalid: {e}") from None
    saved_name = data.get("name")
    if saved_name is not None and not isinstance(saved_name, str):
        raise AdapterFileError(f"{where} is invalid: 'name' must be a string, not {saved_name!r:.80}")
    saved_fp = data.get("fingerprint") or {}
    if not isinstance(saved_fp, dict):
        raise AdapterFileError(f"{where} is invalid: 'fingerprint' must be an object, not {saved_fp!r:.80}")
    name = name or saved_name or "default"
    ctl._check_new_name(name)

    modules = base_modules(ctl.model)
    missing = sorted(s for s in sites if s not in modules)
    if missing:
        raise AdapterFileError(
            f"adapter {str(path)!r} was saved for a {saved_fp.get('architecture')} model; this "
            f"{type(ctl.model).__name__} has no module {missing[0]!r} ({len(missing)} missing): wrong base model?"
        )
    here = fingerprint(ctl.model, list(sites))
    if saved_fp.get("shapes") not in (None, here["shapes"]):
        raise AdapterFileError(
            f"adapter {str(path)!r} does not fit this model: it was trained on {saved_fp.get('architecture')} "
            f"(hidden size {saved_fp.get('hidden_size')}) and the adapted weights' shapes differ from this "
            f"{here['architecture']} (hidden size {here['hidden_size']}); load it onto the base model it was trained on"
        )

    # re-plan from the saved config, so components built together (shared state) are built together again
    try:
        plan = ctl.plan(cfg)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"adapter {str(path)!r} does not fit this model: {e}") from None
    planned = {n: kind for n, (kind, _) in plan.components.items()}
    if planned != sites:
        diff = sorted(set(planned.items()) ^ set(sites.items()))
        raise AdapterFileError(
            f"adapter {str(path)!r} does not fit this model: its config resolves to other sites here than when it "
            f"was saved (e.g. {diff[0]}); load it onto the base model it was trained on"
        )
    comps: dict[str, tuple[str, Component]] = {}
    used: set[str] = set()
    for site, kind in sites.items():
        comp = plan.components[site][1]
        prefix, own = site + ".", comp.export_state()  # the keys it saves (a prefix MLP saves its result)
        state = {
            k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and k[len(prefix) :] in own
        }
        used.update(prefix + k for k in state)
        try:
            import_checked(comp, state, modules[site], reference=own)
        except (TypeError, ValueError) as e:
            raise AdapterFileError(f"adapter {str(path)!r} does not fit module {site!r}: {e}") from None
        comps[site] = (kind, comp)
    unused = sorted(set(tensors) - used)
    if unused:
        raise AdapterFileError(f"{directory}/adapter.safetensors has tensors no site uses: {unused[:5]}")
    ctl.install(name, Plan(plan.config, comps), activate=activate)
    return name
