"""Contract rows for AdapterHub-style prompt tuning: ``EmbeddingPrompt`` (the prompt after the embeddings module)."""

from __future__ import annotations

import adapterkit as ak

ROWS: list[tuple[str, str, ak.AdapterConfig]] = [
    ("bert-embedding-prompt", "bert", ak.EmbeddingPrompt(num_virtual_tokens=3)),
    ("bert-embedding-prompt-text", "bert", ak.EmbeddingPrompt(num_virtual_tokens=4, init_token_ids=[5, 6, 7])),
]

SECOND: dict[str, dict] = {"embedding_prompt": {"num_virtual_tokens": 2}}

SKIP: dict[tuple[str, str], str] = {
    (row_id, "identity"): "virtual tokens always change the output: no prompt is an identity at init"
    for row_id, _, _ in ROWS
}
