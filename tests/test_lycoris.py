"""LoHa and LoKr: the equations, peft equivalence both ways (float32 logits within 1e-5), merge equivalence
with peft, training-mode dropouts equal to peft's for the same seed, and refusals.

* peft -> adapterkit: ``get_peft_model`` with non-identity init, perturb every trainable tensor,
  ``save_pretrained``, ``ak.attach(other).load(dir)`` on an identical model, compare logits.
* adapterkit -> peft: ``init_weights=False``, perturb, ``export(format="peft")``,
  ``PeftModel.from_pretrained(fresh, dir)``, compare logits.
* merge: peft's ``merge_and_unload()`` and our ``merge_and_detach()`` give the same plain weights.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.formats import AdapterFileError
from adapterkit.methods.loha import LoHaLayer
from adapterkit.methods.lokr import LoKrLayer, factorization

from conftest import make_inputs, make_model, output_of

peft = pytest.importorskip("peft")
from peft import LoHaConfig, LoKrConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lokr.layer import factorization as peft_factorization  # noqa: E402

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


# (id, family, peft config factory, our equivalent config)
CASES = [
    (
        "loha-bert",
        "bert",
        lambda: LoHaConfig(r=4, target_modules=["query", "value"], init_weights=False),
        ak.LoHa(r=4),
    ),
    (
        "loha-llama-patterns",
        "llama",
        lambda: LoHaConfig(
            r=4,
            alpha=6,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"down_proj": 3},
            init_weights=False,
        ),
        ak.LoHa(
            r=4,
            alpha=6,
            targets=["attn.q", "attn.v", "ffn.down"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"down_proj": 3.0},
        ),
    ),
    ("loha-t5", "t5", lambda: LoHaConfig(target_modules=["q", "v"], init_weights=False), ak.LoHa()),
    (
        "loha-vit-conv2d",
        "vit",
        lambda: LoHaConfig(r=2, target_modules=["projection", "v_proj"], init_weights=False),
        ak.LoHa(r=2, targets=["embed", "attn.v"]),
    ),
    (
        "loha-vit-conv2d-cp",
        "vit",
        lambda: LoHaConfig(
            r=2, target_modules=["projection", "v_proj"], use_effective_conv2d=True, init_weights=False
        ),
        ak.LoHa(r=2, targets=["embed", "attn.v"], use_effective_conv2d=True),
    ),
    (
        "loha-bert-heads",
        "bert",
        lambda: LoHaConfig(
            r=2, target_modules=["query", "value"], modules_to_save=["classifier"], init_weights=False
        ),
        ak.LoHa(r=2, heads=["head"]),
    ),
    (
        "lokr-bert-full",
        "bert",
        lambda: LoKrConfig(target_modules=["query", "value"], init_weights=False),
        ak.LoKr(),
    ),
    (
        "lokr-llama-both",
        "llama",
        lambda: LoKrConfig(
            r=1, alpha=3, decompose_both=True, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False
        ),
        ak.LoKr(r=1, alpha=3, decompose_both=True, targets=["attn.q", "attn.v", "ffn.down"]),
    ),
    (
        "lokr-t5-factor",
        "t5",
        lambda: LoKrConfig(r=2, decompose_factor=4, target_modules=["q", "v", "wo"], init_weights=False),
        ak.LoKr(r=2, decompose_factor=4, targets=["attn.q", "attn.v", "ffn.down"]),
    ),
    (
        "lokr-llama-patterns",
        "llama",
        lambda: LoKrConfig(
            r=2,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 8},
            alpha_pattern={"q_proj": 5},
            init_weights=False,
        ),  # fmt: skip
        ak.LoKr(r=2, rank_pattern={"v_proj": 8}, alpha_pattern={"q_proj": 5.0}),
    ),
    (
        "lokr-vit-conv2d-lowrank",
        "vit",
        lambda: LoKrConfig(r=1, target_modules=["projection", "v_proj"], init_weights=False),
        ak.LoKr(r=1, targets=["embed", "attn.v"]),
    ),
    (
        "lokr-vit-conv2d-cp",
        "vit",
        lambda: LoKrConfig(
            r=1,
            decompose_both=True,
            target_modules=["projection", "v_proj"],
            use_effective_conv2d=True,
            init_weights=False,
        ),  # fmt: skip
        ak.LoKr(r=1, decompose_both=True, targets=["embed", "attn.v"], use_effective_conv2d=True),
    ),
    (
        "lokr-vit-conv2d-full",
        "vit",
        lambda: LoKrConfig(r=8, target_modules=["projection"], init_weights=False),
        ak.LoKr(r=8, targets=["embed"]),
    ),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize(("cid", "family", "make", "ours"), CASES, ids=IDS)
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
        if isinstance(comp, (LoHaLayer, LoKrLayer)):
            got = adapters.components("default")[site]
            assert {k: tuple(v.shape) for k, v in comp.state_dict().items()} == {
                k: tuple(v.shape) for k, v in got.state_dict().items()
            }, site
            assert comp.scaling == got.scaling, site
    # merge equivalence: peft's merge_and_unload == our merge_and_detach
    merged_theirs = pm.merge_and_unload()
    merged_ours = adapters.merge_and_detach()
    a, b = merged_ours.state_dict(), merged_theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL, msg=k)


@pytest.mark.parametrize(("cid", "family", "make", "ours"), CASES, ids=IDS)
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
    # merged == unmerged
    adapters.merge("a")
    torch.testing.assert_close(logits(model, x), expected, **TOL)
    adapters.unmerge("a")
    torch.testing.assert_close(logits(model, x), expected, **TOL)


# --- equations -------------------------------------------------------------------------------------------
def _one_linear(cfg: ak.AdapterConfig, in_dim: int = 24, out_dim: int = 36):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_dim, out_dim))
    adapters = ak.attach(model)
    adapters.add("a", cfg.replace(targets=["0"], init_weights=False))
    return model, adapters, adapters.components("a")["0"]


@pytest.mark.parametrize("r", [3, 7])
def test_loha_equation(r):
    """ΔW = (alpha / r) · (W1a W1b) ⊙ (W2a W2b); y = W x + b + ΔW x (r=3 through the rank-r² factors, r=7
    through the dense ΔW: 49 · (24 + 36) > 24 · 36)."""
    model, _, comp = _one_linear(ak.LoHa(r=r, alpha=5))
    assert comp._factored() == (r == 3)
    lin = model[0]
    x = torch.randn(2, 4, 24)
    with torch.no_grad():
        delta = (comp.hada_w1_a @ comp.hada_w1_b) * (comp.hada_w2_a @ comp.hada_w2_b) * (5 / r)
        torch.testing.assert_close(comp.delta_weight(lin), delta)
        torch.testing.assert_close(model(x), x @ (lin.weight + delta).T + lin.bias, atol=1e-5, rtol=1e-5)
    assert tuple(comp.hada_w1_a.shape) == (36, r) and tuple(comp.hada_w2_b.shape) == (r, 24)


@pytest.mark.parametrize(
    ("cfg", "low_w1", "low_w2"),
    [
        (ak.LoKr(r=8, alpha=4), False, False),  # 36 = 6·6, 24 = 4·6: r >= 6/2, full factors
        (ak.LoKr(r=2, alpha=4), False, True),
        (ak.LoKr(r=2, alpha=4, decompose_both=True), True, True),
        (ak.LoKr(r=1, alpha=2, decompose_factor=3), False, True),  # (3, 12) and (3, 8)
    ],
)
def test_lokr_equation(cfg, low_w1, low_w2):
    """ΔW = (alpha / r) · (C ⊗ D); y = W x + b + ΔW x, computed as vec(C X Dᵀ) without building ΔW."""
    model, _, comp = _one_linear(cfg)
    lin = model[0]
    a, b = factorization(36, cfg.decompose_factor)
    c, d = factorization(24, cfg.decompose_factor)
    assert comp.shape == (a, b, c, d)
    assert (not comp.use_w1, not comp.use_w2) == (low_w1, low_w2)
    x = torch.randn(2, 4, 24)
    with torch.no_grad():
        C = comp.lokr_w1 if comp.use_w1 else comp.lokr_w1_a @ comp.lokr_w1_b
        D = comp.lokr_w2 if comp.use_w2 else comp.lokr_w2_a @ comp.lokr_w2_b
        assert tuple(C.shape) == (a, c) and tuple(D.shape) == (b, d)
        delta = torch.kron(C, D) * (cfg.alpha / cfg.r)
        torch.testing.assert_close(comp.delta_weight(lin), delta)
        torch.testing.assert_close(model(x), x @ (lin.weight + delta).T + lin.bias, atol=1e-5, rtol=1e-5)


def test_lokr_factorization_is_peft_s():
    for dim in (1, 2, 7, 24, 32, 36, 64, 96, 127, 128, 256, 768, 3072, 4096, 11008):
        for factor in (-1, 2, 3, 4, 8, 16, 5):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize(
    "cfg",
    [
        ak.LoHa(r=2, alpha=3),
        ak.LoHa(r=2, alpha=3, use_effective_conv2d=True),
        ak.LoKr(r=1, alpha=3),
        ak.LoKr(r=1, alpha=3, use_effective_conv2d=True),
        ak.LoKr(r=8),
    ],
    ids=["loha", "loha-cp", "lokr", "lokr-cp", "lokr-full"],
)
def test_conv2d_equation(cfg):
    """ΔW from the factors (flat, or with the CP/Tucker core: ``einsum('ijkl,jr,ip->prkl')`` as peft), applied
    as the convolution with ``W + ΔW``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1))
    adapters = ak.attach(model)
    adapters.add("a", cfg.replace(targets=["0"], init_weights=False))
    conv, comp = model[0], adapters.components("a")["0"]
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        delta = comp.delta_weight(conv)
        assert tuple(delta.shape) == (6, 4, 3, 3)
        torch.testing.assert_close(delta, _conv_reference(comp), atol=1e-6, rtol=1e-5)
        expected = F.conv2d(x, conv.weight + delta, conv.bias, stride=2, padding=1)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def _conv_reference(comp) -> torch.Tensor:
    """ΔW of a Conv2d component from its tensors, written the way LyCORIS/peft write it (4-D Kronecker product)."""
    out, inp, (kh, kw) = comp.out_dim, comp.in_dim, comp.kernel
    if isinstance(comp, LoHaLayer):
        if comp.cp:
            one = torch.einsum("ijkl,jr,ip->prkl", comp.hada_t1, comp.hada_w1_b, comp.hada_w1_a)
            two = torch.einsum("ijkl,jr,ip->prkl", comp.hada_t2, comp.hada_w2_b, comp.hada_w2_a)
            return one * two * comp.scaling
        flat = (comp.hada_w1_a @ comp.hada_w1_b) * (comp.hada_w2_a @ comp.hada_w2_b)
        return (flat * comp.scaling).reshape(out, inp, kh, kw)
    a, b, c, d = comp.shape
    C = comp.lokr_w1 if comp.use_w1 else comp.lokr_w1_a @ comp.lokr_w1_b
    if comp.use_w2:
        D = comp.lokr_w2
    elif comp.cp:
        D = torch.einsum("ijkl,ip,jr->prkl", comp.lokr_t2, comp.lokr_w2_a, comp.lokr_w2_b)
    else:
        D = (comp.lokr_w2_a @ comp.lokr_w2_b).reshape(b, d, kh, kw)
    return torch.kron(C[:, :, None, None], D) * comp.scaling


