"""Shared helpers of the AdapterHub readers (``formats/adapterhub.py`` dispatches; ``adapterhub_<method>.py`` read):
recognising an AdapterHub ``adapter_config.json``, reading a directory (safetensors or, with ``allow_pickle``,
``pytorch_adapter.bin``), the library's own load-time fixes, and mapping stored module paths onto this model.
See ../shared/formats/adapterhub.md.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..targeting import base_modules
from .io import AdapterFileError, read_adapter

__all__ = ["is_adapterhub", "read", "AdapterHubFile", "resolve_sites", "bottleneck_kind"]

WEIGHTS = (("adapter", "safetensors"), ("pytorch_adapter", "pickle"))


def is_adapterhub(data: Any) -> bool:
    """Whether a parsed ``adapter_config.json`` is AdapterHub's: a ``config`` object plus the metadata keys the
    library writes (``model_type``/``model_class``/``hidden_size``/``version``), and no peft or adapterkit marker."""
    if not isinstance(data, dict) or "peft_type" in data or "format" in data:
        return False
    meta = {"model_type", "model_class", "hidden_size", "version"}
    return isinstance(data.get("config"), dict) and len(meta & set(data)) >= 2


@dataclass
class AdapterHubFile:
    """One AdapterHub adapter as read from disk.

    Attributes:
        data: the whole ``adapter_config.json``.
        config: its ``config`` object (the method's fields).
        tensors: key -> tensor, as stored (full module paths of the saving model).
        saved_name: the adapter's name when saved (``name``; keys hold it as ``.<saved_name>.``).
        kind: ``"safetensors"`` or ``"pickle"``.
    """

    data: dict[str, Any]
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    saved_name: str
    kind: str

    @property
    def version(self) -> str:
        return str(self.data.get("version") or "")


def read(path: str | os.PathLike, *, allow_pickle: bool) -> AdapterHubFile:
    """Read ``adapter_config.json`` and the weights of an AdapterHub directory, applying the library's own
    load-time fixes of old files (the LoRA scaling fix of ``adapters`` < 1.1.0, legacy key names).

    Raises:
        AdapterFileError: no weights file, a pickle without ``allow_pickle``, or a malformed config.
    """
    directory = Path(path)
    for stem, kind in WEIGHTS:
        if (directory / f"{stem}.{'safetensors' if kind == 'safetensors' else 'bin'}").is_file():
            break
    else:
        raise AdapterFileError(
            f"{str(directory)!r} has an AdapterHub adapter_config.json but neither adapter.safetensors nor "
            "pytorch_adapter.bin"
        )
    data, tensors = read_adapter(directory, stem, allow_pickle=allow_pickle)
    config = data.get("config")
    if not isinstance(config, dict):
        raise AdapterFileError(f"{directory / 'adapter_config.json'}: 'config' must be an object")
    config = dict(config)
    saved = data.get("name")
    if not isinstance(saved, str) or not saved:
        raise AdapterFileError(f"{directory / 'adapter_config.json'}: 'name' must be the adapter's name")
    _fix_backward_compat(data, config)
    tensors = {_legacy_key(k): v for k, v in tensors.items()}
    return AdapterHubFile(data, config, tensors, saved, kind)


def _version_tuple(text: str) -> tuple[int, ...] | None:
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(g) for g in m.groups()) if m else None


def _fix_backward_compat(data: dict[str, Any], config: dict[str, Any]) -> None:
    """``adapters`` < 1.1.0 scaled LoRA and (IA)^3 wrongly when ``r != alpha``; the library loads such files with
    ``alpha = r`` (its ``_fix_backward_compat``, adapters PR #770), so we do too."""
    version = str(data.get("version") or "")
    if not version.startswith("adapters."):
        return
    parsed = _version_tuple(version[len("adapters.") :])
    old = parsed is not None and parsed < (1, 1, 0)
    if old and config.get("architecture") == "lora" and config.get("r") != config.get("alpha"):
        config["alpha"] = config.get("r")


_LEGACY = (
    ("attention_text_task_adapters", "adapters"),
    ("attention_text_lang_adapters", "adapters"),
    ("layer_text_task_adapters", "adapters"),
    ("layer_text_lang_adapters", "adapters"),
    ("invertible_lang_adapters", "invertible_adapters"),
)


def _legacy_key(key: str) -> str:
    for old, new in _LEGACY:
        key = key.replace(f".{old}.", f".{new}.")
        if key.startswith(f"{old}."):
            key = new + key[len(old) :]
    return key


# transformers 4.x module paths the library saved under -> transformers 5's (by model type): the layer list, then
# module names at the end of a path (in order: the attention output before the FFN output)
_RENAMES = {
    "vit": (
        (".encoder.layer.", ".layers."),
        (
            (".attention.attention.query", ".attention.q_proj"),
            (".attention.attention.key", ".attention.k_proj"),
            (".attention.attention.value", ".attention.v_proj"),
            (".attention.output.dense", ".attention.o_proj"),
            (".intermediate.dense", ".mlp.fc1"),
            (".output.dense", ".mlp.fc2"),
        ),
    )
}


def renamed(path: str, model: nn.Module) -> str:
    """A stored module path in this transformers version's module names (the 4.x name when it still exists)."""
    rename = _RENAMES.get(getattr(getattr(model, "config", None), "model_type", None))
    if rename is None:
        return path
    (old, new), ends = rename
    dotted = "." + path
    if old not in dotted or any(n.endswith(dotted) for n, _ in model.named_modules()):
        return path
    dotted = dotted.replace(old, new, 1)
    for end_old, end_new in ends:
        if dotted.endswith(end_old):
            dotted = dotted[: -len(end_old)] + end_new
            break
    return dotted[1:]


def resolve_sites(paths: list[str], model: nn.Module, where: str | os.PathLike) -> dict[str, str]:
    """Map module paths of the saving model onto this model's module names.

    The saving model may have had a base-model prefix (``bert.``, ``transformer.``, ``model.``) that this one
    lacks, or the other way round (the library strips or adds ``base_model_prefix``). The first of: as stored,
    with this model's prefix added, with the stored first component removed, or both, under which every path
    names a module of this model, is used for all of them.

    Raises:
        AdapterFileError: no such mapping (naming the first module that does not exist: wrong base model?).
    """
    if not paths:
        return {}
    modules = base_modules(model)
    ours = getattr(model, "base_model_prefix", "") or ""
    firsts = {p.split(".", 1)[0] for p in paths}
    strip = len(firsts) == 1 and all("." in p for p in paths)

    def candidates(p: str) -> list[str]:
        out = [p]
        if ours:
            out.append(f"{ours}.{p}")
        if strip:
            rest = p.split(".", 1)[1]
            out.append(rest)
            if ours:
                out.append(f"{ours}.{rest}")
        return out

    n = len(candidates(paths[0])) if paths else 0
    for i in range(n):
        mapped = {p: candidates(p)[i] for p in paths}
        if all(m in modules for m in mapped.values()):
            return mapped
    missing = sorted(p for p in paths if not any(c in modules for c in candidates(p)))
    first = missing[0] if missing else paths[0]
    raise AdapterFileError(
        f"AdapterHub adapter {str(where)!r} acts on {first!r}, which this {type(model).__name__} does not have "
        f"(with or without a {ours or 'base-model'!r} prefix): wrong base model?"
    )


def bottleneck_kind(config: dict[str, Any]) -> str:
    """The AdapterHub name of a bottleneck config (they have no ``architecture`` key): told apart by fields."""
    if config.get("phm_layer"):
        return "Compacter"
    if config.get("inv_adapter"):
        return "SeqBnInv"
    if config.get("is_parallel"):
        return "ParBn"
    if config.get("mh_adapter") and config.get("output_adapter"):
        return "DoubleSeqBn"
    return "SeqBn"
