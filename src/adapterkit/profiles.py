"""Per-family role maps: model-independent role names -> module-name patterns.

A pattern is matched with ``re.fullmatch(r"(.*\\.)?" + pattern, module_name)``, i.e. against a suffix
of the dotted module path. Adding a model family is adding one entry to ``PROFILES`` (and its
``model_type`` aliases to ``ALIASES``); there is no per-family code path anywhere else.

Roles: ``attn.q``, ``attn.k``, ``attn.v``, ``attn.qkv`` (fused), ``attn.out``, ``ffn.in`` (the
FFN's input projection(s)), ``ffn.up``, ``ffn.gate``, ``ffn.down``, ``ffn`` (the whole MLP module),
``block`` (a layer), ``embed`` (input token embedding), ``attention`` (the attention module),
``head`` (task/LM output heads).
"""

from __future__ import annotations

from torch import nn

__all__ = ["PROFILES", "ROLES", "profile_for", "model_type_of"]

ROLES = (
    "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.out", "ffn.in", "ffn.up", "ffn.gate", "ffn.down",
    "ffn", "block", "embed", "attention", "head",
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
}

PROFILES: dict[str, dict[str, list[str]]] = {
    "bert": _BERT,
    "distilbert": _DISTILBERT,
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "t5": _T5,
    "bart": _BART,
    "vit": _VIT,
}

ALIASES = {
    "roberta": "bert", "xlm-roberta": "bert", "electra": "bert", "camembert": "bert", "deberta": "bert",
    "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama", "gemma2": "llama",
    "phi3": "llama", "mixtral": "llama", "olmo": "llama",
    "mt5": "t5", "umt5": "t5", "mbart": "bart",
}  # fmt: skip


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def profile_for(model: nn.Module) -> tuple[str | None, dict[str, list[str]]]:
    """``(family, role map)`` for ``model``; ``(None, {})`` for models without a profile."""
    mtype = model_type_of(model)
    if mtype is None:
        return None, {}
    family = ALIASES.get(mtype, mtype)
    return family if family in PROFILES else None, PROFILES.get(family, {})
