"""Polytropon and Multi-Head Routing: an inventory of LoRA skills mixed per task.

Polytropon (Ponti et al. 2023, "Combining Parameter-efficient Modules for Task-level Generalisation", §3) keeps, at
every adapted layer, an inventory of ``|S|`` LoRA *skills* ``(A_s, B_s)`` and a learned task-skill allocation
``Z ∈ R^{|T|×|S|}``. A row of the batch belonging to task ``t`` uses the LoRA whose factors are the normalized mixture
of the skills that ``t`` selects (§3.2)::

    w_t = σ(Z_t) / (Σ_s σ(Z_t,s) + ε)                                  eval: the expected allocation
    w_t ~ RelaxedBernoulli(τ=1, logits=Z_t), normalized the same way   training: a relaxed binary sample (§3.3)
    A_t = Σ_s w_t,s A_s      B_t = Σ_s w_t,s B_s
    y = W x + (x A_t B_t) / r

Multi-Head Routing (Caccia et al. 2023, "Multi-Head Adapter Routing for Cross-Task Generalization", §4, MHR) splits
the input dimension of ``A`` and the output dimension of ``B`` into ``n_splits`` heads, each with its own allocation
over the skills (``Z ∈ R^{|T|×h×|S|}``): ``A_t = concat_h(Σ_s w_t,h,s A_h,s)`` along the input, likewise ``B_t``
along the output. ``n_splits=1`` is Polytropon.

Shapes (peft's, so files convert by renaming keys): ``poly_lora_A: (n_splits, n_skills, in/n_splits, r)``,
``poly_lora_B: (n_splits, n_skills, r, out/n_splits)``, allocation logits ``module_logits: (n_tasks,
n_splits·n_skills)``. Equal to peft's ``PolyConfig`` (peft ``Linear.forward``, ``PolyRouter``): scaling ``1/r``,
``ε = 1e-12``, ``A`` Kaiming-uniform per skill and split, ``B = 0``, logits ``U(-1e-3, 1e-3)``.

Where the allocation lives: peft (like the authors' mttl code) learns one allocation per adapted layer; with
``shared_allocation=True`` one allocation is learned for the whole adapter (a :class:`~adapterkit.component.Bank`
every site shares; decision recorded in DEVELOPERS.md). Both export to peft (the shared logits are written at
every layer); a peft file loads per site, or shared with ``shared_allocation=True`` when every layer holds the same
logits.

MHR's few-shot variants (Caccia et al. 2023, §5): **MHR-z** adapts only the allocation of a new task with the skills
frozen (:func:`train_routing_only`); **MHR-μ** averages the skills into one LoRA per site and fine-tunes that
(:func:`average_skills`, which returns a plain :class:`~adapterkit.methods.lora.LoRA` state).

Task ids reach the components through the forward context (``model(**batch, task_ids=ids)``,
``with adapters.tasks(ids):``, ``generate(..., task_ids=ids)``; see ``adapterkit/tasks.py``); ``default_task`` is the
task of rows when none are given. Not mergeable (the weights differ per row) and not routable per adapter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..backends import backend_for
from ..component import Bank, Component
from ..config import AdapterConfig, register
from ..context import rows_task_ids, task_ids

PUBLIC = ("Poly",)
__all__ = ["Poly", "PolyAllocation", "PolyLinear", "train_routing_only", "average_skills"]

EPS = 1e-12  # peft's / mttl's normalization epsilon


def _clamp_probs(p: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(p.dtype).eps
    return p.clamp(min=eps, max=1 - eps)


def relaxed_bernoulli(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """A reparameterized sample of ``RelaxedBernoulli(temperature, logits=logits)`` (Maddison et al. 2017; Jang et al.
    2017), any shape: the same operations and the same ``torch.rand`` draw as ``torch.distributions`` (so the same
    seed gives the same bits as peft's router), without building a distribution object at every site and step::

        p = clamp(σ(logits))    u = clamp(U(0, 1))
        z = (log u − log(1 − u) + log p − log(1 − p)) / τ      sample = clamp(σ(z))
    """
    probs = _clamp_probs(torch.sigmoid(logits))
    u = _clamp_probs(torch.rand(logits.shape, dtype=probs.dtype, device=probs.device))
    z = (u.log() - (-u).log1p() + probs.log() - (-probs).log1p()) / temperature
    fin = torch.finfo(z.dtype)
    return torch.sigmoid(z).clamp(min=fin.tiny, max=1.0 - fin.eps)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@register("poly")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Poly(AdapterConfig):
    """Polytropon / Multi-Head Routing over LoRA skills on linear-like modules.

    Args:
        r: rank of every skill (peft's ``r``; the LoRA output is divided by ``r``).
        n_tasks: number of tasks (rows carry task ids in ``[0, n_tasks)``).
        n_skills: skills (LoRAs) in each site's inventory.
        n_splits: heads of Multi-Head Routing (1: Polytropon); must divide the input and output sizes.
        shared_allocation: one task-skill allocation for every site (an adapter-level bank) instead of one per
            site (peft's layout). Either exports to peft.
        default_task: task id of rows when no ids are given (None: ids are required, as in peft, except with
            ``n_tasks=1``, where every row is task 0).
        init_weights: False starts ``B`` Kaiming-uniform too (not an identity; for tests), as peft.
        targets: default ``["attn.q", "attn.v"]``, or ``"attn.qkv"`` on models with a fused projection.
    """

    needs_task_ids: ClassVar[bool] = True

    r: int = 8
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1
    shared_allocation: bool = False
    default_task: int | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("r", "n_tasks", "n_skills", "n_splits"):
            if not _positive_int(getattr(self, field)):
                raise ValueError(f"Poly {field} must be a positive integer, got {field}={getattr(self, field)!r}")
        if self.default_task is not None and (
            not isinstance(self.default_task, int) or not 0 <= self.default_task < self.n_tasks
        ):
            raise ValueError(
                f"Poly default_task must be a task id in [0, n_tasks={self.n_tasks}) or None, got {self.default_task!r}"
            )

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("attn.qkv",) if "attn.q" not in roles and "attn.qkv" in roles else ("attn.q", "attn.v")

    def accepts(self, module: nn.Module) -> bool:
        backend = backend_for(module)
        return backend is not None and backend.kind == "linear"

    def build(self, module: nn.Module, name: str, allocation: PolyAllocation | None = None) -> Component:
        if not self.accepts(module):
            raise TypeError(
                f"Poly cannot act on {name!r} ({type(module).__name__}): it supports nn.Linear and Conv1D"
            )
        in_dim, out_dim = backend_for(module).dims(module)
        if in_dim % self.n_splits or out_dim % self.n_splits:
            raise ValueError(
                f"Poly n_splits={self.n_splits} must divide the input ({in_dim}) and output ({out_dim}) sizes of "
                f"{name!r}; pick a divisor of both"
            )
        return PolyLinear(self, module, allocation)

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        if not self.shared_allocation or not targets:
            return {n: self.build(modules[n], n) for n in targets}
        weight = modules[targets[0]].weight
        allocation = PolyAllocation(self, weight.device)
        return {n: self.build(modules[n], n, allocation) for n in targets}


class PolyAllocation(Bank):
    """The task-skill allocation logits ``module_logits: (n_tasks, n_splits·n_skills)`` (peft's ``PolyRouter``),
    and the mixing weights they give (:meth:`weights`). A :class:`Bank` when shared by every site of an adapter,
    else a plain child of one component."""

    def __init__(self, cfg: Poly, device: torch.device | None = None) -> None:
        super().__init__()
        self.n_tasks, self.n_skills, self.n_splits = cfg.n_tasks, cfg.n_skills, cfg.n_splits
        self.module_logits = nn.Parameter(
            torch.empty(cfg.n_tasks, cfg.n_splits * cfg.n_skills, device=device, dtype=torch.float32)
        )
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, n_splits={self.n_splits}, n_skills={self.n_skills}"

    def weights(self, ids: torch.Tensor) -> torch.Tensor:
        """Mixing weights ``(batch, n_splits, n_skills)`` for task ids ``(batch,)``: a relaxed Bernoulli sample in
        training, ``σ(logits)`` in eval, normalized over the skills (Polytropon §3.3)."""
        logits = self.module_logits[ids].view(-1, self.n_splits, self.n_skills)
        if self.training:
            logits = relaxed_bernoulli(logits)
        else:
            logits = torch.sigmoid(logits)
        return logits / (logits.sum(dim=-1, keepdim=True) + EPS)


class PolyLinear(Component):
    """Polytropon/MHR on a linear-like module.

    Shapes: ``x: (batch, ..., in)``, ``y: (batch, ..., out)``, ``poly_lora_A: (n_splits, n_skills, in/n_splits, r)``,
    ``poly_lora_B: (n_splits, n_skills, r, out/n_splits)``, allocation ``(n_tasks, n_splits·n_skills)``.
    """

    additive = True

    def __init__(self, cfg: Poly, module: nn.Module, allocation: PolyAllocation | None = None) -> None:
        super().__init__()
        in_dim, out_dim = backend_for(module).dims(module)
        weight = module.weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        q, s, r = cfg.n_splits, cfg.n_skills, cfg.r
        self.cfg = cfg
        self.in_dim, self.out_dim, self.r = in_dim, out_dim, r
        self.poly_lora_A = nn.Parameter(torch.empty(q, s, in_dim // q, r, **factory))
        self.poly_lora_B = nn.Parameter(torch.zeros(q, s, r, out_dim // q, **factory))
        if allocation is None:
            self.poly_router = PolyAllocation(cfg, weight.device)
        else:
            self.share(allocation, "poly_router")
        self._random = not cfg.init_weights
        self._who = "Poly"

    def extra_repr(self) -> str:
        c = self.cfg
        return f"r={self.r}, n_skills={c.n_skills}, n_splits={c.n_splits}, n_tasks={c.n_tasks}"

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        """peft's ``reset_poly_parameters``: each ``A`` (and with ``init_weights=False`` each ``B``) skill and split
        drawn as an ``nn.Linear`` weight (Kaiming-uniform, a=√5); ``B = 0``."""
        q, s = self.poly_lora_A.shape[:2]
        for skill in range(s):
            for split in range(q):
                a = torch.empty(self.r, self.in_dim // q)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                self.poly_lora_A[split, skill] = a.T.to(self.poly_lora_A.dtype)
        if self._random:
            for skill in range(s):
                for split in range(q):
                    b = torch.empty(self.out_dim // q, self.r)
                    nn.init.kaiming_uniform_(b, a=math.sqrt(5))
                    self.poly_lora_B[split, skill] = b.T.to(self.poly_lora_B.dtype)
        if "poly_router" in self._modules and self.poly_router.owner is None:  # a per-site (unshared) allocation
            self.poly_router.reset()

    def _ids(self, rows: int, device: torch.device) -> torch.Tensor:
        if task_ids() is None and (self.cfg.default_task is not None or self.cfg.n_tasks == 1):
            # one task: its id is implied (peft requires it even then); else the configured default
            task = self.cfg.default_task or 0
            return torch.full((rows,), task, dtype=torch.long, device=device)
        ids = rows_task_ids(rows, device, f"{self._who} (adapter with n_tasks={self.cfg.n_tasks})")
        checkable = ids.device.type == "cpu" and not torch.compiler.is_compiling()  # no sync / graph break
        if checkable and rows and int(ids.max()) >= self.cfg.n_tasks:
            raise ValueError(
                f"task id {int(ids.max())} is out of range: this {self._who} adapter has n_tasks={self.cfg.n_tasks}"
            )
        return ids

    def factors(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``A: (batch, in, r)`` and ``B: (batch, r, out)`` for task ids ``(batch,)``."""
        w = self.poly_router.weights(ids.to(self.poly_router.module_logits.device))  # (b, q, s)
        w = w.to(self.poly_lora_A.dtype)
        b = w.shape[0]
        A = torch.einsum("bqs,qsdr->bqdr", w, self.poly_lora_A).reshape(b, self.in_dim, self.r)
        B = torch.einsum("bqs,qsrd->bqrd", w, self.poly_lora_B).transpose(1, 2).reshape(b, self.r, self.out_dim)
        return A, B

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        A, B = self.factors(self._ids(rows, x.device))
        h = x.reshape(rows, -1, self.in_dim).to(A.dtype)
        hA = h.bmm(A) / self.r  # (b, tokens, r): the 1/r scaling on the small tensor
        if y.dtype == A.dtype:  # y + hA·B in one kernel, no (b, tokens, out) delta or scaled copy
            return torch.baddbmm(y.reshape(rows, -1, self.out_dim), hA, B).reshape(y.shape)
        return y + hA.bmm(B).reshape(y.shape).to(y.dtype)


def train_routing_only(adapters: Any, name: str) -> None:
    """MHR-z (Caccia et al. 2023, §5): train only the task-skill allocation of Poly adapter ``name`` (call after
    ``adapters.train(name)``); the skills stay frozen."""
    for comp in adapters.components(name).values():
        for mod in comp.modules():
            if isinstance(mod, PolyLinear):
                mod.poly_lora_A.requires_grad_(False)
                mod.poly_lora_B.requires_grad_(False)
            if isinstance(mod, PolyAllocation):
                mod.module_logits.requires_grad_(True)


@torch.no_grad()
def average_skills(adapters: Any, name: str) -> dict[str, dict[str, torch.Tensor]]:
    """MHR-μ (Caccia et al. 2023, §5): every site's skills averaged into one LoRA, as ``{site: {"lora_A": (r, in),
    "lora_B": (out, r)}}`` for a :class:`~adapterkit.methods.lora.LoRA` with the same ``r`` and ``alpha=1`` (the
    ``1/r`` scaling); load it with ``import_state`` into the components of such an adapter and fine-tune."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for site, comp in adapters.components(name).items():
        if not isinstance(comp, PolyLinear):
            continue
        A = comp.poly_lora_A.mean(dim=1).reshape(comp.in_dim, comp.r)  # (in, r), splits along the input
        B = comp.poly_lora_B.mean(dim=1).transpose(0, 1).reshape(comp.r, comp.out_dim)  # (r, out)
        out[site] = {"lora_A": A.T.contiguous(), "lora_B": B.T.contiguous()}
    return out
