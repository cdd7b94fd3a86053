"""Contract rows for AdaLoRA (``ak.AdaLoRA``): SVD-shaped triplets with a rank mask, Linear and GPT-2's Conv1D."""

from __future__ import annotations

import adapterkit as ak

ROWS = [
    ("bert-adalora", "bert", ak.AdaLoRA(init_r=6, target_r=2)),
    ("gpt2-adalora", "gpt2", ak.AdaLoRA(init_r=4, target_r=2, targets=["attn.qkv", "ffn.up"])),  # Conv1D
    (
        "llama-adalora",
        "llama",
        ak.AdaLoRA(init_r=8, target_r=4, alpha=16, targets=["attn.q", "attn.v", "ffn.down"]),
    ),
    ("t5-adalora", "t5", ak.AdaLoRA(init_r=4, target_r=2, dropout=0.1, total_step=100)),
    ("vit-adalora", "vit", ak.AdaLoRA(init_r=4, target_r=1, alpha=0, targets=["attn.q", "attn.v", "ffn.up"])),
]
SECOND = {"adalora": {"init_r": 3, "target_r": 1}}
