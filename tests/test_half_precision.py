"""Adapters on float16/bfloat16 bases: float32 adapter tensors by default (peft's ``autocast_adapter_dtype``).

Stored in the base dtype, one AdamW step at lr 1e-5 changed no adapter weight of a bf16 model (updates below
half a bf16 ulp round away). By default the adapter's tensors are float32 and its branch is computed in float32;
outputs keep the base dtype. ``autocast_adapter_dtype=False`` (on ``add`` or the controller) keeps the base dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch

import adapterkit as ak

from conftest import make_inputs, make_model

BF16 = torch.bfloat16

# one row per method family (and the LoRA variants with their own forward): (id, family, config)
CASES = [
    ("lora", "llama", ak.LoRA(r=4, init_weights=False)),
    ("lora-gpt2-conv1d", "gpt2", ak.LoRA(r=4, init_weights=False, targets=["attn.qkv"])),
    ("lora-embed-bias", "bert", ak.LoRA(r=4, init_weights=False, targets=["embed", "attn.q"], bias="lora_only")),
    ("dora", "llama", ak.LoRA(r=4, dora=True, init_weights=False, targets=["attn.q", "ffn.down"])),
    ("pissa", "llama", ak.LoRA(r=4, init="pissa", targets=["attn.q", "attn.v"])),
    ("bottleneck", "llama", ak.Bottleneck(placement="houlsby", ln_before=True, ln_after=True)),
    ("compacter", "bert", ak.get_config("compacter", reduction_factor=8, init_weights=False)),
    ("vera", "llama", ak.VeRA(r=4, targets=["attn.q", "attn.k", "ffn.down"])),
    ("ia3", "llama", ak.IA3()),
    ("bitfit", "bert", ak.BitFit()),
    ("invertible", "llama", ak.Invertible(reduction_factor=4)),
    ("loreft", "llama", ak.LoReFT(prefix=2, suffix=1)),
    ("prompt", "llama", ak.PromptTuning(num_virtual_tokens=3)),
    ("prefix", "llama", ak.PrefixTuning(num_virtual_tokens=3)),
    ("prefix-projection", "llama", ak.PrefixTuning(num_virtual_tokens=3, prefix_projection=True)),
    ("unipelt", "llama", ak.get_config("unipelt")),
    ("mam", "bert", ak.get_config("mam")),
    ("heads", "bert", ak.LoRA(r=4, heads=["head"])),
]
IDS = [c[0] for c in CASES]


def _bf16(family: str) -> torch.nn.Module:
    return make_model(family).to(BF16)


def _loss(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits.float().pow(2).mean()


def _own(adapters: ak.Adapters, name: str) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters by qualified name, head copies excluded (they keep the base dtype)."""
    out = {}
    for site, comp in adapters.components(name).items():
        if adapters.sites(name)[site] != "head":
            out.update({f"{site}.{k}": p for k, p in comp.named_parameters()})
    return out


@pytest.mark.parametrize(("family", "config"), [c[1:] for c in CASES], ids=IDS)
def test_float32_adapter_on_bf16_base_trains(family: str, config: ak.AdapterConfig) -> None:
    model = _bf16(family)
    base = {k: v.dtype for k, v in model.state_dict().items()}
    adapters = ak.attach(model)
    adapters.add("a", config)
    adapters.train("a")
    own = _own(adapters, "a")
    assert own and all(p.dtype == torch.float32 for p in own.values()), {k: p.dtype for k, p in own.items()}
    heads = [c for s, c in adapters.components("a").items() if adapters.sites("a")[s] == "head"]
    assert all(p.dtype == BF16 for c in heads for p in c.parameters())  # head copies: the base dtype
    # the base is untouched (dtypes of all its tensors)
    assert {k: v.dtype for k, v in model.state_dict().items() if "ak_adapters" not in k} == base

    inputs = make_inputs(family)
    model.train()
    out = model(**inputs).logits
    assert out.dtype == BF16
    out.float().pow(2).mean().backward()
    before = {k: p.detach().clone() for k, p in own.items()}
    grads = {k: p.grad for k, p in own.items()}
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values())
    torch.optim.AdamW(list(adapters.parameters("a")), lr=1e-5, weight_decay=0.0).step()
    for k, p in own.items():
        live = grads[k].abs() > 1e-6  # Adam's first step moves these by ~lr; fp32 keeps such a step
        if live.any():
            assert (p.detach() != before[k])[live].all(), f"{k}: a 1e-5 step was rounded away"


