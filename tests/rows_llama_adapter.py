"""Contract rows for LLaMA-Adapter (``ak.LlamaAdapter``): gated adaption prompts in the top attention layers.

Rows cover the per-layer gate (peft's) and the per-head gate, grouped-query attention with rotary embeddings
(LLaMA), a fused q/k/v projection (GPT-2's ``c_attn``; with and without the output projection, the latter peft's
GPT-2 path), an attention module that returns its heads before the output
projection (BERT's ``attention.self``) and a vision encoder (ViT). Not mergeable: contract (b) checks that ``merge``
raises TypeError and leaves the model unchanged.
"""

from __future__ import annotations

import adapterkit as ak

ROWS = [
    ("llama-llama-adapter", "llama", ak.LlamaAdapter(adapter_len=4, adapter_layers=1)),
    ("llama-llama-adapter-head-gate", "llama", ak.LlamaAdapter(adapter_len=3, gate="head")),
    ("gpt2-llama-adapter", "gpt2", ak.LlamaAdapter(adapter_len=3)),
    (
        "gpt2-llama-adapter-unprojected",
        "gpt2",
        ak.LlamaAdapter(adapter_len=3, project_output=False),
    ),  # peft's GPT-2
    ("bert-llama-adapter", "bert", ak.LlamaAdapter(adapter_len=3, adapter_layers=1)),
    ("vit-llama-adapter", "vit", ak.LlamaAdapter(adapter_len=2)),
]
SECOND = {"llama_adapter": {"adapter_len": 2}}
