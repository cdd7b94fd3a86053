"""The controller: ``ak.attach(model)`` returns one :class:`Adapters` per model.

It owns the sites (hooks) and the adapter records, and implements the public verbs: add, delete,
train, activate/use, merge/unmerge, save/load/export, summary, detach. Method-specific behaviour
lives behind the config/component interface; nothing here knows what LoRA is.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .component import Component, first_input, grad_epoch, watch_gradients
from .compose import Block, Fuse, Parallel, RoutePlan, names_in, replicate, validate
from .config import AdapterConfig, get_config
from .context import ForwardState, as_task_ids, sync_task_hooks
from .formats import AdapterFileError, detect, native, writer
from .merging import combine_adapters
from .methods.fusion import Fusion
from .methods.heads import HeadCopy
from .plan import EXTRA, HEAD, TARGET, Plan
from .profiles import profile_for
from .quant.common import dequantize_for_merge
from .sites import Site
from .targeting import TargetError, base_modules, select

__all__ = ["Adapters", "attach", "Plan", "ReadAdapter"]  # Plan: re-exported from adapterkit.plan

_ATTR = "_adapterkit_controller"


# controllers with scheduled parameters, told about every optimizer step (see Adapters._sync_step_check)
_STEPPING: weakref.WeakSet[Adapters] = weakref.WeakSet()
_OPTIMIZER_HOOK: list[Any] = []


def _optimizer_stepped(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for ctl in list(_STEPPING):
        ids = ctl._watched_ids
        if ids and any(id(p) in ids for group in optimizer.param_groups for p in group["params"]):
            ctl._pending_step = True


def _watch_optimizers(ctl: Adapters) -> None:
    _STEPPING.add(ctl)
    if not _OPTIMIZER_HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _OPTIMIZER_HOOK.append(register_optimizer_step_post_hook(_optimizer_stepped))


def attach(model: nn.Module) -> Adapters:
    """The adapter controller of ``model`` (created on first call; the same object afterwards)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach() expects a torch.nn.Module, got {type(model).__name__}")
    ctl = model.__dict__.get(_ATTR)
    if ctl is None:
        ctl = Adapters(model)
        model.__dict__[_ATTR] = ctl
    return ctl


@dataclasses.dataclass
class ReadAdapter:
    """An adapter read from files by :meth:`Adapters.read`, not attached yet.

    Attributes:
        name: the name it will be installed under.
        plan: its filled components per module.
        path: the directory it was read from.
    """

    name: str
    plan: Plan
    path: str

    @property
    def nbytes(self) -> int:
        """Bytes of its parameters and buffers (what installing it adds to memory)."""
        seen: set[int] = set()
        total = 0
        for _, comp in self.plan.components.values():
            for t in [*comp.parameters(), *comp.buffers()]:
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total


class _Reading:
    """The controller as a format reader sees it during :meth:`Adapters.read`: every question is answered by the
    real controller, but ``install`` keeps the plan instead of attaching it (readers end in ``ctl.install``)."""

    def __init__(self, ctl: Adapters) -> None:
        self._ctl = ctl
        self.read: Plan | None = None  # not ``plan``: readers call ``ctl.plan(config)``

    def __getattr__(self, key: str) -> Any:
        return getattr(self._ctl, key)

    def _check_new_name(self, name: str) -> None:
        self._ctl._check_new_name(name, exists=False)  # install checks the name is free when it attaches

    def install(self, name: str, plan: Plan, *, activate: bool = False) -> None:
        self._ctl._check_new_name(name, exists=False)
        self.read = plan


@dataclasses.dataclass
class _Record:
    config: AdapterConfig
    kinds: dict[str, str]  # module name -> kind
    scheduled: bool = False  # some component (or part of one) has ``Component.scheduled``


