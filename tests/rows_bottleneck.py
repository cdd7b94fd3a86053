"""Contract rows for bottleneck adapters (``ak.Bottleneck``: Houlsby, Pfeiffer, parallel, Compacter/PHM,
AdapterDrop; on the block's sub-layers (``hook="sublayer"``, the default) and on projections) and MAD-X invertible
adapters (``ak.Invertible``).

Tiny models have hidden size 32: Compacter rows use ``reduction_factor=8`` (bottleneck 4, divisible by
``phm_dim=4``); AdapterHub's 32 would give a bottleneck of 1."""

from __future__ import annotations

import adapterkit as ak
from adapterkit.config import get_config

_COMPACTER = get_config("compacter", reduction_factor=8)
_COMPACTER_PP = get_config("compacter++", reduction_factor=8)

ROWS = [
    # Houlsby: attention output and FFN output
    ("bert-bn-houlsby", "bert", ak.Bottleneck(placement="houlsby")),
    ("gpt2-bn-houlsby", "gpt2", ak.Bottleneck(placement="houlsby", non_linearity="swish")),  # Conv1D
    ("llama-bn-houlsby", "llama", ak.Bottleneck(placement="houlsby", ln_before=True, ln_after=True)),
    ("t5-bn-houlsby", "t5", ak.Bottleneck(placement="houlsby")),  # self- and cross-attention outputs
    ("vit-bn-houlsby", "vit", ak.Bottleneck(placement="houlsby", scaling="learned", dropout=0.1)),
    # Pfeiffer: FFN output only
    ("bert-bn-pfeiffer", "bert", ak.Bottleneck(placement="pfeiffer", scaling="channel")),
    ("gpt2-bn-pfeiffer", "gpt2", ak.Bottleneck(placement="pfeiffer")),
    ("llama-bn-pfeiffer", "llama", ak.Bottleneck(placement="pfeiffer", bottleneck_size=5, non_linearity="tanh")),
    ("t5-bn-pfeiffer", "t5", ak.Bottleneck(placement="pfeiffer", ln_after=True, adapter_residual_before_ln=False)),
    ("vit-bn-pfeiffer", "vit", ak.Bottleneck(placement="pfeiffer")),
    # parallel to the FFN: BERT taps the FFN input at intermediate.dense, the others sit on the MLP module
    ("bert-bn-parallel", "bert", ak.Bottleneck(placement="parallel", reduction_factor=2, scaling=4.0)),
    ("gpt2-bn-parallel", "gpt2", ak.Bottleneck(placement="parallel", scaling=4.0)),
    ("llama-bn-parallel", "llama", ak.Bottleneck(placement="parallel", scaling="learned")),
    ("t5-bn-parallel", "t5", ak.Bottleneck(placement="parallel", ln_before=True)),
    ("vit-bn-parallel", "vit", ak.Bottleneck(placement="parallel", reduction_factor=4)),
    (
        "llama-bn-parallel-down",
        "llama",
        ak.Bottleneck(placement="parallel", hook="projection", targets=["ffn.down"]),
    ),
    # hook="sublayer" (the default) arrangements of the block's residual and LayerNorm (AdapterHub's options)
    ("bert-bn-seq-res-after-ln", "bert", ak.Bottleneck(placement="pfeiffer", residual_before_ln=False)),
    (
        "bart-bn-seq-post-add",
        "bart",
        ak.Bottleneck(placement="houlsby", original_ln_before=True, residual_before_ln="post_add"),
    ),
    (
        "gpt2-bn-seq-no-ln-after",
        "gpt2",
        ak.Bottleneck(placement="pfeiffer", original_ln_after=False, residual_before_ln=False),
    ),
    ("t5-bn-cross", "t5", ak.Bottleneck(placement="parallel", cross_adapter=True)),
    # hook="projection": the adapter on one module's output (the FFN input tapped for BERT's parallel adapter)
    ("bert-bn-houlsby-projection", "bert", ak.Bottleneck(placement="houlsby", hook="projection")),
    ("bert-bn-parallel-projection", "bert", ak.Bottleneck(placement="parallel", hook="projection", scaling=4.0)),
    ("gpt2-bn-pfeiffer-projection", "gpt2", ak.Bottleneck(placement="pfeiffer", hook="projection")),
    # Compacter (Houlsby placement) and Compacter++ (Pfeiffer placement), PHM layers with a shared rule
    ("bert-compacter", "bert", _COMPACTER),
    ("t5-compacter", "t5", _COMPACTER),
    ("gpt2-compacter++", "gpt2", _COMPACTER_PP),
    ("vit-compacter++", "vit", _COMPACTER_PP),
    ("bert-compacter-unshared-full", "bert", _COMPACTER.replace(shared_phm_rule=False, factorized_phm_W=False)),
    ("llama-compacter-parallel-rank2", "llama", _COMPACTER.replace(placement="parallel", phm_rank=2)),
    # AdapterDrop
    ("bert-bn-skip_layers", "bert", ak.Bottleneck(placement="houlsby", skip_layers=1, drop_prob=0.5)),
    ("vit-bn-skip_layers", "vit", ak.Bottleneck(placement="pfeiffer", skip_layers=1)),
    # MAD-X invertible adapters: embeddings (+ inverse at the LM head where there is one)
    ("bert-invertible", "bert", ak.Invertible()),  # classifier: no inverse
    ("gpt2-invertible", "gpt2", ak.Invertible()),  # tied wte/lm_head
    ("llama-invertible", "llama", ak.Invertible(non_linearity="gelu", reduction_factor=4)),
    ("t5-invertible", "t5", ak.Invertible()),  # encoder and decoder embed_tokens share one coupling
]

SECOND = {"bottleneck": {"reduction_factor": 4}, "invertible": {"reduction_factor": 1}}

# AdapterHub's residual_before_ln=False / "post_add" add the normalized (or un-normalized) sum again after the
# adapter: LN(LN(f + r) + r) / LN(f + 2r) at init, as in AdapterHub itself
SKIP = {
    ("bert-bn-seq-res-after-ln", "identity"): "residual_before_ln=False is not an identity at init (AdapterHub)",
    ("bart-bn-seq-post-add", "identity"): "residual_before_ln='post_add' is not an identity at init (AdapterHub)",
}
