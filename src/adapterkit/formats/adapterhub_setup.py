"""AdapterHub adapter setups (``model.save_adapter_setup(dir, setup, head_setup)``); dispatched from
``formats/adapterhub.py``. See ../shared/formats/adapterhub.md and issue 16 item 3.

A setup directory holds ``adapter_setup.json``::

    {"adapter_setup": {"type": "Fuse", "children": [{"type": "single", "children": ["a"]},
                                                     {"type": "single", "children": ["b"]}]},
     "head_setup": null, "version": "adapters.1.3.0"}

plus one ``save_adapter`` directory per adapter (``<dir>/<name>/``, with its head when it was saved with one) and one
``save_adapter_fusion`` directory per ``Fuse`` block at the top level or directly under it (``<dir>/a,b/``), as the
library's ``_save_adapter_setup_weights`` writes them. ``adapters.load(dir)`` loads the adapters in the setup's
order (each as ``adapters.load(<dir>/<name>)`` would), then the fusions, then activates the setup (``Stack`` →
``ak.Stack``, ``Fuse`` → ``ak.Fuse``, ``Parallel``, ``BatchSplit(batch_sizes)``, and):

- ``Split(splits=[l1, l2, ...])`` (each part's length; the library accepts only sequences of ``sum(l)``
  positions) → ``ak.Split(splits=[l1, l1 + l2, ...], length=sum(l))``, over bottleneck adapters (the library's
  ``compose_split`` raises NotImplementedError for LoRA).
- ``Average(weights=w)``: adapters 1.3.0 normalizes ``w`` to sum 1 when it loads the setup, then computes
  ``mean_i(w_i h_i)`` of the adapters' states, i.e. divides by the number ``n`` of adapters once more. A sequential
  bottleneck's state is its output (``f'``, on which the block's own residual and LayerNorm run), so its Average
  is ``ak.Average(weights=w/n, combine="outputs")`` (``sum_i (w_i/n) f'_i``: the base output is scaled too); ParBn's
  and LoRA's states are their changes, so theirs is ``ak.Average(weights=w/n)`` (``y + sum_i (w_i/n) delta_i``).
  Members must be of one kind and arrangement and sit on the same modules (the library runs the first member's
  pre-step and the last one's post-step for all; its weights stop lining up where only some act); prefix tuning
  is refused (the library's ``mean`` raises NotImplementedError).
- Blocks over nested blocks: the library runs the first adapter's pre-step for the whole block and again inside
  each nested block, so ``Average``/``Split`` over ``Stack`` children and ``Parallel``/``BatchSplit`` over blocks
  load only where no member's pre-step changes the state when run twice (sequential bottlenecks with
  ``original_ln_before``, e.g. SeqBn, are refused there; DoubleSeqBn and ParBn are fine). ``MultiTask`` is refused.
- ``Fuse`` over ``Stack`` children (of adapter names): the library names the fusion by the children's last adapters
  (``Fuse(Stack("a", "b"), "c")`` uses the fusion ``b,c``, saved as ``<dir>/b,c/``) and fuses the last adapter's
  ``bottleneck_up`` (its change), as ``ak.Fuse`` does with a Stack child; it runs the last adapter's pre-step for
  the block and again inside each Stack, so this loads only where no member's pre-step changes the state when run
  twice (as above: DoubleSeqBn yes, SeqBn with ``original_ln_before`` no).

All or nothing: a failure deletes what it loaded. Heads: as the library's ``set_active_adapters``, the head of the
last adapter of a ``Stack`` is kept (a part of that adapter here, active with it), one head per child of a
``Parallel`` or ``BatchSplit`` (each on its rows: ``output.logits`` is then a list, one entry per child, as the
library's ``MultiHeadOutput.head_outputs``), other blocks keep none. ``head_setup`` naming one head (see
:func:`load`): that adapter's head; a head saved alone (``<dir>/<head>/``, e.g. AdapterFusion's target-task head)
becomes an adapter of its own, stacked after the setup; so does the head of an adapter ``b`` inside a ``Fuse``,
``Average`` or ``Split`` (named ``head[b]``). Several heads on the same rows (a ``head_setup`` list outside a
``Parallel``/``BatchSplit`` setup: the library runs each head on the whole output and returns ``MultiHeadOutput``)
load as head adapters side by side after the setup: ``ak.Stack(<setup>, ak.Branch("head[a]", "head[b]"))``
(``output.logits`` a list, one entry per head, in ``head_setup`` order).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..compose import Average, BatchSplit, Block, Branch, Fuse, Parallel, Split, Stack, last_name
from ..methods.bottleneck import Bottleneck, Hook, Placement
from ..methods.flex_head import FlexHead
from ..methods.lora import LoRA
from ..methods.union import Union
from . import adapterhub_fusion, adapterhub_heads
from .io import AdapterFileError, read_json

__all__ = [
    "SETUP",
    "is_setup",
    "parse",
    "load",
    "fit",
    "block_names",
    "members_kind",
    "prepared_twice",
    "fusion_dir",
]

SETUP = "adapter_setup.json"


def is_setup(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``save_adapter_setup``."""
    return (Path(path) / SETUP).is_file()


