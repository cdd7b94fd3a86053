"""Bottleneck adapters, Compacter/PHM, AdapterDrop and invertible adapters against their equations.

The contract matrix (rows in ``rows_bottleneck.py``) covers identity at init, refused merging, save/load,
gradients, detach and several adapters; here each method's output is compared with a manual computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adapterkit as ak
from adapterkit.methods.bottleneck import FFNInputTap, Hook, ParallelBottleneck, PHMLinear, SequentialBottleneck
from adapterkit.methods.bottleneck_sublayer import ResidualTap, SublayerBottleneck
from adapterkit.methods.invertible import InverseHead, InvertibleEmbedding, NICECoupling
from adapterkit.targeting import TargetError, layer_index

from conftest import make_inputs, make_model, output_of


def _setup(family: str, seed: int = 0):
    model = make_model(family, seed)
    return model, ak.attach(model), make_inputs(family)


def _branch(comp, h: torch.Tensor, act=F.relu) -> torch.Tensor:
    """``s · up(act(down(h)))`` computed from the component's weights."""
    down = comp.down.weight() if isinstance(comp.down, PHMLinear) else comp.down.weight
    up = comp.up.weight() if isinstance(comp.up, PHMLinear) else comp.up.weight
    s = comp.scale if comp.scale is not None else comp.scaling
    return s * F.linear(act(F.linear(h, down, comp.down.bias)), up, comp.up.bias)


