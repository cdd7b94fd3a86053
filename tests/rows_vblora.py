"""Contract rows for VB-LoRA (``ak.VBLoRA``): one vector bank shared by every site (sizes differ per site), Linear and
GPT-2's Conv1D, top-k from 1 to 3.

VB-LoRA is not an identity at init by its nature (paper and peft: ``A`` and ``B`` are both mixtures of the same small
random bank; peft has no zero init), so the identity contract runs on the row whose bank starts at zero
(``init_vector_bank_bound=0``, how peft's own tests get an identity) and is skipped on the others; that row in turn
gets no gradient at all (a zero bank and zero factors), so it skips the gradient contract."""

from __future__ import annotations

import adapterkit as ak

ROWS = [
    ("bert-vblora", "bert", ak.VBLoRA(num_vectors=16, vector_length=8)),
    (
        "gpt2-vblora",
        "gpt2",
        ak.VBLoRA(r=3, num_vectors=12, vector_length=16, topk=3, targets=["attn.qkv", "ffn.up"]),  # Conv1D
    ),
    (
        "llama-vblora",
        "llama",
        ak.VBLoRA(
            r=2, num_vectors=32, vector_length=8, topk=1, targets=["attn.q", "attn.k", "attn.v", "ffn.down"]
        ),
    ),
    ("t5-vblora", "t5", ak.VBLoRA(num_vectors=16, vector_length=8, dropout=0.1)),
    ("vit-vblora", "vit", ak.VBLoRA(num_vectors=8, vector_length=16, targets=["attn.v", "ffn.up"])),
    (
        "llama-vblora-zero-bank",
        "llama",
        ak.VBLoRA(num_vectors=16, vector_length=16, init_vector_bank_bound=0.0, targets=["attn.q", "ffn.up"]),
    ),
]
SECOND = {"vblora": {"r": 2, "topk": 1}}
_NOT_IDENTITY = (
    "VB-LoRA is not an identity at init (Li et al. 2024; peft has no zero init): A and B are both mixtures of "
    "the same random bank; llama-vblora-zero-bank checks the identity with a zero bank"
)
SKIP = {(row_id, "identity"): _NOT_IDENTITY for row_id, _, _ in ROWS if not row_id.endswith("zero-bank")}
SKIP[("llama-vblora-zero-bank", "grads")] = (
    "a zero bank gives zero factors and zero gradients (why peft warns against init_vector_bank_bound=0)"
)
