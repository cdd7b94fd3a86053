"""Helpers shared by the peft converters other than LoRA's ((IA)^3, VeRA, LoHa/LoKr, OFT/BOFT, HRA, RoAd): splitting
a peft state dict into per-site tensors and ``modules_to_save`` heads, installing what they fill, and the writing
side (:func:`export_state`, :func:`peft_config`, :func:`refuse_conv1d`).

peft keys are ``base_model.model.<module path>.<suffix>``; a head copy (``modules_to_save``) is stored as
``base_model.model.<head path>.<parameter>``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..plan import Plan
from ..targeting import base_modules
from .io import AdapterFileError, require_float
from .peft import PREFIX, adapter_task_type

__all__ = [
    "split_state",
    "head_state",
    "check_sites",
    "export_state",
    "peft_config",
    "install_planned",
    "refuse_conv1d",
]


def _matches(name: str, selectors: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in selectors)


def split_state(
    raw: dict[str, torch.Tensor],
    modules: dict[str, nn.Module],
    suffixes: dict[str, str],
    head_sel: list[str],
    directory: Path,
    skip: tuple[str, ...] = (),
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]]:
    """``(per_site, heads)``: per module path, our tensor name -> tensor (``suffixes`` maps peft's key suffix to
    ours), and per head path, ``head.<parameter>`` -> tensor. Keys in ``skip`` are left out.

    Raises:
        AdapterFileError: a key that is neither an adapter tensor nor a head parameter of this model.
    """
    per_site: dict[str, dict[str, torch.Tensor]] = {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        if key in skip:
            continue
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"unexpected key {key!r} in {directory}: peft keys start with {PREFIX!r}")
        rest = key[len(PREFIX) :]
        for suffix, ours in suffixes.items():
            if rest.endswith("." + suffix):
                per_site.setdefault(rest[: -len(suffix) - 1], {})[ours] = value
                break
        else:
            site, _, leaf = rest.rpartition(".")
            if site in modules and _matches(site, head_sel):
                heads.setdefault(site, {})[f"head.{leaf}"] = value
            else:
                raise AdapterFileError(f"key {key!r} in {directory} does not belong to this model")
    return per_site, heads


def check_sites(sites: list[str], modules: dict[str, nn.Module], path: Any, model: nn.Module) -> None:
    """Raise AdapterFileError when the file names modules this model does not have."""
    missing = sorted(s for s in sites if s not in modules)
    if missing:
        raise AdapterFileError(
            f"peft adapter {str(path)!r} targets {missing[0]!r}, which this {type(model).__name__} does not "
            f"have ({len(missing)} missing): wrong base model?"
        )


def read_sites(
    ctl: Any,
    raw: dict[str, torch.Tensor],
    fields: Any,
    path: Any,
    suffixes: dict[str, str],
    empty: str,
    skip: tuple[str, ...] = (),
) -> tuple[dict[str, nn.Module], dict[str, dict[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]]:
    """``(modules, per_site, heads)`` of a peft file's tensors on ``ctl.model``: :func:`split_state` with the file's
    ``modules_to_save``, then the checks every converter makes (the sites exist, there is at least one adapter
    tensor, else ``AdapterFileError(f"{path} holds no {empty}")``, floating tensors only)."""
    directory = Path(path)
    modules = base_modules(ctl.model)
    per_site, heads = split_state(raw, modules, suffixes, fields.names("modules_to_save"), directory, skip=skip)
    check_sites(list(per_site) + list(heads), modules, path, ctl.model)
    if not per_site:
        raise AdapterFileError(f"{directory} holds no {empty}")
    require_float({f"{s}.{k}": v for s, state in per_site.items() for k, v in state.items()}, directory)
    return modules, per_site, heads


def head_state(site: str, comp: Any) -> dict[str, torch.Tensor]:
    """peft keys of an adapter-owned head copy."""
    return {f"{PREFIX}{site}.{k}": v for k, v in comp.head.state_dict().items()}


def install_planned(
    ctl: Any,
    name: str,
    cfg: Any,
    path: Any,
    load_into: Callable[[str, str, Any, nn.Module], None],
    *,
    activate: bool,
) -> str:
    """Plan ``cfg`` on the model, fill each planned component from the file (``load_into(site, kind, comp,
    module)``), then install them all as adapter ``name`` (all-or-nothing: nothing is installed on failure).

    Raises:
        AdapterFileError: a tensor or config value that does not fit this model (naming ``path``).
    """
    modules = base_modules(ctl.model)
    comps: dict[str, tuple[str, Any]] = {}
    try:
        plan = ctl.plan(cfg)
        for site, (kind, comp) in plan.components.items():
            load_into(site, kind, comp, modules[site])
            comps[site] = (kind, comp)
    except AdapterFileError:
        raise
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"peft adapter {str(path)!r} does not fit this model: {e}") from None
    ctl.install(name, Plan(cfg, comps), activate=activate)
    return name


def export_state(
    ctl: Any, name: str, site_tensors: Callable[[str, Any, nn.Module], dict[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Adapter ``name``'s tensors under peft's keys: head copies (``modules_to_save``) as :func:`head_state`, every
    other site's ``site_tensors(site, component, module) -> {suffix: tensor}`` (it raises ValueError to refuse a
    site peft cannot hold). Returns ``(tensors, targets, heads)``."""
    record = ctl._record(name)
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    heads: list[str] = []
    for site, comp in ctl.components(name).items():
        if record.kinds[site] == "head":
            heads.append(site)
            tensors.update(head_state(site, comp))
            continue
        for suffix, value in site_tensors(site, comp, ctl._sites[site].module).items():
            tensors[f"{PREFIX}{site}.{suffix}"] = value.detach().contiguous()
        targets.append(site)
    return tensors, targets, heads


def peft_config(
    ctl: Any, name: str, peft_type: str, targets: list[str], heads: list[str], **fields: Any
) -> dict[str, Any]:
    """peft's ``adapter_config.json`` for adapter ``name``: what every converter writes (type, task, base model,
    targets, ``modules_to_save``, inference mode), then the method's own ``fields``."""
    return {
        "peft_type": peft_type,
        "task_type": adapter_task_type(ctl, name),
        "base_model_name_or_path": getattr(ctl.model, "name_or_path", None) or None,
        "target_modules": sorted(targets),
        "modules_to_save": heads or None,
        "inference_mode": True,
        **fields,
    }


def refuse_conv1d(ctl: Any, name: str, site: str, what: str) -> None:
    """Raise when ``site`` is a GPT-2 ``Conv1D`` (peft's ``what`` has no layer for it)."""
    if type(ctl._sites[site].module).__name__ == "Conv1D":
        raise ValueError(
            f"adapter {name!r} acts on {site!r}, a GPT-2 Conv1D; peft's {what} has no Conv1D layer, so it cannot be "
            "exported to peft (use format='native')"
        )
