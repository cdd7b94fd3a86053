"""Contract rows for HRA (``ak.HRA``) and its ETHER/ETHER+ variants: Linear, GPT-2 Conv1D (native only; peft has no
Conv1D HRA) and the ViT patch-embedding Conv2d (HRA only, as peft)."""

from __future__ import annotations

import adapterkit as ak

ROWS = [
    ("bert-hra", "bert", ak.HRA()),
    ("gpt2-hra", "gpt2", ak.HRA(r=4, targets=["attn.qkv", "ffn.down"])),  # Conv1D
    ("llama-hra-gs", "llama", ak.HRA(r=4, apply_GS=True, targets=["attn.q", "attn.v", "ffn.down"])),
    ("t5-hra", "t5", ak.HRA(r=6)),
    ("vit-hra-conv2d", "vit", ak.HRA(r=4, targets=["embed", "attn.v"])),  # Conv2d: 3 · 4 · 4 = 48 inputs
    ("llama-ether", "llama", ak.HRA(variant="ether", n_blocks=4, targets=["attn.q", "attn.v", "ffn.down"])),
    ("bert-ether-plus", "bert", ak.HRA(variant="ether_plus", n_blocks=2, targets=["attn.q", "attn.v", "ffn.up"])),
    ("gpt2-ether-plus", "gpt2", ak.HRA(variant="ether_plus", n_blocks=4)),  # Conv1D, out 96 = 3 · 32
]
SECOND = {"hra": {"r": 2}}
SKIP = {
    ("llama-hra-gs", "identity"): "apply_GS: H = I - 2QQᵀ reflects an r-dimensional subspace, never the identity "
    "(as in peft)",
    ("llama-ether", "identity"): "ETHER: a reflection is never the identity (Bini et al. 2024 §3.1: bounded "
    "distance ||H - I||_F = 2 from the start)",
}
