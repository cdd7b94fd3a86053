"""Unions of configs: planning, Chain at shared modules, UniPELT gates, JSON round trip, errors."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.component import Chain
from adapterkit.config import config_from_dict
from adapterkit.methods.union import Gate

from conftest import make_inputs, make_model, output_of


def test_union_chains_members_at_shared_modules_and_sums_lora():
    model = make_model("llama")
    adapters = ak.attach(model)
    x = make_inputs("llama")
    u = ak.Union(ak.LoRA(targets=["attn.q"]), ak.LoRA(r=2, targets=["attn.q", "ffn.down"]), init_weights=False)
    torch.manual_seed(0)
    adapters.add("u", u)
    comps = adapters.components("u")
    assert isinstance(comps["model.layers.0.self_attn.q_proj"], Chain)
    assert not isinstance(comps["model.layers.0.mlp.down_proj"], Chain)
    with torch.no_grad():
        union_out = output_of(model, x)
    # the same members as two separate adapters, active together, give the same output
    other = make_model("llama")
    oa = ak.attach(other)
    torch.manual_seed(0)
    oa.add("m0", u.configs[0])
    oa.add("m1", u.configs[1])
    for site, comp in comps.items():
        parts = list(comp.parts) if isinstance(comp, Chain) else [comp]
        members = [n for n in ("m0", "m1") if site in oa.sites(n)]
        for part, n in zip(parts, members, strict=True):
            oa.components(n)[site].load_state_dict(part.state_dict())
    oa.activate("m0", "m1")
    with torch.no_grad():
        torch.testing.assert_close(output_of(other, x), union_out, atol=1e-6, rtol=1e-5)


def test_gate_equation():
    model = make_model("bert")
    adapters = ak.attach(model)
    adapters.add(
        "u",
        ak.Union(ak.LoRA(targets=["attn.q"]), ak.LoRA(r=2, targets=["attn.v"]), gated=True, init_weights=False),
    )
    site = "bert.encoder.layer.0.attention.self.query"
    gate = adapters.components("u")[site]
    assert isinstance(gate, Gate)
    module = dict(model.named_modules())[site]
    x = torch.randn(2, 5, module.in_features)
    with torch.no_grad():
        y = module(x)  # the hook applies the gated LoRA
        base = torch.nn.functional.linear(x, module.weight, module.bias)
        lora = gate.inner
        delta = (x @ lora.lora_A.T @ lora.lora_B.T) * lora.scaling
        g = torch.sigmoid(x @ gate.gate.weight.T + gate.gate.bias)
    torch.testing.assert_close(y, base + g * delta, atol=1e-6, rtol=1e-5)


def test_union_config_round_trips_through_json():
    u = ak.Union(ak.LoRA(r=4, targets=["attn.q"]), "lora", gated=True)
    data = u.to_dict()
    assert data["method"] == "union" and data["configs"][0]["method"] == "lora"
    back = config_from_dict(data)
    assert back == u
    assert back.replace(init_weights=False).configs[0].init_weights is False


def test_union_errors():
    with pytest.raises(ValueError, match="at least two"):
        ak.Union(ak.LoRA())
    with pytest.raises(ValueError, match="members cannot themselves be unions"):
        ak.Union(ak.LoRA(), ak.Union(ak.LoRA(), ak.LoRA()))
    with pytest.raises(ValueError, match="on the Union's members"):
        ak.Union(ak.LoRA(), ak.LoRA(), targets=["attn.q"])
    with pytest.raises(ValueError, match="set heads on the Union"):
        ak.Union(ak.LoRA(heads=["head"]), ak.LoRA())
    with pytest.raises(ValueError, match="unknown method"):
        ak.Union(ak.LoRA(), "nope")
    model = make_model("llama")
    adapters = ak.attach(model)
    with pytest.raises(ak.TargetError):
        adapters.add("u", ak.Union(ak.LoRA(), ak.LoRA(targets=["nothing_here"])))
    assert adapters.names == []


@pytest.mark.parametrize(("family", "preset"), [("llama", "mam"), ("llama", "unipelt"), ("bert", "unipelt")])
def test_presets_train_and_round_trip(family, preset, tmp_path):
    model = make_model(family)
    adapters = ak.attach(model)
    x = make_inputs(family)
    torch.manual_seed(0)
    adapters.add("p", preset, init_weights=False)
    adapters.train("p")
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in adapters.parameters("p")}
    output_of(model, x).float().pow(2).mean().backward()
    assert all(p.grad is not None for p in adapters.parameters("p"))
    model.eval()
    with torch.no_grad():
        expected = output_of(model, x)
    adapters.save("p", tmp_path / "p")
    fresh = make_model(family)
    fa = ak.attach(fresh)
    fa.load(tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, x), expected, atol=1e-5, rtol=1e-5)


def test_union_heads():
    model = make_model("bert")
    adapters = ak.attach(model)
    adapters.add("u", ak.Union(ak.LoRA(), ak.LoRA(r=2, targets=["ffn.down"]), heads=["head"]))
    assert "head" in adapters.sites("u").values()


def test_gated_union_does_not_gate_head_copies():
    """A head copy replaces the module's output (a fresh classifier), so a UniPELT gate around it would
    blend in the old head; only the members' effects are gated."""
    model = make_model("bert")
    adapters = ak.attach(model)
    adapters.add("u", ak.Union(ak.LoRA(), ak.LoRA(r=2, targets=["ffn.down"]), gated=True, heads=["head"]))
    names = [n for n, _ in model.named_parameters() if ".ak_adapters.u." in n]
    assert any(".gate." in n for n in names)
    head_site = next(s for s, role in adapters.sites("u").items() if role == "head")
    at_head = [n for n in names if n.startswith(f"{head_site}.ak_adapters.u.")]
    assert at_head and not any(".gate." in n or ".inner." in n for n in at_head), at_head


