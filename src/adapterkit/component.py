"""The component protocol: what a method puts at one site.

A component is an ``nn.Module`` that lives as a child of the module it acts on (under the
``ak_adapters`` container, keyed by adapter name), so ``.to()``, DDP/FSDP and optimizers see its
parameters where they are used. The site hook calls it around the module's forward::

    x' = component.pre_call(args, kwargs)     (only when ``has_pre``; default: ``pre(x)`` on the first input)
    y  = module(x')
    y' = component.post_call(args, kwargs, y)  (default: ``post(x', y)``)

Mergeable components also implement :meth:`merge` / :meth:`unmerge` (usually through
:meth:`delta_weight` and the module's backend). All parameters a component owns are adapter
parameters: trainability and saving find them structurally, never by name.

Training-time hooks (docs: "Training-time hooks" in DESIGN.md): components whose state changes during training
set ``scheduled = True`` and implement :meth:`on_step` (called by ``adapters.step()`` after every optimizer
step; the controller refuses a training forward after an optimizer step that ``step()`` did not follow) and
may add a regularizer through :meth:`aux_loss` (summed by ``adapters.aux_loss()``). Components initialized
from activations implement :meth:`observe` and :meth:`finish_calibration` (``adapters.calibrate()``).
State shared by every site of one adapter lives in a :class:`Bank` (:meth:`Component.share`), saved once.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .backends import backend_for

__all__ = ["Bank", "Component", "first_input"]


def first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The tensor a module was called with (first positional argument, else first keyword)."""
    if args:
        return args[0]
    return next(iter(kwargs.values()))


# --- gradient epochs: caches of weights must not outlive an optimizer step --------------------------------------
# Caches of adapter weights built without autograd (stacked route factors, rotation blocks, generated weights) are
# keyed on the parameters' storage and ``_version``; fused optimizers (``torch.optim.AdamW(fused=True)``, the
# Trainer's ``adamw_torch_fused``) update parameters in place *without* bumping ``_version``. Every optimizer step
# follows a backward that reached the parameters, so a counter of those backwards, bumped by a post-accumulate-grad
# hook on every adapter parameter, is part of every such key.
_GRAD_EPOCH = [0]


def grad_epoch() -> int:
    """How many times a backward pass has accumulated a gradient into a watched adapter parameter (see
    :func:`watch_gradients`); part of the key of every no-grad weight cache."""
    return _GRAD_EPOCH[0]


def _grad_arrived(param: torch.Tensor) -> None:
    _GRAD_EPOCH[0] += 1


def watch_gradients(params: Any) -> None:
    """Count backwards into ``params`` (each trainable parameter once, however often it is watched)."""
    for p in params:
        if p.requires_grad and not getattr(p, "_ak_watched", False):
            p.register_post_accumulate_grad_hook(_grad_arrived)
            p._ak_watched = True


class Bank(nn.Module):
    """Adapter-level state shared by every site of one adapter (a shared vector bank, shared projections, a rank
    allocator that needs every site's scores).

    Build one in the config's ``build_all`` and hand it to each component, which calls
    ``self.share(bank)``: the bank becomes a child module of every component (so ``.to()``, optimizers and
    ``state_dict()`` see it where it is used; ``adapters.parameters()`` lists its parameters once), and only its
    first sharer (its *owner*, the first component built) saves it: natively its tensors are stored once, under
    ``<owner's module>.<attribute>.<tensor>``. Loading re-plans the adapter, so the same component owns it again and
    filling the owner fills every sharer. ``members`` lists the sharers in build order (not registered as modules).
    """

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "members", [])

    @property
    def owner(self) -> Component | None:
        return self.members[0] if self.members else None


