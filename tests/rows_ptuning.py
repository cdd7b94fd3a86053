"""Contract rows for P-tuning (``ak.PTuning``, Liu et al. 2021): a prompt encoder (MLP or LSTM) over a table."""

from __future__ import annotations

import adapterkit as ak

ROWS: list[tuple[str, str, ak.AdapterConfig]] = [
    ("bert-ptuning-mlp", "bert", ak.PTuning(num_virtual_tokens=4, encoder_hidden_size=16)),
    ("gpt2-ptuning-lstm", "gpt2", ak.PTuning(num_virtual_tokens=3, encoder_reparameterization_type="LSTM")),
    (
        "llama-ptuning-mlp-deep",
        "llama",
        ak.PTuning(num_virtual_tokens=4, encoder_hidden_size=8, encoder_num_layers=3, encoder_dropout=0.1),
    ),
    (
        "t5-ptuning-lstm-2sub",
        "t5",
        ak.PTuning(num_virtual_tokens=3, encoder_reparameterization_type="lstm", num_transformer_submodules=2),
    ),
    ("bert-ptuning-heads", "bert", ak.PTuning(num_virtual_tokens=3, heads=["head"])),
    # what loading peft's files gives: the encoder's output held as a plain parameter
    ("gpt2-ptuning-stored", "gpt2", ak.PTuning(num_virtual_tokens=3, stored_prompt=True)),
]

SECOND: dict[str, dict] = {"p_tuning": {"num_virtual_tokens": 2}}

SKIP: dict[tuple[str, str], str] = {
    (row_id, "identity"): "virtual tokens always change the output: no prompt is an identity at init"
    for row_id, _, _ in ROWS
}