def parse(node: Any, where: Path) -> str | Block:
    """Our composition for one node of ``adapter_setup`` (``{"type": ..., "children": [...], "kwargs": {...}}``)."""
    if not isinstance(node, dict) or not isinstance(node.get("children"), list):
        raise AdapterFileError(
            f"{where}: a setup node must be an object with 'type' and 'children', got {node!r:.80}"
        )
    kind = node.get("type")
    children = node["children"]
    kwargs = node.get("kwargs") or {}
    if kind == "single":
        if len(children) != 1 or not isinstance(children[0], str) or not children[0]:
            raise AdapterFileError(f"{where}: a 'single' node names one adapter, got {children!r:.80}")
        return children[0]
    parsed = [parse(c, where) for c in children]
    try:
        if kind == "Stack":
            return Stack(*parsed)
        if kind == "Parallel":
            return Parallel(*parsed)
        if kind == "Fuse":
            if not all(
                isinstance(c, str) or (isinstance(c, Stack) and all(isinstance(n, str) for n in c.children))
                for c in parsed
            ):
                raise AdapterFileError(
                    f"{where}: Fuse over {[repr(c) for c in parsed if not isinstance(c, str)]} is not read (read: "
                    "adapter names and Stacks of adapter names)"
                )
            return Fuse(*parsed)
        if kind == "BatchSplit":
            return BatchSplit(*parsed, batch_sizes=kwargs.get("batch_sizes"))
        if kind == "Split":
            lengths = kwargs.get("splits")
            lengths = [lengths] * len(parsed) if isinstance(lengths, int) else list(lengths or [])
            if len(lengths) != len(parsed) or not all(isinstance(n, int) and n > 0 for n in lengths):
                raise ValueError(
                    f"'splits' must give a positive length per child, got {kwargs.get('splits')!r:.60}"
                )
            cuts, total = [], 0
            for n in lengths[:-1]:
                total += int(n)
                cuts.append(total)
            return Split(*parsed, splits=cuts, length=sum(lengths))
        if kind == "Average":
            # the library's from_dict normalizes the saved weights again; its mean(w_i h_i) divides them by n once
            # more; whether they weigh outputs or changes depends on the members (see fit())
            weights = kwargs.get("weights")
            weights = [1.0 / len(parsed)] * len(parsed) if weights is None else list(weights)
            total = sum(float(w) for w in weights)
            if not total:
                raise ValueError(f"weights {weights!r:.60} sum to 0 (the library divides by their sum)")
            return Average(*parsed, weights=[float(w) / total / len(parsed) for w in weights])
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{where}: {kind} block: {e}") from None
    raise AdapterFileError(
        f"{where}: AdapterHub {kind!r} blocks are not read (read: Stack, Fuse, Parallel, BatchSplit, Split, Average)"
    )


