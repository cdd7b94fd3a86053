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
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

from . import (
    adapterhub_bottleneck,
    adapterhub_lora,
    adapterhub_prefix,
    adapterhub_prompt,
    adapterhub_reft,
    adapterhub_union,
)
from .adapterhub_files import is_adapterhub, read
from .io import AdapterFileError, read_json

__all__ = ["is_adapterhub", "load", "save", "READERS"]

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


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    """Load the AdapterHub adapter in directory ``path`` (dispatched from ``formats.detect``); returns its name
    (``name``, else the saved name)."""
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
    if (Path(path) / "head_config.json").is_file():
        warnings.warn(
            f"{path} also holds a prediction head (head_config.json); heads from AdapterHub files are not loaded "
            "yet (issue 16 item 3): the model keeps its own head",
            stacklevel=4,
        )
    return table[arch].load(ctl, path, info, name=name, activate=activate)


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    raise NotImplementedError(f"export to AdapterHub's format is not available yet ({ISSUE} item 4)")
