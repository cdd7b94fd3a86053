"""Contract rows for the model-level methods: prompt tuning and prefix tuning / P-tuning v2."""

from __future__ import annotations

import adapterkit as ak

ROWS: list[tuple[str, str, ak.AdapterConfig]] = [
    # prompt tuning (Lester et al. 2021)
    ("bert-prompt", "bert", ak.PromptTuning(num_virtual_tokens=4)),
    ("gpt2-prompt-random", "gpt2", ak.PromptTuning(num_virtual_tokens=4, init="random")),
    ("llama-prompt-text", "llama", ak.PromptTuning(num_virtual_tokens=5, init="text", init_token_ids=[3, 4, 5])),
    ("t5-prompt", "t5", ak.PromptTuning(num_virtual_tokens=4)),
    ("bert-prompt-heads", "bert", ak.PromptTuning(num_virtual_tokens=3, heads=["head"])),
    # prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022)
    ("bert-prefix", "bert", ak.PrefixTuning(num_virtual_tokens=4)),
    ("gpt2-prefix", "gpt2", ak.PrefixTuning(num_virtual_tokens=4)),
    ("llama-prefix-gqa", "llama", ak.PrefixTuning(num_virtual_tokens=4)),
    ("t5-prefix", "t5", ak.PrefixTuning(num_virtual_tokens=4)),
    ("llama-prefix-projection", "llama", ak.PrefixTuning(num_virtual_tokens=4, prefix_projection=True)),
    # flat encoder-decoder configs (decoder sizes in decoder_* fields; read from the model)
    ("bart-prefix", "bart", ak.PrefixTuning(num_virtual_tokens=4)),
    ("mbart-prefix", "mbart", ak.PrefixTuning(num_virtual_tokens=4)),
    ("whisper-prefix", "whisper", ak.PrefixTuning(num_virtual_tokens=4)),
    ("bert-ptuning-v2-heads", "bert", ak.get_config("ptuning_v2", num_virtual_tokens=3, heads=("head",))),
]

SECOND: dict[str, dict] = {
    "prompt_tuning": {"num_virtual_tokens": 2},
    "prefix_tuning": {"num_virtual_tokens": 2},
}

_NOT_IDENTITY = "virtual tokens always change the output: no prompt or prefix is an identity at init"
SKIP: dict[tuple[str, str], str] = {(row_id, "identity"): _NOT_IDENTITY for row_id, _, _ in ROWS}
SKIP[("llama-prefix-projection", "save")] = (
    "saving folds the MLP reparametrization into the plain prefix (Li & Liang §4.3), so the loaded component "
    "holds `prefix` instead of the MLP; outputs are checked equal in test_prompt_prefix.py"
)
