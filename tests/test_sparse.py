"""Sparse deltas (``ak.SparseDelta``) and their recipes (``ak.lt_sft``, ``ak.DiffPruning`` + ``ak.project_to_sparse``,
``ak.diff_pruning``, ``ak.combine_sparse``). No reference implementation is installed: the hard-concrete equations are
checked against Louizos et al. 2018 (Eqs. 10, 12, 13) and Guo et al. 2021's temperature-free form, the forward
against the module run with its densely changed weight, and the recipes step by step."""

from __future__ import annotations

import copy
import json
import math
import struct

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterkit as ak
from adapterkit.formats.io import AdapterFileError
from adapterkit.methods.sparse_delta import DeltaSpace, SparseDeltaComponent
from adapterkit.methods.sparse_recipes import (
    DiffPruningDelta,
    expected_l0,
    hard_concrete_gate,
    hard_concrete_sample,
    top_k_entries,
)

from conftest import make_inputs, make_model, output_of


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# --- hard-concrete equations ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("beta", "gamma", "zeta"), [(2 / 3, -0.1, 1.1), (1.0, -1.5, 1.5), (0.5, -0.2, 1.3)])
def test_hard_concrete_sample_is_louizos_eq10(beta, gamma, zeta):
    log_alpha = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0], dtype=torch.float64)
    u = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.02], dtype=torch.float64)
    z = hard_concrete_sample(log_alpha, beta, gamma, zeta, u=u)
    for i in range(5):
        s = sigmoid((math.log(u[i]) - math.log(1 - u[i]) + log_alpha[i].item()) / beta)
        expected = min(1.0, max(0.0, s * (zeta - gamma) + gamma))
        assert z[i].item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("beta", "gamma", "zeta"), [(2 / 3, -0.1, 1.1), (1.0, -1.5, 1.5)])