# the BnConfig fields that decide AdapterHub's pre- and post-steps (the library runs the first member's pre-step and
# the last member's post-step for a whole Average or Split block)
_ARRANGEMENT = (
    "placement",
    "ln_before",
    "ln_after",
    "adapter_residual_before_ln",
    "original_ln_before_resolved",
    "original_ln_after",
    "residual_before_ln",
)


def _member(ctl: Any, name: str) -> tuple[str, tuple[Any, ...]] | None:
    """``(kind, arrangement)`` of an adapter as AdapterHub's Average/Split compute it: ``"sequential"`` (a
    sub-layer bottleneck whose state is its output ``f'``), ``"parallel"`` (ParBn: its state is the change), ``"lora"``
    (plain additive LoRA: the change); None for anything else."""
    cfg = ctl.config(name)
    if isinstance(cfg, Union):
        parts = [c for c in cfg.configs if not isinstance(c, FlexHead)]
        cfg = parts[0] if len(parts) == 1 else None
    if isinstance(cfg, Bottleneck) and cfg.hook == Hook.SUBLAYER and cfg.original_ln_after:
        kind = "parallel" if cfg.placement == Placement.PARALLEL else "sequential"
        return kind, tuple(str(getattr(cfg, f)) for f in _ARRANGEMENT)
    if isinstance(cfg, LoRA) and not cfg.dora:
        return "lora", ()
    return None


def fit(ctl: Any, item: str | Block, where: Path) -> str | Block:
    """``item`` with each ``Average`` and ``Split`` checked against its (loaded) members and made to compute what the
    library computes: ``Average`` of sequential bottlenecks sums the weighted outputs (``combine="outputs"``), of
    ParBn or LoRA adapters the weighted changes; ``Split`` runs over bottleneck adapters only.

    Raises:
        AdapterFileError: members the library computes otherwise (or not at all), naming them."""
    if isinstance(item, str):
        return item
    children = [fit(ctl, c, where) for c in item.children]
    why = prepared_twice(ctl, item)
    if why:
        raise AdapterFileError(f"{where}: {why} (not read)")
    if not isinstance(item, (Average, Split)):
        return _rebuilt(item, children)
    try:
        kind = members_kind(ctl, item)
    except ValueError as e:
        raise AdapterFileError(f"{where}: {e} (not read)") from None
    if isinstance(item, Average) and kind == "sequential":
        return Average(*children, weights=item.weights, combine="outputs")
    return _rebuilt(item, children)


def prepared_twice(ctl: Any, item: str | Block) -> str | None:
    """Why the library computes ``item`` (a ``Parallel`` / ``BatchSplit`` / ``Fuse`` over blocks) otherwise than we
    do, None if it does not: it runs the first (for ``Fuse``: the last) adapter's pre-step for the whole block and
    again inside each nested block, which changes the state of adapters whose pre-step is not the same when run
    twice."""
    if not isinstance(item, (Parallel, BatchSplit, Fuse)) or not any(isinstance(c, Block) for c in item.children):
        return None
    prepared = [n for n in block_names(item) if _prepares_twice(ctl, n)]
    if not prepared:
        return None
    which = "last" if isinstance(item, Fuse) else "first"
    return (
        f"{type(item).__name__} over composition blocks with {prepared}: the library runs the {which} adapter's "
        "pre-step for the whole block and again inside each nested block, and these adapters' pre-step (the "
        "block's own residual and LayerNorm before them: original_ln_before) changes the state when run twice"
    )


def _prepares_twice(ctl: Any, name: str) -> bool:
    """Whether adapter ``name``'s AdapterHub pre-step changes its input when run a second time: a sequential
    bottleneck with ``original_ln_before`` (it adds the residual, and normalizes, again)."""
    kind = _member(ctl, name)
    cfg = ctl.config(name)
    if isinstance(cfg, Union):
        parts = [c for c in cfg.configs if isinstance(c, Bottleneck)]
        cfg = parts[0] if parts else None
    return (
        kind is not None
        and kind[0] == "sequential"
        and isinstance(cfg, Bottleneck)
        and bool(cfg.original_ln_before_resolved)
    )


