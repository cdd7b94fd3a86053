"""Composition blocks (Stack, Average, Split, BatchSplit, Parallel, Fuse) and batched per-row routing."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.methods.lora import LoRALinear

from conftest import make_inputs, make_model, output_of

FAMILIES = ["bert", "gpt2", "llama"]


def setup(family: str, batch: int = 4):
    model = make_model(family)
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", ak.LoRA(r=4, targets="all-linear", init_weights=False))
    adapters.add("b", ak.LoRA(r=2, alpha=5, targets="all-linear", init_weights=False))
    adapters.add("c", ak.LoRA(r=8, targets=["attn.v"] if family != "gpt2" else ["attn.qkv"], init_weights=False))
    return model, adapters, make_inputs(family, batch=batch)


@torch.no_grad()
def run(model, adapters, inputs, *items):
    with adapters.use(*items):
        return output_of(model, inputs).clone()


# --- blocks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_stack_average_identities(family):
    model, adapters, x = setup(family)
    out_a, out_b, base = run(model, adapters, x, "a"), run(model, adapters, x, "b"), run(model, adapters, x)
    assert torch.equal(run(model, adapters, x, ak.Stack("a")), out_a)
    torch.testing.assert_close(run(model, adapters, x, ak.Average("a", "b", weights=[1, 0])), out_a)
    torch.testing.assert_close(run(model, adapters, x, ak.Average("a", "b", weights=[0, 1])), out_b)
    torch.testing.assert_close(run(model, adapters, x, ak.Average("a", "a")), out_a, atol=1e-6, rtol=1e-5)
    # LoRA is additive: Stack(a, b) == activate("a", "b"), and Average(a, -a) cancels a's delta
    torch.testing.assert_close(run(model, adapters, x, ak.Stack("a", "b")), run(model, adapters, x, "a", "b"))
    torch.testing.assert_close(
        run(model, adapters, x, ak.Average("a", "a", weights=[1.0, -1.0])), base, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_batchsplit_and_parallel_equal_separate_runs(family):
    model, adapters, x = setup(family, batch=4)
    out_a, out_b = run(model, adapters, x, "a"), run(model, adapters, x, "b")
    split = run(model, adapters, x, ak.BatchSplit("a", "b", batch_sizes=[1, 3]))
    torch.testing.assert_close(split, torch.cat([out_a[:1], out_b[1:]]), atol=1e-5, rtol=1e-5)
    par = run(model, adapters, x, ak.Parallel("a", ak.Stack("b", "c")))
    assert par.shape[0] == 8
    torch.testing.assert_close(par[:4], out_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(par[4:], run(model, adapters, x, "b", "c"), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not sum"):
        run(model, adapters, x, ak.BatchSplit("a", "b", batch_sizes=[1, 1]))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_split_by_position_in_causal_models(family):
    model, adapters, x = setup(family)
    out_a = run(model, adapters, x, "a")
    mixed = run(model, adapters, x, ak.Split("a", "b", splits=[3]))
    # a causal model's first 3 positions only see positions processed by adapter a
    torch.testing.assert_close(mixed[:, :3], out_a[:, :3], atol=1e-5, rtol=1e-5)
    assert (mixed[:, 3:] - out_a[:, 3:]).abs().max() > 1e-3
    torch.testing.assert_close(run(model, adapters, x, ak.Split("a", "a", splits=[2])), out_a)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_parallel_generate_equals_separate_generate(family):
    model, adapters, x = setup(family, batch=2)
    kw = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        with adapters.use(ak.Parallel("a", "b")):
            together = model.generate(**x, **kw)
        with adapters.use("a"):
            ga = model.generate(**x, **kw)
        with adapters.use("b"):
            gb = model.generate(**x, **kw)
    assert torch.equal(together, torch.cat([ga, gb]))
    assert "generate" not in model.__dict__  # the replicating wrapper is gone after the block
    adapters.activate(ak.Parallel("a", "b"))
    assert "generate" in model.__dict__
    adapters.detach()
    assert "generate" not in model.__dict__ and not model._forward_pre_hooks


def test_invalid_nestings_and_names_raise():
    model, adapters, x = setup("llama")
    before = adapters.active
    with pytest.raises(ValueError, match="Parallel cannot be nested in Stack"):
        adapters.activate(ak.Stack("a", ak.Parallel("a", "b")))
    with pytest.raises(ValueError, match="cannot be nested in Fuse"):
        adapters.activate(ak.Fuse("a", ak.Average("a", "b")))
    with pytest.raises(KeyError, match="nope"):
        adapters.activate(ak.Stack("a", "nope"))
    with pytest.raises(ValueError, match="weights"):
        ak.Average("a", "b", weights=[1.0])
    with pytest.raises(ValueError, match="split positions"):
        ak.Split("a", "b", splits=[])
    assert adapters.active == before


def test_composition_with_gradient_checkpointing_and_compile():
    model, adapters, x = setup("llama")
    block = ak.Average("a", ak.Stack("b", "c"), weights=[0.3, 0.7])
    expected = run(model, adapters, x, block)
    adapters.activate(block)
    model.gradient_checkpointing_enable()
    model.train()
    for p in adapters.parameters():
        p.requires_grad_(True)
    loss = output_of(model, x).float().pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in adapters.parameters("a"))
    model.gradient_checkpointing_disable()
    model.eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        torch.testing.assert_close(output_of(compiled, x), expected, atol=1e-5, rtol=1e-5)


# --- AdapterFusion ----------------------------------------------------------------------------------
def test_fusion_trains_and_round_trips(tmp_path):
    model, adapters, x = setup("bert")
    name = adapters.add_fusion(["a", "b"])
    assert name == ak.Fuse("a", "b").name
    assert adapters.active == ("a",)  # adding a fusion does not activate it
    adapters.train_fusion(["a", "b"])
    assert adapters.active == (ak.Fuse("a", "b"),)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapters.parameters(name)}
    labels = torch.tensor([0, 1, 2, 1])
    opt = torch.optim.Adam(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(output_of(model, x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    model.eval()
    expected = run(model, adapters, x, ak.Fuse("a", "b"))

    adapters.save(name, tmp_path / "fusion")
    for n in ("a", "b"):
        adapters.save(n, tmp_path / n)
    fresh = make_model("bert")
    fa = ak.attach(fresh)
    fa.load(tmp_path / "a")
    fa.load(tmp_path / "b")
    assert fa.load(tmp_path / "fusion") == name
    torch.testing.assert_close(run(fresh, fa, x, ak.Fuse("a", "b")), expected)


def test_fuse_without_fusion_weights_raises():
    model, adapters, x = setup("bert")
    with pytest.raises(KeyError, match="add_fusion"):
        run(model, adapters, x, ak.Fuse("a", "b"))


# --- batched per-row routing ------------------------------------------------------------------------
def singles(model, adapters, inputs, rows):
    outs = []
    with torch.no_grad():
        for i, name in enumerate(rows):
            with adapters.use(name):
                outs.append(output_of(model, {k: v[i : i + 1] for k, v in inputs.items()}))
    return torch.cat(outs)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
@pytest.mark.parametrize(
    "rows", [["a", None, "b", "c", "a", "b", "a"], ["a", "b", "c"], ["b", "b"], [None, None, "c"]]
)
def test_batched_routing_equals_per_row_runs(family, rows, monkeypatch):
    model, adapters, x = setup(family, batch=len(rows))
    calls = []
    original = LoRALinear.routed.__func__

    def spy(cls, comps, plan, xx, y, key):
        out = original(cls, comps, plan, xx, y, key)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(LoRALinear, "routed", classmethod(spy))
    with torch.no_grad(), adapters.route(rows):
        mixed = output_of(model, x)
    if len(set(rows)) > 1:
        assert calls and all(calls)  # every LoRA site ran batched
    else:
        assert not calls  # one adapter on every row: the ordinary, unrouted path
    torch.testing.assert_close(mixed, singles(model, adapters, x, rows), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [["a", "b", "c"], ["a", "a", "b", "b"], ["b", "a", None]])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decode_shape_routing_equals_per_row_runs(family, rows):
    """One token per row (shorter than the ranks): rows gathered per adapter, or, when already grouped in
    order, the product accumulated into the base output in place."""
    model, adapters, _ = setup(family)
    x = make_inputs(family, batch=len(rows), seq=1)
    with torch.no_grad(), adapters.route(rows):
        mixed = output_of(model, x)
    torch.testing.assert_close(mixed, singles(model, adapters, x, rows), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_routed_generate_equals_per_row_generate(family):
    model, adapters, x = setup(family, batch=4)
    rows = ["a", None, "c", "b"]
    kw = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        with adapters.route(rows):
            mixed = model.generate(**x, **kw)
        per_row = []
        for i, n in enumerate(rows):
            with adapters.use(n):
                per_row.append(model.generate(**{k: v[i : i + 1] for k, v in x.items()}, **kw))
    assert torch.equal(mixed, torch.cat(per_row))


def test_routed_training_gradients_match_per_row():
    model, adapters, x = setup("llama", batch=3)
    rows = ["a", "b", "a"]
    with adapters.route(rows):
        output_of(model, x).pow(2).sum().backward()
    routed = {id(p): p.grad.clone() for p in adapters.parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for p in adapters.parameters():
        p.grad = None
    for i, n in enumerate(rows):
        with adapters.use(n):
            output_of(model, {k: v[i : i + 1] for k, v in x.items()}).pow(2).sum().backward()
    for p in adapters.parameters():
        if p.grad is None:
            assert id(p) not in routed
        else:
            torch.testing.assert_close(routed[id(p)], p.grad, atol=1e-4, rtol=1e-4)


def test_route_cache_follows_weight_changes():
    model, adapters, x = setup("llama", batch=3)
    rows = ["a", "b", "a"]
    with torch.no_grad():
        with adapters.route(rows):
            first = output_of(model, x)
        with adapters.route(rows):  # same adapters, same weights: stacks reused
            torch.testing.assert_close(output_of(model, x), first)
        for p in adapters.parameters("b"):
            p.mul_(2.0)
        with adapters.route(rows):
            changed = output_of(model, x)
    assert (changed - first).abs().max() > 1e-4
    torch.testing.assert_close(changed, singles(model, adapters, x, rows), atol=1e-5, rtol=1e-5)


def _bottleneck(preset: str, reduction: int):
    return ak.get_config(preset, init_weights=False, reduction_factor=reduction)


# family, the two adapters' configs, the slow per-adapter methods that must not run
BATCHED = {
    "ia3-bert": (
        "bert",
        ak.IA3(init_weights=False),
        ak.IA3(init_weights=False),
        ["IA3OutputScale.post", "IA3InputScale.pre"],
    ),
    "ia3-llama": (
        "llama",
        ak.IA3(init_weights=False),
        ak.IA3(init_weights=False),
        ["IA3OutputScale.post", "IA3InputScale.pre"],
    ),
    "seq_bn-llama": (
        "llama",
        _bottleneck("seq_bn", 4),
        _bottleneck("seq_bn", 8),
        ["SublayerBottleneck._adapt"],
    ),
    "double_seq_bn-gpt2": (
        "gpt2",
        _bottleneck("double_seq_bn", 4),
        _bottleneck("double_seq_bn", 8),
        ["SublayerBottleneck._adapt"],
    ),
    "par_bn-llama": (
        "llama",
        _bottleneck("par_bn", 4),
        _bottleneck("par_bn", 8),
        ["SublayerBottleneck._adapt"],
    ),
    "seq_bn-bert": ("bert", _bottleneck("seq_bn", 4), _bottleneck("seq_bn", 8), ["SublayerBottleneck._adapt"]),
    "seq_bn-projection-llama": (
        "llama",
        ak.get_config("seq_bn", init_weights=False, reduction_factor=4, hook="projection"),
        ak.get_config("seq_bn", init_weights=False, reduction_factor=8, hook="projection"),
        ["SequentialBottleneck.post_call"],
    ),
    "par_bn-projection-llama": (
        "llama",
        ak.get_config("par_bn", init_weights=False, reduction_factor=4, hook="projection"),
        ak.get_config("par_bn", init_weights=False, reduction_factor=8, hook="projection"),
        ["ParallelBottleneck.post_call"],
    ),
}


@pytest.mark.parametrize("case", list(BATCHED))
def test_routing_is_batched_without_per_adapter_calls(case, monkeypatch):
    from adapterkit.methods import bottleneck, bottleneck_sublayer, ia3

    family, cfg_a, cfg_b, slow = BATCHED[case]
    model = make_model(family)
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", cfg_a)
    adapters.add("b", cfg_b)
    rows = ["a", None, "b", "a"]
    x = make_inputs(family, batch=len(rows))

    def fail(*args, **kwargs):
        raise AssertionError("per-adapter fallback used")

    for spec in slow:
        cls_name, method = spec.split(".")
        cls = (
            getattr(ia3, cls_name, None)
            or getattr(bottleneck, cls_name, None)
            or getattr(bottleneck_sublayer, cls_name)
        )
        monkeypatch.setattr(cls, method, fail)
    with torch.no_grad(), adapters.route(rows):
        mixed = output_of(model, x)
    monkeypatch.undo()
    torch.testing.assert_close(mixed, singles(model, adapters, x, rows), atol=1e-5, rtol=1e-5)


def test_fusion_of_bottleneck_adapters_skips_observer_sites():
    model = make_model("bert")
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", "par_bn", init_weights=False, reduction_factor=4)
    adapters.add("b", "seq_bn", init_weights=False, reduction_factor=4)
    name = adapters.add_fusion(["a", "b"])
    sites = adapters.sites(name)
    assert sites and not any(s.endswith("intermediate.dense") for s in sites)  # the FFN-input taps only observe
    x = make_inputs("bert", batch=2)
    out = run(model, adapters, x, ak.Fuse("a", "b"))
    assert torch.isfinite(out).all()


def test_route_cache_with_a_new_row_assignment():
    model, adapters, x = setup("llama", batch=3)
    with torch.no_grad():
        for rows in (["a", "b", "a"], ["b", "a", None], ["a", "b", "a"]):
            with adapters.route(rows):
                mixed = output_of(model, x)
            torch.testing.assert_close(mixed, singles(model, adapters, x, rows), atol=1e-5, rtol=1e-5)


# --- Branch: children side by side on one output -------------------------------------------------------------------
@torch.no_grad()
def test_branch_runs_heads_side_by_side_on_the_same_output():
    """``Stack("a", Branch("h1", "h2"))``: both heads read the output of a (all rows); ``logits`` is a list, one entry
    per child, each equal to a run of that head alone; at a module output several acting children raise."""
    import transformers

    from adapterkit.compose import Branch  # ak.Branch once adapterkit/__init__.py exports it

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=4, targets="all-linear", init_weights=False))
    adapters.add("b", ak.LoRA(r=2, targets="all-linear", init_weights=False))
    adapters.add("h1", ak.FlexHead(num_labels=3))
    adapters.add("h2", ak.FlexHead(num_labels=2, num_layers=1))
    x = make_inputs("bert", batch=2)
    with adapters.use(ak.Stack("a", Branch("h1", "h2"))):
        out = model(**x)
    with adapters.use("a", "h1"):
        one = model(**x).logits
    with adapters.use("a", "h2"):
        two = model(**x).logits
    assert isinstance(out.logits, list) and [t.shape for t in out.logits] == [one.shape, two.shape]
    assert torch.equal(out.logits[0], one) and torch.equal(out.logits[1], two)
    with adapters.use("a"):
        assert torch.equal(out.last_hidden_state, model(**x).last_hidden_state)  # the body ran once, as a stack
    # a Branch of one acting child at the modules is that child
    with adapters.use(Branch("a", "h1")):
        branched = model(**x)
    with adapters.use("a"):
        assert torch.equal(branched.last_hidden_state, model(**x).last_hidden_state)
    with pytest.raises(ValueError, match="side by side"), adapters.use(Branch("a", "b")):
        model(**x)
    with pytest.raises(ValueError, match="Branch cannot be nested in Average"):
        adapters.activate(ak.Average("a", Branch("h1", "h2")))


@torch.no_grad()
def test_fuse_over_a_stack_uses_its_last_adapters_fusion_and_change():
    """A Stack child of Fuse counts as its last adapter (AdapterHub): the fusion weights are those over the last
    adapters (``fusion[b,c]``), and its value at a site is the output plus the change of its last acting item. For
    additive adapters (LoRA) that change does not depend on the earlier items at the same site, so Fuse(Stack(a, b), c)
    equals Fuse(b, c); a Stack of one is its adapter."""
    model, adapters, x = setup("bert")
    assert ak.Fuse(ak.Stack("a", "b"), "c").name == "fusion[b,c]"
    adapters.add_fusion(["b", "c"], init_weights=False)
    plain = run(model, adapters, x, ak.Fuse("b", "c"))
    assert torch.equal(run(model, adapters, x, ak.Fuse(ak.Stack("b"), "c")), plain)
    torch.testing.assert_close(run(model, adapters, x, ak.Fuse(ak.Stack("a", "b"), "c")), plain)
    with pytest.raises(KeyError, match=r"fusion\[a,c\]"):  # Stack(b, a) counts as a: no fusion over a and c
        run(model, adapters, x, ak.Fuse(ak.Stack("b", "a"), "c"))
