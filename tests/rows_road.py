"""Contract rows for RoAd (``ak.RoAd``): the three variants on Linear, GPT-2's fused Conv1D, two group sizes.
peft's RoAd has no Conv2d (nor does the method: it rotates pairs of a linear layer's outputs), so no CNN row."""

from __future__ import annotations

import adapterkit as ak

ROWS = [
    ("bert-road", "bert", ak.RoAd(group_size=8)),
    ("gpt2-road2", "gpt2", ak.RoAd(variant="road_2", group_size=16, targets=["attn.qkv", "ffn.up"])),  # Conv1D
    ("llama-road4", "llama", ak.RoAd(variant="road_4", group_size=8, targets=["attn.q", "attn.v", "ffn.down"])),
    ("t5-road", "t5", ak.RoAd(group_size=4)),
    ("vit-road2", "vit", ak.RoAd(variant="road_2", group_size=32, targets=["attn.q", "attn.v", "ffn.up"])),
]
SECOND = {"road": {"variant": "road_2"}}
