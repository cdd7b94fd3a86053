"""Contract rows for OFT v2 (``ak.OFT``): Neumann and exact Cayley, ``r`` instead of a block size, COFT, block
sharing, module dropout; Linear, nn.Embedding, GPT-2 Conv1D (native only; peft has no Conv1D OFT) and the ViT
patch-embedding Conv2d (k×k: the rotated weight)."""

from __future__ import annotations

import adapterkit as ak

ROWS = [
    ("bert-oft", "bert", ak.OFT(oft_block_size=8)),
    ("gpt2-oft", "gpt2", ak.OFT(oft_block_size=8, targets=["attn.qkv", "ffn.up"])),  # Conv1D
    (
        "llama-oft-exact",
        "llama",
        ak.OFT(oft_block_size=8, use_cayley_neumann=False, targets=["attn.q", "attn.v", "ffn.down"]),
    ),
    ("t5-oft-r", "t5", ak.OFT(r=4, oft_block_size=0)),
    ("vit-oft-conv2d", "vit", ak.OFT(oft_block_size=8, targets=["embed", "attn.v"])),
    ("bert-oft-coft", "bert", ak.OFT(oft_block_size=8, coft=True, eps=0.5)),
    ("llama-oft-share", "llama", ak.OFT(oft_block_size=8, block_share=True, targets=["attn.q", "ffn.up"])),
    ("bert-oft-dropout", "bert", ak.OFT(oft_block_size=4, module_dropout=0.5)),
    ("llama-oft-embed", "llama", ak.OFT(oft_block_size=8, targets=["embed", "attn.q"])),  # rotated embeddings
]
SECOND = {"oft": {"r": 0, "oft_block_size": 4}}  # a second adapter with other blocks (routing widens them)
