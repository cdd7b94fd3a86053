"""LoReFT: low-rank linear subspace representation finetuning (Wu et al. 2024, "ReFT: Representation
Finetuning for Language Models", §3.1-3.3).

Instead of changing weights, LoReFT edits hidden representations. At a selected position, the output
``h ∈ R^d`` of a transformer block (role ``block``) becomes (§3.1, Eq. 2)::

    Φ(h) = h + Rᵀ (W h + b − R h)

with ``R ∈ R^{r×d}`` of orthonormal rows (the subspace that is edited), ``W ∈ R^{r×d}`` and ``b ∈ R^r``
(a linear projection giving the target values of the ``r`` subspace coordinates). Everything else in the
model is frozen, and positions that are not selected are left exactly as they were.

Where (§3.3, the "f<p>+l<s>" positions of pyreft): at every targeted block, the first ``prefix`` and the last
``suffix`` *real* tokens of each sequence, counted on the call's attention mask (left or right padding;
all positions are real when the call has no mask, e.g. ViT, where position 0 is the CLS token). When both
are set, each is capped to ``⌊n/2⌋`` for a sequence of ``n`` real tokens, so prefix and suffix never
overlap (pyreft does the same; it also caps a lone prefix or suffix, and counts ``n − 1``, which we don't).
``share_weights=False`` (default) learns one intervention for the prefix and one for the suffix;
``share_weights=True`` one for both (the paper's "tied" weights).

How the block sites know the mask: a small parameter-free :class:`PositionRecorder` sits on the model
(module name ``""``; for encoder-decoder models on the encoder and decoder stacks, because ``generate()``
runs the encoder on its own). Its pre-hook records the call's ``attention_mask`` (and ``labels`` with
``prompt_from_labels``, and whether a KV cache already holds real tokens) into a :class:`CallState` shared
with this adapter's block components; every call overwrites it, and a block that runs outside a call of
that module raises instead of reading an old mask. The recorded state stays readable during the backward
pass, so gradient checkpointing (which re-runs blocks in backward) recomputes the same interventions.
Model-level adapters that add virtual tokens are handled: soft-prompt positions count as real tokens in
front (whichever adapter runs first), prefix-tuning's virtual keys are not positions of the sequence.

Generation (KV cache): interventions apply to the positions of a call that starts a sequence (an empty
cache, or one holding only prefix-tuning entries), i.e. to the prompt in ``generate()``. Later cached steps
(one new token each) get no intervention at all: the prompt's prefix positions are in the cache already,
and the suffix stays the last ``suffix`` tokens *of the prompt*, as in pyreft, which intervenes on prompt
positions only and leaves decoding free of overhead. ``generate(use_cache=False)`` re-runs the whole
sequence each step, so there the suffix moves onto the generated tokens; outputs then differ from cached
generation. To train so that generation sees the same positions (pyreft's supervised layout, where only the
completion is labelled), set ``prompt_from_labels=True``: positions are counted within the prompt, the real
tokens before the first one whose label is not ``-100`` (calls with token-level ``labels`` only).

Encoder-decoder models (T5, BART): by default only the encoder blocks are targeted (the encoder reads the
prompt; the decoder's positions are generated one by one). Decoder blocks can be targeted explicitly
(``targets=["block"]``); their positions come from the decoder inputs of each call.

Initialization: ``init_weights=True`` draws a random orthonormal ``R`` and sets ``W = R``, ``b = 0``, so
``W h + b − R h = 0`` and the adapted model equals the base at init. ``init_weights=False`` keeps the random
``R`` and draws ``W``, ``b`` as ``nn.Linear`` does (pyreft's default; not an identity).

``R`` is parametrized explicitly: the trainable tensor ``rotation`` is unconstrained and ``R`` is the
orthonormal factor of its QR decomposition (signs fixed by the diagonal of the triangular factor, so an
orthonormal ``rotation`` is its own ``R``). ``R`` therefore stays orthonormal under any optimizer step,
the component's tensors are plain (``rotation``, ``weight``, ``bias``), and nothing is registered on the
base model. (torch's ``parametrizations.orthogonal`` would do the same job with extra ``original``/``base``
tensors in the state dict.)

Dropout (``dropout``) applies to the edit ``Rᵀ(W h + b − R h)`` in training mode (pyreft applies it to the
whole output ``Φ(h)``, which also drops entries of ``h``).

Not mergeable (an edit at chosen positions of a hidden state is no weight change: ``merge`` raises
TypeError) and not additive. Per-row routing (``adapters.route``): every routed adapter's recorder reads
the whole call, and each adapter's blocks edit only its own rows (the positions of a row depend on that
row's mask alone, so this equals running each row by itself).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..component import Component
from ..config import AdapterConfig, register
from ..targeting import TargetError
from .prompt import VirtualCache, as_kwargs, cache_of, encoder_of

PUBLIC = ("LoReFT",)
__all__ = ["LoReFT", "LoReFTBlock", "LoReFTIntervention", "PositionRecorder", "CallState", "select_positions"]

IGNORE_INDEX = -100


# --- config -------------------------------------------------------------------------------------------
@register("loreft")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoReFT(AdapterConfig):
    """LoReFT interventions ``Φ(h) = h + Rᵀ(W h + b − R h)`` on block outputs at prefix/suffix positions.

    Args:
        r: rank of the edited subspace (rows of ``R``; §4 uses 1 to 8). At most the hidden size.
        prefix: intervene on the first ``prefix`` real tokens of each sequence (pyreft's ``f<p>``).
        suffix: intervene on the last ``suffix`` real tokens (pyreft's ``l<s>``). ``prefix + suffix > 0``.
        share_weights: one intervention for prefix and suffix positions (True) or one each (False).
        dropout: dropout probability on the edit, in training mode.
        prompt_from_labels: count positions within the prompt of calls that carry token-level ``labels``
            (the real tokens before the first labelled one), so training on prompt + completion intervenes
            where ``generate()`` will.
        hidden_size: the representation size ``d``; read from the model's ``config.hidden_size`` when None.
        init_weights: True: identity at init (``W = R``, ``b = 0``); False: ``W``, ``b`` random.
        targets: default ``["block"]`` (every layer; encoder layers only for encoder-decoder models);
            ``layers`` picks layer indices.
    """

    r: int = 4
    prefix: int = 1
    suffix: int = 1
    share_weights: bool = False
    dropout: float = 0.0
    prompt_from_labels: bool = False
    hidden_size: int | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("r", "prefix", "suffix"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if field == "r" else 0):
                low = "a positive" if field == "r" else "a non-negative"
                raise ValueError(f"LoReFT {field} must be {low} integer, got {value!r}")
        if self.prefix + self.suffix == 0:
            raise ValueError("LoReFT needs positions to act on: set prefix > 0 and/or suffix > 0")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoReFT dropout must be in [0, 1), got {self.dropout!r}")
        if self.hidden_size is not None and (not isinstance(self.hidden_size, int) or self.hidden_size <= 0):
            raise ValueError(f"hidden_size must be a positive integer or None, got {self.hidden_size!r}")

    @classmethod
    def from_positions(cls, positions: str, **fields: Any) -> LoReFT:
        """A config from pyreft's position string: ``"f7+l7"``, ``"f1"``, ``"l3"``."""
        prefix = suffix = 0
        for part in positions.replace(" ", "").split("+"):
            if len(part) < 2 or part[0] not in "fl" or not part[1:].isdigit():
                raise ValueError(f"positions must look like 'f7+l7', 'f1' or 'l3', got {positions!r}")
            if part[0] == "f":
                prefix = int(part[1:])
            else:
                suffix = int(part[1:])
        return cls(prefix=prefix, suffix=suffix, **fields)

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("block",)

    def build(self, module: nn.Module, name: str) -> Component:
        raise TypeError("LoReFT components are built together (they share the call's positions): use build_all")

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        """One :class:`LoReFTBlock` per target and one :class:`PositionRecorder` per stack they run in."""
        root = modules[""]
        stacks = _stacks(root, modules)
        if self.targets is None and encoder_of(root) is not None:
            encoder = stacks[0]
            targets = [n for n in targets if n.startswith(encoder + ".")]
            if not targets:
                raise TargetError("LoReFT found no encoder block to act on; pass `targets=` explicitly")
        dim = self._dim(root)
        states: dict[str, CallState] = {}
        out: dict[str, Component] = {}
        for n in targets:
            stack = next((s for s in stacks if s == "" or n.startswith(s + ".")), "")
            if n == stack or n in stacks:
                raise TargetError(
                    f"LoReFT acts on block outputs, not on {n or 'the model itself'!r}: target blocks (role 'block')"
                )
            state = states.setdefault(stack, CallState(stack))
            out[n] = LoReFTBlock(self, dim, state, _param_like(modules[n]), name=n)
        for stack, state in states.items():
            out[stack] = PositionRecorder(state, modules[stack], use_labels=self.prompt_from_labels)
        return out

    def _dim(self, root: nn.Module) -> int:
        dim = self.hidden_size
        if dim is None:
            dim = getattr(getattr(root, "config", None), "hidden_size", None)
        if not isinstance(dim, int):
            raise TargetError(
                f"LoReFT cannot tell the hidden size of this {type(root).__name__} (no config.hidden_size): "
                "pass hidden_size=..."
            )
        if self.r > dim:
            raise ValueError(f"LoReFT r={self.r} exceeds the hidden size {dim}: R has at most d orthonormal rows")
        return dim


def _stacks(root: nn.Module, modules: Mapping[str, nn.Module]) -> list[str]:
    """Module names whose calls carry the positions: encoder and decoder stacks, then the model (``""``)."""
    found: list[str] = []
    encoder = encoder_of(root)
    if encoder is not None:
        get = getattr(root, "get_decoder", None)
        decoder = get() if callable(get) else None
        for stack in (encoder, decoder):
            name = next((n for n, m in modules.items() if m is stack and n), None)
            if name is not None:
                found.append(name)
    return [*found, ""]


def _param_like(module: nn.Module) -> torch.Tensor:
    """A floating tensor of ``module`` (for device and dtype of new parameters)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p
    return torch.empty(0)


# --- positions ----------------------------------------------------------------------------------------
def select_positions(real: torch.Tensor, prefix: int, suffix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``prefix`` and last ``suffix`` real tokens of each row.

    Args:
        real: ``(B, L)`` bool, True at real (non-padding) tokens, anywhere in the row.
        prefix, suffix: counts; when both are positive each is capped to ``⌊n/2⌋`` for ``n`` real tokens.

    Returns:
        ``(prefix_mask, suffix_mask)``, each ``(B, L)`` bool; disjoint when both counts are positive.
    """
    n = real.sum(dim=1, keepdim=True)
    cap = torch.div(n, 2, rounding_mode="floor") if prefix and suffix else n
    p, s = cap.clamp(max=prefix), cap.clamp(max=suffix)
    rank = real.long().cumsum(dim=1) - 1  # index of each real token among the real tokens of its row
    return real & (rank < p), real & (rank >= n - s)


class CallState:
    """What the blocks of one adapter need to know about the current call of their stack.

    Written by the :class:`PositionRecorder`'s pre-hook at the start of every call (nothing survives from
    the previous one), read by the :class:`LoReFTBlock` s, closed when the call returns.

    Attributes:
        stack: module name of the stack (``""``: the model).
        live: a call of the stack is running.
        mask: ``(B, T)`` bool of real tokens over the call's mask (past + current), or None (all real).
        labels: ``(B, T')`` token-level labels (``prompt_from_labels``), or None.
        fresh: the call starts a sequence (no real token cached yet): it gets interventions.
    """

    __slots__ = ("stack", "live", "mask", "labels", "fresh", "_cache")

    def __init__(self, stack: str) -> None:
        self.stack = stack
        self.live = False
        self.mask: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.fresh = True
        self._cache: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor] | None] = {}

    def open(self, mask: torch.Tensor | None, labels: torch.Tensor | None, fresh: bool) -> None:
        self.mask = None if mask is None else mask.bool()
        self.labels = labels
        self.fresh = fresh
        self._cache = {}
        self.live = True

    def close(self) -> None:
        self.live = False  # the values stay readable for recomputation in backward (gradient checkpointing)

    def positions(
        self, h: torch.Tensor, prefix: int, suffix: int, site: str
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(prefix_mask, suffix_mask)`` ``(B, L)`` for block output ``h: (B, L, d)``; None: no intervention."""
        if not self.live and not _in_backward():
            raise RuntimeError(
                f"LoReFT at {site!r} ran outside a call of {self.stack or 'the model'!r}: positions come from that "
                "call's attention mask, so call the model (or stack) the adapter was added to, not its layers"
            )
        if not self.fresh:
            return None
        batch, length = h.shape[0], h.shape[1]
        key = (batch, length, prefix, suffix)
        if key not in self._cache:
            real = self._real(batch, length, h.device, site)
            self._cache[key] = select_positions(real, prefix, suffix)
        return self._cache[key]

    def _real(self, batch: int, length: int, device: torch.device, site: str) -> torch.Tensor:
        real = _right_align(self.mask, batch, length, True, device, site)
        if self.labels is not None:
            labels = _right_align(self.labels, batch, length, IGNORE_INDEX, device, site)
            supervised = real & (labels != IGNORE_INDEX)
            before_first = supervised.long().cumsum(dim=1) == 0
            whole = ~supervised.any(dim=1, keepdim=True)  # nothing labelled: the whole sequence is the prompt
            real = real & (before_first | whole)
        return real


def _in_backward() -> bool:
    """The autograd engine is running (activation checkpointing re-runs blocks there)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _right_align(
    values: torch.Tensor | None, batch: int, length: int, fill: Any, device: torch.device, site: str
) -> torch.Tensor:
    """``values: (B, T) -> (B, L)``: its last ``L`` columns, or ``fill`` in front when ``T < L`` (virtual
    tokens of model-level adapters); None gives ``fill`` everywhere."""
    if values is None:
        return torch.full((batch, length), fill, device=device)
    if values.shape[0] != batch:
        raise ValueError(
            f"LoReFT at {site!r}: the call's attention mask has batch size {values.shape[0]}, but the block's "
            f"output has {batch}"
        )
    values = values.to(device)
    if values.shape[1] >= length:
        return values[:, values.shape[1] - length :]
    pad = torch.full((batch, length - values.shape[1]), fill, dtype=values.dtype, device=device)
    return torch.cat([pad, values], dim=1)


# --- components -----------------------------------------------------------------------------------------
class LoReFTIntervention(nn.Module):
    """One intervention ``h ↦ Rᵀ(W h + b − R h)`` (the edit; the block adds it to ``h``).

    Tensors: ``rotation: (r, d)`` (unconstrained; ``R`` is its orthonormalization), ``weight: (r, d)`` (W),
    ``bias: (r,)`` (b).
    """

    def __init__(self, r: int, dim: int, dropout: float, like: torch.Tensor) -> None:
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype if like.is_floating_point() else torch.float32}
        self.rotation = nn.Parameter(torch.empty(r, dim, **kw))
        self.weight = nn.Parameter(torch.empty(r, dim, **kw))
        self.bias = nn.Parameter(torch.empty(r, **kw))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"r={self.weight.shape[0]}, d={self.weight.shape[1]}"

    def rotation_matrix(self) -> torch.Tensor:
        """``R: (r, d)`` with orthonormal rows: the Q factor of ``rotationᵀ = Q T`` with ``diag(T) ≥ 0``."""
        a = self.rotation
        q, t = torch.linalg.qr(a.float().T)  # (d, r), (r, r); float32: QR has no half-precision kernels
        sign = torch.where(t.diagonal() < 0, -1.0, 1.0)
        return (q * sign).T.to(a.dtype)

    @torch.no_grad()
    def initialize(self, identity: bool) -> None:
        """Random orthonormal ``R``; ``W = R, b = 0`` (identity) or ``nn.Linear``'s init for ``W``, ``b``."""
        self.rotation.copy_(nn.init.orthogonal_(torch.empty(self.rotation.shape, device=self.rotation.device)))
        if identity:
            self.weight.copy_(self.rotation_matrix())
            self.bias.zero_()
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(self.weight.shape[1])
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h: (..., d) -> Rᵀ(W h + b − R h): (..., d)``."""
        rot = self.rotation_matrix()
        x = h.to(self.weight.dtype)  # computed in the intervention's dtype, returned in h's
        coords = F.linear(x, self.weight - rot, self.bias)  # (..., r): target minus current subspace values
        return self.dropout(coords @ rot).to(h.dtype)


class LoReFTBlock(Component):
    """LoReFT at one block: edits the block's output hidden states ``(B, L, d)`` at prefix/suffix positions.

    The block's output may be a tensor or a tuple / model output whose first item is the hidden states
    (transformers 5: LLaMA/BERT/GPT-2/ViT layers return a tensor, T5 blocks a tuple).
    """

    def __init__(self, cfg: LoReFT, dim: int, state: CallState, like: torch.Tensor, name: str = "") -> None:
        super().__init__()
        self.prefix_count, self.suffix_count = cfg.prefix, cfg.suffix
        self.init_identity = cfg.init_weights
        self.dim = dim
        if cfg.share_weights:
            self.shared = LoReFTIntervention(cfg.r, dim, cfg.dropout, like)
        else:
            if cfg.prefix:
                self.prefix = LoReFTIntervention(cfg.r, dim, cfg.dropout, like)
            if cfg.suffix:
                self.suffix = LoReFTIntervention(cfg.r, dim, cfg.dropout, like)
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "_site", name)

    def extra_repr(self) -> str:
        return f"prefix={self.prefix_count}, suffix={self.suffix_count}"

    def interventions(self) -> list[LoReFTIntervention]:
        return [m for m in self.children() if isinstance(m, LoReFTIntervention)]

    def initialize(self, module: nn.Module) -> None:
        for iv in self.interventions():
            iv.initialize(self.init_identity)

    def merge(self, module: nn.Module) -> None:
        raise TypeError("LoReFT cannot be merged: it edits hidden states at chosen positions, not weights")

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        h = self._checked(y)
        sel = self.selected(h)
        if sel is None:
            return y
        return _with_hidden(y, self.edit(h, *sel))

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: Any, key: Any) -> Any:
        """Per-row routing: each adapter edits its own rows, at positions counted on the whole call's mask."""
        live = [c for c in comps if c is not None]
        h = live[0]._checked(y)
        out = h
        for (_, rows), c in zip(plan.groups, comps):
            sel = None if c is None else c.selected(h)
            if sel is not None:
                sub = c.edit(h.index_select(0, rows), sel[0].index_select(0, rows), sel[1].index_select(0, rows))
                out = out.index_copy(0, rows, sub)
        return y if out is h else _with_hidden(y, out)

    def _checked(self, y: Any) -> torch.Tensor:
        """The hidden states ``(B, L, d)`` in the block's output ``y``."""
        h = _hidden(y)
        if not isinstance(h, torch.Tensor) or h.dim() != 3 or h.shape[-1] != self.dim:
            shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(
                f"LoReFT at {self.__dict__['_site']!r} expects hidden states (batch, seq, {self.dim}) as the "
                f"module's output, got {shape}: target transformer blocks (role 'block')"
            )
        return h

    def selected(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(prefix_mask, suffix_mask)`` ``(B, L)`` of the current call, or None (no intervention)."""
        return self.__dict__["_state"].positions(h, self.prefix_count, self.suffix_count, self.__dict__["_site"])

    def edit(self, h: torch.Tensor, prefix: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
        """``h: (B, L, d)`` with ``Φ`` applied where ``prefix`` / ``suffix`` ``(B, L)`` are True."""
        shared = getattr(self, "shared", None)
        if shared is not None:
            sel = (prefix | suffix).unsqueeze(-1)
            return torch.where(sel, h + shared(h), h)
        for iv, sel in ((getattr(self, "prefix", None), prefix), (getattr(self, "suffix", None), suffix)):
            if iv is not None:
                h = torch.where(sel.unsqueeze(-1), h + iv(h), h)
        return h


def _hidden(y: Any) -> Any:
    if isinstance(y, torch.Tensor):
        return y
    if hasattr(y, "keys"):
        return y[next(iter(y.keys()))]
    if isinstance(y, (tuple, list)) and y:
        return y[0]
    return y


def _with_hidden(y: Any, h: torch.Tensor) -> Any:
    if isinstance(y, torch.Tensor):
        return h
    if hasattr(y, "keys"):
        y[next(iter(y.keys()))] = h
        return y
    if isinstance(y, tuple):
        return (h, *y[1:])
    return [h, *y[1:]]


class PositionRecorder(Component):
    """On the model (or an encoder/decoder stack): records each call's padding mask for the LoReFT blocks.

    Holds no parameters and changes nothing in the call. The mask is the call's 2-D ``attention_mask``
    (None: every position is real); the call is *fresh* when its KV cache (``cache``, before transformers 5.24 ``past_key_values``) holds no real
    token yet. With ``use_labels`` the call's token-level ``labels`` are kept too (``prompt_from_labels``).
    """

    has_pre = True
    has_post = True

    def __init__(self, state: CallState, module: nn.Module, use_labels: bool = False) -> None:
        super().__init__()
        self.use_labels = use_labels
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "_module_ref", module)

    def pre_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kw = as_kwargs(self.__dict__["_module_ref"], args, kwargs)
        mask = kw.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"LoReFT reads positions from a 2-D attention mask (batch, seq), got {shape}; pass the 2-D "
                "padding mask and let the model build the 4-D one"
            )
        labels = kw.get("labels") if self.use_labels else None
        if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.is_floating_point():
            labels = None
        fresh = _fresh(cache_of(kw))
        self.__dict__["_state"].open(mask, labels, fresh)
        return args, kwargs

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        self.__dict__["_state"].close()
        return y

    @classmethod
    def routed_call(
        cls, comps: list[Component | None], plan: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Every routed adapter records the whole call (its blocks pick their own rows); the call is unchanged."""
        for c in comps:
            if c is not None:
                c.pre_call(args, kwargs)
        return args, kwargs

    @classmethod
    def routed_output(
        cls, comps: list[Component | None], plan: Any, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any
    ) -> Any:
        for c in comps:
            if c is not None:
                c.post_call(args, kwargs, y)
        return y

    def merge(self, module: nn.Module) -> None:
        raise TypeError("LoReFT cannot be merged: it edits hidden states at chosen positions, not weights")


def _fresh(cache: Any) -> bool:
    """The call starts a sequence: no KV cache, or one holding no real token (prefix-tuning entries only)."""
    if cache is None:
        return True
    if callable(getattr(cache, "get_seq_length", None)):
        return VirtualCache.fresh(cache)
    return not cache  # a legacy tuple cache: empty or not
