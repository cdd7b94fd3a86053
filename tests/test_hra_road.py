"""RoAd and HRA (with ETHER/ETHER+): the papers' equations, peft equivalence both ways (float32 logits within 1e-5
on the same perturbed weights), merge equivalence with peft, the batched routed path, and refusals.

* peft -> adapterkit: ``get_peft_model`` with non-identity init, perturb every trainable tensor,
  ``save_pretrained``, ``ak.attach(other).load(dir)`` on an identical model, compare logits.
* adapterkit -> peft: ``init_weights=False``, perturb, ``export(format="peft")``,
  ``PeftModel.from_pretrained(fresh, dir)``, compare logits.
* merge: peft's ``merge_and_unload()`` and our ``merge_and_detach()`` give the same plain weights.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.formats import AdapterFileError
from adapterkit.methods.hra import HRAConv2d, HRALayer
from adapterkit.methods.road import RoadLayer, rotate_pairs

from conftest import make_inputs, make_model, output_of

peft = pytest.importorskip("peft")
from peft import PeftModel, get_peft_model  # noqa: E402

warnings.filterwarnings("ignore", module="peft")

TOL = {"atol": 1e-5, "rtol": 1e-5}


@torch.no_grad()
def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return output_of(model, inputs).detach().float()


@torch.no_grad()
def perturb(params: Any, seed: int = 123, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def nontrivial(a: torch.Tensor, b: torch.Tensor) -> None:
    change = ((a - b).abs().max() / b.abs().max()).item()
    assert change > 1e-3, "the adapter does not change the output; the test is vacuous"


def test_peft_has_road_and_hra():
    assert hasattr(peft, "RoadConfig") and hasattr(peft, "HRAConfig")


def _road(**kw: Any) -> Any:
    return lambda: peft.RoadConfig(init_weights=False, **kw)


# (id, family, peft config factory, our equivalent config)
CASES = [
    ("road1-bert", "bert", _road(group_size=8, target_modules=["query", "value"]), ak.RoAd(group_size=8)),
    (
        "road2-llama",
        "llama",
        _road(variant="road_2", group_size=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        ak.RoAd(variant="road_2", group_size=8, targets=["attn.q", "attn.v", "ffn.down"]),
    ),
    (
        "road4-t5",
        "t5",
        _road(variant="road_4", group_size=4, target_modules=["q", "v", "wo"]),
        ak.RoAd(variant="road_4", group_size=4, targets=["attn.q", "attn.v", "ffn.down"]),
    ),
    (
        "road1-vit",
        "vit",
        _road(group_size=32, target_modules=["q_proj", "v_proj", "fc1"]),
        ak.RoAd(group_size=32, targets=["attn.q", "attn.v", "ffn.up"]),
    ),
    (
        "road2-bert-heads",
        "bert",
        _road(variant="road_2", group_size=16, target_modules=["query", "value"], modules_to_save=["classifier"]),
        ak.RoAd(variant="road_2", group_size=16, heads=["head"]),
    ),
]


def _hra(**kw: Any) -> Any:
    return lambda: peft.HRAConfig(init_weights=False, **kw)


CASES += [
    ("hra-bert", "bert", _hra(target_modules=["query", "value"]), ak.HRA()),
    (
        "hra-llama-gs",
        "llama",
        _hra(r=4, apply_GS=True, target_modules=["q_proj", "v_proj", "down_proj"]),
        ak.HRA(r=4, apply_GS=True, targets=["attn.q", "attn.v", "ffn.down"]),
    ),
    (
        "hra-t5",
        "t5",
        _hra(r=6, target_modules=["q", "v", "wo"]),
        ak.HRA(r=6, targets=["attn.q", "attn.v", "ffn.down"]),
    ),
    (
        "hra-vit-conv2d",
        "vit",
        _hra(r=4, target_modules=["projection", "v_proj"]),
        ak.HRA(r=4, targets=["embed", "attn.v"]),
    ),
    (
        "hra-bert-heads",
        "bert",
        _hra(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]),
        ak.HRA(r=2, heads=["head"]),
    ),
]
IDS = [c[0] for c in CASES]
# the same code paths as a default case (another family or heads): run with `make test-slow`
SLOW = {"road1-vit", "road2-bert-heads", "hra-t5", "hra-bert-heads"}
PARAMS = [pytest.param(*c, id=c[0], marks=pytest.mark.slow if c[0] in SLOW else ()) for c in CASES]


@pytest.mark.parametrize(("cid", "family", "make", "ours"), PARAMS)
def test_peft_to_adapterkit(cid, family, make, ours, tmp_path):
    x = make_inputs(family)
    base = logits(make_model(family), x)
    pm = get_peft_model(make_model(family), make()).eval()
    perturb(trainable(pm))
    expected = logits(pm, x)
    nontrivial(expected, base)
    pm.save_pretrained(str(tmp_path))
    model = make_model(family)
    adapters = ak.attach(model)
    assert adapters.load(tmp_path) == "default"
    torch.testing.assert_close(logits(model, x), expected, **TOL)
    # the component layout peft chose is ours for the equivalent config
    probe = ak.attach(make_model(family))
    probe.add("p", ours)
    assert set(probe.components("p")) == set(adapters.components("default"))
    for site, comp in probe.components("p").items():
        got = adapters.components("default")[site]
        assert {k: tuple(v.shape) for k, v in comp.state_dict().items()} == {
            k: tuple(v.shape) for k, v in got.state_dict().items()
        }, site
    # merge equivalence: peft's merge_and_unload == our merge_and_detach
    merged_theirs = pm.merge_and_unload()
    merged_ours = adapters.merge_and_detach()
    a, b = merged_ours.state_dict(), merged_theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL, msg=k)


@pytest.mark.parametrize(("cid", "family", "make", "ours"), PARAMS)
def test_adapterkit_to_peft(cid, family, make, ours, tmp_path):
    x = make_inputs(family)
    model = make_model(family)
    base = logits(model, x)
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", ours.replace(init_weights=False))
    perturb(adapters.parameters("a"))
    expected = logits(model, x)
    nontrivial(expected, base)
    adapters.export("a", tmp_path, format="peft")
    pm = PeftModel.from_pretrained(make_model(family), str(tmp_path)).eval()
    torch.testing.assert_close(logits(pm, x), expected, **TOL)
    adapters.merge("a")
    torch.testing.assert_close(logits(model, x), expected, **TOL)
    adapters.unmerge("a")
    torch.testing.assert_close(logits(model, x), expected, **TOL)


# --- RoAd: equations -------------------------------------------------------------------------------------
def _one_linear(cfg: ak.AdapterConfig, in_dim: int = 12, out_dim: int = 24, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_dim, out_dim))
    adapters = ak.attach(model)
    adapters.add("a", cfg.replace(targets=["0"], init_weights=False))
    return model, adapters, adapters.components("a")["0"]


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_road_equation(variant):
    """§3 Eq. 4: in each group of g outputs, z_j and z_{j+g/2} are rotated by a 2×2 block
    [[α cos θ, -α sin θ], [α' sin θ', α' cos θ']] (road_1: the same θ, α for both; road_2: per element; road_4:
    separate parameters for the cosine and sine entries); the bias is rotated with the weight (R (W x + b))."""
    g, out_dim = 8, 24
    model, _, comp = _one_linear(ak.RoAd(variant=variant, group_size=g), out_dim=out_dim)
    lin, h = model[0], g // 2
    theta, alpha = comp.road_theta.detach(), comp.road_alpha.detach()
    size = {"road_1": out_dim // 2, "road_2": out_dim, "road_4": 2 * out_dim}[variant]
    assert theta.shape == alpha.shape == (size,)
    R = torch.zeros(out_dim, out_dim)
    for grp in range(out_dim // g):
        for j in range(h):
            a, b = grp * g + j, grp * g + j + h
            if variant == "road_1":
                t, s = theta[grp * h + j], alpha[grp * h + j]
                (ta, sa), (tb, sb) = (t, s), (t, s)
                ca, cb = ta, tb
            elif variant == "road_2":
                (ta, sa), (tb, sb) = (theta[a], alpha[a]), (theta[b], alpha[b])
                ca, cb = ta, tb
            else:  # per group: 2g parameters, the first g for cosines, the next g for sines
                base = grp * 2 * g
                ca, cb = theta[base + j], theta[base + j + h]
                ta, tb = theta[base + g + j], theta[base + g + j + h]
                sa_c, sb_c = alpha[base + j], alpha[base + j + h]
                sa, sb = alpha[base + g + j], alpha[base + g + j + h]
            cos_a = (sa_c if variant == "road_4" else sa) * torch.cos(ca)
            cos_b = (sb_c if variant == "road_4" else sb) * torch.cos(cb)
            R[a, a], R[a, b] = cos_a, -sa * torch.sin(ta)
            R[b, a], R[b, b] = sb * torch.sin(tb), cos_b
    torch.testing.assert_close(comp.matrix().detach(), R)
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), (x @ lin.weight.T + lin.bias) @ R.T, atol=1e-5, rtol=1e-5)


def test_road_rotation_is_orthogonal_times_scale():
    """With α = 1 every 2×2 block of road_1 is a rotation: R is orthogonal with det 1 per block."""
    model, _, comp = _one_linear(ak.RoAd(group_size=8))
    with torch.no_grad():
        comp.road_alpha.fill_(1.0)
        R = comp.matrix()
    torch.testing.assert_close(R @ R.T, torch.eye(24), atol=1e-6, rtol=0)
    assert torch.linalg.det(R).item() == pytest.approx(1.0, abs=1e-5)
    # a rotation keeps the norm of each output pair: ||R z|| == ||z||
    z = torch.randn(4, 24)
    torch.testing.assert_close((z @ R.T).norm(dim=-1), z.norm(dim=-1))


def test_road_identity_at_init_and_unmerge_inverse():
    model = nn.Sequential(nn.Linear(12, 24))
    x = torch.randn(2, 12)
    base = model(x).detach()
    adapters = ak.attach(model)
    adapters.add("a", ak.RoAd(variant="road_4", group_size=8, targets=["0"]))
    assert torch.equal(model(x).detach(), base)  # θ = 0, α = 1: exactly the identity
    perturb(adapters.parameters("a"), scale=0.5)
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    adapters.merge("a")
    R = adapters.components("a")["0"].matrix().detach()
    torch.testing.assert_close(model[0].weight.detach(), R @ w)
    torch.testing.assert_close(model[0].bias.detach(), R @ b)
    adapters.unmerge("a")
    torch.testing.assert_close(model[0].weight.detach(), w, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model[0].bias.detach(), b, atol=1e-6, rtol=1e-6)


def test_road_merge_refuses_singular_blocks():
    model, adapters, comp = _one_linear(ak.RoAd(group_size=8))
    with torch.no_grad():
        comp.road_alpha[0] = 0.0  # one pair scaled to zero: R is singular, so unmerging would be impossible
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="could not be unmerged"):
        adapters.merge("a")
    assert torch.equal(model[0].weight, before) and not adapters.is_merged("a")


def test_road_config_errors():
    with pytest.raises(ValueError, match="variant must be one of"):
        ak.RoAd(variant="road_3")
    with pytest.raises(ValueError, match="positive even integer"):
        ak.RoAd(group_size=7)
    adapters = ak.attach(make_model("bert"))
    with pytest.raises(ValueError, match="group_size=64 does not divide the 32 outputs"):
        adapters.add("a", ak.RoAd())  # peft's default 64 is too big for the tiny model
    assert adapters.names == []
    with pytest.raises((TypeError, ak.TargetError), match="(?i)road cannot act on.*Conv2d"):
        ak.attach(make_model("vit")).add("a", ak.RoAd(group_size=4, targets=["embed"]))  # a Conv2d


def test_road_conv1d_is_not_exported_to_peft(tmp_path):
    adapters = ak.attach(make_model("gpt2"))
    adapters.add("a", ak.RoAd(group_size=8))  # GPT-2's fused c_attn is a Conv1D
    with pytest.raises(ValueError, match="nn.Linear only"):
        adapters.export("a", tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


def test_road_peft_file_errors(tmp_path):
    pm = get_peft_model(make_model("bert"), peft.RoadConfig(group_size=8, target_modules=["query"]))
    pm.save_pretrained(str(tmp_path))
    cfg_path = tmp_path / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**data, "variant": "road_9"}))
    with pytest.raises(AdapterFileError, match="'variant' must be one of"):
        ak.attach(make_model("bert")).load(tmp_path)
    cfg_path.write_text(json.dumps({**data, "group_size": 6}))  # does not divide 32
    adapters = ak.attach(make_model("bert"))
    with pytest.raises(AdapterFileError, match="group_size=6"):
        adapters.load(tmp_path)
    assert adapters.names == []


# --- RoAd: per-row routing ---------------------------------------------------------------------------------
def test_road_routes_rows_through_gathered_vectors(monkeypatch):
    """A mixed batch of several RoAd adapters runs the batched path (no per-adapter call) and equals per-row runs."""
    model = make_model("llama")
    adapters = ak.attach(model)
    names = [f"r{i}" for i in range(5)]
    for i, n in enumerate(names):
        torch.manual_seed(i)
        adapters.add(n, ak.RoAd(variant=["road_1", "road_2", "road_4"][i % 3], group_size=8, init_weights=False))
    rows = ["r0", None, "r3", "r1", "r4", "r0", "r2"]
    x = make_inputs("llama", batch=len(rows))
    calls = {"n": 0}
    real = RoadLayer.routed.__func__

    def counting(cls, *a, **k):
        calls["n"] += 1
        return real(cls, *a, **k)

    monkeypatch.setattr(RoadLayer, "routed", classmethod(counting))
    monkeypatch.setattr(RoadLayer, "post_call", lambda *a, **k: pytest.fail("per-adapter fallback used"))
    with torch.no_grad(), adapters.route(rows):
        mixed = output_of(model, x)
    assert calls["n"] > 0
    monkeypatch.undo()
    for i, n in enumerate(rows):
        with torch.no_grad(), adapters.use(n):
            single = output_of(model, {k: v[i : i + 1] for k, v in x.items()})
        torch.testing.assert_close(mixed[i : i + 1], single, **TOL)


def test_rotate_pairs_matches_explicit_pairs():
    z, f, s = torch.randn(2, 3, 16), torch.randn(16), torch.randn(16)
    out = rotate_pairs(z, f, s, 8)
    for j in range(16):
        partner = (j // 8) * 8 + (j % 8 + 4) % 8
        torch.testing.assert_close(out[..., j], z[..., j] * f[j] + z[..., partner] * s[j])


# --- HRA / ETHER / ETHER+: equations ---------------------------------------------------------------------
def _reflection(u: torch.Tensor) -> torch.Tensor:
    u = u.reshape(-1, 1)
    return torch.eye(u.shape[0], dtype=u.dtype) - 2 * (u @ u.T) / (u.T @ u)


@pytest.mark.parametrize("r", [1, 3, 8])
def test_hra_is_the_chain_of_reflections(r):
    """HRA §3.1: W' = W H_1 ··· H_r with H_i = I - 2 u_i u_iᵀ / ||u_i||², each H_i orthogonal (and so H)."""
    model, _, comp = _one_linear(ak.HRA(r=r), in_dim=12, out_dim=10)
    lin = model[0]
    u = comp.hra_u.detach().double()
    H = torch.eye(12, dtype=torch.float64)
    for i in range(r):
        Hi = _reflection(u[:, i])
        torch.testing.assert_close(Hi @ Hi.T, torch.eye(12, dtype=torch.float64))  # a reflection is orthogonal
        H = H @ Hi
    torch.testing.assert_close(comp.matrices()[0].detach().double(), H, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(H @ H.T, torch.eye(12, dtype=torch.float64))
    x = torch.randn(3, 4, 12)
    with torch.no_grad():
        expected = x @ (lin.weight.double() @ H).float().T + lin.bias
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_hra_symmetric_init_is_the_identity_and_odd_r_warns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    x = torch.randn(2, 12)
    base = model(x).detach()
    adapters = ak.attach(model)
    adapters.add("a", ak.HRA(r=4, targets=["0"]))
    u = adapters.components("a")["0"].hra_u.detach()
    assert torch.equal(u[:, 0], u[:, 1]) and torch.equal(u[:, 2], u[:, 3])  # pairs cancel: H_1 H_1 = I
    torch.testing.assert_close(model(x).detach(), base, atol=1e-6, rtol=0)
    with pytest.warns(UserWarning, match="odd r=3"):
        ak.attach(nn.Sequential(nn.Linear(12, 10))).add("b", ak.HRA(r=3, targets=["0"]))


def test_hra_gram_schmidt():
    """apply_GS (HRA §3.2): H = I - 2 Q Qᵀ with Q the Gram-Schmidt basis of the u_i (peft's loop)."""
    model, _, comp = _one_linear(ak.HRA(r=3, apply_GS=True), in_dim=12, out_dim=10)
    u = comp.hra_u.detach().double()
    q = [u[:, 0] / u[:, 0].norm()]
    for i in range(1, 3):
        v = u[:, i] - sum((qj @ u[:, i]) * qj for qj in q)
        q.append(v / v.norm())
    Q = torch.stack(q, dim=1)
    H = torch.eye(12, dtype=torch.float64) - 2 * Q @ Q.T
    torch.testing.assert_close(comp.matrices()[0].detach().double(), H, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(H @ H.T, torch.eye(12, dtype=torch.float64))


def test_ether_is_one_reflection_per_block():
    """ETHER §3.1: H = blockdiag(I - 2 u_b u_bᵀ / ||u_b||²): orthogonal, symmetric, an involution (H² = I), and at
    distance ||H_b - I||_F = 2 from the identity in every block (never the identity, even at init)."""
    model, _, comp = _one_linear(ak.HRA(variant="ether", n_blocks=3), in_dim=12, out_dim=10)
    lin = model[0]
    R = comp.ether_R.detach().double()
    assert R.shape == (3, 4)
    H = torch.block_diag(*[_reflection(R[b]) for b in range(3)])
    got, out_side = comp.matrices()
    assert out_side is None
    torch.testing.assert_close(got.detach().double(), H, atol=1e-6, rtol=1e-6)
    eye = torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(H @ H.T, eye)
    torch.testing.assert_close(H, H.T)
    torch.testing.assert_close(H @ H, eye)
    for b in range(3):
        assert (H[4 * b : 4 * b + 4, 4 * b : 4 * b + 4] - torch.eye(4)).norm().item() == pytest.approx(2.0)
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), x @ (lin.weight.double() @ H).float().T + lin.bias, atol=1e-5, rtol=1e-5
        )
    fresh = nn.Sequential(nn.Linear(12, 10))
    before = fresh(x).detach()
    ak.attach(fresh).add("a", ak.HRA(variant="ether", n_blocks=3, targets=["0"]))  # default init
    assert (fresh(x).detach() - before).abs().max() > 1e-3


