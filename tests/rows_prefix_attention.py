"""Contract rows for prefix tuning inside each attention module (``PrefixTuning(inject="attention")``, AdapterHub's
placement; issue 16): encoder-decoder models (all three attention kinds), ViT, a subset of layers, gates
(DistilBERT: tests/test_adapterhub_prefix_encdec.py)."""

from __future__ import annotations

import adapterkit as ak


def _attn(**kw: object) -> ak.PrefixTuning:
    return ak.PrefixTuning(num_virtual_tokens=3, positions="keep", inject="attention", **kw)


ROWS: list[tuple[str, str, ak.AdapterConfig]] = [
    ("t5-prefix-attn-gated", "t5", _attn(gated=True)),
    ("bart-prefix-attn-encoder-cross", "bart", _attn(locations=("self", "cross"))),
    ("vit-prefix-attn", "vit", _attn(gate_outputs=2, gated=True)),
    ("bert-prefix-attn-layer-1", "bert", _attn(layers=[1])),
]

SKIP: dict[tuple[str, str], str] = {
    (row_id, "identity"): "virtual tokens always change the output: no prompt or prefix is an identity at init"
    for row_id, _, _ in ROWS
}
