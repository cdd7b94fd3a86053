"""Shared file helpers: all-or-nothing adapter directories, safe tensor reading (no pickle unless asked).

An adapter directory holds ``adapter_config.json`` and a tensors file (``adapter.safetensors`` natively,
``adapter_model.safetensors`` for peft). :func:`write_adapter` makes a save all-or-nothing:

1. The writer holds an exclusive ``flock`` on the directory for the whole save, so saves to one directory
   from several processes (or threads) run one after another; :func:`read_adapter` holds a shared ``flock``
   while it reads the config and the tensors, so no save completes between the two reads. The lock needs no
   file of its own and is released by the kernel when a writer dies.
2. Both files are first written in full (and fsynced) in a temp directory inside the directory
   (``.adapterkit-tmp-<pid>-<token>/``), then renamed over the old ones: tensors first, config second.
3. The tensors file's safetensors metadata holds a copy of the config it was saved with
   (``adapterkit.config``); peft ignores it. A reader accepts a config only if it equals that copy, except
   for the fields in :data:`LABELS` (which name the base model or say how peft wraps it, and are edited by
   hand; no loader reads them).

The tensors' rename commits a save. A ``kill -9`` between the two renames leaves the new tensors, the old
config and the new config complete in the temp directory: :func:`read_adapter` pairs the tensors with that
config (it rolls the save forward), and the next save renames it into place first. Any other config that
differs from the tensors' copy is refused (:class:`AdapterFileError`, naming the fields that differ), so
``load`` never returns a mix of two saves. Each save removes the temp directories of killed saves (and the
temp files earlier versions left). Files without the copy (earlier adapterkit versions, peft itself) load
as before.

peft's own loader does not check the copy: it could read a mix only after a save killed in the moment
between the two renames (until the next save). Where ``flock`` is unavailable (Windows, some network file
systems) saves are not serialized: a reader refuses a mix two racing writers left, and only temp entries
older than an hour are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

__all__ = [
    "AdapterFileError",
    "CONFIG",
    "TENSORS",
    "LABELS",
    "write_adapter",
    "read_adapter",
    "read_tensors",
    "read_json",
    "pending_config",
    "require_float",
    "import_checked",
]

CONFIG = "adapter_config.json"
TENSORS = ("adapter.safetensors", "adapter_model.safetensors")  # native, peft
CONFIG_KEY = "adapterkit.config"  # safetensors metadata: the config the tensors were saved with
LABELS = frozenset({"base_model_name_or_path", "revision", "task_type", "inference_mode"})
TMP = ".adapterkit-tmp-"
_STALE_UNLOCKED_S = 3600.0
# temp files of earlier adapterkit versions (tempfile.mkstemp(prefix=".<name>.")), left behind by killed saves
_OLD_TMP = re.compile(r"^\.(adapter_config\.json|adapter(_model)?\.safetensors)\.[A-Za-z0-9_]{8}$")


class AdapterFileError(ValueError):
    """An adapter directory or file is missing, corrupt, or does not fit the model."""


# --- writing -------------------------------------------------------------------------------------------
def write_adapter(
    directory: str | os.PathLike, tensors_name: str, tensors: dict[str, torch.Tensor], config: dict[str, Any]
) -> None:
    """Write ``config`` as ``adapter_config.json`` and ``tensors`` as ``tensors_name``, all-or-nothing (see the
    module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    copy = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))  # what a reader will parse
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tmp = directory / f"{TMP}{os.getpid()}-{secrets.token_hex(4)}"
    with _locked(directory) as locked:
        _settle(directory, locked)
        tmp.mkdir()  # safetensors writes through a temp file of its own beside its target: keep that in here
        committed = False
        try:
            save_file(clean, str(tmp / tensors_name), metadata={"format": "pt", CONFIG_KEY: copy})
            (tmp / CONFIG).write_text(text)
            _fsync(tmp / tensors_name)
            _fsync(tmp / CONFIG)
            os.replace(tmp / tensors_name, directory / tensors_name)
            committed = True  # from here on the temp config completes the directory: keep it
            os.replace(tmp / CONFIG, directory / CONFIG)
        except BaseException:
            if not committed:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        with contextlib.suppress(OSError):
            tmp.rmdir()
        _fsync(directory)