def test_init_is_identity_with_peft_s_zero_factor():
    loha = _init_comp(ak.LoHa(r=2))
    assert torch.count_nonzero(loha.hada_w2_b) == 0 and torch.count_nonzero(loha.hada_w2_a) > 0
    lokr = _init_comp(ak.LoKr(r=2))
    assert torch.count_nonzero(lokr.lokr_w1) == 0 and torch.count_nonzero(lokr.lokr_w2_b) > 0
    both = _init_comp(ak.LoKr(r=1, decompose_both=True))
    assert torch.count_nonzero(both.lokr_w1_a) == 0 and torch.count_nonzero(both.lokr_w1_b) > 0
    lycoris = _init_comp(ak.LoKr(r=2, init_weights="lycoris"))
    assert torch.count_nonzero(lycoris.lokr_w2_b) == 0 and torch.count_nonzero(lycoris.lokr_w1) > 0
    full = _init_comp(ak.LoKr(r=8, init_weights="lycoris"))
    assert torch.count_nonzero(full.lokr_w2) == 0
    for comp in (loha, lokr, both, lycoris, full):
        assert torch.count_nonzero(comp.delta_weight(None)) == 0


def _init_comp(cfg):
    model = nn.Sequential(nn.Linear(24, 36))
    adapters = ak.attach(model)
    adapters.add("a", cfg.replace(targets=["0"]))
    return adapters.components("a")["0"]


