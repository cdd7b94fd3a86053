"""Heads owned by an adapter: a trainable copy of a module (peft's ``modules_to_save``).

A task head (``classifier``, ``score``, ...) trained with an adapter belongs to that adapter: the site
keeps a private copy, runs it on the module's call and returns its output instead of the base
module's. The base head is never modified, several adapters may each own a head, and the copy is
saved with the adapter. Merging swaps the copy's values into the base head (exactly reversible).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..component import Component
from ..targeting import CONTAINER

__all__ = ["HeadCopy", "clean_copy"]


def clean_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without adapterkit components or hooks."""
    saved = (module._modules.pop(CONTAINER, None), module._forward_hooks, module._forward_pre_hooks)
    module._forward_hooks, module._forward_pre_hooks = type(saved[1])(), type(saved[2])()
    try:
        clone = copy.deepcopy(module)
    finally:
        if saved[0] is not None:
            module._modules[CONTAINER] = saved[0]
        module._forward_hooks, module._forward_pre_hooks = saved[1], saved[2]
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


class HeadCopy(Component):
    """Replaces a module's output with that of the adapter's own copy of the module."""

    mergeable = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.head = clean_copy(module)
        self._backup: dict[str, torch.Tensor] | None = None

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        return self.head(*args, **kwargs)

    def upcast_(self, dtype: torch.dtype = torch.float32) -> None:
        """A head copy is a whole module run on the base's inputs: it keeps the base dtype (as peft's
        ``modules_to_save``, which ``autocast_adapter_dtype`` leaves alone)."""

    def _base_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        own = set(self.head.state_dict())
        return {k: v for k, v in module.state_dict(keep_vars=True).items() if k in own}

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        if self.merged:
            return
        base = self._base_state(module)
        self._backup = {k: v.detach().clone() for k, v in base.items()}
        for k, v in self.head.state_dict().items():
            base[k].data.copy_(v)
        self.merged = True

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        if not self.merged:
            return
        for k, v in self._base_state(module).items():
            v.data.copy_(self._backup[k])
        self._backup = None
        self.merged = False
