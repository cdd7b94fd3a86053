"""Contract rows for unions (``ak.Union``): members sharing modules (a Chain) and UniPELT gates.

MAM and UniPELT presets (prefix + bottleneck members) included."""

from __future__ import annotations

import adapterkit as ak

_MAM = ak.get_config("mam")
_UNIPELT = ak.get_config("unipelt")
_PREFIX = "a prefix changes attention from the start (no identity at init), as prefix tuning's own rows"

ROWS = [
    (
        "llama-union-lora-lora",
        "llama",
        ak.Union(ak.LoRA(targets=["attn.q"]), ak.LoRA(r=2, targets=["attn.q", "ffn.down"])),
    ),
    (
        "bert-union-gated",
        "bert",
        ak.Union(ak.LoRA(targets=["attn.q", "attn.v"]), ak.LoRA(r=2, targets=["attn.v", "ffn.up"]), gated=True),
    ),
    (
        "gpt2-union",
        "gpt2",
        ak.Union(ak.LoRA(targets=["attn.qkv"]), ak.LoRA(r=2, targets=["ffn.down"], bias="all")),
    ),
    ("t5-union-gated", "t5", ak.Union(ak.LoRA(), ak.LoRA(r=2, targets=["ffn.down"]), gated=True)),
    ("vit-union", "vit", ak.Union(ak.LoRA(), ak.LoRA(r=2, targets=["embed"]))),
]

ROWS += [
    ("llama-mam", "llama", _MAM),
    # tiny BERT has 64 positions: two 30-token prefixes + 7 tokens would not fit
    ("bert-mam", "bert", _MAM.replace(configs=(_MAM.configs[0].replace(num_virtual_tokens=8), _MAM.configs[1]))),
    # no MLP reparametrization: the saved tensors are the component's own (save contract applies)
    (
        "gpt2-mam-flat",
        "gpt2",
        _MAM.replace(
            configs=(_MAM.configs[0].replace(prefix_projection=False, num_virtual_tokens=8), _MAM.configs[1])
        ),
    ),
    (
        "gpt2-unipelt",
        "gpt2",
        _UNIPELT.replace(configs=(ak.LoRA(r=8, targets=["attn.qkv"]), *_UNIPELT.configs[1:])),
    ),
    ("llama-unipelt", "llama", _UNIPELT),
    ("t5-mam", "t5", _MAM),
]
_FOLDED = "the prefix MLP is folded away at save (outputs round-trip: tests/test_union.py)"
_PRESET_ROWS = ("llama-mam", "bert-mam", "gpt2-unipelt", "llama-unipelt", "t5-mam")
SKIP = {(row, "identity"): _PREFIX for row in (*_PRESET_ROWS, "gpt2-mam-flat")}
SKIP.update({(row, "save"): _FOLDED for row in _PRESET_ROWS})
