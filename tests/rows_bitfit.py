"""Contract rows for BitFit (``ak.BitFit``): bias deltas on every biased module, and fresh biases
(``add_missing``) on models whose linears have none, which cannot be merged."""

from __future__ import annotations

import adapterkit as ak

ROWS = [
    ("bert-bitfit", "bert", ak.BitFit()),  # linears, LayerNorms, pooler; not the classifier
    ("gpt2-bitfit", "gpt2", ak.BitFit()),  # Conv1D and LayerNorm biases
    ("vit-bitfit", "vit", ak.BitFit()),  # includes the Conv2d patch projection
    ("bert-bitfit-targets", "bert", ak.BitFit(targets=["attn.q", "attn.v", "ffn.down"])),
    ("llama-bitfit-add-missing", "llama", ak.BitFit(add_missing=True)),
    ("t5-bitfit-add-missing", "t5", ak.BitFit(add_missing=True, targets=["attn.q", "attn.v", "ffn.down"])),
]
