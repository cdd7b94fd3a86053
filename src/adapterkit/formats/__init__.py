"""Adapter file formats: native (``adapter_config.json`` + ``adapter.safetensors``), peft, AdapterHub (read; export
in ``adapterhub_export``) and kohya/LyCORIS single ``.safetensors`` files (read)."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from . import adapterhub, adapterhub_export, kohya, kohya_write, native, peft
from .io import AdapterFileError, pending_config, read_json

__all__ = ["detect", "writer", "AdapterFileError"]


def detect(path: str | os.PathLike) -> ModuleType:
    """The format module able to read directory ``path``.

    Raises:
        AdapterFileError: missing directory/config, or a config that is not valid JSON.
    """
    if kohya.is_kohya_file(path):  # one .safetensors file keyed by module (kohya-ss / LyCORIS / diffusers)
        return kohya
    cfg_path = Path(path) / "adapter_config.json"
    if not Path(path).is_dir():
        raise AdapterFileError(f"adapter directory {str(path)!r} does not exist")
    data = pending_config(path)  # the config of a save killed between its renames (see io.write_adapter)
    if data is None:
        if not cfg_path.is_file() and adapterhub.is_composition(path):  # AdapterHub fusion or setup directory
            return adapterhub
        if not cfg_path.is_file():
            raise AdapterFileError(f"{str(path)!r} has no adapter_config.json: it is not an adapter directory")
        data = read_json(cfg_path)
    if isinstance(data, dict) and "peft_type" in data:
        return peft
    if isinstance(data, dict) and data.get("format") == native.FORMAT:
        return native
    if adapterhub.is_adapterhub(data):
        return adapterhub
    raise AdapterFileError(f"{cfg_path} is neither an adapterkit nor a peft adapter config (nor AdapterHub's)")


def writer(name: str) -> ModuleType:
    table = {"peft": peft, "native": native, "adapterkit": native, "adapterhub": adapterhub_export,
             "kohya": kohya_write}  # fmt: skip
    if name not in table:
        raise ValueError(f"unknown export format {name!r}; choose one of: peft, native, adapterhub, kohya")
    return table[name]
