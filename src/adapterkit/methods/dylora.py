"""DyLoRA (Valipour et al. 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic
Search-Free Low-Rank Adaptation"): one LoRA trained for every rank ``b ≤ r_max`` at once.

Each training step draws ``b ~ U{r_min, …, r_max}`` (§3, the distribution ``p_B``) and trains the nested
truncation of the factors (§3, Eq. 4-5)::

    y = W x + (α / b) · B[:, :b] A[:b, :] x          A: (r_max, in), B: (out, r_max)

        x ──────────────► W ──────────────────┐
        │                                     (+) ──► y
        └─► dropout ─► A[:b] ─► B[:, :b] ─► ·α/b

* ``frozen=True`` (Algorithm 1, the paper's default): only the ``b``-th row of ``A`` and column of ``B`` get
  gradients in that step; rows/columns ``< b`` enter the forward detached ("frozen"), so ranks already learned are
  not disturbed. ``frozen=False`` trains the whole truncation (the paper's ablation, §5). An optimizer with weight
  decay still decays every row, as in the paper's code.
* One ``b`` per step for the whole adapter (every site truncates to the same rank), drawn from a generator seeded
  with ``(seed, step)``: runs are reproducible and a resumed run draws what the uninterrupted one did. The draw
  lives in the adapter's :class:`~adapterkit.component.Bank` and advances in ``on_step`` (``adapters.step()``, the
  Trainer callback): training DyLoRA without it raises instead of training one fixed rank.
* At inference (eval mode) any ``r_min ≤ b ≤ r_max`` can be chosen, search-free: ``rank=`` in the config or
  ``adapters.set_rank(name, b)`` (recorded in the saved config). Merging merges that rank; the file always holds
  the whole ``r_max`` factors.
* Init as LoRA (§4.1 of Hu et al.): ``A`` Kaiming-uniform, ``B = 0`` (the component is LoRA's, see
  :class:`~adapterkit.methods.lora.LoRALinear`, with a rank-dependent forward).

Works on ``nn.Linear`` and GPT-2 ``Conv1D``. peft has no DyLoRA; a trained adapter at a chosen rank exports to
vLLM like any mergeable method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import backend_for
from ..component import Bank, Component
from ..config import AdapterConfig, register
from .lora import Bias, LoRAInit, LoRALinear

PUBLIC = ("DyLoRA",)
__all__ = ["DyLoRA", "DyLoRALinear", "RankDraw"]


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@register("dylora")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DyLoRA(AdapterConfig):
    """Dynamic-rank LoRA of linear-like modules.

    Args:
        r_max: the largest rank (the factors' size, > 0).
        r_min: the smallest rank drawn in training (1 ≤ r_min ≤ r_max).
        rank: the rank used outside training and when merging (``r_min ≤ rank ≤ r_max``; None: ``r_max``).
        alpha: scaling numerator; rank ``b`` is scaled by ``alpha / b`` (§3, Eq. 5).
        frozen: train only the drawn rank's row/column each step (Algorithm 1); False trains all ranks ≤ b.
        dropout: dropout probability on the branch input.
        seed: seed of the rank draws.
        init_weights: False starts B random too (not an identity; for tests).
        targets: default ``["attn.q", "attn.v"]`` (``"attn.qkv"`` on GPT-2), as LoRA.
    """

    # what LoRA's component reads from its config: DyLoRA has none of these options
    dora: ClassVar[bool] = False
    bias: ClassVar[Bias] = Bias.NONE
    init: ClassVar[LoRAInit] = LoRAInit.DEFAULT

    r_max: int = 8
    r_min: int = 1
    rank: int | None = None
    alpha: float = 8.0
    frozen: bool = True
    dropout: float = 0.0
    seed: int = 0
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _positive_int(self.r_max):
            raise ValueError(f"DyLoRA r_max must be a positive integer, got r_max={self.r_max!r}")
        if not _positive_int(self.r_min) or self.r_min > self.r_max:
            raise ValueError(
                f"DyLoRA r_min must be an integer in [1, r_max={self.r_max}], got r_min={self.r_min!r}"
            )
        if self.rank is not None and (not _positive_int(self.rank) or not self.r_min <= self.rank <= self.r_max):
            raise ValueError(
                f"DyLoRA rank must be an integer in [r_min={self.r_min}, r_max={self.r_max}] (the ranks it was trained "
                f"for), got rank={self.rank!r}"
            )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"DyLoRA alpha must be a number, got alpha={self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DyLoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"DyLoRA seed must be an integer, got {self.seed!r}")

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("attn.qkv",) if "attn.q" not in roles and "attn.qkv" in roles else ("attn.q", "attn.v")

    def accepts(self, module: nn.Module) -> bool:
        backend = backend_for(module)
        return backend is not None and backend.kind == "linear"

    @property
    def inference_rank(self) -> int:
        return self.r_max if self.rank is None else self.rank

    def with_rank(self, r: int) -> DyLoRA:
        """This config at inference rank ``r`` (validated; used by ``adapters.set_rank``)."""
        return dataclasses.replace(self, rank=r)

    # LoRA's component asks its config for these
    def rank_for(self, name: str) -> int:
        return self.r_max

    def scaling_for(self, name: str) -> float:
        return self.alpha / self.r_max

    def build(self, module: nn.Module, name: str, draw: RankDraw | None = None) -> Component:
        if not self.accepts(module):
            raise TypeError(
                f"DyLoRA cannot act on {name!r} ({type(module).__name__}): it supports nn.Linear and Conv1D"
            )
        return DyLoRALinear(self, module, name, draw if draw is not None else RankDraw(self))

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        draw = RankDraw(self)  # one rank per step for the whole adapter
        return {n: self.build(modules[n], n, draw) for n in targets}


class RankDraw(Bank):
    """The rank ``b`` of the current training step, shared by every site of one DyLoRA adapter (no tensors).

    ``b`` for step ``t`` is drawn from ``U{r_min, …, r_max}`` with a generator seeded by ``(seed, t)``."""

    def __init__(self, cfg: DyLoRA) -> None:
        super().__init__()
        self.r_min, self.r_max, self.seed = cfg.r_min, cfg.r_max, cfg.seed
        self.step = 0
        self.b = self.draw(0)

    def draw(self, step: int) -> int:
        g = torch.Generator().manual_seed((self.seed << 32) + step)
        return int(torch.randint(self.r_min, self.r_max + 1, (1,), generator=g))

    def advance(self, step: int) -> None:
        """The rank of step ``step`` (idempotent: every site calls it)."""
        if step != self.step:
            self.step, self.b = step, self.draw(step)

    def extra_repr(self) -> str:
        return f"ranks {self.r_min}..{self.r_max}, step {self.step}: b={self.b}"


class DyLoRALinear(LoRALinear):
    """DyLoRA on a linear-like module. In training mode ``y + (α/b) B[:, :b] A[:b] x`` with the step's ``b``;
    otherwise the same at the inference rank.

    Shapes: ``x: (..., in)``, ``y: (..., out)``, ``lora_A: (r_max, in)``, ``lora_B: (out, r_max)``.
    """

    scheduled = True

    def __init__(self, cfg: DyLoRA, module: nn.Module, name: str, draw: RankDraw) -> None:
        super().__init__(cfg, module, name)
        self.share(draw, "draw")
        self.r_max, self.alpha, self.frozen = cfg.r_max, float(cfg.alpha), cfg.frozen
        self.rank = cfg.inference_rank
        self.additive = True

    def extra_repr(self) -> str:
        return f"r_max={self.r_max}, rank={self.rank}, alpha={self.alpha:g}" + (", frozen" if self.frozen else "")

    # --- the training-time hooks -----------------------------------------------------------------
    def on_train_begin(self, total_steps: int | None, step: int = 0) -> None:
        self.draw.advance(step)

    def on_step(self, step: int) -> None:
        self.draw.advance(step + 1)  # the rank of the next step

    def set_rank(self, r: int) -> None:
        if not _positive_int(r) or r > self.r_max:
            raise ValueError(f"DyLoRA rank must be an integer in [1, {self.r_max}], got {r!r}")
        if self.merged:
            raise ValueError("this DyLoRA component is merged: unmerge it before changing its rank")
        self.rank = r

    # --- forward / merge ---------------------------------------------------------------------------
    def current_rank(self) -> int:
        return self.draw.b if self.training else self.rank

    def factors(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``A[:b]: (b, in)`` and ``B[:, :b]: (out, b)``; in frozen training, ranks ``< b`` detached."""
        A, B = self.lora_A[:b], self.lora_B[:, :b]
        if self.training and self.frozen and b > 1 and torch.is_grad_enabled():
            A = torch.cat([A[: b - 1].detach(), A[b - 1 :]], dim=0)
            B = torch.cat([B[:, : b - 1].detach(), B[:, b - 1 :]], dim=1)
        return A, B

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = self.current_rank()
        A, B = self.factors(b)
        h = F.linear(self._drop(x), A)  # (..., b)
        return y + (F.linear(h, B) * (self.alpha / b)).to(y.dtype)

    def delta_weight(self, module: nn.Module) -> torch.Tensor:
        """``(α/rank) B[:, :rank] A[:rank]``: ``(out, in)``."""
        r = self.rank
        return (self.lora_B[:, :r].detach() @ self.lora_A[:r].detach()) * (self.alpha / r)

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: torch.Tensor, key: Any) -> Any:
        """LoRA's batched routing over the inference-rank truncations (training mode falls back to one call per
        adapter)."""
        live = [c for c in comps if c is not None]
        if any(c.training for c in live):
            return None
        views = [
            None
            if c is None
            else SimpleNamespace(
                lora_A=c.lora_A[: c.rank],
                lora_B=c.lora_B[:, : c.rank],
                r=c.rank,
                scaling=c.alpha / c.rank,
                magnitude=None,
                bias=None,
                dropout=c.dropout,
                training=False,
                out_dim=c.out_dim,
            )  # fmt: skip
            for c in comps
        ]
        ranks = tuple(None if c is None else c.rank for c in comps)
        return LoRALinear.routed.__func__(LoRALinear, views, plan, x, y, (key, "dylora", ranks))
