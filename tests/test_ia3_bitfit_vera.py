"""(IA)^3, BitFit and VeRA: the paper equations, peft equivalence both ways (float32 logits within 1e-5),
merge equivalence with peft, and the behaviour the contract matrix does not cover (shared VeRA projections,
BitFit training only biases, refused merges).

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
from safetensors.torch import load_file, save_file
from torch import nn

import adapterkit as ak
from adapterkit.formats import AdapterFileError
from adapterkit.methods.bitfit import AddedBias, BiasDelta
from adapterkit.methods.ia3 import IA3InputScale, IA3OutputScale
from adapterkit.methods.vera import VeRALinear
from adapterkit.targeting import TargetError

from conftest import make_inputs, make_model, output_of

peft = pytest.importorskip("peft")
from peft import IA3Config, PeftModel, VeraConfig, get_peft_model  # noqa: E402

warnings.filterwarnings("ignore", module="peft")
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")

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


# --- peft cases: (id, family, peft config factory, our config) ---------------------------------------
IA3_CASES = [
    ("bert-default", "bert", lambda: IA3Config(init_ia3_weights=False), None),
    ("gpt2-default", "gpt2", lambda: IA3Config(init_ia3_weights=False), None),  # Conv1D, fused qkv
    ("llama-default", "llama", lambda: IA3Config(init_ia3_weights=False), None),
    ("t5-default", "t5", lambda: IA3Config(init_ia3_weights=False), None),
    (
        "llama-regex-feedforward",
        "llama",
        lambda: IA3Config(
            target_modules=r".*\.(q_proj|up_proj|down_proj)",
            feedforward_modules=r".*\.(up_proj|down_proj)",
            init_ia3_weights=False,
        ),
        None,
    ),
    (
        "bert-heads",
        "bert",
        lambda: IA3Config(
            target_modules=["key", "value", "intermediate.dense"],
            feedforward_modules=["intermediate.dense"],
            modules_to_save=["classifier"],
            init_ia3_weights=False,
        ),
        None,
    ),
]
OURS_IA3 = {
    "bert-default": ak.IA3(),
    "gpt2-default": ak.IA3(),
    "llama-default": ak.IA3(),
    "t5-default": ak.IA3(),
    "llama-regex-feedforward": ak.IA3(
        targets=["attn.q", "ffn.up", "ffn.down"], feedforward=["ffn.up", "ffn.down"]
    ),
    "bert-heads": ak.IA3(targets=["attn.k", "attn.v", "ffn.up"], feedforward="ffn.up", heads=["head"]),
}

VERA_CASES = [
    ("bert", lambda: VeraConfig(r=4, init_weights=False), ak.VeRA(r=4)),
    ("gpt2", lambda: VeraConfig(r=4, target_modules=["c_attn", "c_fc"], init_weights=False), None),
    ("llama", lambda: VeraConfig(r=8, target_modules=["q_proj", "k_proj", "down_proj"], init_weights=False), None),
    ("t5", lambda: VeraConfig(r=4, projection_prng_key=11, d_initial=0.5, init_weights=False), None),
]
OURS_VERA = {
    "bert": ak.VeRA(r=4),
    "gpt2": ak.VeRA(r=4, targets=["attn.qkv", "ffn.up"]),
    "llama": ak.VeRA(r=8, targets=["attn.q", "attn.k", "ffn.down"]),
    "t5": ak.VeRA(r=4, projection_prng_key=11, d_initial=0.5),
}


def _peft_to_ours(family: str, peft_config: Any, tmp_path: Path) -> tuple[nn.Module, ak.Adapters, torch.Tensor]:
    x = make_inputs(family)
    base = logits(make_model(family), x)
    pm = get_peft_model(make_model(family), peft_config).eval()
    perturb(trainable(pm))
    expected = logits(pm, x)
    nontrivial(expected, base)
    pm.save_pretrained(str(tmp_path))
    model = make_model(family)
    adapters = ak.attach(model)
    assert adapters.load(tmp_path) == "default"
    torch.testing.assert_close(logits(model, x), expected, **TOL)
    return model, adapters, expected


def _ours_to_peft(family: str, config: ak.AdapterConfig, tmp_path: Path) -> tuple[ak.Adapters, PeftModel]:
    x = make_inputs(family)
    model = make_model(family)
    base = logits(model, x)
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", config.replace(init_weights=False))
    perturb(adapters.parameters("a"))
    expected = logits(model, x)
    nontrivial(expected, base)
    adapters.export("a", tmp_path, format="peft")
    pm = PeftModel.from_pretrained(make_model(family), str(tmp_path)).eval()
    torch.testing.assert_close(logits(pm, x), expected, **TOL)
    return adapters, pm


def _assert_same_weights(ours: nn.Module, theirs: nn.Module) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL, msg=k)


# --- (IA)^3 --------------------------------------------------------------------------------------------
def test_ia3_equations_on_a_linear():
    """§3.3: keys/values ``l ⊙ (W x + b)``; FFN ``W (l ⊙ x) + b``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    x = torch.randn(3, 6)
    adapters = ak.attach(model)
    adapters.add("a", ak.IA3(targets=["0", "2"], feedforward=["2"], init_weights=False))
    comps = adapters.components("a")
    assert isinstance(comps["0"], IA3OutputScale) and isinstance(comps["2"], IA3InputScale)
    l_out, l_in = comps["0"].scale.detach(), comps["2"].scale.detach()
    lin0, lin2 = model[0], model[2]
    expected = (l_in * torch.relu(l_out * (x @ lin0.weight.T + lin0.bias))) @ lin2.weight.T + lin2.bias
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("cid", "family", "make"), [c[:3] for c in IA3_CASES], ids=[c[0] for c in IA3_CASES])
def test_ia3_peft_to_adapterkit(cid, family, make, tmp_path):
    model, adapters, expected = _peft_to_ours(family, make(), tmp_path)
    comps = adapters.components("default")
    ff = {s for s, c in comps.items() if isinstance(c, IA3InputScale)}
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["feedforward_modules"]
    assert ff and all(s.endswith(tuple(saved)) if isinstance(saved, list) else True for s in ff)
    # the loaded adapter saves and loads natively, and merges to the same outputs
    adapters.save("default", tmp_path / "native")
    fresh = make_model(family)
    ak.attach(fresh).load(tmp_path / "native")
    torch.testing.assert_close(logits(fresh, make_inputs(family)), expected, **TOL)
    adapters.merge("default")
    torch.testing.assert_close(logits(model, make_inputs(family)), expected, **TOL)


