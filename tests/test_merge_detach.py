"""merge_and_detach gives a plain model; profiles of the aliased families resolve roles."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.targeting import CONTAINER

from conftest import make_inputs, make_model, output_of


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_merge_and_detach_returns_plain_model(family: str) -> None:
    model = make_model(family)
    keys = set(model.state_dict())
    adapters = ak.attach(model)
    heads = ["head"] if family == "bert" else []
    adapters.add("a", ak.LoRA(targets="all-linear", init_weights=False, dora=family == "llama", heads=heads))
    adapters.add("b", ak.LoRA(r=2, targets="all-linear", init_weights=False))  # not merged: must vanish
    x = make_inputs(family)
    with torch.no_grad():
        expected = output_of(model, x)
        plain = adapters.merge_and_detach()
        got = output_of(plain, x)
    assert plain is model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert set(plain.state_dict()) == keys
    assert not any(hasattr(m, CONTAINER) or m._forward_hooks or m._forward_pre_hooks for m in plain.modules())
    assert ak.attach(plain).names == []


def _tiny(config_cls: str, model_cls: str, **kw):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw)).eval()


LLAMA_LIKE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)  # fmt: skip


@pytest.mark.parametrize(
    ("config_cls", "model_cls", "kw", "expected"),
    [
        ("MistralConfig", "MistralForCausalLM", LLAMA_LIKE, {"attn.q": "q_proj", "ffn.gate": "gate_proj"}),
        ("Qwen2Config", "Qwen2ForCausalLM", LLAMA_LIKE, {"attn.v": "v_proj", "ffn.down": "down_proj"}),
        (
            "DistilBertConfig",
            "DistilBertForSequenceClassification",
            dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64),
            {"attn.q": "q_lin", "ffn.up": "lin1", "ffn.down": "lin2", "attn.out": "out_lin"},
        ),
        (
            "RobertaConfig",
            "RobertaForSequenceClassification",
            dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
            {"attn.q": "query", "attn.v": "value", "ffn.down": "dense"},
        ),
    ],
)
def test_aliased_families_resolve_roles(config_cls, model_cls, kw, expected) -> None:
    model = _tiny(config_cls, model_cls, **kw)
    adapters = ak.attach(model)
    for role, leaf in expected.items():
        sites = adapters.plan(ak.LoRA(targets=[role])).sites
        assert len(sites) == 2 and all(s.endswith(leaf) for s in sites), (role, sites)
    adapters.add("a", ak.LoRA(init_weights=False))
    ids = torch.randint(1, 64, (2, 5))
    with torch.no_grad():
        out = model(input_ids=ids).logits
        with adapters.use(None):
            base = model(input_ids=ids).logits
    assert not torch.allclose(out, base)


def test_deepcopy_of_a_model_with_adapters_is_independent():
    """copy.deepcopy (peft users copy models before merging) gives a model with its own controller, equal outputs,
    and no shared adapter weights; a scheduled method's missing-step check follows the copied parameters."""
    import copy

    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("x", ak.LoRA(init_weights=False))
    adapters.add("y", ak.IA3(init_weights=False))
    adapters.add("d", ak.DyLoRA(r_max=4))
    adapters.activate("x")
    x = make_inputs("llama")
    with torch.no_grad():
        ref = output_of(model, x)
    twin = copy.deepcopy(model)
    other = ak.attach(twin)
    assert other is not adapters and other.model is twin and other.names == ["x", "y", "d"]
    with torch.no_grad():
        torch.testing.assert_close(output_of(twin, x), ref, rtol=0, atol=0)
        for p in other.parameters("x"):
            p.add_(1.0)
        assert not torch.equal(output_of(twin, x), ref)
        torch.testing.assert_close(output_of(model, x), ref, rtol=0, atol=0)
        with other.route(["x", "y"]):
            output_of(twin, x)
    other.train("d")
    opt = torch.optim.SGD(other.parameters("d"), lr=0.1)
    output_of(twin, x).sum().backward()
    opt.step()
    with pytest.raises(RuntimeError, match="step"):
        output_of(twin, x)
