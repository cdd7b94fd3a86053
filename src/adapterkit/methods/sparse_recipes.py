"""Recipes that choose sparse deltas: LT-SFT and diff pruning, and the sum of sparse adapters.

Both produce a :class:`~adapterkit.methods.sparse_delta.SparseDelta` adapter (indices + values per targeted weight;
saved sparse, mergeable, summed with other active adapters).

**LT-SFT** (Ansell et al. 2022, "Composable Sparse Fine-Tuning for Cross-Lingual Transfer", §3, Lottery-Ticket
Sparse Fine-Tuning), :func:`lt_sft`:

1. full fine-tuning of the targeted base weights (and the adapter's heads) from ``θ⁽⁰⁾`` to ``θ⁽¹⁾``;
2. keep the ``K`` entries with the largest ``|θ⁽¹⁾ − θ⁽⁰⁾|`` over *all* targeted weights together (one global
   threshold, as the authors' ``unfreeze_k_most_changed_params``);
3. reset every weight (and head) to ``θ⁽⁰⁾`` bit for bit;
4. fine-tune only those ``K`` entries (the adapter's ``values``: the gradient of an entry equals that of the masked
   weight entry, so this is the paper's masked fine-tuning) with the heads.

A language SFT and a task SFT compose by addition, ``θ + φ_L + φ_T``: activate both (``adapters.activate("lang",
"task")``; sparse deltas are additive, so the outputs are those of the summed weights) or make one adapter of the sum
(:func:`combine_sparse`). Train the task SFT with the source-language SFT active (``with_active=("lang",)``), as the
paper does, then swap in the target language's. ``adapters.combine`` (merging.py) cannot merge sparse adapters with
different positions (their integer ``indices`` differ); :func:`combine_sparse` does.

**Diff pruning** (Guo et al. 2021, "Parameter-Efficient Transfer Learning with Diff Pruning", §3), :class:`DiffPruning`
+ :func:`project_to_sparse` (or the whole recipe, :func:`diff_pruning`): a dense diff ``δ = z ⊙ w`` per targeted
weight with hard-concrete gates ``z`` (Louizos et al. 2018, "Learning Sparse Neural Networks through L0
Regularization", §2.2–2.3, which Guo et al. §3.2 adopt)::

    u ~ U(0, 1)      s = σ((log u − log(1 − u) + log α) / β)      s̄ = s (ζ − γ) + γ      z = min(1, max(0, s̄))

trained with the expected-L0 penalty (Louizos Eq. 12) ``λ Σ_i σ(log α_i − β log(−γ/ζ))`` (``adapters.aux_loss()``),
evaluated with the deterministic gate (Louizos Eq. 13) ``ẑ = min(1, max(0, σ(log α)(ζ − γ) + γ))``, then projected
onto the L0 ball: keep the ``K = density · n`` largest ``|ẑ ⊙ w|`` over all targeted weights (Guo et al. §3.3,
magnitude pruning to an exact sparsity), optionally fine-tuned with that mask fixed. Defaults ``β = 2/3, γ = −0.1,
ζ = 1.1`` are Louizos et al.'s; Guo et al. write the gate without a temperature and stretch to ``(l, r)``, which is
``beta=1, gamma=l, zeta=r`` here (the expected L0 then reads ``σ(α − log(−l/r))``, their form).

Training functions: the recipes call ``train_fn(param_groups)`` with a list of ``torch.optim`` parameter groups, each
with a ``"name"`` (``"weights"``: targeted base weights, ``"heads"``, ``"values"``: sparse entries, ``"delta"``: diff
pruning's ``w``, ``"log_alpha"``); pass them to an optimizer (set a group's ``lr`` by its name) and run the loop with
the model as it is (the recipes set what is active and trainable). Diff pruning's loop must add
``adapters.aux_loss()`` to its loss (the Trainer callback does).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..component import Component
from ..config import AdapterConfig, register
from ..plan import Plan
from ..targeting import base_modules
from .heads import HeadCopy
from .sparse_delta import DeltaSpace, SparseDelta, SparseDeltaComponent, module_kind, routed_dense

PUBLIC = ("DiffPruning", "lt_sft", "diff_pruning", "project_to_sparse", "combine_sparse")
__all__ = [
    "DiffPruning",
    "DiffPruningDelta",
    "SparseSelection",
    "hard_concrete_sample",
    "hard_concrete_gate",
    "expected_l0",
    "lt_sft",
    "diff_pruning",
    "project_to_sparse",
    "combine_sparse",
    "top_k_entries",
]

TrainFn = Callable[[list[dict[str, Any]]], Any]


# --- hard-concrete gates (Louizos et al. 2018, §2.2-2.3) -------------------------------------------------------
def hard_concrete_sample(
    log_alpha: torch.Tensor, beta: float, gamma: float, zeta: float, u: torch.Tensor | None = None
) -> torch.Tensor:
    """A reparameterized gate sample ``z = min(1, max(0, σ((log u − log(1−u) + log α)/β)(ζ − γ) + γ))`` (Louizos
    Eq. 10; ``u ~ U(0, 1)`` drawn when not given, clamped to ``[1e-6, 1 − 1e-6]``). Same shape as ``log_alpha``."""
    if u is None:
        u = torch.rand_like(log_alpha)
    u = u.clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def hard_concrete_gate(log_alpha: torch.Tensor, gamma: float, zeta: float) -> torch.Tensor:
    """The deterministic test-time gate ``ẑ = min(1, max(0, σ(log α)(ζ − γ) + γ))`` (Louizos Eq. 13)."""
    return (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor, beta: float, gamma: float, zeta: float) -> torch.Tensor:
    """``E[‖z‖₀] = Σ_i P(z_i ≠ 0) = Σ_i σ(log α_i − β log(−γ/ζ))`` (Louizos Eq. 12): a 0-dim tensor."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta)).sum()


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@register("diff_pruning")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffPruning(AdapterConfig):
    """Diff pruning's dense gated diff ``δ = z ⊙ w`` (training-time; project it with :func:`project_to_sparse`).

    Args:
        l0_weight: ``λ``, the weight of the expected-L0 penalty per entry in ``adapters.aux_loss()`` (tune it with the
            model size: the magnitude projection sets the final density whatever the penalty reached).
        alpha_init: initial ``log α`` of every gate (5: ``P(z ≠ 0) ≈ 1`` and ``ẑ = 1``, so every entry starts open;
            ``w`` starts at 0, so the adapter starts as the identity).
        beta: temperature ``β`` (2/3, Louizos et al.; Guo et al.'s form is ``beta=1``).
        gamma: lower stretch ``γ < 0`` (−0.1; Guo et al.'s ``l``).
        zeta: upper stretch ``ζ > 1`` (1.1; Guo et al.'s ``r``).
        bias: the modules' biases join the diff vector (as :class:`SparseDelta`'s ``bias``).
        init_weights: False starts ``w ~ N(0, 0.02²)`` (not an identity; for tests).
        targets: as :class:`SparseDelta` (default ``"all-linear"``).

    Memory: ``w`` and ``log α`` are dense (two copies of every targeted weight, plus optimizer state), as in the
    paper; saved as such. The deployable artefact is the projected :class:`SparseDelta`.
    """

    l0_weight: float = 1.25e-7
    alpha_init: float = 5.0
    beta: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1
    bias: bool = False
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in ("l0_weight", "alpha_init", "beta", "gamma", "zeta"):
            if not _number(getattr(self, f)):
                raise ValueError(f"DiffPruning {f} must be a finite number, got {getattr(self, f)!r}")
        if self.l0_weight < 0:
            raise ValueError(f"DiffPruning l0_weight must be >= 0, got {self.l0_weight!r}")
        if self.beta <= 0:
            raise ValueError(f"DiffPruning beta (the temperature) must be > 0, got {self.beta!r}")
        if not self.gamma < 0 or not self.zeta > 1:
            raise ValueError(
                f"DiffPruning stretches the gates to (gamma, zeta) with gamma < 0 < 1 < zeta (e.g. -0.1, 1.1), got "
                f"gamma={self.gamma!r}, zeta={self.zeta!r}"
            )

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("all-linear",)

    def accepts(self, module: nn.Module) -> bool:
        return module_kind(module) is not None

    def build(self, module: nn.Module, name: str) -> Component:
        return DiffPruningDelta(DeltaSpace(module, name, self.bias, "DiffPruning"), self)