# --- equations at one site ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sequential_adapter_equals_manual_computation(family):
    model, adapters, _ = _setup(family)
    adapters.add("a", ak.Bottleneck(placement="houlsby", hook="projection", init_weights=False, scaling=2.0))
    comps = adapters.components("a")
    assert all(isinstance(c, SequentialBottleneck) for c in comps.values())
    name, comp = next(iter(comps.items()))  # attention output projection of layer 0
    module = dict(model.named_modules())[name]
    x = torch.randn(2, 5, comp.in_dim)
    with torch.no_grad():
        with adapters.use():
            y = module(x)
        expected = y + _branch(comp, y)
        torch.testing.assert_close(module(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("residual_before_ln", [False, True])
def test_sequential_ln_after_arrangements(residual_before_ln):
    model, adapters, _ = _setup("llama")
    cfg = ak.Bottleneck(
        hook="projection", ln_after=True, adapter_residual_before_ln=residual_before_ln, init_weights=False
    )
    adapters.add("a", cfg)
    name, comp = next(iter(adapters.components("a").items()))
    module = dict(model.named_modules())[name]
    x = torch.randn(3, comp.out_dim * 2)  # down_proj input: the intermediate size
    with torch.no_grad():
        with adapters.use():
            y = module(x)
        f = _branch(comp, y)
        expected = comp.ln_after(y + f) if residual_before_ln else y + comp.ln_after(f)
        torch.testing.assert_close(module(x), expected, atol=1e-6, rtol=0)


def test_parallel_adapter_on_ffn_module():
    model, adapters, _ = _setup("llama")
    adapters.add("a", ak.Bottleneck(placement="parallel", hook="projection", scaling=4.0, init_weights=False))
    name, comp = next(iter(adapters.components("a").items()))
    assert name == "model.layers.0.mlp" and isinstance(comp, ParallelBottleneck)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        with adapters.use():
            y = mlp(x)
        torch.testing.assert_close(mlp(x), y + _branch(comp, x), atol=1e-6, rtol=0)


def test_parallel_adapter_on_bert_taps_the_ffn_input():
    """BERT's FFN spans intermediate.dense -> output.dense; the adapter adds s·f(FFN input) to output.dense."""
    model, adapters, x = _setup("bert")
    layer = model.bert.encoder.layer[1]
    seen: dict[str, torch.Tensor] = {}
    # registered before the adapter's hooks: sees the base output of output.dense
    layer.output.dense.register_forward_hook(lambda m, i, o: seen.__setitem__("base", o.detach().clone()))
    layer.intermediate.dense.register_forward_hook(
        lambda m, i, o: seen.__setitem__("ffn_in", i[0].detach().clone())
    )
    adapters.add("a", "par_bn", hook="projection", init_weights=False)
    assert adapters.sites("a") == {
        f"bert.encoder.layer.{i}.{part}": "target"
        for i in (0, 1)
        for part in ("intermediate.dense", "output.dense")
    }
    comps = adapters.components("a")
    assert isinstance(comps["bert.encoder.layer.1.intermediate.dense"], FFNInputTap)
    comp = comps["bert.encoder.layer.1.output.dense"]
    assert comp.scaling == 4.0 and comp.size == 16  # par_bn: reduction 2, scaling 4
    layer.output.dense.register_forward_hook(lambda m, i, o: seen.__setitem__("adapted", o.detach().clone()))
    with torch.no_grad():
        output_of(model, x)
        expected = seen["base"] + _branch(comp, seen["ffn_in"])
    torch.testing.assert_close(seen["adapted"], expected, atol=1e-6, rtol=0)
    # the tapped value is consumed: nothing stale is left for a later call
    assert comp.holder.value is None
    with pytest.raises(RuntimeError, match="found no FFN input"):
        layer.output.dense(torch.randn(2, 7, 64))


@pytest.mark.parametrize("hook", ["sublayer", "projection"])
def test_parallel_tap_follows_compositions_and_routing(hook):
    model, adapters, x = _setup("bert")
    adapters.add("a", "par_bn", hook=hook, init_weights=False)
    adapters.add("b", "par_bn", hook=hook, init_weights=False)
    with torch.no_grad():
        adapters.activate("a", "b")
        stacked = output_of(model, x)
        adapters.activate(ak.Average("a", "b", weights=[1.0, 1.0]))  # additive: the same as stacking
        torch.testing.assert_close(output_of(model, x), stacked, atol=1e-5, rtol=0)
        with adapters.route(["a", "b"]):
            routed = output_of(model, x)
        for row, name in enumerate(["a", "b"]):
            adapters.activate(name)
            torch.testing.assert_close(routed[row], output_of(model, x)[row], atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["par_bn", "seq_bn"])
def test_taps_under_gradient_checkpointing(preset):
    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model, adapters, x = _setup("bert")
        adapters.add("a", preset, init_weights=False)
        adapters.train("a")
        model.train()
        for m in model.modules():  # no dropout: both runs must be comparable
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        output_of(model, x).sum().backward()
        return [p.grad.clone() for p in adapters.parameters("a")]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_parallel_needs_an_ffn_output_projection():
    model, adapters, _ = _setup("bert")
    with pytest.raises(TargetError, match="ffn.down"):
        adapters.add("a", ak.Bottleneck(placement="parallel", hook="projection", targets=["attn.out"]))
    assert adapters.names == []


def test_parallel_on_llama_down_proj_taps_the_mlp_input():
    model, adapters, _ = _setup("llama")
    adapters.add(
        "a", ak.Bottleneck(placement="parallel", hook="projection", targets=["ffn.down"], init_weights=False)
    )
    assert "model.layers.0.mlp.gate_proj" in adapters.sites("a")
    comp = adapters.components("a")["model.layers.0.mlp.down_proj"]
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        with adapters.use():
            y = mlp(x)
        torch.testing.assert_close(mlp(x), y + _branch(comp, x), atol=1e-6, rtol=0)


# --- Compacter / PHM ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("factorized", [True, False])
def test_phm_weight_is_a_sum_of_kronecker_products(factorized):
    torch.manual_seed(0)
    layer = PHMLinear(8, 12, n=4, factorized=factorized, rank=2, factory={"dtype": torch.float32})
    layer.reset(zero=False, random=True)
    A, B = layer.rule_module.A, layer.blocks()
    if factorized:
        torch.testing.assert_close(B, layer.B_left @ layer.B_right)
        assert layer.B_left.shape == (4, 3, 2) and layer.B_right.shape == (4, 2, 2)
    expected = sum(torch.kron(A[i], B[i]) for i in range(4))
    assert expected.shape == (12, 8)
    torch.testing.assert_close(layer.weight(), expected, atol=1e-6, rtol=0)
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), x @ expected.T + layer.bias, atol=1e-5, rtol=0)


