"""Forward state that every site of one model reads.

The state is a small plain object shared by the controller and all of its site hooks. Sites read
``state.active`` on every call; the controller replaces it (never mutates it in place), so a
compiled graph can guard on it and ``Adapters.use(...)`` can swap it for a scope.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ForwardState"]


class ForwardState:
    """What is active for one model.

    Attributes:
        active: names of the active adapters, applied in this order at each site. Parallel
            (additive) adapters sum, as in peft when several adapters are active.
    """

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active: tuple[str, ...] = ()

    @contextmanager
    def scoped(self, active: tuple[str, ...]) -> Iterator[None]:
        previous = self.active
        self.active = active
        try:
            yield
        finally:
            self.active = previous