def members_kind(ctl: Any, block: Average | Split) -> str:
    """The kind (:func:`_member`) all adapters of an ``Average`` or ``Split`` block (children: names, or Stacks of
    names where no member's pre-step changes the state when run twice) share, for the reader and the writer.

    Raises:
        ValueError: what the library computes otherwise or cannot run."""
    what = type(block).__name__
    nested = [c for c in block.children if not isinstance(c, str)]
    if not all(isinstance(c, Stack) and all(isinstance(n, str) for n in c.children) for c in nested):
        raise ValueError(
            f"{what} over {[repr(c) for c in nested]}: only adapter names and Stacks of them are read under Average "
            "and Split"
        )
    names = block_names(block)
    prepared = [n for n in names if _prepares_twice(ctl, n)] if nested else []
    if prepared:
        raise ValueError(
            f"{what} over Stack blocks with {prepared}: the library runs the first adapter's pre-step for the whole "
            "block and again inside each Stack, and these adapters' pre-step (the block's own residual and "
            "LayerNorm before them: original_ln_before) changes the state when run twice"
        )
    kinds = {n: _member(ctl, n) for n in names}
    other = [n for n, k in kinds.items() if k is None]
    if other:
        raise ValueError(
            f"{what} over {other}: read are sub-layer bottleneck adapters with original_ln_after (and LoRA under "
            "Average), whose states the library averages and splits as here (adapters 1.3.0 raises "
            "NotImplementedError for prefix tuning in mean() and for every non-bottleneck adapter in compose_split)"
        )
    found = set(kinds.values())
    if len(found) != 1:
        raise ValueError(
            f"{what} over adapters of different kinds or arrangements ({kinds}): the library runs the first "
            "member's pre-step and the last member's post-step for all of them"
        )
    kind = next(iter(found))[0]  # type: ignore[index]
    if isinstance(block, Split) and kind == "lora":
        raise ValueError(
            "Split over LoRA adapters: adapters 1.3.0 cannot run it (compose_split raises NotImplementedError for "
            "LoRA layers)"
        )
    sites = {n: frozenset(s for s in ctl.sites(n) if s) for n in names}
    if len(set(sites.values())) != 1:
        raise ValueError(
            f"{what} over adapters on different modules ({names}): the library's weights no longer line up with "
            "its states where only some members act"
        )
    return kind


def _rebuilt(item: Block, children: list[str | Block]) -> Block:
    if isinstance(item, Average):
        return Average(*children, weights=item.weights, combine=item.combine)
    if isinstance(item, Split):
        return Split(*children, splits=item.splits, length=item.length)
    if isinstance(item, BatchSplit):
        return BatchSplit(*children, batch_sizes=item.batch_sizes)
    return type(item)(*children)


def block_names(item: str | Block) -> list[str]:
    """The adapter names a composition block uses, each once, in order of first appearance."""
    if isinstance(item, str):
        return [item]
    out: list[str] = []
    for c in item.children:
        out += [n for n in block_names(c) if n not in out]
    return out


def fusion_dir(block: Fuse) -> str:
    """The directory (and AdapterHub name) of a ``Fuse`` block's fusion: its children's last adapters joined by
    commas (``Fuse(Stack("a", "b"), "c")`` -> ``b,c``)."""
    return ",".join(last_name(c) for c in block.children)


def _fusions(item: str | Block) -> list[Fuse]:
    """The ``Fuse`` blocks the library saves: the setup itself and its direct children."""
    if isinstance(item, str):
        return []
    found = [item] if isinstance(item, Fuse) else []
    return found + [c for c in item.children if isinstance(c, Fuse)]


