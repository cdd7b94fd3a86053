"""Contract rows for LoReFT (``ak.LoReFT``): interventions on block outputs at prefix/suffix positions."""

from __future__ import annotations

import adapterkit as ak

ROWS: list[tuple[str, str, ak.AdapterConfig]] = [
    ("bert-loreft", "bert", ak.LoReFT()),
    ("gpt2-loreft-shared", "gpt2", ak.LoReFT(r=2, prefix=2, suffix=2, share_weights=True)),
    ("llama-loreft-layers", "llama", ak.LoReFT(prefix=3, suffix=2, layers=[1], dropout=0.1)),
    ("llama-loreft-suffix", "llama", ak.LoReFT(r=1, prefix=0, suffix=3, prompt_from_labels=True)),
    ("t5-loreft", "t5", ak.LoReFT()),  # encoder blocks (the default for encoder-decoder models)
    ("t5-loreft-both", "t5", ak.LoReFT(r=2, targets=["block"])),  # encoder and decoder blocks
    ("vit-loreft-cls", "vit", ak.LoReFT(prefix=1, suffix=0)),  # no attention mask: position 0 is CLS
]

SECOND: dict[str, dict] = {"loreft": {"r": 3}}
