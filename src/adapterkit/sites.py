"""Site hooks: apply the active adapters at one module.

One :class:`Site` per adapted module, whatever the number of adapters on it. Components live in
``module.ak_adapters`` (a ``ModuleDict`` keyed by adapter name); the site registers one forward
hook (and a pre-hook only when some component transforms the module's input). Removing the last
component removes the hooks and the container, leaving the module exactly as it was.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .component import Component
from .context import ForwardState
from .targeting import CONTAINER

__all__ = ["Site"]


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

    def __repr__(self) -> str:
        return f"Site({self.name!r}, {list(self.components)})"

    def add(self, adapter: str, component: Component) -> None:
        self.components[adapter] = component
        if component.has_pre and self._pre is None:
            self._pre = self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def remove(self, adapter: str) -> Component:
        component = self.components[adapter]
        del self.components[adapter]
        if self._pre is not None and not any(c.has_pre for c in self.components.values()):
            self._pre.remove()
            self._pre = None
        return component

    def close(self) -> None:
        """Remove hooks and the container (call once the site holds no component)."""
        self._post.remove()
        if self._pre is not None:
            self._pre.remove()
            self._pre = None
        del self.module._modules[CONTAINER]

    # hot path ------------------------------------------------------------------------------
    def _pre_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self.state.routes is not None:
            raise NotImplementedError(f"per-row routing of input-transforming adapters (at {self.name!r})")
        comps = self.components._modules
        changed = False
        for adapter in self.state.active:
            c = comps.get(adapter)
            if c is not None and c.has_pre and not c.merged:
                args, kwargs = c.pre_call(args, kwargs)
                changed = True
        return (args, kwargs) if changed else None

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        comps = self.components._modules
        if self.state.routes is not None:
            return self._routed(args, kwargs, output)
        for adapter in self.state.active:
            c = comps.get(adapter)
            if c is not None and c.has_post and not c.merged:
                output = c.post_call(args, kwargs, output)
        return output

    def _routed(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        """Per-row routing: each group of rows runs its own adapter (rows of no group stay base)."""
        comps = self.components._modules
        batch = output.shape[0]
        result = output
        for adapter, rows in self.state.routes:
            c = comps.get(adapter)
            if c is None or c.merged or not c.has_post:
                continue
            sub_args = tuple(_rows(a, rows, batch) for a in args)
            sub_kwargs = {k: _rows(v, rows, batch) for k, v in kwargs.items()}
            result = result.index_copy(0, rows, c.post_call(sub_args, sub_kwargs, output.index_select(0, rows)))
        return result


def _rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows)
    return value