def test_phm_size_must_divide():
    model, adapters, _ = _setup("bert")
    with pytest.raises(ValueError, match="phm_dim=4 must divide"):
        adapters.add("a", "compacter")  # hidden 32 / reduction 32 = bottleneck 1
    assert adapters.names == []


def test_shared_phm_rule_is_one_parameter(tmp_path):
    model, adapters, x = _setup("t5")
    adapters.add("a", "compacter", reduction_factor=8, init_weights=False)
    layers = [m for c in adapters.components("a").values() for m in c.modules() if isinstance(m, PHMLinear)]
    assert len(layers) == 2 * 8  # down and up at 8 sub-layers (self-attention and FFN; no cross_adapter)
    rule = layers[0].rule_module
    assert all(lay.rule_module is rule for lay in layers) and sum(lay.owns_rule for lay in layers) == 1
    params = list(adapters.parameters("a"))
    assert len({id(p) for p in params}) == len(params)
    assert sum(p is rule.A for p in params) == 1
    # the rule really is shared: changing it changes every layer
    with torch.no_grad():
        w = layers[-1].weight().clone()
        rule.A.mul_(2)
        torch.testing.assert_close(layers[-1].weight(), 2 * w)
        expected = output_of(model, x)
    adapters.save("a", tmp_path / "a")
    fresh, fresh_adapters, _ = _setup("t5")
    fresh_adapters.load(tmp_path / "a")
    loaded = [m for c in fresh_adapters.components("a").values() for m in c.modules() if isinstance(m, PHMLinear)]
    assert all(lay.rule_module is loaded[0].rule_module for lay in loaded)
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, x), expected, atol=1e-6, rtol=0)


def test_unshared_phm_rules_are_per_layer():
    model, adapters, _ = _setup("bert")
    adapters.add("a", "compacter++", reduction_factor=8, shared_phm_rule=False)
    layers = [m for c in adapters.components("a").values() for m in c.modules() if isinstance(m, PHMLinear)]
    assert all(lay.owns_rule for lay in layers)
    assert len({id(lay.rule_module) for lay in layers}) == len(layers)


# --- AdapterDrop ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "t5"])
def test_skip_layers_leaves_the_first_layers_untouched(family):
    model, adapters, x = _setup(family)
    adapters.add("a", ak.Bottleneck(placement="houlsby", skip_layers=1, init_weights=False))
    sites = adapters.sites("a")
    assert sites and all(layer_index(s) == 1 for s in sites)
    first = {"bert": "bert.encoder.layer.0", "t5": "encoder.block.0"}[family]
    assert not any(s.startswith(first + ".") for s in sites)
    if family == "t5":
        assert not any(s.startswith("decoder.block.0.") for s in sites)
        assert any(s.startswith("decoder.block.1.") for s in sites)
    module = dict(model.named_modules())[first]
    seen = []
    module.register_forward_hook(
        lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).detach().clone())
    )
    with torch.no_grad():
        output_of(model, x)
        with adapters.use():
            base_out = output_of(model, x)
        assert (output_of(model, x) - base_out).abs().max() > 1e-4  # later layers are adapted
    torch.testing.assert_close(seen[0], seen[1], atol=0, rtol=0)


def test_skip_layers_that_leave_nothing_is_an_error():
    model, adapters, _ = _setup("llama")
    with pytest.raises(TargetError, match="skip_layers=2"):
        adapters.add("a", ak.Bottleneck(skip_layers=2))


