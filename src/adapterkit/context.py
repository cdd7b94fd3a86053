"""Forward state that every site of one model reads.

The state is a small plain object shared by the controller and all of its site hooks. Sites read
``state.active`` on every call; the controller replaces it (never mutates it in place), so a
compiled graph can guard on it and ``Adapters.use(...)`` can swap it for a scope.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["ForwardState"]


class ForwardState:
    """What is active for one model.

    Attributes:
        active: the active items (adapter names or composition blocks, see ``compose.py``), applied in
            this order at each site. Additive adapters (LoRA) thus sum, as in peft with several active.
        routes: per-row routing (a :class:`~adapterkit.compose.RoutePlan`), or None. When set it replaces
            ``active``; rows routed to no adapter run the base model.
        replicated: a Parallel block's inputs are already replicated (set while ``generate`` runs).
    """

    __slots__ = ("active", "routes", "replicated")

    def __init__(self) -> None:
        self.active: tuple[Any, ...] = ()
        self.routes: Any = None
        self.replicated = False

    @contextmanager
    def scoped(self, active: tuple[Any, ...]) -> Iterator[None]:
        previous = self.active
        self.active = active
        try:
            yield
        finally:
            self.active = previous

    @contextmanager
    def routed(self, routes: Any) -> Iterator[None]:
        previous = self.routes
        self.routes = routes
        try:
            yield
        finally:
            self.routes = previous
