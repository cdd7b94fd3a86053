"""Contract rows for MoV and MoLoRA (``ak.MoV``, ``ak.MoLoRA``): soft merging and top-k, on Linear and GPT-2's fused
Conv1D; one-expert rows are (IA)^3 / LoRA exactly (test_mov.py). Neither is mergeable (per-token gates), which
contract (b) checks as a refusal."""

from __future__ import annotations

import adapterkit as ak

ROWS = [
    ("llama-mov", "llama", ak.MoV(n_experts=3)),
    ("gpt2-mov-topk", "gpt2", ak.MoV(n_experts=4, top_k=2)),  # fused attn.qkv + ffn.down input side, Conv1D
    ("t5-mov", "t5", ak.MoV(n_experts=2)),
    ("bert-molora", "bert", ak.MoLoRA(r=2, n_experts=3)),
    ("llama-molora-topk", "llama", ak.MoLoRA(r=2, n_experts=4, top_k=1, targets=["attn.q", "attn.v", "ffn.down"])),
    ("vit-molora", "vit", ak.MoLoRA(r=2, n_experts=2)),
]
SECOND = {"mov": {"n_experts": 2}, "molora": {"r": 4}}
