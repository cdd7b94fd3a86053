"""Contract rows for DyLoRA (``ak.DyLoRA``): nested-rank LoRA at several inference ranks, Linear and GPT-2's Conv1D."""

from __future__ import annotations

import adapterkit as ak

ROWS = [
    ("bert-dylora", "bert", ak.DyLoRA(r_max=4)),
    ("gpt2-dylora-rank2", "gpt2", ak.DyLoRA(r_max=6, rank=2, targets=["attn.qkv", "ffn.up"])),  # Conv1D
    (
        "llama-dylora",
        "llama",
        ak.DyLoRA(r_max=8, r_min=2, rank=3, alpha=16, targets=["attn.q", "attn.v", "ffn.down"]),
    ),
    ("t5-dylora-unfrozen", "t5", ak.DyLoRA(r_max=4, frozen=False, dropout=0.1)),
    ("vit-dylora", "vit", ak.DyLoRA(r_max=4, rank=1, targets=["attn.q", "attn.v", "ffn.up"])),
]
SECOND = {"dylora": {"r_max": 3, "r_min": 1, "rank": None}}
