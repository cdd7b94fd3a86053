"""Contract rows for (IA)^3 (``ak.IA3``): output scaling (keys, values, fused qkv) and input scaling (FFN down)."""

from __future__ import annotations

import adapterkit as ak

ROWS = [
    ("bert-ia3", "bert", ak.IA3()),
    ("gpt2-ia3", "gpt2", ak.IA3()),  # fused attn.qkv output and mlp.c_proj input, Conv1D
    ("llama-ia3", "llama", ak.IA3()),
    ("t5-ia3", "t5", ak.IA3()),
    ("vit-ia3", "vit", ak.IA3()),
    (
        "bert-ia3-all-ffn-in",
        "bert",
        ak.IA3(targets=["attn.q", "ffn.up", "ffn.down"], feedforward=["ffn.down", "ffn.up"]),
    ),
    ("llama-ia3-outputs-only", "llama", ak.IA3(targets=["attn.v", "ffn.down"], feedforward=())),
]