class DiffPruningDelta(Component):
    """``y + effect(z ⊙ w)`` on one module: ``w: (n,)`` and ``log_alpha: (n,)`` over the module's flat weight (and
    bias) space. Training mode samples ``z`` at every call; eval mode uses ``ẑ``."""

    mergeable = True
    additive = True

    def __init__(self, space: DeltaSpace, cfg: DiffPruning) -> None:
        super().__init__()
        self.space = space
        self.beta, self.gamma, self.zeta, self.l0_weight = cfg.beta, cfg.gamma, cfg.zeta, cfg.l0_weight
        self.w = nn.Parameter(torch.zeros(space.n, dtype=space.dtype, device=space.device))
        self.log_alpha = nn.Parameter(
            torch.full((space.n,), float(cfg.alpha_init), dtype=space.dtype, device=space.device)
        )
        self._random = not cfg.init_weights

    def extra_repr(self) -> str:
        return f"{self.space.kind}, n={self.space.n}, beta={self.beta:g}, gamma={self.gamma:g}, zeta={self.zeta:g}"

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        if self._random:
            self.w.normal_(0.0, 0.02)

    def gate(self) -> torch.Tensor:
        """``z`` (a sample) in training mode, ``ẑ`` otherwise: ``(n,)``."""
        if self.training:
            return hard_concrete_sample(self.log_alpha, self.beta, self.gamma, self.zeta)
        return hard_concrete_gate(self.log_alpha, self.gamma, self.zeta)

    def diff(self) -> torch.Tensor:
        """``z ⊙ w``: ``(n,)``."""
        return self.gate() * self.w

    def eval_diff(self) -> torch.Tensor:
        """``ẑ ⊙ w`` (detached): what merging, routing and the projection use."""
        return (hard_concrete_gate(self.log_alpha, self.gamma, self.zeta) * self.w).detach()

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.space.apply_dense(x, y, self.diff())

    def aux_loss(self) -> torch.Tensor:
        """``λ E[‖z‖₀]`` of this module's gates."""
        return self.l0_weight * expected_l0(self.log_alpha, self.beta, self.gamma, self.zeta)

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: torch.Tensor, key: Any) -> Any:
        if any(c is not None and c.training for c in comps):
            return None  # sampled gates: one call per adapter
        return routed_dense(
            comps, plan, x, y, key, lambda c: hard_concrete_gate(c.log_alpha, c.gamma, c.zeta) * c.w
        )

    def delta_weight(self, module: nn.Module) -> torch.Tensor | None:
        if self.space.kind == "layernorm":
            return None
        return self.space.canonical(self.eval_diff())[0]

    def delta_bias(self, module: nn.Module) -> torch.Tensor | None:
        return self.space.canonical(self.eval_diff())[1]

    def _apply_delta(self, module: nn.Module, sign: float) -> None:
        dw, db = self.space.split(self.eval_diff())
        module.weight.data.add_(dw.to(module.weight.dtype), alpha=sign)
        if db is not None:
            module.bias.data.add_(db.to(module.bias.dtype), alpha=sign)