# --- training-mode dropouts equal peft's for the same seed ----------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(24, 36)
        self.down = nn.Linear(36, 24)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [
        (
            lambda: LoHaConfig(
                r=2, rank_dropout=0.3, module_dropout=0.4, target_modules=["up", "down"], init_weights=False
            ),
            ak.LoHa(r=2, rank_dropout=0.3, module_dropout=0.4, targets=["up", "down"]),
        ),
        (
            lambda: LoKrConfig(
                r=1,
                rank_dropout=0.3,
                module_dropout=0.4,
                rank_dropout_scale=True,
                target_modules=["up", "down"],
                init_weights=False,
            ),  # fmt: skip
            ak.LoKr(r=1, rank_dropout=0.3, module_dropout=0.4, rank_dropout_scale=True, targets=["up", "down"]),
        ),
        (
            lambda: LoHaConfig(r=2, rank_dropout=0.5, target_modules=["up", "down"], init_weights=False),
            ak.LoHa(r=2, rank_dropout=0.5, targets=["up", "down"]),
        ),
        (
            lambda: LoKrConfig(r=1, rank_dropout=0.5, target_modules=["up", "down"], init_weights=False),
            ak.LoKr(r=1, rank_dropout=0.5, targets=["up", "down"]),
        ),
    ],
    ids=["loha", "lokr", "loha-rank-only", "lokr-rank-only"],
)
def test_training_dropouts_equal_peft_s(theirs, ours, tmp_path):
    torch.manual_seed(0)
    pm = get_peft_model(MLP(), theirs())
    perturb(trainable(pm))
    pm.save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    model = MLP()
    adapters = ak.attach(model)
    adapters.load(tmp_path, name="a")
    assert adapters.config("a") == ours.replace(targets=adapters.config("a").targets, init_weights=True)
    pm.train()
    model.train()
    x = torch.randn(5, 24)
    outs = set()
    for step in range(8):
        torch.manual_seed(step)
        expected = pm(x)
        torch.manual_seed(step)
        got = model(x)
        torch.testing.assert_close(got, expected, **TOL)
        outs.add(round(got.sum().item(), 4))
    assert len(outs) > 1  # the dropouts did act