@pytest.mark.parametrize("zero_at", ["model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"])
def test_refused_union_merge_changes_nothing(zero_at):
    # Union(LoRA, (IA)^3) with a zero in one (IA)^3 vector: at a shared module (a Chain whose LoRA part would
    # merge first) or at the last site (every other site would merge first). The merge is all-or-nothing.
    model, x = make_model("llama"), make_inputs("llama")
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("u", ak.Union(ak.LoRA(targets=["attn.q", "attn.v"]), ak.IA3(), init_weights=False))
    comps = adapters.components("u")
    assert isinstance(comps["model.layers.1.self_attn.v_proj"], Chain)
    comp = comps[zero_at]
    ia3 = comp.parts[1] if isinstance(comp, Chain) else comp
    with torch.no_grad():
        ia3.scale[3] = 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = output_of(model, x)
    with pytest.raises(ValueError, match=f"adapter 'u' cannot be merged at '{zero_at}'.*zeros"):
        adapters.merge("u")
    assert not adapters.is_merged("u")
    for c in comps.values():
        assert not c.merged and all(not p.merged for p in getattr(c, "parts", []))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(output_of(model, x), out)
    # once the vector is fixed the same adapter merges, and unmerges, normally
    with torch.no_grad():
        ia3.scale[3] = 1.0
        out = output_of(model, x)
    adapters.merge("u")
    assert adapters.is_merged("u")
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, x), out, atol=1e-5, rtol=1e-5)
    adapters.unmerge("u")
    assert not adapters.is_merged("u")


def test_chain_merge_failing_part_unmerges_the_others():
    # a failure after the checks (not a refusal) still leaves no part merged
    model = make_model("llama")
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("u", ak.Union(ak.LoRA(targets=["attn.v"]), ak.IA3(targets=["attn.v"]), init_weights=False))
    site = "model.layers.0.self_attn.v_proj"
    chain = adapters.components("u")[site]
    lora, ia3 = chain.parts
    before = model.state_dict()[site + ".weight"].clone()

    def boom(module):
        raise RuntimeError("boom")

    ia3.merge = boom
    with pytest.raises(RuntimeError, match="boom"):
        adapters.merge("u")
    assert not chain.merged and not lora.merged and not adapters.is_merged("u")
    torch.testing.assert_close(model.state_dict()[site + ".weight"], before, atol=1e-6, rtol=1e-5)
