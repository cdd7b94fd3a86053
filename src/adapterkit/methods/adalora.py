"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR).

The update of each weight is an SVD-shaped product whose singular values are pruned during training, so the rank
budget moves to the weights that matter (§3.1, Eq. 3)::

    y = W x + s · P Λ Q x          Q = lora_A: (r, in),  Λ = diag(lora_E): (r, 1),  P = lora_B: (out, r)

        x ───────────────► W ─────────────────┐
        │                                     (+) ──► y
        └─► dropout ─► Q ─► ·Λ ─► P ─► ·s

* ``s = alpha / (init_r + 1e-5)`` (peft: ``scaling / (ranknum + 1e-5)``, ``scaling = lora_alpha``, or ``init_r``
  when ``alpha <= 0``). Init as peft: ``Λ = 0`` (identity at init), ``P, Q ~ N(0, 0.02²)``.
* Importance (§3.2, Eq. 8-10): for every entry of P, Λ, Q, the sensitivity ``I = |w · ∂L/∂w|`` is smoothed
  ``Ī ← β₁ Ī + (1 − β₁) I`` and its uncertainty ``Ū ← β₂ Ū + (1 − β₂) |I − Ī|``; an entry scores ``Ī · Ū``; the
  triplet ``i`` of a weight scores ``S(Λᵢ) + mean_j S(Qᵢⱼ) + mean_j S(Pⱼᵢ)``.
* Budget (§3.3, Eq. 11): ``init_r · n`` triplets until step ``tinit``, then cubically down to ``target_r · n`` at
  step ``total_step − tfinal``, fixed afterwards; every ``delta_t`` steps the lowest-scoring triplets over *all*
  weights (a global ``kthvalue``) get ``Λᵢ = 0``. After the final allocation the mask is re-applied every step.
* Orthogonality regularizer (§3.1, Eq. 4): ``R = mean over P and Q of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F``, added to the
  loss with weight ``orth_reg_weight`` through ``Component.aux_loss`` (``adapters.aux_loss()``, the Trainer
  callback).