# --- refusals --------------------------------------------------------------------------------------------
def test_effective_conv2d_keeps_1x1_convolutions_flat():
    model = nn.Sequential(nn.Conv2d(4, 6, 1), nn.Conv2d(6, 6, 3, padding=1))
    adapters = ak.attach(model)
    adapters.add("a", ak.LoHa(r=2, targets=["0", "1"], use_effective_conv2d=True))
    adapters.add("b", ak.LoKr(r=1, targets=["0", "1"], use_effective_conv2d=True))
    a, b = adapters.components("a"), adapters.components("b")
    assert not a["0"].cp and a["1"].cp and tuple(a["1"].hada_t1.shape) == (2, 2, 3, 3)
    assert not b["0"].cp and b["1"].cp and tuple(b["1"].lokr_t2.shape) == (1, 1, 3, 3)


def test_conv1d_export_to_peft_is_refused(tmp_path):
    adapters = ak.attach(make_model("gpt2"))
    adapters.add("a", ak.LoKr(r=2))
    with pytest.raises(ValueError, match="Conv1D"):
        adapters.export("a", tmp_path, format="peft")
    adapters.export("a", tmp_path / "native", format="native")  # the native format holds it
    assert not (tmp_path / "adapter_config.json").exists()


def test_bad_configs():
    for bad in (
        lambda: ak.LoHa(r=0),
        lambda: ak.LoHa(rank_dropout=1.0),
        lambda: ak.LoHa(module_dropout=-0.1),
        lambda: ak.LoKr(decompose_factor=0),
        lambda: ak.LoKr(init_weights="gaussian"),
        lambda: ak.LoKr(rank_pattern={"q": 0}),
    ):
        with pytest.raises(ValueError):
            bad()


def test_lokr_file_with_wrong_form_is_refused(tmp_path):
    """A file whose tensors are not the form (full/low-rank) its config implies does not load."""
    pm = get_peft_model(make_model("llama"), LoKrConfig(r=1, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path))
    cfg_path = Path(tmp_path) / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["r"] = 16  # would need a full lokr_w2
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(AdapterFileError, match="does not fit"):
        ak.attach(make_model("llama")).load(tmp_path)