class Adapters:
    """Adapters on one model. Obtain it with :func:`adapterkit.attach`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = ForwardState()
        self.family, self.roles = profile_for(model)
        self._sites: dict[str, Site] = {}
        self._records: dict[str, _Record] = {}
        self._root_hook: Any = None
        self._sync_lock = threading.Lock()
        self._route_caches: dict[Any, dict[Any, Any]] = {}
        # adapter tensors on float16/bfloat16 bases are stored in float32 (peft's autocast_adapter_dtype)
        self.autocast_adapter_dtype = True
        # training-time hooks: optimizer steps told to scheduled components, and what they looked like then
        self.global_step = 0
        self._step_hook: Any = None
        self._stepped: list[tuple[str, nn.Parameter, int]] = []
        self._watched_ids: set[int] = set()
        self._pending_step = False

    # --- copying (copy.deepcopy of a model with adapters, as peft users do) ---------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_sync_lock", None)
        state["_route_caches"] = {}  # stacked copies: rebuilt on use
        state["_stepping"] = self in _STEPPING
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        stepping = state.pop("_stepping", False)
        self.__dict__.update(state)
        self._sync_lock = threading.Lock()
        self._watched_ids = {id(p) for _, p, _ in self._stepped}  # the copied parameters
        if stepping:
            _watch_optimizers(self)

    # --- introspection ---------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"Adapters({type(self.model).__name__}, adapters={list(self._records)}, active={list(self.active)})"

    def __contains__(self, name: str) -> bool:
        return name in self._records

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    @property
    def names(self) -> list[str]:
        return list(self._records)

    @property
    def active(self) -> tuple[str, ...]:
        return self.state.active

    def config(self, name: str) -> AdapterConfig:
        return self._record(name).config

    def sites(self, name: str) -> dict[str, str]:
        """Module name -> kind (``target``/``extra``/``head``) for adapter ``name``."""
        return dict(self._record(name).kinds)

    def components(self, name: str) -> dict[str, Component]:
        """Module name -> component of adapter ``name``."""
        return {m: self._sites[m].components[name] for m in self._record(name).kinds}

    def parameters(self, name: str | None = None) -> Iterator[nn.Parameter]:
        """Parameters of one adapter, or of all adapters (each once, also those of a :class:`Bank` every site
        shares)."""
        seen: set[int] = set()
        for n in [name] if name is not None else list(self._records):
            for comp in self.components(n).values():
                for p in comp.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        yield p

    def _record(self, name: str) -> _Record:
        if name not in self._records:
            known = ", ".join(repr(n) for n in self._records) or "none"
            raise KeyError(f"no adapter named {name!r}; adapters on this model: {known}")
        return self._records[name]

    # --- planning and adding ---------------------------------------------------------------
    def plan(
        self, config: str | AdapterConfig = "lora", *, autocast_adapter_dtype: bool | None = None, **overrides: Any
    ) -> Plan:
        """Resolve a config against the model without changing anything (a dry run).

        The components' float16/bfloat16 tensors are stored in float32 (:meth:`Component.upcast_`) unless
        ``autocast_adapter_dtype`` (default: the controller's attribute of that name, True) is False.

        Raises:
            TargetError: a target matches nothing or a module the method cannot act on.
            ValueError: unknown method name or invalid config field.
        """
        cfg = get_config(config, **overrides)
        modules = base_modules(self.model)
        parts = [self._plan_part(part, modules) for part in cfg.parts()]
        per_site: dict[str, list[tuple[str, Component]]] = {}
        for part in parts:
            for n, kc in part.items():
                per_site.setdefault(n, []).append(kc)
        if not per_site:
            raise TargetError(f"{cfg.method} would not act on any module of this {type(self.model).__name__}")
        comps: dict[str, tuple[str, Component]] = {}
        for n, found in per_site.items():
            kinds = {k for k, _ in found}
            if HEAD in kinds and len(found) > 1:
                raise TargetError(f"{n!r} is a head of one part of the union and adapted by another")
            kind = TARGET if TARGET in kinds else found[0][0]
            comps[n] = (kind, cfg.combine(n, modules[n], [c for _, c in found]))
        ordered = {n: comps[n] for n in modules if n in comps}
        if self.autocast_adapter_dtype if autocast_adapter_dtype is None else autocast_adapter_dtype:
            for _, comp in ordered.values():
                comp.upcast_()
        return Plan(cfg, ordered)

    def _plan_part(self, cfg: AdapterConfig, modules: dict[str, nn.Module]) -> dict[str, tuple[str, Component]]:
        """Components of one (non-union) config, keyed by module name."""
        kw = {"family": self.family, "roles": self.roles, "modules": modules}
        targets = cfg.targets if cfg.targets is not None else cfg.default_targets(self.roles)
        params = cfg.parameter_targets()  # all-linear's warning leaves these out
        names = (
            select(self.model, targets, exclude=cfg.exclude, layers=cfg.layers, parameters=params, **kw)
            if targets
            else []
        )
        heads = select(self.model, cfg.heads, **kw) if cfg.heads else []
        bad = [n for n in names if not cfg.accepts(modules[n])]
        if bad:
            kinds = sorted({type(modules[n]).__name__ for n in bad})
            raise TargetError(
                f"{cfg.method} cannot act on {bad[:5]} ({', '.join(kinds)}); narrow `targets` or add `exclude`"
            )
        overlap = sorted(set(names) & set(heads))
        if overlap:
            raise TargetError(f"{overlap} are both targets and heads; exclude them from targets")
        built = cfg.build_all(modules, names, lambda sels: select(self.model, list(sels), **kw))
        comps: dict[str, tuple[str, Component]] = {n: (TARGET, c) for n, c in built.items()}
        for n, c in cfg.extra_sites({k: v for k, v in modules.items() if k not in heads}, names).items():
            comps[n] = (EXTRA, c)
        for n in heads:
            comps[n] = (HEAD, HeadCopy(modules[n]))
        return comps

    def add(
        self,
        name: str,
        config: str | AdapterConfig = "lora",
        *,
        dry_run: bool = False,
        autocast_adapter_dtype: bool | None = None,
        **overrides: Any,
    ) -> Plan:
        """Add adapter ``name`` built from ``config`` (a registered name, preset or config object).

        ``overrides`` replace config fields (``add("a", "lora", r=4)``). With ``dry_run=True`` nothing is
        attached and the returned :class:`Plan` lists the sites and parameter count. The first adapter
        added to a model becomes active. All-or-nothing: on any error the model is left unchanged.

        On a float16/bfloat16 base the adapter's parameters are stored in float32 (the forward computes the
        adapter branch in float32 and returns the base dtype, as peft's ``autocast_adapter_dtype``), so small
        optimizer steps are not rounded away; ``autocast_adapter_dtype=False`` keeps them in the base dtype
        (default: the controller's ``autocast_adapter_dtype`` attribute, which also applies to :meth:`load`).

        Raises:
            ValueError: invalid or duplicate name, unknown method, bad config values.
            TargetError: targets that match nothing or modules the method cannot act on.
        """
        self._check_new_name(name)
        plan = self.plan(config, autocast_adapter_dtype=autocast_adapter_dtype, **overrides)
        if dry_run:
            return plan
        modules = base_modules(self.model)
        for mod_name, (_, comp) in plan.components.items():
            comp.initialize(modules[mod_name])
        self._install(name, plan, modules)
        return plan

    def _check_new_name(self, name: str, *, exists: bool = True) -> None:
        """Refuse names that cannot name an adapter (and, with ``exists``, names already in use)."""
        if not isinstance(name, str) or not name or "." in name or not name.isprintable():
            raise ValueError(f"adapter names must be non-empty strings without '.', got {name!r}")
        if exists and name in self._records:
            raise ValueError(f"an adapter named {name!r} already exists; delete it first or pick another name")
        if hasattr(nn.ModuleDict(), name):  # components live in a ModuleDict keyed by adapter name
            raise ValueError(
                f"{name!r} cannot name an adapter: it is an attribute of torch modules (like 'half', 'train', "
                "'float'); pick another name"
            )

    def _install(self, name: str, plan: Plan, modules: dict[str, nn.Module]) -> None:
        """Attach a plan's (initialized) components as adapter ``name`` and record it."""
        self._place(name, {m: c for m, (_, c) in plan.components.items()}, modules)
        scheduled = any(
            isinstance(m, Component) and m.scheduled for _, c in plan.components.values() for m in c.modules()
        )
        self._records[name] = _Record(plan.config, {n: k for n, (k, _) in plan.components.items()}, scheduled)
        if not self.state.default:
            self.state.default = (name,)
        self._sync_step_check()

    def _place(self, name: str, components: dict[str, Component], modules: dict[str, nn.Module]) -> None:
        """Put components on their modules' sites; all-or-nothing (rolled back on any failure)."""
        done: list[str] = []
        try:
            for mod_name, comp in components.items():
                site = self._sites.get(mod_name)
                if site is None:
                    site = self._sites[mod_name] = Site(modules[mod_name], mod_name, self.state)
                comp.train(modules[mod_name].training)  # follow the model's train/eval mode
                site.add(name, comp)
                watch_gradients(comp.parameters())
                done.append(mod_name)
                comp.on_attach(modules[mod_name])
        except BaseException:
            for mod_name in reversed(done):
                comp = self._sites[mod_name].remove(name)
                comp.on_detach(modules[mod_name])
                self._drop_site_if_empty(mod_name)
            raise

    def _drop_site_if_empty(self, mod_name: str) -> None:
        site = self._sites[mod_name]
        if not len(site.components):
            site.close()
            del self._sites[mod_name]

    def delete(self, name: str) -> None:
        """Remove adapter ``name`` (unmerging it first if merged); the base is restored exactly."""
        self._remove(name, keep_merged=False)

    def _remove(self, name: str, keep_merged: bool) -> None:
        record = self._record(name)
        for mod_name in record.kinds:
            site = self._sites[mod_name]
            comp = site.remove(name)
            comp.on_detach(site.module, keep_merged=keep_merged)
            self._drop_site_if_empty(mod_name)
        del self._records[name]
        self._route_caches.clear()  # stacked copies of its weights go with it
        self.state.default = tuple(i for i in self.state.default if name not in set(names_in(i)))
        self._sync_parallel()
        self._sync_step_check()

    # --- training and activation -----------------------------------------------------------
    def train(self, name: str, heads: Sequence[str] | None = None) -> None:
        """Make only adapter ``name`` (and its heads) trainable, and activate it.

        ``heads`` (module names or the role ``"head"``) gives the adapter its own trainable copy of
        those modules (peft's ``modules_to_save``); the base modules stay untouched.
        """
        record = self._record(name)
        if heads:
            self._add_heads(name, record, heads)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.parameters(name):
            p.requires_grad_(True)
        watch_gradients(self.parameters(name))
        if name not in self.state.default:
            self.state.default = (name,)
        self._sync_step_check()

    def _add_heads(self, name: str, record: _Record, heads: Sequence[str]) -> None:
        modules = base_modules(self.model)
        found = select(self.model, list(heads), family=self.family, roles=self.roles, modules=modules)
        clash = [h for h in found if record.kinds.get(h) not in (None, HEAD)]
        new = [h for h in found if h not in record.kinds]
        if clash:
            raise TargetError(f"{clash} already carry adapter {name!r}; they cannot also be its heads")
        if not new:
            return
        self._place(name, {h: HeadCopy(modules[h]) for h in new}, modules)
        record.kinds.update({h: HEAD for h in new})
        record.config = record.config.replace(heads=tuple(record.config.heads) + tuple(new))

    def activate(self, *items: str | Block | None) -> None:
        """Set what is active: adapter names and/or composition blocks (``ak.Stack``, ``ak.Average``, ...),
        applied in order at each site (several names: their effects stack; for LoRA they sum, as in peft).
        No argument (or None) runs the base model.

        This is the persistent default, shared by all threads and asyncio tasks: it applies wherever no
        :meth:`use`/:meth:`route` scope of the current thread or task overrides it (inside such a scope it
        takes effect when the scope exits). Sites read it on every call, so changing it while another thread
        runs a forward that relies on it is a data race: that forward may run the old value at some layers
        and the new one at others. Call it while no forward runs; concurrent callers use :meth:`use`."""
        self.state.active = self._check_active(items)
        self._sync_parallel()

    def _check_active(self, items: tuple[Any, ...]) -> tuple[str | Block, ...]:
        flat = tuple(n for n in items if n is not None)
        if len(flat) == 1 and isinstance(flat[0], (list, tuple)):
            flat = tuple(flat[0])
        validate(flat)
        for item in flat:
            for n in names_in(item):
                if n not in self._records and n.startswith("fusion["):
                    raise KeyError(f"no fusion weights {n!r} on this model: call adapters.add_fusion([...]) first")
                self._record(n)
        return flat

    @contextmanager
    def use(self, *items: str | Block | None) -> Iterator[None]:
        """Activate ``items`` for the duration of a ``with`` block (``use()`` runs the base model).

        The scope is per thread and per asyncio task (``contextvars``): other threads keep what they had, a new
        thread starts with the default (:meth:`activate`), a task inherits the scopes open where it was created.
        On exit exactly this scope's override goes, even when overlapping scopes exit out of order."""
        try:
            with self.state.scoped(self._check_active(items)):
                self._sync_parallel()
                yield
        finally:
            self._sync_parallel()

    @contextmanager
    def route(self, names: Sequence[str | None]) -> Iterator[None]:
        """Run each row of the batch with its own adapter (``None``: the base model), e.g.
        ``with adapters.route(["a", "b", None]): model(**batch)``. Outputs equal running each row
        alone with its adapter; LoRA rows run as gathered batched matmuls over stacked adapter weights.
        Merged adapters cannot be routed. Scoped per thread and per asyncio task, like :meth:`use`.

        ``names`` has one entry per row: a call inside the block whose batch has another number of rows raises
        ``ValueError`` (so does ``generate`` with ``num_beams``/``num_return_sequences`` > 1)."""
        if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
            raise TypeError(
                f"route() takes one adapter name (or None) per row of the batch, e.g. ['a', None, 'b'], got "
                f"{names!r}; use adapters.use(name) to run one adapter on every row"
            )
        names = list(names)
        if not names:
            raise ValueError("route() needs one adapter name (or None) per row of the batch, got an empty list")
        bad = [n for n in names if n is not None and not isinstance(n, str)]
        if bad:
            raise TypeError(
                f"route() takes adapter names (str) or None, one per row, got {bad[0]!r}; composition blocks "
                "cannot be routed per row"
            )
        for n in dict.fromkeys(x for x in names if x is not None):
            self._record(n)
            if self.is_merged(n):
                raise ValueError(f"adapter {n!r} is merged into the base weights; unmerge it before routing")
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        wanted = set(names)
        used = [n for n in self._records if n in wanted]
        with self.state.routed(RoutePlan(names, device, order=used, cache=lambda: self._route_cache(used))):
            yield

    def _route_cache(self, used: list[str]) -> dict[Any, Any]:
        """Stacked-weight cache shared by route() blocks over the same adapters whose weights did not change
        (keyed by parameter identity and version, so training steps or loads invalidate it); last 4 kept."""
        key = (tuple(used), grad_epoch(), tuple((id(p), p._version) for n in used for p in self.parameters(n)))
        cache = self._route_caches.pop(key, None)
        if cache is None:
            cache = {}
            while len(self._route_caches) >= 4:
                self._route_caches.pop(next(iter(self._route_caches)))
        self._route_caches[key] = cache  # most recent last
        return cache

    # Parallel: the model-level pre-hook replicates the batch; generate() replicates its inputs first
    def _parallel(self) -> Parallel | None:
        active = self.state.active
        return active[0] if len(active) == 1 and isinstance(active[0], Parallel) else None

    def _sync_parallel(self) -> None:
        """Keep the replicating hook and ``generate`` while a Parallel is active in any thread or task (they do
        nothing where the current one has no Parallel active)."""
        with self._sync_lock:
            wanted = any(len(a) == 1 and isinstance(a[0], Parallel) for a in self.state.open_actives())
            if wanted and self._root_hook is None:
                self._root_hook = self.model.register_forward_pre_hook(self._replicate_inputs, with_kwargs=True)
                if hasattr(type(self.model), "generate"):
                    self.model.__dict__["generate"] = self._parallel_generate
            elif not wanted and self._root_hook is not None:
                self._root_hook.remove()
                self._root_hook = None
                self.model.__dict__.pop("generate", None)
        self._sync_tasks(recount=False)

    # per-example conditioning (task ids): see tasks.py
    @contextmanager
    def tasks(self, ids: Any) -> Iterator[None]:
        """Run the block with one task id per row of the batch (ints, a list or a 1-D integer tensor), read by
        task-conditioned adapters (Polytropon/MHR). Scoped per thread and per asyncio task, like :meth:`use`.
        ``model(**batch, task_ids=ids)`` and ``model.generate(..., task_ids=ids)`` do the same for one call."""
        with self.state.scope(task_ids=as_task_ids(ids)):
            yield

    def _sync_tasks(self, recount: bool = True) -> None:
        sync_task_hooks(self, recount=recount)

    def _replicate_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        block = self._parallel()
        if block is None or self.state.replicated or self.state.routes is not None:
            return None
        return replicate(args, kwargs, len(block.children))

    def _parallel_generate(self, *args: Any, **kwargs: Any) -> Any:
        block = self._parallel()
        generate = type(self.model).generate
        if block is None:
            return generate(self.model, *args, **kwargs)
        args, kwargs = replicate(args, kwargs, len(block.children))
        with self.state.scope(replicated=True):
            return generate(self.model, *args, **kwargs)

    # AdapterFusion
    def add_fusion(
        self, names: Sequence[str], *, temperature: float = 1.0, init_weights: bool = True, **fields: Any
    ) -> str:
        """Add AdapterFusion weights over adapters ``names`` (Pfeiffer et al. 2021) at every site where one
        of them has an output component; returns the fusion's name, used by ``ak.Fuse(*names)``. ``fields`` are
        further :class:`~adapterkit.methods.fusion.Fusion` fields (e.g. AdapterHub's equations:
        ``query_input="adapter_input", values="changes", value_bias=False``)."""
        names = list(names)
        for n in names:
            self._record(n)
        if len(names) < 2:
            raise ValueError("AdapterFusion needs at least two adapters")
        sites = [
            m
            for m, site in self._sites.items()
            if any(
                n in site.components and site.components[n].has_post and not site.components[n].observer
                for n in names
            )
        ]
        fusion = Fuse(*names).name
        self.add(
            fusion,
            Fusion(
                adapters=tuple(names), targets=sites, temperature=temperature, init_weights=init_weights, **fields
            ),
        )
        if self.state.default == (fusion,):
            self.state.default = ()
        return fusion

    def train_fusion(self, names: Sequence[str] | Fuse) -> None:
        """Make only the fusion weights over ``names`` trainable (the adapters stay frozen) and activate
        ``Fuse(*names)``."""
        block = names if isinstance(names, Fuse) else Fuse(*names)
        self._record(block.name)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.parameters(block.name):
            p.requires_grad_(True)
        self.activate(block)

    def disabled(self) -> Any:
        """Context manager running the base model (same as ``use()``)."""
        return self.use()

    # --- training-time hooks (docs: DESIGN.md "Training-time hooks") -----------------------
    def _parts(self, name: str) -> list[tuple[str, Component]]:
        """``(module name, component)`` for every component of adapter ``name``, nested ones (the parts of a
        union's :class:`~adapterkit.component.Chain`) included, each once."""
        out: list[tuple[str, Component]] = []
        seen: set[int] = set()
        for m, top in self.components(name).items():
            for c in top.modules():
                if isinstance(c, Component) and id(c) not in seen:
                    seen.add(id(c))
                    out.append((m, c))
        return out

    def trained(self) -> list[str]:
        """Adapters that have a parameter requiring grad: those :meth:`step` and :meth:`aux_loss` act on by default."""
        return [n for n in self._records if any(p.requires_grad for p in self.parameters(n))]

    def begin_training(self, total_steps: int | None = None, *, step: int = 0) -> None:
        """Training (re)starts at optimizer step ``step`` of ``total_steps``: sets :attr:`global_step`, tells the
        trained adapters' components (``Component.on_train_begin``; AdaLoRA takes its ``total_step`` from it when its
        config has none) and accepts the adapters' current values as the reference of the missing-step check (call
        it, or :meth:`sync_steps`, after changing scheduled parameters yourself, e.g. loading a checkpoint). The
        Trainer callback calls it in ``on_train_begin`` with the Trainer's ``max_steps`` and ``global_step``."""
        self.global_step = step
        for n in self.trained():
            for _, c in self._parts(n):
                c.on_train_begin(total_steps, step)
        self._sync_step_check()

    def step(self, names: Sequence[str] | None = None) -> int:
        """Tell the components of ``names`` (default: :meth:`trained`) that an optimizer step was taken: calls
        ``on_step(i)`` on every scheduled component (``i`` = :attr:`global_step`, the step's index from 0), then
        increments :attr:`global_step`. Returns ``i``.

        Call it after every ``optimizer.step()`` and before ``optimizer.zero_grad()`` (methods that score
        parameters by their gradients, AdaLoRA, read them here), as peft's ``update_and_allocate``. With
        ``transformers.Trainer`` add :class:`adapterkit.trainer.AdapterCallback` instead. A forward with grad enabled
        after an optimizer step changed a scheduled component's parameters without this call raises RuntimeError.
        """
        names = self.trained() if names is None else list(names)
        index = self.global_step
        for n in names:
            for _, c in self._parts(n):
                if c.scheduled:
                    c.on_step(index)
        self.global_step = index + 1
        self._sync_step_check()
        return index

    def aux_loss(self, names: Sequence[str] | None = None) -> torch.Tensor:
        """The sum of the components' auxiliary losses (``Component.aux_loss``, e.g. AdaLoRA's orthogonality
        regularizer) over ``names`` (default: :meth:`trained`): add it to the training loss
        (``loss = out.loss + adapters.aux_loss()``). A 0-dim zero tensor when no component has one, so the line is
        the same for every method."""
        names = self.trained() if names is None else list(names)
        total: torch.Tensor | None = None
        for n in names:
            for _, c in self._parts(n):
                term = c.aux_loss()
                if term is not None:
                    total = term if total is None else total + term
        if total is None:
            device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
            return torch.zeros((), device=device)
        return total

    def sync_steps(self) -> None:
        """Accept the scheduled parameters' current values as stepped (after changing them other than by an
        optimizer step followed by :meth:`step`)."""
        self._sync_step_check()

    def _sync_step_check(self) -> None:
        """Record the scheduled components' trainable parameters (and their versions); keep the model-level
        pre-hook that refuses a training forward after an unannounced optimizer step while any exists.

        Missing-step check, two detectors: (1) every ``torch.optim.Optimizer.step()`` runs a global post-hook
        (``register_optimizer_step_post_hook``) that marks this controller pending when the optimizer holds one of
        the watched parameters (fused optimizers, the Trainer's default, update parameters without bumping their
        ``_version``); (2) the parameters' ``_version`` counters, which in-place updates outside an optimizer bump.
        :meth:`step` (and :meth:`train`, :meth:`begin_training`, :meth:`sync_steps`) clears both. Cost: a set
        lookup per optimizer parameter per optimizer step, an integer comparison per watched parameter per
        forward."""
        watched = [
            (n, p, p._version)
            for n, record in self._records.items()
            if record.scheduled
            for _, c in self._parts(n)
            if c.scheduled
            for p in c.parameters()
            if p.requires_grad
        ]
        self._stepped = watched
        self._watched_ids = {id(p) for _, p, _ in watched}
        self._pending_step = False
        if watched and self._step_hook is None:
            self._step_hook = self.model.register_forward_pre_hook(self._check_stepped)
            _watch_optimizers(self)
        elif not watched and self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
            _STEPPING.discard(self)
        self._sync_tasks()

    def _check_stepped(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not torch.is_grad_enabled():
            return
        changed = [n for n, p, version in self._stepped if p._version != version and p.requires_grad]
        if self._pending_step or changed:
            n = changed[0] if changed else self._stepped[0][0]
            method = self._records[n].config.method if n in self._records else "?"
            raise RuntimeError(
                f"adapter {n!r} ({method}) changed since the last adapters.step(): an optimizer step was taken "
                f"without calling adapters.step(), so {method}'s schedule did not run and training would silently "
                "train something else. Call adapters.step() after every optimizer.step() (before zero_grad()), or "
                "add the Trainer callback: trainer.add_callback(adapterkit.trainer.AdapterCallback(adapters)). "
                "If you changed its parameters yourself, call adapters.sync_steps() first."
            )

    def set_rank(self, name: str, r: int) -> None:
        """Run adapter ``name`` at rank ``r`` from now on (methods trained for many ranks, e.g. DyLoRA: any
        ``1 <= r <= r_max``). Merging then merges that rank; the saved config records it when the method's config
        has ``with_rank(r)``.

        Raises:
            TypeError: the adapter's method has no rank to choose.
            ValueError: ``r`` out of range, or the adapter is merged (unmerge first).
        """
        record = self._record(name)
        if self.is_merged(name):
            raise ValueError(
                f"adapter {name!r} is merged into the base weights: unmerge it before changing its rank"
            )
        comps = [c for _, c in self._parts(name) if type(c).set_rank is not Component.set_rank]
        if not comps:
            raise TypeError(
                f"adapter {name!r} ({record.config.method}) has no rank to choose after training; methods trained "
                "for many ranks (DyLoRA) do"
            )
        with_rank = getattr(record.config, "with_rank", None)
        config = with_rank(r) if callable(with_rank) else record.config  # validates r before anything changes
        for c in comps:
            c.set_rank(r)
        record.config = config

    @torch.no_grad()
    def calibrate(self, name: str, batches: Iterable[Any]) -> int:
        """Initialize adapter ``name`` from activations: run ``batches`` (dicts are passed as keyword arguments,
        tuples/lists as positional ones, anything else as the one argument) through the base model (no adapter
        active, no grad) while every component that calibrates (``Component.observe``) sees its module's first
        input and output; then each sets its values (``Component.finish_calibration``). Returns the number of
        batches. The model runs in eval mode for the pass (no dropout in the statistics); every module's mode is
        restored afterwards.

        Raises:
            TypeError: no component of the adapter calibrates.
            ValueError: ``batches`` is empty.
        """
        parts = [(m, c) for m, c in self._parts(name) if type(c).observe is not Component.observe]
        if not parts:
            raise TypeError(f"adapter {name!r} ({self._record(name).config.method}) has nothing to calibrate")
        handles = []
        count = 0
        modes = [(mod, mod.training) for mod in self.model.modules()]
        try:
            for m, c in parts:
                handles.append(
                    self._sites[m].module.register_forward_hook(
                        lambda mod, args, kwargs, out, c=c: c.observe(first_input(args, kwargs), out),
                        with_kwargs=True,
                    )
                )
            self.model.eval()  # no dropout in the statistics (peft's EVA/CorDA calibrate in eval mode too)
            with self.use(), torch.no_grad():
                for batch in batches:
                    if isinstance(batch, Mapping):
                        self.model(**batch)
                    elif isinstance(batch, (tuple, list)):
                        self.model(*batch)
                    else:
                        self.model(batch)
                    count += 1
        finally:
            for h in handles:
                h.remove()
            for mod, training in modes:
                mod.training = training
        if not count:
            raise ValueError("calibrate() got no batches: pass an iterable of model inputs")
        for m, c in parts:
            c.finish_calibration(self._sites[m].module)
        self._sync_step_check()
        return count

    # --- merging ---------------------------------------------------------------------------
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights (all-or-nothing). Sites then skip it.

        Every refusal (unmergeable or tied weights, a component's :meth:`Component.check_merge`) is raised before
        any weight changes, so a refused merge leaves the base weights bit-identical; an unexpected failure later
        unmerges the sites already merged."""
        comps = self._merge_check(name)
        done = []
        try:
            for m, c in comps.items():
                if not c.merged:
                    c.merge(self._sites[m].module)
                    done.append(m)
        except BaseException:
            for m in reversed(done):
                comps[m].unmerge(self._sites[m].module)
            raise

    def _merge_check(self, name: str) -> dict[str, Component]:
        """Adapter ``name``'s components, after checking (changing nothing) that all of them can be merged."""
        comps = self.components(name)
        bad = [m for m, c in comps.items() if not c.mergeable]
        if bad:
            raise TypeError(f"adapter {name!r} cannot be merged: its components at {bad[:3]} are not mergeable")
        owners: dict[int, list[str]] = {}
        for mod_name, module in base_modules(self.model).items():
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), []).append(mod_name)
        for m in comps:
            weight = getattr(self._sites[m].module, "weight", None)
            shared = [o for o in owners.get(id(weight), []) if o != m]
            if shared:
                raise TypeError(
                    f"cannot merge adapter {name!r} into {m!r}: its weight is tied to {shared[0]!r} (e.g. input and "
                    "output embeddings), so merging would change both; untie the weights or keep the adapter unmerged"
                )
        for m, c in comps.items():
            if not c.merged:
                try:
                    c.check_merge(self._sites[m].module)
                except (TypeError, ValueError) as e:
                    raise type(e)(f"adapter {name!r} cannot be merged at {m!r}: {e}") from e
        return comps

    def unmerge(self, name: str) -> None:
        """Take adapter ``name`` back out of the base weights."""
        for m, c in self.components(name).items():
            c.unmerge(self._sites[m].module)

    def is_merged(self, name: str) -> bool:
        return any(c.merged for c in self.components(name).values())

    def merge_and_detach(
        self, names: Sequence[str] | None = None, *, dtype: torch.dtype | None = None
    ) -> nn.Module:
        """Merge ``names`` (default: the active adapters), drop every adapter, return the plain model.
        With ``dtype``: a dense model of that dtype, quantized layers dequantized (see :meth:`_merge_dense`)."""
        names = list(self.state.active if names is None else names)
        if dtype is not None:
            return self._merge_dense(names, dtype)
        for n in names:  # all-or-nothing: every refusal before any weight changes
            self._merge_check(n)
        merged = []
        try:
            for n in names:
                if not self.is_merged(n):
                    self.merge(n)
                    merged.append(n)
        except BaseException:
            for n in reversed(merged):
                self.unmerge(n)
            raise
        for n in list(self._records):
            self._remove(n, keep_merged=n in names)
        return self.detach()

    def _merge_dense(self, names: Sequence[str], dtype: torch.dtype) -> nn.Module:
        """``merge_and_detach(names, dtype=...)``: a dense model of ``dtype`` with ``names`` merged.

        Quantized layers are dequantized from their *original* codes (every adapter is unmerged first, exactly)
        into float32 where an adapter merges, the adapters are merged there in float32 (no requantization, so
        the only error is the base's own quantization), and every floating tensor is then cast to ``dtype``.
        """
        comps = {n: self.components(n) for n in names}
        bad = [f"{n}:{m}" for n, cs in comps.items() for m, c in cs.items() if not c.mergeable]
        if bad:
            raise TypeError(f"cannot merge {bad[:3]}: those components are not mergeable")
        saved = {
            n: (
                self.config(n),
                self.sites(n),
                {m: {k: v.detach().clone() for k, v in c.export_state().items()} for m, c in cs.items()},
            )
            for n, cs in comps.items()
        }
        model = self.detach()  # unmerges everything: the original quantized codes
        dequantize_for_merge(model, {m for _, sites, _ in saved.values() for m in sites}, dtype)
        dense = attach(model)
        modules = base_modules(model)
        for n, (cfg, sites, states) in saved.items():
            plan = dense.plan(cfg)
            planned = {m: kind for m, (kind, _) in plan.components.items()}
            if planned != sites:
                raise RuntimeError(
                    f"adapter {n!r} resolves to other sites on the dequantized model: {planned} != {sites}"
                )
            for m, (_, comp) in plan.components.items():
                own = comp.state_dict()
                comp.import_state({k: v for k, v in states[m].items() if k in own}, modules[m])
            dense.install(n, Plan(plan.config, plan.components))
        model = dense.merge_and_detach(list(names))
        return model.to(dtype)

    # --- hot-swapping under torch.compile ----------------------------------------------------------
    def prepare_hotswap(self, max_rank: int | None = None, names: Sequence[str] | None = None) -> None:
        """Make adapters ready to be hot-swapped (:meth:`hotswap`) in a compiled model: call before
        ``torch.compile``. Ranked components (LoRA) are zero-padded to ``max_rank`` (default: the largest rank among
        them), which leaves outputs unchanged, so any adapter of rank ``<= max_rank`` can replace them later
        without a recompile; each site keeps its scaling (the config becomes ``r=max_rank`` with alphas to match).

        Args:
            max_rank: the rank to pad to (peft's ``target_rank``).
            names: the adapters to prepare (default: all).

        Raises:
            ValueError: a component's rank exceeds ``max_rank``, or an adapter is merged or PiSSA/OLoRA-initialized.
        """
        names = list(self._records) if names is None else list(names)
        comps = {n: self.components(n) for n in names}
        for n, cs in comps.items():
            if any(c.merged for c in cs.values()):
                raise ValueError(f"adapter {n!r} is merged: unmerge it before preparing it for hot-swapping")
        ranks = [c.r for cs in comps.values() for c in cs.values() if isinstance(getattr(c, "r", None), int)]
        target = max_rank if max_rank is not None else max(ranks, default=0)
        if ranks and (not isinstance(target, int) or target < max(ranks)):
            raise ValueError(f"max_rank={max_rank!r} is below the largest rank {max(ranks)}: pass at least that")
        for n, cs in comps.items():
            padded = {site: c.scaling for site, c in cs.items() if c.pad_rank_(target)}
            if padded:
                record = self._record(n)
                record.config = record.config.padded(target, padded)
        self._route_caches.clear()

    def hotswap(self, name: str, source: str | os.PathLike, *, allow_pickle: bool = False) -> None:
        """Replace adapter ``name``'s weights in place with the adapter stored at ``source`` (any format
        :meth:`load` reads), keeping every tensor's shape and every Python setting, so a ``torch.compile``-d
        model runs the new weights without recompiling (peft's ``hotswap_adapter``, for every method whose
        shapes are fixed; LoRA ranks up to the :meth:`prepare_hotswap` rank, scalings folded into ``B``).

        ``name`` keeps its name and config; its outputs become the new adapter's. All-or-nothing: the source is
        read and every component checked before anything is copied.

        Raises:
            ValueError: different sites, method or settings (named), a larger rank than prepared, or ``name`` is
                merged. Errors of :meth:`read` for the source.
        """
        record = self._record(name)
        old = self.components(name)
        if any(c.merged for c in old.values()):
            raise ValueError(f"adapter {name!r} is merged: unmerge it before hot-swapping its weights")
        new = self.read(source, allow_pickle=allow_pickle)
        theirs = {site: comp for site, (_, comp) in new.plan.components.items()}
        if theirs.keys() != old.keys():
            missing, extra = sorted(old.keys() - theirs.keys()), sorted(theirs.keys() - old.keys())
            raise ValueError(
                f"{str(source)!r} adapts other modules than {name!r} (missing {missing[:4]}, extra {extra[:4]}): "
                "a hot-swap keeps the sites; load it as a new adapter instead"
            )
        cfg, new_cfg = record.config, new.plan.config
        if type(new_cfg) is not type(cfg):
            raise ValueError(f"{str(source)!r} is a {new_cfg.method} adapter, {name!r} a {cfg.method} adapter")
        free = ("targets", *cfg.hotswap_fields())
        differ = [
            f.name
            for f in dataclasses.fields(cfg)
            if f.name not in free and getattr(cfg, f.name) != getattr(new_cfg, f.name)
        ]
        if differ:
            raise ValueError(
                f"{str(source)!r} differs from {name!r} in {', '.join(differ)}: a hot-swap changes weights only"
            )
        states = {}
        for site, comp in old.items():
            try:
                states[site] = comp.hotswap_state(theirs[site])
            except ValueError as e:
                raise ValueError(f"cannot hot-swap {str(source)!r} into {name!r} at {site}: {e}") from None
        with torch.no_grad():
            for site, state in states.items():
                own = old[site].state_dict(keep_vars=True)
                for key, value in state.items():
                    own[key].copy_(value)
        self._route_caches.clear()

    def freeze_norm_statistics(self, enabled: bool = True) -> None:
        """Keep the base model's normalization statistics fixed while adapters train (issue 19, item 8).

        A frozen base still changes in train mode: BatchNorm (and InstanceNorm with ``track_running_stats``)
        updates its running mean/variance buffers at every forward, adapters or not, and :meth:`detach` restores
        *parameters* bit for bit, not those buffers. With ``enabled``, each such base module runs in eval mode
        (normalizing with, and never updating, its running statistics: timm's ``freeze_batch_norm``, detectron's
        ``FrozenBatchNorm``) whatever ``model.train()`` says; ``False`` removes that, and the modules follow the
        model's mode again from its next ``train()``/``eval()`` call. Not saved with adapters."""
        for module in self.model.modules():
            _set_norm_frozen(module, False)
        if enabled:
            for module in base_modules(self.model).values():
                if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
                    _set_norm_frozen(module, True)

    def detach(self) -> nn.Module:
        """Remove every adapter and hook (:meth:`freeze_norm_statistics`'s too); the model's parameters are then
        bit-identical to the original, and so is its state_dict unless the model ran in train mode without frozen
        norm statistics (BatchNorm running statistics change then, adapters or not)."""
        self.freeze_norm_statistics(False)
        for n in list(self._records):
            self._remove(n, keep_merged=False)
        for m in list(self._sites):
            self._sites[m].close()
            del self._sites[m]
        self.state.active = ()
        self._sync_parallel()
        self.model.__dict__.pop(_ATTR, None)
        return self.model

    def combine(
        self,
        new_name: str,
        names: Sequence[str],
        weights: Sequence[float] | None = None,
        method: str = "linear",
        *,
        density: float | None = None,
        r: int | None = None,
        seed: int | torch.Generator | None = None,
        **options: Any,
    ) -> None:
        """Add adapter ``new_name`` merged in weight space from adapters ``names`` (all-or-nothing).

        ``method``: ``linear``, ``cat``, ``svd``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``
        and their ``*_svd`` forms (for LoRA these equal peft's ``add_weighted_adapter`` combination types),
        ``task_arithmetic`` (exactly ``Σ w_i ΔW_i``; weight -1 negates) and ``soup`` (uniform average).
        ``weights`` default to 1 each; ``density`` in (0, 1] for ties/dare/magnitude_prune; ``r`` is the SVD
        rank; ``seed`` makes DARE's drops reproducible; ``options``: ``majority_sign_method``, ``svd_clamp``,
        ``svd_full_matrices``, ``svd_driver``. See :mod:`adapterkit.merging` and docs/merging.md.
        """
        combine_adapters(self, new_name, names, weights, method, density=density, r=r, seed=seed, **options)

    # --- files -----------------------------------------------------------------------------
    def save(self, name: str, path: str | os.PathLike) -> None:
        """Write adapter ``name`` to directory ``path`` (``adapter_config.json`` + ``adapter.safetensors``)."""
        native.save(self, name, path)

    def load(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        *,
        allow_pickle: bool = False,
        activate: bool = False,
    ) -> str:
        """Load an adapter directory written by :meth:`save`, by peft's ``save_pretrained`` or by AdapterHub's
        ``save_adapter``, or a kohya-ss / LyCORIS single ``.safetensors`` file (docs/kohya.md).

        Returns the adapter's name (``name``, else the saved name, else ``"default"``). Checks everything
        (files, shapes, base-model fingerprint) before the model is touched. Pickle files (``.bin``) are
        refused unless ``allow_pickle=True``, and are then read with ``weights_only=True``.
        """
        fmt = detect(path)
        several = getattr(fmt, "loads_several", None)
        if several is not None and several(path):  # several adapters (AdapterHub setup): the format installs
            return fmt.load(self, path, name=name, allow_pickle=allow_pickle, activate=activate)
        read = self._read_as(fmt, path, name, allow_pickle=allow_pickle)
        self.install(read.name, read.plan, activate=activate)
        return read.name

    def read(self, path: str | os.PathLike, name: str | None = None, *, allow_pickle: bool = False) -> ReadAdapter:
        """Read and check an adapter directory into components, without touching the model: the first half of
        :meth:`load` (``load`` = ``read`` + :meth:`install`).

        Everything slow happens here (file reads, parsing, planning, filling the components), so a server can
        read on another thread while forwards run, then attach the result with
        ``adapters.install(read.name, read.plan)`` between two forwards. The name is checked for syntax only
        here; ``install`` refuses it if an adapter of that name exists by then. Errors are those of ``load``.
        """
        fmt = detect(path)
        several = getattr(fmt, "loads_several", None)
        if several is not None and several(path):
            raise AdapterFileError(f"{str(path)!r} holds several adapters (an adapter setup): load it with load()")
        return self._read_as(fmt, path, name, allow_pickle=allow_pickle)

    def _read_as(self, fmt: Any, path: str | os.PathLike, name: str | None, *, allow_pickle: bool) -> ReadAdapter:
        """:meth:`read` with the format already detected (``load`` detects it once for both halves)."""
        reading = _Reading(self)
        name = fmt.load(reading, path, name=name, allow_pickle=allow_pickle, activate=False)
        if reading.read is None:  # every reader ends in ``ctl.install``; one that did not is a bug
            raise RuntimeError(f"the reader of {str(path)!r} installed nothing")
        return ReadAdapter(name, reading.read, str(path))

    def export(
        self,
        name: str,
        path: str | os.PathLike,
        format: str = "peft",
        *,
        target: str | None = None,
        rank: int | None = None,
        prefix: str | None = None,
    ) -> Any:
        """Write adapter ``name`` in another library's format (``"peft"``) or natively (``"native"``).

        ``target="vllm"`` (peft format only) writes a plain LoRA that vLLM's ``--lora-modules`` (and LoRAX)
        accept: ranks zero-padded to a ``--max-lora-rank`` choice, other mergeable methods converted by truncated
        SVD of their weight change at ``rank`` (default: the adapter's ``r``); returns the per-module report
        (:class:`adapterkit.formats.vllm.VllmExport`) and raises ``VllmExportError`` naming every module vLLM
        cannot take, writing nothing. See docs/export_vllm.md.

        ``target="diffusers"`` (LoRA and LoKr) writes ``pytorch_lora_weights.safetensors`` with keys under a
        component ``prefix`` (default ``unet``/``transformer``/``text_encoder`` by model) and the config in its
        metadata, which diffusers' ``load_lora_adapter(path, prefix=...)`` loads; returns the file's path
        (:mod:`adapterkit.formats.diffusers`).
        """
        if rank is not None and target != "vllm":
            raise ValueError("rank= only applies to target='vllm' (conversion to LoRA); drop it or add the target")
        if prefix is not None and target != "diffusers":
            raise ValueError("prefix= only applies to target='diffusers'; drop it or add the target")
        if target is None:
            writer(format).save(self, name, path)
            return None
        if target not in ("vllm", "diffusers") or format != "peft":
            raise ValueError(
                f"export target {target!r} with format {format!r}: targets are 'vllm' and 'diffusers' (format 'peft')"
            )
        if target == "diffusers":
            from .formats import diffusers

            return diffusers.export(self, name, path, prefix=prefix)
        from .formats import vllm

        return vllm.export(self, name, path, rank=rank)

    def install(self, name: str, plan: Plan, *, activate: bool = False) -> None:
        """Attach a plan whose components already hold their values (used by the format readers). Their
        float16/bfloat16 tensors become float32 unless ``autocast_adapter_dtype`` is False (plans made by
        :meth:`plan` already are; readers that build components themselves should upcast before importing).
        As with :meth:`add`, the first adapter of a model without a default becomes the default."""
        self._check_new_name(name)
        if self.autocast_adapter_dtype:
            for _, comp in plan.components.values():
                comp.upcast_()
        self._install(name, plan, base_modules(self.model))
        if activate:
            self.state.active = (name,)

    # --- summary ---------------------------------------------------------------------------
    def summary(self) -> Summary:
        """Adapters, their sites, trainable parameters and share of the base model."""
        own = {id(p) for p in self.parameters()}
        base_total = sum(p.numel() for p in self.model.parameters() if id(p) not in own)
        rows = []
        for n, rec in self._records.items():
            params = list(self.parameters(n))
            rows.append(
                {
                    "adapter": n,
                    "method": rec.config.method,
                    "sites": len(rec.kinds),
                    "params": sum(p.numel() for p in params),
                    "trainable": sum(p.numel() for p in params if p.requires_grad),
                    "active": n in self.state.active,
                    "merged": self.is_merged(n),
                }
            )
        trainable_total = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return Summary(rows, base_total, trainable_total)


@dataclasses.dataclass
class Summary:
    """Result of :meth:`Adapters.summary`; ``str()`` renders a table."""

    rows: list[dict[str, Any]]
    base_params: int
    trainable_params: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.base_params, 1)

    def __str__(self) -> str:
        head = f"{'adapter':<16} {'method':<10} {'sites':>6} {'params':>12} {'% of model':>10} {'active':>7} {'merged':>7}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            pct = 100.0 * r["params"] / max(self.base_params, 1)
            lines.append(
                f"{r['adapter']:<16} {r['method']:<10} {r['sites']:>6} {r['params']:>12,} {pct:>9.3f}% "
                f"{'yes' if r['active'] else '':>7} {'yes' if r['merged'] else '':>7}"
            )
        lines.append(
            f"base model: {self.base_params:,} parameters; trainable now: {self.trainable_params:,} "
            f"({self.trainable_percent:.3f}% of the base)"
        )
        return "\n".join(lines)


def _norm_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of :meth:`Adapters.freeze_norm_statistics`: the norm module runs in eval mode."""
    module.training = False


def _set_norm_frozen(module: nn.Module, frozen: bool) -> None:
    hooks = module._forward_pre_hooks
    for key in [k for k, h in hooks.items() if h is _norm_eval]:
        del hooks[key]
    if frozen:
        module.register_forward_pre_hook(_norm_eval)
