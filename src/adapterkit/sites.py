"""Site hooks: apply the active adapters at one module.

One :class:`Site` per adapted module, whatever the number of adapters on it. Components live in
``module.ak_adapters`` (a ``ModuleDict`` keyed by adapter name); the site registers one forward
hook (and a pre-hook only when some component transforms the module's input). Removing the last
component removes the hooks and the container, leaving the module exactly as it was.

Parameter overrides (LoRA on parameters, ``methods/lora_params.py``): a component with ``overrides_parameters``
changes some of the module's parameters for one call (``W + ΔW`` of MoE experts stored as 3-D tensors, which
no hook on the output can express). Its ``pre_call`` asks for it (:func:`request_override`); the site wraps the
module's ``forward`` (an instance attribute, :class:`ParameterCall`) to put the computed tensors in place of the
parameters for exactly that call, under a lock, and to put the parameters back in a ``finally`` (so errors and
interrupts cannot leave them swapped). The lock serializes calls of that module across threads (another thread's
forward would otherwise see the swapped tensors); requests are per thread, so ``use()`` scopes of concurrent
threads stay separate.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .component import Component, first_input
from .compose import apply_post, apply_pre
from .context import ForwardState
from .targeting import CONTAINER

__all__ = ["Site", "ParameterCall", "request_override"]


class Site:
    """The hooks on one module.

    Args:
        module: the adapted module.
        name: its dotted name in the model.
        state: the controller's forward state (read on every call).
    """

    def __init__(self, module: nn.Module, name: str, state: ForwardState) -> None:
        if CONTAINER in module._modules or hasattr(module, CONTAINER):
            raise RuntimeError(f"module {name!r} already has an attribute {CONTAINER!r}")
        self.module = module
        self.name = name
        self.state = state
        self.components: nn.ModuleDict = nn.ModuleDict().train(module.training)
        module.add_module(CONTAINER, self.components)
        self._post = module.register_forward_hook(self._post_hook, with_kwargs=True)
        self._pre: Any = None
        self._call: ParameterCall | None = None

    def __repr__(self) -> str:
        return f"Site({self.name!r}, {list(self.components)})"

    def add(self, adapter: str, component: Component) -> None:
        self.components[adapter] = component
        if component.has_pre and self._pre is None:
            self._pre = self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        if self._call is None and _overrides(component):
            self._call = ParameterCall(self.module)

    def remove(self, adapter: str) -> Component:
        component = self.components[adapter]
        del self.components[adapter]
        if self._pre is not None and not any(c.has_pre for c in self.components.values()):
            self._pre.remove()
            self._pre = None
        if self._call is not None and not any(_overrides(c) for c in self.components.values()):
            self._call.uninstall()
            self._call = None
        return component

    def close(self) -> None:
        """Remove hooks and the container (call once the site holds no component)."""
        self._post.remove()
        if self._pre is not None:
            self._pre.remove()
            self._pre = None
        if self._call is not None:
            self._call.uninstall()
            self._call = None
        del self.module._modules[CONTAINER]

    # hot path ------------------------------------------------------------------------------
    def _pre_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        comps = self.components._modules
        if self._call is not None:
            self._call.discard()  # a request left by a call that failed before its forward ran
        if self.state.routes is not None:
            return self._routed_pre(args, kwargs)
        changed = False
        for item in self.state.active:
            if type(item) is str:
                c = comps.get(item)
                if c is not None and c.has_pre and not c.merged:
                    args, kwargs = c.pre_call(args, kwargs)
                    changed = True
            else:
                args, kwargs, ch = apply_pre(item, comps, args, kwargs)
                changed |= ch
        return (args, kwargs) if changed else None

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        comps = self.components._modules
        if self.state.routes is not None:
            return self._routed(args, kwargs, output)
        for item in self.state.active:
            if type(item) is str:
                c = comps.get(item)
                if c is not None and c.has_post and not c.merged:
                    output = c.post_call(args, kwargs, output)
            else:
                output = apply_post(item, comps, args, kwargs, output)
        return output

    def _routed(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        """Per-row routing: one batched call when the components support it, else one call per adapter."""
        plan = self.state.routes
        table = self.components._modules
        _check_rows(plan, output, self.name, 3 if plan.uniform is not None else 1)
        if plan.uniform is not None:  # one adapter for the whole batch: its ordinary call
            c = table.get(plan.uniform)
            return c.post_call(args, kwargs, output) if c is not None and c.has_post and not c.merged else output
        comps = [table.get(a) for a in plan.adapters]
        comps = [c if c is not None and c.has_post and not c.merged else None for c in comps]
        live = [c for c in comps if c is not None]
        if not live:
            return output
        kind = type(live[0])
        if all(type(c) is kind for c in live):
            result = kind.routed_output(comps, plan, args, kwargs, output)
            if result is None:
                result = kind.routed(comps, plan, first_input(args, kwargs), output, key=self.name)
            if result is not None:
                return result
        batch = output.shape[0]
        result = output
        for (_, rows), c in zip(plan.groups, comps):
            if c is None:
                continue
            sub_args = tuple(_rows(a, rows, batch) for a in args)
            sub_kwargs = {k: _rows(v, rows, batch) for k, v in kwargs.items()}
            result = result.index_copy(0, rows, c.post_call(sub_args, sub_kwargs, output.index_select(0, rows)))
        return result

    def _routed_pre(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        """Row-wise input transforms under routing: each group of rows gets its adapter's ``pre``."""
        plan = self.state.routes
        table = self.components._modules
        if plan.uniform is None and self._call is not None:  # parameter overrides act on the whole call
            live = [c for a in plan.adapters if (c := table.get(a)) is not None and c.has_pre and not c.merged]
            kinds = {type(c) for c in live if _overrides(c)}
            if kinds:
                kind = kinds.pop()
                routed = kind.routed_call([c if type(c) is kind else None for c in live], plan, args, kwargs)
                if routed is None:
                    raise NotImplementedError(
                        f"per-row routing is not available for {kind.__name__} at {self.name!r}: it changes the "
                        "module's parameters for the whole call; run each adapter's rows in their own batch"
                    )
                return routed
        _check_rows(
            plan,
            first_input(args, kwargs) if args or kwargs else None,
            self.name,
            2 if plan.uniform is None else 3,
        )
        if plan.uniform is not None:  # one adapter for the whole batch: its ordinary call (any method)
            c = table.get(plan.uniform)
            return c.pre_call(args, kwargs) if c is not None and c.has_pre and not c.merged else None
        comps = [table.get(a) for a in plan.adapters]
        comps = [c if c is not None and c.has_pre and not c.merged else None for c in comps]
        live = [c for c in comps if c is not None]
        # model-level methods rewrite the whole call: one method may route its rows itself
        if any(type(c).pre_call is not Component.pre_call for c in live):
            kind = type(live[0])
            same = all(type(c) is kind for c in live)
            routed = kind.routed_call(comps, plan, args, kwargs) if same else None
            if routed is None:
                what = " and ".join(sorted({type(c).__name__ for c in live}))
                raise NotImplementedError(
                    f"per-row routing is not available for {what}{'' if same else ' together'} at "
                    f"{self.name or 'the model'!r}: it rewrites the whole call; run such adapters in separate "
                    "batches"
                )
            return routed
        x = first_input(args, kwargs)
        new = x
        if live and all(type(c) is type(live[0]) for c in live):
            batched = type(live[0]).routed_pre(comps, plan, x, key=(self.name, "pre"))
            if batched is not None:
                new = batched
        for name, rows in plan.groups if new is x else ():
            c = table.get(name)
            if c is None or c.merged or not c.has_pre:
                continue
            new = new.index_copy(0, rows, c.pre(x.index_select(0, rows)))
        if new is x:
            return None
        if args:
            return (new, *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: new}