# --- per-row routing takes the batched path ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "first", "second"),
    [
        (
            "llama",
            ak.LoHa(r=2, targets=["attn.q", "ffn.down"]),
            ak.LoHa(r=3, alpha=2, targets=["attn.q", "attn.v"]),
        ),
        ("bert", ak.LoHa(r=8), ak.LoHa(r=1)),  # dense ΔW per call, batched factors when routed
        (
            "llama",
            ak.LoKr(r=1, decompose_both=True, targets=["attn.q", "ffn.down"]),
            ak.LoKr(r=8, targets=["attn.q"]),
        ),
    ],
    ids=["loha", "loha-dense", "lokr"],
)
def test_routing_is_batched(family, first, second, monkeypatch):
    model = make_model(family)
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", first.replace(init_weights=False))
    adapters.add("b", second.replace(init_weights=False))
    rows = ["a", None, "b", "a", "b"]
    x = make_inputs(family, batch=len(rows))
    singles = []
    for i, name in enumerate(rows):
        with adapters.use(name):
            singles.append(logits(model, {k: v[i : i + 1] for k, v in x.items()}))

    def no_fallback(self, *args):
        raise AssertionError("per-adapter fallback used")

    cls = type(adapters.components("a")[next(iter(adapters.components("a")))])
    monkeypatch.setattr(cls, "post", no_fallback)
    with adapters.route(rows):
        mixed = logits(model, x)
    torch.testing.assert_close(mixed, torch.cat(singles), **TOL)


@pytest.mark.parametrize(
    "cfg",
    [ak.LoHa(r=2), ak.LoHa(r=8), ak.LoKr(r=1, decompose_both=True), ak.LoKr(r=8)],
    ids=["loha", "loha-dense", "lokr", "lokr-full"],
)
def test_bfloat16_base(cfg):
    """Adapter tensors are float32 on a bfloat16 base; outputs keep the base dtype; merge matches unmerged."""
    model = make_model("llama").to(torch.bfloat16)
    adapters = ak.attach(model)
    adapters.add("a", cfg.replace(init_weights=False))
    assert all(p.dtype == torch.float32 for p in adapters.parameters("a"))
    x = make_inputs("llama")
    out = output_of(model, x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with torch.no_grad():
        adapters.merge("a")
        merged = output_of(model, x)
    torch.testing.assert_close(merged.float(), out.float(), atol=0.1, rtol=0.05)


# --- ABBA (LoHa with independently ranked pairs and the SVD init) ------------------------------------------
@pytest.mark.parametrize(("r1", "r2"), [(2, 3), (3, 3), (5, 6)])
def test_abba_equation(r1, r2):
    """ABBA §3: ΔW = s · (B1 A1) ⊙ (B2 A2), s = alpha / √(r1 r2), rank up to r1 · r2; (2, 3) through the row-wise
    Khatri–Rao factors, (5, 6) through the dense ΔW (30 · (24 + 36) > 24 · 36)."""
    model, _, comp = _one_linear(ak.LoHa(r=r1, r2=r2, alpha=5))
    assert comp._factored() == (r1 * r2 <= 14)
    lin = model[0]
    B1, A1, B2, A2 = comp.hada_w1_a, comp.hada_w1_b, comp.hada_w2_a, comp.hada_w2_b
    assert [tuple(t.shape) for t in (B1, A1, B2, A2)] == [(36, r1), (r1, 24), (36, r2), (r2, 24)]
    x = torch.randn(2, 4, 24)
    with torch.no_grad():
        delta = (5 / (r1 * r2) ** 0.5) * (B1 @ A1) * (B2 @ A2)
        torch.testing.assert_close(comp.delta_weight(lin), delta)
        torch.testing.assert_close(model(x), x @ (lin.weight + delta).T + lin.bias, atol=1e-5, rtol=1e-5)
        exact = (B1.double() @ A1.double()) * (B2.double() @ A2.double())
        assert int(torch.linalg.matrix_rank(exact)) == min(r1 * r2, 24)  # the Hadamard product's rank (§3.1)
        # the Khatri–Rao form: (B1 A1) ⊙ (B2 A2) = (B1 ⊙_row B2)(A1 ⊙_col A2)
        u, v = comp._uv()
        torch.testing.assert_close(u @ v, (B1 @ A1) * (B2 @ A2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "vit"])
def test_abba_init_is_the_truncated_svd_of_the_frozen_weight(family):
    """ABBA §3.3: B1 A1 is the best rank-r1 approximation of W0 (B1 = U√Σ, A1 = √ΣVᵀ), B2 = 0, A2 random: ΔW = 0,
    outputs unchanged at init; on a Conv2d the flattened (out, in·kh·kw) weight."""
    from adapterkit.backends import backend_for

    model = make_model(family)
    x = make_inputs(family)
    base = logits(model, x)
    adapters = ak.attach(model)
    target = "embed" if family == "vit" else "attn.q"
    adapters.add("a", ak.LoHa(r=3, r2=2, init_weights="abba", targets=[target]))
    torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)
    for site, comp in adapters.components("a").items():
        module = adapters._sites[site].module
        W = backend_for(module).read(module).reshape(comp.out_dim, -1).double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        torch.testing.assert_close((comp.hada_w1_a @ comp.hada_w1_b).double(), best, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            comp.hada_w1_a.double().norm(dim=0) ** 2, S[:3], atol=1e-5, rtol=1e-5
        )  # √Σ each
        assert torch.count_nonzero(comp.hada_w2_a) == 0 and torch.count_nonzero(comp.hada_w2_b) > 0


