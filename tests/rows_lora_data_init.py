"""Contract rows for the data-aware LoRA inits (``ak.LoRA(init="eva"|"corda")``, ``methods/lora_data_init.py``).

These adapters refuse to run until ``adapters.calibrate`` set their factors, so :func:`AFTER_ADD` calibrates every
EVA/CorDA adapter the contract harness adds, on a few batches of the row family's inputs (EVA: cycled until its
components converge, as peft cycles its dataloader). ``init_weights=False`` makes EVA's ``B`` random after
calibration (not an identity); CorDA, like PiSSA, starts from the weight's factors and moves them out of the base
(the harness treats it as a weight-splitting init: identity up to rounding, a second adapter on the same modules
is a default-init LoRA).
"""

from __future__ import annotations

import itertools

import torch

import adapterkit as ak

from conftest import make_inputs

EVA = {"tau": 0.9}  # tiny random models: converges within a few batches

ROWS = [
    (
        "llama-eva",
        "llama",
        ak.LoRA(init="eva", r=4, eva=EVA, targets=["attn.q", "attn.v", "ffn.down"]),
    ),  # q, v share
    ("gpt2-eva", "gpt2", ak.LoRA(init="eva", r=2, alpha=4, eva={**EVA, "rho": 3.0})),  # Conv1D, ranks move
    ("bert-eva-whiten", "bert", ak.LoRA(init="eva", r=2, eva={**EVA, "whiten": True}, bias="lora_only")),
    ("vit-eva", "vit", ak.LoRA(init="eva", r=2, eva=EVA, targets=["attn.q", "attn.v", "ffn.up"])),  # pixel inputs
    ("llama-corda-ipm", "llama", ak.LoRA(init="corda", r=4, targets=["attn.q", "attn.v", "ffn.down"])),
    ("gpt2-corda", "gpt2", ak.LoRA(init="corda", r=2, targets=["attn.qkv", "ffn.down"])),  # Conv1D
    ("t5-corda-rslora", "t5", ak.LoRA(init="corda", r=2, rslora=True)),
]


def AFTER_ADD(adapters: ak.Adapters, name: str, config: ak.AdapterConfig, family: str) -> None:  # noqa: N802
    """Calibrate EVA/CorDA adapters (others are left alone): CorDA on 4 batches; EVA on the 4 batches cycled until
    its components converged (at most 40 calls; the calls after convergence that peft would not make are not run)."""
    init = getattr(getattr(config, "init", None), "value", None)
    if init not in ("eva", "corda"):
        return
    batches = [make_inputs(family, seed=50 + i) for i in range(4)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: EVA's incremental PCA is many small ops, faster on one thread
    try:
        if init == "corda":
            adapters.calibrate(name, batches)
            return
        state = next(iter(adapters.components(name).values()))._eva  # the adapter's shared EVA state

        def until_converged():
            for batch in itertools.islice(itertools.cycle(batches), 40):
                if state.done:
                    return
                yield batch

        adapters.calibrate(name, until_converged())
    finally:
        torch.set_num_threads(threads)