# --- selection -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SparseSelection:
    """What a recipe kept.

    Attributes:
        name: the sparse adapter.
        k: entries kept over all targeted weights; ``total``: entries of the targeted weight spaces.
        threshold: the smallest kept magnitude (``|Δ|`` for LT-SFT, ``|ẑ ⊙ w|`` for diff pruning).
        per_site: module name -> entries kept there.
    """

    name: str
    k: int
    total: int
    threshold: float
    per_site: dict[str, int]

    @property
    def density(self) -> float:
        return self.k / self.total if self.total else 0.0


def _count(total: int, density: float | None, k: int | None) -> int:
    if (density is None) == (k is None):
        raise ValueError(
            "give exactly one of `density` (share of the targeted entries) or `k` (number of entries)"
        )
    if k is not None:
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= total:
            raise ValueError(f"k must be an integer in [0, {total}] (the targeted entries), got {k!r}")
        return k
    if not _number(density) or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    return min(total, max(1, round(density * total)))


def top_k_entries(scores: Mapping[str, torch.Tensor], k: int) -> tuple[dict[str, torch.Tensor], float]:
    """The ``k`` largest entries over several flat score vectors together (one global threshold): site -> sorted
    positions (int64), and the smallest kept score. Ties are broken by ``torch.topk``."""
    names = list(scores)
    sizes = [scores[n].numel() for n in names]
    if k == 0:
        return {n: torch.zeros(0, dtype=torch.long) for n in names}, math.inf
    flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names])
    top = torch.topk(flat, k, sorted=False)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[top.indices] = True
    out, start = {}, 0
    for n, size in zip(names, sizes):
        out[n] = keep[start : start + size].nonzero().reshape(-1)
        start += size
    return out, float(top.values.min())