def test_abba_exports_to_peft_only_with_equal_ranks(tmp_path):
    """peft's LoHa has one rank for both pairs: r2 == r exports (ABBA's init is only an init: peft's logits equal
    ours); r2 != r is refused naming the module, and the native format holds it."""
    family = "llama"
    x = make_inputs(family)
    model = make_model(family)
    adapters = ak.attach(model)
    adapters.add("a", ak.LoHa(r=2, r2=2, alpha=3, init_weights="abba"))
    perturb(adapters.parameters("a"))
    adapters.export("a", tmp_path / "peft", format="peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["init_weights"] is True
    pm = PeftModel.from_pretrained(make_model(family), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(pm, x), logits(model, x), **TOL)
    adapters.add("b", ak.LoHa(r=2, r2=3, init_weights="abba"))
    with pytest.raises(ValueError, match="different ranks.*r2=3"):
        adapters.export("b", tmp_path / "refused", format="peft")
    assert not (tmp_path / "refused").exists()
    adapters.save("b", tmp_path / "native")
    other = ak.attach(make_model(family))
    other.load(tmp_path / "native")
    with adapters.use("b"):
        expected = logits(model, x)
    with other.use("b"):
        torch.testing.assert_close(logits(other.model, x), expected, atol=0, rtol=0)


def test_abba_bad_configs():
    for bad, match in (
        (lambda: ak.LoHa(r2=0), "r2"),
        (lambda: ak.LoHa(r2=2.5), "r2"),
        (lambda: ak.LoHa(init_weights="svd"), "init_weights"),
        (lambda: ak.LoHa(init_weights="abba", use_effective_conv2d=True), "use_effective_conv2d"),
    ):
        with pytest.raises(ValueError, match=match):
            bad()


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (
            ak.LoKr(r=4, alpha=8, targets=["attn.q", "attn.v"]),
            LoKrConfig(r=4, alpha=8, target_modules=["query", "value"]),
        ),
        (
            ak.LoKr(r=2, alpha=8, decompose_both=True, decompose_factor=4, targets=["attn.q", "attn.v"]),
            LoKrConfig(r=2, alpha=8, decompose_both=True, decompose_factor=4, target_modules=["query", "value"]),
        ),
        (
            ak.LoHa(r=4, alpha=8, targets=["attn.q", "attn.v"]),
            LoHaConfig(r=4, alpha=8, target_modules=["query", "value"]),
        ),
    ],
    ids=["lokr", "lokr-both", "loha"],
)
def test_init_draws_equal_peft_s_under_one_seed(ours, theirs):
    """Under one seed our default init gives the very factors peft's does (same draws, same order, the zeroed factor
    not drawn), so a training run beside peft's at the same seed starts from the same adapter (the SST-2 rows)."""
    model, ref = make_model("bert"), make_model("bert")
    torch.manual_seed(7)
    adapters = ak.attach(model)
    adapters.add("a", ours)
    torch.manual_seed(7)
    ref = get_peft_model(ref, theirs)
    mine = {
        f"{site}.{n}": p for site, comp in adapters.components("a").items() for n, p in comp.named_parameters()
    }
    theirs_ = {n: p for n, p in ref.named_parameters() if n.rsplit(".", 2)[-2].startswith(("lokr_", "hada_"))}
    assert len(mine) == len(theirs_) > 0
    for (k, v), (n, p) in zip(mine.items(), theirs_.items()):
        assert k.rsplit(".", 1)[-1] == n.rsplit(".", 2)[-2], (k, n)
        torch.testing.assert_close(v.detach(), p.detach(), rtol=0, atol=0, msg=f"{k} vs {n}")
