"""What an add or a load will place on a model: :class:`Plan` (components per module, not yet attached).

Layering: this module sits below the controller and the format readers (``formats/``) and quantization
(``quant/``). The controller builds plans (``Adapters.plan``) and attaches them (``Adapters.install``); the
readers build them from files and hand them to the controller they are given, so nothing below the
controller imports it. ``adapterkit.controller.Plan`` and ``adapterkit.Plan`` re-export this class.
"""

from __future__ import annotations

import dataclasses

from .component import Component
from .config import AdapterConfig

__all__ = ["Plan", "TARGET", "EXTRA", "HEAD", "KINDS"]

# site kinds: a module the config targets, a helper component the method adds, an adapter-owned head copy
TARGET, EXTRA, HEAD = "target", "extra", "head"
KINDS = (TARGET, EXTRA, HEAD)


@dataclasses.dataclass
class Plan:
    """What adding a config would do: components per module, not yet attached.

    Attributes:
        config: the resolved config.
        components: module name -> (kind, component), kind in ``target`` / ``extra`` / ``head``.
    """

    config: AdapterConfig
    components: dict[str, tuple[str, Component]]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for _, c in self.components.values() for p in c.parameters())

    @property
    def sites(self) -> list[str]:
        return list(self.components)

    def __str__(self) -> str:
        lines = [f"{self.config.method}: {len(self.components)} sites, {self.num_params:,} parameters"]
        for name, (kind, comp) in self.components.items():
            n = sum(p.numel() for p in comp.parameters())
            lines.append(f"  {name:<60} {type(comp).__name__:<14} {kind:<6} {n:>10,}")
        return "\n".join(lines)