def _targets(adapters: Any, name: str, kind: type) -> dict[str, Component]:
    comps = {m: c for m, c in adapters.components(name).items() if isinstance(c, kind)}
    if not comps:
        raise ValueError(f"adapter {name!r} has no {kind.__name__} components")
    return comps


def _heads(adapters: Any, name: str) -> dict[str, HeadCopy]:
    return {m: c for m, c in adapters.components(name).items() if isinstance(c, HeadCopy)}


def _flat_views(module: nn.Module, space: DeltaSpace) -> list[torch.Tensor]:
    views = [module.weight]
    if space.nb:
        views.append(module.bias)
    return views


def _flat(module: nn.Module, space: DeltaSpace) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in _flat_views(module, space)])


def _run(adapters: Any, active: Sequence[Any], fn: TrainFn, groups: list[dict[str, Any]]) -> None:
    with adapters.use(*active):
        fn([g for g in groups if g["params"]])


def _check_fn(fn: Any, what: str) -> None:
    if not callable(fn):
        raise TypeError(f"{what} must be a function taking a list of parameter groups, got {type(fn).__name__}")


def lt_sft(
    adapters: Any,
    name: str,
    train_fn: TrainFn,
    *,
    config: SparseDelta | None = None,
    density: float | None = None,
    k: int | None = None,
    sparse_train_fn: TrainFn | None = None,
    with_active: Sequence[str] = (),
) -> SparseSelection:
    """Lottery-Ticket Sparse Fine-Tuning (Ansell et al. 2022, §3): add sparse adapter ``name`` and train it.

    Args:
        adapters: the model's controller (``ak.attach(model)``).
        name: the new adapter's name.
        train_fn: runs a training loop over the parameter groups it is given (module docstring). Called for the full
            fine-tuning phase (groups ``"weights"``: the targeted base weights, and ``"heads"``) and, unless
            ``sparse_train_fn`` is given, for the sparse phase (groups ``"values"`` and ``"heads"``).
        config: the :class:`SparseDelta` (targets, ``bias``, ``heads``); default ``SparseDelta()``.
        density: share of the targeted entries to keep (default: ``config.density``); or ``k`` entries.
        sparse_train_fn: the loop of the sparse phase, when it differs from the full phase's.
        with_active: adapters kept active (frozen) under the new one in both phases: the source-language SFT while a
            task SFT trains.

    Both phases run with ``with_active`` and ``name`` active (a ``use`` scope of this thread); the base weights end
    bit-identical to where they started; the adapter ends trainable and active (``adapters.train(name)``).
    Memory: one copy of the targeted weights during the full phase (as the authors' trainer).

    Returns:
        the :class:`SparseSelection` (``k``, threshold, entries per module).
    """
    _check_fn(train_fn, "train_fn")
    if sparse_train_fn is not None:
        _check_fn(sparse_train_fn, "sparse_train_fn")
    cfg = SparseDelta() if config is None else config
    if not isinstance(cfg, SparseDelta):
        raise TypeError(f"lt_sft trains a SparseDelta adapter; got a {type(cfg).__name__} config")
    if density is None and k is None:
        density = cfg.density
    planned = adapters.plan(cfg)
    total = sum(c.space.n for _, c in planned.components.values() if isinstance(c, SparseDeltaComponent))
    count = _count(total, density, k)
    cfg = cfg.replace(density=count / total)  # the config records what is kept
    adapters.add(name, cfg)
    try:
        return _lt_sft(adapters, name, train_fn, sparse_train_fn or train_fn, count, tuple(with_active))
    except BaseException:
        adapters.delete(name)
        raise


