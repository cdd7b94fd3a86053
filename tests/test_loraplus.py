"""LoRA+ optimizer groups (issue 18): equal to peft's ``create_loraplus_optimizer`` groups, parameter for parameter."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import adapterkit as ak

from conftest import make_model


def _peft_key(name: str) -> tuple[str, str]:
    """(module, tensor) of a peft parameter name."""
    rest = name.removeprefix("base_model.model.")
    m = re.fullmatch(r"(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.default(\.weight)?", rest)
    if m:
        return m.group(1), m.group(2).replace("embedding_", "")
    m = re.fullmatch(r"(.*)\.lora_magnitude_vector\.default(\.weight)?", rest)
    if m:
        return m.group(1), "magnitude"
    m = re.fullmatch(r"(.*)\.modules_to_save\.default\.(.*)", rest)
    assert m, name
    return m.group(1), "head." + m.group(2)


def _our_key(name: str) -> tuple[str, str]:
    site, tensor = re.fullmatch(r"(.*)\.ak_adapters\.a\.(.*)", name).groups()
    return site, tensor


def _names(model: torch.nn.Module, groups: list[dict], key) -> list[tuple[list, float, float]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [([key(by_id[id(p)]) for p in g["params"]], g["lr"], g["weight_decay"]) for g in groups]


@pytest.mark.parametrize(
    ("family", "ours", "theirs"),
    [
        ("bert", dict(targets=["attn.q", "attn.v", "embed"], heads=["classifier"]),
         dict(target_modules=["query", "value", "word_embeddings"], modules_to_save=["classifier"])),
        ("llama", dict(targets=["attn.q", "ffn.down"], dora=True), dict(target_modules=["q_proj", "down_proj"], use_dora=True)),
    ],
)  # fmt: skip
def test_groups_equal_peft(family, ours, theirs):
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(make_model(family), LoraConfig(r=4, **theirs))
    opt = create_loraplus_optimizer(
        pm,
        torch.optim.AdamW,
        lr=1e-3,
        loraplus_lr_ratio=16,
        loraplus_weight_decay=0.01,
        loraplus_lr_embedding=1e-5,
    )
    model = make_model(family)
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=4, **ours))
    adapters.train("a")
    groups = ak.loraplus_param_groups(adapters, lr=1e-3, ratio=16, weight_decay=0.01, lr_embedding=1e-5)
    expected = _names(pm, opt.param_groups, _peft_key)
    got = _names(model, groups, _our_key)
    assert got == expected
    assert got[2][0] and (family != "bert" or (got[1][0] and got[3][0]))  # B, embedding and no-decay groups used

    built = ak.loraplus_optimizer(
        adapters, torch.optim.AdamW, lr=1e-3, ratio=16, weight_decay=0.01, lr_embedding=1e-5
    )
    assert [g["lr"] for g in built.param_groups] == [g["lr"] for g in opt.param_groups]


def test_bad_values_are_refused():
    adapters = ak.attach(make_model("llama"))
    adapters.add("a", ak.LoRA())
    with pytest.raises(ValueError, match="ratio"):
        ak.loraplus_param_groups(adapters, lr=1e-3, ratio=0)