@pytest.mark.parametrize(
    ("family", "config"), [CASES[0][1:], CASES[5][1:], CASES[7][1:]], ids=["lora", "bn", "vera"]
)
def test_opt_out_keeps_base_dtype(family: str, config: ak.AdapterConfig) -> None:
    model = _bf16(family)
    adapters = ak.attach(model)
    adapters.add("lo", config, autocast_adapter_dtype=False)
    adapters.add("full", config)
    assert all(p.dtype == BF16 for p in _own(adapters, "lo").values())
    assert all(p.dtype == torch.float32 for p in _own(adapters, "full").values())
    adapters.autocast_adapter_dtype = False  # the controller's default (also for load)
    adapters.add("lo2", config)
    assert all(p.dtype == BF16 for p in _own(adapters, "lo2").values())
    assert adapters.plan(config, autocast_adapter_dtype=True).num_params == adapters.plan(config).num_params
    for name in ("lo", "full", "lo2"):
        with adapters.use(name):
            assert model(**make_inputs(family)).logits.dtype == BF16


def _lora_pair(**add: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A bf16 and an fp32 llama with equal base values and equal LoRA factors."""
    m16 = _bf16("llama")
    m32 = copy.deepcopy(m16).float()
    for m in (m32, m16):
        adapters = ak.attach(m)
        adapters.add("a", ak.LoRA(r=4, init_weights=False), **add)
        adapters.train("a")
        m.train()
    c32, c16 = ak.attach(m32).components("a"), ak.attach(m16).components("a")
    for site, comp in c32.items():
        c16[site].load_state_dict(comp.state_dict())
    return m16, m32


def _steps(model: torch.nn.Module, lr: float, steps: int) -> torch.Tensor:
    """How far all ``lora_A`` moved in ``steps`` AdamW steps on a fixed LM batch (flattened)."""
    adapters = ak.attach(model)
    comps = adapters.components("a")
    start = {n: c.lora_A.detach().float().clone() for n, c in comps.items()}
    opt = torch.optim.AdamW(list(adapters.parameters("a")), lr=lr, weight_decay=0.0)
    inputs = make_inputs("llama", batch=4, seq=12)
    for _ in range(steps):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    return torch.cat([(c.lora_A.detach().float() - start[n]).flatten() for n, c in comps.items()])


def test_bf16_lora_trains_like_fp32() -> None:
    # one step at lr 1e-5: every lora_A entry moves (in bf16 storage: almost none)
    m16, m32 = _lora_pair()
    d16, d32 = _steps(m16, 1e-5, 1), _steps(m32, 1e-5, 1)
    assert (d16 != 0).float().mean() > 0.99
    assert ((d16 - d32).norm() / d32.norm()) < 0.2
    half, _ = _lora_pair(autocast_adapter_dtype=False)
    assert (_steps(half, 1e-5, 1) != 0).float().mean() < 0.05  # the failure the float32 default avoids

    # a few steps at 2e-4: the bf16 model's update is the fp32 model's (same length, same direction)
    m16, m32 = _lora_pair()
    d16, d32 = _steps(m16, 2e-4, 5), _steps(m32, 2e-4, 5)
    assert 0.9 < d16.norm() / d32.norm() < 1.1
    assert ((d16 - d32).norm() / d32.norm()) < 0.15


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_unmerge_on_bf16(dora: bool) -> None:
    model = _bf16("llama")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=4, alpha=16, dora=dora, init_weights=False, targets=["attn.q", "ffn.down"]))
    inputs = make_inputs("llama")
    with torch.no_grad():
        base = ak.attach(model)
        with base.use():
            plain = model(**inputs).logits.float()
        adapted = model(**inputs).logits.float()
        assert (adapted - plain).abs().max() > 0.05  # the adapter does something
        adapters.merge("a")
        assert all(v.dtype == original[k].dtype for k, v in model.state_dict().items() if k in original)
        merged = model(**inputs).logits.float()
        assert torch.allclose(merged, adapted, atol=0.05, rtol=0.05), (merged - adapted).abs().max()
        adapters.unmerge("a")
        assert torch.allclose(model(**inputs).logits.float(), adapted, atol=0.05, rtol=0.05)
    restored = adapters.detach().state_dict()
    for k, v in original.items():  # merge -> unmerge in bf16: exact to bf16 rounding
        assert torch.allclose(restored[k].float(), v.float(), atol=1e-2, rtol=1e-2), k


def test_save_load_round_trip_bf16(tmp_path) -> None:
    model = _bf16("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=4, init_weights=False))
    adapters.train("a")
    model.train()
    _loss(model, make_inputs("llama")).backward()
    torch.optim.AdamW(list(adapters.parameters("a")), lr=1e-5).step()  # values that are not bf16-representable
    model.eval()
    saved = {s: {k: v.clone() for k, v in c.state_dict().items()} for s, c in adapters.components("a").items()}
    inputs = make_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    adapters.save("a", tmp_path / "a")
    adapters.export("a", tmp_path / "peft", format="peft")

    for path in (tmp_path / "a", tmp_path / "peft"):
        other = _bf16("llama")
        loaded = ak.attach(other)
        loaded.load(path, name="a", activate=True)
        for s, c in loaded.components("a").items():
            for k, v in c.state_dict().items():
                assert v.dtype == torch.float32, (path.name, s, k)
                assert torch.equal(v, saved[s][k]), (path.name, s, k)  # float32 file into float32 tensors: exact
        with torch.no_grad():
            out = other(**inputs).logits
        assert torch.equal(out, expected), path.name

    # opted out on load: bf16 tensors; a bf16 file loads into float32 tensors
    half = _bf16("llama")
    ak.attach(half).autocast_adapter_dtype = False
    ak.attach(half).load(tmp_path / "a", name="a")
    comps = ak.attach(half).components("a")
    assert all(v.dtype == BF16 for c in comps.values() for v in c.state_dict().values())
    ak.attach(half).save("a", tmp_path / "half")
    again = _bf16("llama")
    ak.attach(again).load(tmp_path / "half", name="a")
    for s, c in ak.attach(again).components("a").items():
        for k, v in c.state_dict().items():
            assert v.dtype == torch.float32 and torch.equal(v, comps[s].state_dict()[k].float())


def test_fusion_on_bf16() -> None:
    model = _bf16("llama")
    adapters = ak.attach(model)
    for n in ("x", "y"):
        adapters.add(n, ak.Bottleneck(placement="pfeiffer", init_weights=False))
    fusion = adapters.add_fusion(["x", "y"])
    assert all(p.dtype == torch.float32 for p in adapters.parameters(fusion))
    adapters.train_fusion(["x", "y"])
    out = model(**make_inputs("llama")).logits
    assert out.dtype == BF16
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in adapters.parameters(fusion))


@pytest.mark.parametrize(
    "config",
    [ak.LoRA(r=4, init_weights=False), ak.Bottleneck(init_weights=False), ak.PrefixTuning(num_virtual_tokens=2)],
    ids=["lora", "bn", "prefix"],
)
def test_routing_on_bf16(config: ak.AdapterConfig) -> None:
    model = _bf16("llama")
    adapters = ak.attach(model)
    adapters.add("a", config)
    adapters.add("b", config.replace(init_weights=False) if hasattr(config, "init_weights") else config)
    inputs = make_inputs("llama")
    with torch.no_grad():
        with adapters.use("a"):
            ya = model(**inputs).logits
        with adapters.use("b"):
            yb = model(**inputs).logits
    for grad in (False, True):
        with torch.set_grad_enabled(grad), adapters.route(["a", "b"]):
            out = model(**inputs).logits
        assert out.dtype == BF16
        assert torch.allclose(out[0].float(), ya[0].float(), atol=0.05)
        assert torch.allclose(out[1].float(), yb[1].float(), atol=0.05)


def test_float16_base() -> None:
    model = make_model("llama").to(torch.float16)
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=4, dora=True, init_weights=False))
    assert all(p.dtype == torch.float32 for p in adapters.parameters("a"))
    out = model(**make_inputs("llama")).logits
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