@contextlib.contextmanager
def _locked(directory: Path, shared: bool = False) -> Iterator[bool]:
    """Hold an exclusive (writers) or shared (readers) ``flock`` on ``directory``; yields whether it is held."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield False
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - unreadable directory
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            locked = True
        except OSError:  # pragma: no cover - file systems without flock
            locked = False
        yield locked
    finally:
        os.close(fd)  # releases the lock


def _settle(directory: Path, locked: bool) -> None:
    """Finish the commit of a save killed between its two renames, then remove what killed saves left.

    Only under the lock (or when over an hour old) is a temp entry surely no live writer's."""
    for name in TENSORS:
        saved = _saved_config(directory / name)
        if saved is None or _belongs(_current_config(directory), saved):
            continue
        for tmp, data in _temp_configs(directory):
            if _belongs(data, saved):
                with contextlib.suppress(OSError):
                    os.replace(tmp, directory / CONFIG)
                break
    now = time.time()
    for entry in os.scandir(directory):
        if not (entry.name.startswith(TMP) or _OLD_TMP.match(entry.name)):
            continue
        with contextlib.suppress(OSError):
            if not locked and now - entry.stat(follow_symlinks=False).st_mtime < _STALE_UNLOCKED_S:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without fsync of directories
        pass
    finally:
        os.close(fd)


# --- pairing a config with its tensors -----------------------------------------------------------------
def _differences(config: Any, saved: Any, where: str = "") -> list[str]:
    """Where ``config`` differs from ``saved`` (top-level :data:`LABELS` aside), as readable lines."""
    if isinstance(config, dict) and isinstance(saved, dict):
        out = []
        for key in sorted(set(config) | set(saved), key=str):
            if not where and key in LABELS:
                continue
            path = f"{where}.{key}" if where else str(key)
            if key not in config or key not in saved:
                side = "only in the tensors' copy" if key in saved else "not in the tensors' copy"
                out.append(f"{path!r} is {side}")
            else:
                out.extend(_differences(config[key], saved[key], path))
        return out
    if config == saved:
        return []
    return [f"{where!r} is {config!r} here but was {saved!r} when the tensors were saved"]


def _belongs(config: dict[str, Any] | None, saved: dict[str, Any]) -> bool:
    return config is not None and not _differences(config, saved)


def _saved_config(path: Path) -> dict[str, Any] | None:
    """The config copy in a safetensors file's metadata (None: no copy, or no readable file)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return _parse_copy(f.metadata() or {})
    except Exception:  # noqa: BLE001 - an unreadable file has no copy; reading it reports the problem
        return None


def _parse_copy(meta: dict[str, str]) -> dict[str, Any] | None:
    try:
        data = json.loads(meta[CONFIG_KEY])
    except (KeyError, TypeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _current_config(directory: Path) -> dict[str, Any] | None:
    try:
        return read_json(directory / CONFIG)
    except AdapterFileError:
        return None


def _temp_configs(directory: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    for tmp in sorted(directory.glob(f"{TMP}*/{CONFIG}")):
        try:
            yield tmp, read_json(tmp)
        except AdapterFileError:  # a config still being written, or removed meanwhile
            continue


def _pending(directory: Path, saved: dict[str, Any]) -> dict[str, Any] | None:
    return next((data for _, data in _temp_configs(directory) if _belongs(data, saved)), None)


def pending_config(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The config of a save killed after its tensors' rename and before its config's (in its temp directory),
    when ``adapter_config.json`` does not belong to those tensors (or is missing); else None."""
    directory = Path(directory)
    for name in TENSORS:
        saved = _saved_config(directory / name)
        if saved is not None and not _belongs(_current_config(directory), saved):
            found = _pending(directory, saved)
            if found is not None:
                return found
    return None


# --- reading -------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``.

    Raises:
        AdapterFileError: a missing or unreadable file, invalid JSON, or JSON that is not an object.
    """
    try:
        data = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise AdapterFileError(f"missing file {str(path)!r}") from None
    except IsADirectoryError:
        raise AdapterFileError(f"{path} is a directory, not a JSON file") from None
    except OSError as e:
        raise AdapterFileError(f"{path} could not be read ({e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AdapterFileError(f"{path} is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one opening of ``path`` (a concurrent rename over it cannot split them)."""
    # One read of one opened file: safe_open checks the header against the size of the *path*, so a save
    # renamed over it between the two could make a complete file look truncated (seen with two writers).
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size]) if len(data) >= 8 + size else None
        if not isinstance(header, dict):
            raise ValueError(f"the header claims {size} bytes but the file has {len(data)}")
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError("__metadata__ is not an object")
        return load_bytes(data), {str(k): v for k, v in meta.items()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, RecursionError) as e:
        raise AdapterFileError(f"{path} is corrupt or not a safetensors file ({e})") from None


