"""Per-family role maps: model-independent role names -> module-name patterns.

A pattern is matched with ``re.fullmatch(r"(.*\\.)?" + pattern, module_name)``, i.e. against a suffix
of the dotted module path. Adding a model family is adding one entry to ``PROFILES`` (and its
``model_type`` aliases to ``ALIASES``); there is no per-family code path anywhere else. A model whose
``config.model_type`` has no entry gets roles derived from its module tree (``infer_roles.py``: attention blocks and
their q/k/v/out projections, FFN up/gate/down, embeddings, heads); the hand-written entries stay where inference is
wrong or cannot see something (the sub-layer roles below, which need to know whether a block is pre- or post-LN).

Roles: ``attn.q``, ``attn.k``, ``attn.v``, ``attn.qkv`` (fused), ``attn.out``, ``ffn.in`` (the
FFN's input projection(s)), ``ffn.up``, ``ffn.gate``, ``ffn.down``, ``ffn`` (the whole MLP module),
``block`` (a layer), ``embed`` (input token embedding), ``attention`` (the attention module),
``head`` (task/LM output heads).

Sub-layer roles (where AdapterHub's ``BottleneckLayer`` sits: bottleneck adapters with ``hook="sublayer"``), for
each residual sub-layer ``out = norm?(f + r)`` of a block, ``<kind>`` one of ``attn`` (self-attention), ``cross``
(cross-attention of encoder-decoder models) and ``ffn``:

* ``<kind>.sublayer``: the module whose output (first element when it returns a tuple) is the sub-layer output
  ``f``, just before the model adds the residual (after the sub-layer's own dropout where that is a module);
* ``<kind>.residual``: the module whose first input is the residual ``r`` the model adds to ``f`` (the sub-layer
  module itself when ``r`` is its input; the pre-norm on pre-LN blocks, whose *input* is ``r``);
* ``<kind>.norm``: post-LN blocks only (BERT, DistilBERT, BART): the LayerNorm applied to ``f + r``. Pre-LN blocks
  (GPT-2, LLaMA, T5, ViT) have none: their sub-layer output is ``f + r``.
"""

from __future__ import annotations

from torch import nn

from .infer_roles import InferredRoles, infer_roles

__all__ = ["PROFILES", "ROLES", "profile_for", "model_type_of", "is_inferred"]

ROLES = (
    "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.out", "ffn.in", "ffn.up", "ffn.gate", "ffn.down",
    "ffn", "block", "embed", "attention", "head",
    "attn.sublayer", "attn.residual", "attn.norm", "cross.sublayer", "cross.residual", "cross.norm",
    "ffn.sublayer", "ffn.residual", "ffn.norm",
)  # fmt: skip

_BERT = {
    "attn.q": [r"attention\.self\.query"],
    "attn.k": [r"attention\.self\.key"],
    "attn.v": [r"attention\.self\.value"],
    "attn.out": [r"attention\.output\.dense"],
    "ffn.in": [r"intermediate\.dense"],
    "ffn.up": [r"intermediate\.dense"],
    "ffn.down": [r"layer\.\d+\.output\.dense"],
    "block": [r"encoder\.layer\.\d+"],
    "embed": [r"embeddings\.word_embeddings"],
    "attention": [r"attention\.self"],
    "head": [r"classifier(\..*)?", r"cls(\..*)?", r"qa_outputs", r"lm_head(\..*)?"],
    "attn.sublayer": [r"attention\.output\.dropout"],
    "attn.residual": [r"attention\.self"],
    "attn.norm": [r"attention\.output\.LayerNorm"],
    "ffn.sublayer": [r"layer\.\d+\.output\.dropout"],
    "ffn.residual": [r"layer\.\d+\.intermediate"],
    "ffn.norm": [r"layer\.\d+\.output\.LayerNorm"],
}

# DeBERTa (v1): BERT's layout with a fused q/k/v projection (``in_proj``, peft's default target for "deberta");
# the relative-position projections (``pos_proj``, ``pos_q_proj``) get no role
_DEBERTA = {
    **{k: v for k, v in _BERT.items() if k not in ("attn.q", "attn.k", "attn.v")},
    "attn.qkv": [r"attention\.self\.in_proj"],
    "head": [*_BERT["head"], r"pooler\.dense", r"lm_predictions\.lm_head\.(dense|LayerNorm)"],
}

# DeBERTa-v2/v3: BERT's layout with query_proj/key_proj/value_proj (pos_key_proj/pos_query_proj get no role)
_DEBERTA_V2 = {
    **_BERT,
    "attn.q": [r"attention\.self\.query_proj"],
    "attn.k": [r"attention\.self\.key_proj"],
    "attn.v": [r"attention\.self\.value_proj"],
    "head": [*_BERT["head"], r"pooler\.dense", r"lm_predictions\.lm_head\.(dense|LayerNorm)"],
}

