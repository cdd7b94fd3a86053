"""Contract rows for sparse deltas (``ak.SparseDelta``: indices + values per weight) and diff pruning's dense
gated delta (``ak.DiffPruning``): Linear, GPT-2 Conv1D, embeddings, LayerNorms, biases in the space."""

from __future__ import annotations

from torch import nn

import adapterkit as ak

ROWS = [
    ("bert-sparse", "bert", ak.SparseDelta(density=0.05)),  # all-linear
    ("gpt2-sparse-bias", "gpt2", ak.SparseDelta(density=0.05, bias=True)),  # Conv1D (stored (in, out))
    ("llama-sparse-dense", "llama", ak.SparseDelta(density=0.3, targets=["attn.q", "attn.v", "ffn.down"])),
    ("t5-sparse", "t5", ak.SparseDelta(density=0.003, seed=5)),  # FFN sites below 0.4%: the gathered product
    ("vit-sparse-norms", "vit", ak.SparseDelta(density=0.1, bias=True, targets=["attn.v", nn.LayerNorm])),
    ("bert-sparse-embed", "bert", ak.SparseDelta(density=0.02, targets=["embed", "attn.q"])),
    ("gpt2-sparse-embed", "gpt2", ak.SparseDelta(density=0.02, targets=["embed"])),  # tied to lm_head: no merge
]
TIED = {"gpt2-sparse-embed"}
SECOND = {"sparse_delta": {"density": 0.04, "seed": 3}}
ROWS += [
    ("bert-diffprune", "bert", ak.DiffPruning()),
    ("gpt2-diffprune-bias", "gpt2", ak.DiffPruning(bias=True, targets=["attn.qkv", "ffn.up", nn.LayerNorm])),
    (
        "llama-diffprune-embed",
        "llama",
        ak.DiffPruning(beta=1.0, gamma=-1.5, zeta=1.5, targets=["embed", "attn.q"]),
    ),
    ("t5-diffprune", "t5", ak.DiffPruning(alpha_init=2.0, targets=["attn.q", "attn.v"])),
    ("vit-diffprune", "vit", ak.DiffPruning(targets=["attn.v", "ffn.up"])),
]
SECOND["diff_pruning"] = {"alpha_init": 1.0}
