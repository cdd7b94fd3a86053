"""Forward state that every site of one model reads.

The state has two layers:

- the **persistent default**, set by ``Adapters.activate()`` (and ``add``/``train``/``delete``): one plain
  attribute shared by every thread and task;
- **scope overrides**, opened by ``Adapters.use()``, ``Adapters.route()`` and Parallel's replicating
  ``generate``: kept in a :class:`contextvars.ContextVar`, so they are per thread and per asyncio task. A new
  thread starts with no scope (it sees the default); an asyncio task starts with the scopes open where it was
  created (``create_task`` copies the context) and its own scopes never reach its parent or siblings.

Sites read ``state.active`` / ``state.routes`` on every call: the innermost open scope of the current thread or
task that overrides the field, else the default. Values are replaced, never mutated in place.

Two places see the scopes without entering the context that opened them:

- autograd worker threads (backward of CUDA graphs, where gradient checkpointing re-runs forwards): torch
  stashes the context of the thread that called ``backward()`` in its thread-local state and hands it to the
  workers; a thread where no scope was ever set reads the scopes from that stash;
- code traced by ``torch.compile`` (Dynamo cannot trace ``ContextVar.get``): it reads a per-thread copy of the
  current scopes (a ``threading.local`` that every scope entry and exit updates, which Dynamo guards on), so
  compiled models keep per-thread scopes; asyncio tasks that share a thread and a compiled model see the scopes
  of the latest entry or exit in that thread.

A scope's exit removes exactly its own override, in whatever order scopes exit: nested scopes restore the
previous value exactly, and overlapping scopes exited out of order (``c1`` entered, ``c2`` entered, ``c1``
exited, ``c2`` exited) leave nothing behind. A scope must exit in the thread or task that entered it (as a
``with`` block does); exiting it elsewhere only ends its registration (see :meth:`ForwardState.open_actives`),
the entering context keeps seeing it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import Context, ContextVar
from typing import Any

import torch

__all__ = ["ForwardState"]

_KEEP: Any = object()  # a scope leaves this field to outer scopes / the default


class _Frame:
    """One open scope: the fields it overrides (``_KEEP`` for the others) on one :class:`ForwardState`."""

    __slots__ = ("state", "active", "routes", "replicated")

    def __init__(self, state: ForwardState, active: Any, routes: Any, replicated: Any) -> None:
        self.state = state
        self.active = active
        self.routes = routes
        self.replicated = replicated


# open scopes of the current thread / asyncio task, innermost last (all models together; usually empty); unset in
# a context where no scope was ever entered
_SCOPES: ContextVar[tuple[_Frame, ...]] = ContextVar("adapterkit_scopes")
_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
_tls_has = getattr(torch._C, "_is_key_in_tls", None)
_tls_get = getattr(torch._C, "_get_obj_in_tls", None)


def _scopes() -> tuple[_Frame, ...]:
    scopes = _SCOPES.get(None)
    if scopes is not None:
        return scopes
    # nothing set here: an autograd worker thread sees the scopes of the thread that called backward()
    if _tls_has is not None and _tls_get is not None and _tls_has("context"):
        launched = _tls_get("context")
        if isinstance(launched, Context):
            return launched.get(_SCOPES, ())
    return ()


def _innermost(scopes: tuple[_Frame, ...], state: ForwardState, field: str) -> Any:
    for f in reversed(scopes):
        if f.state is state:
            value = getattr(f, field)
            if value is not _KEEP:
                return value
    return _KEEP


class _Local(threading.local):
    """Per-thread copy of the current scope overrides (``_KEEP``: none), read by code that ``torch.compile``
    traces."""

    def __init__(self) -> None:
        self.active: Any = _KEEP
        self.routes: Any = _KEEP
        self.replicated: Any = _KEEP


class ForwardState:
    """What is active for one model.

    Attributes (each read as the current thread's / task's innermost scope override, else the default):
        active: the active items (adapter names or composition blocks, see ``compose.py``), applied in
            this order at each site. Additive adapters (LoRA) thus sum, as in peft with several active.
            Assigning it sets the persistent default (:attr:`default`) for all threads.
        routes: per-row routing (a :class:`~adapterkit.compose.RoutePlan`), or None. When set it replaces
            ``active``; rows routed to no adapter run the base model.
        replicated: a Parallel block's inputs are already replicated (set while ``generate`` runs).
        default: the persistent ``active`` shared by all threads (what ``activate()`` sets).
    """

    __slots__ = ("default", "_routes", "_replicated", "_open", "_lock", "_local")

    def __init__(self) -> None:
        self.default: tuple[Any, ...] = ()
        self._routes: Any = None
        self._replicated = False
        self._open: list[_Frame] = []  # scopes open in any thread (for hooks that must exist while one is)
        self._lock = threading.Lock()
        self._local = _Local()

    # --- reads (hot path: every site, every call) --------------------------------------------------
    def _current(self, field: str, default: Any) -> Any:
        """The innermost scope override of ``field`` for this thread/task, else ``default``."""
        value = getattr(self._local, field) if _compiling() else _innermost(_scopes(), self, field)
        return default if value is _KEEP else value

    @property
    def active(self) -> tuple[Any, ...]:
        return self._current("active", self.default)

    @active.setter
    def active(self, value: tuple[Any, ...]) -> None:
        self.default = value

    @property
    def routes(self) -> Any:
        return self._current("routes", self._routes)

    @routes.setter
    def routes(self, value: Any) -> None:
        self._routes = value

    @property
    def replicated(self) -> bool:
        return self._current("replicated", self._replicated)

    @replicated.setter
    def replicated(self, value: bool) -> None:
        self._replicated = value

    def open_actives(self) -> list[tuple[Any, ...]]:
        """The default and the ``active`` of every scope open on this model in any thread or task (e.g. to keep
        a model-level hook installed while any of them needs it)."""
        with self._lock:
            return [self.default, *(f.active for f in self._open if f.active is not _KEEP)]

    # --- scopes ------------------------------------------------------------------------------------
    @contextmanager
    def scope(self, *, active: Any = _KEEP, routes: Any = _KEEP, replicated: Any = _KEEP) -> Iterator[None]:
        """Override fields for the current thread / asyncio task until the block exits."""
        frame = _Frame(self, active, routes, replicated)
        self._set_scopes((*_SCOPES.get(()), frame))
        with self._lock:
            self._open.append(frame)
        try:
            yield
        finally:
            with self._lock:
                self._open = [f for f in self._open if f is not frame]
            scopes = _SCOPES.get(())
            if any(f is frame for f in scopes):  # absent: exited in another thread/task than it entered
                self._set_scopes(tuple(f for f in scopes if f is not frame))

    def _set_scopes(self, scopes: tuple[_Frame, ...]) -> None:
        _SCOPES.set(scopes)
        local = self._local
        local.active = _innermost(scopes, self, "active")
        local.routes = _innermost(scopes, self, "routes")
        local.replicated = _innermost(scopes, self, "replicated")

    def scoped(self, active: tuple[Any, ...]) -> Any:
        """Scope ``active`` (``Adapters.use``)."""
        return self.scope(active=active)

    def routed(self, routes: Any) -> Any:
        """Scope per-row ``routes`` (``Adapters.route``)."""
        return self.scope(routes=routes)
