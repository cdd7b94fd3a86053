"""Polytropon / Multi-Head Routing (``ak.Poly``): peft equivalence both ways (float32 logits within 1e-5 on the same
perturbed weights, eval and training-mode samples), the equations, the shared allocation bank, MHR-z / MHR-μ and
refusals.

* peft -> adapterkit: ``get_peft_model(PolyConfig)``, perturb every trainable tensor, ``save_pretrained``,
  ``ak.attach(other).load(dir)`` on an identical model, compare logits with the same task ids.
* adapterkit -> peft: ``init_weights=False``, perturb, ``export(format="peft")``, ``PeftModel.from_pretrained``.
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
from adapterkit.methods.poly import (
    PolyAllocation,
    PolyLinear,
    average_skills,
    relaxed_bernoulli,
    train_routing_only,
)

from conftest import make_inputs, make_model, output_of

peft = pytest.importorskip("peft")
from peft import PeftModel, get_peft_model  # noqa: E402

warnings.filterwarnings("ignore", module="peft")

TOL = {"atol": 1e-5, "rtol": 1e-5}
IDS = torch.tensor([2, 0])


@torch.no_grad()
def perturb(params: Any, seed: int = 123, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def ours(model: nn.Module, x: dict, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(**x, task_ids=ids).logits.float()


@torch.no_grad()
def theirs(pm: nn.Module, x: dict, ids: torch.Tensor = IDS) -> torch.Tensor:
    return pm(**x, task_ids=ids).logits.float()


CASES = [
    ("poly", dict(r=4, n_tasks=3, n_skills=4, n_splits=1)),
    ("mhr", dict(r=2, n_tasks=3, n_skills=3, n_splits=4)),
]


@pytest.mark.parametrize(("cid", "kw"), CASES, ids=[c for c, _ in CASES])
def test_peft_to_adapterkit(cid, kw, tmp_path):
    x = make_inputs("llama")
    base = make_model("llama")
    base_out = output_of(base, x).detach()
    pm = get_peft_model(
        base, peft.PolyConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_weights=False, **kw)
    ).eval()
    perturb(trainable(pm))
    expected = theirs(pm, x)
    assert (expected - base_out).abs().max() > 1e-3
    pm.save_pretrained(tmp_path)
    model = make_model("llama")
    adapters = ak.attach(model)
    name = adapters.load(tmp_path)
    model.eval()
    cfg = adapters.config(name)
    assert (cfg.r, cfg.n_tasks, cfg.n_skills, cfg.n_splits) == (
        kw["r"],
        kw["n_tasks"],
        kw["n_skills"],
        kw["n_splits"],
    )
    torch.testing.assert_close(ours(model, x), expected, **TOL)
    # a different task gives a different output (the allocation matters), equal in both
    other = torch.tensor([1, 1])
    torch.testing.assert_close(ours(model, x, other), theirs(pm, x, other), **TOL)
    # training mode: the same relaxed-Bernoulli draws from the same seed
    pm.train()
    model.train()
    torch.manual_seed(7)
    t_out = pm(**x, task_ids=IDS).logits
    torch.manual_seed(7)
    o_out = model(**x, task_ids=IDS).logits
    torch.testing.assert_close(o_out, t_out, **TOL)


@pytest.mark.parametrize(("cid", "kw"), CASES, ids=[c for c, _ in CASES])
@pytest.mark.parametrize("shared", [False, True])
def test_adapterkit_to_peft(cid, kw, shared, tmp_path):
    x = make_inputs("llama")
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.Poly(targets=["q_proj", "v_proj"], init_weights=False, shared_allocation=shared, **kw))
    model.eval()
    perturb(adapters.parameters("a"))
    expected = ours(model, x)
    adapters.export("a", tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "POLY" and config["n_splits"] == kw["n_splits"]
    pm = PeftModel.from_pretrained(make_model("llama"), tmp_path).eval()
    torch.testing.assert_close(theirs(pm, x), expected, **TOL)
    # and back: the peft directory loads with equal logits
    again = make_model("llama")
    ak.attach(again).load(tmp_path)
    again.eval()
    torch.testing.assert_close(ours(again, x), expected, **TOL)


def test_equations_rows_use_their_task():
    """Each row's output is the one it has alone; the mixture is the explicit Σ_s w_s A_s, Σ_s w_s B_s (per head)."""
    x = make_inputs("llama", batch=3)
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("p", ak.Poly(r=2, n_tasks=3, n_skills=3, n_splits=2, init_weights=False))
    model.eval()
    perturb(adapters.parameters("p"))
    ids = torch.tensor([2, 0, 1])
    full = ours(model, x, ids)
    for i in range(3):
        row = {k: v[i : i + 1] for k, v in x.items()}
        torch.testing.assert_close(ours(model, row, ids[i : i + 1]), full[i : i + 1], atol=1e-5, rtol=1e-5)
    comp = next(iter(adapters.components("p").values()))
    assert isinstance(comp, PolyLinear)
    logits = comp.poly_router.module_logits[1].view(2, 3)
    w = torch.sigmoid(logits)
    w = w / (w.sum(-1, keepdim=True) + 1e-12)
    A = torch.cat([sum(w[h, s] * comp.poly_lora_A[h, s] for s in range(3)) for h in range(2)], dim=0)  # (in, r)
    B = torch.cat([sum(w[h, s] * comp.poly_lora_B[h, s] for s in range(3)) for h in range(2)], dim=1)  # (r, out)
    A2, B2 = comp.factors(torch.tensor([1]))
    torch.testing.assert_close(A2[0], A)
    torch.testing.assert_close(B2[0], B)
    h = torch.randn(1, 5, comp.in_dim)
    y = torch.zeros(1, 5, comp.out_dim)
    with adapters.tasks([1]):
        torch.testing.assert_close(comp.post(h, y), (h @ A @ B) / comp.r, atol=1e-5, rtol=1e-5)


