"""peft interop for the LoRA family (``peft_type: "LORA"``); dispatched from ``formats/peft.py``.

Layout (peft 0.21, see docs/peft_lora_format.md): ``adapter_config.json`` with ``peft_type: "LORA"``
and ``adapter_model.safetensors`` with keys ``base_model.model.<module path>.<suffix>``:

=================================  ==========================================  ===================
suffix                             meaning                                     adapterkit tensor
=================================  ==========================================  ===================
``lora_A.weight``/``lora_B.weight``  linear, Conv1D and Conv2d factors          ``lora_A``/``lora_B``
``lora_embedding_A``/``_B``        embedding factors (no ``.weight``)          ``lora_A``/``lora_B``
``lora_magnitude_vector``          DoRA magnitude (no ``.weight``)             ``magnitude``
``base_layer.bias``                trained bias of a LoRA module               base + ``bias``
``bias`` (other modules)           ``bias="all"``: trained bias                base + ``BiasDelta``
``weight``/``bias`` of a head      ``modules_to_save`` copy                    ``HeadCopy``
=================================  ==========================================  ===================

PiSSA/OLoRA/CorDA adapters are exported the way peft converts them
(``path_initial_model_for_weight_conversion``): ``A' = [A; A0]``, ``B' = [B, -B0]``, rank and alpha
doubled (alpha ×√2 with rsLoRA), a plain LoRA on the *original* weights. EVA adapters are plain LoRAs whose
ranks were redistributed by calibration: written as peft's EVA leaves its config (``rank_pattern`` and
``alpha_pattern`` per module where they differ from ``r``/``lora_alpha``; modules given rank 0 carry no adapter and
are left out of ``target_modules``), with ``init_lora_weights: true``. Uncalibrated EVA/CorDA adapters are refused.
peft's own EVA directories (``init_lora_weights: "eva"``) load as plain LoRAs.

Parameter targets (``target_parameters``: MoE experts, routers; peft's ``ParamWrapper``) are stored under the
owning module, nested by ``base_layer.`` per later targeted parameter; ``methods/lora_params.py`` converts them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ..component import Component
from ..methods import lora_params
from ..methods.bitfit import BiasDelta
from ..methods.heads import HeadCopy
from ..methods.lora import LoRA, LoRAEmbedding, LoRAInit
from ..plan import Plan
from ..targeting import base_modules
from .io import AdapterFileError, import_checked, read_adapter, require_float
from .peft import PREFIX, Fields, adapter_task_type, write

PEFT_TYPE = "LORA"
METHOD = "lora"
_UNSUPPORTED_INITS = ("pissa", "olora", "corda", "loftq")  # "eva" only sets A from data: a plain LoRA


def _base_bias(module: Any, delta: torch.Tensor, merged: bool) -> torch.Tensor:
    """The base module's own bias (taking a merged delta back out)."""
    bias = module.bias.detach()
    return bias - delta.to(bias.dtype) if merged else bias


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    record = ctl._record(name)
    cfg = record.config
    assert isinstance(cfg, LoRA)
    comps = ctl.components(name)
    converted = cfg.init in (LoRAInit.PISSA, LoRAInit.OLORA, LoRAInit.CORDA)
    eva = cfg.init is LoRAInit.EVA
    for site, comp in comps.items():
        if cfg.init in (LoRAInit.EVA, LoRAInit.CORDA) and not getattr(comp, "calibrated", True):
            raise RuntimeError(
                f"adapter {name!r} (LoRA init={cfg.init.value!r}) has not been calibrated ({site!r}): run "
                f"adapters.calibrate({name!r}, batches) before exporting it"
            )
    rank_pattern = {k: v for k, v in cfg.rank_pattern.items()}
    alpha_pattern = {k: v for k, v in cfg.alpha_pattern.items()}
    if eva:  # per-module ranks and alphas after EVA's redistribution, as peft's _load_eva_state_dict sets them
        rank_pattern, alpha_pattern = {}, {}
    tensors: dict[str, torch.Tensor] = {}
    targets, heads, fan_in_fan_out = [], [], False
    parameters: list[str] = []
    for site, comp in comps.items():
        kind, module = record.kinds[site], ctl._sites[site].module
        key = PREFIX + site
        if isinstance(comp, lora_params.LoRAParameters):  # target_parameters: peft's nested ParamWrapper keys
            tensors.update({f"{key}.{k}": v for k, v in lora_params.peft_tensors(comp, module).items()})
            parameters += lora_params.peft_parameter_names(site, comp)
            continue
        if kind == "head":
            heads.append(site)
            for k, v in comp.head.state_dict().items():
                tensors[f"{key}.{k}"] = v
            continue
        if kind == "extra":
            tensors[f"{key}.bias"] = _base_bias(module, comp.delta, comp.merged) + comp.delta.detach()
            continue
        if eva:
            if comp.r == 0:
                continue  # peft removes the LoRA layer of a module given rank 0
            if comp.r != cfg.r:
                rank_pattern[site] = comp.r
            if comp.alpha_eff != cfg.alpha:
                alpha_pattern[site] = comp.alpha_eff
        targets.append(site)
        fan_in_fan_out |= type(module).__name__ == "Conv1D"
        A, B = comp.lora_A.detach(), comp.lora_B.detach()
        if converted:
            A, B = torch.cat([A, comp.init_A], dim=0), torch.cat([B, -comp.init_B], dim=1)
        if isinstance(comp, LoRAEmbedding):
            tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = A, B
        else:
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = A, B
        if getattr(comp, "magnitude", None) is not None:
            tensors[f"{key}.lora_magnitude_vector"] = comp.magnitude.detach()
        if comp.bias is not None:
            tensors[f"{key}.base_layer.bias"] = _base_bias(module, comp.bias, comp.merged) + comp.bias.detach()

    grow_r = 2 if converted else 1
    grow_alpha = (math.sqrt(2) if cfg.rslora else 2) if converted else 1
    config = {
        "peft_type": "LORA",
        "task_type": adapter_task_type(ctl, name),
        "base_model_name_or_path": getattr(ctl.model, "name_or_path", None) or None,
        "r": cfg.r * grow_r,
        "lora_alpha": cfg.alpha * grow_alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.dora,
        "bias": cfg.bias.value,
        "target_modules": sorted(targets),
        "rank_pattern": {k: v * grow_r for k, v in rank_pattern.items()},
        "alpha_pattern": {k: v * grow_alpha for k, v in alpha_pattern.items()},
        "fan_in_fan_out": fan_in_fan_out,
        "modules_to_save": heads or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }
    if parameters:
        config["target_parameters"] = sorted(parameters)
    write(path, tensors, config)


