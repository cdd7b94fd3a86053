"""HyperFormer++ (Karimi Mahabadi et al. 2021) and MAD-G (Ansell et al. 2021) against their equations: the generated
weights are the generators applied to ``LN(h_I([z_τ; l_i; p_j]))`` (§2.3-2.4), a site computes the plain bottleneck
adapter with them (``materialize`` installs it, and it saves and loads as ``ak.Bottleneck`` with equal outputs), a
batch mixing tasks equals per-row runs and generates once per distinct task, ``source="vector"`` reads ``V v + c``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adapterkit as ak
from adapterkit.methods.hyperformer import (
    GeneratedLayerNorm,
    GeneratedLinear,
    HyperNetwork,
    materialize,
    set_task_vectors,
)

from conftest import make_inputs, make_model, output_of

SMALL = {"task_dim": 8, "hidden_dim": 16, "projected_dim": 8}
HOULSBY_LN = ak.Bottleneck(placement="houlsby", reduction_factor=8, ln_after=True)
CASES = [
    ("bert", ak.HyperFormer(n_tasks=3, adapter=HOULSBY_LN, init_weights=False, **SMALL)),
    (
        "t5",
        ak.HyperFormer(
            n_tasks=3,
            init_weights=False,
            **SMALL,
            adapter=ak.Bottleneck(
                placement="houlsby", reduction_factor=8, ln_before=True, ln_after=True, cross_adapter=True
            ),
        ),
    ),
    (
        "gpt2",
        ak.HyperFormer(
            n_tasks=3,
            init_weights=False,
            generate_layernorm=False,
            **SMALL,
            adapter=ak.Bottleneck(placement="parallel", hook="projection", ln_before=True, reduction_factor=8),
        ),
    ),
    (
        "llama",
        ak.HyperFormer(
            n_tasks=3,
            source="vector",
            vector_dim=5,
            init_weights=False,
            **SMALL,
            adapter=ak.Bottleneck(
                placement="pfeiffer", hook="projection", reduction_factor=8, ln_after=True, scaling="channel"
            ),
        ),
    ),
]
IDS = [f for f, _ in CASES]


def setup(family: str, cfg: ak.HyperFormer, seed: int = 0):
    model = make_model(family)
    adapters = ak.attach(model)
    torch.manual_seed(seed)
    adapters.add("h", cfg)
    g = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for p in adapters.parameters("h"):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    if cfg.source.value == "vector":
        set_task_vectors(adapters, "h", torch.randn(cfg.n_tasks, cfg.vector_dim, generator=g))
    model.eval()
    return model, adapters


def bank_of(adapters, name: str = "h") -> HyperNetwork:
    return next(c.hypernet for c in adapters.components(name).values() if hasattr(c, "hypernet"))


def generated_sites(adapters, name: str = "h") -> dict:
    return {s: c for s, c in adapters.components(name).items() if hasattr(c, "hypernet")}


@torch.no_grad()
def out(model, x, ids=None) -> torch.Tensor:
    if ids is None:
        return output_of(model, x).detach().clone()
    return output_of(model, {**x, "task_ids": ids}).detach().clone()


def rows_of(x: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in x.items()}


# --- the equations ------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_generated_weights_follow_the_hypernetwork_equations():
    """``I = LN(W2 ReLU(W1 [z_τ; l_i; p_j] + b1) + b2)`` (eps 1e-6); ``D = W^D I + b^D`` as ``(m, d)`` etc."""
    _, adapters = setup(*CASES[1])  # t5: ln_before and ln_after generated
    bank = bank_of(adapters)
    comp = list(generated_sites(adapters).values())[-1]  # a decoder site
    tasks = torch.tensor([2, 0])
    w = comp.generated(bank.task_codes(tasks))
    z = bank.task_embedding[tasks]
    emb = torch.cat(
        [
            z,
            bank.layer_embedding[comp.layer_id].expand(2, -1),
            bank.position_embedding[comp.position_id].expand(2, -1),
        ],
        dim=-1,
    )
    lin1, lin2 = bank.projector[0], bank.projector[2]
    hidden = torch.relu(emb @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias
    I = F.layer_norm(hidden, (hidden.shape[-1],), bank.norm.weight, bank.norm.bias, eps=1e-6)  # noqa: E741
    g = bank.generators
    m, d = comp.size, comp.in_dim
    want = {
        "down_weight": (I @ g["down_weight"].weight.T + g["down_weight"].bias).view(2, m, d),
        "down_bias": I @ g["down_bias"].weight.T + g["down_bias"].bias,
        "up_weight": (I @ g["up_weight"].weight.T + g["up_weight"].bias).view(2, d, m),
        "up_bias": I @ g["up_bias"].weight.T + g["up_bias"].bias,
    }
    for ln in ("ln_before", "ln_after"):
        for part in ("weight", "bias"):
            lin = g[f"{ln}_{part}"]
            want[f"{ln}_{part}"] = I @ lin.weight.T + lin.bias
    assert set(w) == set(want)
    for k in want:
        torch.testing.assert_close(w[k], want[k], atol=1e-6, rtol=1e-5)

    # a site computes the plain bottleneck with those weights: LN_before, down, act, up, LN_after (sequential, f + ...)
    h = torch.randn(1, 4, d)
    comp.down.current = comp.up.current = None
    with adapters.tasks([2]):
        got = comp.branch(h)
    k = 0  # task 2 is the first row of `tasks`
    x = F.layer_norm(h, (d,), want["ln_before_weight"][k], want["ln_before_bias"][k])
    x = F.linear(x, want["down_weight"][k], want["down_bias"][k])
    x = F.linear(comp.act(x), want["up_weight"][k], want["up_bias"][k])
    torch.testing.assert_close(got, x, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_vector_source_projects_the_given_vectors():
    """MAD-G: ``z_τ = V v_τ + c`` from the stored vectors, and the same for a vector passed directly."""
    _, adapters = setup(*CASES[3])
    bank = bank_of(adapters)
    v = bank.task_vectors
    want = v @ bank.vector_proj.weight.T + bank.vector_proj.bias
    torch.testing.assert_close(bank.task_codes(torch.arange(3)), want)
    torch.testing.assert_close(bank.vector_codes(v[1:2]), want[1:2])


def test_identity_at_init():
    for family, cfg in CASES:
        model = make_model(family)
        x = make_inputs(family, batch=3)
        base = out(model, x)
        adapters = ak.attach(model)
        adapters.add("h", cfg.replace(init_weights=True))
        model.eval()
        assert torch.equal(out(model, x, [0, 2, 1]), base), family


# --- tasks in a batch ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "cfg"), CASES, ids=IDS)
def test_mixed_task_batch_equals_per_row_runs(family, cfg):
    model, adapters = setup(family, cfg)
    ids = [2, 0, 2, 1]
    x = make_inputs(family, batch=len(ids))
    mixed = out(model, x, ids)
    singles = torch.cat([out(model, rows_of(x, i), [t]) for i, t in enumerate(ids)])
    torch.testing.assert_close(mixed, singles, atol=1e-5, rtol=1e-5)
    assert (mixed - out(model, x, [0, 0, 0, 0])).abs().max() > 1e-4  # the task matters
    with adapters.tasks(ids):  # the scope gives what the keyword gives
        torch.testing.assert_close(out(model, x), mixed, atol=0, rtol=0)


def test_weights_are_generated_per_distinct_task_not_per_row():
    model, adapters = setup(*CASES[0])
    x = make_inputs("bert", batch=5)
    out(model, x, [1, 1, 0, 1, 0])
    for comp in generated_sites(adapters).values():
        w, b, rows = comp.down.current
        assert w.shape[0] == 2 and rows.tolist() == [1, 1, 0, 1, 0]  # tasks (0, 1), each row's index
    out(model, x, [2] * 5)
    assert all(c.up.current[0].shape[0] == 1 for c in generated_sites(adapters).values())


def test_task_ids_are_required_and_checked():
    model, adapters = setup(*CASES[0])
    x = make_inputs("bert", batch=2)
    with pytest.raises(ValueError, match="task id per row"):
        out(model, x)
    with pytest.raises(ValueError, match="out of range"):
        out(model, x, [0, 3])
    # default_task: rows without ids
    m2, a2 = setup("bert", CASES[0][1].replace(default_task=2))
    torch.testing.assert_close(out(m2, x), out(m2, x, [2, 2]), atol=0, rtol=0)


# --- materialize --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "cfg"), CASES, ids=IDS)
def test_materialized_adapter_is_a_plain_bottleneck_with_equal_outputs(family, cfg, tmp_path):
    model, adapters = setup(family, cfg)
    x = make_inputs(family, batch=2)
    want = out(model, x, [1, 1])
    assert materialize(adapters, "h", 1, into="task1") == "task1"
    plain = adapters.config("task1")
    assert type(plain) is ak.Bottleneck and plain == cfg.plain_config()
    assert plain.hook is cfg.adapter.hook and plain.placement is cfg.adapter.placement
    assert set(adapters.sites("task1")) == set(adapters.sites("h"))
    with adapters.use("task1"):
        torch.testing.assert_close(out(model, x), want, atol=1e-6, rtol=0)

    adapters.save("task1", tmp_path / "task1")
    fresh = make_model(family)
    fresh_adapters = ak.attach(fresh)
    assert fresh_adapters.load(tmp_path / "task1") == "task1"
    fresh.eval()
    assert fresh_adapters.config("task1").method == "bottleneck"
    torch.testing.assert_close(out(fresh, x), want, atol=1e-6, rtol=0)


def test_materialize_from_a_new_vector():
    """MAD-G's zero-shot generation: the adapter for a vector equals the adapter of a task holding that vector."""
    model, adapters = setup(*CASES[3])
    x = make_inputs("llama", batch=2)
    bank = bank_of(adapters)
    new = torch.randn(5, generator=torch.Generator().manual_seed(9))
    materialize(adapters, "h", vector=new, into="unseen")
    vectors = bank.task_vectors.clone()
    vectors[0] = new
    set_task_vectors(adapters, "h", vectors)
    with adapters.use("unseen"):
        torch.testing.assert_close(out(model, x), out(model, x, [0, 0]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="exactly one"):
        materialize(adapters, "h", 1, vector=new, into="x")
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        materialize(adapters, "h", vector=torch.zeros(4), into="x")


def test_materialize_refusals():
    model, adapters = setup(*CASES[0])
    with pytest.raises(ValueError, match="task id in"):
        materialize(adapters, "h", 3, into="x")
    with pytest.raises(ValueError, match="source='task_embedding'"):
        materialize(adapters, "h", vector=torch.zeros(5), into="x")
    with pytest.raises(ValueError, match="already exists"):
        materialize(adapters, "h", 0, into="h")
    adapters.add("l", ak.LoRA())
    with pytest.raises(TypeError, match="not HyperFormer"):
        materialize(adapters, "l", 0, into="x")
    with pytest.raises(ValueError, match="no vectors"):
        set_task_vectors(adapters, "h", torch.zeros(3, 5))


# --- structure ----------------------------------------------------------------------------------------------------
def test_one_shared_hypernetwork_saved_once(tmp_path):
    model, adapters = setup(*CASES[0])
    sites = generated_sites(adapters)
    banks = {id(c.hypernet) for c in sites.values()}
    assert len(banks) == 1
    bank = bank_of(adapters)
    own = {id(p) for p in bank.parameters()}
    per_site = [p for c in sites.values() for n, p in c.named_parameters() if id(p) not in own]
    assert not per_site  # with generated norms and fixed scaling, every tensor is the hypernetwork's
    assert sum(p.numel() for p in adapters.parameters("h")) == sum(p.numel() for p in bank.parameters())
    assert all(
        isinstance(c.down, GeneratedLinear) and isinstance(c.ln_after, GeneratedLayerNorm) for c in sites.values()
    )
    assert bank.position_names == ["attn.sublayer", "ffn.sublayer"] and len(bank.layer_names) == 2
    adapters.save("h", tmp_path / "h")
    from safetensors.torch import load_file

    keys = list(load_file(str(tmp_path / "h" / "adapter.safetensors")))
    assert sum(k.endswith("generators.up_weight.weight") for k in keys) == 1


def test_per_site_norms_without_generate_layernorm():
    _, adapters = setup(*CASES[2])
    for comp in generated_sites(adapters).values():
        assert isinstance(comp.ln_before, torch.nn.LayerNorm) and comp.ln_before.weight.requires_grad
        assert isinstance(comp.down, GeneratedLinear)


def test_positions_and_layers_of_an_encoder_decoder():
    _, adapters = setup(*CASES[1])  # T5, sub-layer hooks with cross-attention
    bank = bank_of(adapters)
    assert bank.position_names == ["attn.sublayer", "cross.sublayer", "ffn.sublayer"]
    assert len(bank.layer_names) == 4  # two encoder and two decoder blocks
    model = make_model("t5")
    a = ak.attach(model)
    a.add(
        "p", ak.HyperFormer(adapter=ak.Bottleneck(placement="houlsby", hook="projection", ln_after=True), **SMALL)
    )
    names = bank_of(a, "p").position_names  # T5's attn.out is the self- and the cross-attention output
    assert (
        "ffn.down" in names
        and len(names) == 3
        and all(n.startswith("attn.out:") for n in names if n != "ffn.down")
    )


def test_training_reaches_the_hypernetwork_and_only_the_batch_tasks():
    model, adapters = setup(*CASES[0])
    adapters.train("h")
    model.train()
    x = make_inputs("bert", batch=3)
    output_of(model, {**x, "task_ids": [0, 2, 0]}).pow(2).sum().backward()
    bank = bank_of(adapters)
    grad = bank.task_embedding.grad
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0 and grad[1].abs().sum() == 0
    assert bank.generators["up_weight"].weight.grad.abs().sum() > 0
    assert bank.layer_embedding.grad.abs().sum() > 0


# --- refusals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "language"}, "unknown HyperFormer source"),
        ({"source": "vector"}, "needs vector_dim"),
        ({"vector_dim": 3}, "vector_dim is for source='vector'"),
        ({"n_tasks": 0}, "n_tasks must be a positive integer"),
        ({"default_task": 2, "n_tasks": 2}, "default_task"),
        ({"adapter": ak.LoRA()}, "ak.Bottleneck"),
        ({"adapter": HOULSBY_LN.replace(targets=["ffn.down"])}, "set targets on HyperFormer"),
        ({"adapter": HOULSBY_LN.replace(phm_dim=4)}, "Compacter"),
        ({"adapter": ak.Bottleneck()}, "give it ln_after=True"),
    ],
)
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ak.HyperFormer(**kwargs)


