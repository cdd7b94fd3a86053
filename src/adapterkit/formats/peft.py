"""peft interop: read and write directories of peft's ``save_pretrained``.

A directory holds ``adapter_config.json`` (with ``peft_type``) and ``adapter_model.safetensors`` (keys
``base_model.model.<module path>.<tensor>``). Each method family has its own converter module
``formats/peft_<family>.py`` defining:

- ``PEFT_TYPE``: peft's type string (``"LORA"``, ``"IA3"``, ...),
- ``METHOD``: our registered method name (``"lora"``, ...),
- ``save(ctl, name, path)`` and ``load(ctl, path, *, name, allow_pickle, activate) -> str``.

Converters are discovered here, so adding one touches no shared file.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Any

from .io import AdapterFileError, atomic_save_tensors, atomic_write_json, read_json

PREFIX = "base_model.model."

__all__ = ["PREFIX", "converters", "save", "load", "write"]


def write(path: str | os.PathLike, tensors: dict[str, Any], config: dict[str, Any]) -> None:
    """Write a peft directory: ``adapter_model.safetensors`` then ``adapter_config.json``, each atomically."""
    directory = Path(path)
    atomic_save_tensors(directory / "adapter_model.safetensors", tensors)
    atomic_write_json(directory / "adapter_config.json", config)


def converters() -> dict[str, ModuleType]:
    """peft type -> converter module (every ``formats/peft_*.py``)."""
    package = __name__.rpartition(".")[0]
    out: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.startswith("peft_"):
            module = importlib.import_module(f"{package}.{info.name}")
            out[module.PEFT_TYPE] = module
    return out


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    method = ctl.config(name).method
    by_method = {m.METHOD: m for m in converters().values()}
    if method not in by_method:
        raise ValueError(
            f"adapter {name!r} is {method!r}, which peft's format cannot hold; peft export is available for: "
            f"{', '.join(sorted(by_method))} (use format='native' otherwise)"
        )
    by_method[method].save(ctl, name, path)


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    data = read_json(Path(path) / "adapter_config.json")
    kind = data.get("peft_type")
    table = converters()
    if kind not in table:
        raise AdapterFileError(
            f"peft adapters of type {kind!r} are not supported yet; supported: {', '.join(sorted(table))}"
        )
    return table[kind].load(ctl, path, name=name, allow_pickle=allow_pickle, activate=activate)