def test_drop_prob_only_in_training():
    model, adapters, x = _setup("llama")  # no dropout in the tiny LLaMA: train and eval outputs are comparable
    adapters.add("a", ak.Bottleneck(placement="houlsby", drop_prob=0.5, init_weights=False))
    with torch.no_grad():
        with adapters.use():
            base = output_of(model, x)
        adapted = output_of(model, x)
        assert torch.equal(output_of(model, x), adapted)  # eval: never dropped
        model.train()
        comps = {n: c for n, c in adapters.components("a").items() if isinstance(c, SublayerBottleneck)}
        calls: dict[str, int] = {n: 0 for n in comps}
        for n, c in comps.items():
            c.down.register_forward_hook(lambda m, i, o, n=n: calls.__setitem__(n, calls[n] + 1))
        torch.manual_seed(0)
        outs = [output_of(model, x) for _ in range(12)]
        model.eval()
    # both components of a layer share one draw per forward pass
    for layer in (0, 1):
        counts = {calls[n] for n in comps if f"layers.{layer}." in n}
        assert len(counts) == 1, calls
        assert 0 < counts.pop() < 12  # dropped in some passes, kept in others
    assert any(torch.equal(o, adapted) for o in outs) and any(not torch.equal(o, adapted) for o in outs)
    assert all(torch.isfinite(o).all() for o in outs) and not torch.equal(base, adapted)


# --- presets ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("preset", "fields"),
    [
        ("seq_bn", {"placement": "pfeiffer", "reduction_factor": 16, "non_linearity": "relu"}),
        ("pfeiffer", {"placement": "pfeiffer", "reduction_factor": 16}),
        ("double_seq_bn", {"placement": "houlsby", "reduction_factor": 16, "non_linearity": "swish"}),
        ("houlsby", {"placement": "houlsby"}),
        ("par_bn", {"placement": "parallel", "reduction_factor": 2, "scaling": 4.0, "non_linearity": "relu"}),
        ("compacter", {"placement": "houlsby", "phm_dim": 4, "reduction_factor": 32, "non_linearity": "gelu"}),
        (
            "compacter++",
            {"placement": "pfeiffer", "phm_dim": 4, "shared_phm_rule": True, "factorized_phm_W": True},
        ),
    ],
)
def test_presets_resolve_by_name(preset, fields):
    model, adapters, _ = _setup("gpt2")
    overrides = {"reduction_factor": 8} if "compacter" in preset else {}
    adapters.add("x", preset, **overrides)
    data = adapters.config("x").to_dict()
    assert data["method"] == "bottleneck"
    for k, v in {**fields, **overrides}.items():
        assert data[k] == v, k


def test_learned_scaling_spellings():
    assert ak.Bottleneck(scaling="learned").to_dict()["scaling_mode"] == "learned"
    assert ak.Bottleneck(scaling="channel").scaling == 1.0
    with pytest.raises(ValueError, match="placement"):
        ak.Bottleneck(placement="sideways")
    with pytest.raises(ValueError, match="non_linearity"):
        ak.Bottleneck(non_linearity="wiggle")