_DISTILBERT = {
    "attn.q": [r"attention\.q_lin"],
    "attn.k": [r"attention\.k_lin"],
    "attn.v": [r"attention\.v_lin"],
    "attn.out": [r"attention\.out_lin"],
    "ffn.in": [r"ffn\.lin1"],
    "ffn.up": [r"ffn\.lin1"],
    "ffn.down": [r"ffn\.lin2"],
    "ffn": [r"layer\.\d+\.ffn"],
    "block": [r"transformer\.layer\.\d+"],
    "embed": [r"embeddings\.word_embeddings"],
    "attention": [r"layer\.\d+\.attention"],
    "head": [r"pre_classifier", r"classifier", r"qa_outputs", r"vocab_projector", r"vocab_transform"],
    "attn.sublayer": [r"layer\.\d+\.attention"],
    "attn.residual": [r"layer\.\d+\.attention"],
    "attn.norm": [r"layer\.\d+\.sa_layer_norm"],
    "ffn.sublayer": [r"layer\.\d+\.ffn"],
    "ffn.residual": [r"layer\.\d+\.ffn"],
    "ffn.norm": [r"layer\.\d+\.output_layer_norm"],
}

_GPT2 = {
    "attn.qkv": [r"attn\.c_attn"],
    "attn.out": [r"attn\.c_proj"],
    "ffn.in": [r"mlp\.c_fc"],
    "ffn.up": [r"mlp\.c_fc"],
    "ffn.down": [r"mlp\.c_proj"],
    "ffn": [r"h\.\d+\.mlp"],
    "block": [r"h\.\d+"],
    "embed": [r"wte"],
    "attention": [r"h\.\d+\.attn"],
    "head": [r"lm_head", r"score"],
    "attn.sublayer": [r"h\.\d+\.attn"],
    "attn.residual": [r"h\.\d+\.ln_1"],
    "cross.sublayer": [r"h\.\d+\.crossattention"],
    "cross.residual": [r"h\.\d+\.ln_cross_attn"],
    "ffn.sublayer": [r"h\.\d+\.mlp"],
    "ffn.residual": [r"h\.\d+\.ln_2"],
}

_LLAMA = {
    "attn.q": [r"self_attn\.q_proj"],
    "attn.k": [r"self_attn\.k_proj"],
    "attn.v": [r"self_attn\.v_proj"],
    "attn.qkv": [r"self_attn\.qkv_proj"],
    "attn.out": [r"self_attn\.o_proj"],
    "ffn.in": [r"mlp\.gate_proj", r"mlp\.up_proj", r"mlp\.gate_up_proj"],
    "ffn.up": [r"mlp\.up_proj", r"mlp\.gate_up_proj"],
    "ffn.gate": [r"mlp\.gate_proj"],
    "ffn.down": [r"mlp\.down_proj"],
    "ffn": [r"layers\.\d+\.mlp"],
    "block": [r"layers\.\d+"],
    "embed": [r"embed_tokens"],
    "attention": [r"layers\.\d+\.self_attn"],
    "head": [r"lm_head", r"score"],
    "attn.sublayer": [r"layers\.\d+\.self_attn"],
    "attn.residual": [r"layers\.\d+\.input_layernorm"],
    "ffn.sublayer": [r"layers\.\d+\.mlp"],
    "ffn.residual": [r"layers\.\d+\.post_attention_layernorm"],
}

_T5 = {
    "attn.q": [r"(SelfAttention|EncDecAttention)\.q"],
    "attn.k": [r"(SelfAttention|EncDecAttention)\.k"],
    "attn.v": [r"(SelfAttention|EncDecAttention)\.v"],
    "attn.out": [r"(SelfAttention|EncDecAttention)\.o"],
    "ffn.in": [r"DenseReluDense\.wi(_0|_1)?"],
    "ffn.up": [r"DenseReluDense\.wi(_1)?"],
    "ffn.gate": [r"DenseReluDense\.wi_0"],
    "ffn.down": [r"DenseReluDense\.wo"],
    "ffn": [r"DenseReluDense"],
    "block": [r"block\.\d+"],
    "embed": [r"(encoder|decoder)\.embed_tokens"],  # they share `shared`'s weight; `shared` itself never runs
    "attention": [r"SelfAttention", r"EncDecAttention"],
    "head": [r"lm_head", r"classification_head(\..*)?"],
    "attn.sublayer": [r"encoder\.block\.\d+\.layer\.0\.dropout", r"decoder\.block\.\d+\.layer\.0\.dropout"],
    "attn.residual": [r"encoder\.block\.\d+\.layer\.0\.layer_norm", r"decoder\.block\.\d+\.layer\.0\.layer_norm"],
    "cross.sublayer": [r"decoder\.block\.\d+\.layer\.1\.dropout"],
    "cross.residual": [r"decoder\.block\.\d+\.layer\.1\.layer_norm"],
    "ffn.sublayer": [r"encoder\.block\.\d+\.layer\.1\.dropout", r"decoder\.block\.\d+\.layer\.2\.dropout"],
    "ffn.residual": [r"encoder\.block\.\d+\.layer\.1\.layer_norm", r"decoder\.block\.\d+\.layer\.2\.layer_norm"],
}