@pytest.mark.parametrize(("cid", "family"), [c[:2] for c in IA3_CASES], ids=[c[0] for c in IA3_CASES])
def test_ia3_adapterkit_to_peft(cid, family, tmp_path):
    adapters, pm = _ours_to_peft(family, OURS_IA3[cid], tmp_path)
    assert set(pm.peft_config["default"].feedforward_modules) == {
        s for s, c in adapters.components("a").items() if isinstance(c, IA3InputScale)
    }
    # merge equivalence: peft's merge_and_unload == our merge_and_detach
    ours = adapters.merge_and_detach(["a"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = pm.merge_and_unload()
    _assert_same_weights(ours, theirs)


def test_ia3_merge_scales_bias_and_unmerge_restores():
    model, x = make_model("bert"), make_inputs("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", ak.IA3(init_weights=False))
    unmerged = logits(model, x)
    adapters.merge("a")
    key = "bert.encoder.layer.0.attention.self.key"
    comp = adapters.components("a")[key]
    torch.testing.assert_close(model.state_dict()[key + ".bias"], before[key + ".bias"] * comp.scale.detach())
    torch.testing.assert_close(logits(model, x), unmerged, **TOL)
    adapters.unmerge("a")
    for k, v in before.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_ia3_zero_scale_merge_is_refused_and_nothing_changes(bad):
    # random (non-identity) vectors: undoing the sites merged before the refusal by division would leave the
    # weights one ulp off, so every site is checked before any weight changes
    model, x = make_model("llama"), make_inputs("llama")
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", ak.IA3(init_weights=False))
    site = "model.layers.1.mlp.down_proj"  # the last site: every other one would be merged first
    assert list(adapters.components("a"))[-1] == site
    with torch.no_grad():
        adapters.components("a")[site].scale[0] = bad
    before = {k: v.clone() for k, v in model.state_dict().items() if ".ak_adapters." not in k}  # the base
    out = logits(model, x)
    with pytest.raises(ValueError, match=f"adapter 'a' cannot be merged at '{site}'.*zeros or non-finite"):
        adapters.merge("a")
    assert not adapters.is_merged("a")
    assert all(not c.merged for c in adapters.components("a").values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    torch.testing.assert_close(logits(model, x), out, rtol=0, atol=0, equal_nan=True)  # bit-identical
    # merge_and_detach is all-or-nothing over several adapters: a good one is not left merged
    adapters.add("b", ak.LoRA(init_weights=False))
    with pytest.raises(ValueError, match="zeros or non-finite"):
        adapters.merge_and_detach(["b", "a"])
    assert adapters.names == ["a", "b"] and not adapters.is_merged("a") and not adapters.is_merged("b")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_ia3_feedforward_must_pick_a_target():
    adapters = ak.attach(make_model("llama"))
    with pytest.raises(TargetError, match="feedforward"):
        adapters.add("a", ak.IA3(targets=["attn.k"], feedforward=["ffn.down"]))
    assert adapters.names == []
    # the default feedforward role simply does not apply to targets that are not FFN down projections
    adapters.add("b", ak.IA3(targets=["attn.k"]))
    assert all(isinstance(c, IA3OutputScale) for c in adapters.components("b").values())


def test_ia3_config_json_round_trip():
    from adapterkit.config import config_from_dict

    cfg = ak.IA3(targets=["attn.k", nn.Linear], feedforward=[nn.Linear])
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# --- VeRA ------------------------------------------------------------------------------------------------
def test_vera_equation_and_shared_projection():
    """§3 Eq. 2: ``h = W x + Λ_b B Λ_d A x``, with one A/B pair for every layer (sliced per layer)."""
    model = make_model("gpt2")
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", ak.VeRA(r=4, targets=["attn.qkv", "ffn.up", "ffn.down"], init_weights=False))
    comps = list(adapters.components("a").values())
    assert all(isinstance(c, VeRALinear) for c in comps)
    assert len({id(c.projection) for c in comps}) == 1  # one shared pair
    proj = comps[0].projection
    assert tuple(proj.A.shape) == (4, 128) and tuple(proj.B.shape) == (128, 4)  # in_max (c_proj), out_max (c_fc)
    c = adapters.components("a")["transformer.h.0.mlp.c_proj"]
    module = model.transformer.h[0].mlp.c_proj
    z = torch.randn(2, 3, 128)
    with torch.no_grad():
        expected = module.weight.T @ z[..., None]  # base (Conv1D), (.., out, 1)
        delta = torch.diag(c.lambda_b) @ proj.B[:32] @ torch.diag(c.lambda_d) @ proj.A[:, :128]
        expected = expected[..., 0] + module.bias + z @ delta.T
        torch.testing.assert_close(module(z), expected, atol=1e-5, rtol=1e-5)
    # only the vectors are parameters; the projections are neither trained nor saved
    assert {n for n, _ in comps[0].named_parameters()} == {"lambda_b", "lambda_d"}
    assert set(comps[0].state_dict()) == {"lambda_b", "lambda_d"}


@pytest.mark.parametrize(("family", "make", "_"), VERA_CASES, ids=[c[0] for c in VERA_CASES])
def test_vera_projection_matches_peft(family, make, _):
    pm = get_peft_model(make_model(family), make())
    adapters = ak.attach(make_model(family))
    adapters.add("a", OURS_VERA[family])
    proj = next(iter(adapters.components("a").values())).projection
    assert torch.equal(proj.A, pm.base_model.vera_A["default"])
    assert torch.equal(proj.B, pm.base_model.vera_B["default"])


@pytest.mark.parametrize(("family", "make", "_"), VERA_CASES, ids=[c[0] for c in VERA_CASES])
def test_vera_peft_to_adapterkit(family, make, _, tmp_path):
    model, adapters, expected = _peft_to_ours(family, make(), tmp_path)
    adapters.merge("default")
    torch.testing.assert_close(logits(model, make_inputs(family)), expected, **TOL)


@pytest.mark.parametrize("family", list(OURS_VERA))
def test_vera_adapterkit_to_peft(family, tmp_path):
    adapters, pm = _ours_to_peft(family, OURS_VERA[family], tmp_path)
    assert pm.peft_config["default"].save_projection
    ours = adapters.merge_and_detach(["a"])
    theirs = pm.merge_and_unload()
    _assert_same_weights(ours, theirs)


def test_vera_peft_without_saved_projection_loads(tmp_path):
    make = lambda: VeraConfig(r=4, save_projection=False, init_weights=False)  # noqa: E731
    _peft_to_ours("llama", make(), tmp_path)
    assert not any("vera_A" in k for k in load_file(tmp_path / "adapter_model.safetensors"))


def test_vera_peft_file_with_foreign_projection_is_refused(tmp_path):
    pm = get_peft_model(make_model("bert"), VeraConfig(r=4, init_weights=False))
    pm.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] + 0.01
    save_file(tensors, path)
    adapters = ak.attach(make_model("bert"))
    with pytest.raises(AdapterFileError, match="projection_prng_key"):
        adapters.load(tmp_path)
    assert adapters.names == []


def test_vera_native_file_holds_no_projection(tmp_path):
    model, x = make_model("llama"), make_inputs("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.VeRA(r=8, init_weights=False))
    adapters.save("a", tmp_path)
    keys = load_file(tmp_path / "adapter.safetensors")
    assert keys and all(k.endswith((".lambda_b", ".lambda_d")) for k in keys)
    fresh = make_model("llama")
    ak.attach(fresh).load(tmp_path)
    torch.testing.assert_close(logits(fresh, x), logits(model, x), atol=0, rtol=0)


def test_vera_bad_config():
    with pytest.raises(ValueError, match="rank"):
        ak.VeRA(r=0)
    with pytest.raises(ValueError, match="dropout"):
        ak.VeRA(dropout=1.0)


# --- BitFit ------------------------------------------------------------------------------------------------
def _train(model: nn.Module, adapters: ak.Adapters, name: str, family: str, steps: int = 5) -> None:
    adapters.train(name)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = make_inputs(family)
    for _ in range(steps):
        opt.zero_grad()
        output_of(model, x).pow(2).mean().backward()
        opt.step()
    model.eval()


def test_bitfit_sites_are_biases_except_heads():
    adapters = ak.attach(make_model("bert"))
    adapters.add("a", ak.BitFit())
    sites = adapters.components("a")
    assert "classifier" not in sites and "bert.pooler.dense" in sites
    assert any(n.endswith("LayerNorm") for n in sites)
    assert all(isinstance(c, BiasDelta) and not isinstance(c, AddedBias) for c in sites.values())
    modules = dict(adapters.model.named_modules())
    assert all(c.delta.shape == modules[n].bias.shape for n, c in sites.items())


def test_bitfit_equals_changing_the_biases():
    """BitFit §3: the model with bias deltas is the base model with ``b + Δb``."""
    model, x = make_model("bert"), make_inputs("bert")
    adapters = ak.attach(model)
    adapters.add("a", ak.BitFit(init_weights=False))
    reference = make_model("bert")
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for n, c in adapters.components("a").items():
            modules[n].bias.add_(c.delta)
    torch.testing.assert_close(logits(model, x), logits(reference, x), atol=1e-6, rtol=1e-6)


def test_bitfit_trains_only_biases_and_merges():
    model, x = make_model("bert"), make_inputs("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits(model, x)
    adapters = ak.attach(model)
    adapters.add("a", ak.BitFit())
    _train(model, adapters, "a", "bert")
    trained = logits(model, x)
    nontrivial(trained, base)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items() if "ak_adapters" not in k)
    assert all(c.delta.abs().sum() > 0 for c in adapters.components("a").values())
    adapters.merge("a")
    torch.testing.assert_close(logits(model, x), trained, **TOL)
    changed = {k for k, v in before.items() if not torch.equal(v, model.state_dict()[k])}
    assert changed and all(k.endswith(".bias") for k in changed)
    adapters.unmerge("a")
    torch.testing.assert_close(logits(model, x), trained, **TOL)


def test_bitfit_add_missing_on_llama():
    model, x = make_model("llama"), make_inputs("llama")
    base = logits(model, x)
    adapters = ak.attach(model)
    with pytest.raises(TargetError, match="add_missing"):
        adapters.add("plain", ak.BitFit())
    adapters.add("a", ak.BitFit(add_missing=True))
    comps = adapters.components("a")
    assert comps and all(isinstance(c, AddedBias) for c in comps.values())
    assert "lm_head" not in comps and not any("norm" in n for n in comps)
    torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)
    _train(model, adapters, "a", "llama")
    nontrivial(logits(model, x), base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="cannot be merged.*model.layers"):
        adapters.merge("a")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    adapters.detach()
    torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)


def test_bitfit_explicit_targets_need_a_bias():
    adapters = ak.attach(make_model("t5"))
    with pytest.raises(TargetError, match="add_missing"):
        adapters.add("a", ak.BitFit(targets=["attn.q"]))
    with pytest.raises(TargetError, match="no module with a bias"):
        adapters.add("a", ak.BitFit())
    adapters.add("a", ak.BitFit(targets=["attn.q"], add_missing=True))
    assert adapters.names == ["a"]


# --- composition: per-row routing and stacking work for all three -----------------------------------------
@pytest.mark.parametrize(
    ("family", "config"),
    [("llama", ak.IA3()), ("bert", ak.BitFit()), ("gpt2", ak.VeRA(r=4))],
    ids=["ia3", "bitfit", "vera"],
)
def test_routing_equals_per_row_runs(family, config):
    model, x = make_model(family), make_inputs(family)
    adapters = ak.attach(model)
    for seed, name in enumerate(["a", "b"]):
        torch.manual_seed(seed)
        adapters.add(name, config.replace(init_weights=False))
        perturb(adapters.parameters(name), seed=seed)
    with adapters.route(["b", None]):
        routed = logits(model, x)
    with adapters.use("b"):
        row0 = logits(model, x)[0]
    with adapters.use():
        base = logits(model, x)
    torch.testing.assert_close(routed[0], row0, **TOL)
    torch.testing.assert_close(routed[1], base[1], **TOL)
    nontrivial(routed[0], base[0])