_LORA_KEYS = {
    "lora_A.weight": "lora_A",
    "lora_B.weight": "lora_B",
    "lora_embedding_A": "lora_A",
    "lora_embedding_B": "lora_B",
    "lora_magnitude_vector": "magnitude",
    "base_layer.bias": "bias",
}


def _matches(name: str, selectors: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in selectors)


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    directory = Path(path)
    data, raw = read_adapter(directory, "adapter_model", allow_pickle=allow_pickle)
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_UNSUPPORTED_INITS):
        raise AdapterFileError(
            f"{directory} holds a peft {init!r} adapter relative to a modified base weight; save it from peft with "
            "path_initial_model_for_weight_conversion=... so that it applies to the original model"
        )
    fields = Fields(data, directory)
    if fields.flag("lora_bias", False):
        raise AdapterFileError(f"{fields.where}: peft adapters with lora_bias=True are not supported yet")
    name = name or "default"
    ctl._check_new_name(name)

    modules = base_modules(ctl.model)
    head_sel = fields.names("modules_to_save")
    target_parameters = fields.names("target_parameters")
    try:  # tensors of parameter targets (MoE experts, routers), nested under their module by peft
        param_state, raw = lora_params.split_peft_state(raw, modules, target_parameters, PREFIX)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"peft adapter {str(path)!r} does not fit this model: {e}") from None
    per_site: dict[str, dict[str, torch.Tensor]] = {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"unexpected key {key!r} in {directory}: peft keys start with {PREFIX!r}")
        rest = key[len(PREFIX) :]
        for suffix, ours in _LORA_KEYS.items():
            if rest.endswith("." + suffix):
                per_site.setdefault(rest[: -len(suffix) - 1], {})[ours] = value
                break
        else:
            site, _, leaf = rest.rpartition(".")
            wrapper, _, inner = site.rpartition(".")
            if inner in ("modules_to_save", "original_module") and _matches(wrapper, head_sel):
                continue  # peft's bias="all" also lists its head wrapper's inner copies; `<head>.<p>` holds them
            if site in modules and _matches(site, head_sel):
                heads.setdefault(site, {})[f"head.{leaf}"] = value
            elif leaf == "bias" and site in modules:
                extra[site] = value
            elif rest.endswith(".base_layer.weight") and rest[: -len(".base_layer.weight")] in modules:
                base = modules[rest[: -len(".base_layer.weight")]].weight
                if base.shape != value.shape or not torch.equal(base.detach().cpu(), value.to(base.dtype)):
                    raise AdapterFileError(f"{directory} carries a changed base weight {rest!r}; not supported")
            else:
                raise AdapterFileError(
                    f"key {key!r} in {directory} does not belong to this {type(ctl.model).__name__}"
                )

    if not per_site and not heads and not extra and not param_state:
        raise AdapterFileError(f"{directory} holds no LoRA tensors (keys ending in '.lora_A.weight' and so on)")
    require_float({f"{s}.{k}": v for s, state in per_site.items() for k, v in state.items()}, directory)
    require_float(extra, directory)
    missing = sorted(s for s in list(per_site) + list(heads) if s not in modules)
    if missing:
        raise AdapterFileError(
            f"peft adapter {str(path)!r} targets {missing[0]!r}, which this {type(ctl.model).__name__} does not "
            f"have ({len(missing)} missing): wrong base model?"
        )
    cfg = fields.build(
        LoRA,
        r=fields.integer("r", 8),
        alpha=fields.number("lora_alpha", 8),
        dropout=fields.number("lora_dropout", 0.0),
        rslora=fields.flag("use_rslora", False),
        dora=fields.flag("use_dora", False),
        bias=fields.choice("bias", "none", ("none", "all", "lora_only")),
        rank_pattern=fields.numbers("rank_pattern"),
        alpha_pattern=fields.numbers("alpha_pattern"),
        targets=tuple(per_site),
        heads=tuple(heads),
        target_parameters=tuple(target_parameters),
    )
    comps: dict[str, tuple[str, Component]] = {}
    try:
        built = lora_params.build_parameter_sites(cfg, modules, (), {}) if target_parameters else {}
        for site in modules:
            module = modules[site]
            if site in built:
                comp = built[site]
                if ctl.autocast_adapter_dtype:
                    comp.upcast_()
                import_checked(comp, lora_params.from_peft(comp, param_state.get(site, {})), module)
                comps[site] = ("target", comp)
            elif site in per_site:
                comp = cfg.build(module, site)
                if ctl.autocast_adapter_dtype:  # float32 before the import, so the file's values stay exact
                    comp.upcast_()
                state = dict(per_site[site])
                if "bias" in state:
                    state["bias"] = state["bias"].to(module.bias.dtype) - module.bias.detach().cpu()
                elif comp.bias is not None:
                    state["bias"] = torch.zeros_like(comp.bias)
                if "lora_A" not in state or "lora_B" not in state:
                    raise ValueError(f"{site!r} lacks lora_A or lora_B")
                import_checked(comp, state, module)
                comps[site] = ("target", comp)
            elif site in heads:
                comp = HeadCopy(module)
                import_checked(comp, heads[site], module)
                comps[site] = ("head", comp)
            elif site in extra:
                comp = BiasDelta(module)
                if ctl.autocast_adapter_dtype:
                    comp.upcast_()
                comp.import_state(
                    {"delta": extra[site].to(module.bias.dtype) - module.bias.detach().cpu()}, module
                )
                comps[site] = ("extra", comp)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"peft adapter {str(path)!r} does not fit this model: {e}") from None
    ctl.install(name, Plan(cfg, comps), activate=activate)
    return name