def _read_any(directory: Path, stem: str, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    st = directory / f"{stem}.safetensors"
    if st.is_file():
        return _read_safetensors(st)
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
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise AdapterFileError(f"{pickles[0]} does not hold a flat dict of tensors")
    return data, {}


def read_tensors(directory: Path, stem: str, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read ``<stem>.safetensors`` from ``directory`` (or, with ``allow_pickle``, ``<stem>.bin``/``.pt``).

    Raises:
        AdapterFileError: no weights file, a corrupt file, or only a pickle file without ``allow_pickle``.
    """
    return _read_any(Path(directory), stem, allow_pickle)[0]


def read_adapter(
    directory: str | os.PathLike,
    stem: str,
    *,
    allow_pickle: bool = False,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``adapter_config.json`` and ``<stem>.safetensors`` (or a pickle, see :func:`read_tensors`) of
    ``directory``, from one save. ``check`` sees the config first (e.g. to refuse a newer format version).

    When ``adapter_config.json`` does not belong to the tensors: the config of a save killed between its
    renames (see the module docstring), or the pair read again (a save may complete between the two reads).

    Raises:
        AdapterFileError: missing or corrupt files, or a config that does not belong to the tensors.
    """
    directory = Path(directory)
    config_path = directory / CONFIG
    problems: list[str] = []
    for attempt in range(4):
        with _locked(directory, shared=True):  # no save runs between reading the config and the tensors
            found = _read_pair(directory, stem, config_path, allow_pickle, check)
        if isinstance(found, tuple):
            return found
        problems = found
        time.sleep(0.01 * (attempt + 1))  # unlocked file systems: a save may have completed between the reads
    tensors_path = directory / f"{stem}.safetensors"
    raise AdapterFileError(
        f"{config_path} does not belong to {tensors_path}: {'; '.join(problems[:3])}"
        f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}. The tensors were saved with another "
        "config (two saves at once without file locking, or a config edited by hand); save the adapter again"
    )


def _read_pair(
    directory: Path,
    stem: str,
    config_path: Path,
    allow_pickle: bool,
    check: Callable[[dict[str, Any]], None] | None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | list[str]:
    """One reading of the config and the tensors: the pair, or the reasons the config does not belong."""
    problems: list[str] = []
    try:
        data: dict[str, Any] | None = read_json(config_path)
    except AdapterFileError:
        if config_path.exists():
            raise
        data = None
    if data is not None and check is not None:
        check(data)
    tensors, meta = _read_any(directory, stem, allow_pickle)
    saved = _parse_copy(meta)
    if data is not None and saved is None:
        return data, tensors  # no copy: written by peft or an earlier adapterkit
    if data is not None and saved is not None:
        problems = _differences(data, saved)
        if not problems:
            return data, tensors
    pending = _pending(directory, saved) if saved is not None else None
    if pending is not None:
        return pending, tensors
    if data is None:
        raise AdapterFileError(f"{str(directory)!r} has no {CONFIG}: it is not an adapter directory")
    return problems


# --- checking what was read ----------------------------------------------------------------------------
def require_float(tensors: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    """Refuse adapter tensors that are not real floating point (any precision is converted on import).

    Raises:
        AdapterFileError: naming ``where`` and the first offending tensor.
    """
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise AdapterFileError(f"{where}: tensor {key!r} is {value.dtype}; adapter tensors are floating point")


def import_checked(
    component: Any, state: dict[str, torch.Tensor], module: Any, reference: dict[str, torch.Tensor] | None = None
) -> None:
    """``component.import_state(state, module)`` after checking each tensor can stand for the component's own
    (``reference``, default its ``state_dict()``): floating point for floating point (converted to its dtype),
    else the same dtype.

    Raises:
        ValueError: a tensor of another kind (integer, bool or complex where the component holds real numbers).
    """
    own = component.state_dict() if reference is None else reference
    for key, value in state.items():
        mine = own.get(key)
        if mine is None:
            continue  # import_state reports unexpected keys
        fits = value.is_floating_point() if mine.is_floating_point() else value.dtype == mine.dtype
        if not fits:
            raise ValueError(f"{key!r} is {value.dtype} in the file; it holds {mine.dtype} values")
    component.import_state(state, module)