def test_identity_at_init_and_needs_ids():
    x = make_inputs("llama")
    model = make_model("llama")
    base = output_of(model, x).detach()
    adapters = ak.attach(model)
    adapters.add("p", ak.Poly(n_tasks=2))
    with pytest.raises(ValueError, match="needs one task id per row"):
        output_of(model, x)
    torch.testing.assert_close(ours(model, x, torch.tensor([0, 1])), base, atol=0, rtol=0)
    with pytest.raises(ValueError, match="out of range.*n_tasks=2"):
        ours(model, x, torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="cannot be merged"):
        adapters.merge("p")


def test_shared_allocation_is_one_bank_saved_once(tmp_path):
    x = make_inputs("llama")
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("p", ak.Poly(n_tasks=3, shared_allocation=True, init_weights=False))
    model.eval()
    perturb(adapters.parameters("p"))
    banks = {id(c.poly_router) for c in adapters.components("p").values()}
    assert len(banks) == 1
    logits = [p for p in adapters.parameters("p") if p.shape == (3, 4)]
    assert len(logits) == 1
    expected = ours(model, x)
    adapters.save("p", tmp_path / "p")
    from safetensors.torch import load_file

    keys = [k for k in load_file(tmp_path / "p" / "adapter.safetensors") if k.endswith("module_logits")]
    assert len(keys) == 1
    fresh = make_model("llama")
    ak.attach(fresh).load(tmp_path / "p")
    fresh.eval()
    torch.testing.assert_close(ours(fresh, x), expected, atol=1e-6, rtol=0)