def _several(head: Any, setup: str | Block, where: Path) -> bool:
    """Whether ``head_setup`` names one head per row block of a ``Parallel`` / ``BatchSplit`` setup, in its order (a
    list or a block of the same kind and batch sizes): what the library also activates without a head setup."""
    implied = _implied_heads(setup)
    if not isinstance(setup, (Parallel, BatchSplit)):
        return False
    if isinstance(head, list):
        return head == implied
    if isinstance(head, dict) and head.get("type") == type(setup).__name__:
        try:
            block = parse(head, where)
        except AdapterFileError:
            return False
        same = not isinstance(setup, BatchSplit) or block.batch_sizes == setup.batch_sizes  # type: ignore[union-attr]
        return same and list(block.children) == implied  # type: ignore[union-attr]
    return False


def _head(data: dict[str, Any], where: Path, names: list[str], setup: str | Block) -> str | list[str] | None:
    """The head(s) ``head_setup`` names (None: none, or one per row block: :func:`_several`), checked: one head, or a
    list of several run on the same rows (outside a ``Parallel``/``BatchSplit`` setup); each a member or a
    ``save_head`` directory of its own."""
    head = data.get("head_setup")
    if head is None or head is False or _several(head, setup, where):
        return None
    if isinstance(head, list) and len(head) == 1:
        head = head[0]
    several = (
        isinstance(head, list)
        and not isinstance(setup, (Parallel, BatchSplit))
        and all(isinstance(h, str) and h for h in head)
        and len(set(head)) == len(head)
    )
    if not several and (not isinstance(head, str) or not head):
        raise AdapterFileError(
            f"{where}: head_setup {head!r:.80} is not read: heads that do not match the Parallel/BatchSplit setup's "
            "row blocks, a head named twice, and the model's single head (true) are not; one head name, a list of "
            "head names (run side by side on the same rows), or one head per row block of a Parallel/BatchSplit "
            "setup, is"
        )
    for h in head if isinstance(head, list) else [head]:
        if h not in names and not (where.parent / h / "head_config.json").is_file():
            raise AdapterFileError(f"{where}: head_setup names {h!r}, which has no head directory there")
    return head


def _implied_heads(setup: str | Block) -> list[str]:
    """The heads the library activates for a setup saved without ``head_setup`` (``parse_heads_from_composition``):
    the last adapter of a ``Stack``, one per child of ``Parallel`` and ``BatchSplit``, none for other blocks."""
    if isinstance(setup, str):
        return [setup]
    if isinstance(setup, Stack):
        return [setup.children[-1]] if isinstance(setup.children[-1], str) else []
    if isinstance(setup, (Parallel, BatchSplit)):
        return [c if isinstance(c, str) else block_names(c)[-1] for c in setup.children]
    return []


def _in_block(item: str | Block, name: str) -> bool:
    """Whether adapter ``name`` sits inside a block other than ``Stack`` (there its root components, a head, would
    be combined by the block)."""
    if isinstance(item, str):
        return False
    if not isinstance(item, Stack):
        return name in block_names(item)
    return any(_in_block(c, name) for c in item.children)