def test_ether_plus_is_two_sided_and_relaxed():
    """ETHER+ §3.2: W' = H⁺_out W H⁺_in with H⁺ = I - ûûᵀ + v̂v̂ᵀ per block; bias unchanged; identity at init
    (v = -u); H⁺ is not orthogonal in general."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8))
    x = torch.randn(5, 12)
    base = model(x).detach()
    adapters = ak.attach(model)
    adapters.add("init", ak.HRA(variant="ether_plus", n_blocks=2, targets=["0"]))
    torch.testing.assert_close(model(x).detach(), base, atol=1e-6, rtol=0)
    adapters.delete("init")
    adapters.add("a", ak.HRA(variant="ether_plus", n_blocks=2, targets=["0"], init_weights=False))
    comp = adapters.components("a")["0"]
    lin = model[0]

    def plus(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        u, v = u.double(), v.double()
        blocks = []
        for b in range(u.shape[0]):
            uu, vv = u[b : b + 1].T, v[b : b + 1].T
            blocks.append(
                torch.eye(uu.shape[0], dtype=torch.float64) - uu @ uu.T / (uu.T @ uu) + vv @ vv.T / (vv.T @ vv)
            )
        return torch.block_diag(*blocks)

    h_in = plus(comp.ether_R.detach(), comp.ether_R2.detach())
    h_out = plus(comp.ether_R3.detach(), comp.ether_R4.detach())
    got_in, got_out = comp.matrices()
    torch.testing.assert_close(got_in.detach().double(), h_in, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_out.detach().double(), h_out, atol=1e-6, rtol=1e-6)
    assert (h_in @ h_in.T - torch.eye(12, dtype=torch.float64)).abs().max() > 1e-2  # relaxed: not orthogonal
    w = (h_out @ lin.weight.double() @ h_in).float()
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ w.T + lin.bias, atol=1e-5, rtol=1e-5)
    weight, bias = lin.weight.detach().clone(), lin.bias.detach().clone()
    adapters.merge("a")
    torch.testing.assert_close(lin.weight.detach(), w, atol=1e-6, rtol=1e-6)
    assert torch.equal(lin.bias, bias)
    adapters.unmerge("a")
    assert torch.equal(lin.weight, weight)  # the weight before merging is restored exactly


def test_ether_plus_singular_merge_is_refused():
    model, adapters, comp = _one_linear(ak.HRA(variant="ether_plus", n_blocks=1), in_dim=4, out_dim=4)
    with torch.no_grad():  # u ⟂ v: H⁺ = I - e1 e1ᵀ + e2 e2ᵀ maps e1 to 0
        comp.ether_R.copy_(torch.tensor([[1.0, 0, 0, 0]]))
        comp.ether_R2.copy_(torch.tensor([[0.0, 1, 0, 0]]))
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="could not be unmerged"):
        adapters.merge("a")
    assert torch.equal(model[0].weight, before)


def test_hra_unmerge_restores_the_weight():
    model, adapters, comp = _one_linear(ak.HRA(r=5), in_dim=12, out_dim=10)
    w = model[0].weight.detach().clone()
    adapters.merge("a")
    H = comp.matrices()[0].detach()
    torch.testing.assert_close(model[0].weight.detach(), w @ H, atol=1e-6, rtol=1e-6)
    adapters.unmerge("a")
    torch.testing.assert_close(model[0].weight.detach(), w, atol=1e-6, rtol=1e-6)


def test_hra_orthogonality_loss():
    """HRA §3.2 Eq. 6: Σ_layers ||I - ÛᵀÛ||²_F, differentiable; a gradient step on it makes the vectors more
    orthogonal; zero for ETHER and for apply_GS."""
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.HRA(r=4, init_weights=False))
    expected = 0.0
    for comp in adapters.components("a").values():
        unit = comp.hra_u / comp.hra_u.norm(dim=0)
        expected = expected + ((unit.T @ unit - torch.eye(4)) ** 2).sum()
    loss = ak.hra_orthogonality_loss(adapters, "a")
    torch.testing.assert_close(loss, expected)
    loss.backward()
    with torch.no_grad():
        for p in adapters.parameters("a"):
            p.sub_(0.01 * p.grad)
    assert ak.hra_orthogonality_loss(adapters, "a").item() < loss.item()
    adapters.add("e", ak.HRA(variant="ether", n_blocks=2))
    assert ak.hra_orthogonality_loss(adapters, "e").item() == 0.0
    adapters.add("l", ak.LoRA())
    with pytest.raises(ValueError, match="no HRA layers"):
        ak.hra_orthogonality_loss(adapters, "l")


def test_hra_config_errors(tmp_path):
    with pytest.raises(ValueError, match="variant must be one of"):
        ak.HRA(variant="householder")
    with pytest.raises(ValueError, match="apply_GS is an option of variant='hra'"):
        ak.HRA(variant="ether", apply_GS=True)
    with pytest.raises(ValueError, match="n_blocks is an option of the ETHER variants"):
        ak.HRA(n_blocks=4)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        ak.HRA(r=0)
    adapters = ak.attach(make_model("llama"))
    with pytest.raises(ValueError, match="r=40 exceeds the 32 inputs"):
        adapters.add("a", ak.HRA(r=40))
    with pytest.raises(ValueError, match="n_blocks=3 does not divide the 32 inputs"):
        adapters.add("a", ak.HRA(variant="ether", n_blocks=3))
    assert adapters.names == []
    with pytest.raises((TypeError, ak.TargetError), match="hra cannot act on.*Conv2d"):
        ak.attach(make_model("vit")).add("a", ak.HRA(variant="ether", targets=["embed"]))
    # peft has no ETHER and no Conv1D HRA
    adapters.add("e", ak.HRA(variant="ether_plus", n_blocks=2))
    with pytest.raises(ValueError, match="peft has no ETHER"):
        adapters.export("e", tmp_path / "e", format="peft")
    gpt2 = ak.attach(make_model("gpt2"))
    gpt2.add("h", ak.HRA(r=2))
    with pytest.raises(ValueError, match="nn.Linear and nn.Conv2d only"):
        gpt2.export("h", tmp_path / "h", format="peft")


def test_hra_peft_bias_is_refused(tmp_path):
    pm = get_peft_model(make_model("bert"), peft.HRAConfig(r=2, target_modules=["query"], bias="hra_only"))
    pm.save_pretrained(str(tmp_path))
    adapters = ak.attach(make_model("bert"))
    with pytest.raises(AdapterFileError, match="bias='hra_only'"):
        adapters.load(tmp_path)
    assert adapters.names == []


# --- HRA: per-row routing -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "configs"),
    [
        ("llama", [ak.HRA(r=4), ak.HRA(r=2, apply_GS=True), ak.HRA(variant="ether", n_blocks=4),
                   ak.HRA(variant="ether_plus", n_blocks=2)]),
        ("vit", [ak.HRA(r=4, targets=["embed", "attn.v"]), ak.HRA(r=2, targets=["embed", "attn.v"])]),
    ],
    ids=["llama-mixed-variants", "vit-conv2d"],
)  # fmt: skip
def test_hra_routes_rows_through_the_batched_path(family, configs, monkeypatch):
    """A mixed batch of HRA/ETHER/ETHER+ adapters (and Conv2d HRA) runs the batched paths and equals per-row runs."""
    model = make_model(family)
    adapters = ak.attach(model)
    names = []
    for i, cfg in enumerate(configs):
        torch.manual_seed(i)
        adapters.add(f"h{i}", cfg.replace(init_weights=False))
        perturb(adapters.parameters(f"h{i}"), seed=i)
        names.append(f"h{i}")
    rows = [names[0], None, names[-1], *names, names[0]]
    x = make_inputs(family, batch=len(rows))
    fail = lambda *a, **k: pytest.fail("per-adapter fallback used")  # noqa: E731
    for cls in (HRALayer, HRAConv2d):
        monkeypatch.setattr(cls, "pre", fail)
        monkeypatch.setattr(cls, "post_call", fail)
    with torch.no_grad(), adapters.route(rows):
        mixed = output_of(model, x)
    monkeypatch.undo()
    for i, n in enumerate(rows):
        with torch.no_grad(), adapters.use(n):
            single = output_of(model, {k: v[i : i + 1] for k, v in x.items()})
        torch.testing.assert_close(mixed[i : i + 1], single, **TOL)