def _overrides(component: Component) -> bool:
    """Whether ``component`` (or a part of a union's chain) overrides the module's parameters for a call."""
    parts = getattr(component, "parts", None)
    if parts is not None:
        return any(_overrides(p) for p in parts)
    return bool(getattr(component, "overrides_parameters", False))


_REQUESTS = threading.local()  # .pending: id(module) -> [update functions] for the module's next forward


def _pending() -> dict[int, list[Callable[[dict[str, torch.Tensor]], None]]]:
    pending = getattr(_REQUESTS, "pending", None)
    if pending is None:
        pending = _REQUESTS.pending = {}
    return pending


def request_override(module: nn.Module, update: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Ask that ``module``'s next forward in this thread runs with some parameters replaced (from a component's
    ``pre_call``). ``update(values)`` is called inside that forward with ``values``, parameter name -> the tensor
    the forward will use, holding what earlier requests of the same call put there; it sets its own entries
    (reading the current tensor as ``values.get(name, module.<name>)``), so active adapters stack in order."""
    _pending().setdefault(id(module), []).append(update)


class ParameterCall:
    """The wrapper of one module's ``forward`` that applies :func:`request_override` requests for one call.

    Installed as the instance attribute ``module.forward`` (the class's forward, and any instance ``forward``
    present before, is called inside); :meth:`uninstall` restores exactly what was there. The replacement tensors
    go into ``module._parameters`` for the duration of the call (as ``torch.func.functional_call`` does), under a
    per-module lock held for every call while installed, and the original parameters are put back in ``finally``.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._had = "forward" in module.__dict__
        self._previous = module.__dict__.get("forward")
        self._inner = module.forward
        self.lock = threading.RLock()
        module.__dict__["forward"] = self

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles get a lock of their own
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.RLock()

    def uninstall(self) -> None:
        if self.module.__dict__.get("forward") is self:
            if self._had:
                self.module.__dict__["forward"] = self._previous
            else:
                del self.module.__dict__["forward"]
        self.discard()

    def discard(self) -> None:
        """Drop this thread's requests for the module (left by a call that never reached its forward)."""
        pending = getattr(_REQUESTS, "pending", None)
        if pending:
            pending.pop(id(self.module), None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        updates = _pending().pop(id(self.module), None)
        with self.lock:
            if not updates:
                return self._inner(*args, **kwargs)
            values: dict[str, torch.Tensor] = {}
            for update in updates:
                update(values)
            params = self.module._parameters
            saved = {name: params[name] for name in values}
            try:
                params.update(values)
                return self._inner(*args, **kwargs)
            finally:
                params.update(saved)


def _check_rows(plan: Any, value: Any, where: str, min_dim: int) -> None:
    """Refuse a routed call whose batch is not the plan's (one name per row), where the plan meets the batch.

    Tensors with fewer than ``min_dim`` dimensions are not checked: on the unrouted path of a uniform plan
    (``min_dim=3``) a module may see flattened tokens (e.g. an MoE router's ``(batch * seq, d)``), which that path
    handles; a model-level pre-hook's first input is ``(batch, seq)`` ids or larger (``min_dim=2``)."""
    if isinstance(value, torch.Tensor) and value.dim() >= min_dim and value.shape[0] != plan.batch:
        raise ValueError(
            f"adapters.route() was given {plan.batch} names (one per row), but the batch at "
            f"{where or 'the model'!r} has {value.shape[0]} rows: pass exactly one adapter name (or None) per row "
            f"of the batch (expected batch size {plan.batch}; generate() with num_beams or num_return_sequences "
            "multiplies the rows)"
        )


def _rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows)
    return value