Rank allocation is adapter-wide: the scores of every site meet in the adapter's :class:`RankAllocator` (a
:class:`~adapterkit.component.Bank`), which acts once per ``adapters.step()``. It follows peft 0.21's
``AdaLoraModel.update_and_allocate`` step for step (same schedule, scores, threshold and masking, called with the
same step index), and needs the step's gradients: call ``adapters.step()`` after ``optimizer.step()`` and before
``zero_grad()`` (the Trainer callback does). ``total_step`` may be left None when training with the callback (it
takes the Trainer's ``max_steps``) or ``adapters.begin_training(total_steps)``. The importance averages are training
state and are not saved (nor does peft save them): a resumed run restarts them, as peft would.

The kept triplets are a persistent buffer ``rank_mask`` (saved natively; peft files carry them as
``rank_pattern`` and hold only the kept rows). Works on ``nn.Linear``, GPT-2 ``Conv1D`` and ungrouped ``nn.Conv2d``
(peft's ``SVDConv2d`` layout: ``Q = lora_A: (r, in · kh · kw)``, the flattened kernel, ``P = lora_B: (out, r)``;
``ΔW = s · P (Λ ⊙ Q)`` reshaped to ``(out, in, kh, kw)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import backend_for
from ..component import Bank, Component
from ..config import AdapterConfig, register

PUBLIC = ("AdaLoRA",)
__all__ = ["AdaLoRA", "AdaLoRAConv2d", "AdaLoRALinear", "RankAllocator"]


def _int(v: Any, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


@register("adalora")
@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoRA(AdapterConfig):
    """Adaptive-budget SVD adaptation of linear-like modules (peft's ``AdaLoraConfig`` fields and defaults).

    Args:
        init_r: initial rank of every weight's update (peft ``init_r``).
        target_r: average rank left at the end (``target_r · n`` triplets over the ``n`` adapted weights).
        alpha: scaling numerator, ``s = alpha / (init_r + 1e-5)`` (peft ``lora_alpha``; ``<= 0`` means ``init_r``).
        dropout: dropout probability on the branch input.
        tinit: warm-up steps without pruning.
        tfinal: final steps at the target budget (no more reallocation).
        delta_t: steps between two allocations (peft ``deltaT``).
        beta1: EMA coefficient of the sensitivity (0 < β₁ < 1).
        beta2: EMA coefficient of the uncertainty (0 < β₂ < 1).
        orth_reg_weight: weight of the orthogonality regularizer (>= 0; 0 turns it off).
        total_step: number of training steps (None: taken from ``adapters.begin_training``/the Trainer).
        init_weights: False starts Λ ~ N(0, 1) and P, Q ~ N(0, 0.1²) (not an identity; for tests).
        targets: default ``["attn.q", "attn.v"]`` (``"attn.qkv"`` on GPT-2).
    """

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _int(self.init_r, 1):
            raise ValueError(f"AdaLoRA init_r must be a positive integer, got init_r={self.init_r!r}")
        if not _int(self.target_r, 1) or self.target_r > self.init_r:
            raise ValueError(
                f"AdaLoRA target_r must be an integer in [1, init_r={self.init_r}], got target_r={self.target_r!r}"
            )
        for name in ("tinit", "tfinal"):
            if not _int(getattr(self, name), 0):
                raise ValueError(f"AdaLoRA {name} must be a non-negative integer, got {getattr(self, name)!r}")
        if not _int(self.delta_t, 1):
            raise ValueError(f"AdaLoRA delta_t must be a positive integer, got delta_t={self.delta_t!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ValueError(f"AdaLoRA {name} must be in (0, 1), got {v!r}")
        if (
            isinstance(self.orth_reg_weight, bool)
            or not isinstance(self.orth_reg_weight, (int, float))
            or (self.orth_reg_weight < 0)
        ):
            raise ValueError(f"AdaLoRA orth_reg_weight must be a number >= 0, got {self.orth_reg_weight!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"AdaLoRA alpha must be a number, got alpha={self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdaLoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.total_step is not None:
            if not _int(self.total_step, 1):
                raise ValueError(f"AdaLoRA total_step must be a positive integer or None, got {self.total_step!r}")
            self.check_schedule(self.total_step)

    def check_schedule(self, total_step: int) -> None:
        """Raise ValueError unless the schedule leaves a budgeting phase (``tinit < total_step − tfinal``)."""
        if self.tinit >= total_step - self.tfinal:
            raise ValueError(
                f"AdaLoRA's schedule leaves no budgeting phase: tinit={self.tinit} must be < total_step - tfinal = "
                f"{total_step} - {self.tfinal}; decrease tinit/tfinal or train for more steps"
            )

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("attn.qkv",) if "attn.q" not in roles and "attn.qkv" in roles else ("attn.q", "attn.v")

    def accepts(self, module: nn.Module) -> bool:
        backend = backend_for(module)
        return backend is not None and backend.kind in ("linear", "conv2d")

    @property
    def scaling(self) -> float:
        """``alpha / (init_r + 1e-5)`` (peft's ``scaling / (ranknum + 1e-5)``)."""
        return (self.alpha if self.alpha > 0 else float(self.init_r)) / (self.init_r + 1e-5)

    def build(self, module: nn.Module, name: str, allocator: RankAllocator | None = None) -> Component:
        if not self.accepts(module):
            raise TypeError(
                f"AdaLoRA cannot act on {name!r} ({type(module).__name__}): it supports nn.Linear, Conv1D and "
                "nn.Conv2d; exclude it from targets"
            )
        allocator = allocator if allocator is not None else RankAllocator(self)
        if isinstance(module, nn.Conv2d):
            return AdaLoRAConv2d(self, module, allocator, name)
        return AdaLoRALinear(self, module, allocator)

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        allocator = RankAllocator(self)  # the budget is shared by every adapted weight
        return {n: self.build(modules[n], n, allocator) for n in targets}


class RankAllocator(Bank):
    """The adapter-wide budget: importance averages of every site and the allocation (peft's ``RankAllocator``).

    Holds no saved tensors: the kept triplets live in each component's ``rank_mask``."""

    def __init__(self, cfg: AdaLoRA) -> None:
        super().__init__()
        self.cfg = cfg
        self.total_step = cfg.total_step
        self.last_step: int | None = None
        self._eyes: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self._groups: tuple[int, list[list[int]]] | None = None  # (len(members), _shape_groups())
        self.reset_ipt()

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> RankAllocator:
        # model.to(...)/.half()/.cuda() reach this shared module: the cached groups and identities may be stale
        self._eyes, self._groups = {}, None
        return super()._apply(fn, recurse)

    def reset_ipt(self) -> None:
        """Forget the importance averages (peft's ``reset_ipt``)."""
        # one entry per factor, in the order of _factors(): A, B, E of member 0, then member 1, ...
        self.exp_avg_ipt: list[torch.Tensor] | None = None  # Ī, smoothed sensitivity
        self.exp_avg_unc: list[torch.Tensor] | None = None  # Ū, smoothed uncertainty

    def eye(self, r: int, like: torch.Tensor) -> torch.Tensor:
        """The ``(r, r)`` identity of the orthogonality regularizer, built once per device and dtype."""
        key = (r, like.device, like.dtype)
        eye = self._eyes.get(key)
        if eye is None:
            eye = self._eyes[key] = torch.eye(r, device=like.device, dtype=like.dtype)
        return eye

    def extra_repr(self) -> str:
        return f"{len(self.members)} weights, total_step={self.total_step}"

    def begin(self, total_steps: int | None) -> None:
        if self.cfg.total_step is None and total_steps is not None:
            self.cfg.check_schedule(total_steps)
            self.total_step = total_steps

    # --- the schedule (peft's budget_schedule) ----------------------------------------------------------------
    @property
    def init_bgt(self) -> int:
        return self.cfg.init_r * len(self.members)  # every weight has init_r triplets

    @property
    def target_bgt(self) -> int:
        return self.cfg.target_r * len(self.members)

    def budget(self, step: int) -> tuple[int, bool]:
        """``(budget, allocate now)`` at ``step`` (Eq. 11: cubic decrease between ``tinit`` and ``T − tfinal``)."""
        tinit, tfinal, total = self.cfg.tinit, self.cfg.tfinal, self.total_step
        if step <= tinit:
            return self.init_bgt, False
        if step > total - tfinal:
            return self.target_bgt, True
        mul = 1 - (step - tinit) / (total - tfinal - tinit)
        return int((self.init_bgt - self.target_bgt) * (mul**3) + self.target_bgt), step % self.cfg.delta_t == 0

    # --- one optimizer step (peft's update_and_allocate) -------------------------------------------------------
    def on_step(self, step: int) -> None:
        if step == self.last_step:  # every site calls it; the adapter acts once
            return
        if self.total_step is None:
            raise ValueError(
                "AdaLoRA needs total_step to schedule its budget: set AdaLoRA(total_step=...), or call "
                "adapters.begin_training(total_steps) before training (the Trainer callback passes max_steps)"
            )
        final = self.total_step - self.cfg.tfinal
        with torch.no_grad():
            if step < final:
                self.update_ipt()
                budget, allocate = self.budget(step)
                if allocate:
                    self.mask_to_budget(budget)
            elif step == final:
                self.mask_to_budget(self.budget(step)[0])
                self.reset_ipt()
            else:
                for c in self.members:
                    c.lora_E.masked_fill_(~c.rank_mask.view(-1, 1), 0.0)
        self.last_step = step

    def orth_reg(self) -> torch.Tensor:
        """``w · mean over the 2 n factors of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F`` (peft's ``AdaLoraModel.forward``), a
        0-dim tensor with grad. Weights whose factors have equal shapes are batched: one ``(g, r, r)`` product and
        one batched norm per shape, not ~8 small ops per weight (the sum equals peft's up to summation order)."""
        total: torch.Tensor | None = None
        for idx in self._shape_groups():
            cs = [self.members[i] for i in idx]
            A = torch.stack([c.lora_A for c in cs])  # (g, r, in)
            B = torch.stack([c.lora_B for c in cs])  # (g, out, r)
            eye = self.eye(A.shape[1], A)
            reg = (torch.linalg.matrix_norm(A @ A.mT - eye) + torch.linalg.matrix_norm(B.mT @ B - eye)).sum()
            total = reg if total is None else total + reg
        assert total is not None
        return total * (float(self.cfg.orth_reg_weight) / (2 * len(self.members)))

    def _factors(self) -> list[nn.Parameter]:
        return [p for c in self.members for p in (c.lora_A, c.lora_B, c.lora_E)]

    def update_ipt(self) -> None:
        """Sensitivity ``I = |w ∂L/∂w|`` and its smoothed mean ``Ī`` and uncertainty ``Ū`` for every entry (Eq. 8-9).

        One ``torch._foreach_*`` call per operation over every factor of every weight (not ~10 small ops per factor
        from Python); the same elementwise operations in the same order as peft's ``update_ipt``, so the averages
        are bit for bit peft's."""
        params = self._factors()
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            raise RuntimeError(
                "AdaLoRA scores its weights by their gradients, but they are gone at adapters.step(): call it "
                "after optimizer.step() and before optimizer.zero_grad() (the Trainer callback does)"
            )
        if self.exp_avg_ipt is None or self.exp_avg_unc is None:
            self.exp_avg_ipt = [torch.zeros_like(p) for p in params]
            self.exp_avg_unc = [torch.zeros_like(p) for p in params]
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        ipt = torch._foreach_mul(params, grads)
        torch._foreach_abs_(ipt)
        torch._foreach_mul_(self.exp_avg_ipt, b1)  # Ī ← β₁ Ī + (1 − β₁) I
        torch._foreach_add_(self.exp_avg_ipt, torch._foreach_mul(ipt, 1 - b1))
        unc = torch._foreach_sub(ipt, self.exp_avg_ipt)  # Ū ← β₂ Ū + (1 − β₂) |I − Ī|
        torch._foreach_abs_(unc)
        torch._foreach_mul_(unc, 1 - b2)
        torch._foreach_mul_(self.exp_avg_unc, b2)
        torch._foreach_add_(self.exp_avg_unc, unc)

    def _shape_groups(self) -> list[list[int]]:
        """Indices of the members whose factors have equal shapes, device and dtype (batched together); cached
        until a member is added or the model is moved or cast (:meth:`_apply`)."""
        if self._groups is not None and self._groups[0] == len(self.members):
            return self._groups[1]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, c in enumerate(self.members):
            A, B = c.lora_A, c.lora_B
            groups.setdefault((tuple(A.shape), tuple(B.shape), A.device, A.dtype), []).append(i)
        self._groups = (len(self.members), list(groups.values()))
        return self._groups[1]

    def triplet_scores(self) -> list[torch.Tensor]:
        """Each member's triplet scores ``S(Λᵢ) + mean_j S(Qᵢⱼ) + mean_j S(Pⱼᵢ)``, ``(init_r,)``, with ``S = Ī · Ū``
        (computed for all weights of one shape at once; bit-equal to peft's per-weight loop on CPU, checked at
        LLaMA shapes)."""
        assert self.exp_avg_ipt is not None and self.exp_avg_unc is not None
        scores = torch._foreach_mul(self.exp_avg_ipt, self.exp_avg_unc)
        out: list[torch.Tensor] = [scores[0]] * len(self.members)
        for idx in self._shape_groups():
            s_A = torch.stack([scores[3 * i] for i in idx]).mean(dim=2)  # (g, r)
            s_B = torch.stack([scores[3 * i + 1] for i in idx]).mean(dim=1)  # (g, r)
            s_E = torch.stack([scores[3 * i + 2] for i in idx]).flatten(1)  # (g, r)
            for i, t in zip(idx, s_E + (s_A + s_B), strict=True):
                out[i] = t
        return out

    def mask_to_budget(self, budget: int) -> None:
        """Zero Λ of the lowest-scoring triplets over all weights so that ``budget`` remain (Eq. 10)."""
        if self.exp_avg_ipt is None:
            return  # nothing scored yet (a run resumed right at the final allocation)
        triplets = self.triplet_scores()
        every = torch.cat(triplets)
        k = self.init_bgt - budget
        threshold = torch.kthvalue(every, k=k)[0].item() if k > 0 else float("-inf")
        drops = (every <= threshold).split([t.numel() for t in triplets])
        for c, drop in zip(self.members, drops, strict=True):
            c.lora_E.masked_fill_(drop.view(-1, 1), 0.0)
            c.rank_mask.copy_(~drop)

    def pattern(self) -> dict[int, list[bool]]:
        """Index of each member -> kept triplets."""
        return {i: c.rank_mask.tolist() for i, c in enumerate(self.members)}


class AdaLoRALinear(Component):
    """AdaLoRA on a linear-like module: ``y + s · ((dropout(x) Qᵀ ⊙ Λᵀ) Pᵀ)``.

    Shapes: ``x: (..., in)``, ``y: (..., out)``, ``lora_A (Q): (init_r, in)``, ``lora_E (Λ): (init_r, 1)``,
    ``lora_B (P): (out, init_r)``, ``rank_mask: (init_r,)`` bool (the triplets the allocation kept).
    """

    mergeable = True
    additive = True
    scheduled = True

    def __init__(
        self, cfg: AdaLoRA, module: nn.Module, allocator: RankAllocator, in_dim: int | None = None
    ) -> None:
        super().__init__()
        dims_in, out_dim = backend_for(module).dims(module)
        in_dim = dims_in if in_dim is None else in_dim
        weight = module.weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        r = cfg.init_r
        self.lora_A = nn.Parameter(torch.empty(r, in_dim, **factory))
        self.lora_E = nn.Parameter(torch.empty(r, 1, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_dim, r, **factory))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=weight.device))
        self.scaling = cfg.scaling
        self.orth_reg_weight = float(cfg.orth_reg_weight)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self._random = not cfg.init_weights
        self.share(allocator, "allocator")

    def extra_repr(self) -> str:
        kept = int(self.rank_mask.sum())
        return f"init_r={self.lora_A.shape[0]}, kept={kept}, scaling={self.scaling:g}"

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        if self._random:
            self.lora_E.normal_()
            self.lora_A.normal_(std=0.1)
            self.lora_B.normal_(std=0.1)
            return
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    # --- training-time hooks -----------------------------------------------------------------------------------
    def on_train_begin(self, total_steps: int | None, step: int = 0) -> None:
        self.allocator.begin(total_steps)

    def on_step(self, step: int) -> None:
        self.allocator.on_step(step)

    def aux_loss(self) -> torch.Tensor | None:
        """The adapter's orthogonality regularizer (Eq. 4), returned by its first weight only (the others return
        None, so ``adapters.aux_loss()`` counts it once): see :meth:`RankAllocator.orth_reg`."""
        if self.orth_reg_weight == 0 or self.allocator.members[0] is not self:
            return None
        return self.allocator.orth_reg()

    # --- forward / merge ---------------------------------------------------------------------------------------
    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x if self.dropout is None else self.dropout(x)
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A * self.lora_E)  # (..., r)
        B = self.lora_B
        if y.dtype != B.dtype:
            return y + (F.linear(h, B) * self.scaling).to(y.dtype)
        # one fused GEMM, y + s · h Bᵀ (as LoRA; in place on the base output under no_grad)
        y2, h2 = y.reshape(-1, B.shape[0]), h.reshape(-1, B.shape[1])
        if torch.is_grad_enabled():
            return torch.addmm(y2, h2, B.t(), alpha=self.scaling).view(y.shape)
        return y2.addmm_(h2, B.t(), alpha=self.scaling).view(y.shape)

    def delta_weight(self, module: nn.Module) -> torch.Tensor:
        """``s · P (Λ ⊙ Q)``: ``(out, in)``."""
        return (self.lora_B.detach() @ (self.lora_A.detach() * self.lora_E.detach())) * self.scaling


class AdaLoRAConv2d(AdaLoRALinear):
    """AdaLoRA on an ungrouped ``nn.Conv2d`` (peft's ``SVDConv2d``): ``y + s · conv(dropout(x), ΔW₁)`` with
    ``ΔW₁ = reshape(P (Λ ⊙ Q), (out, in, kh, kw))`` and the base's stride, padding and dilation.

    Shapes: ``x: (N, in, H, W)``, ``y: (N, out, H', W')``, ``lora_A (Q): (init_r, in · kh · kw)`` (a row is a
    flattened ``(in, kh, kw)`` kernel, as peft), ``lora_E (Λ): (init_r, 1)``, ``lora_B (P): (out, init_r)``,
    ``rank_mask: (init_r,)``. The branch runs as two convolutions, ``Q`` (``in → init_r``, the base's kernel) then
    ``P`` (``1 × 1``, ``init_r → out``), which is the same sum as peft's one convolution with the dense ``ΔW`` and
    costs ``init_r · (in · kh · kw + out)`` instead of ``out · in · kh · kw`` multiply-adds per output pixel.

    Raises:
        TypeError: grouped convolutions (peft's reshape of ``P (Λ ⊙ Q)`` into a grouped weight is wrong there)
            and padding modes other than ``"zeros"`` (the branch pads with zeros; merging would differ).
    """

    def __init__(self, cfg: AdaLoRA, module: nn.Conv2d, allocator: RankAllocator, name: str) -> None:
        if module.groups != 1:
            raise TypeError(
                f"AdaLoRA on the grouped convolution {name!r} (groups={module.groups}) is not supported (peft's "
                "SVDConv2d is not either); exclude it from targets"
            )
        if module.padding_mode != "zeros":
            raise TypeError(
                f"AdaLoRA on {name!r} needs zero padding (padding_mode={module.padding_mode!r}); exclude it from "
                "targets"
            )
        kh, kw = module.kernel_size
        super().__init__(cfg, module, allocator, in_dim=module.in_channels * kh * kw)
        self.kernel = (module.in_channels, kh, kw)
        self.conv = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x if self.dropout is None else self.dropout(x)
        A = self.lora_A * self.lora_E  # (r, in · kh · kw)
        h = F.conv2d(x.to(A.dtype), A.view(A.shape[0], *self.kernel), None, **self.conv)  # (N, r, H', W')
        B = self.lora_B
        lora = F.conv2d(h, B.view(*B.shape, 1, 1)) * self.scaling  # (N, out, H', W')
        return y + lora.to(y.dtype)

    def delta_weight(self, module: nn.Module) -> torch.Tensor:
        """``s · P (Λ ⊙ Q)`` as ``(out, in, kh, kw)``."""
        return super().delta_weight(module).view(self.lora_B.shape[0], *self.kernel)