def test_gate_probabilities_match_the_closed_forms(beta, gamma, zeta):
    """P(z ≠ 0) = σ(log α − β log(−γ/ζ)) (the summand of Eq. 12) and P(z = 1) = σ(log α − β log((1−γ)/(ζ−1)))."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for la in (-2.0, 0.0, 1.5):
        u = torch.rand(n, generator=g, dtype=torch.float64)
        z = hard_concrete_sample(torch.full((n,), la, dtype=torch.float64), beta, gamma, zeta, u=u)
        nonzero = sigmoid(la - beta * math.log(-gamma / zeta))
        one = sigmoid(la - beta * math.log((1 - gamma) / (zeta - 1)))
        assert (z > 0).double().mean().item() == pytest.approx(nonzero, abs=5e-3)
        assert (z == 1).double().mean().item() == pytest.approx(one, abs=5e-3)
        e = expected_l0(torch.full((n,), la, dtype=torch.float64), beta, gamma, zeta)
        assert e.item() == pytest.approx(n * nonzero, rel=1e-9)


def test_expected_l0_in_guo_form():
    """Guo et al. write the gate without a temperature, stretched to (l, r): E‖z‖₀ = Σ σ(α − log(−l/r))."""
    alpha = torch.tensor([-1.0, 0.0, 2.0, 5.0], dtype=torch.float64)
    lo, hi = -1.5, 1.5
    expected = sum(sigmoid(a - math.log(-lo / hi)) for a in alpha.tolist())
    assert expected_l0(alpha, 1.0, lo, hi).item() == pytest.approx(expected, abs=1e-12)


def test_deterministic_gate_is_louizos_eq13():
    la = torch.tensor([-10.0, -1.0, 0.0, 1.0, 10.0], dtype=torch.float64)
    z = hard_concrete_gate(la, -0.1, 1.1)
    for i, v in enumerate(la.tolist()):
        assert z[i].item() == pytest.approx(min(1.0, max(0.0, sigmoid(v) * 1.2 - 0.1)), abs=1e-12)
    assert z[0].item() == 0.0 and z[-1].item() == 1.0 and z[2].item() == pytest.approx(0.5)


def test_diff_pruning_component_gates_and_penalty():
    lin = nn.Linear(6, 4)
    cfg = ak.DiffPruning(l0_weight=0.01, alpha_init=0.3)
    comp = DiffPruningDelta(DeltaSpace(lin, "lin", False, "DiffPruning"), cfg)
    with torch.no_grad():
        comp.w.normal_()
    comp.eval()
    torch.testing.assert_close(comp.diff(), hard_concrete_gate(comp.log_alpha, -0.1, 1.1) * comp.w)
    comp.train()
    torch.manual_seed(0)
    a = comp.diff()
    torch.manual_seed(1)
    assert not torch.equal(a, comp.diff())  # a fresh sample per call in training
    loss = comp.aux_loss()
    torch.testing.assert_close(loss, 0.01 * 24 * torch.sigmoid(torch.tensor(0.3 - (2 / 3) * math.log(0.1 / 1.1))))
    loss.backward()
    s = torch.sigmoid(comp.log_alpha.detach() - (2 / 3) * math.log(0.1 / 1.1))
    torch.testing.assert_close(comp.log_alpha.grad, 0.01 * s * (1 - s))


def test_config_errors():
    with pytest.raises(ValueError, match="density"):
        ak.SparseDelta(density=1.5)
    with pytest.raises(ValueError, match="gamma"):
        ak.DiffPruning(gamma=0.1)
    with pytest.raises(ValueError, match="beta"):
        ak.DiffPruning(beta=0.0)
    model = make_model("vit")
    with pytest.raises(ak.TargetError, match="cannot act on"):
        ak.attach(model).add("s", ak.SparseDelta(targets=["embed"]))  # ViT's patch projection is a Conv2d


# --- forward: the component equals the module with its weight changed ---------------------------------------------
def _modules():
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(24, 20), torch.randn(3, 5, 24)),
        "conv1d": (Conv1D(20, 24), torch.randn(3, 5, 24)),
        "embedding": (nn.Embedding(30, 12), torch.randint(0, 30, (3, 5))),
        "layernorm": (nn.LayerNorm(16), torch.randn(3, 5, 16)),
    }


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding", "layernorm"])
@pytest.mark.parametrize("density", [0.002, 0.5])  # the gathered product and the dense scatter
@pytest.mark.parametrize("bias", [False, True])
def test_forward_equals_changed_weight(kind, density, bias):
    module, x = _modules()[kind]
    comp = SparseDeltaComponent(
        DeltaSpace(module, kind, bias, "SparseDelta"), ak.SparseDelta(density=density, bias=bias), kind
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        comp.values.copy_(torch.randn(comp.nnz, generator=g))
    y = module(x)
    got = comp.post(x, y)
    changed = [p.detach().clone() for p in ([module.weight] + ([module.bias] if comp.space.nb else []))]
    flat = torch.cat([t.reshape(-1) for t in changed])
    flat[comp.indices.long()] += comp.values.detach()
    other = copy.deepcopy(module)
    with torch.no_grad():
        other.weight.copy_(flat[: comp.space.nw].view_as(module.weight))
        if comp.space.nb:
            other.bias.copy_(flat[comp.space.nw :])
        expected = other(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # gradients reach exactly the stored values
    got.sum().backward()
    assert comp.values.grad is not None and comp.values.grad.shape == (comp.nnz,)


def test_merge_then_unmerge_is_bit_exact():
    module, x = _modules()["linear"]
    before = [p.detach().clone() for p in module.parameters()]
    a = SparseDeltaComponent(
        DeltaSpace(module, "m", True, "SparseDelta"), ak.SparseDelta(density=0.3, bias=True), "m"
    )
    b = SparseDeltaComponent(
        DeltaSpace(module, "m", True, "SparseDelta"), ak.SparseDelta(density=0.3, bias=True, seed=1), "m"
    )
    with torch.no_grad():
        a.values.normal_()
        b.values.normal_()
    expected = a.post(x, module(x))
    a.merge(module)
    torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)
    a.unmerge(module)
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), before))
    # interleaved: entries another merge changed are restored by subtraction, the rest bit for bit
    a.merge(module)
    b.merge(module)
    a.unmerge(module)
    b.unmerge(module)
    for p, q in zip(module.parameters(), before):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_set_entries_checks():
    module, _ = _modules()["linear"]
    comp = SparseDeltaComponent(DeltaSpace(module, "m", False, "SparseDelta"), ak.SparseDelta(), "m")
    with pytest.raises(ValueError, match=r"\[0, 480\)"):
        comp.set_entries(torch.tensor([0, 480]))
    with pytest.raises(ValueError, match="distinct"):
        comp.set_entries(torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="one value per index"):
        comp.set_entries(torch.tensor([3, 4]), torch.tensor([1.0]))
    comp.set_entries(torch.tensor([9, 2, 5]), torch.tensor([1.0, 2.0, 3.0]))
    assert comp.indices.tolist() == [2, 5, 9] and comp.values.tolist() == [2.0, 3.0, 1.0]
    assert comp.indices.dtype == torch.int32


# --- saving: only the entries ----------------------------------------------------------------------------------
def _data_bytes(path) -> tuple[int, dict]:
    raw = (path / "adapter.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return len(raw) - 8 - n, header


def test_saved_file_holds_only_the_entries(tmp_path):
    sizes = {}
    for density in (0.01, 0.04):
        model = make_model("bert")
        adapters = ak.attach(model)
        adapters.add("s", ak.SparseDelta(density=density, init_weights=False))
        adapters.save("s", tmp_path / str(density))
        nnz = sum(c.nnz for c in adapters.components("s").values())
        data, header = _data_bytes(tmp_path / str(density))
        assert data == nnz * (4 + 4)  # int32 indices + float32 values, nothing dense
        dtypes = {v["dtype"] for k, v in header.items() if k.endswith(".indices")}
        assert dtypes == {"I32"}
        sizes[density] = nnz
    weights = sum(
        m.weight.numel()
        for n, m in make_model("bert").named_modules()
        if isinstance(m, nn.Linear) and "classifier" not in n
    )
    assert sizes[0.04] == pytest.approx(4 * sizes[0.01], rel=0.05)
    assert sizes[0.01] < 0.011 * weights + 20


def test_load_rejects_bad_entries(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model("bert")
    adapters = ak.attach(model)
    adapters.add("s", ak.SparseDelta(density=0.02))
    adapters.save("s", tmp_path / "s")
    tensors = load_file(tmp_path / "s" / "adapter.safetensors")
    key = next(k for k in tensors if k.endswith(".indices"))
    for bad, match in [
        (tensors[key].long(), "int64"),
        (torch.full_like(tensors[key], 10**6), "must lie in"),
        (torch.zeros_like(tensors[key]), "distinct"),
    ]:
        broken = dict(tensors, **{key: bad})
        import shutil

        shutil.rmtree(tmp_path / "b", ignore_errors=True)
        shutil.copytree(tmp_path / "s", tmp_path / "b")
        meta = __import__("safetensors").safe_open(tmp_path / "s" / "adapter.safetensors", "pt").metadata()
        save_file(broken, tmp_path / "b" / "adapter.safetensors", metadata=meta)
        with pytest.raises(AdapterFileError, match=match):
            ak.attach(make_model("bert")).load(tmp_path / "b")


# --- routing and composition ---------------------------------------------------------------------------------------
def test_routed_linear_sites_do_not_fall_back(monkeypatch):
    model = make_model("bert")
    adapters = ak.attach(model)
    for i, name in enumerate(["a", "b"]):
        torch.manual_seed(i)
        adapters.add(name, ak.SparseDelta(density=0.05, seed=i, init_weights=False))
    x = make_inputs("bert", batch=3)
    singles = []
    for i, name in enumerate(["a", None, "b"]):
        with adapters.use(name), torch.no_grad():
            singles.append(output_of(model, {k: v[i : i + 1] for k, v in x.items()}))

    def refuse(self, x, y):
        raise AssertionError("the routed path fell back to one call per adapter")

    monkeypatch.setattr(SparseDeltaComponent, "post", refuse)
    with adapters.route(["a", None, "b"]), torch.no_grad():
        mixed = output_of(model, x)
    torch.testing.assert_close(mixed, torch.cat(singles), atol=1e-5, rtol=1e-5)


def test_two_sparse_adapters_sum_and_combine(tmp_path):
    model = make_model("bert")
    adapters = ak.attach(model)
    x = make_inputs("bert")
    torch.manual_seed(0)
    adapters.add("lang", ak.SparseDelta(density=0.05, init_weights=False))
    torch.manual_seed(1)
    adapters.add("task", ak.SparseDelta(density=0.05, seed=1, init_weights=False, targets=["attn.q", "attn.v"]))
    adapters.activate("lang", "task")
    with torch.no_grad():
        both = output_of(model, x)
    # the merging module's parameter-wise combine cannot add entries at different positions
    with pytest.raises(ValueError):
        adapters.combine("bad", ["lang", "task"], method="linear")
    sel = ak.combine_sparse(adapters, "sum", ["lang", "task"])
    assert sel.k == sum(c.nnz for c in adapters.components("sum").values())
    adapters.activate("sum")
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, x), both, atol=1e-5, rtol=1e-5)
    adapters.merge("lang")
    adapters.merge("task")
    with adapters.use(), torch.no_grad():
        torch.testing.assert_close(output_of(model, x), both, atol=1e-5, rtol=1e-5)
    # the sum saves and loads like any sparse adapter
    adapters.save("sum", tmp_path / "sum")
    fresh = make_model("bert")
    ak.attach(fresh).load(tmp_path / "sum")
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, x), both, atol=1e-5, rtol=1e-5)


# --- LT-SFT ----------------------------------------------------------------------------------------------------
def _loop(model, x, steps=3, lr=0.05, record=None, aux=None):
    target = torch.randn(output_of(model, x).shape, generator=torch.Generator().manual_seed(7))

    def train(groups):
        if record is not None:
            record.append({g["name"]: [p.detach().clone() for p in g["params"]] for g in groups})
            record[-1]["_params"] = {g["name"]: g["params"] for g in groups}
        opt = torch.optim.SGD(groups, lr=lr)
        model.train()
        for _ in range(steps):
            loss = (output_of(model, x) - target).pow(2).mean()
            if aux is not None:
                loss = loss + aux()
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()

    return train


def test_lt_sft_keeps_the_top_k_changed_entries_and_resets_the_base():
    model = make_model("bert")
    adapters = ak.attach(model)
    x = make_inputs("bert")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seen = []
    full = _loop(model, x, record=seen)
    after_full = {}

    def full_then_record(groups):
        full(groups)
        after_full.update({id(p): p.detach().clone() for g in groups for p in g["params"]})

    sparse_seen = []
    sel = ak.lt_sft(
        adapters,
        "sft",
        full_then_record,
        config=ak.SparseDelta(heads=["classifier"]),
        density=0.02,
        sparse_train_fn=_loop(model, x, record=sparse_seen),
    )
    # the base model is bit-identical again
    with adapters.use():
        now = model.state_dict()
        assert all(torch.equal(before[k], now[k]) for k in before)
    # phase 1 trained the targeted weights and the head copy; phase 2 the values and the head copy
    assert set(seen[0]) - {"_params"} == {"weights", "heads"}
    assert set(sparse_seen[0]) - {"_params"} == {"values", "heads"}
    comps = {m: c for m, c in adapters.components("sft").items() if isinstance(c, SparseDeltaComponent)}
    weights = seen[0]["_params"]["weights"]
    assert len(weights) == len(comps)
    # the kept entries are the global top-K of |Δ| of the full phase
    deltas = {
        m: (after_full[id(w)] - w0).abs().reshape(-1) for (m, w, w0) in zip(comps, weights, seen[0]["weights"])
    }
    total = sum(d.numel() for d in deltas.values())
    assert sel.k == round(0.02 * total) == sum(c.nnz for c in comps.values())
    flat = torch.cat(list(deltas.values()))
    assert sel.threshold == pytest.approx(torch.topk(flat, sel.k).values.min().item())
    for m, c in comps.items():
        assert bool((deltas[m][c.indices.long()] >= sel.threshold).all())
        # the sparse phase started from zero and moved the values (a module may keep no entry: one global K)
        assert c.nnz == 0 or c.values.abs().sum() > 0
    assert all(torch.equal(v, torch.zeros_like(v)) for v in sparse_seen[0]["values"])
    assert adapters.config("sft").density == pytest.approx(sel.k / total)
    assert adapters.active == ("sft",)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in adapters.parameters("sft")}


def test_lt_sft_language_plus_task_composition():
    model = make_model("bert")
    adapters = ak.attach(model)
    x = make_inputs("bert")
    ak.lt_sft(adapters, "lang", _loop(model, x), density=0.03)
    lang_before = {
        k: v.detach().clone() for k, v in adapters.components("lang").items() for k, v in [(k, v.values)]
    }
    seen_active = []

    def task_fn(groups):
        seen_active.append(adapters.active)
        _loop(model, x, lr=0.1)(groups)

    ak.lt_sft(adapters, "task", task_fn, k=40, with_active=("lang",))
    assert seen_active == [("lang", "task"), ("lang", "task")]
    # the language SFT stayed frozen
    for m, c in adapters.components("lang").items():
        assert torch.equal(c.values, lang_before[m])
    adapters.activate("lang", "task")
    with torch.no_grad():
        composed = output_of(model, x)
    adapters.merge("lang")
    adapters.merge("task")
    with adapters.use(), torch.no_grad():
        torch.testing.assert_close(output_of(model, x), composed, atol=1e-5, rtol=1e-5)


def test_lt_sft_failure_leaves_no_adapter_and_restores_the_base():
    model = make_model("bert")
    adapters = ak.attach(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def broken(groups):
        with torch.no_grad():
            for g in groups:
                for p in g["params"]:
                    p.add_(1.0)
        raise RuntimeError("out of data")

    with pytest.raises(RuntimeError, match="out of data"):
        ak.lt_sft(adapters, "sft", broken, density=0.01)
    assert adapters.names == []
    now = model.state_dict()
    assert all(torch.equal(before[k], now[k]) for k in before)
    with pytest.raises(ValueError, match="exactly one"):
        ak.lt_sft(adapters, "sft", broken, density=0.01, k=3)


# --- diff pruning ------------------------------------------------------------------------------------------------
def test_projection_keeps_the_largest_gated_diffs_exactly():
    model = make_model("bert")
    adapters = ak.attach(model)
    x = make_inputs("bert")
    torch.manual_seed(0)
    adapters.add("dp", ak.DiffPruning(init_weights=False, alpha_init=0.2, heads=["classifier"]))
    with torch.no_grad():
        for c in adapters.components("dp").values():
            if isinstance(c, DiffPruningDelta):
                c.log_alpha.normal_()
    with torch.no_grad():
        dense = output_of(model, x)
    total = sum(c.space.n for c in adapters.components("dp").values() if isinstance(c, DiffPruningDelta))
    # every entry kept: the sparse adapter is the dense one
    sel = ak.project_to_sparse(adapters, "dp", k=total, new_name="all")
    assert sel.k == total and adapters.names == ["dp", "all"]
    with adapters.use("all"), torch.no_grad():
        torch.testing.assert_close(output_of(model, x), dense, atol=1e-5, rtol=1e-5)
    diffs = {m: c.eval_diff() for m, c in adapters.components("dp").items() if isinstance(c, DiffPruningDelta)}
    sel = ak.project_to_sparse(adapters, "dp", density=0.01)
    assert adapters.names == ["all", "dp"] and isinstance(adapters.config("dp"), ak.SparseDelta)
    assert adapters.active == ("dp",)
    keep, thr = top_k_entries({m: d.abs() for m, d in diffs.items()}, sel.k)
    assert sel.k == round(0.01 * total) and thr == sel.threshold
    for m, c in adapters.components("dp").items():
        if isinstance(c, SparseDeltaComponent):
            assert torch.equal(c.indices.long(), keep[m])
            torch.testing.assert_close(c.values.detach(), diffs[m][keep[m]])


def test_diff_pruning_recipe_end_to_end(tmp_path):
    model = make_model("bert")
    adapters = ak.attach(model)
    x = make_inputs("bert")
    seen = []
    tune = []
    sel = ak.diff_pruning(
        adapters,
        "dp",
        _loop(model, x, steps=4, record=seen, aux=lambda: adapters.aux_loss()),
        config=ak.DiffPruning(l0_weight=1.0, alpha_init=0.0),
        density=0.05,
        finetune_fn=_loop(model, x, record=tune),
    )
    assert set(seen[0]) - {"_params"} == {"delta", "log_alpha"}  # no heads configured: no empty group
    assert set(tune[0]) - {"_params"} == {"values"}
    # the penalty lowered the expected number of open gates
    l0 = [
        sum(expected_l0(t.detach(), 2 / 3, -0.1, 1.1) for t in ts)
        for ts in (seen[0]["log_alpha"], seen[0]["_params"]["log_alpha"])
    ]
    assert l0[1] < l0[0]
    comps = [c for c in adapters.components("dp").values() if isinstance(c, SparseDeltaComponent)]
    assert sum(c.nnz for c in comps) == sel.k == round(0.05 * sel.total)
    assert sum(p.numel() for p in adapters.parameters("dp")) == sel.k
    adapters.save("dp", tmp_path / "dp")
    data, _ = _data_bytes(tmp_path / "dp")
    assert data == sel.k * 8


def test_aux_loss_is_the_sum_of_the_gates_penalties():
    model = make_model("bert")
    adapters = ak.attach(model)
    adapters.add("dp", ak.DiffPruning(l0_weight=0.5, alpha_init=-1.0))
    adapters.train("dp")
    n = sum(c.space.n for c in adapters.components("dp").values())
    expected = 0.5 * n * sigmoid(-1.0 - (2 / 3) * math.log(0.1 / 1.1))
    assert adapters.aux_loss().item() == pytest.approx(expected, rel=1e-5)


def test_sites_without_entries_save_and_load(tmp_path):
    model = make_model("bert")
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("s", ak.SparseDelta(density=0.05, init_weights=False))
    site, first = next(iter(adapters.components("s").items()))
    first.set_entries(torch.zeros(0, dtype=torch.long))  # a global top-K may leave a module without entries
    x = make_inputs("bert")
    with torch.no_grad():
        expected = output_of(model, x)
    adapters.save("s", tmp_path / "s")
    fresh = make_model("bert")
    fresh_adapters = ak.attach(fresh)
    fresh_adapters.load(tmp_path / "s")
    assert fresh_adapters.components("s")[site].nnz == 0
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, x), expected, atol=1e-6, rtol=0)


def test_half_precision_base_keeps_float32_values_and_exact_unmerge():
    model = make_model("bert").to(torch.bfloat16)
    adapters = ak.attach(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    adapters.add("s", ak.SparseDelta(density=0.05, init_weights=False))
    assert all(c.values.dtype == torch.float32 for c in adapters.components("s").values())
    x = make_inputs("bert")
    with torch.no_grad():
        out = output_of(model, x)
    assert out.dtype == torch.bfloat16
    adapters.merge("s")
    adapters.unmerge("s")
    now = model.state_dict()
    assert all(torch.equal(before[k], now[k]) for k in before)
