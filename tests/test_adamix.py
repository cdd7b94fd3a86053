"""AdaMix (Wang et al. 2022) against its equations: in eval mode the mixture equals one plain adapter whose weights
are the experts' means (§3.3), and collapses into that adapter (saved and loaded as Bottleneck / LoRA); a training
forward computes the plain adapter with the drawn down and up experts (§3.1), drawn uniformly and independently;
the consistency loss is the symmetric KL of the two passes' softmaxes (§3.2); one expert is the plain adapter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adapterkit as ak
from adapterkit.methods.adamix import AdaMixLoRALinear, MixtureLinear, collapse, collapsed_state, two_pass_loss
from adapterkit.methods.bottleneck import _BottleneckBase

from conftest import make_inputs, make_model, output_of

BOTTLENECKS = [
    ("bert", ak.AdaMix(n_experts=3, init_weights=False)),
    (
        "llama",
        ak.AdaMix(expert=ak.Bottleneck(placement="houlsby", ln_before=True), n_experts=2, init_weights=False),
    ),
    (
        "gpt2",
        ak.AdaMix(
            expert=ak.Bottleneck(placement="parallel", hook="projection"),
            n_experts=4,
            share_up=True,
            init_weights=False,
        ),
    ),
    (
        "t5",
        ak.AdaMix(expert=ak.Bottleneck(placement="pfeiffer", scaling="channel"), n_experts=2, init_weights=False),
    ),
]
LORAS = [
    ("llama", ak.AdaMix(expert=ak.LoRA(r=2, alpha=4), n_experts=3, init_weights=False)),
    ("gpt2", ak.AdaMix(expert="lora", n_experts=2, share_down=True, init_weights=False)),  # Conv1D
]


def perturb(params, seed: int = 3, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def setup(family: str, cfg: ak.AdaMix):
    model = make_model(family)
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("mix", cfg)
    perturb(adapters.parameters("mix"))
    model.eval()
    return model, adapters


@torch.no_grad()
def out(model, x) -> torch.Tensor:
    return output_of(model, x).detach().clone()


# --- inference: the experts' average is one plain adapter ---------------------------------------------------
@pytest.mark.parametrize(("family", "cfg"), BOTTLENECKS + LORAS, ids=lambda v: getattr(v, "method", v))
def test_eval_output_equals_plain_adapter_with_averaged_weights(family, cfg):
    """A second model carries the plain expert config, filled by hand with ``mean_i W_i`` / ``mean_i b_i``."""
    model, adapters = setup(family, cfg)
    x = make_inputs(family)
    mixed = out(model, x)
    ref = make_model(family)
    ref_adapters = ak.attach(ref)
    ref_adapters.add("plain", cfg.plain_config())
    ref.eval()
    with torch.no_grad():
        for site, comp in adapters.components("mix").items():
            plain = ref_adapters.components("plain")[site]
            if isinstance(comp, AdaMixLoRALinear):
                plain.lora_A.copy_(comp.lora_A.mean(0))
                plain.lora_B.copy_(comp.lora_B.mean(0))
                continue
            for k, v in plain.state_dict().items():
                src = comp.state_dict()[k]
                if k.split(".")[0] in ("down", "up"):  # (n_experts·out, in) / (n_experts·out,)
                    src = src.view(-1, *v.shape).mean(0)
                v.copy_(src)
    torch.testing.assert_close(mixed, out(ref, x), atol=1e-6, rtol=0)
    assert (mixed - out(make_model(family), x)).abs().max() > 1e-3  # not the base model


@pytest.mark.parametrize(
    ("family", "cfg"), [BOTTLENECKS[0], BOTTLENECKS[2], LORAS[1]], ids=["bert", "gpt2", "lora"]
)
def test_collapse_saves_and_loads_as_the_plain_method(family, cfg, tmp_path):
    model, adapters = setup(family, cfg)
    x = make_inputs(family)
    mixed = out(model, x)
    assert collapse(adapters, "mix", into="plain") == "plain"
    assert adapters.names == ["mix", "plain"]
    with adapters.use("plain"):
        assert torch.equal(out(model, x), mixed)  # the same F.linear on the same averaged tensors
    adapters.save("plain", tmp_path / "plain")
    fresh = make_model(family)
    fresh_adapters = ak.attach(fresh)
    fresh_adapters.load(tmp_path / "plain")
    fresh.eval()
    assert fresh_adapters.config("plain").method == cfg.expert.method
    assert fresh_adapters.config("plain") == cfg.plain_config()
    torch.testing.assert_close(out(fresh, x), mixed, atol=1e-6, rtol=0)

    # in place: the name now holds the plain adapter, still active
    adapters.activate("mix")
    assert collapse(adapters, "mix") == "mix"
    assert adapters.active == ("mix",)
    assert adapters.config("mix").method == cfg.expert.method
    assert torch.equal(out(model, x), mixed)


def test_lora_experts_merge_as_their_average():
    model, adapters = setup(*LORAS[0])
    x = make_inputs("llama")
    unmerged = out(model, x)
    adapters.merge("mix")
    torch.testing.assert_close(out(model, x), unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unmerge"):
        collapse(adapters, "mix")
    adapters.unmerge("mix")


@pytest.mark.parametrize(
    ("family", "plain"),
    [("bert", ak.Bottleneck(placement="houlsby", ln_after=True)), ("llama", ak.LoRA(r=2, alpha=4))],
)
def test_one_expert_is_exactly_the_plain_adapter(family, plain):
    """``n_experts=1``: outputs and gradients bit for bit equal to the plain adapter (training mode, no dropout)."""
    results = []
    for cfg in (plain.replace(init_weights=False), ak.AdaMix(expert=plain, n_experts=1, init_weights=False)):
        model = make_model(family)
        adapters = ak.attach(model)
        torch.manual_seed(0)
        adapters.add("a", cfg)
        perturb(adapters.parameters("a"))
        adapters.train("a")
        model.train()
        for m in model.modules():  # the base model's dropout off, the adapters in training mode
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        y = output_of(model, make_inputs(family))
        y.pow(2).sum().backward()
        results.append((y.detach(), [p.grad.reshape(-1) for p in adapters.parameters("a")]))
    (y1, g1), (y2, g2) = results
    assert torch.equal(y1, y2)
    assert len(g1) == len(g2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


# --- training: stochastic routing ---------------------------------------------------------------------------------
def test_training_forward_uses_the_drawn_down_and_up_experts():
    """Bottleneck: ``s · up_j(act(down_i(h)))`` with the recorded ``i``, ``j``; LoRA: ``y + s · B_j A_i x``."""
    _, adapters = setup(*BOTTLENECKS[3])  # t5, channel scaling
    comp = next(c for c in adapters.components("mix").values() if isinstance(c, _BottleneckBase))
    comp.train()
    h = torch.randn(2, 5, comp.in_dim)
    seen = set()
    for _ in range(20):
        got = comp.branch(h)
        i, j = comp.down.last_expert, comp.up.last_expert
        seen.add((i, j))
        wd, bd = comp.down.experts()
        wu, bu = comp.up.experts()
        want = F.linear(comp.act(F.linear(h, wd[i], bd[i])), wu[j], bu[j]) * comp.scale
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert len(seen) > 1
    comp.eval()
    comp.branch(h)
    assert comp.down.last_expert is None

    _, adapters = setup(*LORAS[0])
    lora = next(iter(adapters.components("mix").values()))
    lora.train()
    x, y = torch.randn(2, 5, lora.in_dim), torch.randn(2, 5, lora.out_dim)
    for _ in range(10):
        got = lora.post(x, y)
        i, j = lora.last_route
        torch.testing.assert_close(got, y + (x @ lora.lora_A[i].T @ lora.lora_B[j].T) * lora.scaling)


def _chi2(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_routing_statistics_are_uniform_and_independent():
    """Over 2,000 training calls of one site: every (down, up) pair equally likely (chi-square below the 0.1%
    critical value for 15 degrees of freedom, 37.70); two sites' draws independent likewise; and whole-model training
    forwards draw at every site."""
    relu = ak.Bottleneck(placement="pfeiffer", original_ln_before=False)  # GELU is slow on tiny CPU tensors
    model, adapters = setup("llama", ak.AdaMix(expert=relu, n_experts=4, init_weights=False))
    comps = [c for c in adapters.components("mix").values() if isinstance(c, _BottleneckBase)]
    assert len(comps) == 2
    joint, across = torch.zeros(4, 4), torch.zeros(4, 4)
    h = torch.randn(1, 1, comps[0].in_dim)
    torch.manual_seed(1)
    with torch.no_grad():
        for c in comps:
            c.train()
        for _ in range(2000):
            comps[0].branch(h)
            comps[1].branch(h)
            joint[comps[0].down.last_expert, comps[0].up.last_expert] += 1
            across[comps[0].down.last_expert, comps[1].down.last_expert] += 1
    assert _chi2(joint) < 37.70, joint
    assert _chi2(across) < 37.70, across
    assert _chi2(joint.sum(1)) < 16.27 and _chi2(joint.sum(0)) < 16.27  # marginals, 3 degrees of freedom

    model.train()
    seen = set()
    x = make_inputs("llama", batch=1, seq=3)
    with torch.no_grad():
        for _ in range(8):
            output_of(model, x)
            assert all(m.last_expert is not None for c in comps for m in (c.down, c.up))
            seen.add((comps[0].down.last_expert, comps[1].up.last_expert))
    assert len(seen) > 2


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
def test_activation_checkpointing_replays_the_same_routes():
    """The draws use torch's CPU RNG, which checkpointing restores for the recomputation: equal loss and grads."""
    results = []
    for checkpointing in (False, True):
        model = make_model("llama")
        adapters = ak.attach(model)
        torch.manual_seed(0)
        adapters.add("mix", ak.AdaMix(expert=ak.Bottleneck(placement="houlsby"), n_experts=4, init_weights=False))
        adapters.train("mix")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        x = make_inputs("llama")
        torch.manual_seed(5)
        loss = model(**x, labels=x["input_ids"]).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in adapters.parameters("mix")]))
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_shared_projection_has_one_expert():
    _, adapters = setup("bert", ak.AdaMix(n_experts=3, share_up=True))
    comp = next(c for c in adapters.components("mix").values() if isinstance(c, _BottleneckBase))
    assert isinstance(comp.down, MixtureLinear) and comp.down.n_experts == 3
    assert comp.up.n_experts == 1 and comp.up.weight.shape == (comp.out_dim, comp.size)
    _, adapters = setup("llama", ak.AdaMix(expert="lora", n_experts=3, share_down=True))
    lora = next(iter(adapters.components("mix").values()))
    assert lora.lora_A.shape[0] == 1 and lora.lora_B.shape[0] == 3


