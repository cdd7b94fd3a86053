"""Contract rows for BOFT (``ak.BOFT``): one to three butterfly factors, block size or block count, dropout; Linear,
GPT-2 Conv1D (native only; peft has no Conv1D BOFT) and the ViT patch-embedding Conv2d (k×k: the rotated weight).
The second adapter of contracts (f) and (g) has the same shapes (other values), so routing takes the batched path."""

from __future__ import annotations

import adapterkit as ak

ROWS = [
    ("bert-boft", "bert", ak.BOFT()),
    ("gpt2-boft-butterfly", "gpt2", ak.BOFT(boft_n_butterfly_factor=2, targets=["attn.qkv", "ffn.up"])),  # Conv1D
    (
        "llama-boft-blocknum",
        "llama",
        ak.BOFT(
            boft_block_num=4,
            boft_block_size=0,
            boft_n_butterfly_factor=3,
            targets=["attn.q", "attn.v", "ffn.down"],
        ),
    ),
    ("t5-boft", "t5", ak.BOFT(boft_block_size=8)),
    ("vit-boft-conv2d", "vit", ak.BOFT(boft_n_butterfly_factor=2, targets=["embed", "attn.v"])),
    ("bert-boft-dropout", "bert", ak.BOFT(boft_dropout=0.5)),
]
