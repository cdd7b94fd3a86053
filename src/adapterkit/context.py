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

Per-example conditioning (``task_ids``, issue 20): a scope may also carry one task id per row of the batch
(``Adapters.tasks(ids)``, or ``model(..., task_ids=ids)`` whose model-level hook opens such a scope for the call).
Unlike the other fields, task ids are not per model: :func:`task_ids` returns the innermost open ids of the
current thread / task whatever model opened them (a model calling another model passes its ids on), read by
task-conditioned components (Polytropon, MHR) at every call. They follow the same rules as the other scopes
(autograd worker threads, ``torch.compile``'s per-thread copy).

Components read the ids with :func:`task_ids` (or :func:`rows_task_ids`, which checks them against the batch). They
get there three ways (the model-level hooks are installed by the controller through :func:`sync_task_hooks`):

* ``with adapters.tasks(ids): model(**batch)``: a scope, per thread and per asyncio task like ``use()``;
* ``model(**batch, task_ids=ids)``: a model-level forward pre-hook (kwargs) removes ``task_ids`` before the base
  model sees it and opens the same scope for that call (a forward hook with ``always_call`` closes it, errors
  included). The hooks exist only while some adapter's config declares ``needs_task_ids`` (installed and removed
  as adapters are added and deleted);
* ``model.generate(..., task_ids=ids)``: while such an adapter exists, ``generate`` is wrapped (an instance
  attribute, as Parallel's): the ids are scoped around the whole generation, and when beam search or
  ``num_return_sequences`` repeat each row ``k`` times, a batch of ``k * len(ids)`` rows reads each id ``k`` times
  (``repeat_interleave``, as ``generate`` expands rows). ``with adapters.tasks(ids): model.generate(...)`` works the
  same way for greedy/sampled generation of one sequence per row.

Routing rows to different adapters (``adapters.route``) together with task ids is not supported: the ids count
the whole batch.

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
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .controller import Adapters

__all__ = ["ForwardState", "task_ids", "rows_task_ids", "as_task_ids", "needs_task_ids", "sync_task_hooks"]

_KEEP: Any = object()  # a scope leaves this field to outer scopes / the default


class _Frame:
    """One open scope: the fields it overrides (``_KEEP`` for the others) on one :class:`ForwardState`."""

    __slots__ = ("state", "active", "routes", "replicated", "task_ids")

    def __init__(
        self, state: ForwardState, active: Any, routes: Any, replicated: Any, task_ids: Any = _KEEP
    ) -> None:
        self.state = state
        self.active = active
        self.routes = routes
        self.replicated = replicated
        self.task_ids = task_ids


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


class _TaskLocal(threading.local):
    """Per-thread copy of the innermost open task ids (``_KEEP``: none), read by code ``torch.compile`` traces."""

    def __init__(self) -> None:
        self.ids: Any = _KEEP


_TASKS = _TaskLocal()


def _innermost_tasks(scopes: tuple[_Frame, ...]) -> Any:
    for f in reversed(scopes):
        if f.task_ids is not _KEEP:
            return f.task_ids
    return _KEEP


def task_ids() -> torch.Tensor | None:
    """The task ids of the current forward: a ``(batch,)`` int64 tensor (one id per row) from the innermost open
    ``Adapters.tasks(ids)`` scope or ``model(..., task_ids=ids)`` call of this thread / asyncio task, else None."""
    ids = _TASKS.ids if _compiling() else _innermost_tasks(_scopes())
    return None if ids is _KEEP else ids


def rows_task_ids(rows: int, device: torch.device, who: str) -> torch.Tensor:
    """:func:`task_ids` checked against a batch of ``rows`` rows and moved to ``device`` (``(rows,)`` int64).

    Raises:
        ValueError: no ids are set (naming ``who``, the adapter that needs them, and how to pass them), or their
            number is not the batch's.
    """
    ids = task_ids()
    if ids is None:
        raise ValueError(
            f"{who} needs one task id per row: call model(**batch, task_ids=ids), or run it inside "
            "`with adapters.tasks(ids):` (generate: model.generate(..., task_ids=ids))"
        )
    if ids.shape[0] != rows:
        factors = _EXPAND.get(())
        if rows % ids.shape[0] == 0 and rows // ids.shape[0] in factors:  # generate() repeated every row
            return rows_task_ids_expanded(ids, rows // ids.shape[0], device)
        raise ValueError(
            f"{who}: {ids.shape[0]} task ids for a batch of {rows} rows; pass one id per row (beam search and "
            "num_return_sequences expand rows: pass generate(..., task_ids=ids), which expands them the same way)"
        )
    return ids if ids.device == device else ids.to(device)


_EXPAND: ContextVar[tuple[int, ...]] = ContextVar("adapterkit_task_expand")


def rows_task_ids_expanded(ids: torch.Tensor, k: int, device: torch.device) -> torch.Tensor:
    """``ids`` repeated ``k`` times each (as ``generate`` repeats rows: ``repeat_interleave``), on ``device``."""
    return ids.to(device).repeat_interleave(k)


@contextmanager
def expanded_rows(*factors: int) -> Iterator[None]:
    """Inside ``generate(..., task_ids=ids)``: batches of ``k * len(ids)`` rows for ``k`` in ``factors`` (``num_beams``
    for beam search, ``num_return_sequences`` for sampling; encoder-decoder models run the encoder on the unexpanded
    rows) read each id ``k`` times."""
    token = _EXPAND.set(tuple(k for k in factors if k > 1))
    try:
        yield
    finally:
        _EXPAND.reset(token)


def as_task_ids(ids: Any) -> torch.Tensor:
    """``ids`` (ints, a list/tuple of ints or a 1-D integer tensor) as a ``(batch,)`` int64 tensor.

    Raises:
        TypeError / ValueError: not integers, not one-dimensional, empty or negative.
    """
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"task ids must be integers, got a {ids.dtype} tensor")
        t = ids.detach().to(torch.long)
    else:
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise TypeError(f"task ids are one integer per row of the batch (a list or 1-D tensor), got {ids!r}")
        ids = list(ids)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int)]
        if bad:
            raise TypeError(f"task ids must be integers, one per row, got {bad[0]!r}")
        t = torch.tensor(ids, dtype=torch.long)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(
            f"task ids are one integer per row of the batch (1-D, non-empty), got shape {tuple(t.shape)}"
        )
    if bool((t < 0).any()):
        raise ValueError(f"task ids must be non-negative, got {t.tolist()}")
    return t


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

    def __deepcopy__(self, memo: dict[int, Any]) -> ForwardState:
        """A copy with the same persistent default and no open scopes (those belong to running code)."""
        import copy

        new = ForwardState()
        memo[id(self)] = new
        new.default = copy.deepcopy(self.default, memo)
        return new

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
    def scope(
        self, *, active: Any = _KEEP, routes: Any = _KEEP, replicated: Any = _KEEP, task_ids: Any = _KEEP
    ) -> Iterator[None]:
        """Override fields for the current thread / asyncio task until the block exits (``task_ids``: a
        ``(batch,)`` int64 tensor, see :func:`task_ids`)."""
        frame = _Frame(self, active, routes, replicated, task_ids)
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
        _TASKS.ids = _innermost_tasks(scopes)

    def scoped(self, active: tuple[Any, ...]) -> Any:
        """Scope ``active`` (``Adapters.use``)."""
        return self.scope(active=active)

    def routed(self, routes: Any) -> Any:
        """Scope per-row ``routes`` (``Adapters.route``)."""
        return self.scope(routes=routes)


