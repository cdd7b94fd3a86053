"""HyperFormer++: one shared hypernetwork generates every site's bottleneck adapter from task, layer and position
embeddings (Karimi Mahabadi et al. 2021, "Parameter-efficient Multi-task Fine-tuning for Transformers via Shared
Hypernetworks", §2.3-2.4), and MAD-G-style generation from a given task/language vector (Ansell et al. 2021,
"MAD-G: Multilingual Adapter Generation for Efficient Cross-Lingual Transfer", §3) as a variant of the same
component.

For a row of task ``τ`` at the adapter in layer ``i`` and position ``j`` (e.g. after attention / after the FFN)::

    z_τ  = E_task[τ]                        source="task_embedding": a learned task embedding (t-dim)
    z_τ  = V v_τ + c                        source="vector": a learned projection of a given vector v_τ (MAD-G's
                                            typological language vector; ``set_task_vectors``)
    I    = LN(h_I([z_τ ; l_i ; p_j]))        task projector: Linear(3t -> hidden) - ReLU - Linear(hidden -> p), then a
                                            LayerNorm (the authors' ``unique_hyper_net_layer_norm``); l_i, p_j learned
    D    = W^D I + b^D   (m × d)            the adapter's down projection weight (its bias likewise),
    U    = W^U I + b^U   (d × m)            the up projection,
    γ, β = W^γ I + b^γ,  W^β I + b^β        the adapter's LayerNorm (``generate_layernorm``; §2.2 "task conditional
                                            layer normalization")

and the site computes the bottleneck adapter ``adapter`` (an :class:`~adapterkit.methods.bottleneck.Bottleneck`
config: placement, ``hook``, sizes, activation, scaling, norms, dropout) with those weights: the same components as
``ak.Bottleneck``, their projections (and norms) generated. Every site of the adapter shares the one hypernetwork
(a :class:`~adapterkit.component.Bank`: the embeddings, projector and generators are saved once).

Layer ids count the distinct layers of the adapted sites in model order (an encoder-decoder's decoder layers come
after its encoder's, so they get their own embeddings; the authors' T5 code keeps one hypernetwork per stack).
Position ids name the adapter's place inside its layer by the profile role of the site (``attn.sublayer``,
``cross.sublayer``, ``ffn.sublayer``; ``attn.out``, ``ffn.down``, ``ffn``), else by its path inside the layer.

Task ids: one per row (``model(**batch, task_ids=ids)``, ``with adapters.tasks(ids):``, ``generate(..., task_ids=)``;
see :mod:`adapterkit.context`); ``default_task`` for rows without ids; ``n_tasks=1`` needs none. A batch mixing
tasks generates the weights once per distinct task in the batch and applies each row its task's (a batched matmul
over the rows' gathered weights); a batch of one task runs the plain adapter's ``F.linear``. Without autograd
(serving, decoding) a site keeps the weights it generated for the latest set of tasks and reuses them while every
hypernetwork tensor has the same storage and version (optimizer steps, in-place edits, loading and ``.to()``
regenerate).

:func:`materialize` turns the adapter generated for one task (or for a new vector: MAD-G's zero-shot generation
for an unseen language) into a plain ``ak.Bottleneck`` adapter at the same sites, which saves, loads and exports as
such with equal outputs.

Init (``init_weights=True``): as the authors' code (task, layer and position embeddings N(0, 1); projector and
down generators N(0, 10⁻²) with zero biases), except that the up projection's generators are zero, so the adapted
model starts exactly as the base model, and β's generator is zero; γ's is N(0, 10⁻²) without bias as the authors'
(γ starts small: the LayerNorm on the adapter's output rescales whatever the up projection gives to unit variance, so
γ alone sets the size of the adapter's contribution; a γ near 1 would make it unit-sized at every site from the
first step on). Not mergeable (weights per row); per-row routing of
adapters works (one call per adapter), with task ids only one adapter at a time (the ids count the whole batch).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..component import Bank, Component, grad_epoch
from ..config import AdapterConfig, register
from ..context import rows_task_ids, task_ids
from ..targeting import TargetError, base_modules
from .bottleneck import Bottleneck, ParallelBottleneck, SequentialBottleneck, _BottleneckBase, _layer_path
from .bottleneck_sublayer import SublayerBottleneck

PUBLIC = ("HyperFormer",)
__all__ = [
    "HyperFormer",
    "Source",
    "HyperNetwork",
    "GeneratedLinear",
    "GeneratedLayerNorm",
    "materialize",
    "set_task_vectors",
]

# HyperFormer++'s adapter (rabeehk/hyperformer, configs/hyperformer++.json and AdapterConfig): after the attention
# and the feed-forward sub-layers, reduction factor 32, gelu_new, a (generated) LayerNorm on the adapter's output
DEFAULT_ADAPTER = Bottleneck(placement="houlsby", reduction_factor=32, non_linearity="gelu_new", ln_after=True)
_NORMS = ("ln_before", "ln_after")
# roles that name an adapter's position inside a layer, in the order position ids are given
_POSITION_ROLES = ("attn.sublayer", "cross.sublayer", "ffn.sublayer", "attn.out", "ffn.down", "ffn")


class Source(str, enum.Enum):
    """Where the task code ``z_τ`` comes from."""

    TASK_EMBEDDING = "task_embedding"  # a learned embedding per task id (HyperFormer++)
    VECTOR = "vector"  # a learned projection of a given vector per task id (MAD-G)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@register("hyperformer")
@dataclasses.dataclass(frozen=True, kw_only=True)
class HyperFormer(AdapterConfig):
    """Bottleneck adapters generated per task by one shared hypernetwork (HyperFormer++), or from given vectors
    (MAD-G).

    Args:
        n_tasks: number of tasks (rows carry task ids in ``[0, n_tasks)``).
        adapter: the generated adapter (an ``ak.Bottleneck`` config without Compacter; its ``targets``/``exclude``/
            ``layers``/``heads`` and ``init_weights`` must stay unset: give them to HyperFormer). Default: Houlsby
            placement, reduction factor 32, ``gelu_new``, ``ln_after`` (the authors' HyperFormer++).
        source: ``"task_embedding"`` (a learned embedding per task) or ``"vector"`` (MAD-G: a learned projection of
            a given vector per task, set with :func:`set_task_vectors`).
        vector_dim: size of the given vectors (``source="vector"`` only; MAD-G's URIEL vectors have 289).
        task_dim: ``t``, size of the task code and of the layer and position embeddings (authors: 64).
        hidden_dim: hidden size of the task projector (authors' ``task_hidden_dim``: 128).
        projected_dim: ``p``, size of the projected embedding ``I`` the generators read (authors: 64).
        generate_layernorm: generate the adapter's LayerNorm γ/β (``ln_before``/``ln_after``, which the adapter
            must have) from ``I``; False keeps them per-site parameters.
        default_task: task id of rows when no ids are given (None: ids required unless ``n_tasks=1``).
        init_weights: True: the adapted model starts as the base model (zero up generators); False: random.
        targets: default: the adapter's default targets.
    """

    needs_task_ids: ClassVar[bool] = True

    n_tasks: int = 1
    adapter: AdapterConfig = DEFAULT_ADAPTER
    source: Source = Source.TASK_EMBEDDING
    vector_dim: int | None = None
    task_dim: int = 64
    hidden_dim: int = 128
    projected_dim: int = 64
    generate_layernorm: bool = True
    default_task: int | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            object.__setattr__(self, "source", Source(self.source))
        except ValueError:
            raise ValueError(
                f"unknown HyperFormer source {self.source!r}; choose one of {[s.value for s in Source]}"
            ) from None
        for field in ("n_tasks", "task_dim", "hidden_dim", "projected_dim"):
            if not _positive_int(getattr(self, field)):
                raise ValueError(
                    f"HyperFormer {field} must be a positive integer, got {field}={getattr(self, field)!r}"
                )
        if self.source is Source.VECTOR and not _positive_int(self.vector_dim):
            raise ValueError(
                f"HyperFormer source='vector' needs vector_dim, the size of the given task vectors (a positive "
                f"integer), got {self.vector_dim!r}"
            )
        if self.source is Source.TASK_EMBEDDING and self.vector_dim is not None:
            raise ValueError("HyperFormer vector_dim is for source='vector'; drop it or set source='vector'")
        if self.default_task is not None and (
            not isinstance(self.default_task, int)
            or isinstance(self.default_task, bool)
            or not 0 <= self.default_task < self.n_tasks
        ):
            raise ValueError(
                f"HyperFormer default_task must be a task id in [0, n_tasks={self.n_tasks}) or None, got "
                f"{self.default_task!r}"
            )
        adapter = self.adapter
        if not isinstance(adapter, Bottleneck):
            raise TypeError(
                f"HyperFormer generates bottleneck adapters: adapter must be an ak.Bottleneck config, got "
                f"{type(adapter).__name__}"
            )
        placed = [f for f in ("targets", "exclude", "layers", "heads") if getattr(adapter, f) not in (None, ())]
        if placed:
            raise ValueError(
                f"HyperFormer: set {', '.join(placed)} on HyperFormer, not on its adapter config (the adapter "
                "describes what is generated; where it acts is HyperFormer's)"
            )
        if not adapter.init_weights:
            raise ValueError("HyperFormer: set init_weights on HyperFormer, not on its adapter config")
        if adapter.phm_dim is not None:
            raise ValueError("HyperFormer does not generate Compacter (PHM) projections; use phm_dim=None")
        if self.generate_layernorm and not (adapter.ln_before or adapter.ln_after):
            raise ValueError(
                "HyperFormer generate_layernorm=True generates the adapter's LayerNorm, but the adapter has none: "
                "give it ln_after=True (and/or ln_before=True), or set generate_layernorm=False"
            )

    # --- the method interface -------------------------------------------------------------
    def default_targets(self, roles: Mapping[str, Any]) -> Sequence[Any]:
        return self.adapter.default_targets(roles)

    def accepts(self, module: nn.Module) -> bool:
        return self.adapter.accepts(module)

    def plain_config(self) -> Bottleneck:
        """The plain adapter one task's generated adapter is (:func:`materialize`): the adapter config at
        HyperFormer's sites."""
        return self.adapter.replace(
            targets=self.targets, exclude=self.exclude, layers=self.layers, heads=self.heads, init_weights=True
        )

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        """The adapter's own components (placement, residual/FFN-input taps, AdapterDrop), each bottleneck rebuilt
        as its generated counterpart sharing one :class:`HyperNetwork`."""
        comps = self.adapter.replace(init_weights=True).build_all(modules, targets, select)
        plain = {n: c for n, c in comps.items() if isinstance(c, _BottleneckBase)}
        shapes = {(c.in_dim, c.out_dim, c.size) for c in plain.values()}
        if len(shapes) != 1:
            raise TargetError(
                f"HyperFormer generates one adapter shape for every site, but these sites have (in, out, bottleneck) "
                f"sizes {sorted(shapes)}; restrict targets to sites of one hidden size"
            )
        (in_dim, out_dim, size) = shapes.pop()
        layers = list(dict.fromkeys(_layer_path(n) for n in plain))
        positions, position_names = _positions(list(plain), select)
        like = next(iter(plain.values())).down.weight
        bank = HyperNetwork(self, in_dim, out_dim, size, layers, position_names, like)
        out: dict[str, Component] = {}
        for n, c in comps.items():
            if isinstance(c, _BottleneckBase):
                out[n] = _generated(c, n, self, bank, layers.index(_layer_path(n)), positions[n])
            else:
                out[n] = c
        return out


def _positions(names: list[str], select: Callable[[Sequence[Any]], list[str]]) -> tuple[dict[str, int], list[str]]:
    """Position id of each site inside its layer, and the position names (see the module docstring)."""
    key: dict[str, str] = {}
    for role in _POSITION_ROLES:
        try:
            found = select([role])
        except (TargetError, ValueError):
            continue
        for n in found:
            if n in names:
                key.setdefault(n, role)

    def inner(n: str) -> str:
        return n[len(_layer_path(n)) :].lstrip(".") or n

    for n in names:
        key.setdefault(n, inner(n))
    # two sites of one layer with one role (T5's self- and cross-attention output projections are both 'attn.out'):
    # that role's sites are told apart by their paths inside the layer, everywhere
    counts = Counter((_layer_path(n), key[n]) for n in names)
    clash = {k for (_, k), c in counts.items() if c > 1}
    for n in names:
        if key[n] in clash:
            key[n] = f"{key[n]}:{inner(n)}"
    seen = list(dict.fromkeys(key[n] for n in names))  # roles in _POSITION_ROLES order, then paths as met
    rank = {r: i for i, r in enumerate(_POSITION_ROLES)}
    order = sorted(seen, key=lambda k: (rank.get(k.split(":")[0], len(rank)), seen.index(k)))
    return {n: order.index(key[n]) for n in names}, order


class HyperNetwork(Bank):
    """The shared hypernetwork of one HyperFormer adapter (see the module docstring for the equations).

    Parameters: ``task_embedding: (n_tasks, t)`` (source ``task_embedding``) or buffer ``task_vectors: (n_tasks,
    vector_dim)`` and ``vector_proj`` (``vector_dim -> t``; source ``vector``); ``layer_embedding: (n_layers, t)``,
    ``position_embedding: (n_positions, t)``; ``projector`` (``3t -> hidden -> p``) and ``norm`` (``p``); generators
    ``generators[<name>]: p -> size`` for ``down_weight`` (``m·d``), ``down_bias`` (``m``), ``up_weight`` (``d·m``),
    ``up_bias`` (``d``) and, with ``generate_layernorm``, ``ln_before_weight``/``_bias`` (``d_in``) and
    ``ln_after_weight``/``_bias`` (``d_out``) for the norms the adapter has.
    """

    def __init__(
        self,
        cfg: HyperFormer,
        in_dim: int,
        out_dim: int,
        size: int,
        layers: list[str],
        positions: list[str],
        like: torch.Tensor,
    ) -> None:
        super().__init__()
        f = {"device": like.device, "dtype": like.dtype if like.is_floating_point() else torch.float32}
        t, p = cfg.task_dim, cfg.projected_dim
        self.source, self.n_tasks = cfg.source, cfg.n_tasks
        self.in_dim, self.out_dim, self.size = in_dim, out_dim, size
        self.layer_names, self.position_names = list(layers), list(positions)
        if cfg.source is Source.VECTOR:
            self.register_buffer("task_vectors", torch.zeros(cfg.n_tasks, cfg.vector_dim, **f))
            self.vector_proj = nn.Linear(cfg.vector_dim, t, **f)
        else:
            self.task_embedding = nn.Parameter(torch.empty(cfg.n_tasks, t, **f))
        self.layer_embedding = nn.Parameter(torch.empty(len(layers), t, **f))
        self.position_embedding = nn.Parameter(torch.empty(len(positions), t, **f))
        self.projector = nn.Sequential(
            nn.Linear(3 * t, cfg.hidden_dim, **f), nn.ReLU(), nn.Linear(cfg.hidden_dim, p, **f)
        )
        self.norm = nn.LayerNorm(p, eps=1e-6, **f)
        sizes = {"down_weight": size * in_dim, "down_bias": size, "up_weight": out_dim * size, "up_bias": out_dim}
        adapter: Bottleneck = cfg.adapter  # type: ignore[assignment]
        self.norms = tuple(
            ln for ln in _NORMS if cfg.generate_layernorm and getattr(adapter, ln)
        )  # the norms generated
        for ln in self.norms:
            dim = in_dim if ln == "ln_before" else out_dim
            sizes[f"{ln}_weight"] = sizes[f"{ln}_bias"] = dim
        self.generators = nn.ModuleDict({k: nn.Linear(p, n, **f) for k, n in sizes.items()})
        self._random = not cfg.init_weights

    def extra_repr(self) -> str:
        return (
            f"source={self.source.value}, n_tasks={self.n_tasks}, layers={len(self.layer_names)}, "
            f"positions={self.position_names}, adapter {self.in_dim} -> {self.size} -> {self.out_dim}"
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.layer_embedding.dtype

    @torch.no_grad()
    def reset(self) -> None:
        """The init of the module docstring (``init_weights=False``: every generator random, the generated
        projections of the size a random ``ak.Bottleneck(init_weights=False)`` has)."""
        random, p = self._random, self.norm.normalized_shape[0]
        if self.source is Source.VECTOR:
            self.vector_proj.reset_parameters()
        else:
            nn.init.normal_(self.task_embedding)
        nn.init.normal_(self.layer_embedding)
        nn.init.normal_(self.position_embedding)
        for lin in (self.projector[0], self.projector[2]):
            nn.init.normal_(lin.weight, std=1e-2)
            nn.init.zeros_(lin.bias)
        self.norm.reset_parameters()
        # the generated tensor's std is about sqrt(p) times its generator's (I has unit-variance entries)
        for name, lin in self.generators.items():
            nn.init.zeros_(lin.bias)
            if name == "down_weight":
                std = 0.3 / math.sqrt(self.in_dim * p) if random else 1e-2
            elif name == "up_weight":
                std = 0.3 / math.sqrt(self.size * p) if random else 0.0
            elif name.endswith("_weight") and name.startswith("ln"):  # γ: small, as the authors' (no bias)
                std = 0.1 / math.sqrt(p) if random else 1e-2
            elif name.startswith("ln") or name == "up_bias":  # β, the up bias: zero unless random
                std = 0.1 / math.sqrt(p) if random else 0.0
            else:  # down bias
                std = 0.1 / math.sqrt(p) if random else 1e-2
            nn.init.normal_(lin.weight, std=std) if std else nn.init.zeros_(lin.weight)

    def task_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """``z_τ: (T, t)`` for task ids ``(T,)``."""
        if self.source is Source.VECTOR:
            return self.vector_proj(self.task_vectors[ids])
        return self.task_embedding[ids]

    def vector_codes(self, vectors: torch.Tensor) -> torch.Tensor:
        """``z: (T, t)`` for given vectors ``(T, vector_dim)`` (source ``vector``)."""
        if self.source is not Source.VECTOR:
            raise ValueError(
                "this HyperFormer adapter reads learned task embeddings (source='task_embedding'), "
                "not vectors; pass a task id"
            )
        return self.vector_proj(vectors.to(self.vector_proj.weight))

    def generate(self, codes: torch.Tensor, layer: int, position: int) -> dict[str, torch.Tensor]:
        """The adapter weights at (``layer``, ``position``) for task codes ``(T, t)``: ``down_weight: (T, m, d_in)``,
        ``down_bias: (T, m)``, ``up_weight: (T, d_out, m)``, ``up_bias: (T, d_out)`` and the generated norms'
        ``<ln>_weight`` / ``<ln>_bias``: ``(T, d)``."""
        n = codes.shape[0]
        emb = torch.cat(
            [codes, self.layer_embedding[layer].expand(n, -1), self.position_embedding[position].expand(n, -1)], -1
        )
        hidden = self.norm(self.projector(emb))  # I: (T, p)
        out = {k: g(hidden) for k, g in self.generators.items()}
        out["down_weight"] = out["down_weight"].view(n, self.size, self.in_dim)
        out["up_weight"] = out["up_weight"].view(n, self.out_dim, self.size)
        return out


class GeneratedLinear(nn.Module):
    """A linear layer whose weights its component sets before each call (``current``): ``weight: (T, out, in)``,
    ``bias: (T, out)`` for ``T`` distinct tasks and the task index of each row ``(batch,)``. ``x: (batch, ..., in)``
    -> ``(batch, ..., out)``; one task: ``F.linear`` (as ``nn.Linear``), several: one ``baddbmm`` over the rows'
    gathered weights. No parameters."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.current: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, generated"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.current is None:
            raise RuntimeError("a generated projection was called before its component generated its weights")
        w, b, rows = self.current
        if w.shape[0] == 1:
            return F.linear(x, w[0], b[0])
        batch = x.shape[0]
        y = torch.baddbmm(b[rows].unsqueeze(1), x.reshape(batch, -1, self.in_features), w[rows].transpose(1, 2))
        return y.reshape(*x.shape[:-1], self.out_features)


class GeneratedLayerNorm(nn.Module):
    """A LayerNorm over the last dimension (eps 1e-5, as ``nn.LayerNorm``) whose γ, β (``(T, d)``) and row task
    indices its component sets before each call (``current``). No parameters."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.current: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps:g}, generated"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.current is None:
            raise RuntimeError("a generated LayerNorm was called before its component generated its weights")
        g, b, rows = self.current
        if g.shape[0] == 1:
            return F.layer_norm(x, (self.dim,), g[0], b[0], self.eps)
        shape = (x.shape[0], *([1] * (x.dim() - 2)), self.dim)
        return F.layer_norm(x, (self.dim,), None, None, self.eps) * g[rows].view(shape) + b[rows].view(shape)


class _Generated:
    """What the generated bottleneck components add to :class:`~adapterkit.methods.bottleneck._BottleneckBase`'s:
    the shared hypernetwork (``hypernet``), this site's layer and position ids, generated ``down``/``up`` (and norms),
    generation at every call of ``branch``."""

    hypernet: HyperNetwork
    cfg: Any
    down: GeneratedLinear
    up: GeneratedLinear

    def _attach(self, hyper_cfg: HyperFormer, bank: HyperNetwork, layer: int, position: int) -> None:
        self.hyper_cfg = hyper_cfg
        self.share(bank, "hypernet")  # type: ignore[attr-defined]
        self.layer_id, self.position_id = layer, position
        self.down = GeneratedLinear(self.in_dim, self.size)  # type: ignore[attr-defined]
        self.up = GeneratedLinear(self.size, self.out_dim)  # type: ignore[attr-defined]
        for ln in bank.norms:
            setattr(self, ln, GeneratedLayerNorm(self.in_dim if ln == "ln_before" else self.out_dim))  # type: ignore[attr-defined]

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        """The hypernetwork is initialized once, by its owner (the first site)."""
        if self.hypernet.owner is self:
            self.hypernet.reset()

    def _cast(self, h: torch.Tensor) -> torch.Tensor:
        dtype = self.hypernet.dtype
        return h if h.dtype == dtype else h.to(dtype)

    def _ids(self, rows: int, device: torch.device) -> torch.Tensor:
        cfg = self.hyper_cfg
        if task_ids() is None and (cfg.default_task is not None or cfg.n_tasks == 1):
            return torch.full((rows,), cfg.default_task or 0, dtype=torch.long, device=device)
        ids = rows_task_ids(rows, device, f"HyperFormer (adapter with n_tasks={cfg.n_tasks})")
        if (
            ids.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and rows
            and int(ids.max()) >= cfg.n_tasks
        ):
            raise ValueError(
                f"task id {int(ids.max())} is out of range: this HyperFormer adapter has n_tasks={cfg.n_tasks}"
            )
        return ids

    def generated(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """This site's adapter weights for task codes ``(T, t)`` (:meth:`HyperNetwork.generate`)."""
        return self.hypernet.generate(codes, self.layer_id, self.position_id)

    def _generate(self, rows: int) -> None:
        bank = self.hypernet
        device = bank.layer_embedding.device
        ids = self._ids(rows, device)
        tasks, inverse = torch.unique(ids, return_inverse=True)  # weights per distinct task, not per row
        w = self._cached(tasks)
        if w is None:
            w = self.generated(bank.task_codes(tasks))
            if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
                self.__dict__["_generation_cache"] = (self._cache_key(tasks), w)
        self.down.current = (w["down_weight"], w["down_bias"], inverse)
        self.up.current = (w["up_weight"], w["up_bias"], inverse)
        for ln in bank.norms:
            getattr(self, ln).current = (w[f"{ln}_weight"], w[f"{ln}_bias"], inverse)

    def _cache_key(self, tasks: torch.Tensor) -> tuple[Any, ...] | None:
        """The distinct tasks and every hypernetwork tensor's storage and version (in-place updates, optimizer steps,
        loading and ``.to()`` all change it); None for tensors without a version counter (inference tensors)."""
        bank = self.hypernet
        tensors = [*bank.parameters(), *bank.buffers()]
        if any(t.is_inference() for t in tensors):
            return None
        return (tuple(tasks.tolist()), grad_epoch(), tuple((t.data_ptr(), t._version, t.dtype) for t in tensors))

    def _cached(self, tasks: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Without autograd (serving, decoding) the weights generated for the same tasks and the same hypernetwork
        are reused: a decode step does not regenerate every site's adapter."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            self.__dict__.pop("_generation_cache", None)
            return None
        cache = self.__dict__.get("_generation_cache")
        if cache is None or cache[0] is None or cache[0] != self._cache_key(tasks):
            return None
        return cache[1]

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        self._generate(h.shape[0])
        return super().branch(h)  # type: ignore[misc]


class HyperSequentialBottleneck(_Generated, SequentialBottleneck):
    """A generated sequential bottleneck on a module's output (``hook="projection"``)."""


class HyperParallelBottleneck(_Generated, ParallelBottleneck):
    """A generated parallel bottleneck (``hook="projection"``)."""


class HyperSublayerBottleneck(_Generated, SublayerBottleneck):
    """A generated bottleneck on a residual sub-layer (``hook="sublayer"``)."""


def _generated(plain: _BottleneckBase, name: str, cfg: HyperFormer, bank: HyperNetwork, layer: int, position: int):
    """The generated counterpart of a plain bottleneck component (same arrangement; its taps' holders kept)."""
    adapter = plain.cfg
    like = plain.down.weight
    if isinstance(plain, SublayerBottleneck):
        comp: Any = HyperSublayerBottleneck(
            adapter,
            plain.in_dim,
            like,
            name,
            parallel=plain.parallel,
            norm=plain.norm,
            residual=plain.holder.source,
        )
        comp.holder = plain.holder  # the residual tap writes into this holder
    elif isinstance(plain, ParallelBottleneck):
        comp = HyperParallelBottleneck(adapter, plain.in_dim, plain.out_dim, like, name)
        comp.holder = plain.holder  # the FFN-input tap writes into this holder
    elif isinstance(plain, SequentialBottleneck):
        comp = HyperSequentialBottleneck(adapter, plain.in_dim, like, name)
    else:  # pragma: no cover - every bottleneck component is one of the three
        raise TypeError(f"unexpected bottleneck component {type(plain).__name__} at {name!r}")
    comp.layer_drop = plain.layer_drop
    comp._attach(cfg, bank, layer, position)
    return comp


# --- using it ---------------------------------------------------------------------------------------------------
def _hyper_components(adapters: Any, name: str) -> tuple[HyperFormer, dict[str, Component], HyperNetwork]:
    cfg = adapters.config(name)
    if not isinstance(cfg, HyperFormer):
        raise TypeError(f"adapter {name!r} is {type(cfg).__name__}, not HyperFormer")
    comps = adapters.components(name)
    bank = next(c.hypernet for c in comps.values() if isinstance(c, _Generated))
    return cfg, comps, bank


@torch.no_grad()
def set_task_vectors(adapters: Any, name: str, vectors: Any) -> None:
    """Give a ``source="vector"`` HyperFormer adapter its task vectors: ``(n_tasks, vector_dim)`` (row ``τ`` is task
    ``τ``'s vector, e.g. a language's typological URIEL vector for MAD-G). Saved with the adapter."""
    cfg, _, bank = _hyper_components(adapters, name)
    if cfg.source is not Source.VECTOR:
        raise ValueError(f"adapter {name!r} learns task embeddings (source='task_embedding'); it has no vectors")
    v = torch.as_tensor(vectors, dtype=bank.task_vectors.dtype)
    if tuple(v.shape) != tuple(bank.task_vectors.shape):
        raise ValueError(
            f"task vectors must have shape (n_tasks, vector_dim) = {tuple(bank.task_vectors.shape)}, "
            f"got {tuple(v.shape)}"
        )
    bank.task_vectors.copy_(v.to(bank.task_vectors.device))


def materialize(adapters: Any, name: str, task: int | None = None, *, vector: Any = None, into: str) -> str:
    """Install the adapter HyperFormer adapter ``name`` generates for one task as a plain ``ak.Bottleneck`` adapter
    ``into`` (the adapter config at the same sites, ``hook`` and placement included), which saves, exports and loads
    as such and gives the outputs the HyperFormer adapter gives rows of that task.

    Args:
        task: a task id in ``[0, n_tasks)``.
        vector: instead of ``task`` (``source="vector"`` only): a ``(vector_dim,)`` vector, e.g. an unseen
            language's (MAD-G's zero-shot generation).
        into: the new adapter's name.

    Returns:
        ``into``.
    """
    cfg, comps, bank = _hyper_components(adapters, name)
    if (task is None) == (vector is None):
        raise ValueError("materialize needs exactly one of task= (a task id) and vector= (source='vector' only)")
    if into in adapters:
        raise ValueError(f"an adapter named {into!r} already exists; pick another name for into=")
    device = bank.layer_embedding.device
    with torch.no_grad():
        if vector is not None:
            v = torch.as_tensor(vector, dtype=bank.dtype, device=device)
            if v.dim() != 1 or cfg.vector_dim is None or v.shape[0] != cfg.vector_dim:
                raise ValueError(
                    f"vector must have shape ({cfg.vector_dim},) (vector_dim), got {tuple(v.shape)}"
                    if cfg.vector_dim is not None
                    else "this HyperFormer adapter learns task embeddings (source='task_embedding'); pass task="
                )
            codes = bank.vector_codes(v[None])
        else:
            if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < cfg.n_tasks:
                raise ValueError(f"task must be a task id in [0, n_tasks={cfg.n_tasks}), got {task!r}")
            codes = bank.task_codes(torch.tensor([task], device=device))
        states: dict[str, dict[str, torch.Tensor]] = {}
        for site, comp in comps.items():
            state = {k: v.clone() for k, v in comp.export_state().items() if not k.startswith("hypernet.")}
            if isinstance(comp, _Generated):
                w = comp.generated(codes)
                state.update({"down.weight": w["down_weight"][0], "down.bias": w["down_bias"][0]})
                state.update({"up.weight": w["up_weight"][0], "up.bias": w["up_bias"][0]})
                for ln in bank.norms:
                    state[f"{ln}.weight"], state[f"{ln}.bias"] = w[f"{ln}_weight"][0], w[f"{ln}_bias"][0]
            states[site] = state
    plan = adapters.plan(cfg.plain_config())
    if set(plan.components) != set(comps):
        raise RuntimeError(
            f"the plain adapter of {name!r} would sit at other modules than the generated one "
            f"({sorted(set(plan.components) ^ set(comps))[:5]}); report this"
        )
    modules = base_modules(adapters.model)
    for site, (_, comp) in plan.components.items():
        comp.initialize(modules[site])
        comp.import_state(states[site], modules[site])
    adapters.install(into, plan)
    return into
