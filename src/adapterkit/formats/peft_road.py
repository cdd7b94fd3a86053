"""peft interop for RoAd (``peft_type: "ROAD"``); dispatched from ``formats/peft.py``.

Layout (peft 0.21): ``adapter_config.json`` with ``variant`` (``road_1``/``road_2``/``road_4``), ``group_size``,
``init_weights``, ``target_modules``, ``modules_to_save``; ``adapter_model.safetensors`` with, per adapted module:

==============================================  ===========================  ========================
key                                             shape                        adapterkit tensor
==============================================  ===========================  ========================
``base_model.model.<module path>.road_theta``   ``(out/2,)|(out,)|(2 out,)``  ``RoadLayer.road_theta``
``base_model.model.<module path>.road_alpha``   same                         ``RoadLayer.road_alpha``
``base_model.model.<head>.<param>``             head                         ``HeadCopy``
==============================================  ===========================  ========================

The tensor names are peft's, so the conversion is a renaming of keys. peft's RoAd acts on ``nn.Linear`` only:
exporting an adapter on a GPT-2 ``Conv1D`` is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..component import Component
from ..methods.road import RoAd, RoadVariant
from ._peft_sites import export_state, install_planned, peft_config, read_sites
from .io import import_checked, read_adapter
from .peft import Fields, write

PEFT_TYPE = "ROAD"
METHOD = "road"
TENSORS = ("road_theta", "road_alpha")


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    cfg = ctl._record(name).config
    assert isinstance(cfg, RoAd)

    def site_tensors(site: str, comp: Any, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(
                f"adapter {name!r} acts on {site!r}, a {type(module).__name__}; peft's RoAd acts on nn.Linear only, "
                "so it cannot be exported to peft (use format='native')"
            )
        return {key: getattr(comp, key) for key in TENSORS}

    tensors, targets, heads = export_state(ctl, name, site_tensors)
    config = peft_config(
        ctl, name, PEFT_TYPE, targets, heads, variant=cfg.variant.value, group_size=cfg.group_size,
        init_weights=cfg.init_weights,
    )  # fmt: skip
    write(path, tensors, config)


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
        "RoAd tensors (keys ending in '.road_theta', '.road_alpha')",
    )
    cfg = fields.build(
        RoAd,
        variant=fields.choice("variant", "road_1", tuple(v.value for v in RoadVariant)),
        group_size=fields.integer("group_size", 64),
        init_weights=fields.flag("init_weights", True),
        targets=tuple(per_site),
        heads=tuple(heads),
    )

    def load_into(site: str, kind: str, comp: Component, module: Any) -> None:
        import_checked(comp, heads[site] if kind == "head" else per_site[site], module)

    return install_planned(ctl, name, cfg, path, load_into, activate=activate)
