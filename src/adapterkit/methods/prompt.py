"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

A frozen model reads ``P`` trainable "soft prompt" vectors in front of every input sequence (§2)::

    input_ids ─► embed ─► [ p_1 … p_P | e(x_1) … e(x_L) ] ─► frozen model ─► logits of x_1 … x_L
                            trainable    frozen lookups

The component sits on the model itself (module name ``""``): a forward pre-hook rewrites the call so that
everything stays consistent with the ``P`` virtual positions in front:

* ``inputs_embeds``: the prompt ``(P, dim)`` is prepended (``input_ids`` are looked up first, through the
  model's own input embedding module, so an adapter on the embeddings still applies).
* ``attention_mask``: ``P`` ones in front; ``token_type_ids``: ``P`` zeros in front.
* ``position_ids`` (when given): the prompt takes the ``P`` positions before the first token's and the real
  tokens move ``P`` further, as if the prompt were text (the models' own default when none are given).
* ``labels`` of token-level tasks (causal LM, token classification: integer labels shaped like the input):
  ``-100`` in front, so the loss ignores the virtual positions.
* ``logits`` of token-level tasks lose the ``P`` virtual positions again on the way out, so
  ``model(**batch).logits`` lines up with the input with or without the adapter (peft returns the
  ``P + L`` positions; compare ``peft_logits[:, P:]``).

Generation with a KV cache: the prompt enters the cache once, on the first step (an empty cache, or one
that holds only prefix-tuning entries); later steps only get their attention mask extended by ``P`` and
their position ids moved by ``P``. Attention masks, position ids and labels passed in always describe
the real tokens only, which is what ``generate()`` passes. A cache that already holds real tokens is taken
to contain the prompt too (it came from an earlier call of this model with the adapter active).

Encoder-decoder models (T5, BART): the prompt goes in front of the *encoder* input (peft's semantics);
a component on the encoder stack prepends it (so ``generate()``, which runs the encoder on its own, sees
it) and one on the model extends the encoder attention mask that the decoder's cross-attention reads.

Initialization (§3.2, Figure 3b): ``"sample_vocab"`` (default) copies the embeddings of random vocabulary
tokens, ``"text"`` those of ``init_token_ids`` (repeated or cut to ``P``; Lester et al.'s "class label"
init is this with the label words), ``"random"`` draws ``U(-0.5, 0.5)``. No init is an identity: the
adapted model always differs from the base.

Several prompt (and prefix) adapters can be active at once: each adds its own virtual tokens. Not mergeable.
Per-row routing (``adapters.route``): each row gets its own adapter's prompt; rows with shorter prompts (or
none: base rows, other methods) are padded to the longest (:class:`RowLayout`; in front on causal models,
with explicit position ids, behind on bidirectional ones), so each row computes what it computes alone.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..component import Component
from ..config import AdapterConfig, register
from ..targeting import TargetError

PUBLIC = ("PromptTuning",)
__all__ = [
    "PromptTuning",
    "PromptInit",
    "SoftPrompt",
    "EncoderMask",
    "as_kwargs",
    "encoder_of",
    "batch_size_of",
    "VirtualCache",
    "cache_key",
    "cache_of",
    "take_cache",
    "output_cache",
]


# --- helpers shared by the model-level methods (prompt.py, prefix.py) --------------------------------
@functools.cache
def _positional_names(cls: type) -> tuple[str, ...]:
    params = list(inspect.signature(cls.forward).parameters.values())[1:]  # drop self
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds)


def as_kwargs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call ``module(*args, **kwargs)`` as keyword arguments only (positional ones named by ``forward``)."""
    if not args:
        return dict(kwargs)
    names = _positional_names(type(module))
    if len(args) > len(names):
        raise TypeError(
            f"{type(module).__name__}.forward takes {len(names)} positional arguments, got {len(args)}"
        )
    return {**dict(zip(names, args)), **kwargs}


def encoder_of(model: nn.Module) -> nn.Module | None:
    """The encoder stack of an encoder-decoder model (``model.get_encoder()``), else None."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    get = getattr(model, "get_encoder", None)
    return get() if callable(get) else None


def batch_size_of(kw: Mapping[str, Any], keys: Sequence[str]) -> int | None:
    """Batch size from the first of ``keys`` that holds a tensor (or a model output whose first item is one)."""
    for key in keys:
        value = kw.get(key)
        if value is not None and not isinstance(value, torch.Tensor):
            value = value[0] if isinstance(value, (tuple, list)) or hasattr(value, "keys") else None
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def extend_mask(mask: Any, n: int, needed: int | None) -> Any:
    """``mask: (B, T)`` with ``n`` ones in front when it covers fewer than ``needed`` positions (None: always).

    Several model-level adapters each extend the mask by their own count; one that finds the mask already
    long enough (the caller or the model level extended it) leaves it alone.
    """
    if not isinstance(mask, torch.Tensor):
        return mask
    if mask.dim() != 2:
        raise ValueError(
            f"model-level adapters (prompt/prefix tuning) need a 2-D attention mask (batch, seq), got shape "
            f"{tuple(mask.shape)}; pass the 2-D padding mask and let the model build the 4-D one"
        )
    if needed is not None and mask.shape[1] >= needed:
        return mask
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


@functools.cache
def takes(cls: type, name: str) -> bool:
    """``cls.forward`` has a parameter called ``name``."""
    return name in inspect.signature(cls.forward).parameters


# transformers 5.24 renamed the KV-cache argument and output field ``past_key_values`` to ``cache`` (the old name
# still works through a deprecation shim until 5.40); earlier releases only know ``past_key_values``.
CACHE_KEYS = ("cache", "past_key_values")


@functools.cache
def cache_key(cls: type) -> str:
    """The name under which ``cls.forward`` takes its KV cache: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (earlier releases, and models that take neither)."""
    return "cache" if takes(cls, "cache") else "past_key_values"


def cache_of(kw: Mapping[str, Any]) -> Any:
    """The KV cache of a call (passed under either name), or None."""
    cache = kw.get("cache")
    return cache if cache is not None else kw.get("past_key_values")


def take_cache(module: nn.Module, kw: dict[str, Any]) -> Any:
    """The call's KV cache, moved in ``kw`` to the name ``module.forward`` takes (:func:`cache_key`), so
    hooks that add to it hand the model the object they filled.

    Raises:
        ValueError: the call passes two different caches under both names.
    """
    key = cache_key(type(module))
    other = CACHE_KEYS[1] if key == CACHE_KEYS[0] else CACHE_KEYS[0]
    cache, alias = kw.get(key), kw.pop(other, None)
    if cache is not None and alias is not None and alias is not cache:
        raise ValueError("the call passes both `cache` and `past_key_values`; pass the KV cache once, as `cache`")
    if cache is None and alias is not None:
        cache = alias
    if cache is not None or key in kw:
        kw[key] = cache
    return cache


def output_cache(y: Any) -> tuple[str | None, Any]:
    """``(field, cache)`` of a model output (``cache`` or ``past_key_values``), or ``(None, None)``."""
    if hasattr(y, "keys"):
        for key in CACHE_KEYS:
            if key in y:
                return key, y[key]
    return None, None


def is_causal(module: nn.Module) -> bool:
    """The module's attention is causal (transformers attention modules carry ``is_causal``)."""
    return any(getattr(m, "is_causal", False) is True for m in module.modules())


class RowLayout:
    """Where each row's virtual tokens go when the rows of one routed batch use different adapters.

    Row ``b`` carries ``counts[b]`` virtual tokens (0 for base rows and for adapters with none here) and
    every row is widened by ``width = max(counts)`` slots, the unused ones padding (masked out)::

        left  (causal models, KV-cache prefixes):  [ pad (width - n) | virtual (n) | real tokens ]
        right (bidirectional models):              [ virtual (n) | real tokens | pad (width - n) ]

    Left padding keeps the real tokens last, where generation appends; right padding keeps each row's
    first position where a run of that row alone has it (BERT's pooler reads position 0).

    Attributes:
        counts: ``(B,)`` virtual tokens per row.
        width: the slots every row gets.
        uniform: every row has ``width`` virtual tokens (no padding: the layout is the ordinary one).
        left: the padding goes in front.
    """

    def __init__(self, comps: Sequence[Any], plan: Any, count: Any, left: bool) -> None:
        per_group = [count(c) if c is not None else 0 for c in comps]
        device = plan.row_group.device
        self.counts = torch.tensor([*per_group, 0], dtype=torch.long, device=device)[plan.row_group]
        self.width = int(self.counts.max()) if plan.batch else 0
        self.uniform = bool((self.counts == self.width).all())
        self.left = left
        base = torch.nonzero(plan.row_group == len(comps)).flatten()
        self.groups = [(c, k, rows) for (_, rows), c, k in zip(plan.groups, comps, per_group)]
        if base.numel():
            self.groups.append((None, 0, base))
        order = torch.cat([rows for _, _, rows in self.groups])
        self._back = torch.empty_like(order)
        self._back[order] = torch.arange(order.numel(), device=device)

    def join(self, x: torch.Tensor, front: Any, fill: Any) -> torch.Tensor:
        """``x: (B, L, ...) -> (B, width + L, ...)``: each group's ``front(comp, n, real)`` (``(rows, n, ...)``,
        ``real`` the group's rows of ``x``) and ``fill`` padding placed around the real entries as the layout
        says."""
        parts = []
        for comp, n, rows in self.groups:
            real = x.index_select(0, rows)
            pad = real.new_full((rows.numel(), self.width - n, *real.shape[2:]), fill)
            virtual = front(comp, n, real) if n else real[:, :0]
            parts.append(torch.cat([pad, virtual, real] if self.left else [virtual, real, pad], dim=1))
        return torch.cat(parts).index_select(0, self._back)

    def positions(
        self, model: nn.Module, key: str, pos: Any, past: int, length: int, batch: int, what: str
    ) -> torch.Tensor:
        """``(B, L)`` position ids of this call's real tokens as a run without virtual tokens numbers them
        (``pos`` if given, else ``past, past + 1, ...``), for layouts whose rows need explicit ones.

        Raises:
            NotImplementedError: ``model.forward`` takes no ``key`` (``what``: "prompts", "prefixes").
        """
        if isinstance(pos, torch.Tensor):
            return pos.expand(batch, -1)
        if not takes(type(model), key):
            raise NotImplementedError(
                f"rows with {what} of different lengths (or base rows) need explicit position ids, which "
                f"{type(model).__name__} does not take; route rows whose {what} have the same length"
            )
        return (past + torch.arange(length, device=self.counts.device)).expand(batch, -1)

    def mask_front(self, like: torch.Tensor) -> torch.Tensor:
        """``(B, width)`` mask of the virtual slots in front (left layout), in ``like``'s dtype."""
        slots = torch.arange(self.width, device=like.device)
        return (slots >= self.width - self.counts[:, None]).to(like.dtype)

    def take(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """``x: (B, width + L, ...) -> (B, L, ...)``: the real positions of each row."""
        if self.left or self.uniform:
            return x[:, x.shape[1] - length :]
        index = self.counts[:, None] + torch.arange(length, device=x.device)
        return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def widen_per_token(kw: dict[str, Any], batch: int, length: int, token_level: bool, join: Any, shift: Any) -> None:
    """Give the per-token inputs of a call whose embeddings get virtual tokens in front their entries for
    those tokens: position ids (the real ones move by ``shift``, the virtual ones count up to them), token
    type 0, and label -100 (ignored) for token-level heads. ``join(t, front, fill)`` widens ``t: (B, L)``
    with ``front(comp, n, real) -> (rows, n)`` (a plain prepend, or :meth:`RowLayout.join`)."""
    pos = kw.get("position_ids")
    if isinstance(pos, torch.Tensor):
        kw["position_ids"] = join(
            pos + shift, lambda c, n, real: real[..., :1] - n + torch.arange(n, device=real.device), 0
        )
    types = kw.get("token_type_ids")
    if isinstance(types, torch.Tensor) and types.shape[-1] == length:
        kw["token_type_ids"] = join(types, lambda c, n, real: real.new_zeros(*real.shape[:-1], n), 0)
    labels = kw.get("labels")
    if (
        token_level
        and isinstance(labels, torch.Tensor)
        and not labels.is_floating_point()
        and tuple(labels.shape) == (batch, length)
    ):
        kw["labels"] = join(labels, lambda c, n, real: real.new_full((*real.shape[:-1], n), -100), -100)


class VirtualCache:
    """What a transformers cache holds besides real tokens: the prefixes that prefix-tuning components put in.

    The record lives on the cache object (attribute ``_adapterkit_virtual``: component key -> count), so a
    cache returned by one call and passed to the next (``generate()``, manual decoding) carries it along.
    """

    ATTR = "_adapterkit_virtual"

    @staticmethod
    def length(cache: Any) -> int:
        return 0 if cache is None else int(cache.get_seq_length())

    @classmethod
    def record(cls, cache: Any) -> dict[int, int]:
        return dict(getattr(cache, cls.ATTR, None) or {}) if cache is not None else {}

    @classmethod
    def add(cls, cache: Any, key: int, count: int) -> None:
        setattr(cache, cls.ATTR, {**cls.record(cache), key: count})

    @classmethod
    def fresh(cls, cache: Any) -> bool:
        """No real token has been cached yet: the cache is absent, empty, or holds only prefixes."""
        return cls.length(cache) == sum(cls.record(cache).values())


_KEYS = itertools.count()


def position_limit(model: nn.Module) -> int | None:
    """How many positions ``model``'s learned absolute position embeddings hold (BERT, GPT-2, BART: the config's
    ``max_position_embeddings``/``n_positions``, checked against a position embedding table of that size, or 2
    more as BART's offset table), or None where positions are no table (rotary, relative, sinusoidal: LLaMA, T5)."""
    cfg = getattr(model, "config", None)
    limit = next(
        (v for f in ("max_position_embeddings", "n_positions") if isinstance(v := getattr(cfg, f, None), int)),
        None,
    )
    if limit is None or limit <= 0:
        return None
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if (
            isinstance(module, nn.Embedding)
            and ("position" in leaf or leaf == "wpe")
            and module.num_embeddings in (limit, limit + 2)
        ):
            return limit
    return None


_UNREAD = object()


def check_positions(component: nn.Module, model: nn.Module, total: int, n: int, what: str) -> None:
    """Refuse a call whose ``total`` positions (``n`` virtual tokens of ``component`` + cached and new tokens) do not
    fit ``model``'s learned position embeddings (:func:`position_limit`, read once per component), instead of the
    model's raw index or shape error.

    Raises:
        ValueError: how many positions, the limit, and what to shorten.
    """
    limit = component.__dict__.get("_position_limit", _UNREAD)
    if limit is _UNREAD:
        limit = component.__dict__["_position_limit"] = position_limit(model)
    if limit is not None and total > limit:
        raise ValueError(
            f"{what} needs {total} positions ({n} virtual tokens + {total - n} tokens), but {type(model).__name__} "
            f"has learned position embeddings for {limit}: keep inputs (and generation) to at most {limit - n} "
            f"tokens (truncate, e.g. --max-length {limit - n}) or use fewer virtual tokens"
        )


def component_key() -> int:
    """A process-unique key for a model-level component (its entry in :class:`VirtualCache` records)."""
    return next(_KEYS)


# --- config -------------------------------------------------------------------------------------------
def whole_model_prompt(
    cfg: Any, module: nn.Module, name: str, what: str, make: Callable[[nn.Module, nn.Module, bool], Component]
) -> Component:
    """The component of a prompt method on the model root: ``make(module, input embeddings, token_level=True)``
    for decoder-only and encoder-only models; for encoder-decoder models an :class:`EncoderMask` here (the prompt
    itself sits on the encoder: :func:`encoder_prompt_sites`)."""
    if name != "":
        raise TargetError(f"{what} acts on the whole model, not on {name!r}: leave `targets` unset (or pass [''])")
    encoder = encoder_of(module)
    if encoder is not None:
        _input_embeddings(encoder, model=module)  # refuse encoders without token inputs before building anything
        return EncoderMask(cfg, module)
    return make(module, _input_embeddings(module), True)


def encoder_prompt_sites(
    modules: Mapping[str, nn.Module], make: Callable[[nn.Module, nn.Module, bool], Component]
) -> dict[str, Component]:
    """Encoder-decoder models: ``make(encoder, its input embeddings, token_level=False)`` on the encoder stack."""
    root = modules.get("")
    encoder = encoder_of(root) if root is not None else None
    if encoder is None:
        return {}
    name = next((n for n, m in modules.items() if m is encoder), None)
    if name is None:
        raise TargetError(f"the encoder of this {type(root).__name__} is not one of its submodules")
    return {name: make(encoder, _input_embeddings(encoder, model=root), False)}


class PromptInit(str, enum.Enum):
    """How the soft prompt starts (Lester et al. §3.2)."""

    RANDOM = "random"
    SAMPLE_VOCAB = "sample_vocab"
    TEXT = "text"


@register("prompt_tuning")
@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTuning(AdapterConfig):
    """Soft prompt tuning: ``num_virtual_tokens`` trainable input embeddings in front of every sequence.

    Args:
        num_virtual_tokens: prompt length ``P`` (§3.3: 20 to 100 tokens work well; gains saturate past 20
            for large models).
        init: see :class:`PromptInit`.
        init_token_ids: token ids whose embeddings initialize the prompt with ``init="text"`` (repeated or
            cut to ``P``, as peft's ``TEXT`` init). No tokenizer is loaded: tokenize the text yourself, or
            use :meth:`from_text` with a tokenizer object.
        init_weights: accepted for the common interface; prompt tuning has no identity init, so it
            changes nothing.
        targets: leave unset; the method acts on the model as a whole (module name ``""``).

    The embedding size is read from the model's input embeddings (``get_input_embeddings()``; the encoder's
    for encoder-decoder models).
    """

    num_virtual_tokens: int = 20
    init: PromptInit = PromptInit.SAMPLE_VOCAB
    init_token_ids: Sequence[int] | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "init", PromptInit(self.init))
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.init_token_ids is not None:
            ids = tuple(self.init_token_ids)
            if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise ValueError("init_token_ids must be a non-empty list of non-negative token ids")
            object.__setattr__(self, "init_token_ids", ids)
        if self.init is PromptInit.TEXT and self.init_token_ids is None:
            raise ValueError(
                "init='text' needs init_token_ids=[...] (or use PromptTuning.from_text(text, tokenizer))"
            )
        if self.init is not PromptInit.TEXT and self.init_token_ids is not None:
            raise ValueError(f"init_token_ids is only used with init='text', not init={self.init.value!r}")

    @classmethod
    def from_text(cls, text: str, tokenizer: Any, **fields: Any) -> PromptTuning:
        """A ``init="text"`` config whose prompt starts as the embeddings of ``text``'s tokens.

        ``tokenizer`` is any object that maps a string to ids: a transformers tokenizer (``tokenizer(text)
        ["input_ids"]``) or anything with ``encode(text)``. The ids are stored in the config, so it stays
        serializable and needs no tokenizer to load.
        """
        if callable(getattr(tokenizer, "encode", None)):
            ids = tokenizer.encode(text)
        else:
            ids = tokenizer(text)["input_ids"]
        return cls(init=PromptInit.TEXT, init_token_ids=tuple(int(i) for i in ids), **fields)

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("",)

    def build(self, module: nn.Module, name: str) -> Component:
        return whole_model_prompt(self, module, name, "prompt tuning", self._prompt)

    def extra_sites(self, modules: Mapping[str, nn.Module], targets: list[str]) -> dict[str, Component]:
        """Encoder-decoder models: the prompt itself sits on the encoder stack."""
        return encoder_prompt_sites(modules, self._prompt)

    def _prompt(self, module: nn.Module, embeddings: nn.Module, token_level: bool) -> Component:
        return SoftPrompt(self, module, embeddings, token_level=token_level)


_TOKEN_INPUTS = ("input_ids", "inputs_embeds")


def _inputs_of(cls: type) -> list[str]:
    """The named tensor inputs of ``cls.forward`` (for messages)."""
    names = [n for n in inspect.signature(cls.forward).parameters if n != "self"]
    return [n for n in names if n.endswith(("_ids", "_values", "_features", "_embeds", "pixel_values"))][:4]


def _input_embeddings(module: nn.Module, model: nn.Module | None = None) -> nn.Module:
    """The token embedding table that prompt tuning prepends to (``module``: the model, or the encoder stack of
    the encoder-decoder ``model``).

    Raises:
        TargetError: ``module`` takes no token ids or has no ``(vocab, dim)`` token embedding (vision and audio
            models, Whisper's encoder, two-tower models such as CLIP), or takes no ``inputs_embeds`` (CLIP's text
            model): one message saying why and what to use.
    """
    owner = type(model if model is not None else module).__name__
    where = f"the encoder of {owner} ({type(module).__name__})" if model is not None else owner

    def refuse(why: str) -> TargetError:
        return TargetError(
            f"prompt tuning cannot act on {where}: it {why}. Prompt tuning (Lester et al. 2021) prepends trained "
            "vectors to the input token embeddings, so it needs a text input; adapt this model's layers instead: "
            "LoRA (ak.LoRA()), (IA)^3 (ak.IA3()) or a bottleneck adapter"
            + (
                "; on encoder-decoder models prefix tuning acts on the decoder"
                if model is not None and takes(type(model), "decoder_input_ids")
                else ""
            )
        )

    if not any(takes(type(module), n) for n in _TOKEN_INPUTS):
        inputs = ", ".join(_inputs_of(type(module))) or "no token ids"
        raise refuse(f"takes no input_ids/inputs_embeds (its inputs: {inputs})")
    emb = getattr(module, "embed_tokens", None)
    if isinstance(emb, nn.Module):
        return emb
    get = getattr(module, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except NotImplementedError:  # transformers: two-tower models (CLIP) and models without token inputs
        raise refuse(
            "exposes no single input token embedding (get_input_embeddings() is not implemented)"
        ) from None
    weight = getattr(emb, "weight", None) if isinstance(emb, nn.Module) else None
    if not isinstance(weight, torch.Tensor):
        raise refuse("exposes no input token embedding (get_input_embeddings())")
    if weight.dim() != 2:
        raise refuse(
            f"embeds its input with a {type(emb).__name__} (weight {tuple(weight.shape)}), not a token table"
        )
    if not takes(type(module), "inputs_embeds"):  # the prompt reaches the model as inputs_embeds
        raise refuse(
            "takes input_ids but no inputs_embeds, so the prompt vectors cannot be handed to it (it reads the "
            "token ids themselves, e.g. CLIP's text model pools at the end-of-text token's position)"
        )
    return emb


# --- components ---------------------------------------------------------------------------------------
class SoftPrompt(Component):
    """Prepends the soft prompt ``prompt: (P, dim)`` to the inputs of a model (or of an encoder stack).

    Args:
        cfg: the config.
        module: the module whose calls are rewritten (the model, or the encoder of an encoder-decoder).
        embeddings: its input token embedding module (looked up for ``input_ids``; kept outside the
            component's module tree).
        token_level: the module is the model itself: also extend ``labels`` and strip the prompt positions
            from token-level ``logits``.
    """

    has_pre = True

    def __init__(self, cfg: PromptTuning, module: nn.Module, embeddings: nn.Module, token_level: bool) -> None:
        super().__init__()
        weight = embeddings.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.cfg = cfg
        self.prompt = nn.Parameter(
            torch.empty(cfg.num_virtual_tokens, weight.shape[-1], device=weight.device, dtype=dtype)
        )
        self.num_virtual_tokens = cfg.num_virtual_tokens  # the prompt's rows, read without computing the prompt
        self.token_level = token_level
        self.has_post = token_level
        self.key = component_key()
        self.causal = is_causal(module)
        object.__setattr__(self, "_module_ref", module)
        object.__setattr__(self, "_embed_ref", embeddings)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.prompt.shape[0]}, dim={self.prompt.shape[1]}"

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        """Lester et al. §3.2: sampled vocabulary, given tokens, or ``U(-0.5, 0.5)``."""
        init, n = self.cfg.init, self.prompt.shape[0]
        weight = self.__dict__["_embed_ref"].weight
        if init is PromptInit.RANDOM:
            nn.init.uniform_(self.prompt, -0.5, 0.5)
            return
        if init is PromptInit.SAMPLE_VOCAB:
            ids = torch.randint(0, weight.shape[0], (n,), device=weight.device)
        else:
            ids = torch.tensor(self.cfg.init_token_ids, dtype=torch.long, device=weight.device)
            if int(ids.max()) >= weight.shape[0]:
                raise ValueError(
                    f"init_token_ids holds id {int(ids.max())}, but the model's vocabulary has {weight.shape[0]} tokens"
                )
            ids = ids.repeat((n + len(ids) - 1) // len(ids))[:n]
        self.prompt.copy_(weight[ids].to(self.prompt.dtype))

    def pre_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kw = as_kwargs(self.__dict__["_module_ref"], args, kwargs)
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if ids is None and embeds is None:
            return args, kwargs  # e.g. a decoder-only call driven by other inputs: nothing to prepend to
        cache = take_cache(self.__dict__["_module_ref"], kw)
        n = self.num_virtual_tokens
        if VirtualCache.fresh(cache):
            kw, length = self._prepend(kw, ids, embeds, n)
        else:  # a later generation step: the prompt is in the cache already
            length = (embeds if embeds is not None else ids).shape[1]
            if kw.get("position_ids") is not None:
                kw["position_ids"] = kw["position_ids"] + n
        module = self.__dict__["_module_ref"]
        check_positions(self, module, VirtualCache.length(cache) + length, n, "prompt tuning")
        kw["attention_mask"] = extend_mask(kw.get("attention_mask"), n, VirtualCache.length(cache) + length)
        return (), kw

    def _prepend(
        self, kw: dict[str, Any], ids: torch.Tensor | None, embeds: torch.Tensor | None, n: int
    ) -> tuple[dict[str, Any], int]:
        """``inputs_embeds: (B, L, dim) -> (B, P + L, dim)`` and the per-token inputs that go with it."""
        if embeds is None:
            embeds = self.__dict__["_embed_ref"](ids)
        batch, length = embeds.shape[:2]
        prompt = self.prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        new = torch.cat([prompt, embeds], dim=1)
        # the real length survives several stacked prompts: the first one records it
        new._adapterkit_real = getattr(embeds, "_adapterkit_real", length)
        kw["inputs_embeds"], kw["input_ids"] = new, None

        def prepend(t: torch.Tensor, front: Any, fill: Any) -> torch.Tensor:
            return torch.cat([front(self, n, t), t], dim=-1)

        widen_per_token(kw, batch, length, self.token_level, prepend, n)
        return kw, n + length

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        """Token-level logits ``(B, P + L, ...) -> (B, L, ...)``: the first prompt to run back strips all."""
        embeds = kwargs.get("inputs_embeds")
        real = getattr(embeds, "_adapterkit_real", None)
        logits = getattr(y, "logits", None) if hasattr(y, "keys") else None
        if real is None or not isinstance(logits, torch.Tensor) or logits.dim() < 3:
            return y
        if logits.shape[1] == embeds.shape[1] and real < logits.shape[1]:
            y["logits"] = logits[:, logits.shape[1] - real :]
        return y

    # --- per-row routing ------------------------------------------------------------------------------
    @classmethod
    def routed_call(
        cls, comps: list[Component | None], plan: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Each row gets its own adapter's prompt (base rows none), laid out by :class:`RowLayout`: padded in
        front on causal models, behind on bidirectional ones. Rows with fewer virtual tokens than the widest
        get explicit ``position_ids`` where padding in front would move them, so every row sees exactly the
        positions, mask and tokens of a run by itself."""
        head = next(c for c in comps if c is not None)
        module = head.__dict__["_module_ref"]
        kw = as_kwargs(module, args, kwargs)
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if ids is None and embeds is None:
            return args, kwargs
        layout = RowLayout(comps, plan, lambda c: c.num_virtual_tokens, left=head.causal)
        cache = take_cache(module, kw)
        fresh = VirtualCache.fresh(cache)
        x = embeds if embeds is not None else ids
        batch, length = x.shape[:2]
        past = (
            VirtualCache.length(cache) - sum(VirtualCache.record(cache).values()) - (0 if fresh else layout.width)
        )
        pos = kw.get("position_ids")
        if isinstance(pos, torch.Tensor) or (layout.left and not layout.uniform):  # padding in front moves them
            pos = layout.positions(module, "position_ids", pos, past, length, batch, "prompts")
        mask = kw.get("attention_mask")
        if mask is None and not layout.uniform:
            mask = torch.ones(batch, past + length, dtype=torch.long, device=x.device)
        if not fresh:  # a later generation step: the prompts are in the cache (left layout)
            if pos is not None:
                kw["position_ids"] = pos + layout.counts[:, None]
            if mask is not None and mask.shape[1] < VirtualCache.length(cache) + length:
                kw["attention_mask"] = torch.cat([layout.mask_front(mask), mask], dim=1)
            return (), kw
        if embeds is None:
            embeds = head.__dict__["_embed_ref"](ids)

        def prompts(c: SoftPrompt, n: int, real: torch.Tensor) -> torch.Tensor:
            return c.prompt.to(embeds.dtype).unsqueeze(0).expand(real.shape[0], -1, -1)

        new = layout.join(embeds, prompts, 0.0)
        new._adapterkit_real = getattr(embeds, "_adapterkit_real", length)
        new._adapterkit_layout = layout
        kw["inputs_embeds"], kw["input_ids"] = new, None
        if pos is not None:
            kw["position_ids"] = pos
        widen_per_token(kw, batch, length, head.token_level, layout.join, layout.counts[:, None])
        if mask is not None and mask.shape[1] < VirtualCache.length(cache) + layout.width + length:
            kw["attention_mask"] = layout.join(mask, lambda c, n, real: real.new_ones(real.shape[0], n), 0)
        return (), kw

    @classmethod
    def routed_output(
        cls, comps: list[Component | None], plan: Any, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any
    ) -> Any:
        """Token-level logits ``(B, width + L, ...) -> (B, L, ...)``: each row's real positions."""
        embeds = kwargs.get("inputs_embeds")
        layout = getattr(embeds, "_adapterkit_layout", None)
        logits = getattr(y, "logits", None) if hasattr(y, "keys") else None
        if layout is None or not isinstance(logits, torch.Tensor) or logits.dim() < 3:
            return y
        if logits.shape[1] == embeds.shape[1]:
            y["logits"] = layout.take(logits, embeds._adapterkit_real)
        return y


class EncoderMask(Component):
    """On an encoder-decoder model: extends the encoder attention mask by the ``P`` prompt positions.

    The :class:`SoftPrompt` on the encoder prepends the prompt; the decoder's cross-attention reads the mask
    the model was called with, so it needs the ``P`` ones too. With ``encoder_outputs`` given (generation
    steps) the mask is extended only while it is shorter than the encoder output. Holds no parameters.
    """

    has_pre = True
    has_post = False

    def __init__(self, cfg: PromptTuning, module: nn.Module) -> None:
        super().__init__()
        self.num_virtual_tokens = cfg.num_virtual_tokens
        object.__setattr__(self, "_module_ref", module)

    def pre_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kw = as_kwargs(self.__dict__["_module_ref"], args, kwargs)
        if kw.get("attention_mask") is None:
            return args, kwargs
        kw["attention_mask"] = extend_mask(kw["attention_mask"], self.num_virtual_tokens, self._encoded(kw))
        return (), kw

    @staticmethod
    def _encoded(kw: dict[str, Any]) -> int | None:
        """Length of the given ``encoder_outputs`` (generation steps), or None."""
        enc = kw.get("encoder_outputs")
        if enc is None:
            return None
        hidden = enc[0] if isinstance(enc, (tuple, list)) or hasattr(enc, "keys") else enc
        return int(hidden.shape[1])

    @classmethod
    def routed_call(
        cls, comps: list[Component | None], plan: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The encoder mask in the layout the encoder's routed prompts use (the encoder is bidirectional:
        each row's prompt, its tokens, then padding)."""
        head = next(c for c in comps if c is not None)
        kw = as_kwargs(head.__dict__["_module_ref"], args, kwargs)
        layout = RowLayout(comps, plan, lambda c: c.num_virtual_tokens, left=False)
        mask, needed = kw.get("attention_mask"), cls._encoded(kw)
        if needed is None:
            x = next((kw[k] for k in ("input_ids", "inputs_embeds") if isinstance(kw.get(k), torch.Tensor)), None)
            if x is None:
                return args, kwargs
            needed = layout.width + int(x.shape[1])
        if mask is None:
            if layout.uniform:
                return args, kwargs
            device = layout.counts.device
            mask = torch.ones(layout.counts.numel(), needed - layout.width, dtype=torch.long, device=device)
        if mask.shape[1] < needed:
            mask = layout.join(mask, lambda c, n, real: real.new_ones(real.shape[0], n), 0)
        kw["attention_mask"] = mask
        return (), kw