def _lt_sft(
    adapters: Any,
    name: str,
    full_fn: TrainFn,
    sparse_fn: TrainFn,
    count: int,
    with_active: tuple[str, ...],
) -> SparseSelection:
    modules = base_modules(adapters.model)
    comps: dict[str, SparseDeltaComponent] = _targets(adapters, name, SparseDeltaComponent)
    heads = _heads(adapters, name)
    total = sum(c.space.n for c in comps.values())
    for c in comps.values():
        c.set_entries(torch.zeros(0, dtype=torch.long))  # the full phase trains the weights themselves
    original = {m: [t.detach().clone() for t in _flat_views(modules[m], c.space)] for m, c in comps.items()}
    head_state = {m: {k_: v.detach().clone() for k_, v in h.state_dict().items()} for m, h in heads.items()}
    flags = {id(p): p.requires_grad for p in adapters.model.parameters()}
    weights = [p for m, c in comps.items() for p in _flat_views(modules[m], c.space)]
    head_params = [p for h in heads.values() for p in h.parameters()]
    try:
        for p in adapters.model.parameters():
            p.requires_grad_(False)
        for p in [*weights, *head_params]:
            p.requires_grad_(True)
        _run(
            adapters,
            (*with_active, name),
            full_fn,
            [{"params": weights, "name": "weights"}, {"params": head_params, "name": "heads"}],
        )
        with torch.no_grad():
            deltas = {
                m: (_flat(modules[m], c.space) - torch.cat([t.reshape(-1) for t in original[m]])).abs()
                for m, c in comps.items()
            }
    finally:
        with torch.no_grad():  # reset θ (and the heads) to θ⁽⁰⁾, bit for bit
            for m, c in comps.items():
                for t, saved in zip(_flat_views(modules[m], c.space), original[m]):
                    t.copy_(saved)
                    t.grad = None
            for m, h in heads.items():
                h.load_state_dict(head_state[m])
                for p in h.parameters():
                    p.grad = None
        for p in adapters.model.parameters():
            p.requires_grad_(flags.get(id(p), False))
    keep, threshold = top_k_entries(deltas, count)
    for m, c in comps.items():
        c.set_entries(keep[m])
    adapters.train(name)
    values = [c.values for c in comps.values()]
    _run(
        adapters,
        (*with_active, name),
        sparse_fn,
        [{"params": values, "name": "values"}, {"params": head_params, "name": "heads"}],
    )
    return SparseSelection(name, count, total, threshold, {m: int(keep[m].numel()) for m in comps})