# --- invertible adapters -----------------------------------------------------------------------------------
def test_nice_coupling_inverts_and_starts_as_identity():
    torch.manual_seed(0)
    like = torch.zeros(1)
    coupling = NICECoupling(33, ak.Invertible(init_weights=False), like)  # odd width: halves 16 and 17
    coupling.reset()
    x = torch.randn(4, 5, 33)
    y = coupling(x)
    assert (y - x).abs().max() > 1e-2
    torch.testing.assert_close(coupling.inverse(y), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(coupling(coupling.inverse(x)), x, atol=1e-5, rtol=1e-5)
    identity = NICECoupling(33, ak.Invertible(), like)
    identity.reset()
    assert torch.equal(identity(x), x) and torch.equal(identity.inverse(x), x)


def test_invertible_sites_and_sharing():
    model, adapters, x = _setup("t5")
    adapters.add("a", ak.Invertible(init_weights=False))
    comps = adapters.components("a")
    enc, dec, head = comps["encoder.embed_tokens"], comps["decoder.embed_tokens"], comps["lm_head"]
    assert isinstance(enc, InvertibleEmbedding) and isinstance(head, InverseHead)
    assert enc.coupling is dec.coupling is head.coupling
    assert sum(p.numel() for p in adapters.parameters("a")) == sum(p.numel() for p in enc.coupling.parameters())
    assert not dec.state_dict() and not head.state_dict()


def test_invertible_embedding_and_inverse_at_the_head():
    model, adapters, x = _setup("gpt2")
    seen: dict[str, torch.Tensor] = {}
    model.transformer.wte.register_forward_hook(lambda m, i, o: seen.__setitem__("embed", o.detach().clone()))
    model.lm_head.register_forward_pre_hook(lambda m, i: seen.__setitem__("head_in", i[0].detach().clone()))
    adapters.add("a", ak.Invertible(init_weights=False))
    model.lm_head.register_forward_pre_hook(
        lambda m, i: seen.__setitem__("head_in_adapted", i[0].detach().clone())
    )
    model.transformer.wte.register_forward_hook(lambda m, i, o: seen.__setitem__("embed_adapted", o.clone()))
    coupling = adapters.components("a")["transformer.wte"].coupling
    with torch.no_grad():
        logits = output_of(model, x)
        torch.testing.assert_close(seen["embed_adapted"], coupling(seen["embed"]), atol=1e-6, rtol=0)
        torch.testing.assert_close(seen["head_in_adapted"], coupling.inverse(seen["head_in"]), atol=1e-6, rtol=0)
        torch.testing.assert_close(
            logits, F.linear(seen["head_in_adapted"], model.lm_head.weight), atol=1e-6, rtol=0
        )


def test_invertible_on_a_classifier_has_no_inverse():
    model, adapters, _ = _setup("bert")
    adapters.add("a", ak.Invertible())
    assert adapters.sites("a") == {"bert.embeddings.word_embeddings": "target"}
    with pytest.raises(TypeError, match="cannot be merged"):
        adapters.merge("a")


# --- hook="sublayer": AdapterHub's arrangement of the block's residual and LayerNorm ---------------------------
def _adapterhub(comp, f, r, norm, *, olnb, olna, rbl, arbl, parallel=False):
    """AdapterHub 1.3.0's ``Adapter``/``ParallelAdapter`` ``pre_forward``, ``forward`` and ``post_forward``,
    transcribed (methods/modeling.py), with our component's weights."""
    if parallel:
        x, residual = r, r
    else:
        residual = f if rbl is True else None
        x = f
        if olnb:
            x = f + r
            if rbl == "post_add":
                residual = x
            if norm is not None:
                x = norm(x)
        if rbl is False:
            residual = x
    if comp.ln_before is not None:
        x = comp.ln_before(x)
    up = F.linear(comp.act(F.linear(x, comp.down.weight, comp.down.bias)), comp.up.weight, comp.up.bias)
    out = up * (comp.scale if comp.scale is not None else comp.scaling)
    if parallel:
        if comp.ln_after is not None:
            out = comp.ln_after(out)
        out = out + f
    else:
        if arbl:
            out = out + residual
        if comp.ln_after is not None:
            out = comp.ln_after(out)
        if not arbl:
            out = out + residual
    if olna:
        out = norm(out + r) if norm is not None else out + r
    return out


_ARRANGEMENTS = [
    dict(olnb=True, olna=True, rbl=True, arbl=False),  # SeqBn
    dict(olnb=False, olna=True, rbl=True, arbl=False),  # DoubleSeqBn
    dict(olnb=True, olna=True, rbl=False, arbl=False),
    dict(olnb=True, olna=True, rbl="post_add", arbl=False),
    dict(olnb=True, olna=True, rbl=True, arbl=True, ln=True),
    dict(olnb=False, olna=True, rbl=True, arbl=False, ln=True),
    dict(olnb=True, olna=False, rbl=False, arbl=False),  # AdapterPlus (pre-LN blocks only)
    dict(olnb=False, olna=True, rbl=True, arbl=False, parallel=True),
    dict(olnb=False, olna=True, rbl=True, arbl=False, parallel=True, ln=True),
]


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("arr", _ARRANGEMENTS, ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
def test_sublayer_arrangements_equal_adapterhubs(family, arr):
    arr = dict(arr)
    ln, parallel = arr.pop("ln", False), arr.pop("parallel", False)
    if family == "bert" and not arr["olna"]:
        pytest.skip("original_ln_after=False is refused on post-LN blocks (test_sublayer_refusals)")
    model, adapters, _ = _setup(family)
    extra = {} if parallel else {"original_ln_before": arr["olnb"], "residual_before_ln": arr["rbl"]}
    if not parallel:
        extra["adapter_residual_before_ln"] = arr["arbl"] and ln
    cfg = ak.Bottleneck(
        placement="parallel" if parallel else "pfeiffer",
        original_ln_after=arr["olna"],
        ln_before=ln,
        ln_after=ln,
        scaling=2.0,
        init_weights=False,
        **extra,
    )
    adapters.add("a", cfg)
    comps = {n: c for n, c in adapters.components("a").items() if isinstance(c, SublayerBottleneck)}
    name, comp = next(iter(comps.items()))
    with torch.no_grad():
        for p in comp.parameters():
            p.add_(0.2 * torch.randn_like(p))
    norm = comp.norm
    assert (norm is not None) == (family == "bert")
    f, r = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        ours = comp._adapt(f, r) + r
        ours = norm(ours) if norm is not None else ours
        theirs = _adapterhub(comp, f, r, norm, parallel=parallel, **arr)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_seq_bn_on_bert_applies_the_block_layernorm_twice():
    """The whole model: BertOutput's result is LN(f + r + g(LN(f + r))) with the block's own LayerNorm."""
    model, adapters, x = _setup("bert")
    out_mod = model.bert.encoder.layer[1].output
    seen: dict[str, torch.Tensor] = {}
    out_mod.dropout.register_forward_hook(lambda m, i, o: seen.__setitem__("f", o.detach().clone()))
    out_mod.register_forward_pre_hook(lambda m, a: seen.__setitem__("r", a[1].detach().clone()))
    out_mod.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.detach().clone()))
    adapters.add("a", "seq_bn", init_weights=False)
    comp = adapters.components("a")["bert.encoder.layer.1.output.dropout"]
    assert isinstance(comp, SublayerBottleneck) and comp.norm is out_mod.LayerNorm
    assert isinstance(adapters.components("a")["bert.encoder.layer.1.intermediate"], ResidualTap)
    with torch.no_grad():
        output_of(model, x)
        s = seen["f"] + seen["r"]
        expected = out_mod.LayerNorm(seen["f"] + _branch(comp, out_mod.LayerNorm(s)) + seen["r"])
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=0)
    assert comp.holder.value is None  # consumed
    with pytest.raises(RuntimeError, match="found no residual"):
        out_mod.dropout(torch.randn(2, 7, 32))


