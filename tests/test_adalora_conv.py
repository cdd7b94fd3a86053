"""AdaLoRA on ``nn.Conv2d`` (issue 18): the branch equals the equation ``y = conv(x, W + s · P (Λ ⊙ Q))`` with
the base's stride/padding/dilation, merges, equals peft's ``SVDConv2d`` (logits, rank allocation step by step,
files both ways), and grouped or non-zero-padded convolutions are refused with a message."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak

from conftest import make_inputs, make_model

SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8, lora_alpha=8, orth_reg_weight=0.3)
TARGETS = ["projection", "v_proj"]  # ViT's patch projection (Conv2d 3 -> 32, 4 x 4, stride 4) and a Linear


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_forward_and_merge_equal_the_equation():
    torch.manual_seed(0)
    net = Net().double()
    adapters = ak.attach(net)
    adapters.add("a", ak.AdaLoRA(init_r=3, target_r=1, alpha=6, targets=["conv"], init_weights=False))
    comp = adapters.components("a")["conv"]
    assert type(comp).__name__ == "AdaLoRAConv2d"
    assert comp.lora_A.shape == (3, 3 * 3 * 2) and comp.lora_E.shape == (3, 1) and comp.lora_B.shape == (6, 3)
    with torch.no_grad():
        comp.rank_mask[1] = False
        comp.lora_E[1] = 0
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    s = 6 / (3 + 1e-5)
    delta = (comp.lora_B @ (comp.lora_A * comp.lora_E) * s).reshape(6, 3, 3, 2)
    conv = net.conv
    expected = F.conv2d(x, conv.weight + delta, conv.bias, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    with torch.no_grad():
        got = conv(x)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
        before = conv.weight.clone()
        adapters.merge("a")
        torch.testing.assert_close(conv.weight, before + delta, atol=1e-12, rtol=0)
        torch.testing.assert_close(conv(x), expected, atol=1e-12, rtol=0)
        adapters.unmerge("a")
        torch.testing.assert_close(conv.weight, before, atol=1e-12, rtol=0)
    # gradients reach P, Λ and Q through the two-convolution branch
    net.train()
    adapters.train("a")
    conv(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (comp.lora_A, comp.lora_E, comp.lora_B))


def test_grouped_and_padding_mode_refused():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    adapters = ak.attach(net)
    with pytest.raises(TypeError, match=r"grouped convolution '0' \(groups=2\).*exclude it"):
        adapters.add("a", ak.AdaLoRA(init_r=2, target_r=1, targets=["0"]))
    with pytest.raises(TypeError, match="zero padding.*reflect"):
        adapters.add("a", ak.AdaLoRA(init_r=2, target_r=1, targets=["1"]))
    assert adapters.names == []


# --- against peft's SVDConv2d --------------------------------------------------------------------------------------
def _peft():
    from peft import AdaLoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(make_model("vit"), AdaLoraConfig(target_modules=TARGETS, **SCHEDULE))


def _ours():
    s = SCHEDULE
    model = make_model("vit")
    adapters = ak.attach(model)
    cfg = ak.AdaLoRA(init_r=s["init_r"], target_r=s["target_r"], tinit=s["tinit"], tfinal=s["tfinal"],
                     delta_t=s["deltaT"], total_step=s["total_step"], alpha=s["lora_alpha"],
                     orth_reg_weight=s["orth_reg_weight"], targets=TARGETS)  # fmt: skip
    adapters.add("default", cfg)
    return model, adapters


def _peft_params(pm) -> dict[str, torch.Tensor]:
    return dict(pm.named_parameters())


def _copy_init(pm, adapters) -> None:
    theirs = _peft_params(pm)
    with torch.no_grad():
        for site, comp in adapters.components("default").items():
            for t in ("lora_A", "lora_E", "lora_B"):
                getattr(comp, t).copy_(theirs[f"base_model.model.{site}.{t}.default"])


def _orth(pm) -> torch.Tensor:
    """peft's regularizer (``AdaLoraModel.forward`` adds it only when the output has a loss)."""
    regu, n = 0.0, 0
    for name, p in pm.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and "default" in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            regu, n = regu + torch.norm(cov - eye, p="fro"), n + 1
    return SCHEDULE["orth_reg_weight"] * regu / n