# --- diff pruning ------------------------------------------------------------------------------------------------
def project_to_sparse(
    adapters: Any,
    name: str,
    density: float | None = None,
    *,
    k: int | None = None,
    new_name: str | None = None,
) -> SparseSelection:
    """Diff pruning's projection onto the L0 ball (Guo et al. §3.3): the ``K`` largest ``|ẑ ⊙ w|`` over all of the
    :class:`DiffPruning` adapter ``name``'s weights become a :class:`SparseDelta` adapter with those values.

    ``new_name`` None replaces ``name`` (deleted, the sparse adapter installed under its name, what was active stays
    active); otherwise both exist afterwards. Heads are copied. The sparse adapter's config keeps the targets,
    ``bias`` and heads, with ``density = K / n``.
    """
    cfg = adapters.config(name)
    if not isinstance(cfg, DiffPruning):
        raise TypeError(f"project_to_sparse takes a DiffPruning adapter; {name!r} is {type(cfg).__name__}")
    if adapters.is_merged(name):
        raise ValueError(f"adapter {name!r} is merged; unmerge it before projecting it")
    comps: dict[str, DiffPruningDelta] = _targets(adapters, name, DiffPruningDelta)
    total = sum(c.space.n for c in comps.values())
    count = _count(total, density, k)
    diffs = {m: c.eval_diff() for m, c in comps.items()}
    keep, threshold = top_k_entries({m: d.abs() for m, d in diffs.items()}, count)
    sparse_cfg = SparseDelta(
        targets=cfg.targets,
        exclude=cfg.exclude,
        layers=cfg.layers,
        heads=cfg.heads,
        bias=cfg.bias,
        density=count / total,
    )
    plan = adapters.plan(sparse_cfg)
    old_sites = adapters.sites(name)
    if {m: kind for m, (kind, _) in plan.components.items()} != old_sites:
        raise ValueError(f"the sparse config resolves to other sites than {name!r}'s; cannot project it")
    modules = base_modules(adapters.model)
    old_heads = _heads(adapters, name)
    for m, (_, comp) in plan.components.items():
        if isinstance(comp, SparseDeltaComponent):
            idx = keep[m].to(diffs[m].device)
            comp.set_entries(keep[m], diffs[m][idx])
        else:
            comp.import_state(old_heads[m].export_state(), modules[m])
    target = name if new_name is None else new_name
    if new_name is None:
        active = adapters.active
        adapters.delete(name)
        adapters.install(name, Plan(sparse_cfg, plan.components))
        if active:
            adapters.activate(*active)
    else:
        adapters.install(new_name, Plan(sparse_cfg, plan.components))
    return SparseSelection(target, count, total, threshold, {m: int(keep[m].numel()) for m in comps})


def diff_pruning(
    adapters: Any,
    name: str,
    train_fn: TrainFn,
    *,
    config: DiffPruning | None = None,
    density: float | None = 0.005,
    k: int | None = None,
    finetune_fn: TrainFn | None = None,
) -> SparseSelection:
    """Diff pruning end to end (Guo et al. §3): add a :class:`DiffPruning` adapter ``name``, train it with
    ``train_fn`` (groups ``"delta"`` (``w``), ``"log_alpha"`` and ``"heads"``; the loop adds ``adapters.aux_loss()``,
    the expected-L0 penalty, to its loss), project it to ``density`` (0.5%, the paper's GLUE setting) or ``k``
    entries (:func:`project_to_sparse`, replacing ``name`` by the :class:`SparseDelta`), then, with ``finetune_fn``,
    fine-tune the kept entries with the mask fixed (groups ``"values"`` and ``"heads"``)."""
    _check_fn(train_fn, "train_fn")
    if finetune_fn is not None:
        _check_fn(finetune_fn, "finetune_fn")
    if density is not None and k is not None:
        density = None  # an explicit k wins over the default density
    cfg = DiffPruning() if config is None else config
    if not isinstance(cfg, DiffPruning):
        raise TypeError(f"diff_pruning trains a DiffPruning adapter; got a {type(cfg).__name__} config")
    adapters.add(name, cfg)
    try:
        adapters.train(name)
        comps = _targets(adapters, name, DiffPruningDelta)
        heads = [p for h in _heads(adapters, name).values() for p in h.parameters()]
        groups = [
            {"params": [c.w for c in comps.values()], "name": "delta"},
            {"params": [c.log_alpha for c in comps.values()], "name": "log_alpha"},
            {"params": heads, "name": "heads"},
        ]
        _run(adapters, (name,), train_fn, groups)
        result = project_to_sparse(adapters, name, density, k=k)
    except BaseException:
        if name in adapters.names:
            adapters.delete(name)
        raise
    adapters.train(name)
    if finetune_fn is not None:
        sparse = _targets(adapters, name, SparseDeltaComponent)
        heads = [p for h in _heads(adapters, name).values() for p in h.parameters()]
        _run(
            adapters,
            (name,),
            finetune_fn,
            [
                {"params": [c.values for c in sparse.values()], "name": "values"},
                {"params": heads, "name": "heads"},
            ],
        )
    return result