def test_identity_at_init_in_training_mode():
    model = make_model("llama")  # no attention dropout
    base = out(model, make_inputs("llama"))
    adapters = ak.attach(model)
    adapters.add("mix", ak.AdaMix(n_experts=4))
    adapters.add("lora", ak.AdaMix(expert="lora", n_experts=4))
    adapters.activate("mix", "lora")
    for m in model.modules():
        m.train(not isinstance(m, torch.nn.Dropout))  # adapters route randomly; base dropout off
    assert torch.equal(out(model, make_inputs("llama")), base)


# --- training: the consistency loss ----------------------------------------------------------------------------
def test_consistency_loss_is_the_symmetric_kl():
    torch.manual_seed(0)
    a, b = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    pa, pb = a.softmax(-1), b.softmax(-1)
    kl_ab = (pa * (pa.log() - pb.log())).sum(-1)
    kl_ba = (pb * (pb.log() - pa.log())).sum(-1)
    want = 0.5 * (kl_ab + kl_ba).mean()
    got = ak.adamix_consistency_loss(a, b)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ak.adamix_consistency_loss(b, a), want)  # symmetric
    # the authors' code: F.kl_div(log_softmax(p), softmax(q.detach()), "batchmean") both ways, halved
    authors = 0.5 * (
        F.kl_div(F.log_softmax(a, -1), F.softmax(b.detach(), -1), reduction="batchmean")
        + F.kl_div(F.log_softmax(b, -1), F.softmax(a.detach(), -1), reduction="batchmean")
    )
    torch.testing.assert_close(got, authors)
    # gradient with the other pass held constant: d/da ½ KL(p_B ‖ p_A) = ½ (p_A − p_B) / N
    (ga,) = torch.autograd.grad(got, a)
    torch.testing.assert_close(ga, 0.5 * (pa - pb).detach() / 6)
    (ga_full,) = torch.autograd.grad(ak.adamix_consistency_loss(a, b, detach_targets=False), a)
    (ga_want,) = torch.autograd.grad(want, a)
    torch.testing.assert_close(ga_full, ga_want)
    assert ak.adamix_consistency_loss(a, a.detach().clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_consistency_loss_mask_counts_positions():
    torch.manual_seed(1)
    a, b = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    keep = mask.bool()
    torch.testing.assert_close(
        ak.adamix_consistency_loss(a, b, mask), ak.adamix_consistency_loss(a[keep], b[keep])
    )
    assert ak.adamix_consistency_loss(a, b, torch.zeros(2, 4)).item() == 0.0
    with pytest.raises(ValueError, match="one shape"):
        ak.adamix_consistency_loss(a, b[:1])
    with pytest.raises(ValueError, match="mask shape"):
        ak.adamix_consistency_loss(a, b, mask[:, :2])


def test_two_pass_training_step():
    """The documented loop: two training forwards take different routes; task loss + consistency trains."""
    model = make_model("bert")
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("mix", ak.AdaMix(n_experts=4, init_weights=False))
    adapters.train("mix")
    model.train()
    x = make_inputs("bert", batch=4)
    labels = torch.tensor([0, 1, 1, 0])
    opt = torch.optim.SGD(list(adapters.parameters("mix")), lr=0.1)
    torch.manual_seed(3)
    out_a, out_b = model(**x, labels=labels), model(**x, labels=labels)
    cons = ak.adamix_consistency_loss(out_a.logits, out_b.logits)
    assert cons.item() > 0
    (out_a.loss + cons).backward()
    assert all(p.grad is not None for p in adapters.parameters("mix"))
    opt.step()
    # the helper runs the same two passes (same RNG state, same routes and dropout masks)
    torch.manual_seed(4)
    ref_a, ref_b = model(**x, labels=labels), model(**x, labels=labels)
    want = ref_a.loss + 0.5 * ak.adamix_consistency_loss(ref_a.logits, ref_b.logits)
    torch.manual_seed(4)
    loss, first = two_pass_loss(model, {**x, "labels": labels}, weight=0.5)
    torch.testing.assert_close(loss, want, atol=0, rtol=0)
    assert torch.equal(first.logits, ref_a.logits)
    with pytest.raises(ValueError, match="no loss"):
        two_pass_loss(model, x)


# --- refusals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"expert": "ia3"}, "choose 'bottleneck', 'lora'"),
        ({"expert": ak.IA3()}, "must be 'bottleneck'"),
        ({"n_experts": 0}, "positive integer"),
        ({"share_up": True, "share_down": True}, "single expert"),
        ({"expert": ak.LoRA(targets=["attn.q"])}, "set targets on AdaMix"),
        ({"expert": ak.Bottleneck(init_weights=False)}, "init_weights on AdaMix"),
        ({"expert": ak.Bottleneck(phm_dim=4)}, "Compacter"),
        ({"expert": ak.LoRA(dora=True)}, "dora=True"),
    ],
)
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ak.AdaMix(**kwargs)


