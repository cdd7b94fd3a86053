"""Contract rows for LoKr (``ak.LoKr``): full and low-rank factors (``r`` against the factor sizes,
``decompose_both``, ``decompose_factor``), Linear, GPT-2 Conv1D (native only) and the ViT patch-embedding Conv2d."""

from __future__ import annotations

import adapterkit as ak

ROWS = [
    ("bert-lokr", "bert", ak.LoKr()),  # r=8 >= max(b, d) / 2: full factors
    ("gpt2-lokr", "gpt2", ak.LoKr(r=1, targets=["attn.qkv", "ffn.up"])),  # Conv1D, low-rank D
    ("llama-lokr-both", "llama", ak.LoKr(r=1, decompose_both=True, targets=["attn.q", "attn.v", "ffn.down"])),
    ("t5-lokr-factor", "t5", ak.LoKr(r=2, decompose_factor=4, alpha=4)),
    ("vit-lokr-conv2d", "vit", ak.LoKr(r=1, targets=["embed", "attn.v"])),
    ("vit-lokr-conv2d-full", "vit", ak.LoKr(r=8, targets=["embed"])),
    ("vit-lokr-conv2d-cp", "vit", ak.LoKr(r=1, targets=["embed", "attn.v"], use_effective_conv2d=True)),  # Tucker
    ("bert-lokr-dropouts", "bert", ak.LoKr(r=2, rank_dropout=0.2, module_dropout=0.3, rank_dropout_scale=True)),
    ("llama-lokr-lycoris-init", "llama", ak.LoKr(r=2, init_weights="lycoris")),
]
SECOND = {"lokr": {"r": 2, "alpha": 4.0, "decompose_both": False}}
