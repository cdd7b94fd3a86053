"""Composition blocks (AdapterHub semantics) and per-row routing plans.

What is active is a sequence of items, each an adapter name or a block; the items apply one after the
other at every site (so ``activate("a", "b")`` is ``Stack("a", "b")``; for additive adapters such as
LoRA this is the sum of their deltas, peft's semantics for several active adapters). Blocks:

==============  ===========================================================================================
``Stack``       children one after another: the output of one feeds the next (MAD-X language + task).
``Average``     ``y + sum_i w_i (child_i(y) - y)``: for weights summing to 1 the weighted average of the
                children's outputs; negative weights subtract a child's effect (``combine="outputs"``:
                ``sum_i w_i child_i(y)``, no base term: AdapterHub's bottleneck Average).
``Split``       by sequence position: positions ``[0, s1)`` use child 0, ``[s1, s2)`` child 1, ... (``length``:
                the one sequence length it is for, as AdapterHub's Split).
``BatchSplit``  by rows: the first ``n1`` rows use child 0, the next ``n2`` child 1, ...
``Parallel``    the batch is replicated once per child in one forward pass; rows ``[i B, (i+1) B)`` of the
                outputs belong to child ``i`` (multi-task inference, also with ``generate()``).
``Fuse``        AdapterFusion (Pfeiffer et al. 2021, §3): per-site attention over the children's outputs,
                with weights added by ``Adapters.add_fusion`` and trained by ``Adapters.train_fusion``; a
                ``Stack`` child counts as its last adapter (AdapterHub's: its weights, its change).
``Branch``      side by side on one output: every child gets the same output (and call) of a site; at the model
                root the values they add (each head's ``logits``) come back as a list, one entry per child (several
                heads on the same rows); at any other site at most one child may change the output.
==============  ===========================================================================================

At a module returning a tuple (attention modules) the blocks combine its first element and keep the rest. At the
model root (a ``ModelOutput``: flex heads sit there) ``Parallel`` and ``BatchSplit`` give each child its rows of
the output; a value the children add or replace (each head's ``logits``) comes back as a list, one entry per child
(AdapterHub's ``MultiHeadOutput``); ``Branch`` does the same with every child on all rows.

Allowed nestings (anything else raises ``ValueError`` when activated):

==============  =============================================================================
block           children may be
==============  =============================================================================
``Stack``       names, ``Average``, ``Split``, ``BatchSplit``, ``Fuse``, ``Branch``, ``Stack``
``Average``     names, ``Stack``, ``Average``
``Split``       names, ``Stack``, ``Average``, ``Fuse``
``BatchSplit``  names, ``Stack``, ``Average``, ``Split``, ``Fuse``
``Parallel``    names, ``Stack``, ``Average``, ``Split``, ``Fuse``; Parallel itself only at the top level
``Fuse``        names, ``Stack``
``Branch``      names, ``Stack``
==============  =============================================================================

Components that transform a module's *input* (``has_pre``) apply in stacking order only; under
``Average``/``Split``/``BatchSplit``/``Fuse``/``Branch`` they raise, since one module call cannot take several inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch

__all__ = [
    "Block",
    "Stack",
    "Average",
    "Split",
    "BatchSplit",
    "Parallel",
    "Fuse",
    "Branch",
    "RoutePlan",
    "last_name",
    "names_in",
    "validate",
]


class Block:
    """A composition node: ``children`` are adapter names or blocks."""

    allowed: tuple[type, ...] = ()

    def __init__(self, *children: str | Block) -> None:
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])
        if not children:
            raise ValueError(f"{type(self).__name__} needs at least one adapter")
        for c in children:
            if not isinstance(c, (str, Block)):
                raise TypeError(f"{type(self).__name__} children are adapter names or blocks, got {c!r}")
        self.children: tuple[str | Block, ...] = tuple(children)

    def _extra(self) -> str:
        return ""

    def __repr__(self) -> str:
        inner = ", ".join(repr(c) for c in self.children)
        return f"{type(self).__name__}({inner}{self._extra()})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))


class Stack(Block):
    """Children applied one after another at each site."""


class Average(Block):
    """Weighted average of the children's outputs (``weights`` default: uniform; may be negative).

    ``combine="changes"`` (default): ``y + sum_i w_i (child_i(y) - y)``, the children's changes weighted (negative
    weights subtract an effect; weights summing to 1 give the weighted average of the outputs).
    ``combine="outputs"``: ``sum_i w_i child_i(y)``, the weighted outputs summed with no base term: equal to the
    default when the weights sum to 1, otherwise the base output is scaled too. AdapterHub's ``Average`` of sequential
    bottleneck adapters is this with its weights divided by the number of children (``adapters`` 1.3.0 takes
    ``mean(w_i h_i)`` of the adapters' states); setups read from its files use it. Under ``"outputs"`` every child
    must act at the same modules (a child without an adapter at a module where another has one raises
    ``ValueError``); where no child acts, the output stays as it is.
    """

    def __init__(
        self, *children: str | Block, weights: Sequence[float] | None = None, combine: str = "changes"
    ) -> None:
        super().__init__(*children)
        n = len(self.children)
        self.weights = tuple(float(w) for w in weights) if weights is not None else (1.0 / n,) * n
        if len(self.weights) != n:
            raise ValueError(f"Average got {n} adapters but {len(self.weights)} weights")
        if combine not in ("changes", "outputs"):
            raise ValueError(f"Average combine must be 'changes' or 'outputs', got {combine!r}")
        self.combine = combine

    def _extra(self) -> str:
        return f", weights={list(self.weights)}" + (
            f", combine={self.combine!r}" if self.combine != "changes" else ""
        )


class Split(Block):
    """By sequence position: ``splits=[s1, ...]`` are the first positions of children 1, 2, ...

    ``length``: the one sequence length this split is for (None: any; positions past a cut beyond the sequence go to
    no child). Set, other lengths raise ``ValueError``: AdapterHub's ``Split`` holds each part's length, summing to
    the sequence length (``Split("a", "b", splits=[3, 5])`` there is ``Split("a", "b", splits=[3], length=8)`` here).
    """

    def __init__(self, *children: str | Block, splits: Sequence[int] | int, length: int | None = None) -> None:
        super().__init__(*children)
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise ValueError(f"Split length must be a positive integer or None, got {length!r}")
        self.length = length
        self.splits = (int(splits),) if isinstance(splits, int) else tuple(int(s) for s in splits)
        if len(self.splits) != len(self.children) - 1 or any(s <= 0 for s in self.splits):
            raise ValueError(
                f"Split of {len(self.children)} adapters needs {len(self.children) - 1} positive split positions, "
                f"got {list(self.splits)}"
            )
        if list(self.splits) != sorted(self.splits):
            raise ValueError(f"Split positions must increase, got {list(self.splits)}")
        if length is not None and self.splits[-1] >= length:
            raise ValueError(f"Split positions {list(self.splits)} must lie inside the length {length}")

    def _extra(self) -> str:
        return f", splits={list(self.splits)}" + (f", length={self.length}" if self.length is not None else "")


class BatchSplit(Block):
    """By rows: ``batch_sizes=[n1, n2, ...]`` rows go to each child in order (they must sum to the batch)."""

    def __init__(self, *children: str | Block, batch_sizes: Sequence[int]) -> None:
        super().__init__(*children)
        self.batch_sizes = tuple(int(n) for n in batch_sizes)
        if len(self.batch_sizes) != len(self.children) or any(n < 0 for n in self.batch_sizes):
            raise ValueError(
                f"BatchSplit of {len(self.children)} adapters needs as many non-negative batch sizes, "
                f"got {list(self.batch_sizes)}"
            )

    def _extra(self) -> str:
        return f", batch_sizes={list(self.batch_sizes)}"


class Parallel(Block):
    """Replicate the batch once per child; rows ``[i B, (i+1) B)`` of the output belong to child ``i``."""


class Fuse(Block):
    """AdapterFusion over the children (their fusion weights come from ``Adapters.add_fusion``).

    A ``Stack`` child is represented by its last adapter, as in AdapterHub: the fusion weights are those over the
    children's last adapters (``Fuse(Stack("a", "b"), "c").name == "fusion[b,c]"``, made by
    ``add_fusion(["b", "c"])``), and at each site the child's value is the site's output plus the change its last
    acting item made there, ``y + (o - x)`` (``x``: what that item received, after the Stack's earlier items; ``o``:
    the Stack's output), AdapterHub's ``bottleneck_up`` of the Stack's last adapter. An adapter-name child's value is
    its output ``o`` (the same formula with ``x = y``).
    """

    @property
    def name(self) -> str:
        """The name under which ``add_fusion`` stores this fusion's weights (a Stack child: its last adapter)."""
        return fusion_name([last_name(c) for c in self.children])


def last_name(item: str | Block) -> str:
    """The last adapter name of an item (AdapterHub's ``last()``): the item itself, else its last child's."""
    return item if isinstance(item, str) else last_name(item.children[-1])


class Branch(Block):
    """Children side by side on one output: each gets the same output of every site (and the same call), none sees
    another's changes.

    At the model root (a ``ModelOutput``: where flex heads sit) the values the children add or replace come back as a
    list, one entry per child in order (a child that changed nothing gives its input's value there, or None): so
    ``ak.Stack("a", "b", ak.Branch("head_x", "head_y"))`` runs both heads on the output of the stack and returns
    ``out.logits == [logits_x, logits_y]``, AdapterHub's several heads on the same rows (``active_head = ["x", "y"]``,
    ``MultiHeadOutput``). At any other site at most one child may change the output (``ValueError`` otherwise: a
    Branch holds side-by-side results, it does not combine them); children that only observe are run.
    """


def fusion_name(children: Sequence[str]) -> str:
    return "fusion[" + ",".join(children) + "]"


Stack.allowed = (str, Stack, Average, Split, BatchSplit, Fuse, Branch)
Average.allowed = (str, Stack, Average)
Split.allowed = (str, Stack, Average, Fuse)
BatchSplit.allowed = (str, Stack, Average, Split, Fuse)
Parallel.allowed = (str, Stack, Average, Split, Fuse)
Fuse.allowed = (str, Stack)
Branch.allowed = (str, Stack)


def names_in(item: str | Block) -> Iterator[str]:
    """Adapter names used by an item (depth first; fusion weights included)."""
    if isinstance(item, str):
        yield item
        return
    for c in item.children:
        yield from names_in(c)
    if isinstance(item, Fuse):
        yield item.name


def validate(items: Sequence[str | Block]) -> None:
    """Raise ``ValueError`` for nestings outside the table in this module's docstring."""

    def check(block: Block) -> None:
        for c in block.children:
            if not isinstance(c, block.allowed):
                raise ValueError(
                    f"{type(c).__name__} cannot be nested in {type(block).__name__}: allowed children of "
                    f"{type(block).__name__} are {', '.join('names' if t is str else t.__name__ for t in block.allowed)}"
                )
            if isinstance(c, Block):
                check(c)

    for i, item in enumerate(items):
        if isinstance(item, Parallel) and len(items) > 1:
            raise ValueError("Parallel must be the only active item (it replicates the whole batch)")
        if isinstance(item, Block):
            check(item)
        elif not isinstance(item, str):
            raise TypeError(f"active item {i} must be an adapter name or a block, got {item!r}")


# --- per-row routing ---------------------------------------------------------------------------------
class Segments(NamedTuple):
    """Rows of :meth:`RoutePlan.segments`, grouped by adapter: ``order`` (``(n,)``) lists the batch rows of the
    adapters that take part, adapter by adapter; ``spans`` holds ``(g, start, count)`` per adapter ``g`` (index
    into ``adapters``), its rows being ``order[start : start + count]``; ``identity`` when ``order`` is the whole
    batch in order (no gather or scatter needed)."""

    order: torch.Tensor
    spans: tuple[tuple[int, int, int], ...]
    identity: bool


class RoutePlan:
    """Which rows of a batch run which adapter, laid out for gathered batched matmuls.

    The ``G`` routed adapters each get ``m`` slots (``m`` = the largest number of rows of one adapter);
    ``index[g * m + j]`` is the batch row in slot ``j`` of adapter ``g`` (short groups repeat their last
    row; ``real`` marks the slots that count). Batched components gather ``x[index]`` as ``(G, m * L, in)``,
    run one ``bmm`` per factor against weights stacked as ``(G, ...)`` and add the result back to ``rows``.

    Attributes:
        adapters: the ``G`` adapter names, in ``order`` (default: first appearance).
        groups: ``(name, rows)`` pairs (rows: ``LongTensor``), as used by the per-adapter fallback.
        batch: number of rows in the batch.
        row_group: ``(batch,)`` index of each row's adapter in ``adapters`` (``G`` for base rows), for
            components that gather one small tensor per row (e.g. (IA)^3 vectors).
        uniform: the adapter name when every row runs that one adapter (sites then run it unrouted), else None.
        cache: per-site stacked weights, reused while no gradient is recorded (e.g. decode steps); the
            controller passes a cache shared by plans over the same adapters with unchanged weights.
    """

    def __init__(
        self,
        names: Sequence[str | None],
        device: torch.device,
        order: Sequence[str] | None = None,
        cache: dict[Any, Any] | Callable[[], dict[Any, Any]] | None = None,
    ) -> None:
        groups: dict[str, list[int]] = {}
        for row, n in enumerate(names):
            if n is not None:
                groups.setdefault(n, []).append(row)
        if order is not None:
            rank = {n: i for i, n in enumerate(order)}
            groups = dict(sorted(groups.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        self.batch = len(names)
        self.adapters: tuple[str, ...] = tuple(groups)
        self.groups = tuple((n, torch.tensor(r, dtype=torch.long, device=device)) for n, r in groups.items())
        self._group_rows = tuple(groups.values())  # each adapter's batch rows, in `adapters` order
        self.m = max((len(r) for r in groups.values()), default=0)
        slots, real = [], []
        for rows in groups.values():
            slots += rows + [rows[-1]] * (self.m - len(rows))
            real += [True] * len(rows) + [False] * (self.m - len(rows))
        self.index = torch.tensor(slots, dtype=torch.long, device=device)
        self.padded = not all(real)
        self.real = torch.tensor([i for i, r in enumerate(real) if r], dtype=torch.long, device=device)
        self.rows = self.index.index_select(0, self.real) if self.padded else self.index
        # row -> its adapter's position in `adapters`, or G for rows that run the base model
        group = [len(groups)] * self.batch
        for g, rows in enumerate(groups.values()):
            for r in rows:
                group[r] = g
        self.row_group = torch.tensor(group, dtype=torch.long, device=device)
        # every row runs one adapter: sites take the ordinary (unrouted) path for it
        self.uniform: str | None = self.adapters[0] if len(groups) == 1 and self.m == self.batch else None
        # gathering is a no-op when slots are the batch rows in order
        self.identity = not self.padded and len(slots) == self.batch and slots == list(range(self.batch))
        self._cache = cache
        self.local: dict[Any, Any] = {}

    @property
    def cache(self) -> dict[Any, Any]:
        """The shared stacked-weight cache; a callable given as ``cache`` is called on first use (finding the
        controller's cache for a set of adapters reads every parameter's version: plans whose components
        never ask for it skip that)."""
        if self._cache is None:
            self._cache = {}
        elif callable(self._cache):
            self._cache = self._cache()
        return self._cache

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (batch, *rest, d)`` -> ``(G, m * prod(rest), d)``."""
        xs = x if self.identity else x.index_select(0, self.index)
        return xs.reshape(len(self.adapters), -1, x.shape[-1])

    def scatter_add(self, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Add ``delta: (G, m * prod(rest), out)`` to the rows of ``y: (batch, *rest, out)`` it belongs to."""
        d = delta.reshape(len(self.adapters) * self.m, *y.shape[1:])
        if self.padded:
            d = d.index_select(0, self.real)
        if self.identity:
            return y.add_(d) if not torch.is_grad_enabled() else y + d.to(y.dtype)
        if not torch.is_grad_enabled():
            return y.index_add_(0, self.rows, d.to(y.dtype))
        return y.index_add(0, self.rows, d.to(y.dtype))

    def scatter_bmm(self, y: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``scatter_add(y, bmm(h, w))`` for ``h: (G, m * prod(rest), k)``, ``w: (G, k, out)``; when the rows
        are already grouped in order (``identity``) and no gradient is recorded, the product is accumulated
        into ``y`` in place (one ``baddbmm_``, no temporary)."""
        if self.identity and not torch.is_grad_enabled() and y.is_contiguous() and y.dtype == h.dtype:
            y.view(len(self.adapters), -1, y.shape[-1]).baddbmm_(h, w)
            return y
        return self.scatter_add(y, torch.bmm(h, w))

    def segments(self, present: tuple[bool, ...]) -> Segments:
        """The rows of the adapters with ``present[g]`` (those that have a component at a site), grouped by
        adapter, for one matrix product per adapter on contiguous rows against the adapter's own weights (no
        weights copied or stacked: Punica's SGMV, segment by segment; on CPUs these small products cost about
        what one ``bmm`` over stacked weights does, and nothing has to be restacked when the batch changes).
        Computed once per plan and ``present`` tuple (sites with the same adapters share it)."""
        cache_key = ("segments", present)
        found = self.local.get(cache_key)
        if found is not None:
            return found
        order: list[int] = []
        spans = []
        for g, rows in enumerate(self._group_rows):
            if present[g]:
                spans.append((g, len(order), len(rows)))
                order += rows
        identity = order == list(range(self.batch))
        out = Segments(torch.tensor(order, dtype=torch.long, device=self.row_group.device), tuple(spans), identity)
        self.local[cache_key] = out
        return out

    def stacked(self, key: Any, build: Any, per_plan: bool = False) -> Any:
        """``build()`` once per key while no gradient is recorded (weights cannot change then). ``per_plan``:
        the value depends on this plan's row assignment, so it is kept for this plan only (not shared with
        later ``route()`` blocks over the same adapters)."""
        if torch.is_grad_enabled():
            return build()
        cache = self.local if per_plan else self.cache
        if key not in cache:
            cache[key] = build()
        return cache[key]


# --- applying blocks at one site ------------------------------------------------------------------------
def _slice(value: Any, dim: int, start: int, stop: int, size: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > dim and value.shape[dim] == size:
        return value.narrow(dim, start, stop - start)
    return value


def _sliced_call(args: tuple, kwargs: dict, dim: int, start: int, stop: int, size: int) -> tuple[tuple, dict]:
    return (
        tuple(_slice(a, dim, start, stop, size) for a in args),
        {k: _slice(v, dim, start, stop, size) for k, v in kwargs.items()},
    )


def _tensor(y: Any, block: Block) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{type(block).__name__} needs a tensor output at each site, got {type(y).__name__}")
    return y


def _segments(block: Block, y: torch.Tensor, dim: int) -> list[tuple[int, int]]:
    size = y.shape[dim]
    if isinstance(block, Split):
        if block.length is not None and size != block.length:
            raise ValueError(f"{block!r} is for sequences of {block.length} positions, got {size}")
        cuts = [0, *(min(s, size) for s in block.splits), size]
    elif isinstance(block, BatchSplit):
        if sum(block.batch_sizes) != size:
            raise ValueError(
                f"BatchSplit batch_sizes {list(block.batch_sizes)} do not sum to the batch size {size}"
            )
        cuts = [0]
        for n in block.batch_sizes:
            cuts.append(cuts[-1] + n)
    else:  # Parallel: equal blocks of rows
        k = len(block.children)
        if size % k:
            raise ValueError(f"Parallel over {k} adapters got a batch of {size} rows, not a multiple of {k}")
        cuts = [i * size // k for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _acts(item: str | Block, comps: dict[str, Any]) -> bool:
    """Whether ``item`` changes this site's output: one of its adapters has an unmerged output component here that
    is not an observer."""
    for n in names_in(item):
        c = comps.get(n)
        if c is not None and not c.merged and c.has_post and not getattr(c, "observer", False):
            return True
    return False


def _sum_outputs(
    item: Average, comps: dict[str, Any], args: tuple, kwargs: dict, base: torch.Tensor
) -> torch.Tensor:
    """``Average(combine="outputs")``: ``sum_i w_i child_i(y)`` where the children act; ``y`` where none does."""
    acting = [_acts(child, comps) for child in item.children]
    if not any(acting):  # observers only (e.g. residual taps): let them record, change nothing
        for child in item.children:
            base = apply_post(child, comps, args, kwargs, base)
        return base
    if not all(acting):
        idle = [repr(c) for c, a in zip(item.children, acting) if not a]
        raise ValueError(
            f"{item!r}: {', '.join(idle)} has no adapter at a module where the other children have one; with "
            "combine='outputs' every child must act at the same modules (or use combine='changes')"
        )
    out = None
    for w, child in zip(item.weights, item.children):
        yi = w * apply_post(child, comps, args, kwargs, base.clone())
        out = yi if out is None else out + yi
    return out


def _rows_of_output(
    item: Parallel | BatchSplit | Branch, comps: dict[str, Any], args: tuple, kwargs: dict, y: Any
) -> Any:
    """``Parallel`` / ``BatchSplit`` / ``Branch`` at a site whose output is a mapping (a ``ModelOutput``: the model
    root, where flex heads sit): each child gets its rows of the output's batch-first tensors (and of the call; under
    ``Branch`` all rows: the output as it is); a value a child adds or replaces (a head's ``logits``) comes back as a
    list with one entry per child, in order (its value, the child's rows of the old one where it changed nothing,
    else None), as AdapterHub returns a list of head outputs; the rest of the output stays as it was."""
    results: list[tuple[dict[str, Any], Any]] = []
    if isinstance(item, Branch):
        for child in item.children:
            part = copy.copy(y)
            given = dict(part.items())
            results.append((given, apply_post(child, comps, args, kwargs, part)))
        return _merged(y, results)
    first = next((v for v in y.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    if first is None:
        raise TypeError(
            f"{type(item).__name__} found no batch-first tensor in the {type(y).__name__} at this site"
        )
    size = first.shape[0]
    for child, (start, stop) in zip(item.children, _segments(item, first, 0)):
        part = copy.copy(y)
        for k, v in y.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size:
                part[k] = v.narrow(0, start, stop - start)
        given = dict(part.items())
        a, kw = _sliced_call(args, kwargs, 0, start, stop, size)
        results.append((given, apply_post(child, comps, a, kw, part)))
    return _merged(y, results)


def _merged(y: Any, results: list[tuple[dict[str, Any], Any]]) -> Any:
    """``y`` with each value some child added or replaced made a list of the children's values (see
    :func:`_rows_of_output`)."""
    changed = [k for given, out in results for k, v in out.items() if k not in given or v is not given[k]]
    if not changed:
        return y
    merged = copy.copy(y)
    for k in dict.fromkeys(changed):
        merged[k] = [out.get(k, given.get(k)) for given, out in results]
    return merged


def _leaves(item: str | Block) -> list[str | Block]:
    """A Stack's items in order, nested Stacks flattened."""
    if isinstance(item, Stack):
        return [leaf for c in item.children for leaf in _leaves(c)]
    return [item]


def _fused_value(child: str | Block, comps: dict[str, Any], args: tuple, kwargs: dict, base: torch.Tensor) -> Any:
    """What ``Fuse`` attends over for one child at a site with output ``base``: a name's output; for a ``Stack``,
    ``base + (o - x)``, the change of its last acting item (``x`` what that item received, ``o`` the Stack's
    output) on top of the site's output (see :class:`Fuse`)."""
    if not isinstance(child, Stack):
        return apply_post(child, comps, args, kwargs, base.clone())
    leaves = _leaves(child)
    acting = [i for i, leaf in enumerate(leaves) if _acts(leaf, comps)]
    y = base.clone()
    if not acting:  # observers only: let them record
        for leaf in leaves:
            y = apply_post(leaf, comps, args, kwargs, y)
        return y
    for leaf in leaves[: acting[-1]]:
        y = apply_post(leaf, comps, args, kwargs, y)
    x = y
    out = apply_post(leaves[acting[-1]], comps, args, kwargs, x.clone())
    for leaf in leaves[acting[-1] + 1 :]:  # observers
        out = apply_post(leaf, comps, args, kwargs, out)
    if not isinstance(out, torch.Tensor) or not isinstance(x, torch.Tensor):
        raise TypeError(f"Fuse needs a tensor output at each site, got {type(out).__name__}")
    return base + (out - x)


def _one_branch(item: Branch, comps: dict[str, Any], args: tuple, kwargs: dict, y: Any) -> Any:
    """``Branch`` at a site other than the model root: the one child that changes the output here applies (children
    that only observe are run on the same output)."""
    acting = [child for child in item.children if _acts(child, comps)]
    if len(acting) > 1:
        raise ValueError(
            f"{item!r}: {[repr(c) for c in acting]} all change the output of this module; a Branch runs its children "
            "side by side on one output and keeps their results apart, which it can do only at the model's output "
            "(a ModelOutput: their values come back as lists); elsewhere at most one child may act (stack the "
            "others before the Branch: ak.Stack(..., ak.Branch(...)))"
        )
    for child in item.children:
        if child not in acting:
            apply_post(child, comps, args, kwargs, y)
    return apply_post(acting[0], comps, args, kwargs, y) if acting else y


def apply_post(item: str | Block, comps: dict[str, Any], args: tuple, kwargs: dict, y: Any) -> Any:
    """Apply ``item`` (a name or block) to the output ``y`` of one site's module."""
    if isinstance(item, str):
        c = comps.get(item)
        if c is None or c.merged or not c.has_post:
            return y
        return c.post_call(args, kwargs, y)
    if not any(n in comps for n in names_in(item)):
        return y
    if isinstance(item, Stack):
        for child in item.children:
            y = apply_post(child, comps, args, kwargs, y)
        return y
    if isinstance(y, tuple) and y and isinstance(y[0], torch.Tensor):
        # a module returning (output, extras...) (attention modules): combine the outputs, keep the extras
        combined = apply_post(item, comps, args, kwargs, y[0])
        return (combined, *y[1:])
    if isinstance(item, (Parallel, BatchSplit, Branch)) and isinstance(y, Mapping):
        return _rows_of_output(item, comps, args, kwargs, y)
    if isinstance(item, Branch):
        return _one_branch(item, comps, args, kwargs, y)
    if isinstance(item, Fuse) and isinstance(y, Mapping) and item.name not in comps:
        parts = [n for n in names_in(item) if _acts(n, comps)]
        if not parts:  # observers only: let them record
            for child in item.children:
                y = apply_post(child, comps, args, kwargs, y)
            return y
        raise TypeError(
            f"{item!r}: {parts} have parts on the model's output (e.g. a flex head), which a fusion cannot fuse; "
            "keep heads out of fused adapters and stack a head after the fusion (ak.Stack(ak.Fuse(...), 'head'))"
        )
    base = _tensor(y, item)
    if isinstance(item, Average):
        if item.combine == "outputs":
            return _sum_outputs(item, comps, args, kwargs, base)
        out = base
        for w, child in zip(item.weights, item.children):
            yi = apply_post(child, comps, args, kwargs, base.clone())
            out = out + w * (yi - base)
        return out
    if isinstance(item, Fuse):
        fusion = comps.get(item.name)
        if fusion is None and all(
            getattr(comps.get(n), "observer", True) for n in names_in(item) if n != item.name
        ):
            for child in item.children:  # only observers here (e.g. FFN-input taps): let them record
                y = apply_post(child, comps, args, kwargs, y)
            return y
        outs = [_fused_value(child, comps, args, kwargs, base) for child in item.children]
        if fusion is None:
            raise KeyError(
                f"no fusion weights for {item!r} here: call adapters.add_fusion({list(item.children)!r})"
            )
        return fusion.fuse(base, outs, args, kwargs)
    dim = 1 if isinstance(item, Split) else 0
    size = base.shape[dim]
    parts = []
    for child, (start, stop) in zip(item.children, _segments(item, base, dim)):
        if stop <= start:
            continue
        a, kw = _sliced_call(args, kwargs, dim, start, stop, size)
        parts.append(apply_post(child, comps, a, kw, base.narrow(dim, start, stop - start).clone()))
    return torch.cat(parts, dim=dim)


def apply_pre(item: str | Block, comps: dict[str, Any], args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
    """Input transforms of ``item`` at one site (stacking order only). Returns ``(args, kwargs, changed)``."""
    if isinstance(item, str):
        c = comps.get(item)
        if c is None or c.merged or not c.has_pre:
            return args, kwargs, False
        args, kwargs = c.pre_call(args, kwargs)
        return args, kwargs, True
    if isinstance(item, Stack):
        changed = False
        for child in item.children:
            args, kwargs, ch = apply_pre(child, comps, args, kwargs)
            changed |= ch
        return args, kwargs, changed
    pre = [n for n in names_in(item) if getattr(comps.get(n), "has_pre", False)]
    if pre:
        raise NotImplementedError(
            f"{type(item).__name__} cannot combine adapters that transform a module's input ({pre}); use Stack"
        )
    return args, kwargs, False


def replicate(args: tuple, kwargs: dict, k: int) -> tuple[tuple, dict]:
    """Repeat every batch-first tensor of a model call ``k`` times along the batch (Parallel)."""
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0]
    if not tensors:
        return args, kwargs
    batch = tensors[0].shape[0]

    def rep(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            return torch.cat([v] * k, dim=0)
        return v

    return tuple(rep(a) for a in args), {key: rep(v) for key, v in kwargs.items()}
