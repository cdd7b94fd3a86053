"""Contract rows for AdaMix (``ak.AdaMix``): bottleneck experts on the block's sub-layers (the authors' arrangement,
Houlsby with norms, parallel on projections) and LoRA experts on Linear and GPT-2's Conv1D, with and without a
shared projection. Contracts run in eval mode, where AdaMix is the experts' average (deterministic); bottleneck
experts are not mergeable (contract (b) checks the refusal), LoRA experts merge as their averaged LoRA."""

from __future__ import annotations

import adapterkit as ak

ROWS = [
    ("bert-adamix", "bert", ak.AdaMix(n_experts=3)),  # the authors' bottleneck: FFN sub-layer output, GELU
    (
        "llama-adamix-houlsby",
        "llama",
        ak.AdaMix(expert=ak.Bottleneck(placement="houlsby", ln_after=True), n_experts=2, share_down=True),
    ),
    (
        "vit-adamix-parallel",
        "vit",
        ak.AdaMix(expert=ak.Bottleneck(placement="parallel", hook="projection", scaling="learned"), n_experts=2),
    ),
    ("bart-adamix", "bart", ak.AdaMix(expert=ak.Bottleneck(placement="houlsby"), n_experts=2, share_up=True)),
    ("gpt2-adamix-lora", "gpt2", ak.AdaMix(expert="lora", n_experts=3, share_up=True)),  # fused Conv1D qkv
    ("t5-adamix-lora", "t5", ak.AdaMix(expert=ak.LoRA(r=2, alpha=4, dropout=0.1), n_experts=2)),
]
SECOND = {"adamix": {"n_experts": 2, "share_up": False, "share_down": False}}
