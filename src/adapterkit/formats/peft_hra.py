"""peft interop for HRA (``peft_type: "HRA"``); dispatched from ``formats/peft.py``.

Layout (peft 0.21): ``adapter_config.json`` with ``r``, ``apply_GS``, ``init_weights``, ``bias`` (``"none"``;
peft's ``"all"``/``"hra_only"`` train the base biases, which adapterkit's HRA does not, so such files are refused),
``target_modules``, ``modules_to_save``; ``adapter_model.safetensors`` with, per adapted module
(``n = in`` for ``nn.Linear``, ``in · kh · kw`` for ``nn.Conv2d``):

=========================================  ============  ====================
key                                        shape         adapterkit tensor
=========================================  ============  ====================
``base_model.model.<module path>.hra_u``   ``(n, r)``    ``HRALayer.hra_u``
``base_model.model.<head>.<param>``        head          ``HeadCopy``
=========================================  ============  ====================

peft has neither ETHER/ETHER+ nor a ``Conv1D`` HRA layer: exporting such adapters is refused (use the native
format).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..component import Component
from ..methods.hra import HRA, HRAVariant
from ._peft_sites import export_state, install_planned, peft_config, read_sites
from .io import AdapterFileError, import_checked, read_adapter
from .peft import Fields, write

PEFT_TYPE = "HRA"
METHOD = "hra"


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    cfg = ctl._record(name).config
    assert isinstance(cfg, HRA)
    if cfg.variant is not HRAVariant.HRA:
        raise ValueError(
            f"adapter {name!r} is HRA variant {cfg.variant.value!r}; peft has no ETHER/ETHER+, so it cannot be "
            "exported to peft (use format='native')"
        )

    def site_tensors(site: str, comp: Any, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            raise ValueError(
                f"adapter {name!r} acts on {site!r}, a {type(module).__name__}; peft's HRA acts on nn.Linear and "
                "nn.Conv2d only, so it cannot be exported to peft (use format='native')"
            )
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size[0] != module.kernel_size[1]:
            raise ValueError(
                f"adapter {name!r} acts on {site!r}, a Conv2d with a {tuple(module.kernel_size)} kernel; peft's HRA "
                "assumes square kernels, so it cannot be exported to peft (use format='native')"
            )
        return {"hra_u": comp.hra_u}

    tensors, targets, heads = export_state(ctl, name, site_tensors)
    config = peft_config(
        ctl, name, PEFT_TYPE, targets, heads, r=cfg.r, apply_GS=cfg.apply_GS, init_weights=cfg.init_weights,
        bias="none", exclude_modules=None, layers_to_transform=None, layers_pattern=None,
    )  # fmt: skip
    write(path, tensors, config)


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    directory = Path(path)
    data, raw = read_adapter(directory, "adapter_model", allow_pickle=allow_pickle)
    fields = Fields(data, directory)
    bias = fields.choice("bias", "none", ("none", "all", "hra_only"))
    if bias != "none":
        raise AdapterFileError(
            f"{fields.where}: bias={bias!r} trains the base model's biases, which adapterkit's HRA does not "
            "support; only bias='none' HRA adapters load"
        )
    name = name or "default"
    ctl._check_new_name(name)
    modules, per_site, heads = read_sites(
        ctl, raw, fields, path, {"hra_u": "hra_u"}, "HRA tensors (keys ending in '.hra_u')"
    )
    cfg = fields.build(
        HRA,
        r=fields.integer("r", 8),
        apply_GS=fields.flag("apply_GS", False),
        init_weights=fields.flag("init_weights", True),
        targets=tuple(per_site),
        heads=tuple(heads),
    )

    def load_into(site: str, kind: str, comp: Component, module: Any) -> None:
        import_checked(comp, heads[site] if kind == "head" else per_site[site], module)

    return install_planned(ctl, name, cfg, path, load_into, activate=activate)
