"""Contract rows for VeRA (``ak.VeRA``): shared frozen projections (sliced per layer), trainable vectors."""

from __future__ import annotations

import adapterkit as ak

ROWS = [
    ("bert-vera", "bert", ak.VeRA(r=8)),
    ("gpt2-vera", "gpt2", ak.VeRA(r=4, targets=["attn.qkv", "ffn.up"])),  # Conv1D, different shapes share A/B
    ("llama-vera", "llama", ak.VeRA(r=8, targets=["attn.q", "attn.k", "ffn.down"])),
    ("t5-vera", "t5", ak.VeRA(r=4, projection_prng_key=7)),
    ("vit-vera", "vit", ak.VeRA(r=6, dropout=0.1, targets=["attn.v", "ffn.up"])),
]
SECOND = {"vera": {"r": 2, "projection_prng_key": 3}}
