"""Contract rows for invertible adapters after a non-embedding module (``Invertible(dim=...)``): AdapterHub's sites
for SeqBnInv, BERT's ``embeddings`` module and GPT-2's ``drop`` (after ``wte + wpe``). The rows on the ``embed``
role are in rows_bottleneck.py."""

from __future__ import annotations

import adapterkit as ak

ROWS: list[tuple[str, str, ak.AdapterConfig]] = [
    ("bert-invertible-after-embeddings", "bert", ak.Invertible(dim=32, targets=["bert.embeddings"])),
    (
        "gpt2-invertible-after-drop",
        "gpt2",
        ak.Invertible(dim=32, targets=["transformer.drop"], inverse_at_output=False),
    ),
]