def test_par_bn_on_gpt2_reads_the_residual_before_ln_2():
    model, adapters, x = _setup("gpt2")
    block = model.transformer.h[1]
    seen: dict[str, torch.Tensor] = {}
    block.mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("f", o.detach().clone()))
    block.ln_2.register_forward_pre_hook(lambda m, a: seen.__setitem__("r", a[0].detach().clone()))
    block.register_forward_hook(lambda m, i, o: seen.__setitem__("out", _first(o).detach().clone()))
    adapters.add("a", "par_bn", init_weights=False)
    comp = adapters.components("a")["transformer.h.1.mlp"]
    with torch.no_grad():
        output_of(model, x)
        expected = seen["r"] + seen["f"] + _branch(comp, seen["r"])
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=0)


def _first(o):
    return o[0] if isinstance(o, tuple) else o


@pytest.mark.parametrize(
    ("family", "preset"), [("bert", "seq_bn"), ("llama", "double_seq_bn"), ("gpt2", "par_bn")]
)
def test_sublayer_routing_is_batched(family, preset, monkeypatch):
    """A mixed batch of plain adapters runs as one gathered call per site, not one call per adapter."""
    model, adapters, _ = _setup(family)
    adapters.add("a", preset, init_weights=False)
    adapters.add("b", preset, init_weights=False, reduction_factor=4)
    rows = ["a", None, "b", "a"]
    x = make_inputs(family, batch=len(rows))
    singles = []
    with torch.no_grad():
        for i, n in enumerate(rows):
            with adapters.use(n):
                singles.append(output_of(model, {k: v[i : i + 1] for k, v in x.items()}))

        def per_adapter(*a, **k):
            raise AssertionError("per-adapter fallback taken")

        monkeypatch.setattr(SublayerBottleneck, "_adapt", per_adapter)
        with adapters.route(rows):
            mixed = output_of(model, x)
    torch.testing.assert_close(mixed, torch.cat(singles), atol=1e-5, rtol=1e-5)


