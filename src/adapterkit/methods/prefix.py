"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): trainable keys/values on every layer.

Prefix tuning (§4) prepends ``P`` trainable activations to every layer. In attention terms, each layer's
self-attention sees ``P`` extra key/value pairs in front of the real ones::

    layer l:   K_l = [ Pk_l ; W_k h ]     V_l = [ Pv_l ; W_v h ]      Pk_l, Pv_l: (kv_heads, P, head_dim)
               softmax(Q K_l^T / sqrt(d)) V_l                       (queries come only from real tokens)

The prefixes enter through the model's own KV cache (``past_key_values``): a forward pre-hook on the model
puts them into a transformers ``DynamicCache`` (``EncoderDecoderCache`` for the decoder self-attention of
T5/BART, as peft) and extends the attention mask by ``P`` ones. The models give the real tokens positions
``P, P+1, ...`` after a cached prefix; given ``position_ids`` are moved by ``P`` the same way (peft's
semantics, so logits equal peft's). With ``positions="keep"`` (AdapterHub's semantics: its prefixes are
concatenated inside the attention, after the position embeddings) the real tokens keep ``0, 1, ...``: the hook
passes explicit position ids, and given ones are used as they are. With ``generate()`` the prefix enters the cache once, on the first step
(the cache records which prefixes it holds). Without a cache passed in, one is created for the call and, as
for the base model, returned only when ``use_cache`` is on. Static (compileable) caches are not supported.
Grouped-query attention: prefixes have ``num_key_value_heads`` heads.

