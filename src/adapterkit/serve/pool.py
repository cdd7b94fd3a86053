"""Adapter pool of ``adapterkit serve``: which adapters the server knows, which are in memory, and eviction.

Tiers: *on disk* (registered: a name and a directory) -> *read* (files parsed into components by
``adapters.read`` on a loader thread, off the engine thread, so steps go on meanwhile) -> *attached* (installed into
the model with ``adapters.install`` by the engine thread between two steps: the only thread that changes the model,
so no forward ever sees a half-installed adapter). Attached adapters that no running request uses (unpinned) are
evicted least-recently-used when installing another would exceed the byte budget (``--adapter-pool-mb``). Each read
records a content hash of the adapter's files, so an adapter reloaded under the same name after its files changed
is a new version, never the stale one.

Registry changes from the HTTP side (runtime load/unload) only touch the registry under a lock; the model is
changed by the engine thread alone (:meth:`AdapterPool.acquire`, :meth:`AdapterPool.collect`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["AdapterEntry", "AdapterPool", "PoolError", "is_model_level"]


class PoolError(Exception):
    """An adapter cannot be used (unknown, unreadable, larger than the pool); ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class AdapterEntry:
    name: str
    path: Path
    method: str = "unknown"
    attached: bool = False
    pins: int = 0
    nbytes: int = 0
    last_used: float = 0.0
    digest: str | None = None
    model_level: bool = False
    removed: bool = False  # unregistered while in use: deleted from the model once unpinned
    created: int = field(default_factory=lambda: int(time.time()))
    # a read in progress on a loader thread, its result (``adapters.read``'s, waiting to be installed) or error
    reading: concurrent.futures.Future | None = None
    read: Any = None
    error: str | None = None

    @property
    def state(self) -> str:
        if self.attached:
            return "attached"
        return "in memory" if self.read is not None else "on disk"


def _method_of(path: Path) -> str:
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    inner = cfg.get("config") if isinstance(cfg.get("config"), dict) else {}  # native: {"config": {"method"}}
    return str(inner.get("method") or cfg.get("method") or cfg.get("peft_type") or "unknown").lower()


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))


def is_model_level(adapters: Any, name: str) -> bool:
    """Adapter ``name`` has a component that rewrites the whole model call (prompt/prefix tuning, LoReFT's
    position recorder, UniPELT gates): its rows change sequence lengths or caches, so the engine decodes them
    in their own forwards instead of the shared routed batch."""
    from adapterkit.component import Component

    for comp in adapters.components(name).values():
        for sub in comp.modules():
            if isinstance(sub, Component) and type(sub).pre_call is not Component.pre_call:
                return True
    return "" in adapters.sites(name)


