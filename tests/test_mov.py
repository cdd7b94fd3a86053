"""MoV and MoLoRA (Zadouri et al. 2024): with one expert exactly our (IA)^3 / LoRA (outputs and gradients bit for
bit), the per-token soft mixture and the top-k variant against explicit formulas, the Switch load-balancing loss
through ``adapters.aux_loss()``, refusals."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.methods.mov import MoLoRALinear, MoVScale, balance_loss

from conftest import make_inputs, make_model, output_of


def perturb(params, seed: int = 3, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def pair(family: str, ref_cfg, mix_cfg, copy):
    """Two identical models: one with ``ref_cfg`` (perturbed), one with ``mix_cfg`` filled from it by ``copy``."""
    m1, m2 = make_model(family), make_model(family)
    a1, a2 = ak.attach(m1), ak.attach(m2)
    a1.add("a", ref_cfg)
    a2.add("a", mix_cfg)
    perturb(a1.parameters("a"))
    with torch.no_grad():
        for site, c1 in a1.components("a").items():
            copy(c1, a2.components("a")[site])
    return (m1, a1), (m2, a2)


def outputs_and_grads(model, adapters, x):
    adapters.train("a")
    model.zero_grad(set_to_none=True)
    out = output_of(model, x)
    out.pow(2).sum().backward()
    return out.detach(), [p.grad.clone() for p in adapters.parameters("a")]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_expert_mov_is_exactly_ia3(family):
    def copy(ia3, mov):
        assert isinstance(mov, MoVScale) and mov.router is None
        assert mov.input_side == (type(ia3).__name__ == "IA3InputScale")
        mov.experts[0].copy_(ia3.scale)

    (m1, a1), (m2, a2) = pair(family, ak.IA3(init_weights=False), ak.MoV(n_experts=1, init_weights=False), copy)
    x = make_inputs(family)
    o1, g1 = outputs_and_grads(m1, a1, x)
    o2, g2 = outputs_and_grads(m2, a2, x)
    assert torch.equal(o1, o2)
    assert len(g1) == len(g2) and all(torch.equal(a, b[0] if b.dim() == 2 else b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_expert_molora_is_exactly_lora(family):
    def copy(lora, mo):
        assert isinstance(mo, MoLoRALinear) and mo.router is None
        mo.lora_A[0].copy_(lora.lora_A)
        mo.lora_B[0].copy_(lora.lora_B)

    ref = ak.LoRA(r=4, alpha=8, init_weights=False)
    (m1, a1), (m2, a2) = pair(family, ref, ak.MoLoRA(r=4, alpha=8, n_experts=1, init_weights=False), copy)
    x = make_inputs(family)
    o1, g1 = outputs_and_grads(m1, a1, x)
    o2, g2 = outputs_and_grads(m2, a2, x)
    assert torch.equal(o1, o2)
    assert all(torch.equal(a, b[0]) for a, b in zip(g1, g2, strict=True))
    m1.eval(), m2.eval()
    with torch.no_grad():
        assert torch.equal(output_of(m1, x), output_of(m2, x))


def _gates(router, x, top_k=None):
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    if top_k is None:
        return probs
    top, idx = probs.topk(top_k, dim=-1)
    return torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))


@pytest.mark.parametrize("top_k", [None, 2])
def test_molora_mixture_equation(top_k):
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("m", ak.MoLoRA(r=2, alpha=6, n_experts=3, top_k=top_k, init_weights=False))
    perturb(adapters.parameters("m"))
    comp = next(iter(adapters.components("m").values()))
    x = torch.randn(2, 5, comp.in_dim)
    y = torch.randn(2, 5, comp.out_dim)
    g = _gates(comp.router, x, top_k)
    expected = y + 3.0 * sum(g[..., i : i + 1] * (x @ comp.lora_A[i].T @ comp.lora_B[i].T) for i in range(3))
    torch.testing.assert_close(comp.post(x, y), expected, atol=1e-5, rtol=1e-5)
    if top_k:
        assert int((g > 0).sum(-1).max()) == top_k


@pytest.mark.parametrize("top_k", [None, 1])
def test_mov_mixture_equation(top_k):
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("m", ak.MoV(n_experts=3, top_k=top_k, init_weights=False))
    perturb(adapters.parameters("m"))
    comps = adapters.components("m")
    out_side = next(c for c in comps.values() if not c.input_side)
    in_side = next(c for c in comps.values() if c.input_side)
    x = torch.randn(2, 5, out_side.router.weight.shape[1])
    y = torch.randn(2, 5, out_side.experts.shape[1])
    torch.testing.assert_close(out_side.post(x, y), y * (_gates(out_side.router, x, top_k) @ out_side.experts))
    xf = torch.randn(2, 5, in_side.experts.shape[1])
    torch.testing.assert_close(in_side.pre(xf), xf * (_gates(in_side.router, xf, top_k) @ in_side.experts))


def test_identity_at_init_and_router_learns():
    x = make_inputs("llama")
    model = make_model("llama")
    base = output_of(model, x).detach()
    adapters = ak.attach(model)
    adapters.add("v", ak.MoV(n_experts=3))
    adapters.add("l", ak.MoLoRA(n_experts=3))
    with adapters.use("v", "l"), torch.no_grad():
        assert torch.equal(output_of(model, x), base)
    for name in ("v", "l"):
        adapters.train(name)
        model.zero_grad(set_to_none=True)
        output_of(model, x).pow(2).sum().backward()
        experts = [p for p in adapters.parameters(name) if p.grad is not None and p.grad.abs().sum() > 0]
        assert experts, name
    with pytest.raises(TypeError, match="cannot be merged"):
        adapters.merge("l")


def test_balance_loss_values():
    probs = torch.full((4, 2), 0.5)
    assert balance_loss(probs, torch.tensor([[0], [1], [0], [1]]), 2).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.9, 0.1]] * 4)
    assert balance_loss(skewed, torch.zeros(4, 1, dtype=torch.long), 2).item() == pytest.approx(1.8)


def test_top_k_aux_loss_through_adapters():
    x = make_inputs("llama")
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("m", ak.MoLoRA(n_experts=4, top_k=2, balance_coef=0.1, init_weights=False))
    adapters.train("m")
    model.train()
    assert adapters.aux_loss().item() == 0.0  # no forward yet
    output_of(model, x)
    aux = adapters.aux_loss()
    n_sites = len(adapters.components("m"))
    assert aux.requires_grad and 0.1 * n_sites <= aux.item() <= 0.1 * n_sites * 4
    model.zero_grad(set_to_none=True)
    aux.backward()
    routers = [c.router.weight for c in adapters.components("m").values()]
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in routers)
    # soft merging and eval forwards have no balance term
    model.eval()
    with torch.no_grad():
        output_of(model, x)
    assert adapters.aux_loss().item() == 0.0
    adapters.add("s", ak.MoLoRA(n_experts=4))
    adapters.train("s")
    model.train()
    output_of(model, x)
    assert adapters.aux_loss().item() == 0.0


def test_config_errors():
    with pytest.raises(ValueError, match="n_experts must be a positive integer"):
        ak.MoV(n_experts=0)
    with pytest.raises(ValueError, match=r"top_k must be None .* \[1, n_experts=2\]"):
        ak.MoLoRA(n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="balance_coef"):
        ak.MoLoRA(balance_coef=-1.0)
    with pytest.raises(ValueError, match="rank r"):
        ak.MoLoRA(r=0)
    adapters = ak.attach(make_model("vit"))
    with pytest.raises(ak.TargetError if hasattr(ak, "TargetError") else Exception, match="cannot act"):
        adapters.add("m", ak.MoLoRA(targets=["embed"]))


@pytest.mark.parametrize(
    "cfg", [ak.MoV(n_experts=3, top_k=2), ak.MoLoRA(n_experts=3, top_k=2)], ids=["mov", "molora"]
)
def test_bfloat16_base_trains_float32_experts(cfg):
    x = make_inputs("llama")
    model = make_model("llama").to(torch.bfloat16)
    adapters = ak.attach(model)
    adapters.add("m", cfg.replace(init_weights=False))
    adapters.train("m")
    out = output_of(model, x)
    assert out.dtype == torch.bfloat16
    (out.float().sum() + adapters.aux_loss()).backward()
    params = list(adapters.parameters("m"))
    assert {p.dtype for p in params} == {torch.float32}
    assert all(p.grad is not None for p in params)