def test_sublayer_refusals():
    model, adapters, _ = _setup("bert")
    with pytest.raises(ValueError, match="original_ln_after=False"):
        adapters.add("a", ak.Bottleneck(original_ln_after=False))
    with pytest.raises(TargetError, match="not one; target those roles"):
        adapters.add("a", ak.Bottleneck(targets=["attn.out"]))
    with pytest.raises(ValueError, match="needs hook='sublayer'"):
        ak.Bottleneck(hook="projection", original_ln_before=True)
    with pytest.raises(ValueError, match="sequential adapters only"):
        ak.Bottleneck(placement="parallel", original_ln_before=True)
    with pytest.raises(ValueError, match="residual_before_ln"):
        ak.Bottleneck(residual_before_ln="before")
    assert adapters.names == []
    for family in ("mbart", "whisper"):
        model, adapters, _ = _setup(family)
        with pytest.raises(TargetError, match="hook='projection'"):
            adapters.add("a", "seq_bn")
        if family == "mbart":  # the adapter on the FFN output projection still works
            adapters.add("a", "seq_bn", hook="projection")


def test_presets_mean_adapterhubs_configs():
    seq, double, par = (ak.get_config(n) for n in ("seq_bn", "double_seq_bn", "par_bn"))
    assert seq.hook is Hook.SUBLAYER and seq.original_ln_before_resolved and seq.residual_before_ln is True
    assert not double.original_ln_before_resolved and double.original_ln_after
    assert par.placement.value == "parallel" and par.hook is Hook.SUBLAYER
    assert ak.get_config("compacter++").original_ln_before_resolved  # AdapterHub: SeqBn-based
    assert not ak.get_config("compacter").original_ln_before_resolved  # DoubleSeqBn-based


def test_schema_1_configs_meant_the_projection_hook():
    data = ak.Bottleneck(placement="pfeiffer").to_dict()
    assert data["schema_version"] == 2 and data["hook"] == "sublayer"
    old = {k: v for k, v in data.items() if k not in ("hook", "original_ln_before", "original_ln_after",
                                                      "residual_before_ln", "cross_adapter", "method",
                                                      "schema_version")}  # fmt: skip
    assert ak.Bottleneck.migrate(old, 1)["hook"] == "projection"
    assert "hook" not in ak.Bottleneck.migrate(old, 2)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5", "vit", "bart"])
def test_sublayer_roles_pair_up_in_every_family(family):
    """Every sub-layer gets the residual source and (post-LN only) the norm of its own layer and sub-layer."""
    model, adapters, x = _setup(family)
    adapters.add(
        "a", ak.Bottleneck(placement="houlsby", cross_adapter=family in ("t5", "bart"), init_weights=False)
    )
    comps = adapters.components("a")
    subs = {n: c for n, c in comps.items() if isinstance(c, SublayerBottleneck)}
    taps = {n: c for n, c in comps.items() if isinstance(c, ResidualTap)}
    # attention and FFN per layer (2 layers); T5/BART: 2 encoder + 2 decoder layers, the decoder's with cross-attention
    assert len(subs) == (2 * 2 + 2 * 3 if family in ("t5", "bart") else 2 * 2)
    post_ln = family in ("bert", "bart")
    for name, comp in subs.items():
        assert (comp.norm is not None) == post_ln, name
        source = name if comp.own_input else comp.holder.source
        assert layer_index(source) == layer_index(name)
        assert source.split(".")[0] == name.split(".")[0]  # encoder with encoder, decoder with decoder
        if not comp.own_input:
            assert comp.holder in taps[source].holders
    with torch.no_grad():
        output_of(model, x)
    assert all(c.holder.value is None for c in subs.values())  # every tapped residual was used
