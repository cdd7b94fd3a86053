"""Contract rows for LoRA on parameters (``LoRA(target_parameters=...)``, ``methods/lora_params.py``): MoE experts
stored as 3-D tensors and routers, on tiny Mixtral and Qwen2-MoE models.

The two families are registered in ``conftest.MODEL_FACTORIES`` here (the contract matrix builds rows' models
through ``make_model``); the builders live in ``tests/test_moe_experts.py``'s sibling :func:`tiny_mixtral` /
:func:`tiny_qwen2_moe` below. Per-row routing of a mixed batch is refused (``NotImplementedError``): the contract
skips it with that message.
"""

from __future__ import annotations

import torch

import adapterkit as ak

from conftest import MODEL_FACTORIES


def tiny_mixtral() -> torch.nn.Module:
    """Mixtral with 4 experts (top-2), experts ``gate_up_proj (4, 96, 32)``, ``down_proj (4, 32, 48)``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    return MixtralForCausalLM(cfg)


def tiny_qwen2_moe() -> torch.nn.Module:
    """Qwen2-MoE with 4 experts (top-2) plus its shared expert and shared-expert gate (``nn.Linear``)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                         shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    return Qwen2MoeForCausalLM(cfg)


MODEL_FACTORIES.setdefault("mixtral", tiny_mixtral)
MODEL_FACTORIES.setdefault("qwen2_moe", tiny_qwen2_moe)

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]

ROWS = [
    # experts only (as peft, no module target when only target_parameters is given)
    ("mixtral-experts", "mixtral", ak.LoRA(r=2, target_parameters=EXPERTS)),
    # experts + router + attention modules, rsLoRA, a per-parameter rank
    (
        "mixtral-experts-router-attn",
        "mixtral",
        ak.LoRA(
            r=4,
            alpha=8,
            rslora=True,
            targets=["q_proj", "v_proj"],
            target_parameters=[*EXPERTS, "mlp.gate.weight"],
            rank_pattern={"down_proj": 2},
        ),
    ),
    # module targets that are expert stacks and routers (no nn.Linear): LoRA on their parameters
    ("qwen2moe-experts-modules", "qwen2_moe", ak.LoRA(r=2, alpha=4, targets=["experts", "gate"])),
    # parameters beside linear targets, restricted to one layer
    (
        "qwen2moe-params-layer1",
        "qwen2_moe",
        ak.LoRA(r=2, targets=["o_proj", "q_proj"], target_parameters=EXPERTS, layers=[1]),
    ),
]