* ``prefix_projection`` (§4.3 "Parametrization of P_θ"): training directly on ``P_θ`` is unstable, so
  ``P_θ[i] = MLP(P'_θ[i])`` with a smaller ``P'_θ: (P, kv_dim)`` and ``MLP = Linear -> tanh -> Linear``.
  After training "only P_θ needs to be saved": saving stores the computed prefix, and a loaded adapter
  holds only that tensor (further training then updates it directly).
* P-tuning v2 (Liu et al. 2022, §3.2-3.3) is the same deep prompt on every layer, without the
  reparametrization, usually with a task head: the preset ``"ptuning_v2"`` is
  ``PrefixTuning(num_virtual_tokens=20, prefix_projection=False)``; add ``heads=["head"]`` for classifiers.

The prefix tensor has peft's layout: ``prefix: (P, num_layers * 2 * kv_dim)``, viewed as
``(P, num_layers, 2 [key, value], kv_heads, head_dim)``. Works on decoder-only models (GPT-2, LLaMA, ...),
BERT-like encoders whose attention reads ``past_key_values``, and the decoder of
encoder-decoder models (T5, BART, mBART, Whisper: the layer and head counts are read from the decoder's modules,
see :func:`kv_layout`). Not with gradient checkpointing of layers that drop the cache in training (GPT-2).

Models that cannot take a prefix get one error saying why and what to use instead: at ``add`` when their
signatures show it (no decoder/token input: vision and audio models, WhisperForAudioClassification; no module of
a layer can receive a KV cache: DeBERTa v1/v2, Longformer), else on the first call (layers given the cache through
``**kwargs`` that ignore it: CLIP's text model, DistilBERT, T5's encoder; see :meth:`PrefixKV._watch_layers`),
never a raw shape error from the attention mask extended by ``P``. Inputs longer than a learned position table
leaves room for are refused before the model runs (:func:`~adapterkit.methods.prompt.check_positions`).

``inject="attention"`` (AdapterHub's placement; :class:`AttentionPrefix`) puts the prefix inside each attention
module instead: after the module's own key/value projections and cache, through transformers' attention interface
(:class:`AttentionConfig`), so it also reaches what the KV cache cannot: the encoder self-attention and the
cross-attention of T5/BART (``locations``), DistilBERT, vision encoders (ViT), and a subset of layers. Positions are
not touched; each layer holds its own ``(P, 2 * kv_dim)`` prefix. Where both routes run (BERT, GPT-2, LLaMA) they
compute the same outputs with ``positions="keep"``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..component import Component
from ..config import AdapterConfig, register, register_preset
from ..targeting import CONTAINER, TargetError
from .prompt import (
    CACHE_KEYS,
    RowLayout,
    VirtualCache,
    as_kwargs,
    batch_size_of,
    cache_key,
    cache_of,
    check_positions,
    component_key,
    extend_mask,
    output_cache,
    take_cache,
    takes,
)

PUBLIC = ("PrefixTuning",)
_OWN = "_adapterkit_created"  # set on caches this module created (not passed in by the caller)
_ROUTED = -1  # VirtualCache record key of the per-row prefixes of a routed batch
_ROWS = "_adapterkit_routed_rows"  # on such a cache: which prefix each row holds
_NO_CACHE = "_adapterkit_no_cache"  # on a cache created for a use_cache=False call: left out of the output
POSITIONS = ("shift", "keep")  # PrefixTuning.positions
INJECT = ("cache", "attention")  # PrefixTuning.inject
LOCATIONS = ("self", "encoder", "cross")  # PrefixTuning.locations (inject="attention")
_GATES = "_adapterkit_prefix_gates"  # on a cache: prefix key -> (first slot, count, layers whose gate is pending)
__all__ = [
    "PrefixTuning",
    "PrefixKV",
    "PrefixGate",
    "AttentionPrefix",
    "KVLayout",
    "kv_layout",
    "self_attention_modules",
    "attention_modules",
]


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """Shapes of the self-attention keys/values that receive the prefix."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    encoder_decoder: bool

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def _first(cfg: Any, names: tuple[str, ...]) -> int | None:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _text_config(cfg: Any) -> Any:
    """The config holding the (decoder) text sizes: a composite model's nested text/decoder config, else ``cfg``.

    ``get_text_config(decoder=True)`` on a flat encoder-decoder config (BART, mBART, Whisper, Marian, ...) returns
    a *copy* whose ``decoder_*`` fields are renamed and reset to the class defaults (a 2-layer BART reads as 12
    layers of 16 heads), so such configs are read directly, decoder fields first."""
    if not hasattr(cfg, "get_text_config"):
        return cfg
    text = cfg.get_text_config(decoder=True)
    nested = any(getattr(cfg, n, None) is text for n in ("decoder", "generator", "text_config"))
    return text if nested else cfg


_HEAD_DIM = ("head_dim", "key_value_proj_dim", "attention_head_size")  # on transformers attention modules
_KV_HEADS = ("num_key_value_heads", "num_kv_heads")
_HEADS = ("num_heads", "n_heads", "num_attention_heads", "n_head")
_K_PROJ = ("k_proj", "k", "key")


def _from_model(model: nn.Module) -> tuple[int | None, int | None, int | None]:
    """``(layers, kv_heads, head_dim)`` of the (decoder) self-attention read from the modules themselves, each
    None where the model does not show it: the layers are the first ``ModuleList`` of the decoder (its blocks);
    the self-attention is the first module of the first block with a head size attribute (self-attention comes
    before cross-attention in transformers' decoder blocks)."""
    blocks = _blocks(model)
    if blocks is None:
        return None, None, None
    attn = next(
        (m for m in blocks[0].modules() if any(isinstance(getattr(m, a, None), int) for a in _HEAD_DIM)), None
    )
    if attn is None:  # not a block of attention layers we can read
        return None, None, None
    head_dim = _first(attn, _HEAD_DIM)
    kv_heads = _first(attn, _KV_HEADS)
    if kv_heads is None:
        k = next((getattr(attn, n) for n in _K_PROJ if isinstance(getattr(attn, n, None), nn.Linear)), None)
        if k is not None and head_dim and k.out_features % head_dim == 0:
            kv_heads = k.out_features // head_dim
        elif (heads := _first(attn, _HEADS)) is not None:
            kv_heads = heads // (_first(attn, ("num_key_value_groups",)) or 1)
    return len(blocks), kv_heads, head_dim


def self_attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each (decoder) block's self-attention module, in layer order: the first module of the block with a head
    size attribute (as :func:`kv_layout` reads them; BERT ``attention.self``, GPT-2 ``attn``, LLaMA ``self_attn``).

    Raises:
        TargetError: a block without one.
    """
    blocks = _blocks(model)
    out = []
    for i, block in enumerate(blocks or ()):
        attn = next(
            (m for m in block.modules() if any(isinstance(getattr(m, a, None), int) for a in _HEAD_DIM)), None
        )
        if attn is None:
            raise TargetError(f"block {i} of {type(model).__name__} has no self-attention module with a head size")
        out.append(attn)
    return out


def kv_layout(model: nn.Module) -> KVLayout:
    """The layer count, key/value heads and head size of the (decoder) self-attention.

    Read from the model's decoder blocks and their self-attention modules where they show them, else from the
    config (decoder fields first on encoder-decoder models).

    Raises:
        TargetError: the model has no transformers-style config with these sizes.
    """
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TargetError(
            f"prefix tuning needs a transformers model with a config; {type(model).__name__} has none"
        )
    enc_dec = bool(getattr(cfg, "is_encoder_decoder", False))
    text = _text_config(cfg)
    dec = ("num_decoder_layers", "decoder_layers") if enc_dec else ()
    layers = _first(text, (*dec, "num_hidden_layers", "n_layer", "num_layers"))
    heads = _first(text, ("decoder_attention_heads",) if enc_dec else ()) or _first(
        text, ("num_attention_heads", "n_head", "num_heads")
    )
    kv_heads = _first(text, ("num_key_value_heads",)) or heads
    hidden = _first(text, ("d_model", "hidden_size", "n_embd"))
    head_dim = _first(text, ("head_dim", "d_kv")) or (hidden // heads if hidden and heads else None)
    m_layers, m_kv_heads, m_head_dim = _from_model(model)
    layers, kv_heads, head_dim = m_layers or layers, m_kv_heads or kv_heads, m_head_dim or head_dim
    if not (layers and kv_heads and head_dim):
        raise TargetError(
            f"cannot read the number of layers, key/value heads and head size from {type(model).__name__} or "
            f"{type(cfg).__name__}; prefix tuning supports transformers models with standard config fields"
        )
    return KVLayout(layers, kv_heads, head_dim, enc_dec)


@register("prefix_tuning")
@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixTuning(AdapterConfig):
    """Prefix tuning / P-tuning v2: trainable key/value prefixes on every attention layer.

    Args:
        num_virtual_tokens: prefix length ``P`` (Li & Liang §6.3: 200 for summarization, 10 for table-to-text;
            P-tuning v2 §4: 20 for simple classification, up to 100-200 for hard sequence labeling).
        prefix_projection: train through the MLP reparametrization ``P = MLP(P')`` (Li & Liang §4.3); folded
            into the plain prefix when saved.
        encoder_hidden_size: hidden width of that MLP (default: the key/value width, as peft).
        positions: the position ids of the real tokens behind the prefix. ``"shift"`` (default, peft's
            semantics and the original implementation's: the prefix takes positions ``0 .. P-1`` as if it were
            text, so the real tokens get ``P .. P+L-1``; given ``position_ids`` are moved by ``P``) or ``"keep"``
            (AdapterHub's ``adapters`` library, whose prefixes enter at attention level, after the position
            embeddings / rotary positions: the real tokens keep ``0 .. L-1``, given ``position_ids`` are used as
            they are). ``"keep"`` needs a model whose forward takes (decoder) position ids.
        gated: UniPELT's prefix gate (Mao et al. 2022, §3; AdapterHub's ``use_gating``): each layer's self-attention
            scales the prefix keys by ``g_k`` and values by ``g_v``, ``g = mean_t sigmoid(W h_t + b)`` over the
            positions ``t`` of that attention's input ``h: (B, L, hidden)`` (padding included, as AdapterHub), one
            gate per row. The gates (``W: (gate_outputs, hidden)``) sit on each layer's self-attention module and
            act once, when the prefix enters the KV cache (with ``generate()``: computed from the prompt). Not with
            per-row routing.
        gate_outputs: 1 (one gate for keys and values: AdapterHub's ``shared_gating``) or 2 (keys, values).
        inject: where the prefix enters. ``"cache"`` (default): once per call through the model's KV cache (the
            decoder self-attention of encoder-decoder models). ``"attention"`` (AdapterHub's ``adapters``
            library): inside each attention module, after its key/value projections (and its own cache), through
            transformers' attention interface (:class:`AttentionPrefix`): also the encoder self-attention and the
            cross-attention of T5/BART (``locations``), models without a KV cache (DistilBERT) or token ids
            (ViT), and a subset of layers (``layers``, ``exclude`` or ``targets`` naming attention modules:
            AdapterHub's ``leave_out``). Positions are not touched
            (``positions="keep"`` is required); T5's relative position bias then sees the prefix at key positions
            ``0 .. P-1`` and the real keys after it, as in AdapterHub. Each layer holds its own ``(P, 2 * kv_dim)``
            prefix (no ``prefix_projection``).
        locations: with ``inject="attention"``: the attention modules that get a prefix, of ``"self"`` (the
            self-attention of encoder-only and decoder-only models, the decoder self-attention of
            encoder-decoder models), ``"encoder"`` (their encoder self-attention), ``"cross"`` (their
            cross-attention); empty (default): every kind the model has (AdapterHub's ``encoder_prefix`` and
            ``cross_prefix`` default to true).
        init_weights: accepted for the common interface; prefixes start from ``N(0, 1)`` values (peft's
            default) either way, since no prefix is an identity.
        targets: leave unset; the method acts on the model as a whole (module name ``""``).
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    positions: str = "shift"
    gated: bool = False
    gate_outputs: int = 1
    inject: str = "cache"
    locations: tuple[str, ...] = ()
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.positions not in POSITIONS:
            raise ValueError(
                f"positions must be one of {', '.join(repr(p) for p in POSITIONS)} (peft's shifted positions, or "
                f"AdapterHub's unchanged ones), got {self.positions!r}"
            )
        if self.gate_outputs not in (1, 2) or isinstance(self.gate_outputs, bool):
            raise ValueError(
                f"gate_outputs must be 1 (keys and values) or 2 (keys, values), got {self.gate_outputs!r}"
            )
        if isinstance(self.locations, (list, str)):
            object.__setattr__(
                self, "locations", (self.locations,) if isinstance(self.locations, str) else tuple(self.locations)
            )
        if self.inject not in INJECT:
            raise ValueError(
                f"inject must be one of {', '.join(repr(p) for p in INJECT)} (through the model's KV cache, or inside "
                f"each attention module as AdapterHub), got {self.inject!r}"
            )
        bad = [loc for loc in self.locations if loc not in LOCATIONS]
        if bad:
            raise ValueError(f"locations must be among {', '.join(repr(p) for p in LOCATIONS)}, got {bad!r}")
        if self.inject == "attention":
            if self.positions != "keep":
                raise ValueError(
                    "inject='attention' joins the prefix inside the attention, after the position embeddings, so the "
                    "real tokens keep their positions: set positions='keep'"
                )
            if self.prefix_projection:
                raise ValueError(
                    "inject='attention' holds a plain prefix per layer: set prefix_projection=False (AdapterHub's "
                    "MLP form is folded into it when such files are read)"
                )
        elif self.locations or self.layers is not None:
            raise ValueError(
                "locations and layers need inject='attention' (the KV cache route puts a prefix into every decoder "
                "self-attention layer)"
            )
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.encoder_hidden_size is not None and (
            not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size <= 0
        ):
            raise ValueError(f"encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size!r}")

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        # inject="attention": any module (a pattern, so that `layers` keeps some); build_all picks the attention
        return (".*",) if self.inject == "attention" else ("",)

    def build(self, module: nn.Module, name: str) -> Component:
        if self.inject == "attention":
            raise TargetError(
                "prefix tuning with inject='attention' is built for the whole model: leave `targets` unset"
            )
        if name != "":
            raise TargetError(
                f"prefix tuning acts on the whole model, not on {name!r}: leave `targets` unset (or pass [''])"
            )
        _check_fits(module)
        if self.positions == "keep":
            _check_keeps_positions(module)
        return PrefixKV(self, module)

    def build_all(self, modules: Mapping[str, nn.Module], targets: list[str], select: Any) -> dict[str, Component]:
        """The prefix at ``""``; with ``gated``, also a :class:`PrefixGate` on each layer's self-attention module."""
        if self.inject == "attention":
            return _attention_prefixes(self, modules, targets)
        built = super().build_all(modules, targets, select)
        kv = built.get("")
        if not self.gated or not isinstance(kv, PrefixKV):
            return built
        model = modules[""]
        attention = self_attention_modules(model)
        if len(attention) != kv.layout.num_layers:
            raise TargetError(
                f"gated prefix tuning needs one self-attention module per layer; found {len(attention)} for "
                f"{kv.layout.num_layers} layers in {type(model).__name__}"
            )
        names = {id(m): n for n, m in modules.items()}
        for i, module in enumerate(attention):
            built[names[id(module)]] = PrefixGate(self, kv, i, module)
        return built


_ALTERNATIVES = "LoRA (ak.LoRA()), (IA)^3 (ak.IA3()) or a bottleneck adapter"


def _check_fits(model: nn.Module) -> None:
    """Refuse, before anything is built, models prefix tuning cannot act on: no token input (vision and audio
    encoders: the batch and the attention mask come from the tokens), or no attention layout in the config.

    Raises:
        TargetError: why, and what to use instead.
    """
    cls = type(model)
    enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    # labels alone do not count: WhisperForAudioClassification has Whisper's encoder-decoder config and takes
    # labels, but runs the encoder alone (no decoder, no token input)
    tokens = ("decoder_input_ids", "decoder_inputs_embeds") if enc_dec else ("input_ids", "inputs_embeds")
    if not any(takes(cls, t) for t in tokens):
        params = [n for n in inspect.signature(cls.forward).parameters if n.endswith(("_values", "_features"))]
        raise TargetError(
            f"prefix tuning cannot act on {cls.__name__}: it takes no {'decoder ' if enc_dec else ''}token ids "
            f"({'/'.join(tokens)}; its inputs: {', '.join(params) or 'other tensors'}). Prefix tuning (Li & Liang "
            "2021) puts trained keys/values into the self-attention of text models (the decoder of encoder-decoder "
            f"models) through their KV cache; adapt this model's layers instead: {_ALTERNATIVES}"
            f"{_attention_hint(model)}"
        )
    try:
        kv_layout(model)
    except TargetError as e:
        raise TargetError(
            f"prefix tuning cannot act on {cls.__name__}: {e}. Prefix tuning (Li & Liang 2021) needs self-attention "
            f"layers with keys and values (models without attention, e.g. Mamba or CNNs, have none); use "
            f"{_ALTERNATIVES}, or prompt tuning on text models"
        ) from None
    block = _cacheless_block(model)
    if block is not None:
        raise TargetError(
            f"prefix tuning cannot act on {cls.__name__}: its layers take no KV cache (no module of {block} has a "
            f"{'/'.join(_LAYER_CACHE_NAMES)} or **kwargs parameter), so its attention has no place for the prefix "
            "and the longer attention mask would meet the real tokens' attention in a shape error. Prefix tuning "
            "(Li & Liang 2021) enters through the KV cache, which such layers (e.g. DeBERTa's disentangled attention) "
            f"never receive; use "
            f"{alternatives(model)}"
        )


# where transformers' layers take their KV cache (5.24: ``cache``; earlier ``past_key_values``, older
# ``past_key_value`` / ``layer_past``)
_LAYER_CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")


def alternatives(model: nn.Module) -> str:
    """What to use instead of prefix tuning on ``model`` (prompt tuning only where it takes ``inputs_embeds``)."""
    enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    prompt = not enc_dec and takes(type(model), "inputs_embeds")
    return (
        f"{_ALTERNATIVES}{', or prompt tuning (ak.PromptTuning())' if prompt else ''}{_attention_hint(model)} for "
        "this model"
    )


def _attention_hint(model: nn.Module) -> str:
    """``", or ... inject='attention'"`` where every attention module of ``model`` can take the prefix inside."""
    try:
        found = attention_modules(model)
        for name, _, module in found:
            _check_attention_call(module, name)
    except (TargetError, TypeError, ValueError):
        return ""
    if not found:
        return ""
    return ", or the prefix inside each attention module (ak.PrefixTuning(positions='keep', inject='attention'))"


def _blocks(model: nn.Module) -> nn.ModuleList | None:
    """The (decoder) blocks, as :func:`_from_model` reads them: the first non-empty ``ModuleList`` of the decoder."""
    root = model
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            root = get_decoder() or model
        except Exception:  # noqa: BLE001 - some models define get_decoder but have no decoder
            root = model
    return next((m for m in root.modules() if isinstance(m, nn.ModuleList) and len(m) > 0), None)


def _can_take_a_cache(module: nn.Module) -> bool:
    """``module.forward`` has a KV-cache parameter, or ``*args``/``**kwargs`` that could carry one (containers
    without a forward of their own, ``ModuleList``/``ModuleDict``, never run: they take nothing)."""
    if type(module).forward is nn.Module.forward:
        return False
    try:
        params = inspect.signature(type(module).forward).parameters.values()
    except (TypeError, ValueError):  # no readable signature: assume it can
        return True
    return any(p.name in _LAYER_CACHE_NAMES or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params)


def _cacheless_block(model: nn.Module) -> str | None:
    """The class name of the first (decoder) block when its signatures prove that no KV cache can reach its
    attention: the block holds a self-attention module (one with a head size attribute, as :func:`kv_layout`
    reads it) and neither the block nor any module inside it takes a cache parameter or ``**kwargs``/``*args``
    (DeBERTa v1/v2). None where a cache may reach the layers (that is then checked on the first call)."""
    blocks = _blocks(model)
    if blocks is None:
        return None
    block = blocks[0]
    if not any(any(isinstance(getattr(m, a, None), int) for a in _HEAD_DIM) for m in block.modules()):
        return None  # not a block of attention layers: prove nothing
    own = [m for n, m in block.named_modules() if CONTAINER not in n.split(".")]  # not adapters' components
    if any(_can_take_a_cache(m) for m in own):
        return None
    return type(block).__name__


def _check_keeps_positions(model: nn.Module) -> None:
    """Refuse ``positions="keep"`` on a model whose forward takes no position ids: its real tokens would be numbered
    after the cached prefix, which is what ``"shift"`` means.

    Raises:
        TargetError: why, and what to use instead.
    """
    enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    key = "decoder_position_ids" if enc_dec else "position_ids"
    if not takes(type(model), key):
        raise TargetError(
            f"prefix tuning with positions='keep' needs explicit {key}, which {type(model).__name__}.forward does "
            "not take (models with relative position biases, e.g. T5, number tokens after the cache); use "
            "positions='shift', or inject='attention' (the prefix inside each attention module, AdapterHub's "
            "placement: positions untouched)"
        )


def _cached_length(cache: Any) -> int:
    """The number of cached positions summed over the layers of ``cache`` (a transformers ``Cache``)."""
    layers = getattr(cache, "layers", None)
    count = len(layers) if layers is not None else len(getattr(cache, "key_cache", ()))
    return sum(int(cache.get_seq_length(i)) for i in range(count))


def _ignored_cache(model: nn.Module, block: str | None = None, error: BaseException | None = None) -> TypeError:
    """The error for a model that did not read the prefix's KV cache (``block``, ``error``: the class of its first
    block and what that block raised without having read the cache, the extended attention mask meeting the
    real tokens' attention)."""
    seen = (
        f": its first layer ({block}) failed without having read it ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}; the attention mask was extended by the prefix length)"
        if block
        else ""
    )
    # transformers 5.24 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else None
    if getattr(model, name or "is_gradient_checkpointing", False) and model.training:
        why = (
            "its layers run under gradient checkpointing, which drops the cache in training (turn gradient "
            f"checkpointing off), or use {alternatives(model)}"
        )
    elif not any(takes(type(model), k) for k in CACHE_KEYS):
        why = f"its forward takes no KV cache ({'/'.join(CACHE_KEYS)}); use {alternatives(model)}"
    else:
        why = (
            "layers under gradient checkpointing drop the cache in training (turn gradient checkpointing off), and "
            f"some models never read it: then use {alternatives(model)}"
        )
    return TypeError(
        f"{type(model).__name__} did not read past_key_values (its KV cache){seen}, so the prefix had no place in "
        f"its attention: {why}"
    )


register_preset("ptuning_v2", PrefixTuning(num_virtual_tokens=20, prefix_projection=False))


def _one_post_call(
    cls: type, comps: list[Component | None], plan: Any, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any
) -> Any:
    """``routed_output`` of the prefix components: their ``post_call`` checks the whole call (the shared cache or
    attention kwargs of every row), so one live component's check serves all rows."""
    return next(c for c in comps if c is not None).post_call(args, kwargs, y)


class PrefixKV(Component):
    """Puts per-layer key/value prefixes into the model's KV cache.

    Parameters: ``prefix: (P, num_layers * 2 * kv_dim)``, or with the projection ``embedding: (P, kv_dim)``
    and ``transform`` (``kv_dim -> hidden -> num_layers * 2 * kv_dim``).
    """

    has_pre = True
    has_post = True

    def __init__(self, cfg: PrefixTuning, model: nn.Module) -> None:
        super().__init__()
        self.layout = kv_layout(model)
        ref = next(model.parameters(), None)
        factory = {
            "device": ref.device if ref is not None else None,
            "dtype": ref.dtype if ref is not None and ref.is_floating_point() else torch.float32,
        }
        n, width, kv = cfg.num_virtual_tokens, self.layout.num_layers * 2 * self.layout.kv_dim, self.layout.kv_dim
        self.num_virtual_tokens = n
        self.positions = cfg.positions
        self.gated = cfg.gated
        if cfg.prefix_projection:
            hidden = cfg.encoder_hidden_size or kv
            self.embedding = nn.Parameter(torch.empty(n, kv, **factory))
            self.transform = nn.Sequential(
                nn.Linear(kv, hidden, **factory), nn.Tanh(), nn.Linear(hidden, width, **factory)
            )
            self.register_parameter("prefix", None)
        else:
            self.prefix = nn.Parameter(torch.empty(n, width, **factory))
        self.key = component_key()
        object.__setattr__(self, "_module_ref", model)

    def extra_repr(self) -> str:
        lay = self.layout
        proj = ", projection" if self.prefix is None else ""
        return f"P={self.num_virtual_tokens}, layers={lay.num_layers}, kv_heads={lay.num_kv_heads}, head_dim={lay.head_dim}{proj}"

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        if self.prefix is not None:
            nn.init.normal_(self.prefix)
        else:
            nn.init.normal_(self.embedding)
            for layer in self.transform:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()

    # --- values ---------------------------------------------------------------------------------------
    def values(self) -> torch.Tensor:
        """The prefix ``(P, num_layers * 2 * kv_dim)`` (through the MLP when reparametrized)."""
        return self.prefix if self.prefix is not None else self.transform(self.embedding)

    def kv_values(self) -> torch.Tensor:
        """:meth:`values` in the model's dtype, that of its KV cache (float32 prefixes on half-precision bases)."""
        ref = next(self.__dict__["_module_ref"].parameters(), None)
        v = self.values()
        return v if ref is None or not ref.is_floating_point() else v.to(ref.dtype)

    def per_layer(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(key, value)]`` per layer, each ``(batch, kv_heads, P, head_dim)``."""
        lay = self.layout
        kv = self.kv_values().view(self.num_virtual_tokens, lay.num_layers * 2, lay.num_kv_heads, lay.head_dim)
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(lay.num_layers)]

    # --- forward --------------------------------------------------------------------------------------
    def _new_cache(self) -> Any:
        from transformers import DynamicCache, EncoderDecoderCache

        config = self.__dict__["_module_ref"].config
        if self.layout.encoder_decoder:
            return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
        return DynamicCache(config=config)

    def _own_cache(self, kw: dict[str, Any]) -> Any:
        """A new cache for a call that passed none, put into ``kw``. Under ``use_cache=False`` some models (Whisper)
        hand their layers no cache at all, which would drop the prefix: the call then runs with the cache on and
        :meth:`post_call` leaves it out of the output, as the caller asked."""
        cache = kw[cache_key(type(self.__dict__["_module_ref"]))] = self._new_cache()
        setattr(cache, _OWN, True)
        if kw.get("use_cache") is False:
            kw["use_cache"] = True
            setattr(cache, _NO_CACHE, True)
        return cache

    def pre_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kw = as_kwargs(self.__dict__["_module_ref"], args, kwargs)
        dec = self.layout.encoder_decoder
        ids_keys = (
            ("decoder_input_ids", "decoder_inputs_embeds", "labels") if dec else ("input_ids", "inputs_embeds")
        )
        batch = batch_size_of(kw, (*ids_keys, "input_ids", "inputs_embeds", "encoder_outputs"))
        if batch is None:
            raise ValueError("prefix tuning could not find the batch size: pass input_ids or inputs_embeds")
        cache = take_cache(self.__dict__["_module_ref"], kw)
        if cache is None:
            cache = self._own_cache(kw)
        record = VirtualCache.record(cache)
        n = self.num_virtual_tokens
        inserted = False
        if self.key not in record:
            if not VirtualCache.fresh(cache):
                raise ValueError(
                    "past_key_values already holds tokens that were computed without this prefix-tuning adapter; "
                    "start from an empty cache (or none) with the adapter active"
                )
            target = getattr(cache, "self_attention_cache", cache)
            offset = VirtualCache.length(cache)
            for i, (k, v) in enumerate(self.per_layer(batch)):
                target.update(k, v, i)
            VirtualCache.add(cache, self.key, n)
            inserted = True
            if self.gated:  # the layers' PrefixGates scale these slots once, on this call
                pending = dict(getattr(cache, _GATES, None) or {})
                pending[self.key] = (offset, n, set(range(self.layout.num_layers)))
                setattr(cache, _GATES, pending)
        pos_key = "decoder_position_ids" if dec else "position_ids"
        new = next((kw[k] for k in ids_keys if isinstance(kw.get(k), torch.Tensor)), None)
        if self.positions == "shift":
            if isinstance(kw.get(pos_key), torch.Tensor):
                kw[pos_key] = kw[pos_key] + n
        elif not isinstance(kw.get(pos_key), torch.Tensor) and new is not None:
            kw[pos_key] = self._kept_positions(cache, new, batch)
        if self.positions == "shift" and new is not None:  # "keep": the real tokens' own positions
            check_positions(self, self.__dict__["_module_ref"], VirtualCache.length(cache) + new.shape[1], n,
                            "prefix tuning")  # fmt: skip
        mask_key = "decoder_attention_mask" if dec else "attention_mask"
        masked = new is not None and kw.get(mask_key) is not None
        if masked:
            kw[mask_key] = extend_mask(kw[mask_key], n, VirtualCache.length(cache) + new.shape[1])
        if inserted:
            self._watch_layers(cache, masked)
        return (), kw

    def _watch_layers(self, cache: Any, masked: bool) -> None:
        """Until a call has shown the model reading its KV cache, watch the first (decoder) block of a call that
        puts the prefix into ``cache``: its ``forward`` is wrapped for that one call (an instance attribute, put
        back before the block runs). If the block fails while no layer has added to the cache (the attention
        never read it, and met the attention mask extended by ``P`` in a raw shape error: CLIP's text model and
        DistilBERT pass the cache down through ``**kwargs`` and ignore it), the failure is re-raised as
        :func:`_ignored_cache`'s TypeError. Once the block has added to the cache, the check stops for good (no
        more wrapping: ``torch.compile`` sees a fixed model). A block that runs without error and without adding
        (an attention-free first layer of a hybrid model) proves nothing: :meth:`post_call` still refuses a cache
        the whole model left untouched. Only a plain ``RuntimeError`` (torch's shape errors) of a call whose
        attention mask was extended is re-raised so; any other error passes unchanged."""
        self._unwatch()
        if self.__dict__.get("_reaches_layers"):
            return
        model = self.__dict__["_module_ref"]
        blocks = _blocks(model)
        if blocks is None:
            return
        block = blocks[0]
        target = getattr(cache, "self_attention_cache", cache)
        before = _cached_length(target)

        def forward(*args: Any, **kwargs: Any) -> Any:
            self._unwatch()  # the block's own forward again (also for the call below)
            try:
                out = block.forward(*args, **kwargs)
            except RuntimeError as e:  # torch's shape errors; not its subclasses (NotImplementedError, ...)
                if masked and type(e) is RuntimeError and _cached_length(target) == before:
                    raise _ignored_cache(model, type(block).__name__, e) from e
                raise
            if _cached_length(target) != before:
                self.__dict__["_reaches_layers"] = True
            return out

        self.__dict__["_watch"] = (block, block.__dict__.get("forward"))
        block.forward = forward

    def _unwatch(self) -> None:
        """Put back the first block's forward wrapped by :meth:`_watch_layers` (a call that failed before the block
        ran leaves it wrapped until the next call or :meth:`post_call`)."""
        watched = self.__dict__.pop("_watch", None)
        if watched is None:
            return
        block, original = watched
        if original is None:
            block.__dict__.pop("forward", None)
        else:
            block.forward = original

    @staticmethod
    def _kept_positions(cache: Any, new: torch.Tensor, batch: int) -> torch.Tensor:
        """``(B, L)`` position ids ``past .. past+L-1`` of this call's real tokens for ``positions="keep"``, ``past``
        the real tokens already cached (the model's own numbering without any prefix in its cache)."""
        past = VirtualCache.length(cache) - sum(VirtualCache.record(cache).values())
        return (past + torch.arange(int(new.shape[1]), device=new.device)).expand(batch, -1)

    # --- per-row routing ------------------------------------------------------------------------------
    @classmethod
    def routed_call(
        cls, comps: list[Component | None], plan: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Each row's cache gets its own adapter's prefix (base rows none), padded in front to the longest
        (:class:`~adapterkit.methods.prompt.RowLayout`, masked out). Rows with shorter prefixes get explicit
        position ids, so each row sees the positions of a run by itself (models with relative position
        biases, T5, need none)."""
        head = next(c for c in comps if c is not None)
        model = head.__dict__["_module_ref"]
        kw = as_kwargs(model, args, kwargs)
        dec = head.layout.encoder_decoder
        ids_keys = (
            ("decoder_input_ids", "decoder_inputs_embeds", "labels") if dec else ("input_ids", "inputs_embeds")
        )
        new = next((kw[k] for k in ids_keys if isinstance(kw.get(k), torch.Tensor)), None)
        if new is None:
            raise ValueError("prefix tuning could not find the batch size: pass input_ids or inputs_embeds")
        batch, length = int(new.shape[0]), int(new.shape[1])
        layout = RowLayout(comps, plan, lambda c: c.num_virtual_tokens, left=True)
        rows = (tuple(c.key if c is not None else None for c in comps), tuple(layout.counts.tolist()))
        cache = take_cache(model, kw)
        if cache is None:
            cache = head._own_cache(kw)
        inserted = False
        if _ROUTED not in VirtualCache.record(cache):
            if not VirtualCache.fresh(cache):
                raise ValueError(
                    "past_key_values already holds tokens computed without these routed prefix-tuning adapters; "
                    "start from an empty cache (or none) inside the same adapters.route(...) block"
                )
            target = getattr(cache, "self_attention_cache", cache)
            for i, (k, v) in enumerate(cls._stacked(layout, batch)):
                target.update(k, v, i)
            VirtualCache.add(cache, _ROUTED, layout.width)
            setattr(cache, _ROWS, rows)
            inserted = True
        elif getattr(cache, _ROWS, None) != rows:
            raise ValueError(
                "past_key_values holds the prefixes of a different routing (other adapters or rows); keep the "
                "same adapters.route(...) for every step of a generation"
            )
        pos_key = "decoder_position_ids" if dec else "position_ids"
        mask_key = "decoder_attention_mask" if dec else "attention_mask"
        total = VirtualCache.length(cache) + length  # virtual slots + cached real tokens + this call's tokens
        past = total - length - sum(VirtualCache.record(cache).values())
        pos, mask = kw.get(pos_key), kw.get(mask_key)
        kept = [rows for c, _, rows in layout.groups if c is not None and c.positions == "keep"]
        if kept:  # rows whose prefix keeps the real positions: shifted by nothing; the others by their count
            shift = layout.counts.clone()
            for rows in kept:
                shift[rows] = 0
            pos = layout.positions(model, pos_key, pos, past, length, batch, "prefixes") + shift[:, None]
            if mask is None and not layout.uniform:
                mask = torch.ones(batch, past + length, dtype=torch.long, device=new.device)
        elif layout.uniform:
            pos = pos + layout.width if isinstance(pos, torch.Tensor) else pos
        else:
            relative = getattr(model.config, "relative_attention_num_buckets", None) is not None
            if isinstance(pos, torch.Tensor) or not relative:
                pos = (
                    layout.positions(model, pos_key, pos, past, length, batch, "prefixes") + layout.counts[:, None]
                )
            if mask is None:
                mask = torch.ones(batch, past + length, dtype=torch.long, device=new.device)
        if pos is not None:
            kw[pos_key] = pos
        if mask is not None:
            if mask.dim() != 2:
                extend_mask(mask, 0, None)  # raises the 2-D mask error
            if mask.shape[1] < total:
                mask = torch.cat([layout.mask_front(mask), mask], dim=1)
            kw[mask_key] = mask
        if inserted:
            head._watch_layers(cache, mask is not None)
        return (), kw

    @staticmethod
    def _stacked(layout: RowLayout, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(key, value)``, each ``(batch, kv_heads, width, head_dim)``: row ``b``'s prefix in its
        last ``counts[b]`` slots, zeros (masked out) before."""
        head = next(c for c, _, _ in layout.groups if c is not None)
        lay = head.layout
        ref = head.kv_values()

        def prefix(c: PrefixKV, n: int, real: torch.Tensor) -> torch.Tensor:
            v = ref if c is head else c.kv_values()
            return v.to(ref.dtype).unsqueeze(0).expand(real.shape[0], -1, -1)

        empty = ref.new_zeros(batch, 0, lay.num_layers * 2 * lay.kv_dim)
        kv = layout.join(empty, prefix, 0.0)  # (B, width, layers * 2 * kv_dim)
        kv = kv.view(batch, layout.width, lay.num_layers * 2, lay.num_kv_heads, lay.head_dim).permute(
            2, 0, 3, 1, 4
        )
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(lay.num_layers)]

    routed_output = classmethod(_one_post_call)

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        """Refuse models that silently ignored the cache (the prefix would have had no effect), and do not hand
        back a cache the caller did not ask for (``use_cache=False``): a later call must start afresh."""
        model = self.__dict__["_module_ref"]
        cache = kwargs.get(cache_key(type(model)))
        if cache is None:
            return y
        self._unwatch()
        if VirtualCache.fresh(cache):
            raise _ignored_cache(model, None)
        field, returned = output_cache(y)
        if getattr(cache, _OWN, False) and returned is cache:
            use_cache = False if getattr(cache, _NO_CACHE, False) else kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(model.config, "use_cache", False)
            if not use_cache:  # the output then lacks the key, as without the adapter (generate() checks for it)
                y = type(y)(**{k: v for k, v in y.items() if k != field})
        return y

    # --- saving: the reparametrization is folded away ---------------------------------------------------
    def export_state(self) -> dict[str, torch.Tensor]:
        """Only the computed prefix (Li & Liang §4.3: the MLP is dropped after training)."""
        return {"prefix": self.values().detach().clone()}

    def import_state(self, state: dict[str, torch.Tensor], module: nn.Module) -> None:
        """Load a saved prefix; a reparametrized component becomes a plain one holding it."""
        if set(state) != {"prefix"}:
            if self.prefix is None:
                super().import_state(state, module)
                return
            raise ValueError(f"tensors do not match the component: expected ['prefix'], got {sorted(state)}")
        value = state["prefix"]
        expected = (self.num_virtual_tokens, self.layout.num_layers * 2 * self.layout.kv_dim)
        if tuple(value.shape) != expected:
            raise ValueError(
                f"shape mismatch for 'prefix': file has {tuple(value.shape)}, expected {expected} "
                f"(P={expected[0]}, {self.layout.num_layers} layers x 2 x kv_dim {self.layout.kv_dim})"
            )
        if self.prefix is None:
            ref = self.embedding
            del self.embedding, self.transform
            self.prefix = nn.Parameter(torch.empty(expected, device=ref.device, dtype=ref.dtype))
        with torch.no_grad():
            self.prefix.copy_(value)


class PrefixGate(Component):
    """UniPELT's prefix gate on one layer's self-attention module (``PrefixTuning(gated=True)``).

    Before the attention runs on the call that put the prefix into the KV cache, the prefix slots of this layer's
    cached keys/values ``(B, kv_heads, P, head_dim)`` are replaced by ``g_k · keys`` and ``g_v · values``,
    ``g = mean_t sigmoid(gate(h_t)): (B, gate_outputs)`` from the attention input ``h: (B, L, hidden)``.
    Parameters: ``gate.weight: (gate_outputs, hidden)``, ``gate.bias: (gate_outputs,)``.
    """

    has_pre = True
    has_post = False

    def __init__(self, cfg: PrefixTuning, prefix: PrefixKV, layer: int, module: nn.Module) -> None:
        super().__init__()
        hidden = _first(_text_config(prefix.__dict__["_module_ref"].config), ("d_model", "hidden_size", "n_embd"))
        if hidden is None:
            raise TargetError("gated prefix tuning needs the model's hidden size (hidden_size / d_model / n_embd)")
        ref = next(module.parameters(), None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        self.gate = nn.Linear(
            hidden, cfg.gate_outputs, device=ref.device if ref is not None else None, dtype=dtype
        )
        self.layer = layer
        self._random = not cfg.init_weights
        object.__setattr__(self, "_prefix_ref", prefix)  # the adapter's prefix (not a submodule: saved there)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, outputs={self.gate.out_features}"

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        nn.init.normal_(self.gate.weight, std=0.02 if not self._random else 0.5)  # AdapterHub's init
        nn.init.zeros_(self.gate.bias)

    def pre_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        cache = cache_of(kwargs)
        hidden = args[0] if args else kwargs.get("hidden_states")
        if cache is None:
            for value in args[1:]:
                if hasattr(value, "get_seq_length"):
                    cache = value
        key = self.__dict__["_prefix_ref"].key
        pending = getattr(cache, _GATES, None) or {}
        if key not in pending or self.layer not in pending[key][2]:
            return args, kwargs  # not the call that put the prefix in (later decoding steps): already gated
        if not isinstance(hidden, torch.Tensor):
            raise TypeError("the prefix gate could not find the attention input (hidden_states)")
        offset, n, layers = pending[key]
        layers.discard(self.layer)
        g = torch.sigmoid(self.gate(hidden.to(self.gate.weight.dtype)))  # (B, L, outputs)
        g = g.mean(dim=1) if g.dim() == 3 else g.mean(dim=0, keepdim=True)
        target = getattr(cache, "self_attention_cache", cache)
        layers = getattr(target, "layers", None)
        # transformers >= 4.56: cache.layers[i].keys / .values; earlier: cache.key_cache[i] / value_cache[i]
        slots = (
            ((layers[self.layer], "keys"), (layers[self.layer], "values"))
            if layers is not None
            else ((target.key_cache, self.layer), (target.value_cache, self.layer))
        )
        for (holder, where), column in zip(slots, (0, -1)):
            t = getattr(holder, where) if isinstance(where, str) else holder[where]
            scale = g[:, column].to(t.dtype).view(-1, 1, 1, 1)
            gated = torch.cat(
                [t[:, :, :offset], t[:, :, offset : offset + n] * scale, t[:, :, offset + n :]], dim=2
            )
            if isinstance(where, str):
                setattr(holder, where, gated)
            else:
                holder[where] = gated
        return args, kwargs


# --- inject="attention": the prefix inside each attention module (AdapterHub's placement) ---------------------
_INTERFACE = "adapterkit_prefix"  # our entry in transformers' AttentionInterface
_KWARG = "adapterkit_prefix"  # the attention call's keyword argument carrying the prefixes to join
_KEY_PROJ = ("k_proj", "k", "key", "k_lin", "c_attn")
_CROSS = ("encoder_attn", "EncDecAttention", "crossattention", "cross_attn")


def attention_modules(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``[(module name, location, module)]`` of every attention module, in model order: the innermost modules with
    a head size attribute and a key projection (BERT ``attention.self``, T5 ``SelfAttention``/``EncDecAttention``,
    BART ``self_attn``/``encoder_attn``, DistilBERT ``attention``, ViT ``attention``). ``location`` is ``"self"``
    (encoder-only / decoder-only models, and the decoder self-attention of encoder-decoder models), ``"encoder"``
    or ``"cross"``."""
    from ..targeting import base_modules

    modules = base_modules(model)
    found = [
        (n, m)
        for n, m in modules.items()
        if any(isinstance(getattr(m, a, None), int) for a in _HEAD_DIM)
        and any(isinstance(getattr(m, k, None), nn.Module) for k in _KEY_PROJ)
    ]
    names = [n for n, _ in found]
    found = [(n, m) for n, m in found if not any(o.startswith(n + ".") for o in names)]  # innermost
    enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    encoder: set[int] = set()
    if enc_dec and callable(getattr(model, "get_encoder", None)):
        encoder = {id(m) for m in model.get_encoder().modules()}
    out = []
    for n, m in found:
        if not enc_dec:
            loc = "self"
        elif id(m) in encoder:
            loc = "encoder"
        elif n.rsplit(".", 1)[-1] in _CROSS or getattr(m, "is_cross_attention", False):
            loc = "cross"
        else:
            loc = "self"
        out.append((n, loc, m))
    return out


def _layer_of(name: str) -> int | None:
    return next((int(p) for p in name.split(".") if p.isdigit()), None)


def _attention_prefixes(
    cfg: PrefixTuning, modules: Mapping[str, nn.Module], targets: list[str]
) -> dict[str, Component]:
    """An :class:`AttentionPrefix` on each attention module of ``cfg.locations`` (all kinds when empty) among the
    resolved ``targets`` (default: every module, then ``layers``/``exclude`` as for any method; explicit targets
    name attention modules, e.g. AdapterHub's ``leave_out`` on encoder-decoder models)."""
    chosen = set(targets)
    model = modules[""]
    found = attention_modules(model)
    if not found:
        raise TargetError(
            f"prefix tuning with inject='attention' found no attention module (a module with a head size and a key "
            f"projection) in {type(model).__name__}; use {_ALTERNATIVES}"
        )
    kinds = sorted({loc for _, loc, _ in found})
    wanted = cfg.locations or tuple(kinds)
    missing = [loc for loc in wanted if loc not in kinds]
    if missing:
        raise TargetError(
            f"{type(model).__name__} has no {missing} attention for prefix tuning (its kinds: {kinds}); set locations"
        )
    hidden = _first(_text_config(model.config), ("d_model", "hidden_size", "n_embd", "dim"))
    out: dict[str, Component] = {}
    bias_source: dict[str, nn.Module] = {}
    index: dict[str, int] = {}
    for name, loc, module in found:
        if getattr(module, "has_relative_attention_bias", False) and loc not in bias_source:
            bias_source[loc] = module  # T5: the stack's first layer holds the relative position bias
        if loc not in wanted or name not in chosen:
            continue
        _check_attention_call(module, name)
        comp = AttentionPrefix(cfg, module, loc, index.get(loc, 0), hidden)
        index[loc] = index.get(loc, 0) + 1
        if hasattr(module, "has_relative_attention_bias"):
            object.__setattr__(comp, "_bias_ref", bias_source.get(loc) if loc != "cross" else None)
        out[name] = comp
    if not out:
        raise TargetError(
            f"prefix tuning with targets={cfg.targets!r}, layers={cfg.layers!r}, exclude={list(cfg.exclude)!r} "
            f"selects no attention module of {type(model).__name__}"
        )
    for loc in bias_source:  # relative position biases (T5): every layer of a stack or none
        stack = [n for n, lk, _ in found if lk == loc]
        chosen_here = [n for n in stack if n in out]
        if chosen_here and len(chosen_here) != len(stack):
            raise TargetError(
                f"prefix tuning on some layers only of {type(model).__name__}'s {loc} attention, whose relative "
                "position bias is computed once per stack: AdapterHub's adapters 1.3.0 then gives the layers whose "
                "key length differs from the first layer's no position bias at all (zeros), which adapterkit does "
                f"not copy. Put the prefix on every {loc} layer ({len(stack)}) or none (locations)"
            )
    return out


def _check_attention_call(module: nn.Module, name: str) -> None:
    """Refuse attention modules that cannot hand the prefix to transformers' attention interface: no ``config``
    (read for the implementation) or no ``**kwargs`` passed on (checked by signature; that they reach the
    interface is checked on the first call, :meth:`AttentionPrefix.post_call`)."""
    params = inspect.signature(type(module).forward).parameters.values()
    if getattr(module, "config", None) is None or not any(p.kind is p.VAR_KEYWORD for p in params):
        raise TargetError(
            f"prefix tuning with inject='attention' needs attention modules that call transformers' attention "
            f"interface with their **kwargs; {name} ({type(module).__name__}) does not. Use inject='cache' or "
            f"{_ALTERNATIVES}"
        )


def _heads(module: nn.Module) -> tuple[int, int]:
    """``(kv_heads, head_dim)`` of an attention module's keys."""
    head_dim = _first(module, _HEAD_DIM)
    kv_heads = _first(module, _KV_HEADS)
    if kv_heads is None:
        k = next((getattr(module, n) for n in _KEY_PROJ if isinstance(getattr(module, n, None), nn.Linear)), None)
        if k is not None and head_dim and k.out_features % head_dim == 0 and not hasattr(module, "c_attn"):
            kv_heads = k.out_features // head_dim
        else:
            kv_heads = _first(module, _HEADS)
    if not (kv_heads and head_dim):
        raise TargetError(f"cannot read the key/value heads and head size of {type(module).__name__}")
    return kv_heads, head_dim


class _Prefixes(list):
    """The prefixes for one attention call, ``[(keys, values)]`` each ``(B, kv_heads, P, head_dim)``, in the order
    they are joined in front of the real keys; ``used`` once the attention interface has joined them."""

    used = False


class AttentionConfig:
    """Stands in for an attention module's ``config`` while :class:`AttentionPrefix` components sit on it: its
    ``_attn_implementation`` names our attention-interface entry (:func:`_attention`), which joins the prefixes
    passed to the call and then runs the implementation the real config names at call time (so
    ``set_attn_implementation`` keeps working). Everything else reads and writes the real config."""

    def __init__(self, config: Any) -> None:
        object.__setattr__(self, "_adapterkit_config", config)
        object.__setattr__(self, "_adapterkit_users", 0)

    @property
    def _attn_implementation(self) -> str:
        return _INTERFACE

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_adapterkit_"):
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "_adapterkit_config"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_adapterkit_config"), name, value)

    def __deepcopy__(self, memo: dict[int, Any]) -> AttentionConfig:
        import copy

        out = type(self)(copy.deepcopy(object.__getattribute__(self, "_adapterkit_config"), memo))
        object.__setattr__(out, "_adapterkit_users", object.__getattribute__(self, "_adapterkit_users"))
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_config, (self._adapterkit_config, self._adapterkit_users))

    def __repr__(self) -> str:
        return f"AttentionConfig({self._adapterkit_config!r})"


def _rebuild_config(config: Any, users: int) -> AttentionConfig:
    out = AttentionConfig(config)
    object.__setattr__(out, "_adapterkit_users", users)
    return out


def _register_interface() -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _INTERFACE not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(_INTERFACE, _attention)


def _implementation(module: nn.Module) -> tuple[Any, str]:
    """The attention function the module's real config names now, and that name."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = module.config
    real = config._adapterkit_config if isinstance(config, AttentionConfig) else config
    impl = getattr(real, "_attn_implementation", None) or "eager"
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if impl == "eager":
        if eager is None:
            raise TypeError(
                f"{type(module).__name__}'s module has no eager_attention_forward for the prefix to wrap"
            )
        return eager, impl
    return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager), impl


def _extend_mask(
    mask: torch.Tensor | None,
    n: int,
    query: torch.Tensor,
    key: torch.Tensor,
    module: nn.Module,
    impl: str,
    rowmask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The attention mask with ``n`` attended prefix columns in front. A missing mask stays missing, except for
    causal attention run by an implementation that derives causality from the shapes (sdpa's ``is_causal`` aligns
    the diagonal top-left, which the longer keys would shift): then an explicit boolean mask, the prefix visible
    and the real keys causal (aligned bottom-right, as with a cache). ``rowmask: (B, n)`` (per-row routing): the
    prefix slots each row attends to."""
    if rowmask is not None:
        return _extend_mask_rows(mask, rowmask, query, key, module, impl)
    if mask is None:
        lq, lk = int(query.shape[2]), int(key.shape[2])
        if impl == "eager" or "flash" in impl or lq == 1 or not getattr(module, "is_causal", False):
            return None
        rows = torch.arange(lq, device=query.device)[:, None] + (lk - lq)
        real = torch.arange(lk, device=query.device)[None, :] <= rows
        return torch.cat([real.new_ones(lq, n), real], dim=1)[None, None]
    if mask.dim() == 2:  # flash attention's padding mask (B, L)
        return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    return nn.functional.pad(mask, (n, 0), value=True if mask.dtype == torch.bool else 0.0)


def _extend_mask_rows(
    mask: torch.Tensor | None,
    rowmask: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    module: nn.Module,
    impl: str,
) -> torch.Tensor:
    """:func:`_extend_mask` for per-row prefix slots ``rowmask: (B, n)`` (True: attended)."""
    batch, n = rowmask.shape
    lq, lk = int(query.shape[2]), int(key.shape[2])
    if mask is not None and mask.dim() == 2:  # flash attention's padding mask
        return torch.cat([rowmask.to(mask.dtype), mask], dim=1)
    if mask is None:
        real = torch.ones(lq, lk, dtype=torch.bool, device=query.device)
        if getattr(module, "is_causal", False) and lq > 1:
            real = torch.arange(lk, device=query.device)[None, :] <= (
                torch.arange(lq, device=query.device)[:, None] + (lk - lq)
            )
        if impl == "eager" or "flash" in impl:
            mask = torch.zeros(1, 1, lq, lk, dtype=query.dtype, device=query.device).masked_fill(
                ~real, torch.finfo(query.dtype).min
            )
        else:
            mask = real[None, None]
    mask = mask.expand(batch, -1, lq if mask.shape[2] != 1 else 1, -1)
    front = rowmask[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1)
    if mask.dtype == torch.bool:
        return torch.cat([front, mask], dim=-1)
    front = torch.zeros(front.shape, dtype=mask.dtype, device=mask.device).masked_fill(
        ~front, torch.finfo(mask.dtype).min
    )
    return torch.cat([front, mask], dim=-1)


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Our attention-interface entry: join the call's prefixes (``kwargs[_KWARG]``) in front of the keys/values,
    extend the mask (and T5's position bias), then run the module's real implementation."""
    prefixes = kwargs.pop(_KWARG, None)
    fn, impl = _implementation(module)
    if prefixes:
        prefixes.used = True
        real_keys = int(key.shape[2])
        for k, v, *_ in prefixes:
            key = torch.cat([k.to(key.dtype), key], dim=2)
            value = torch.cat([v.to(value.dtype), value], dim=2)
        n = int(key.shape[2]) - real_keys
        routed = len(prefixes[0]) > 3  # (keys, values, head, row mask (B, W), counts (B,)): per-row prefixes
        rowmask = prefixes[0][3] if routed else None
        attention_mask = _extend_mask(attention_mask, n, query, key[:, :, n:], module, impl, rowmask)
        bias = kwargs.get("position_bias")
        if isinstance(bias, torch.Tensor):
            source = prefixes[0][2].__dict__.get("_bias_ref")
            lq = int(query.shape[2])
            if source is not None and routed:  # each row as a run alone: its own count in front of the real keys
                counts = prefixes[0][4]
                rows = []
                for count in counts.tolist():
                    b = source.compute_bias(
                        lq, count + real_keys, device=query.device, past_seen_tokens=real_keys - lq
                    )
                    rows.append(nn.functional.pad(b, (n - count, 0)))
                kwargs["position_bias"] = torch.cat(rows).to(bias.dtype)
            elif source is not None:  # T5: the prefix at key positions 0 .. n-1, real keys after it (AdapterHub)
                kwargs["position_bias"] = source.compute_bias(
                    lq, n + real_keys, device=query.device, past_seen_tokens=real_keys - lq
                ).to(bias.dtype)
            else:  # no relative bias here (cross-attention): zeros for the prefix columns
                kwargs["position_bias"] = nn.functional.pad(bias, (n, 0))
    return fn(module, query, key, value, attention_mask, *args, **kwargs)


class AttentionPrefix(Component):
    """One attention module's prefix (``PrefixTuning(inject="attention")``): ``P`` keys and values joined in front
    of the module's own (after its projections and its cache), the attention mask extended by ``P`` attended
    columns, through transformers' attention interface (:class:`AttentionConfig`).

    Parameters: ``prefix: (P, 2 * kv_dim)`` (keys then values, each ``(kv_heads, head_dim)`` per virtual token:
    one layer's slice of AdapterHub's ``(P, n_layers * 2, kv_heads, head_dim)``); with ``gated``,
    ``gate: Linear(hidden, gate_outputs)`` (UniPELT: keys scaled by ``g[:, 0]``, values by ``g[:, -1]``, ``g =
    mean_t sigmoid(gate(h_t))`` over the attention input ``h: (B, L, hidden)`` of each call).
    """

    has_pre = True
    has_post = True

    def __init__(
        self, cfg: PrefixTuning, module: nn.Module, location: str, layer: int, hidden: int | None
    ) -> None:
        super().__init__()
        self.kv_heads, self.head_dim = _heads(module)
        ref = next(module.parameters(), None)
        factory = {
            "device": ref.device if ref is not None else None,
            "dtype": ref.dtype if ref is not None and ref.is_floating_point() else torch.float32,
        }
        self.num_virtual_tokens = cfg.num_virtual_tokens
        self.location = location
        self.layer = layer
        self.prefix = nn.Parameter(
            torch.empty(cfg.num_virtual_tokens, 2 * self.kv_heads * self.head_dim, **factory)
        )
        if cfg.gated:
            if hidden is None:
                raise TargetError(
                    "gated prefix tuning needs the model's hidden size (hidden_size / d_model / dim)"
                )
            self.gate = nn.Linear(hidden, cfg.gate_outputs, **factory)
        else:
            self.gate = None
        self._random = not cfg.init_weights
        _register_interface()

    def extra_repr(self) -> str:
        gate = f", gate_outputs={self.gate.out_features}" if self.gate is not None else ""
        return f"P={self.num_virtual_tokens}, location={self.location}, layer={self.layer}{gate}"

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        nn.init.normal_(self.prefix)
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=0.02 if not self._random else 0.5)
            nn.init.zeros_(self.gate.bias)

    def on_attach(self, module: nn.Module) -> None:
        config = module.__dict__.get("config")
        if not isinstance(config, AttentionConfig):
            config = AttentionConfig(config)
            module.config = config
        object.__setattr__(config, "_adapterkit_users", config._adapterkit_users + 1)

    def on_detach(self, module: nn.Module, keep_merged: bool = False) -> None:
        config = module.__dict__.get("config")
        if isinstance(config, AttentionConfig):
            users = config._adapterkit_users - 1
            object.__setattr__(config, "_adapterkit_users", users)
            if users <= 0:
                module.config = config._adapterkit_config

    def key_values(self, hidden: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)``, each ``(batch, kv_heads, P, head_dim)``, gated by ``hidden: (B, L, hidden)``."""
        kv = self.prefix.view(self.num_virtual_tokens, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        k = kv[0].unsqueeze(0).expand(batch, -1, -1, -1)
        v = kv[1].unsqueeze(0).expand(batch, -1, -1, -1)
        if self.gate is not None:
            if not isinstance(hidden, torch.Tensor):
                raise TypeError("the prefix gate could not find the attention input (hidden_states)")
            g = torch.sigmoid(self.gate(hidden.to(self.gate.weight.dtype))).mean(dim=1)  # (B, outputs)
            k = k * g[:, 0].view(-1, 1, 1, 1)
            v = v * g[:, -1].view(-1, 1, 1, 1)
        return k, v

    def pre_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("query"))
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(
                f"prefix tuning could not find the attention input of layer {self.layer} (hidden_states)"
            )
        k, v = self.key_values(hidden, int(hidden.shape[0]))
        prefixes = _Prefixes(kwargs.get(_KWARG) or ())
        prefixes.append((k, v, self))  # joined in order: a later adapter's prefix in front (AdapterHub's Stack)
        return args, {**kwargs, _KWARG: prefixes}

    # --- per-row routing: each row its adapter's prefix, padded in front to the longest (masked) ------------
    @classmethod
    def routed_call(
        cls, comps: list[Component | None], plan: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Row ``b`` gets its adapter's ``P_b`` keys/values in the last ``P_b`` of ``W = max P`` slots, the others
        masked (zeros); T5's position bias per row as a run of that row alone. Returns None (not routable here)
        when other prefixes are already joined to the call."""
        if kwargs.get(_KWARG):
            return None
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("query"))
        live = [c for c in comps if c is not None]
        if not isinstance(hidden, torch.Tensor) or not live:
            return None
        head = live[0]
        if any((c.kv_heads, c.head_dim) != (head.kv_heads, head.head_dim) for c in live):
            return None
        layout = RowLayout(comps, plan, lambda c: c.num_virtual_tokens, left=True)
        batch, width = int(hidden.shape[0]), layout.width
        keys = head.prefix.new_zeros(batch, head.kv_heads, width, head.head_dim)
        values = torch.zeros_like(keys)
        for comp, n, rows in layout.groups:
            if comp is None or n == 0:
                continue
            k, v = comp.key_values(hidden.index_select(0, rows), int(rows.numel()))
            keys = keys.index_copy(
                0, rows, torch.cat([keys.index_select(0, rows)[:, :, : width - n], k.to(keys.dtype)], 2)
            )
            values = values.index_copy(
                0, rows, torch.cat([values.index_select(0, rows)[:, :, : width - n], v.to(values.dtype)], 2)
            )
        rowmask = torch.arange(width, device=keys.device) >= width - layout.counts[:, None].to(keys.device)
        return args, {**kwargs, _KWARG: _Prefixes([(keys, values, head, rowmask, layout.counts)])}

    routed_output = classmethod(_one_post_call)

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        prefixes = kwargs.get(_KWARG)
        if isinstance(prefixes, _Prefixes) and not prefixes.used:
            raise TypeError(
                f"the {self.location} attention of layer {self.layer} did not call transformers' attention interface "
                "(its config's _attn_implementation), so the prefix had no place in it: use inject='cache' or "
                f"{_ALTERNATIVES}"
            )
        return y