def _masks(pm) -> dict[str, list[bool]] | None:
    pattern = pm.peft_config["default"].rank_pattern
    if pattern is None:
        return None
    return {k.replace(".default", "").removesuffix(".lora_E"): list(v) for k, v in pattern.items()}


@pytest.fixture(scope="module")
def trained_pair():
    """peft and adapterkit AdaLoRA on ViT's conv patch projection and value projections, 8 AdamW steps side by side."""
    torch.manual_seed(0)
    pm = _peft()
    model, adapters = _ours()
    with torch.no_grad():  # a non-zero start, so every factor gets gradients from the first step
        for n, p in pm.named_parameters():
            if "lora_E" in n:
                p.normal_(std=0.5)
    _copy_init(pm, adapters)
    pm.train()
    model.train()
    adapters.train("default")
    opt_p = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    opt_o = torch.optim.AdamW(list(adapters.parameters("default")), lr=2e-2)
    labels = torch.tensor([0, 2])
    history = []
    for step in range(SCHEDULE["total_step"]):
        x = make_inputs("vit", seed=200 + step)
        (pm(**x, labels=labels).loss + _orth(pm)).backward()
        opt_p.step()
        pm.base_model.update_and_allocate(step)
        opt_p.zero_grad()
        (model(**x, labels=labels).loss + adapters.aux_loss()).backward()
        opt_o.step()
        adapters.step()
        opt_o.zero_grad()
        theirs = _peft_params(pm)
        diff = max(
            (getattr(c, t) - theirs[f"base_model.model.{site}.{t}.default"]).abs().max().item()
            for site, c in adapters.components("default").items()
            for t in ("lora_A", "lora_E", "lora_B")
        )
        ours = {site: c.rank_mask.tolist() for site, c in adapters.components("default").items()}
        history.append((step, _masks(pm), ours, diff))
    pm.eval()
    model.eval()
    return pm, model, adapters, history


def test_conv2d_site_and_logits_equal_peft():
    torch.manual_seed(0)
    pm = _peft()
    model, adapters = _ours()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.3)
    _copy_init(pm, adapters)
    pm.eval()
    site = "vit.embeddings.patch_embeddings.projection"
    assert type(adapters.components("default")[site]).__name__ == "AdaLoRAConv2d"
    x = make_inputs("vit")
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, pm(**x).logits, atol=1e-5, rtol=1e-5)
        peft_delta = pm.get_submodule(f"base_model.model.{site}").get_delta_weight("default")
        ours = adapters.components("default")[site].delta_weight(model.get_submodule(site))
        torch.testing.assert_close(ours, peft_delta, atol=1e-6, rtol=1e-6)


def test_rank_allocation_with_a_conv2d_site_equals_peft_step_by_step(trained_pair):
    _, _, adapters, history = trained_pair
    allocated = 0
    for step, theirs, ours, diff in history:
        assert diff < 1e-4, f"step {step}: parameters differ by {diff}"
        if theirs is not None:
            assert ours == theirs, f"step {step}: masks differ"
            allocated += 1
    assert allocated >= 3
    final = history[-1][2]
    assert sum(sum(k) for k in final.values()) == SCHEDULE["target_r"] * len(final)