def test_collapse_refuses_other_methods_and_taken_names():
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("l", ak.LoRA())
    adapters.add("mix", ak.AdaMix(expert="lora"))
    with pytest.raises(TypeError, match="not AdaMix"):
        collapse(adapters, "l")
    with pytest.raises(ValueError, match="already exists"):
        collapse(adapters, "mix", into="l")
    assert adapters.config("mix").method == "adamix"


def test_config_round_trips_with_the_nested_expert():
    from adapterkit.config import config_from_dict

    for cfg in (ak.AdaMix(), ak.AdaMix(expert=ak.LoRA(r=4, rank_pattern={"q_proj": 2}), share_up=True)):
        assert config_from_dict(cfg.to_dict()) == cfg
    assert ak.AdaMix(expert="bottleneck").expert.non_linearity == "gelu"


def test_collapsed_state_of_a_bottleneck_is_the_mean():
    _, adapters = setup(*BOTTLENECKS[0])
    comp = next(c for c in adapters.components("mix").values() if isinstance(c, _BottleneckBase))
    state = collapsed_state(comp)
    w = comp.down.weight.view(3, comp.size, comp.in_dim)
    assert torch.equal(state["down.weight"], w.mean(0))
    assert state["down.weight"].shape == (comp.size, comp.in_dim)
    assert torch.equal(state["up.bias"], comp.up.bias.detach().view(3, -1).mean(0))
