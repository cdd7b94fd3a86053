"""peft interop for (IA)^3 (``peft_type: "IA3"``); dispatched from ``formats/peft.py``.

Layout (peft 0.21): ``adapter_config.json`` with ``target_modules``, ``feedforward_modules`` (targets that
scale their input) and ``fan_in_fan_out`` (GPT-2 ``Conv1D``); ``adapter_model.safetensors`` with one key per
adapted module, ``base_model.model.<module path>.ia3_l``:

==========================  =================  ========================
kind                        peft shape         adapterkit tensor
==========================  =================  ========================
output scaling              ``(out, 1)``       ``IA3OutputScale.scale: (out,)``
input scaling (feedforward) ``(1, in)``        ``IA3InputScale.scale: (in,)``
``modules_to_save`` head    ``<head>.<param>`` ``HeadCopy``
==========================  =================  ========================

The shapes are the same for ``nn.Linear`` and ``Conv1D``. We write exact module paths for
``target_modules`` and ``feedforward_modules``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..component import Component
from ..methods.ia3 import IA3, IA3InputScale
from ._peft_sites import export_state, install_planned, peft_config, read_sites
from .io import AdapterFileError, import_checked, read_adapter
from .peft import Fields, write

PEFT_TYPE = "IA3"
METHOD = "ia3"


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    assert isinstance(ctl._record(name).config, IA3)
    feedforward: list[str] = []
    conv1d: list[bool] = []

    def site_tensors(site: str, comp: Any, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        conv1d.append(type(module).__name__ == "Conv1D")
        if isinstance(comp, IA3InputScale):
            feedforward.append(site)
            return {"ia3_l": comp.scale.reshape(1, -1)}
        return {"ia3_l": comp.scale.reshape(-1, 1)}

    tensors, targets, heads = export_state(ctl, name, site_tensors)
    config = peft_config(
        ctl, name, PEFT_TYPE, targets, heads, feedforward_modules=sorted(feedforward), exclude_modules=None,
        fan_in_fan_out=any(conv1d), init_ia3_weights=True,
    )  # fmt: skip
    write(path, tensors, config)


def _is_feedforward(site: str, spec: Any) -> bool:
    """peft's rule: a string is a ``re.fullmatch`` pattern, a list matches by suffix."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, site) is not None
    return any(site.endswith(s) for s in spec)


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    directory = Path(path)
    data, raw = read_adapter(directory, "adapter_model", allow_pickle=allow_pickle)
    name = name or "default"
    ctl._check_new_name(name)
    fields = Fields(data, directory)
    modules, per_site, heads = read_sites(
        ctl, raw, fields, path, {"ia3_l": "scale"}, "(IA)^3 vectors (keys ending in '.ia3_l')"
    )
    spec = fields.pattern_or_names("feedforward_modules")
    try:
        feedforward = tuple(s for s in per_site if _is_feedforward(s, spec))
    except re.error as e:
        raise AdapterFileError(
            f"{fields.where}: 'feedforward_modules' is no valid regular expression ({e})"
        ) from None
    cfg = fields.build(IA3, targets=tuple(per_site), feedforward=feedforward, heads=tuple(heads))

    def load_into(site: str, kind: str, comp: Component, module: Any) -> None:
        if kind == "head":
            import_checked(comp, heads[site], module)
        else:
            comp.import_state({"scale": _vector(site, comp, per_site[site]["scale"])}, module)

    return install_planned(ctl, name, cfg, path, load_into, activate=activate)


def _vector(site: str, comp: Component, value: torch.Tensor) -> torch.Tensor:
    """peft's ``(1, in)`` / ``(out, 1)`` vector as ours, after checking it has the layout of its kind."""
    n = comp.scale.numel()
    expected = (1, n) if isinstance(comp, IA3InputScale) else (n, 1)
    if tuple(value.shape) != expected:
        what = "input (feedforward)" if isinstance(comp, IA3InputScale) else "output"
        raise ValueError(f"{site!r}.ia3_l has shape {tuple(value.shape)}; {what} scaling needs {expected}")
    return value.reshape(-1).to(comp.scale.dtype)
