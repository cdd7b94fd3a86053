"""Forward state that every site of one model reads.

The state is a small plain object shared by the controller and all of its site hooks. Sites read
``state.active`` on every call; the controller replaces it (never mutates it in place), so a
compiled graph can guard on it and ``Adapters.use(...)`` can swap it for a scope.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["ForwardState"]


class ForwardState:
    """What is active for one model.

    Attributes:
        active: names of the active adapters, applied in this order at each site. Parallel
            (additive) adapters sum, as in peft when several adapters are active.
        routes: per-row routing, or None. When set it replaces ``active``: a tuple of
            ``(adapter name, row indices)`` pairs; rows in no pair run the base model.
    """

    __slots__ = ("active", "routes")

    def __init__(self) -> None:
        self.active: tuple[str, ...] = ()
        self.routes: tuple[tuple[str, torch.Tensor], ...] | None = None

    @contextmanager
    def scoped(self, active: tuple[str, ...]) -> Iterator[None]:
        previous = self.active
        self.active = active
        try:
            yield
        finally:
            self.active = previous

    @contextmanager
    def routed(self, routes: tuple[tuple[str, torch.Tensor], ...]) -> Iterator[None]:
        previous = self.routes
        self.routes = routes
        try:
            yield
        finally:
            self.routes = previous
