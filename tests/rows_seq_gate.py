"""Contract rows for AdapterHub's gates (UniPELT, issue 16): ``SequenceGated`` LoRA/bottleneck, and prefix tuning
with ``positions="keep"`` and ``gated=True``."""

from __future__ import annotations

import adapterkit as ak

ROWS: list[tuple[str, str, ak.AdapterConfig]] = [
    ("bert-seqgate-lora", "bert", ak.SequenceGated(config=ak.LoRA(r=4))),
    ("gpt2-seqgate-lora-fused", "gpt2", ak.SequenceGated(config=ak.LoRA(r=2), fused_qkv="qkv")),
    ("llama-seqgate-seq-bn", "llama", ak.SequenceGated(config=ak.Bottleneck(placement="pfeiffer"))),
    ("bert-seqgate-par-bn", "bert", ak.SequenceGated(config="par_bn")),
    ("gpt2-prefix-keep", "gpt2", ak.PrefixTuning(num_virtual_tokens=3, positions="keep")),
    ("llama-prefix-keep-gated", "llama", ak.PrefixTuning(num_virtual_tokens=3, positions="keep", gated=True)),
    ("bert-prefix-gated-2", "bert", ak.PrefixTuning(num_virtual_tokens=3, gated=True, gate_outputs=2)),
]

_NOT_IDENTITY = "virtual tokens always change the output: no prompt or prefix is an identity at init"
SKIP: dict[tuple[str, str], str] = {
    (row_id, "identity"): _NOT_IDENTITY for row_id, _, cfg in ROWS if isinstance(cfg, ak.PrefixTuning)
}