def test_config_round_trips():
    from adapterkit.config import config_from_dict

    for cfg in (ak.HyperFormer(), CASES[3][1]):
        assert config_from_dict(cfg.to_dict()) == cfg


def test_generated_weights_are_reused_without_autograd_until_the_hypernetwork_changes(monkeypatch):
    """Decoding calls the model again and again for the same tasks: without autograd the generated weights are
    kept; an in-place change of the hypernetwork (an optimizer step, loading) regenerates them."""
    model, adapters = setup(*CASES[0])
    x = make_inputs("bert", batch=2)
    calls = []
    original = HyperNetwork.generate
    monkeypatch.setattr(HyperNetwork, "generate", lambda self, *a: calls.append(1) or original(self, *a))
    first = out(model, x, [0, 2])
    n_sites = len(generated_sites(adapters))
    assert len(calls) == n_sites
    assert torch.equal(out(model, x, [0, 2]), first) and len(calls) == n_sites  # reused
    out(model, x, [1, 2])
    assert len(calls) == 2 * n_sites  # other tasks
    with torch.no_grad():
        bank_of(adapters).generators["up_bias"].bias.add_(0.5)
    changed = out(model, x, [0, 2])
    assert len(calls) == 3 * n_sites and not torch.equal(changed, first)
    with torch.enable_grad():  # with autograd: generated at every call (the graph must reach the hypernetwork)
        output_of(model, {**x, "task_ids": [0, 2]})
        output_of(model, {**x, "task_ids": [0, 2]})
    assert len(calls) == 5 * n_sites


def test_mixed_task_batch_gradients_equal_per_row_gradients():
    """The gathered per-row weights backpropagate like separate runs: the gradients of a mixed batch's loss equal
    the sum of the per-row runs' gradients (eval mode: no dropout)."""
    model, adapters = setup(*CASES[0])
    params = list(adapters.parameters("h"))
    ids = [2, 0, 2]
    x = make_inputs("bert", batch=len(ids))
    output_of(model, {**x, "task_ids": ids}).pow(2).sum().backward()
    mixed = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None
    for i, t in enumerate(ids):
        output_of(model, {**rows_of(x, i), "task_ids": [t]}).pow(2).sum().backward()
    for a, b in zip(mixed, (p.grad for p in params)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