def _has_flex_head(path: Path) -> bool:
    config = path / "head_config.json"
    return config.is_file() and read_json(config).get("config") is not None


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, load_one: Any) -> str:
    """Load every adapter and fusion of the setup in ``path`` onto ``ctl`` (the controller itself, not a reading),
    and its head, then activate the setup; returns the last name installed (the setup is ``adapters.active``).
    ``name`` must be None (the adapters keep their saved names). ``load_one`` is ``formats.adapterhub.load``.

    ``head_setup``: None keeps the heads the library activates (the last adapter of a ``Stack``; one per child of a
    ``Parallel`` or ``BatchSplit``, when every child has one: the model's output then holds a list of their
    ``logits``, one entry per row block, as the library's ``MultiHeadOutput``); the same heads named in
    ``head_setup`` (a list, or a block of the setup's kind) likewise; a head name that is one of the adapters keeps
    that adapter's head only; another name loads ``<dir>/<head>/`` (``save_head``) as
    a head adapter of that name, active after the setup (``ak.Stack(<setup>, head)``). The head of an adapter ``b``
    inside a block other than ``Stack`` (``Fuse("a", "b")`` with ``head_setup="b"``; also ``Average``, ``Split``) is
    loaded apart from ``b``, as the head adapter ``head[b]``, active after the setup
    (``ak.Stack(ak.Fuse("a", "b"), "head[b]")``): a head is a part of its adapter here, and that block would combine
    it with the other children's outputs. A list of several heads outside a ``Parallel``/``BatchSplit`` setup (the
    library runs each on the whole output: ``MultiHeadOutput``) loads each apart likewise (``head[a]`` for an
    adapter's head, its own name for a ``save_head`` directory), side by side after the setup:
    ``ak.Stack("a", "b", ak.Branch("head[a]", "head[b]"))`` for ``Stack("a", "b")`` with ``head_setup=["a", "b"]``;
    ``output.logits`` is then a list, one entry per head in ``head_setup`` order."""
    where = Path(path)
    if name is not None:
        raise AdapterFileError(
            f"{where} is an AdapterHub adapter setup: its adapters keep their saved names (no name=)"
        )
    data = read_json(where / SETUP)
    setup = parse(data.get("adapter_setup"), where / SETUP)
    names = block_names(setup)
    fusions = _fusions(setup)
    head = _head(data, where / SETUP, names, setup)
    # head adapters of their own, stacked after the setup, as (directory, name): a head of its own (save_head), the
    # head of an adapter inside a block other than Stack (a fused adapter's: head[b]), several heads on the same rows
    # (each apart from its adapter, side by side in a Branch)
    apart: list[tuple[str, str]] = []
    keep: set[str] = set()
    if isinstance(head, list):
        apart = [(h, f"head[{h}]" if h in names else h) for h in head]
    elif head is not None:
        if _in_block(setup, head):
            apart = [(head, f"head[{head}]")]
        elif head not in names:
            apart = [(head, head)]
        else:
            keep = {head}
    else:  # the heads the library activates: all of them only where every one exists
        implied = _implied_heads(setup)
        if implied and all(_has_flex_head(where / n) for n in implied):
            keep = set(implied)
    missing = [n for n in names if not (where / n).is_dir()] + [
        fusion_dir(f) for f in fusions if not (where / fusion_dir(f)).is_dir()
    ]
    if missing:
        raise AdapterFileError(f"{where}: the setup names {missing}, which have no directory there")
    wanted = names + [f.name for f in fusions] + [n for _, n in apart]
    taken = [n for n in wanted if n in ctl.names]
    if taken:
        raise AdapterFileError(f"{where}: adapters {taken} already exist on this model; delete them first")
    installed: list[str] = []
    try:
        for n in names:
            installed.append(
                load_one(ctl, where / n, name=None, allow_pickle=allow_pickle, activate=False, with_head=n in keep)
            )
        for f in fusions:
            installed.append(
                adapterhub_fusion.load(
                    ctl, where / fusion_dir(f), name=None, allow_pickle=allow_pickle, activate=False
                )
            )
        setup = fit(ctl, setup, where / SETUP)
        if apart:
            for directory, n in apart:
                installed.append(
                    adapterhub_heads.load_head_only(
                        ctl, where / directory, name=n, allow_pickle=allow_pickle, activate=False
                    )
                )
            stacked: str | Block = apart[0][1] if len(apart) == 1 else Branch(*(n for _, n in apart))
            try:
                ctl.activate(
                    Stack(*setup.children, stacked) if isinstance(setup, Stack) else Stack(setup, stacked)
                )
            except ValueError as e:
                raise AdapterFileError(
                    f"{where / SETUP}: its head {head!r} cannot follow this setup here: {e}"
                ) from None
        else:
            try:
                ctl.activate(setup)
            except ValueError as e:
                raise AdapterFileError(
                    f"{where / SETUP}: its setup {setup!r} cannot be activated here: {e}"
                ) from None
    except BaseException:
        for n in reversed(installed):
            ctl.delete(n)
        raise
    return installed[-1]
