"""Sparse weight deltas (composable sparse fine-tuning): a few entries of each targeted weight change.

A sparse fine-tuning (Ansell et al. 2022, "Composable Sparse Fine-Tuning for Cross-Lingual Transfer", §3; Guo et al.
2021, "Parameter-Efficient Transfer Learning with Diff Pruning", §3) stores, per targeted weight ``θ``, the flat
positions ``i_1 < … < i_K`` and values ``v_k`` of a sparse difference vector ``φ``::

    θ' = θ + φ           φ[i_k] = v_k,  φ = 0 elsewhere           (K ≪ numel(θ))

The base weights never change (the delta is added to the module's output, or folded in by ``merge``); several
sparse adapters active together add up (``additive``), which is how a language SFT and a task SFT compose.

Addressing: ``indices`` are flat (row-major) positions in the weight **as stored** (``module.weight.view(-1)``: for
``nn.Linear`` ``(out, in)``, for GPT-2's ``Conv1D`` ``(in, out)``, for ``nn.Embedding`` ``(num, dim)``, for
``nn.LayerNorm`` ``(*normalized_shape,)``). With ``bias=True`` the module's bias follows the weight in the same
space: position ``numel(W) + j`` is ``bias[j]``. Indices are unique and sorted; saved as int32 when the space has
fewer than 2³¹ entries (int64 otherwise), values as float: a file holds ``K · (4 + 4)`` bytes per site (float32
values), nothing dense.

Forward (``x: (..., in)``, ``y: (..., out)``; the cheapest *exact* evaluation, chosen per call):

* linear-like (``nn.Linear``, ``Conv1D``): the delta is scattered into a dense ``(out, in)`` matrix once per
  forward and applied with one matmul (``O(out · in)`` to build, then the base layer's matmul cost). Below 0.4% density
  (``K < out · in / 256``) the sparse product ``Δy[..., r_k] += v_k · x[..., c_k]`` (a gather of the ``K`` input
  columns and an ``index_add`` into the outputs, ``O(tokens · K)``, no dense matrix: what large weights need for
  memory) is used instead. Measured forward + backward on CPU over 1,024 tokens (384×384 and 384×1536 weights, one
  thread): the two are even at 0.5% density and the dense form is 4–7× faster at 2% (BLAS matmuls beat index
  scatters), hence the cut. Both give the same numbers up to float summation order.
* ``nn.Embedding``: the touched rows only (a compact table of the distinct rows, looked up through a
  ``(num_embeddings,)`` map), so no dense ``(num, dim)`` delta is built.
* ``nn.LayerNorm``: ``Δy = x̂ ⊙ Δγ + Δβ`` with ``x̂`` the normalized input (the delta is scattered densely; it is
  one vector).

Merging adds the values at their positions in place (``index_add_``); unmerging restores the stored original entries
bit for bit where nobody else changed them since the merge (else it subtracts the values). Per-row routing
(``adapters.route``) batches linear-like sites as one ``bmm`` over the adapters' dense deltas and LayerNorm sites as
per-row gathered vectors; embedding sites run once per adapter.

The entries are chosen by the recipes in :mod:`adapterkit.methods.sparse_recipes` (LT-SFT, diff pruning); a
freshly added ``SparseDelta`` starts at random positions (``density`` of each weight, seeded) with zero values, i.e.
the random-mask sparse fine-tuning baseline.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import backend_for
from ..component import Component
from ..config import AdapterConfig, register

PUBLIC = ("SparseDelta",)
__all__ = ["SparseDelta", "SparseDeltaComponent", "DeltaSpace", "index_dtype", "random_positions"]

# use the gathered sparse product while K < out * in / _SPARSE_RATIO, i.e. below 0.4% density (see the module
# docstring: measured on CPU, the dense scatter + matmul is as fast at 0.5% and 4-7x faster at 2%)
_SPARSE_RATIO = 256


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return None
    return Conv1D


def module_kind(module: nn.Module) -> str | None:
    """``"linear"`` (``nn.Linear``), ``"conv1d"`` (GPT-2 ``Conv1D``), ``"embedding"``, ``"layernorm"``, or None."""
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    return None


def index_dtype(n: int) -> torch.dtype:
    """int32 for spaces of fewer than 2³¹ entries, else int64 (what ``indices`` are stored and saved as)."""
    return torch.int32 if n < 2**31 else torch.int64


def random_positions(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct positions in ``[0, n)``, sorted, drawn uniformly with ``generator`` (int64, CPU); no
    ``(n,)`` permutation is built when ``k`` is small."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    if k > n // 4:
        return torch.randperm(n, generator=generator)[:k].sort().values
    found = torch.zeros(0, dtype=torch.long)
    while found.numel() < k:
        draw = torch.randint(0, n, (2 * k,), generator=generator)
        found = torch.unique(torch.cat([found, draw]))
    keep = torch.randperm(found.numel(), generator=generator)[:k]
    return found[keep].sort().values


class DeltaSpace:
    """The flat parameter space of one module that a weight delta lives in, and how a dense delta over it acts.

    Attributes:
        kind: see :func:`module_kind`.
        weight_shape: ``module.weight.shape`` as stored.
        nw: ``numel(W)``; ``nb``: bias entries included (0 unless ``bias=True`` and the module has a bias);
        n: ``nw + nb``, the size of the space.
    """

    def __init__(self, module: nn.Module, name: str, bias: bool, method: str) -> None:
        kind = module_kind(module)
        w = getattr(module, "weight", None)
        if kind is None or not isinstance(w, torch.Tensor):
            raise TypeError(
                f"{method} cannot act on {name!r} ({type(module).__name__}): it supports nn.Linear, GPT-2 Conv1D, "
                "nn.Embedding and nn.LayerNorm weights; drop it from `targets`"
            )
        if not w.is_floating_point():
            raise TypeError(
                f"{method} cannot act on {name!r}: its weight is {w.dtype} (a quantized base?); sparse deltas need "
                "the dense floating-point weight"
            )
        backend = backend_for(module)
        if backend is not None and tuple(backend.shape(module)) != tuple(w.shape):
            raise TypeError(f"{method} cannot act on {name!r}: its weight is packed (quantized); use a dense base")
        if kind == "embedding" and module.max_norm is not None:
            raise TypeError(
                f"{method} cannot act on {name!r}: nn.Embedding(max_norm=...) renormalizes the rows it looks up, so "
                "an added delta would not be the delta of its weight"
            )
        self.kind = kind
        self.weight_shape = tuple(w.shape)
        self.nw = w.numel()
        b = getattr(module, "bias", None)
        self.nb = b.numel() if bias and isinstance(b, torch.Tensor) else 0
        self.n = self.nw + self.nb
        self.dtype = w.dtype
        self.device = w.device
        if kind in ("linear", "conv1d"):
            self.in_dim, self.out_dim = (w.shape[1], w.shape[0]) if kind == "linear" else (w.shape[0], w.shape[1])
        elif kind == "layernorm":
            self.normalized_shape = tuple(module.normalized_shape)
            self.eps = module.eps

    # --- dense deltas ---------------------------------------------------------------------------------
    def dense(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The ``(n,)`` dense delta with ``values`` at ``indices`` (differentiable in ``values``)."""
        return torch.zeros(self.n, dtype=values.dtype, device=values.device).index_put((indices.long(),), values)

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(n,)`` -> the weight delta (stored shape) and the bias delta (or None)."""
        dw = flat[: self.nw].view(self.weight_shape)
        return dw, (flat[self.nw :] if self.nb else None)

    def apply_dense(self, x: torch.Tensor, y: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """``y`` plus the effect of the dense delta ``flat: (n,)`` on the module's call with input ``x``."""
        dw, db = self.split(flat)
        if self.kind == "embedding":
            return y + F.embedding(x, dw).to(y.dtype)
        xs = x.to(flat.dtype)
        if self.kind == "layernorm":
            return y + F.layer_norm(xs, self.normalized_shape, dw, db, self.eps).to(y.dtype)
        if self.kind == "linear":
            return y + F.linear(xs, dw, db).to(y.dtype)
        out = xs @ dw  # Conv1D: (..., in) @ (in, out)
        return y + (out if db is None else out + db).to(y.dtype)

    # --- sparse deltas --------------------------------------------------------------------------------
    def apply_sparse(
        self, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """``y`` plus the effect of ``values`` at ``indices`` (the cheapest exact way, module docstring)."""
        if values.numel() == 0:
            return y
        if self.kind == "embedding":
            return self._embedding_rows(x, y, indices, values)
        if self.kind in ("linear", "conv1d") and values.numel() * _SPARSE_RATIO < self.nw:
            return self._gathered(x, y, indices, values)
        return self.apply_dense(x, y, self.dense(indices, values))

    def _gathered(
        self, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        idx = indices.long()
        w_part = idx < self.nw
        if self.nb and not bool(w_part.all()):
            bias = torch.zeros(self.nb, dtype=values.dtype, device=values.device).index_put(
                (idx[~w_part] - self.nw,), values[~w_part]
            )
            idx, values = idx[w_part], values[w_part]
        else:
            bias = None
        cols = self.weight_shape[1]
        r, c = idx // cols, idx % cols
        rows, inputs = (r, c) if self.kind == "linear" else (c, r)  # Conv1D stores (in, out)
        h = x.to(values.dtype).index_select(-1, inputs) * values  # (..., K)
        delta = torch.zeros(*x.shape[:-1], self.out_dim, dtype=values.dtype, device=values.device)
        delta = delta.index_add(-1, rows, h)
        if bias is not None:
            delta = delta + bias
        return y + delta.to(y.dtype)

    def _embedding_rows(
        self, ids: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        idx = indices.long()
        dim = self.weight_shape[1]
        rows, cols = idx // dim, idx % dim
        touched, slot = torch.unique(rows, return_inverse=True)  # (R,), (K,)
        table = torch.zeros(touched.numel() + 1, dim, dtype=values.dtype, device=values.device)
        table = table.index_put((slot, cols), values)  # row R stays zero: ids without entries
        lookup = torch.full((self.weight_shape[0],), touched.numel(), dtype=torch.long, device=ids.device)
        lookup[touched.to(ids.device)] = torch.arange(touched.numel(), device=ids.device)
        return y + F.embedding(lookup[ids], table).to(y.dtype)

    # --- canonical deltas for merging ---------------------------------------------------------------
    def canonical(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight delta in the backend's canonical layout (``(out, in)`` for Conv1D too) and the bias delta."""
        dw, db = self.split(flat)
        return (dw.T if self.kind == "conv1d" else dw), db

    def batched_matrix(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight delta as ``(in, out)`` (for ``x @ D``) and the bias delta, for routed linear-like sites."""
        dw, db = self.split(flat)
        return (dw.T if self.kind == "linear" else dw), db


@register("sparse_delta")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseDelta(AdapterConfig):
    """Sparse deltas of weights (indices + values per targeted weight); the format of LT-SFT and diff pruning.

    Args:
        density: share of each targeted weight's entries that a freshly added adapter holds (``ceil(density · n)``
            positions drawn at random with ``seed``, values 0: the random-mask baseline). The recipes
            (``ak.lt_sft``, ``ak.diff_pruning``) choose their own positions and record their overall density here;
            a saved adapter holds exactly the entries it was saved with.
        bias: the modules' biases join their weights' space (position ``numel(W) + j`` is ``bias[j]``).
        seed: seed of the random positions at creation.
        init_weights: False starts the values at ``N(0, 0.02²)`` (not an identity; for tests).
        targets: default ``"all-linear"`` (every linear-like module except output heads, as LoRA's option):
            most of a transformer body's weights. Add ``"embed"`` or ``nn.LayerNorm`` (or name modules) to cover
            embeddings and LayerNorms, as LT-SFT and diff pruning do when they fine-tune every parameter.
    """

    density: float = 0.01
    bias: bool = False
    seed: int = 0
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            isinstance(self.density, bool)
            or not isinstance(self.density, (int, float))
            or not 0 <= self.density <= 1
        ):
            raise ValueError(f"{type(self).__name__} density must be a number in [0, 1], got {self.density!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"{type(self).__name__} seed must be an integer, got {self.seed!r}")

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("all-linear",)

    def accepts(self, module: nn.Module) -> bool:
        return module_kind(module) is not None

    def build(self, module: nn.Module, name: str) -> Component:
        return SparseDeltaComponent(DeltaSpace(module, name, self.bias, type(self).__name__), self, name)


class SparseDeltaComponent(Component):
    """``K`` entries of one module's weight (and bias) space: ``indices: (K,)`` int32/int64, ``values: (K,)``.

    Forward ``y + effect(φ)`` (module docstring); ``merge`` adds the values in place.
    """

    mergeable = True
    additive = True

    def __init__(self, space: DeltaSpace, cfg: SparseDelta, name: str) -> None:
        super().__init__()
        self.space = space
        self._seed = (cfg.seed << 32) + zlib.crc32(name.encode())
        self._random = not cfg.init_weights
        k = min(space.n, math.ceil(cfg.density * space.n))
        gen = torch.Generator().manual_seed(self._seed)
        idx = random_positions(space.n, k, gen)
        self.register_buffer("indices", idx.to(device=space.device, dtype=index_dtype(space.n)))
        self.values = nn.Parameter(torch.zeros(k, dtype=space.dtype, device=space.device))
        self._merge_record: tuple[torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"{self.space.kind}, {self.nnz}/{self.space.n} entries"

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        if self._random:
            gen = torch.Generator().manual_seed(self._seed + 1)
            self.values.copy_(
                0.02 * torch.randn(self.nnz, generator=gen, dtype=torch.float32).to(self.values.dtype)
            )

    # --- entries ---------------------------------------------------------------------------------------
    def set_entries(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Hold ``values`` (default zeros) at the flat positions ``indices`` from now on (sorted here; must be
        distinct and in ``[0, n)``). ``values`` becomes a new Parameter: build optimizers after this call."""
        if self.merged:
            raise ValueError("this sparse delta is merged: unmerge it before changing its entries")
        idx = torch.as_tensor(indices).reshape(-1)
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise ValueError(f"sparse delta indices must be integers, got {idx.dtype}")
        idx = idx.long().cpu()
        if values is None:
            vals = torch.zeros(idx.numel(), dtype=self.values.dtype)
        else:
            vals = torch.as_tensor(values).reshape(-1).detach()
            if vals.numel() != idx.numel():
                raise ValueError(f"got {idx.numel()} indices but {vals.numel()} values; pass one value per index")
            vals = vals.cpu()
        if idx.numel():
            if int(idx.min()) < 0 or int(idx.max()) >= self.space.n:
                raise ValueError(
                    f"sparse delta indices must lie in [0, {self.space.n}) for this {self.space.kind} "
                    f"(weight {self.space.weight_shape}{' + bias' if self.space.nb else ''}), got "
                    f"[{int(idx.min())}, {int(idx.max())}]"
                )
            order = torch.argsort(idx)
            idx, vals = idx[order], vals[order]
            if bool((idx[1:] == idx[:-1]).any()):
                raise ValueError("sparse delta indices must be distinct (each position holds one value)")
        device = self.values.device
        self.indices = idx.to(device=device, dtype=index_dtype(self.space.n))
        grad = self.values.requires_grad
        self.values = nn.Parameter(vals.to(device=device, dtype=self.values.dtype), requires_grad=grad)

    def flat_delta(self) -> torch.Tensor:
        """The dense ``(n,)`` delta (detached)."""
        return self.space.dense(self.indices, self.values.detach())

    # --- forward ---------------------------------------------------------------------------------------
    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.space.apply_sparse(x, y, self.indices, self.values)

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: torch.Tensor, key: Any) -> Any:
        return routed_dense(comps, plan, x, y, key, lambda c: c.space.dense(c.indices, c.values))

    # --- merging -----------------------------------------------------------------------------------------
    def delta_weight(self, module: nn.Module) -> torch.Tensor | None:
        if self.space.kind == "layernorm":
            return None  # no weight backend: merge() writes the entries itself
        return self.space.canonical(self.flat_delta())[0]

    def delta_bias(self, module: nn.Module) -> torch.Tensor | None:
        return self.space.canonical(self.flat_delta())[1]

    def _flat_params(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = module.weight.data
        b = module.bias.data if self.space.nb else None
        return w.view(-1), (None if b is None else b.view(-1))

    def check_merge(self, module: nn.Module) -> None:
        w = module.weight.data
        if not w.is_contiguous() or (self.space.nb and not module.bias.data.is_contiguous()):
            raise TypeError("cannot be merged: the module's weight is not contiguous")

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        """Add the values at their positions in place; the original entries are kept for an exact unmerge."""
        if self.merged:
            return
        self.check_merge(module)
        w, b = self._flat_params(module)
        idx, vals = self.indices.long(), self.values.detach()
        iw = idx < self.space.nw
        before_w = w[idx[iw]].clone()
        w.index_add_(0, idx[iw], vals[iw].to(w.dtype))
        record = [before_w, w[idx[iw]].clone()]
        if b is not None:
            ib = idx[~iw] - self.space.nw
            before_b = b[ib].clone()
            b.index_add_(0, ib, vals[~iw].to(b.dtype))
            record += [before_b, b[ib].clone()]
        self._merge_record = tuple(record)
        self.merged = True

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        """Entries nobody changed since the merge get their original value back bit for bit; others lose the
        values by subtraction."""
        if not self.merged:
            return
        w, b = self._flat_params(module)
        idx, vals = self.indices.long(), self.values.detach()
        iw = idx < self.space.nw
        rec = self._merge_record
        parts = [(w, idx[iw], vals[iw], rec[0], rec[1])]
        if b is not None:
            parts.append((b, idx[~iw] - self.space.nw, vals[~iw], rec[2], rec[3]))
        for t, where, v, before, after in parts:
            now = t[where]
            t[where] = torch.where(now == after, before, now - v.to(t.dtype))
        self._merge_record = None
        self.merged = False

    # --- saving --------------------------------------------------------------------------------------------
    def import_state(self, state: dict[str, torch.Tensor], module: nn.Module) -> None:
        """Take ``indices``/``values`` of any length ``K`` (the file's entries), checked: 1-D, equal length,
        integer indices of this space's index dtype, distinct, in range."""
        missing = sorted({"indices", "values"} - set(state))
        extra = sorted(set(state) - {"indices", "values"})
        if missing or extra:
            raise ValueError(f"tensors do not match the component: missing {missing}, unexpected {extra}")
        idx, vals = state["indices"], state["values"]
        if idx.dim() != 1 or vals.dim() != 1 or idx.numel() != vals.numel():
            raise ValueError(
                f"sparse delta entries must be two 1-D tensors of one length, got indices {tuple(idx.shape)} and "
                f"values {tuple(vals.shape)}"
            )
        if idx.dtype != index_dtype(self.space.n):
            raise ValueError(f"'indices' is {idx.dtype} in the file; it holds {index_dtype(self.space.n)} values")
        self.set_entries(idx, vals.to(self.values.dtype))


def routed_dense(
    comps: list[Component | None], plan: Any, x: torch.Tensor, y: torch.Tensor, key: Any, flat
) -> Any:
    """Per-row routing of weight deltas given as dense ``(n,)`` vectors (``flat(component)``): linear-like sites as
    one ``bmm`` over the stacked ``(G, in, out)`` deltas, LayerNorm sites as per-row gathered ``Δγ``/``Δβ``;
    embeddings (and anything else) return None (one call per adapter)."""
    live = [c for c in comps if c is not None]
    space = live[0].space
    dtype = next(p.dtype for p in live[0].parameters())
    if space.kind in ("linear", "conv1d"):

        def build() -> tuple[torch.Tensor, torch.Tensor | None]:
            mats, biases = [], []
            for c in comps:
                if c is None:
                    mats.append(torch.zeros(space.in_dim, space.out_dim, dtype=dtype, device=y.device))
                    biases.append(torch.zeros(space.out_dim, dtype=dtype, device=y.device))
                    continue
                m, b = c.space.batched_matrix(flat(c))
                mats.append(m)
                biases.append(b if b is not None else torch.zeros_like(m[0]))
            with_bias = any(c is not None and c.space.nb for c in comps)
            return torch.stack(mats), (torch.stack(biases)[:, None, :] if with_bias else None)

        mats, bias = plan.stacked((key, "weight_delta"), build)
        h = plan.gather(x.to(mats.dtype))  # (G, m * rest, in)
        if bias is None:
            return plan.scatter_add(y, torch.bmm(h, mats))
        return plan.scatter_add(y, torch.baddbmm(bias, h, mats))
    if space.kind == "layernorm":

        def build_rows() -> tuple[torch.Tensor, torch.Tensor]:
            zero = torch.zeros(space.nw, dtype=dtype, device=y.device)
            gam, bet = [], []
            for c in [*comps, None]:
                if c is None:
                    gam.append(zero)
                    bet.append(zero)
                    continue
                dw, db = c.space.split(flat(c))
                gam.append(dw.reshape(-1))
                bet.append(db.reshape(-1) if db is not None else zero)
            return torch.stack(gam), torch.stack(bet)  # (G + 1, d): the last row for base rows

        gam, bet = plan.stacked((key, "norm_delta"), build_rows)
        xs = x.to(gam.dtype)
        xhat = F.layer_norm(xs, space.normalized_shape, None, None, space.eps)
        shape = (x.shape[0], *([1] * (x.dim() - 1 - len(space.normalized_shape))), *space.normalized_shape)
        g = gam.index_select(0, plan.row_group).view(shape)
        b = bet.index_select(0, plan.row_group).view(shape)
        return y + (xhat * g + b).to(y.dtype)
    return None
