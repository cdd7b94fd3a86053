"""peft interop for AdaLoRA (``peft_type: "ADALORA"``); dispatched from ``formats/peft.py``.

Layout (peft 0.21): ``adapter_config.json`` with peft's ``AdaLoraConfig`` fields (``init_r``, ``target_r``,
``lora_alpha``, ``lora_dropout``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``, ``orth_reg_weight``,
``total_step``, ``rank_pattern``, ``target_modules``, ``modules_to_save``, ``fan_in_fan_out``);
``adapter_model.safetensors`` with, per adapted module:

==============================================  =====================  ==========================
key                                             shape                  adapterkit tensor
==============================================  =====================  ==========================
``base_model.model.<module path>.lora_A``       ``(k, in)``            ``AdaLoRALinear.lora_A``
``base_model.model.<module path>.lora_E``       ``(k, 1)``             ``AdaLoRALinear.lora_E``
``base_model.model.<module path>.lora_B``       ``(out, k)``           ``AdaLoRALinear.lora_B``
``base_model.model.<head>.<param>``             head                   ``HeadCopy``
==============================================  =====================  ==========================

On ``nn.Conv2d`` (peft's ``SVDConv2d``) ``in`` is ``in_channels · kh · kw`` (``lora_A`` rows are flattened kernels)
and the shapes are otherwise the same, so files need no conversion (``AdaLoRAConv2d``).

``rank_pattern`` maps ``<module path>.lora_E`` (peft may leave the adapter name in: ``...lora_E.default``) to
``init_r`` booleans, the triplets kept; the file then holds only those ``k`` rows (peft's
``resize_state_dict_by_rank_pattern``). We keep all ``init_r`` triplets: a kept row goes to its position, dropped
ones are zero, and ``rank_mask`` is the pattern. Exports write the pattern of our ``rank_mask`` and the kept rows.
``ranknum`` is not saved by peft (always ``init_r``). ``total_step`` must be set in peft's file: an adapter whose
config left it to the trainer writes the number of steps it was trained for, else the smallest valid value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..component import Component
from ..methods.adalora import AdaLoRA
from ._peft_sites import export_state, install_planned, peft_config, read_sites
from .io import AdapterFileError, import_checked, read_adapter
from .peft import Fields, write

PEFT_TYPE = "ADALORA"
METHOD = "adalora"
TENSORS = ("lora_A", "lora_E", "lora_B")


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    cfg = ctl._record(name).config
    assert isinstance(cfg, AdaLoRA)
    pattern: dict[str, list[bool]] = {}
    conv1d = False
    total_step = cfg.total_step

    def site_tensors(site: str, comp: Any, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        nonlocal conv1d, total_step
        conv1d |= type(module).__name__ == "Conv1D"
        total_step = total_step or comp.allocator.total_step
        keep = comp.rank_mask
        pattern[f"{site}.lora_E"] = keep.tolist()
        return {"lora_A": comp.lora_A[keep], "lora_E": comp.lora_E[keep], "lora_B": comp.lora_B[:, keep]}

    tensors, targets, heads = export_state(ctl, name, site_tensors)
    config = peft_config(
        ctl, name, PEFT_TYPE, targets, heads, init_r=cfg.init_r, target_r=cfg.target_r, lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout, tinit=cfg.tinit, tfinal=cfg.tfinal, deltaT=cfg.delta_t, beta1=cfg.beta1,
        beta2=cfg.beta2, orth_reg_weight=cfg.orth_reg_weight,
        total_step=total_step or cfg.tinit + cfg.tfinal + 1, rank_pattern=pattern, r=8, bias="none",
        fan_in_fan_out=conv1d, use_rslora=False, use_dora=False, init_lora_weights=True,
    )  # fmt: skip
    write(path, tensors, config)


def _pattern(fields: Fields) -> dict[str, list[bool]]:
    """``rank_pattern`` as module path -> kept triplets."""
    value = fields.data.get("rank_pattern")
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(v, list) and all(isinstance(b, bool) for b in v) for v in value.values()
    ):
        raise fields.error("rank_pattern", value, "an object mapping '<module>.lora_E' to lists of true/false")
    out = {}
    for key, keep in value.items():
        site, found, _ = key.rpartition(".lora_E")
        if not found:
            raise fields.error("rank_pattern", key, "keys ending in '.lora_E' (optionally '.lora_E.<adapter>')")
        out[site] = keep
    return out


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    directory = Path(path)
    data, raw = read_adapter(directory, "adapter_model", allow_pickle=allow_pickle)
    fields = Fields(data, directory)
    name = name or "default"
    ctl._check_new_name(name)
    modules, per_site, heads = read_sites(
        ctl,
        raw,
        fields,
        path,
        {t: t for t in TENSORS},
        "AdaLoRA tensors (keys ending in '.lora_A', '.lora_E', '.lora_B')",
    )
    pattern = _pattern(fields)
    total = data.get("total_step")
    cfg = fields.build(
        AdaLoRA,
        init_r=fields.integer("init_r", 12),
        target_r=fields.integer("target_r", 8),
        alpha=fields.number("lora_alpha", 8),
        dropout=fields.number("lora_dropout", 0.0),
        tinit=fields.integer("tinit", 0, minimum=0),
        tfinal=fields.integer("tfinal", 0, minimum=0),
        delta_t=fields.integer("deltaT", 1),
        beta1=fields.number("beta1", 0.85),
        beta2=fields.number("beta2", 0.85),
        orth_reg_weight=fields.number("orth_reg_weight", 0.5),
        total_step=fields.integer("total_step") if total is not None else None,
        targets=tuple(per_site),
        heads=tuple(heads),
    )

    def load_into(site: str, kind: str, comp: Component, module: Any) -> None:
        if kind == "head":
            import_checked(comp, heads[site], module)
            return
        state = per_site[site]
        missing = [t for t in TENSORS if t not in state]
        if missing:
            raise AdapterFileError(f"{directory}: {site!r} lacks {missing}")
        keep = pattern.get(site)
        r = cfg.init_r
        if keep is not None:
            if len(keep) != r or sum(keep) != state["lora_A"].shape[0]:
                raise AdapterFileError(
                    f"{directory}: rank_pattern of {site!r} keeps {sum(keep)} of {len(keep)} triplets, but the file "
                    f"holds {state['lora_A'].shape[0]} of init_r={r}"
                )
            mask = torch.tensor(keep, dtype=torch.bool)
            full = {
                "lora_A": state["lora_A"].new_zeros(r, state["lora_A"].shape[1]),
                "lora_E": state["lora_E"].new_zeros(r, 1),
                "lora_B": state["lora_B"].new_zeros(state["lora_B"].shape[0], r),
            }
            full["lora_A"][mask] = state["lora_A"]
            full["lora_E"][mask] = state["lora_E"]
            full["lora_B"][:, mask] = state["lora_B"]
            state = full
        else:
            mask = torch.ones(r, dtype=torch.bool)
        import_checked(comp, {**state, "rank_mask": mask}, module)

    return install_planned(ctl, name, cfg, path, load_into, activate=activate)