def test_default_task_and_generate():
    x = make_inputs("llama")
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("p", ak.Poly(n_tasks=3, default_task=1, init_weights=False))
    model.eval()
    perturb(adapters.parameters("p"))
    torch.testing.assert_close(output_of(model, x), ours(model, x, torch.tensor([1, 1])))
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    by_scope = []
    for i in range(2):
        with adapters.tasks([int(IDS[i])]):
            by_scope.append(model.generate(x["input_ids"][i : i + 1], **gen))
    both = model.generate(x["input_ids"], attention_mask=x["attention_mask"], task_ids=IDS, **gen)
    assert torch.equal(both[1], by_scope[1][0])  # row 1 has no padding: equal to running it alone
    beams = model.generate(x["input_ids"], attention_mask=x["attention_mask"], task_ids=IDS, num_beams=2, **gen)
    assert beams.shape == both.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_relaxed_bernoulli_is_torch_distributions_bit_for_bit(dtype, temperature):
    from torch.distributions import RelaxedBernoulli

    logits = torch.tensor([[-40.0, -3.0, 0.0, 1e-3], [2.5, 17.0, 40.0, -0.7]], dtype=dtype, requires_grad=True)
    torch.manual_seed(3)
    expected = RelaxedBernoulli(torch.tensor(temperature, dtype=dtype), logits=logits).rsample()
    torch.manual_seed(3)
    got = relaxed_bernoulli(logits, temperature)
    assert got.dtype == dtype and torch.equal(got, expected)
    (g_exp,) = torch.autograd.grad(expected.sum(), logits)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    assert torch.equal(g_got, g_exp)


def test_mhr_z_and_mu():
    x = make_inputs("llama")
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("p", ak.Poly(r=2, n_tasks=3, n_skills=3, n_splits=2, init_weights=False))
    adapters.train("p")
    train_routing_only(adapters, "p")
    grads = [p for p in adapters.parameters("p") if p.requires_grad]
    assert grads and all(isinstance(p, nn.Parameter) and p.dim() == 2 for p in grads)  # only the logits
    model.eval()
    mu = average_skills(adapters, "p")
    other = make_model("llama")
    lora = ak.attach(other)
    lora.add("l", ak.LoRA(r=2, alpha=1.0))
    for site, comp in lora.components("l").items():
        comp.import_state(mu[site], None)
    other.eval()
    # equal to a Poly whose skills all equal their mean (then any allocation gives that mean)
    for comp in adapters.components("p").values():
        with torch.no_grad():
            comp.poly_lora_A.copy_(comp.poly_lora_A.mean(1, keepdim=True).expand_as(comp.poly_lora_A))
            comp.poly_lora_B.copy_(comp.poly_lora_B.mean(1, keepdim=True).expand_as(comp.poly_lora_B))
    torch.testing.assert_close(output_of(other, x), ours(model, x), **TOL)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="n_skills must be a positive integer"):
        ak.Poly(n_skills=0)
    with pytest.raises(ValueError, match="default_task"):
        ak.Poly(n_tasks=2, default_task=2)
    adapters = ak.attach(make_model("llama"))
    with pytest.raises(ValueError, match="n_splits=5 must divide"):
        adapters.add("p", ak.Poly(n_splits=5))
    gpt = ak.attach(make_model("gpt2"))
    gpt.add("p", ak.Poly(n_tasks=2))  # Conv1D: ours works, peft cannot hold it
    with pytest.raises(ValueError, match="nn.Linear only"):
        gpt.export("p", tmp_path / "x", format="peft")
    assert isinstance(PolyAllocation(ak.Poly()), PolyAllocation)
    bad = tmp_path / "bad"
    pm = get_peft_model(make_model("llama"), peft.PolyConfig(target_modules=["q_proj"], n_tasks=2))
    pm.save_pretrained(bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["n_splits"] = 0
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError):
        ak.attach(make_model("llama")).load(bad)


def test_one_task_needs_no_ids():
    x = make_inputs("llama")
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("p", ak.Poly(n_tasks=1, init_weights=False))
    model.eval()
    perturb(adapters.parameters("p"))
    torch.testing.assert_close(output_of(model, x), ours(model, x, torch.tensor([0, 0])), atol=0, rtol=0)
