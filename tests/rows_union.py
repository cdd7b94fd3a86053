"""Contract rows for unions (``ak.Union``): members sharing modules (a Chain) and UniPELT gates.

MAM and UniPELT presets over bottleneck/prefix members add their rows once those families land."""

from __future__ import annotations

import adapterkit as ak

ROWS = [
    (
        "llama-union-lora-lora",
        "llama",
        ak.Union(ak.LoRA(targets=["attn.q"]), ak.LoRA(r=2, targets=["attn.q", "ffn.down"])),
    ),
    (
        "bert-union-gated",
        "bert",
        ak.Union(ak.LoRA(targets=["attn.q", "attn.v"]), ak.LoRA(r=2, targets=["attn.v", "ffn.up"]), gated=True),
    ),
    (
        "gpt2-union",
        "gpt2",
        ak.Union(ak.LoRA(targets=["attn.qkv"]), ak.LoRA(r=2, targets=["ffn.down"], bias="all")),
    ),
    ("t5-union-gated", "t5", ak.Union(ak.LoRA(), ak.LoRA(r=2, targets=["ffn.down"]), gated=True)),
    ("vit-union", "vit", ak.Union(ak.LoRA(), ak.LoRA(r=2, targets=["embed"]))),
]
