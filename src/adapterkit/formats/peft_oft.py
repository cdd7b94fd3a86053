"""peft interop for OFT (``peft_type: "OFT"``, peft ≥ 0.14's OFT v2 layout); dispatched from ``formats/peft.py``.

Layout (peft 0.21): ``adapter_config.json`` with ``r``, ``oft_block_size``, ``use_cayley_neumann``,
``num_cayley_neumann_terms``, ``coft``, ``eps``, ``block_share``, ``module_dropout``, ``init_weights``,
``target_modules``, ``modules_to_save`` (``bias`` must be ``"none"``); ``adapter_model.safetensors`` with, per
adapted module:

==============================================  ==============================  =====================
key                                             shape                           adapterkit tensor
==============================================  ==============================  =====================
``base_model.model.<module path>.oft_R.weight`` ``(nb, b (b - 1) / 2)``         ``OFTLayer.oft_R``
                                                (``(1, ...)`` with block_share)
``base_model.model.<embedding>.oft_embedding_R.weight``  (an ``nn.Embedding``)  ``OFTLayer.oft_R``
``base_model.model.<head>.<param>``             head                            ``HeadCopy``
==============================================  ==============================  =====================

``b`` is the layer's block size (``oft_block_size``, or ``in / r``, moved to the nearest divisor of the input size
as peft moves it; ``in · kh · kw`` for convolutions). peft has no OFT for GPT-2 ``Conv1D``: exporting an adapter on
one is refused. Files of peft < 0.14 (no ``oft_block_size``) hold another parametrization and are refused; files
of peft < 0.18 with ``use_cayley_neumann`` load with a warning (peft 0.18 changed the Neumann series' last term).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from packaging.version import InvalidVersion, Version

from ..component import Component
from ..methods.oft import OFT
from ..targeting import base_modules
from ._peft_sites import check_sites, export_state, install_planned, peft_config, refuse_conv1d, split_state
from .io import AdapterFileError, import_checked, read_adapter, require_float
from .peft import PREFIX, Fields, write

PEFT_TYPE = "OFT"
METHOD = "oft"


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    cfg = ctl._record(name).config
    assert isinstance(cfg, OFT)

    def site_tensors(site: str, comp: Any, module: Any) -> dict[str, torch.Tensor]:
        refuse_conv1d(ctl, name, site, PEFT_TYPE)
        key = "oft_embedding_R" if comp.embedding else "oft_R"  # peft keeps embeddings' rotations apart
        return {f"{key}.weight": comp.oft_R}

    tensors, targets, heads = export_state(ctl, name, site_tensors)
    config = peft_config(
        ctl, name, PEFT_TYPE, targets, heads, r=cfg.r, oft_block_size=cfg.oft_block_size,
        use_cayley_neumann=cfg.use_cayley_neumann, num_cayley_neumann_terms=cfg.num_cayley_neumann_terms,
        coft=cfg.coft, eps=cfg.eps, block_share=cfg.block_share, module_dropout=cfg.module_dropout,
        exclude_modules=None, init_weights=cfg.init_weights, bias="none", fan_in_fan_out=False,
        layers_to_transform=None, layers_pattern=None,
        # peft >= 0.18 reads the Neumann form without a warning only with its version recorded
        peft_version="0.21.2",
    )  # fmt: skip
    write(path, tensors, config)


def check_bias(fields: Fields) -> None:
    bias = fields.data.get("bias", "none")
    if bias != "none":
        raise fields.error("bias", bias, "'none' (adapterkit does not load peft's trained biases for this method)")


def base_copies(raw: dict[str, Any], modules: dict[str, Any], directory: Path) -> tuple[str, ...]:
    """Keys of base weights peft saved beside the adapter (``<embedding>.base_layer.weight``: peft's
    ``save_embedding_layers`` when an embedding is adapted); they must equal this model's weights.

    Raises:
        AdapterFileError: a saved base weight that differs from the model's (resized or retrained embeddings).
    """
    keys = []
    for key, value in raw.items():
        rest = key[len(PREFIX) :] if key.startswith(PREFIX) else ""
        site = rest[: -len(".base_layer.weight")] if rest.endswith(".base_layer.weight") else None
        if site is None or site not in modules:
            continue
        base = modules[site].weight
        if base.shape != value.shape or not torch.equal(base.detach().cpu(), value.to(base.dtype)):
            raise AdapterFileError(f"{directory} carries a changed base weight {rest!r}; not supported")
        keys.append(key)
    return tuple(keys)


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    directory = Path(path)
    data, raw = read_adapter(directory, "adapter_model", allow_pickle=allow_pickle)
    fields = Fields(data, directory)
    if "oft_block_size" not in data:
        raise AdapterFileError(
            f"{fields.where} has no 'oft_block_size': it was saved by peft < 0.14, whose OFT parametrization differs "
            "(retrain the adapter with a newer peft, as peft itself requires)"
        )
    check_bias(fields)
    neumann = fields.flag("use_cayley_neumann", True)
    if neumann:
        version = str(data.get("peft_version") or "0.0.0").partition("@")[0]
        try:
            old = Version(version) < Version("0.18.0")
        except InvalidVersion:
            old = True
        if old:
            warnings.warn(
                f"{directory}: OFT saved by peft {version} (< 0.18) with use_cayley_neumann; peft 0.18 changed the "
                "Neumann series slightly, so outputs differ a little from the ones it was trained with",
                stacklevel=3,
            )
    name = name or "default"
    ctl._check_new_name(name)
    modules = base_modules(ctl.model)
    head_sel = fields.names("modules_to_save")
    suffixes = {"oft_R.weight": "oft_R", "oft_embedding_R.weight": "oft_R"}
    per_site, heads = split_state(
        raw, modules, suffixes, head_sel, directory, skip=base_copies(raw, modules, directory)
    )
    check_sites(list(per_site) + list(heads), modules, path, ctl.model)
    if not per_site:
        raise AdapterFileError(f"{directory} holds no OFT tensors (keys ending in '.oft_R.weight')")
    require_float({f"{s}.{k}": v for s, state in per_site.items() for k, v in state.items()}, directory)
    cfg = fields.build(
        OFT,
        r=fields.integer("r", 0, minimum=0),
        oft_block_size=fields.integer("oft_block_size", 32, minimum=0),
        use_cayley_neumann=neumann,
        num_cayley_neumann_terms=fields.integer("num_cayley_neumann_terms", 5),
        coft=fields.flag("coft", False),
        eps=fields.number("eps", 6e-5),
        block_share=fields.flag("block_share", False),
        module_dropout=fields.number("module_dropout", 0.0),
        targets=tuple(per_site),
        heads=tuple(heads),
    )

    def load_into(site: str, kind: str, comp: Component, module: Any) -> None:
        import_checked(comp, heads[site] if kind == "head" else per_site[site], module)

    return install_planned(ctl, name, cfg, path, load_into, activate=activate)
