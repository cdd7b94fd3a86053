"""``benchmarks/multitask.py``'s option plumbing (``--targets``, ``--lr-router``) on a tiny random BERT."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from transformers import BertConfig, BertModel

import adapterkit as ak

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import multitask as mt  # noqa: E402


def _bert() -> BertModel:
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=50
    )
    return BertModel(cfg)


def test_targets_option() -> None:
    assert mt.parse_targets("attn.q, attn.v") == ["attn.q", "attn.v"]
    assert mt.parse_targets("all-linear") == "all-linear"
    with pytest.raises(SystemExit, match="--targets is empty"):
        mt.parse_targets(" , ")
    adapters = ak.attach(_bert())
    adapters.add("a", mt.make_config("lora", 4, mt.parse_targets("all-linear")))
    assert len(adapters.sites("a")) == 2 * 6 + 1  # q, k, v, attention output, FFN up and down per layer; pooler
    roles = "attn.q,attn.k,attn.v,attn.out,ffn.up,ffn.down"
    adapters.add("r", mt.make_config("mhr", 4, mt.parse_targets(roles)))
    assert len(adapters.sites("r")) == 2 * 6 and not any("pooler" in s for s in adapters.sites("r"))


@pytest.mark.parametrize("method", ["mhr", "molora"])
def test_router_rate_splits_the_routing_parameters(method: str) -> None:
    adapters = ak.attach(_bert())
    adapters.add(method, mt.make_config(method, 4, ["attn.q", "attn.v"]))
    params = {id(p) for p in adapters.parameters(method)}
    (one,) = mt.adapter_groups(adapters, method, 2e-3, None)
    assert {id(p) for p in one["params"]} == params and len(one["params"]) == len(params)
    rest, routing = mt.adapter_groups(adapters, method, 2e-3, 0.1)
    assert (rest["lr"], routing["lr"]) == (2e-3, 0.1)
    assert {id(p) for p in rest["params"]} | {id(p) for p in routing["params"]} == params
    assert not {id(p) for p in rest["params"]} & {id(p) for p in routing["params"]}
    names = {n for c in adapters.components(method).values() for n, p in c.named_parameters()
             if any(p is q for q in routing["params"])}  # fmt: skip
    assert names == ({"poly_router.module_logits"} if method == "mhr" else {"router.weight"})