_BART = {
    "attn.q": [r"(self_attn|encoder_attn)\.q_proj"],
    "attn.k": [r"(self_attn|encoder_attn)\.k_proj"],
    "attn.v": [r"(self_attn|encoder_attn)\.v_proj"],
    "attn.out": [r"(self_attn|encoder_attn)\.out_proj"],
    "ffn.in": [r"layers\.\d+\.fc1"],
    "ffn.up": [r"layers\.\d+\.fc1"],
    "ffn.down": [r"layers\.\d+\.fc2"],
    "block": [r"layers\.\d+"],
    "embed": [r"(encoder|decoder)\.embed_tokens"],
    "attention": [r"self_attn", r"encoder_attn"],
    "head": [r"lm_head", r"classification_head(\..*)?"],
    "attn.sublayer": [r"layers\.\d+\.self_attn"],
    "attn.residual": [r"layers\.\d+\.self_attn"],
    "attn.norm": [r"layers\.\d+\.self_attn_layer_norm"],
    "cross.sublayer": [r"layers\.\d+\.encoder_attn"],
    "cross.residual": [r"layers\.\d+\.encoder_attn"],
    "cross.norm": [r"layers\.\d+\.encoder_attn_layer_norm"],
    "ffn.sublayer": [r"layers\.\d+\.fc2"],
    "ffn.residual": [r"layers\.\d+\.fc1"],
    "ffn.norm": [r"layers\.\d+\.final_layer_norm"],
}

_VIT = {  # transformers 5 names (q_proj, fc1, ...) and the 4.x names (attention.attention.query, ...)
    "attn.q": [r"attention\.q_proj", r"attention\.attention\.query"],
    "attn.k": [r"attention\.k_proj", r"attention\.attention\.key"],
    "attn.v": [r"attention\.v_proj", r"attention\.attention\.value"],
    "attn.out": [r"attention\.o_proj", r"attention\.output\.dense"],
    "ffn.in": [r"mlp\.fc1", r"intermediate\.dense"],
    "ffn.up": [r"mlp\.fc1", r"intermediate\.dense"],
    "ffn.down": [r"mlp\.fc2", r"layer\.\d+\.output\.dense"],
    "ffn": [r"layers\.\d+\.mlp"],
    "block": [r"layers\.\d+", r"encoder\.layer\.\d+"],
    "embed": [r"embeddings\.patch_embeddings\.projection"],
    "attention": [r"layers\.\d+\.attention", r"attention\.attention"],
    "head": [r"classifier"],
    "attn.sublayer": [r"layers\.\d+\.attention", r"layer\.\d+\.attention\.output"],
    "attn.residual": [r"layers\.\d+\.layernorm_before", r"layer\.\d+\.layernorm_before"],
    "ffn.sublayer": [r"layers\.\d+\.mlp", r"layer\.\d+\.output\.dropout"],
    "ffn.residual": [r"layers\.\d+\.layernorm_after", r"layer\.\d+\.layernorm_after"],
}

PROFILES: dict[str, dict[str, list[str]]] = {
    "bert": _BERT,
    "deberta": _DEBERTA,
    "deberta-v2": _DEBERTA_V2,
    "distilbert": _DISTILBERT,
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "t5": _T5,
    "bart": _BART,
    "vit": _VIT,
}

ALIASES = {
    "roberta": "bert", "xlm-roberta": "bert", "electra": "bert", "camembert": "bert",
    "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
    "mixtral": "llama", "olmo": "llama",
    "mt5": "t5", "umt5": "t5", "mbart": "bart",
}  # fmt: skip


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def profile_for(model: nn.Module) -> tuple[str | None, dict[str, list[str]]]:
    """``(family, role map)`` for ``model``.

    The hand-written profile of its ``config.model_type`` (through ``ALIASES``) when there is one; else, for models
    with a ``config.model_type``, the roles :func:`~adapterkit.infer_roles.infer_roles` derives from the module tree
    (family: the model type; the map is an :class:`~adapterkit.infer_roles.InferredRoles`, see
    :func:`is_inferred`); ``(None, {})`` for models without a config or where nothing could be inferred (plain
    ``nn.Module`` trees: target them by name, type or ``"all-linear"``)."""
    mtype = model_type_of(model)
    if mtype is None:
        return None, {}
    family = ALIASES.get(mtype, mtype)
    if family in PROFILES:
        return family, PROFILES[family]
    roles = infer_roles(model)
    return (mtype, roles) if roles else (None, {})


def is_inferred(roles: dict[str, list[str]]) -> bool:
    """Whether ``roles`` (from :func:`profile_for`) were derived from the module tree rather than written by hand."""
    return isinstance(roles, InferredRoles)
