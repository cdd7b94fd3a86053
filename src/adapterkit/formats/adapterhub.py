"""AdapterHub interop: read directories written by the ``adapters`` library's ``save_adapter`` (1.x, and files of
the older adapter-transformers with the same layout). See ../shared/formats/adapterhub.md and issue 16.

A directory holds ``adapter_config.json``::

    {"config": {...method fields...}, "hidden_size": H, "model_class": "BertModel", "model_name": ...,
     "model_type": "bert", "name": "task", "version": "adapters.1.3.0"}

and the weights: ``adapter.safetensors`` (``use_safetensors=True``) or ``pytorch_adapter.bin`` (the library's
default: a ``torch.save`` pickle, read only with ``allow_pickle=True`` and then with ``weights_only=True``). When
both exist the safetensors file wins, as in the library. Keys are full ``state_dict`` paths of the saving model,
its base-model prefix included or not (``bert.encoder...`` from ``BertForSequenceClassification``,
``encoder...`` from a bare ``BertModel``); ``adapterhub_files.resolve_sites`` maps them onto the model at hand either way.

The method is told by ``config.architecture``: ``"lora"`` (LoRA with ``composition_mode: "add"``, (IA)^3 with
``"scale"``; ``formats/adapterhub_lora.py``), ``"prompt_tuning"``, ``"prefix_tuning"``, ``"reft"``,
``"union"`` (MAM, UniPELT), and no key for the bottleneck adapters (SeqBn, DoubleSeqBn, ParBn, SeqBnInv,
Compacter). Readers for a method live in ``formats/adapterhub_<method>.py`` modules that define
``ARCHITECTURES`` (the ``architecture`` values they read) and ``load(ctl, path, info, *, name, activate)``, listed
in :data:`READERS`; shared helpers are in ``formats/adapterhub_files.py``.

Also read (issue 16 item 3): a head saved with the adapter (``head_config.json``: ``formats/adapterhub_heads.py``,
added to the adapter as a part), AdapterFusion directories (``adapter_fusion_config.json``, no
``adapter_config.json``: ``formats/adapterhub_fusion.py``) and adapter setups (``adapter_setup.json``:
``formats/adapterhub_setup.py``; several adapters, so :func:`loads_several` tells ``Adapters.load`` to hand this
module the controller itself instead of reading one adapter).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

from . import (
    adapterhub_bottleneck,
    adapterhub_fusion,
    adapterhub_heads,
    adapterhub_lora,
    adapterhub_prefix,
    adapterhub_prompt,
    adapterhub_reft,
    adapterhub_setup,
    adapterhub_union,
)
from .adapterhub_files import is_adapterhub, read
from .io import AdapterFileError, read_json

__all__ = ["is_adapterhub", "is_composition", "loads_several", "load", "save", "READERS"]

ISSUE = "issue 16"

_MISSING: dict[str, str] = {}  # architectures known but not read yet -> why


# ``config.architecture`` -> reader module (``load(ctl, path, info, *, name, activate)``)
# (optionally ``refusal(config) -> str | None``: why a config cannot be read, checked before the weights are read)
_MODULES = (
    adapterhub_lora,
    adapterhub_reft,
    adapterhub_bottleneck,
    adapterhub_prefix,
    adapterhub_prompt,
    adapterhub_union,
)
READERS: dict[str, ModuleType] = {arch: m for m in _MODULES for arch in m.ARCHITECTURES}


def is_composition(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an AdapterHub fusion, adapter-setup or head-only directory (they have no
    ``adapter_config.json``)."""
    return (
        adapterhub_fusion.is_fusion(path) or adapterhub_setup.is_setup(path) or adapterhub_heads.is_head_only(path)
    )


def loads_several(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds several adapters (an adapter setup): ``Adapters.load`` then calls :func:`load` with
    the controller itself, which installs them one by one (all or nothing) and activates the setup."""
    return adapterhub_setup.is_setup(path) and not (Path(path) / "adapter_config.json").is_file()


def load(
    ctl: Any,
    path: str | os.PathLike,
    *,
    name: str | None,
    allow_pickle: bool,
    activate: bool,
    with_head: bool = True,
) -> str:
    """Load the AdapterHub adapter in directory ``path`` (dispatched from ``formats.detect``); returns its name
    (``name``, else the saved name). Fusion directories load as a fusion over already loaded members, setup
    directories as their adapters, fusions and heads, activated, ``save_head`` directories as a head alone.
    ``with_head=False`` leaves a head saved with the adapter out (used for setups whose ``head_setup`` names
    another head)."""
    if loads_several(path):
        return adapterhub_setup.load(ctl, path, name=name, allow_pickle=allow_pickle, load_one=load)
    if adapterhub_fusion.is_fusion(path) and not (Path(path) / "adapter_config.json").is_file():
        return adapterhub_fusion.load(ctl, path, name=name, allow_pickle=allow_pickle, activate=activate)
    if adapterhub_heads.is_head_only(path):
        return adapterhub_heads.load_head_only(ctl, path, name=name, allow_pickle=allow_pickle, activate=activate)
    return _load_adapter(ctl, path, name=name, allow_pickle=allow_pickle, activate=activate, with_head=with_head)


def _load_adapter(
    ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool, with_head: bool
) -> str:
    config = read_json(Path(path) / "adapter_config.json").get("config")
    arch = config.get("architecture") if isinstance(config, dict) else None
    arch = arch or "bottleneck"
    table = READERS
    if not isinstance(arch, str):
        raise AdapterFileError(
            f"{Path(path) / 'adapter_config.json'}: 'architecture' must be a string, not {arch!r:.60}"
        )
    if arch not in table:
        if arch in _MISSING:
            raise AdapterFileError(f"{path}: {_MISSING[arch]}")
        raise AdapterFileError(
            f"{Path(path) / 'adapter_config.json'}: AdapterHub architecture {arch!r:.60} is unknown; "
            f"supported: {', '.join(sorted(table))}"
        )
    refusal = getattr(table[arch], "refusal", None)
    why = refusal(config) if refusal is not None else None
    if why is not None:
        raise AdapterFileError(f"{path}: {why}")
    info = read(path, allow_pickle=allow_pickle)
    head = adapterhub_heads.read_head(ctl, path, allow_pickle=allow_pickle) if with_head else None
    if head is not None:  # the head becomes a part of the adapter (added to the plan the reader installs)
        ctl = adapterhub_heads.WithHead(ctl, head)
    return table[arch].load(ctl, path, info, name=name, activate=activate)


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    raise NotImplementedError(f"export to AdapterHub's format is not available yet ({ISSUE} item 4)")