# --- composition ---------------------------------------------------------------------------------------------------
def combine_sparse(
    adapters: Any, new_name: str, names: Sequence[str], weights: Sequence[float] | None = None
) -> SparseSelection:
    """One :class:`SparseDelta` adapter ``new_name`` holding ``Σ_i w_i φ_i`` (default weights 1: the composition
    ``θ + φ_L + φ_T`` of LT-SFT) on the union of the adapters' positions, at the union of their modules. The adapters
    must agree on ``bias`` and have no heads; the new adapter's targets are the exact module names."""
    if isinstance(names, str) or not names:
        raise ValueError(f"names must be a non-empty list of sparse adapter names, got {names!r}")
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names) or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"give one finite weight per adapter: {len(names)} adapters, weights {weights!r}")
    configs = [adapters.config(n) for n in names]
    bad = [n for n, c in zip(names, configs) if not isinstance(c, SparseDelta)]
    if bad:
        raise TypeError(f"combine_sparse adds SparseDelta adapters; {bad} are not (project diff pruning first)")
    if len({c.bias for c in configs}) > 1:
        raise ValueError(
            "the adapters differ in `bias` (their weight spaces differ); combine adapters of one kind"
        )
    with_heads = [n for n, c in zip(names, configs) if c.heads]
    if with_heads:
        raise ValueError(
            f"adapters {with_heads} have heads, which cannot be summed; combine adapters without heads"
        )
    merged = [n for n in names if adapters.is_merged(n)]
    if merged:
        raise ValueError(f"adapters {merged} are merged; unmerge them first")
    per_site: dict[str, list[tuple[float, SparseDeltaComponent]]] = {}
    for n, w in zip(names, weights):
        for m, c in _targets(adapters, n, SparseDeltaComponent).items():
            per_site.setdefault(m, []).append((w, c))
    modules = base_modules(adapters.model)
    sites = [m for m in modules if m in per_site]
    total = sum(per_site[m][0][1].space.n for m in sites)
    count = 0
    entries = {}
    for m in sites:
        idx = torch.cat([c.indices.long() for _, c in per_site[m]])
        vals = torch.cat([w * c.values.detach().float() for w, c in per_site[m]])
        union, where = torch.unique(idx, return_inverse=True)
        summed = torch.zeros(union.numel(), dtype=vals.dtype, device=vals.device).index_add_(0, where, vals)
        entries[m] = (union, summed)
        count += union.numel()
    cfg = SparseDelta(targets=tuple(sites), bias=configs[0].bias, density=count / total if total else 0.0)
    plan = adapters.plan(cfg)
    for m, (_, comp) in plan.components.items():
        union, summed = entries[m]
        comp.set_entries(union, summed.to(comp.values.dtype))
    adapters.install(new_name, plan)
    return SparseSelection(new_name, count, total, 0.0, {m: int(entries[m][0].numel()) for m in sites})
