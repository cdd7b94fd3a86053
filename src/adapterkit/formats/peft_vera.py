"""peft interop for VeRA (``peft_type: "VERA"``); dispatched from ``formats/peft.py``.

Layout (peft 0.21): ``adapter_config.json`` with ``r``, ``projection_prng_key``, ``save_projection``,
``d_initial``, ``vera_dropout``, ``target_modules``; ``adapter_model.safetensors`` with

========================================================  ===============  =====================
key                                                       shape            adapterkit tensor
========================================================  ===============  =====================
``base_model.model.<module path>.vera_lambda_b``          ``(out,)``       ``VeRALinear.lambda_b``
``base_model.model.<module path>.vera_lambda_d``          ``(r,)``         ``VeRALinear.lambda_d``
``base_model.vera_A`` / ``base_model.vera_B``             ``(r, in_max)``  shared projections
                                                          ``(out_max, r)`` (with ``save_projection``)
``base_model.model.<head>.<param>``                       head             ``HeadCopy``
========================================================  ===============  =====================

Both libraries generate the projections from ``projection_prng_key`` the same way; on load, saved
projections must equal the ones the seed gives (we regenerate them rather than store them), else the
file is refused. We always export with ``save_projection: true``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..component import Component
from ..methods.vera import VeRA, VeRALinear
from ._peft_sites import export_state, install_planned, peft_config, read_sites
from .io import AdapterFileError, import_checked, read_adapter, require_float
from .peft import Fields, write

PEFT_TYPE = "VERA"
METHOD = "vera"
_A, _B = "base_model.vera_A", "base_model.vera_B"


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    cfg = ctl._record(name).config
    assert isinstance(cfg, VeRA)
    conv1d: list[bool] = []
    projections: list[Any] = []

    def site_tensors(site: str, comp: Any, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        conv1d.append(type(module).__name__ == "Conv1D")
        projections.append(comp.projection)
        return {"vera_lambda_b": comp.lambda_b, "vera_lambda_d": comp.lambda_d}

    tensors, targets, heads = export_state(ctl, name, site_tensors)
    projection = projections[-1]  # one bank shared by every site
    tensors[_A], tensors[_B] = projection.A.contiguous(), projection.B.contiguous()
    config = peft_config(
        ctl, name, PEFT_TYPE, targets, heads, r=cfg.r, projection_prng_key=cfg.projection_prng_key,
        save_projection=True, vera_dropout=cfg.dropout, d_initial=cfg.d_initial, fan_in_fan_out=any(conv1d),
        bias="none", init_weights=True, layers_to_transform=None, layers_pattern=None,
    )  # fmt: skip
    write(path, tensors, config)


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    directory = Path(path)
    data, raw = read_adapter(directory, "adapter_model", allow_pickle=allow_pickle)
    fields = Fields(data, directory)
    if fields.choice("bias", "none", ("none", "all", "vera_only")) != "none":
        raise AdapterFileError(
            f"{fields.where}: peft VeRA adapters with bias={data['bias']!r} are not supported yet"
        )
    name = name or "default"
    ctl._check_new_name(name)
    modules, per_site, heads = read_sites(
        ctl,
        raw,
        fields,
        path,
        {"vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"},
        "VeRA vectors (keys ending in '.vera_lambda_b')",
        skip=(_A, _B),
    )
    require_float({k: raw[k] for k in (_A, _B) if k in raw}, directory)
    cfg = fields.build(
        VeRA,
        r=fields.integer("r", 256),
        projection_prng_key=fields.integer("projection_prng_key", 0, minimum=0),
        d_initial=fields.number("d_initial", 0.1),
        dropout=fields.number("vera_dropout", 0.0),
        targets=tuple(per_site),
        heads=tuple(heads),
    )

    def load_into(site: str, kind: str, comp: Component, module: Any) -> None:
        if kind == "head":
            import_checked(comp, heads[site], module)
        else:
            import_checked(comp, per_site[site], module)
            _check_projection(comp, raw, directory)

    return install_planned(ctl, name, cfg, path, load_into, activate=activate)


def _check_projection(comp: VeRALinear, raw: dict[str, torch.Tensor], directory: Path) -> None:
    """Saved projections must be the ones ``projection_prng_key`` generates (we regenerate, not store them)."""
    for key, ours in ((_A, comp.projection.A), (_B, comp.projection.B)):
        if key not in raw:
            continue
        theirs = raw[key]
        if tuple(theirs.shape) != tuple(ours.shape) or not torch.equal(theirs.to(ours), ours):
            raise AdapterFileError(
                f"{directory}: {key.rpartition('.')[2]} {tuple(theirs.shape)} differs from the projection that "
                f"projection_prng_key generates for these targets {tuple(ours.shape)}; adapterkit regenerates "
                "VeRA projections from the seed, so it cannot load projections made another way"
            )