def test_conv2d_files_both_ways(trained_pair, tmp_path):
    from peft import PeftModel

    pm, model, adapters, _ = trained_pair
    x = make_inputs("vit", seed=7)
    with torch.no_grad():
        expected = model(**x).logits
    # ours -> peft
    adapters.export("default", tmp_path / "ours", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(make_model("vit"), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, expected, atol=1e-5, rtol=0)
    # peft -> ours
    pm.save_pretrained(tmp_path / "peft")
    fresh = ak.attach(make_model("vit"))
    fresh.load(tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(**x).logits, pm(**x).logits, atol=1e-5, rtol=0)
    assert {s: c.rank_mask.tolist() for s, c in fresh.components("default").items()} == _masks(pm)


def test_batched_importance_and_scores_are_peft_formulas_bit_for_bit():
    """The allocator's foreach/shape-batched arithmetic gives exactly peft's per-weight ``update_ipt`` averages and
    ``mask_to_budget`` triplet scores (ties in the global kthvalue must break the same way)."""
    from adapterkit.methods.adalora import RankAllocator

    class Weight:
        def __init__(self, i: int, o: int) -> None:
            self.lora_A = nn.Parameter(torch.randn(6, i))
            self.lora_B = nn.Parameter(torch.randn(o, 6))
            self.lora_E = nn.Parameter(torch.randn(6, 1))

    torch.manual_seed(0)
    allocator = RankAllocator(ak.AdaLoRA(init_r=6, target_r=2, beta1=0.8, beta2=0.9))
    members = [Weight(64, 64) for _ in range(3)] + [Weight(176, 64), Weight(64, 176), Weight(48, 16)]
    allocator.members.extend(members)
    ref: dict[tuple[int, str], list[torch.Tensor]] = {}
    for _ in range(4):
        for w in members:
            for p in (w.lora_A, w.lora_B, w.lora_E):
                p.grad = torch.randn_like(p) * 10.0 ** float(torch.randint(-3, 3, ()))
        with torch.no_grad():
            allocator.update_ipt()
            for i, w in enumerate(members):  # peft 0.21's RankAllocator.update_ipt, line for line
                for key, p in (("A", w.lora_A), ("B", w.lora_B), ("E", w.lora_E)):
                    avg, unc = ref.setdefault((i, key), [torch.zeros_like(p), torch.zeros_like(p)])
                    ipt = (p * p.grad).abs().detach()
                    avg = 0.8 * avg + (1 - 0.8) * ipt
                    ref[i, key] = [avg, 0.9 * unc + (1 - 0.9) * (ipt - avg).abs()]
    for i in range(len(members)):
        for j, key in enumerate("ABE"):
            assert torch.equal(allocator.exp_avg_ipt[3 * i + j], ref[i, key][0])
            assert torch.equal(allocator.exp_avg_unc[3 * i + j], ref[i, key][1])
    score = {k: v[0] * v[1] for k, v in ref.items()}
    for i, got in enumerate(allocator.triplet_scores()):  # peft's mask_to_budget
        s_A = score[i, "A"].mean(dim=1, keepdim=True)
        s_B = score[i, "B"].mean(dim=0, keepdim=False).view(-1, 1)
        expected = score[i, "E"].view(-1) + torch.cat([s_A, s_B], dim=1).sum(dim=1).view(-1)
        assert torch.equal(got, expected), i


def test_regularizer_follows_a_cast_model():
    """The allocator's cached shape groups and identities are dropped when the model is moved or cast."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Conv2d(2, 4, 3))
    adapters = ak.attach(net)
    adapters.add("a", ak.AdaLoRA(init_r=3, target_r=1, targets=["0", "1", "2"], init_weights=False))
    adapters.train("a")
    first = adapters.aux_loss()
    comps = list(adapters.components("a").values())
    expected = sum(
        torch.linalg.matrix_norm(c.lora_A @ c.lora_A.T - torch.eye(3))
        + torch.linalg.matrix_norm(c.lora_B.T @ c.lora_B - torch.eye(3))
        for c in comps
    ) * (0.5 / (2 * 3))
    torch.testing.assert_close(first, expected)
    net.double()
    again = adapters.aux_loss()
    assert again.dtype == torch.float64
    torch.testing.assert_close(again, expected.double(), rtol=1e-6, atol=0)
