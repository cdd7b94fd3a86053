"""Invertible adapters (MAD-X, Pfeiffer et al. 2020, "MAD-X: An Adapter-Based Framework for Multi-Task
Cross-Lingual Transfer", §2.2): a NICE coupling (Dinh et al. 2015) on the token embeddings, inverted before the
output embeddings::

    e = embed(ids): (..., d),  e = [e1 | e2]   (e1: the first d//2 features, e2: the rest)

    forward (after the input embedding)        inverse (on the input of the LM head)
        o1 = e1 + F(e2)                            e2 = o2 - G(o1)
        o2 = e2 + G(o1)                            e1 = o1 - F(e2)

``F: d - d//2 -> d//2`` and ``G: d//2 -> d - d//2`` are small bottlenecks ``Linear -> act -> Linear`` of width
``half // reduction_factor`` (AdapterHub's ``inv_adapter="nice"``, ``inv_adapter_reduction_factor=2``). MAD-X
§2.2: the invertible adapter "adapts the token-level representations" of a language, and its inverse maps the
last hidden states back before the tied output embeddings.

Sites: the ``embed`` role (every input embedding that runs: T5/BART's encoder and decoder ``embed_tokens`` share
one coupling, as both read the same vocabulary embedding), or any module returning ``(..., dim)`` given as target
with ``dim`` (AdapterHub's sites: BERT's ``embeddings``, GPT-2's ``drop`` after ``wte + wpe``), plus the model's output embeddings
(``get_output_embeddings()``: GPT-2/LLaMA/T5 ``lm_head``), where the inverse is applied to the module's input.
Models without output embeddings (classifiers) get the forward coupling only. The coupling's parameters live in
the first embedding's component; the others hold a reference, so they are trained, counted and saved once.

Init (``init_weights=True``): the last layers of ``F`` and ``G`` are zero, so the adapter starts as an exact
identity; the first layers are N(0, 0.02²) (AdapterHub initializes all of them with BERT's N(0, 0.02²), which is
not an identity). Not mergeable. Stacking several invertible adapters applies the inverses in the same order as
the couplings (``b⁻¹`` after ``a⁻¹``), which undoes the stack exactly only when one of them is the identity; MAD-X
uses one (the language adapter's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..backends import backend_for
from ..component import Component
from ..config import AdapterConfig, register
from .bottleneck import activation

PUBLIC = ("Invertible",)
__all__ = ["Invertible", "NICECoupling", "InvertibleEmbedding", "InverseHead"]


@register("invertible")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Invertible(AdapterConfig):
    """MAD-X invertible adapter on the input embeddings, inverted at the output embeddings.

    Args:
        reduction_factor: width of ``F``/``G``: ``half // reduction_factor`` (at least 1).
        non_linearity: activation inside ``F`` and ``G``.
        inverse_at_output: apply the inverse on the input of the model's output embeddings (when it has them).
        dim: the feature width ``d`` of targets that are not embedding or linear layers, e.g. the module after
            which AdapterHub applies the coupling: BERT's ``embeddings`` (after the position embeddings and the
            LayerNorm), GPT-2's ``drop`` (after ``wte + wpe``); None: read from the targets (``nn.Embedding`` /
            linear output width).
        init_weights: True: exact identity at init; False: random (for tests).
        targets: default ``["embed"]`` (modules whose output is ``(..., d)``: ``nn.Embedding`` or linear layers).
    """

    reduction_factor: float = 2
    non_linearity: str = "relu"
    inverse_at_output: bool = True
    dim: int | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        activation(self.non_linearity)
        if not self.reduction_factor > 0:
            raise ValueError(f"reduction_factor must be positive, got {self.reduction_factor!r}")
        if self.dim is not None and (isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 2):
            raise ValueError(f"dim must be an integer >= 2 (the feature width of the targets), got {self.dim!r}")

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("embed",)

    def accepts(self, module: nn.Module) -> bool:
        return _out_dim(module) is not None or self.dim is not None

    def build(self, module: nn.Module, name: str, like: torch.Tensor | None = None) -> Component:
        dim = _out_dim(module)
        if dim is None and self.dim is None:
            raise TypeError(
                f"an invertible adapter acts on token embeddings (..., d); {name!r} is a {type(module).__name__} "
                "(pass dim=<feature width> to put it after another module)"
            )
        if dim is not None and self.dim is not None and dim != self.dim:
            raise ValueError(f"{name!r} outputs {dim} features, but dim={self.dim}")
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            weight = next(module.parameters(), None) if like is None else like
        if weight is None:
            weight = torch.empty(0)
        return InvertibleEmbedding(NICECoupling(dim or self.dim, self, weight))

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        """One coupling for all embedding sites (owned by the first), and its inverse at the output embeddings."""
        like = next(modules[""].parameters(), None) if "" in modules else None
        comps = {n: self.build(modules[n], n, like) for n in targets}
        dims = {c.coupling.dim for c in comps.values()}
        if len(dims) > 1:
            raise ValueError(f"the targets of an invertible adapter must share one width, got {sorted(dims)}")
        owner = next(iter(comps.values()))
        for c in list(comps.values())[1:]:
            c.share(owner)
        if self.inverse_at_output:
            head = _output_embeddings(modules)
            if head is not None and head not in comps:
                dims_in = backend_for(modules[head]).dims(modules[head])[0]
                if dims_in == owner.coupling.dim:
                    comps[head] = InverseHead(owner)
        return comps


def _out_dim(module: nn.Module) -> int | None:
    backend = backend_for(module)
    if backend is None:
        return None
    if backend.kind == "embedding":
        return backend.dims(module)[1]
    return backend.dims(module)[1] if backend.kind == "linear" else None


def _output_embeddings(modules: Mapping[str, nn.Module]) -> str | None:
    """Name of the model's output embeddings (``get_output_embeddings()``) when it is a linear layer."""
    get = getattr(modules.get(""), "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is None:
        return None
    name = next((n for n, m in modules.items() if m is out), None)
    if name is None or getattr(backend_for(out), "kind", None) != "linear":
        return None
    return name


class NICECoupling(nn.Module):
    """The additive coupling ``(e1, e2) -> (e1 + F(e2), e2 + G(o1))`` and its inverse; ``x: (..., dim)``.

    Submodules ``F`` (``dim - dim//2 -> dim//2``) and ``G`` (``dim//2 -> dim - dim//2``), each
    ``Linear -> act -> Linear`` with hidden width ``max(1, half // reduction_factor)``.
    """

    def __init__(self, dim: int, cfg: Invertible, like: torch.Tensor) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"an invertible adapter needs at least 2 features to split, got {dim}")
        factory = {"device": like.device, "dtype": like.dtype if like.is_floating_point() else torch.float32}
        self.dim, self.split = dim, dim // 2
        a, b = self.split, dim - self.split
        self.F = self._subnet(b, a, cfg, factory)
        self.G = self._subnet(a, b, cfg, factory)
        self.random = not cfg.init_weights

    @staticmethod
    def _subnet(d_in: int, d_out: int, cfg: Invertible, factory: dict[str, Any]) -> nn.Sequential:
        width = max(1, int(d_in // cfg.reduction_factor))
        return nn.Sequential(
            nn.Linear(d_in, width, **factory), activation(cfg.non_linearity), nn.Linear(width, d_out, **factory)
        )

    @torch.no_grad()
    def reset(self) -> None:
        for net in (self.F, self.G):
            first, last = net[0], net[2]
            nn.init.normal_(first.weight, std=0.02 if not self.random else 0.5)
            nn.init.zeros_(first.bias)
            if self.random:
                nn.init.normal_(last.weight, std=0.5)
                nn.init.normal_(last.bias, std=0.1)
            else:
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.F[0].weight.dtype
        return x if x.dtype == dtype else x.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1, e2 = self._cast(x).split([self.split, self.dim - self.split], dim=-1)
        o1 = e1 + self.F(e2)
        o2 = e2 + self.G(o1)
        return torch.cat([o1, o2], dim=-1).to(x.dtype)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        o1, o2 = self._cast(y).split([self.split, self.dim - self.split], dim=-1)
        e2 = o2 - self.G(o1)
        e1 = o1 - self.F(e2)
        return torch.cat([e1, e2], dim=-1).to(y.dtype)


class InvertibleEmbedding(Component):
    """The coupling on an input embedding's output ``y: (..., d)``. Owns ``coupling`` unless :meth:`share` gave it
    another component's (then held by reference, outside this component's parameters and state_dict)."""

    def __init__(self, coupling: NICECoupling) -> None:
        super().__init__()
        self.coupling = coupling

    def share(self, owner: InvertibleEmbedding) -> None:
        del self._modules["coupling"]
        self.__dict__["coupling"] = owner.coupling

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        if "coupling" in self._modules:
            self.coupling.reset()

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.coupling(y)

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"an invertible adapter needs a module returning (..., d), got {type(y).__name__}")
        return self.coupling(y)


class InverseHead(Component):
    """The inverse coupling on the input ``x: (..., d)`` of the output embeddings (references the owner's)."""

    has_pre = True
    has_post = False

    def __init__(self, owner: InvertibleEmbedding) -> None:
        super().__init__()
        self.__dict__["coupling"] = owner.coupling

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return self.coupling.inverse(x)
