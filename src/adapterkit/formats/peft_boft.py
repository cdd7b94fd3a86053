"""peft interop for BOFT (``peft_type: "BOFT"``); dispatched from ``formats/peft.py``.

Layout (peft 0.21): ``adapter_config.json`` with ``boft_block_size``, ``boft_block_num``,
``boft_n_butterfly_factor``, ``boft_dropout``, ``init_weights``, ``target_modules``, ``modules_to_save``
(``bias`` must be ``"none"``); ``adapter_model.safetensors`` with, per adapted module:

=========================================  ==========================  =====================
key                                        shape                       adapterkit tensor
=========================================  ==========================  =====================
``base_model.model.<module path>.boft_R``  ``(m, D, b, b)``            ``BOFTLayer.boft_R``
``base_model.model.<module path>.boft_s``  ``(out, 1)``; conv ``(1, out)``  ``BOFTLayer.boft_s``
``base_model.model.<head>.<param>``        head                        ``HeadCopy``
=========================================  ==========================  =====================

peft 0.21 without its CUDA extension (every CPU machine) trains and saves ``m = 1`` butterfly factor whatever its
config's ``boft_n_butterfly_factor`` says; such files load here as that one-factor model (what peft computed), with
a warning. Conversely, our exports with ``m > 1`` load only in a peft that has the extension (a CPU peft refuses
their ``boft_R`` shape). peft has no BOFT for GPT-2 ``Conv1D``: exporting an adapter on one is refused.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from ..component import Component
from ..methods.boft import BOFT
from ._peft_sites import (
    export_state,
    install_planned,
    peft_config,
    read_sites,
    refuse_conv1d,
)
from .io import AdapterFileError, import_checked, read_adapter
from .peft import Fields, write
from .peft_oft import check_bias

PEFT_TYPE = "BOFT"
METHOD = "boft"


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    cfg = ctl._record(name).config
    assert isinstance(cfg, BOFT)

    def site_tensors(site: str, comp: Any, module: Any) -> dict[str, Any]:
        refuse_conv1d(ctl, name, site, PEFT_TYPE)
        return {"boft_R": comp.boft_R, "boft_s": comp.boft_s}

    tensors, targets, heads = export_state(ctl, name, site_tensors)
    config = peft_config(
        ctl, name, PEFT_TYPE, targets, heads, boft_block_size=cfg.boft_block_size, boft_block_num=cfg.boft_block_num,
        boft_n_butterfly_factor=cfg.boft_n_butterfly_factor, boft_dropout=cfg.boft_dropout, exclude_modules=None,
        init_weights=cfg.init_weights, bias="none", fan_in_fan_out=False, layers_to_transform=None, layers_pattern=None,
    )  # fmt: skip
    write(path, tensors, config)


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    directory = Path(path)
    data, raw = read_adapter(directory, "adapter_model", allow_pickle=allow_pickle)
    fields = Fields(data, directory)
    check_bias(fields)
    name = name or "default"
    ctl._check_new_name(name)
    modules, per_site, heads = read_sites(
        ctl,
        raw,
        fields,
        path,
        {"boft_R": "boft_R", "boft_s": "boft_s"},
        "BOFT tensors (keys ending in '.boft_R' and '.boft_s')",
    )
    factors = fields.integer("boft_n_butterfly_factor", 1)
    stored = {
        state["boft_R"].shape[0] for state in per_site.values() if "boft_R" in state and state["boft_R"].dim() == 4
    }
    if len(stored) == 1 and (held := stored.pop()) != factors:
        if held != 1:
            raise AdapterFileError(
                f"{directory}: boft_R holds {held} butterfly factors but the config says boft_n_butterfly_factor="
                f"{factors}"
            )
        warnings.warn(
            f"{directory}: boft_n_butterfly_factor={factors} in the config, but boft_R holds 1 factor (peft without "
            "its CUDA extension trains one); loading the one-factor model peft computed",
            stacklevel=3,
        )
        factors = 1
    cfg = fields.build(
        BOFT,
        boft_block_size=fields.integer("boft_block_size", 4, minimum=0),
        boft_block_num=fields.integer("boft_block_num", 0, minimum=0),
        boft_n_butterfly_factor=factors,
        boft_dropout=fields.number("boft_dropout", 0.0),
        targets=tuple(per_site),
        heads=tuple(heads),
    )

    def load_into(site: str, kind: str, comp: Component, module: Any) -> None:
        import_checked(comp, heads[site] if kind == "head" else per_site[site], module)

    return install_planned(ctl, name, cfg, path, load_into, activate=activate)