# --- task ids from the model call and generate (installed by the controller) -------------------------
_ATTR = "_task_hooks"


def needs_task_ids(ctl: Adapters) -> bool:
    """Whether some adapter on the model conditions on task ids (its config, or a part of a union, has
    ``needs_task_ids``)."""
    return any(
        getattr(part, "needs_task_ids", False) for rec in ctl._records.values() for part in rec.config.parts()
    )


class _TaskHooks:
    """The model-level hooks of one controller that turn ``task_ids=`` keywords into scopes."""

    def __init__(self, ctl: Adapters) -> None:
        self.ctl = ctl
        self.local = threading.local()
        model = ctl.model
        self.pre = model.register_forward_pre_hook(self._enter, with_kwargs=True, prepend=True)
        self.post = model.register_forward_hook(self._exit, always_call=True)

    def _stack(self) -> list[Any]:
        stack = getattr(self.local, "stack", None)
        if stack is None:
            stack = self.local.stack = []
        return stack

    def _enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        stack = self._stack()
        if "task_ids" not in kwargs:
            stack.append(None)
            return None
        kwargs = dict(kwargs)
        ids = kwargs.pop("task_ids")
        if ids is None:
            stack.append(None)
        else:
            scope = self.ctl.state.scope(task_ids=as_task_ids(ids))
            scope.__enter__()
            stack.append(scope)
        return args, kwargs

    def _exit(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        stack = self._stack()
        scope = stack.pop() if stack else None
        if scope is not None:
            scope.__exit__(None, None, None)

    def generate(self, *args: Any, task_ids: Any = None, **kwargs: Any) -> Any:
        """``generate`` with ``task_ids`` scoped around it (see the module docstring)."""
        ctl = self.ctl
        model = ctl.model
        if ctl._root_hook is not None:  # Parallel's replicating generate is installed too
            inner = ctl._parallel_generate
        else:

            def inner(*a: Any, **kw: Any) -> Any:
                return type(model).generate(model, *a, **kw)

        if task_ids is None:
            return inner(*args, **kwargs)
        ids = as_task_ids(task_ids)
        config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        beams = kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
        returned = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1
        with ctl.state.scope(task_ids=ids), expanded_rows(int(beams), int(returned)):
            return inner(*args, **kwargs)

    def remove(self) -> None:
        self.pre.remove()
        self.post.remove()


def sync_task_hooks(ctl: Adapters, recount: bool = True) -> None:
    """Install the task-id hooks (and the ``generate`` wrapper) while some adapter needs task ids; remove them
    (restoring Parallel's ``generate`` if that one is wanted) when none does. ``recount=False`` (after Parallel's
    ``generate`` changed, on every ``use()``) reuses the last answer instead of walking the adapters."""
    hooks: _TaskHooks | None = ctl.__dict__.get(_ATTR)
    if recount or "_needs_task_ids" not in ctl.__dict__:
        ctl.__dict__["_needs_task_ids"] = needs_task_ids(ctl)
    wanted = ctl.__dict__["_needs_task_ids"]
    if not wanted and hooks is None:
        return
    model = ctl.model
    has_generate = hasattr(type(model), "generate")
    if wanted:
        if hooks is None:
            hooks = ctl.__dict__[_ATTR] = _TaskHooks(ctl)
        if has_generate:
            model.__dict__["generate"] = hooks.generate
    elif hooks is not None:
        hooks.remove()
        del ctl.__dict__[_ATTR]
        current = model.__dict__.get("generate")
        if getattr(current, "__self__", None) is hooks:
            if ctl._root_hook is not None:
                model.__dict__["generate"] = ctl._parallel_generate
            else:
                model.__dict__.pop("generate", None)
