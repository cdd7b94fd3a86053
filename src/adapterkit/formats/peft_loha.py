"""peft interop for LoHa (``peft_type: "LOHA"``); dispatched from ``formats/peft.py``. The LyCORIS helpers
here (:func:`save_lycoris`, :func:`load_lycoris`) serve LoKr too (``formats/peft_lokr.py``).

Layout (peft 0.21): ``adapter_config.json`` with ``r``, ``alpha``, ``rank_dropout``, ``module_dropout``,
``use_effective_conv2d``, ``rank_pattern``, ``alpha_pattern``, ``target_modules``, ``modules_to_save``;
``adapter_model.safetensors`` with, per adapted module (``n = in · kh · kw``):

==================================================  ==============  ==========================
key                                                 shape           adapterkit tensor
==================================================  ==============  ==========================
``base_model.model.<module path>.hada_w1_a``        ``(out, r)``    ``LoHaLayer.hada_w1_a``
``base_model.model.<module path>.hada_w1_b``        ``(r, n)``      ``LoHaLayer.hada_w1_b``
``base_model.model.<module path>.hada_w2_a``        ``(out, r)``    ``LoHaLayer.hada_w2_a``
``base_model.model.<module path>.hada_w2_b``        ``(r, n)``      ``LoHaLayer.hada_w2_b``
``base_model.model.<head>.<param>``                 head            ``HeadCopy``
==================================================  ==============  ==========================

With ``use_effective_conv2d: true``, k×k convolutions carry the CP form instead: ``hada_t1``/``hada_t2``
``(r, r, kh, kw)``, ``hada_w{1,2}_a: (r, out)``, ``hada_w{1,2}_b: (r, in)``.

The tensor names are peft's, so the conversion is a renaming of keys. peft has no LoHa/LoKr for GPT-2
``Conv1D``: exporting an adapter on one is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..component import Component
from ..methods.loha import LoHa
from ..targeting import base_modules
from ._peft_sites import check_sites, export_state, install_planned, peft_config, refuse_conv1d, split_state
from .io import AdapterFileError, import_checked, read_adapter, require_float
from .peft import Fields, write

PEFT_TYPE = "LOHA"
METHOD = "loha"
TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def save_lycoris(ctl: Any, name: str, path: str | os.PathLike, peft_type: str, extra: dict[str, Any]) -> None:
    """Write adapter ``name`` (LoHa or LoKr: components whose tensors carry peft's names) as a peft directory."""
    cfg = ctl._record(name).config

    def site_tensors(site: str, comp: Any, module: Any) -> dict[str, torch.Tensor]:
        refuse_conv1d(ctl, name, site, peft_type)
        if getattr(comp, "r2", comp.r) != comp.r:
            raise ValueError(
                f"adapter {name!r} has pairs of different ranks at {site!r} (ABBA r={comp.r}, r2={comp.r2}); peft's "
                f"{peft_type} has one rank for both pairs, so it cannot be exported to peft (use format='native')"
            )
        return comp.state_dict()

    tensors, targets, heads = export_state(ctl, name, site_tensors)
    config = peft_config(
        ctl, name, peft_type, targets, heads, r=cfg.r, alpha=cfg.alpha, rank_dropout=cfg.rank_dropout,
        module_dropout=cfg.module_dropout, use_effective_conv2d=cfg.use_effective_conv2d, exclude_modules=None,
        rank_pattern=dict(cfg.rank_pattern), alpha_pattern=dict(cfg.alpha_pattern),
        init_weights=True if cfg.init_weights == "abba" else cfg.init_weights,  # peft has no ABBA init
        layers_to_transform=None, layers_pattern=None, **extra,
    )  # fmt: skip
    write(path, tensors, config)


def load_lycoris(
    ctl: Any,
    path: str | os.PathLike,
    *,
    name: str | None,
    allow_pickle: bool,
    activate: bool,
    what: str,
    tensors: tuple[str, ...],
    make: Any,
) -> str:
    """Load a peft LoHa/LoKr directory: ``make(fields, **common)`` builds the config from the file's fields."""
    directory = Path(path)
    data, raw = read_adapter(directory, "adapter_model", allow_pickle=allow_pickle)
    fields = Fields(data, directory)
    name = name or "default"
    ctl._check_new_name(name)
    modules = base_modules(ctl.model)
    head_sel = fields.names("modules_to_save")
    per_site, heads = split_state(raw, modules, {t: t for t in tensors}, head_sel, directory)
    check_sites(list(per_site) + list(heads), modules, path, ctl.model)
    if not per_site:
        raise AdapterFileError(
            f"{directory} holds no {what} tensors (keys ending in '.{tensors[0]}' and the like)"
        )
    require_float({f"{s}.{k}": v for s, state in per_site.items() for k, v in state.items()}, directory)
    rank_pattern, alpha_pattern = fields.numbers("rank_pattern"), fields.numbers("alpha_pattern")
    cfg = fields.build(
        lambda **kw: make(fields, **kw),
        r=fields.integer("r", 8),
        alpha=fields.number("alpha", 8.0),
        rank_dropout=fields.number("rank_dropout", 0.0),
        module_dropout=fields.number("module_dropout", 0.0),
        use_effective_conv2d=fields.flag("use_effective_conv2d", False),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        targets=tuple(per_site),
        heads=tuple(heads),
    )

    def load_into(site: str, kind: str, comp: Component, module: Any) -> None:
        import_checked(comp, heads[site] if kind == "head" else per_site[site], module)

    return install_planned(ctl, name, cfg, path, load_into, activate=activate)


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    assert isinstance(ctl._record(name).config, LoHa)
    save_lycoris(ctl, name, path, PEFT_TYPE, {})


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    return load_lycoris(
        ctl,
        path,
        name=name,
        allow_pickle=allow_pickle,
        activate=activate,
        what="LoHa",
        tensors=TENSORS,
        make=lambda fields, **kw: LoHa(**kw),
    )