class AdapterPool:
    """Registered adapters (name -> directory) and the in-memory tier under a byte budget."""

    def __init__(
        self,
        adapters: Any,
        root: Path | None = None,
        extra: dict[str, Path] | None = None,
        budget_bytes: int | None = None,
        metrics: Any = None,
        loader_threads: int = 2,
    ) -> None:
        self.adapters = adapters
        self.root = root.resolve() if root is not None else None
        self.budget = budget_bytes
        self.metrics = metrics
        self.lock = threading.RLock()
        self.entries: dict[str, AdapterEntry] = {}
        self.generation = 0  # bumped whenever the model's adapters change (loads, deletions)
        self.loader_threads = loader_threads
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.on_read: Any = None  # called on a loader thread after each read (the engine wakes up)
        self._unwanted: set[str] = set()  # detach once unused, stay registered (detach_when_unused)
        if self.root is not None:
            if not self.root.is_dir():
                raise PoolError(f"--adapters {self.root} is not a directory")
            for sub in sorted(self.root.iterdir()):
                if (sub / "adapter_config.json").is_file():
                    self.register(sub.name, sub)
        for name, path in (extra or {}).items():
            self.register(name, Path(path))

    # --- registry (any thread) ------------------------------------------------------------------------
    def register(self, name: str, path: Path) -> AdapterEntry:
        path = Path(path).resolve()
        if not (path / "adapter_config.json").is_file():
            raise PoolError(f"{path} holds no adapter_config.json", 400)
        with self.lock:
            old = self.entries.get(name)
            if old is not None and not old.removed:
                raise PoolError(f"an adapter named {name!r} is already registered", 400)
            if old is not None and old.pins > 0:
                raise PoolError(f"adapter {name!r} is being unloaded (requests still use it); retry later", 409)
            # an old version still attached but unused is deleted by acquire() before the new one loads
            entry = AdapterEntry(name=name, path=path, method=_method_of(path))
            self.entries[name] = entry
            return entry

    def confined(self, path: str) -> Path:
        """``path`` resolved, refused unless it lies under ``--adapters`` (runtime loads)."""
        if self.root is None:
            raise PoolError("runtime adapter loading needs --adapters DIR (paths are confined under it)", 400)
        p = Path(path)
        p = (p if p.is_absolute() else self.root / p).resolve()
        if p != self.root and self.root not in p.parents:
            raise PoolError(f"lora_path {path!r} is outside the adapters directory", 400)
        return p

    def unregister(self, name: str) -> None:
        with self.lock:
            entry = self.entries.get(name)
            if entry is None or entry.removed:
                raise PoolError(f"no adapter named {name!r}", 404)
            entry.removed = True
            if not entry.attached:
                del self.entries[name]

    def get(self, name: str) -> AdapterEntry | None:
        with self.lock:
            entry = self.entries.get(name)
            return None if entry is None or entry.removed else entry

    def listing(self) -> list[AdapterEntry]:
        with self.lock:
            return [e for e in self.entries.values() if not e.removed]

    def used_bytes(self) -> int:
        with self.lock:
            return sum(e.nbytes for e in self.entries.values() if e.attached)

    def detach_when_unused(self, name: str) -> None:
        """Detach ``name`` from the model once no request uses it; it stays registered (its next request loads it
        again). For a placement layer above the server (Ray Serve's per-replica LRU); any thread."""
        with self.lock:
            self._unwanted.add(name)

    def keep_attached(self, name: str) -> None:
        """Withdraw :meth:`detach_when_unused` for ``name`` (it is wanted here again)."""
        with self.lock:
            self._unwanted.discard(name)

    # --- model changes (engine thread only) -------------------------------------------------------------
    def collect(self) -> None:
        """Delete adapters unregistered while in use, and detach those marked :meth:`detach_when_unused`, once
        nothing uses them."""
        with self.lock:
            for name, entry in list(self.entries.items()):
                if entry.removed and entry.attached and entry.pins == 0:
                    self._detach(entry)
                    del self.entries[name]
            for name in sorted(self._unwanted):
                entry = self.entries.get(name)
                if entry is None or not entry.attached:
                    self._unwanted.discard(name)
                elif entry.pins == 0:
                    self._detach(entry)
                    self._unwanted.discard(name)
                    if self.metrics is not None:
                        self.metrics.adapter_evictions.inc()

    def _detach(self, entry: AdapterEntry) -> None:
        if entry.name in self.adapters:
            self.adapters.delete(entry.name)
            self.generation += 1
        entry.attached = False
        entry.nbytes = 0
        if self.metrics is not None:
            self.metrics.pool_bytes.set(self.used_bytes())

    def can_acquire(self, name: str) -> bool:
        """``name`` is attached, or installing it fits the budget after evicting unpinned adapters."""
        with self.lock:
            entry = self.entries[name]
            if entry.attached or self.budget is None:
                return True
            need = entry.read.nbytes if entry.read is not None else _file_bytes(entry.path)
            if need > self.budget:
                return True  # never fits: acquire() fails its requests with a clear error
            free = self.budget - sum(e.nbytes for e in self.entries.values() if e.attached and e.pins > 0)
            return need <= free

    def prepare(self, name: str) -> str:
        """Where ``name`` stands, starting a read on a loader thread if it is only on disk (never blocks):
        ``"ready"`` (attached, or read and waiting to be installed: :meth:`acquire` is quick), ``"loading"``
        (a read is in progress: ask again later), or ``"unknown"`` (not registered: :meth:`acquire` says so).

        Raises:
            PoolError: the read failed (the error is reported once; the next request reads again).
        """
        with self.lock:
            entry = self.entries.get(name)
            if entry is None or entry.removed:
                return "unknown"
            if entry.error is not None:
                error, entry.error = entry.error, None
                raise PoolError(error, 400)
            if entry.attached or entry.read is not None:
                return "ready"
            if entry.reading is None:
                entry.reading = self._loader().submit(self._read, entry)
            return "loading"

    def _loader(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(self.loader_threads, "adapterkit-load")
        return self._executor

    def _read(self, entry: AdapterEntry) -> None:
        """Loader thread: hash and read ``entry``'s files into components (the model is not touched)."""
        try:
            digest = _digest(entry.path)
            read = self.adapters.read(entry.path, name=entry.name)
        except Exception as e:  # a failed read fails only the requests for this adapter
            with self.lock:
                entry.reading, entry.error = None, f"adapter {entry.name!r} failed to load from {entry.path}: {e}"
        else:
            with self.lock:
                entry.reading, entry.read, entry.digest = None, read, digest
        if self.on_read is not None:
            self.on_read()

    def close(self) -> None:
        """Stop the loader threads (reads in progress finish; their results are dropped with the pool)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def acquire(self, name: str) -> AdapterEntry:
        """Engine thread: pin ``name``, installing it first if needed (evicting LRU unpinned adapters to fit).
        Reads the files here if no loader thread did (:meth:`prepare`), so a direct call always works."""
        with self.lock:
            entry = self.entries.get(name)
            if entry is None or entry.removed:
                raise PoolError(f"no adapter named {name!r}", 404)
            if entry.attached:
                entry.pins += 1
                entry.last_used = time.monotonic()
                return entry
            future = entry.reading
        if future is not None:
            future.result()  # a read already under way: wait for it rather than read twice
        with self.lock:
            if entry.error is not None:
                error, entry.error = entry.error, None
                raise PoolError(error, 400)
            read = entry.read
        if read is None:
            self._read(entry)
            return self.acquire(name)
        with self.lock:
            entry.read = None  # installed below, or failed: either way read again next time
            if name in self.adapters:  # an older version of this name is still in the model (unloaded, reloaded)
                self.adapters.delete(name)
                self.generation += 1
            need = read.nbytes
            if self.budget is not None:
                if need > self.budget:
                    raise PoolError(
                        f"adapter {name!r} needs {need} bytes, more than --adapter-pool-mb allows "
                        f"({self.budget} bytes)", 400
                    )  # fmt: skip
                victims = sorted(
                    (e for e in self.entries.values() if e.attached and e.pins == 0 and e is not entry),
                    key=lambda e: e.last_used,
                )
                while self.used_bytes() + need > self.budget and victims:
                    self._detach(victims.pop(0))
                    if self.metrics is not None:
                        self.metrics.adapter_evictions.inc()
            self.generation += 1
            try:
                self.adapters.install(name, read.plan)
                entry.method = self.adapters.config(name).method
                entry.model_level = is_model_level(self.adapters, name)
            except Exception as e:
                if name in self.adapters:
                    self.adapters.delete(name)
                raise PoolError(f"adapter {name!r} failed to load from {entry.path}: {e}", 400) from e
            entry.attached, entry.nbytes, entry.pins = True, need, entry.pins + 1
            entry.last_used = time.monotonic()
            if self.metrics is not None:
                self.metrics.adapter_loads.inc()
                self.metrics.pool_bytes.set(self.used_bytes())
        return entry

    def release(self, name: str) -> None:
        with self.lock:
            entry = self.entries.get(name)
            if entry is None:
                return
            entry.pins = max(0, entry.pins - 1)
            entry.last_used = time.monotonic()