class Component(nn.Module):
    """Base class of per-site adapter modules.

    Attributes:
        has_pre: the site calls :meth:`pre` before the module runs.
        has_post: the site calls :meth:`post_call` after the module runs.
        mergeable: :meth:`merge` can fold the component into the base weights.
        additive: ``post(x, y) - y`` depends on ``x`` only (LoRA family, (IA)^3-free deltas, bias deltas):
            several active additive components sum, and composition/routing may run them side by side.
        observer: the component only records values for other components of its adapter (its post returns
            the output unchanged); fusion layers are not placed at modules where adapters only observe.
        merged: the component's effect currently lives in the base weights; the site skips it.
        scheduled: the component changes during training (:meth:`on_step`): ``adapters.step()`` must follow every
            optimizer step while it trains, and a training forward after an optimizer step without it raises.
    """

    has_pre: ClassVar[bool] = False
    has_post: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False
    additive: ClassVar[bool] = False
    observer: ClassVar[bool] = False  # only records something (e.g. an FFN input tap); never changes the output
    scheduled: ClassVar[bool] = False  # needs adapters.step() after every optimizer step (on_step)

    def __init__(self) -> None:
        super().__init__()
        self.merged = False
        self._bank_attrs: list[str] = []

    # --- adapter-level shared state -------------------------------------------------------
    def share(self, bank: Bank, attr: str = "bank") -> None:
        """Use ``bank`` (shared by the adapter's components) as child ``attr``; the first sharer saves it."""
        setattr(self, attr, bank)
        self.__dict__.setdefault("_bank_attrs", []).append(attr)
        if not any(m is self for m in bank.members):
            bank.members.append(self)

    def _foreign_bank_keys(self) -> set[str]:
        """``state_dict`` keys of banks another component owns (saved there, not here)."""
        attrs = self.__dict__.get("_bank_attrs", ())  # components whose __init__ skipped Component's have none
        prefixes = tuple(f"{a}." for a in attrs if getattr(self, a).owner is not self)
        if not prefixes:
            return set()
        return {k for k in self.state_dict() if k.startswith(prefixes)}

    # --- training-time hooks ----------------------------------------------------------------
    def on_train_begin(self, total_steps: int | None, step: int = 0) -> None:
        """Training starts, or resumes, at optimizer step ``step`` of ``total_steps`` (None: unknown)
        (``adapters.begin_training``; the Trainer callback passes its ``max_steps`` and ``global_step``)."""

    def on_step(self, step: int) -> None:
        """An optimizer step was taken (``adapters.step()``); ``step`` is its index, counting from 0. Gradients of
        that step are still there when the caller follows the documented order (after ``optimizer.step()``, before
        ``zero_grad()``; the Trainer callback does). In-place changes here do not trip the missing-step check."""

    def aux_loss(self) -> torch.Tensor | None:
        """A term added to the training loss (a 0-dim tensor with grad), or None. ``adapters.aux_loss()`` sums them."""
        return None

    def set_rank(self, r: int) -> None:
        """Use rank ``r`` from now on (methods trained for several ranks, e.g. DyLoRA); ``adapters.set_rank``."""
        raise TypeError(f"{type(self).__name__} has no rank that can be chosen after training")

    # --- calibration (initialization from activations) -------------------------------------
    def observe(self, x: Any, y: Any) -> None:
        """During ``adapters.calibrate()``: the base module was called with first input ``x`` and returned ``y``
        (no adapter active, no grad). Components that calibrate override this and :meth:`finish_calibration`."""

    def finish_calibration(self, module: nn.Module) -> None:
        """After the calibration batches: set the component's values from what :meth:`observe` saw."""

    # --- forward ------------------------------------------------------------------------
    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def pre_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Like :meth:`pre`, for components that rewrite the whole call (model-level methods change keyword
        inputs such as ``inputs_embeds``, ``attention_mask``, ``past_key_values`` and ``labels``)."""
        if args:
            return (self.pre(args[0]), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: self.pre(kwargs[key])}

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        """Like :meth:`post`, for components that need the module's whole call."""
        return self.post(first_input(args, kwargs), y)

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: torch.Tensor, key: Any) -> Any:
        """Per-row routing in one batched call, or None to fall back to one ``post_call`` per adapter.

        ``comps[g]`` is the component of ``plan.adapters[g]`` at this site (None where that adapter has none;
        all others are of this class), ``plan`` a :class:`~adapterkit.compose.RoutePlan` (``gather``,
        ``scatter_add``, ``stacked(key, build)`` caching stacked weights under ``key``), ``x`` the module's
        first input and ``y`` its output.
        """
        return None

    @classmethod
    def routed_pre(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, key: Any) -> Any:
        """Like :meth:`routed` for input transforms (``has_pre``): the new first input, or None to fall
        back to one ``pre`` per adapter."""
        return None

    @classmethod
    def routed_call(
        cls, comps: list[Component | None], plan: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Per-row routing for components that rewrite the whole call (model-level methods, which override
        :meth:`pre_call`): the call with each row rewritten by its adapter's component (rows of adapters
        without one here, and base rows, left as they are), or None when the method cannot route rows
        separately (the site then raises ``NotImplementedError``). Arguments as for :meth:`routed`."""
        return None

    @classmethod
    def routed_output(
        cls, comps: list[Component | None], plan: Any, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any
    ) -> Any:
        """The output side of :meth:`routed_call` (components that override :meth:`post_call` and need the
        whole call, not just the first input): the new output, or None to fall back to :meth:`routed`'s
        per-adapter calls on row slices."""
        return None

    # --- lifecycle ----------------------------------------------------------------------
    def initialize(self, module: nn.Module) -> None:
        """Set initial values (may read the base module's weights). Called once after construction."""

    def on_attach(self, module: nn.Module) -> None:
        """Called after the component is placed on ``module`` (e.g. to adjust base weights)."""

    def on_detach(self, module: nn.Module, keep_merged: bool = False) -> None:
        """Undo :meth:`on_attach` exactly. With ``keep_merged`` the merged effect stays in the base weights."""
        if self.merged and not keep_merged:
            self.unmerge(module)

    def upcast_(self, dtype: torch.dtype = torch.float32) -> None:
        """Store this component's float16/bfloat16 parameters and buffers in ``dtype`` (in place: parameter
        objects keep their identity). The controller calls it on every planned component unless
        ``autocast_adapter_dtype=False``, so adapters on half-precision bases train fp32 master weights; forwards
        compute in the adapter's dtype and return the base output's dtype (peft's ``autocast_adapter_dtype``)."""
        self._apply(lambda t: t.to(dtype) if t.dtype in (torch.float16, torch.bfloat16) else t)

    # --- merging ------------------------------------------------------------------------
    def delta_weight(self, module: nn.Module) -> torch.Tensor | None:
        """The additive change to the module's canonical dense weight, or None when not mergeable."""
        return None

    def delta_bias(self, module: nn.Module) -> torch.Tensor | None:
        return None

    def check_merge(self, module: nn.Module) -> None:
        """Raise (TypeError/ValueError) when :meth:`merge` into ``module`` would be refused, changing nothing.

        Composite merges (a :class:`Chain`, an adapter over many sites) check every component before any
        weight changes, so a refused merge leaves the base weights bit-identical."""

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        """Fold this component into ``module``'s weights. Raises TypeError when it cannot be merged."""
        if self.merged:
            return
        self._apply_delta(module, +1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        if not self.merged:
            return
        self._apply_delta(module, -1.0)
        self.merged = False

    def _apply_delta(self, module: nn.Module, sign: float) -> None:
        delta = self.delta_weight(module)
        dbias = self.delta_bias(module)
        if delta is None and dbias is None:
            raise TypeError(f"{type(self).__name__} cannot be merged into {type(module).__name__}")
        if delta is not None:
            backend = backend_for(module)
            if backend is None:
                raise TypeError(f"cannot merge into {type(module).__name__}: no weight backend registered")
            backend.add_(module, delta, alpha=sign)
        if dbias is not None:
            module.bias.data.add_(dbias.to(module.bias.dtype), alpha=sign)

    # --- saving -------------------------------------------------------------------------
    def export_state(self) -> dict[str, torch.Tensor]:
        """Tensors to save for this component (default: its state_dict, without banks another component owns)."""
        foreign = self._foreign_bank_keys()
        return {k: v for k, v in self.state_dict().items() if k not in foreign}

    def import_state(self, state: dict[str, torch.Tensor], module: nn.Module) -> None:
        """Inverse of :meth:`export_state` (the state_dict of banks owned elsewhere may be given or left out);
        raises ValueError on missing keys or shape mismatch."""
        own = self.state_dict()
        foreign = self._foreign_bank_keys()
        missing = sorted(set(own) - set(state) - foreign)
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise ValueError(f"tensors do not match the component: missing {missing}, unexpected {extra}")
        for k, v in own.items():
            if k in state and tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(
                    f"shape mismatch for {k!r}: file has {tuple(state[k].shape)}, expected {tuple(v.shape)}"
                )
        self.load_state_dict(state, strict=not foreign)

    # --- hot-swapping (Adapters.hotswap) ------------------------------------------------------
    def pad_rank_(self, r: int) -> bool:
        """Zero-pad this component's rank to ``r`` in place, outputs unchanged (:meth:`Adapters.prepare_hotswap`);
        returns whether it has a rank to pad. Default: False (nothing to pad)."""
        return False

    def hotswap_state(self, other: Component) -> dict[str, torch.Tensor]:
        """The values this component takes from ``other`` when an adapter is hot-swapped into its place
        (:meth:`Adapters.hotswap`): the keys of :meth:`export_state`, each shaped as this component's own, so a
        compiled model keeps its graph (only tensor values change). Default: the same class, equal Python
        settings (numbers, strings, flags and tuples among the instance's attributes: a traced graph holds them
        as constants) and equal tensor shapes. Raises ValueError naming the first difference."""
        if type(other) is not type(self):
            raise ValueError(f"a {type(other).__name__} cannot replace a {type(self).__name__}")
        mine, theirs = _settings(self), _settings(other)
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                raise ValueError(
                    f"{key} differs ({theirs.get(key)!r} in the new adapter, {mine.get(key)!r} here): a compiled "
                    "graph holds it as a constant"
                )
        own, new = self.export_state(), other.export_state()
        if own.keys() != new.keys():
            raise ValueError(f"different tensors: {sorted(set(own) ^ set(new))}")
        for k, v in own.items():
            if new[k].shape != v.shape:
                raise ValueError(f"{k} has shape {tuple(new[k].shape)} in the new adapter, {tuple(v.shape)} here")
        return new


def _settings(component: nn.Module) -> dict[str, Any]:
    """A component's plain Python settings (what a traced graph specializes on)."""
    plain = (bool, int, float, str, tuple, type(None))
    return {
        k: v
        for k, v in vars(component).items()
        if not k.startswith("_") and k not in ("training", "merged") and isinstance(v, plain)
    }


class Chain(Component):
    """Several components of one adapter at one module (the parts of a union), applied in order.

    Inputs go through the parts' ``pre_call`` in order, outputs through their ``post_call`` in order;
    merging merges every part (so all must be mergeable). Tensors are saved as ``parts.<i>.<name>``.
    """

    def __init__(self, parts: list[Component]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.has_pre = any(p.has_pre for p in parts)
        self.has_post = any(p.has_post for p in parts)
        self.mergeable = all(p.mergeable for p in parts)
        self.additive = all(p.additive for p in parts)

    def pre_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        for p in self.parts:
            if p.has_pre:
                args, kwargs = p.pre_call(args, kwargs)
        return args, kwargs

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        for p in self.parts:
            if p.has_post:
                y = p.post_call(args, kwargs, y)
        return y

    def initialize(self, module: nn.Module) -> None:
        for p in self.parts:
            p.initialize(module)

    def upcast_(self, dtype: torch.dtype = torch.float32) -> None:
        for p in self.parts:
            p.upcast_(dtype)

    def on_attach(self, module: nn.Module) -> None:
        done = []
        try:
            for p in self.parts:
                p.on_attach(module)
                done.append(p)
        except BaseException:
            for p in reversed(done):
                p.on_detach(module)
            raise

    def on_detach(self, module: nn.Module, keep_merged: bool = False) -> None:
        for p in reversed(self.parts):
            p.on_detach(module, keep_merged)
        self.merged = any(p.merged for p in self.parts)

    def check_merge(self, module: nn.Module) -> None:
        for p in self.parts:
            p.check_merge(module)

    def merge(self, module: nn.Module) -> None:
        """Merge every part, or none: refusals are checked first; a later failure unmerges the merged parts."""
        if self.merged:
            return
        self.check_merge(module)
        done = []
        try:
            for p in self.parts:
                if not p.merged:
                    p.merge(module)
                    done.append(p)
        except BaseException:
            for p in reversed(done):
                p.unmerge(module)
            raise
        self.merged = True

    def unmerge(self, module: nn.Module) -> None:
        for p in reversed(self.parts):
            p.unmerge(module)
        self.merged = False
