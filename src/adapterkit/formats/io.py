"""Shared file helpers: atomic writes, safe tensor reading (no pickle unless asked)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["AdapterFileError", "atomic_write_json", "atomic_save_tensors", "read_tensors", "read_json"]


class AdapterFileError(ValueError):
    """An adapter directory or file is missing, corrupt, or does not fit the model."""


def _atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic(path, write)


def atomic_save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(clean, tmp, metadata=metadata or {"format": "pt"}))


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise AdapterFileError(f"missing file {str(path)!r}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{path} is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} must hold a JSON object")
    return data


def read_tensors(directory: Path, stem: str, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read ``<stem>.safetensors`` from ``directory`` (or, with ``allow_pickle``, ``<stem>.bin``/``.pt``).

    Raises:
        AdapterFileError: no weights file, a corrupt file, or only a pickle file without ``allow_pickle``.
    """
    st = directory / f"{stem}.safetensors"
    if st.is_file():
        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterFileError(f"{st} is corrupt or not a safetensors file ({e})") from None
    pickles = [p for p in (directory / f"{stem}.bin", directory / f"{stem}.pt") if p.is_file()]
    if not pickles:
        raise AdapterFileError(f"{str(directory)!r} has no {stem}.safetensors")
    if not allow_pickle:
        raise AdapterFileError(
            f"{pickles[0]} is a pickle file, which can run code when loaded; convert it to safetensors "
            "or pass allow_pickle=True to read it with torch.load(weights_only=True)"
        )
    try:
        data = torch.load(str(pickles[0]), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a file problem
        raise AdapterFileError(f"{pickles[0]} could not be read with weights_only=True ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise AdapterFileError(f"{pickles[0]} does not hold a flat dict of tensors")
    return data
