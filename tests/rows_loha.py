"""Contract rows for LoHa (``ak.LoHa``): Linear, GPT-2 Conv1D (native only; peft has no Conv1D LoHa) and the
ViT patch-embedding Conv2d (flattened factors or the CP core); ABBA (``r2``, ``init_weights="abba"``)."""

from __future__ import annotations

import adapterkit as ak

ROWS = [
    ("bert-loha", "bert", ak.LoHa(r=4)),
    ("gpt2-loha", "gpt2", ak.LoHa(r=2, targets=["attn.qkv", "ffn.up"])),  # Conv1D
    (
        "llama-loha-patterns",
        "llama",
        ak.LoHa(
            r=4,
            alpha=8,
            targets=["attn.q", "attn.v", "ffn.down"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"down_proj": 3.0},
        ),
    ),
    ("t5-loha", "t5", ak.LoHa()),
    ("vit-loha-conv2d", "vit", ak.LoHa(r=2, targets=["embed", "attn.v"])),
    ("vit-loha-conv2d-cp", "vit", ak.LoHa(r=2, targets=["embed"], use_effective_conv2d=True)),  # CP core
    ("bert-loha-dropouts", "bert", ak.LoHa(r=2, rank_dropout=0.2, module_dropout=0.3)),
    # ABBA: independently ranked pairs, first pair from the SVD of the frozen weight
    ("llama-abba", "llama", ak.LoHa(r=2, r2=3, init_weights="abba", targets=["attn.q", "attn.v", "ffn.down"])),
    ("gpt2-abba", "gpt2", ak.LoHa(r=3, r2=2, init_weights="abba", targets=["attn.qkv"])),  # Conv1D
    ("vit-abba-conv2d", "vit", ak.LoHa(r=2, r2=4, init_weights="abba", targets=["embed", "attn.v"])),
]
SECOND = {"loha": {"r": 2, "alpha": 4.0, "rank_pattern": {}}}
