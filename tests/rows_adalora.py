"""Contract rows for AdaLoRA (``ak.AdaLoRA``): SVD-shaped triplets with a rank mask, Linear, GPT-2's Conv1D and
Conv2d (ViT's patch projection; ResNet's 7 × 7 stride-2, 3 × 3 and 1 × 1 stride-2 shortcut convolutions)."""

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
    (
        "vit-adalora-conv2d",
        "vit",
        ak.AdaLoRA(init_r=4, target_r=2, targets=["embed", "attn.v"]),
    ),  # Conv2d + Linear
    ("resnet-adalora-conv2d", "resnet", ak.AdaLoRA(init_r=4, target_r=2, targets=["convolution"])),
]
SECOND = {"adalora": {"init_r": 3, "target_r": 1}}
