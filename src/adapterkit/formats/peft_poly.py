"""peft interop for Polytropon / Multi-Head Routing (``peft_type: "POLY"``); dispatched from ``formats/peft.py``.

Layout (peft 0.21): ``adapter_config.json`` with ``r``, ``n_tasks``, ``n_skills``, ``n_splits``, ``poly_type``
(``"poly"``), ``init_weights``, ``target_modules``, ``modules_to_save``; ``adapter_model.safetensors`` with, per
adapted module:

=====================================================  =====================================  ==========================
key                                                    shape                                  adapterkit tensor
=====================================================  =====================================  ==========================
``base_model.model.<module path>.poly_lora_A``         ``(n_splits, n_skills, in/n_splits, r)``  ``PolyLinear.poly_lora_A``
``base_model.model.<module path>.poly_lora_B``         ``(n_splits, n_skills, r, out/n_splits)`` ``PolyLinear.poly_lora_B``
``base_model.model.<module path>.poly_router.module_logits``  ``(n_tasks, n_splits·n_skills)``  the allocation logits
``base_model.model.<head>.<param>``                    head                                   ``HeadCopy``
=====================================================  =====================================  ==========================

peft learns one allocation per layer. An adapter with ``shared_allocation=True`` writes its one allocation at every
layer; a peft directory loads with one allocation per layer (peft's model), which ``adapters.load`` keeps. peft's Poly
acts on ``nn.Linear`` only: exporting an adapter on a GPT-2 ``Conv1D`` is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..component import Component
from ..methods.poly import Poly
from ._peft_sites import export_state, install_planned, peft_config, read_sites
from .io import import_checked, read_adapter
from .peft import Fields, write

PEFT_TYPE = "POLY"
METHOD = "poly"
SUFFIXES = {
    "poly_lora_A": "poly_lora_A",
    "poly_lora_B": "poly_lora_B",
    "poly_router.module_logits": "poly_router.module_logits",
}


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    cfg = ctl._record(name).config
    assert isinstance(cfg, Poly)

    def site_tensors(site: str, comp: Any, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(
                f"adapter {name!r} acts on {site!r}, a {type(module).__name__}; peft's Poly acts on nn.Linear only, "
                "so it cannot be exported to peft (use format='native')"
            )
        return {
            "poly_lora_A": comp.poly_lora_A,
            "poly_lora_B": comp.poly_lora_B,
            "poly_router.module_logits": comp.poly_router.module_logits.detach().clone(),  # shared: one copy each
        }

    tensors, targets, heads = export_state(ctl, name, site_tensors)
    config = peft_config(
        ctl, name, PEFT_TYPE, targets, heads, r=cfg.r, n_tasks=cfg.n_tasks, n_skills=cfg.n_skills,
        n_splits=cfg.n_splits, poly_type="poly", init_weights=cfg.init_weights, exclude_modules=None,
    )  # fmt: skip
    write(path, tensors, config)


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    directory = Path(path)
    data, raw = read_adapter(directory, "adapter_model", allow_pickle=allow_pickle)
    fields = Fields(data, directory)
    name = name or "default"
    ctl._check_new_name(name)
    modules, per_site, heads = read_sites(
        ctl, raw, fields, path, SUFFIXES, "Poly tensors (keys ending in '.poly_lora_A', '.poly_lora_B')"
    )
    fields.choice("poly_type", "poly", ("poly",))
    cfg = fields.build(
        Poly,
        r=fields.integer("r", 8),
        n_tasks=fields.integer("n_tasks", 1),
        n_skills=fields.integer("n_skills", 4),
        n_splits=fields.integer("n_splits", 1),
        init_weights=fields.flag("init_weights", True),
        targets=tuple(per_site),
        heads=tuple(heads),
    )

    def load_into(site: str, kind: str, comp: Component, module: Any) -> None:
        import_checked(comp, heads[site] if kind == "head" else per_site[site], module)

    return install_planned(ctl, name, cfg, path, load_into, activate=activate)
