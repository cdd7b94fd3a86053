"""Weight-space merging: the pure functions' equations, ``Adapters.combine`` on LoRA against peft's
``add_weighted_adapter`` (float32 logits within 1e-5), task-arithmetic negation, AdapterSoup, MWA, and
parameter-wise merging of a non-LoRA method (a test-only (IA)^3-like scaling vector)."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit import merging
from adapterkit.component import Component
from adapterkit.config import AdapterConfig

from conftest import make_inputs, make_model

TOL = {"atol": 1e-5, "rtol": 1e-5}


@torch.no_grad()
def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits.float()


@torch.no_grad()
def perturb(params: Any, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * scale)


# --- pure functions ---------------------------------------------------------------------------------
def test_linear_and_task_arithmetic() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    torch.testing.assert_close(merging.linear([a, b], [0.5, 2.0]), torch.tensor([6.5, -1.0]))
    ref = torch.ones(2)
    # θ0 + Σ w (θ - θ0)
    torch.testing.assert_close(merging.task_arithmetic([a, b], [1.0, 1.0], ref), torch.tensor([3.0, 0.0]))
    # negation of an (IA)^3 vector: 1 - (l - 1)
    torch.testing.assert_close(merging.negate(torch.tensor([1.5, 0.25]), ref), torch.tensor([0.5, 1.75]))
    torch.testing.assert_close(merging.task_arithmetic([a], [-1.0], ref), merging.negate(a, ref))
    A, B = torch.randn(2, 3), torch.randn(4, 2)
    A2, B2 = merging.negate_lora(A, B)
    torch.testing.assert_close(merging.lora_delta(A2, B2), -merging.lora_delta(A, B))
    torch.testing.assert_close(merging.soup([a, b]), torch.tensor([2.0, 0.5]))


def test_trim_keeps_top_k_by_magnitude() -> None:
    t = torch.tensor([0.1, -3.0, 2.0, -0.5, 1.0])
    torch.testing.assert_close(merging.trim(t, 0.4), torch.tensor([0.0, -3.0, 2.0, 0.0, 0.0]))
    torch.testing.assert_close(merging.trim(t, 1.0), t)
    torch.testing.assert_close(
        merging.magnitude_prune([t, t], [1.0, 0.5], 0.4), torch.tensor([0.0, -4.5, 3.0, 0.0, 0.0])
    )


def test_ties_hand_example() -> None:
    t1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
    t2 = torch.tensor([-1.0, 1.5, -4.0, 0.2])
    # trim (density 0.5): t1 -> [0, -2, 3, 0], t2 -> [0, 1.5, -4, 0]
    # elect "total": sums [0, -0.5, -1, 0] -> signs [+, -, -, +]; agreeing: t1[1], t2[2]
    torch.testing.assert_close(merging.ties([t1, t2], [1.0, 1.0], 0.5), torch.tensor([0.0, -2.0, -4.0, 0.0]))
    # elect "frequency": one + and one - everywhere -> + wins ties; agreeing: t2[1], t1[2]
    out = merging.ties([t1, t2], [1.0, 1.0], 0.5, "frequency")
    torch.testing.assert_close(out, torch.tensor([0.0, 1.5, 3.0, 0.0]))
    # disjoint mean averages the agreeing entries (and weights enter before the mean, as in peft)
    t3 = torch.tensor([0.0, -1.0, 0.0, 0.0])
    torch.testing.assert_close(
        merging.ties([t1, t2, t3], [1.0, 1.0, 2.0], 0.5), torch.tensor([0.0, -2.0, -4.0, 0.0])
    )  # entry 1: (-2 * 1 + -1 * 2) / 2


def test_dare_rescales_and_is_deterministic() -> None:
    t = torch.ones(200_000)
    g = torch.Generator().manual_seed(0)
    out = merging.random_drop(t, 0.3, generator=g)
    kept = out != 0
    assert out[kept].unique().tolist() == pytest.approx([1 / 0.3])  # kept entries scaled by 1/density
    assert kept.float().mean().item() == pytest.approx(0.3, abs=0.01)  # dropped with p = 1 - density
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)  # unbiased: E[drop(t)] = t
    again = merging.random_drop(t, 0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    # dare_linear == Σ w drop(τ) with the same draws
    a, b = torch.randn(50), torch.randn(50)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    want = 0.5 * merging.random_drop(a, 0.5, generator=g2) + 2.0 * merging.random_drop(b, 0.5, generator=g2)
    torch.testing.assert_close(merging.dare_linear([a, b], [0.5, 2.0], 0.5, generator=g1), want)
    assert torch.equal(merging.random_drop(a, 1.0), a)


def test_dare_ties_is_ties_after_the_drop() -> None:
    a, b = torch.randn(40), torch.randn(40)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    da, db = (merging.random_drop(x, 0.6, generator=g2) for x in (a, b))
    want = merging.disjoint_mean(torch.stack([da, 2 * db]), merging.elect_sign(torch.stack([da, db])))
    torch.testing.assert_close(merging.dare_ties([a, b], [1.0, 2.0], 0.6, generator=g1), want)


def test_svd_exact_at_true_rank_and_truncation_optimal() -> None:
    g = torch.Generator().manual_seed(0)
    d1 = torch.randn(12, 2, generator=g) @ torch.randn(2, 9, generator=g)
    d2 = torch.randn(12, 3, generator=g) @ torch.randn(3, 9, generator=g)
    total = 0.7 * d1 - 0.3 * d2  # rank 5
    for r in (5, 8, 10):  # r >= true rank (10 > min(12, 9): zero rows)
        A, B = merging.svd([d1, d2], [0.7, -0.3], r)
        assert A.shape == (r, 9) and B.shape == (12, r)
        torch.testing.assert_close(B @ A, total, atol=1e-5, rtol=1e-5)
    A, B = merging.svd([d1, d2], [0.7, -0.3], 2)
    s = torch.linalg.svdvals(total)
    err = torch.linalg.matrix_norm(B @ A - total)
    assert err.item() == pytest.approx(s[2:].square().sum().sqrt().item(), rel=1e-4)  # Eckart-Young


def test_cat_is_the_exact_sum_of_deltas() -> None:
    g = torch.Generator().manual_seed(0)
    f1 = (torch.randn(2, 7, generator=g), torch.randn(5, 2, generator=g))
    f2 = (torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g))
    A, B = merging.cat([f1, f2], [0.5, -1.5], [2.0, 0.25])
    assert A.shape == (5, 7) and B.shape == (5, 5)
    want = 0.5 * 2.0 * f1[1] @ f1[0] - 1.5 * 0.25 * f2[1] @ f2[0]
    torch.testing.assert_close(B @ A, want, atol=1e-6, rtol=1e-6)
    # conv layout: A (r, in, kh, kw), B (out, r, 1, 1)
    c1 = (torch.randn(2, 3, 3, 3, generator=g), torch.randn(4, 2, 1, 1, generator=g))
    A, B = merging.cat([c1, c1], [1.0, 1.0])
    torch.testing.assert_close(merging.lora_delta(A, B), 2 * merging.lora_delta(*c1))


def test_metric_weights_formula() -> None:
    # loss: w_i ∝ (1 / loss_i)^p
    assert merging.metric_weights([1.0, 2.0, 4.0], 1.0, "loss") == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert merging.metric_weights([1.0, 2.0], 2.0, "loss") == pytest.approx([0.8, 0.2])
    # step: w_i ∝ step_i^p
    assert merging.metric_weights([100, 200], 2.0, "step") == pytest.approx([0.2, 0.8])
    assert merging.metric_weights([3.0, 1.0, 7.0], 0.0) == pytest.approx([1 / 3] * 3)  # p = 0: uniform
    big = merging.metric_weights([1.0, 1.1], 5000.0)  # no overflow; all weight on the lowest loss
    assert big == pytest.approx([1.0, 0.0]) and sum(big) == pytest.approx(1.0)
    for bad in ([], [1.0, -1.0], [0.0]):
        with pytest.raises(ValueError):
            merging.metric_weights(bad, 1.0)
    with pytest.raises(ValueError, match="penalty"):
        merging.metric_weights([1.0], -1.0)
    with pytest.raises(ValueError, match="kind"):
        merging.metric_weights([1.0], 1.0, "accuracy")  # type: ignore[arg-type]


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, None])
def test_density_must_be_in_0_1(density: Any) -> None:
    with pytest.raises(ValueError, match="density"):
        merging.ties([torch.ones(3)], [1.0], density)


# --- against peft's add_weighted_adapter -------------------------------------------------------------
# (family, targets of adapter a, targets of adapter b): partly different targets exercise peft's union
FAMILIES = {
    "llama": (["attn.q", "attn.v"], ["attn.q", "attn.k", "embed"]),
    "bert": (["attn.q", "attn.v"], ["attn.q", "attn.k"]),
    "gpt2": (["attn.qkv"], ["attn.qkv", "ffn.up"]),
}
PEFT_TYPES = ["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
              "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]  # fmt: skip
WEIGHTS = [0.7, -0.4]


@dataclasses.dataclass
class Pair:
    family: str
    model: nn.Module
    adapters: ak.Adapters
    peft_model: Any
    inputs: dict[str, torch.Tensor]
    base: torch.Tensor


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory) -> Pair:
    peft = pytest.importorskip("peft")
    warnings.filterwarnings("ignore", module="peft")
    family = request.param
    ta, tb = FAMILIES[family]
    model = make_model(family)
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=4, alpha=8, targets=ta, init_weights=False))
    adapters.add("b", ak.LoRA(r=4, alpha=6, targets=tb, init_weights=False))
    perturb(adapters.parameters("a"), 1, scale=0.5)
    perturb(adapters.parameters("b"), 2, scale=0.5)
    root: Path = tmp_path_factory.mktemp(f"merge-{family}")
    adapters.export("a", root / "a", format="peft")
    adapters.export("b", root / "b", format="peft")
    pm = peft.PeftModel.from_pretrained(make_model(family), str(root / "a"), adapter_name="a")
    pm.load_adapter(str(root / "b"), adapter_name="b")
    pm.eval()
    inputs = make_inputs(family)
    with adapters.use():
        base = logits(model, inputs)
    return Pair(family, model, adapters, pm, inputs, base)


def _seeded_random_pruning(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """peft's random_pruning (merge_utils) drawing from a generator seeded like ``combine(seed=...)``."""
    import peft.utils.merge_utils as mu

    g = torch.Generator().manual_seed(seed)

    def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
        mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density), generator=g)
        pruned = tensor * mask
        return pruned / density if rescale else pruned

    monkeypatch.setattr(mu, "random_pruning", random_pruning)


@pytest.mark.parametrize("combination_type", PEFT_TYPES)
def test_matches_peft_add_weighted_adapter(pair: Pair, combination_type: str, monkeypatch) -> None:
    kw: dict[str, Any] = {}
    if combination_type not in ("linear", "cat", "svd"):
        kw["density"] = 0.5
    if combination_type.startswith("dare") and combination_type.endswith("svd") and pair.family != "bert":
        # peft draws these masks in the module's storage layout (Conv1D: (in, out), embedding: (num, dim)),
        # we in factor layout (out, in): same distribution, other entries. BERT (nn.Linear only) checks the
        # seeded draws; here density 1 checks the rest of the computation.
        kw["density"] = 1.0
    if combination_type.endswith("svd"):
        kw["svd_rank"] = 3
    _seeded_random_pruning(monkeypatch, 7)
    name = f"m_{combination_type}"
    pair.peft_model.add_weighted_adapter(["a", "b"], WEIGHTS, name, combination_type=combination_type, **kw)
    pair.peft_model.set_adapter(name)
    theirs = logits(pair.peft_model, pair.inputs)

    ours_kw = {"density": kw.get("density"), "r": kw.get("svd_rank"), "seed": 7}
    pair.adapters.combine(name, ["a", "b"], WEIGHTS, combination_type, **ours_kw)
    with pair.adapters.use(name):
        ours = logits(pair.model, pair.inputs)
    assert (ours - pair.base).abs().max() > 1e-3, "the combined adapter does nothing; the test is vacuous"
    torch.testing.assert_close(ours, theirs, **TOL)
    assert pair.adapters.config(name).r == pair.peft_model.peft_config[name].r


@pytest.mark.parametrize("options", [{"svd_clamp": 0.9}, {"majority_sign_method": "frequency"}])
def test_matches_peft_options(pair: Pair, options: dict[str, Any]) -> None:
    ctype, kw = ("svd", {"svd_rank": 2}) if "svd_clamp" in options else ("ties_svd", {"density": 0.7})
    name = f"opt_{next(iter(options))}"
    pair.peft_model.add_weighted_adapter(["a", "b"], WEIGHTS, name, combination_type=ctype, **kw, **options)
    pair.peft_model.set_adapter(name)
    theirs = logits(pair.peft_model, pair.inputs)
    pair.adapters.combine(
        name, ["a", "b"], WEIGHTS, ctype, density=kw.get("density"), r=kw.get("svd_rank"), **options
    )
    with pair.adapters.use(name):
        torch.testing.assert_close(logits(pair.model, pair.inputs), theirs, **TOL)


def test_combined_adapter_exports_to_peft(pair: Pair, tmp_path: Path) -> None:
    import peft

    pair.adapters.combine("exported", ["a", "b"], WEIGHTS, "svd")
    with pair.adapters.use("exported"):
        ours = logits(pair.model, pair.inputs)
    pair.adapters.export("exported", tmp_path, format="peft")
    pm = peft.PeftModel.from_pretrained(make_model(pair.family), str(tmp_path)).eval()
    torch.testing.assert_close(logits(pm, pair.inputs), ours, **TOL)


def test_task_arithmetic_is_the_exact_weighted_sum(pair: Pair) -> None:
    ad = pair.adapters
    ad.combine("ta", ["a", "b"], [0.7, -0.4], "task_arithmetic")
    for site, comp in ad.components("ta").items():
        want = sum(
            w * ad.components(n)[site].delta_weight(None)
            for n, w in (("a", 0.7), ("b", -0.4))
            if site in ad.components(n)
        )
        torch.testing.assert_close(comp.delta_weight(None), want, atol=1e-6, rtol=1e-5)
    with ad.use("a", "b"):  # active LoRA adapters sum, so weights (1, 1) == both active
        both = logits(pair.model, pair.inputs)
    ad.combine("ta_sum", ["a", "b"], None, "task_arithmetic")
    with ad.use("ta_sum"):
        torch.testing.assert_close(logits(pair.model, pair.inputs), both, **TOL)


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "svd"])
def test_negation_removes_the_task_vector(pair: Pair, method: str) -> None:
    name = f"zero_{method}"
    pair.adapters.combine(name, ["a", "a"], [1.0, -1.0], method)
    with pair.adapters.use(name):
        torch.testing.assert_close(logits(pair.model, pair.inputs), pair.base, **TOL)
    # a single negated adapter undoes the adapter when stacked on it (svd: exact up to SVD rounding)
    neg = f"neg_{method}"
    pair.adapters.combine(neg, ["b"], [-1.0], method)
    with pair.adapters.use("b", neg):
        tol = TOL if method != "svd" else {"atol": 1e-4, "rtol": 1e-4}
        torch.testing.assert_close(logits(pair.model, pair.inputs), pair.base, **tol)


def test_soup_of_one_is_that_adapter(pair: Pair) -> None:
    pair.adapters.combine("soup1", ["b"], method="soup")
    with pair.adapters.use("b"):
        want = logits(pair.model, pair.inputs)
    with pair.adapters.use("soup1"):
        torch.testing.assert_close(logits(pair.model, pair.inputs), want, **TOL)
    for k, v in pair.adapters.components("soup1").items():
        for key, t in v.state_dict().items():
            assert torch.equal(t, pair.adapters.components("b")[k].state_dict()[key])


# --- adapter-level behaviour on one model --------------------------------------------------------------
@pytest.fixture
def lora_model() -> tuple[nn.Module, ak.Adapters, dict[str, torch.Tensor]]:
    model = make_model("bert")
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=4, alpha=8, init_weights=False))
    adapters.add("b", ak.LoRA(r=4, alpha=8, init_weights=False))
    adapters.add("c", ak.LoRA(r=2, alpha=8, init_weights=False))
    perturb(adapters.parameters("a"), 1)
    perturb(adapters.parameters("b"), 2)
    return model, adapters, make_inputs("bert")


def test_soup_averages_every_tensor(lora_model) -> None:
    _, ad, _ = lora_model
    ad.combine("s", ["a", "b"], method="soup")
    for site, comp in ad.components("s").items():
        for key, t in comp.state_dict().items():
            want = (ad.components("a")[site].state_dict()[key] + ad.components("b")[site].state_dict()[key]) / 2
            torch.testing.assert_close(t, want)
    assert ad.config("s").r == 4


def test_metric_weighted_average(lora_model) -> None:
    _, ad, _ = lora_model
    w = merging.metric_weights([0.5, 2.0], penalty=1.0, kind="loss")  # [0.8, 0.2]
    ad.combine("mwa", ["a", "b"], w, "task_arithmetic")
    site = next(iter(ad.components("mwa")))
    want = 0.8 * ad.components("a")[site].delta_weight(None) + 0.2 * ad.components("b")[site].delta_weight(None)
    torch.testing.assert_close(ad.components("mwa")[site].delta_weight(None), want, atol=1e-6, rtol=1e-5)


def test_dare_seed_is_reproducible(lora_model) -> None:
    _, ad, _ = lora_model
    ad.combine("d1", ["a", "b"], [1.0, 1.0], "dare_ties", density=0.5, seed=3)
    ad.combine("d2", ["a", "b"], [1.0, 1.0], "dare_ties", density=0.5, seed=3)
    ad.combine("d3", ["a", "b"], [1.0, 1.0], "dare_ties", density=0.5, seed=4)
    s1, s2, s3 = (list(ad.parameters(n)) for n in ("d1", "d2", "d3"))
    assert all(torch.equal(x, y) for x, y in zip(s1, s2))
    assert not all(torch.equal(x, y) for x, y in zip(s1, s3))
    ad.combine("d4", ["a", "b"], [1.0, 1.0], "dare_linear", density=1.0)  # nothing dropped: == linear
    ad.combine("lin", ["a", "b"], [1.0, 1.0], "linear")
    assert all(torch.equal(x, y) for x, y in zip(ad.parameters("d4"), ad.parameters("lin")))


def test_cat_of_different_ranks(lora_model) -> None:
    model, ad, inputs = lora_model
    ad.combine("ac", ["a", "c"], [1.0, 1.0], "cat")
    assert ad.config("ac").r == 6
    with ad.use("a", "c"):
        want = logits(model, inputs)
    with ad.use("ac"):
        torch.testing.assert_close(logits(model, inputs), want, **TOL)


def test_bias_deltas_and_heads_use_their_reference() -> None:
    """Non-factor tensors of LoRA adapters (bias deltas, bias="all" extras, head copies) merge parameter-wise
    from their identity values (zero deltas, the base head), so negation still gives the base model."""
    model = make_model("bert")
    ad = ak.attach(model)
    ad.add("a", ak.LoRA(r=2, bias="all", heads=["classifier"], init_weights=False))
    perturb(ad.parameters("a"), 4, scale=0.3)
    inputs = make_inputs("bert")
    with ad.use():
        base = logits(model, inputs)
    with ad.use("a"):
        adapted = logits(model, inputs)
    for method in ("task_arithmetic", "svd", "ties"):
        ad.combine(f"zero_{method}", ["a", "a"], [1.0, -1.0], method, density=1.0 if method == "ties" else None)
        with ad.use(f"zero_{method}"):
            torch.testing.assert_close(logits(model, inputs), base, **TOL)
    assert set(ad.sites("zero_svd").values()) == {"target", "extra", "head"}
    ad.combine("twice", ["a", "a"], [0.5, 0.5], "task_arithmetic")
    with ad.use("twice"):
        torch.testing.assert_close(logits(model, inputs), adapted, **TOL)


def test_rslora_sources_keep_their_scaling() -> None:
    """The new adapter has scaling 1 with the sources' (rsLoRA) scalings folded in; one source keeps the method,
    so svd to a smaller rank compresses an adapter (peft would switch to linear and scale it by sqrt(r))."""
    model = make_model("llama")
    ad = ak.attach(model)
    ad.add("rs", ak.LoRA(r=4, alpha=8, rslora=True, init_weights=False))
    perturb(ad.parameters("rs"), 3, scale=0.3)
    inputs = make_inputs("llama")
    with ad.use("rs"):
        want = logits(model, inputs)
    ad.combine("same", ["rs"], method="svd")
    assert ad.config("same").rslora is False and ad.config("same").alpha == 4
    with ad.use("same"):
        torch.testing.assert_close(logits(model, inputs), want, atol=1e-4, rtol=1e-4)
    ad.combine("small", ["rs"], method="svd", r=2)
    assert next(iter(ad.components("small").values())).lora_A.shape[0] == 2


def test_conv2d_factors() -> None:
    model = make_model("vit")
    ad = ak.attach(model)
    targets = ["embeddings.patch_embeddings.projection", "attn.q"]
    ad.add("a", ak.LoRA(r=2, alpha=4, targets=targets, init_weights=False))
    ad.add("b", ak.LoRA(r=3, alpha=3, targets=targets, init_weights=False))
    perturb(ad.parameters("a"), 1, scale=0.3)
    perturb(ad.parameters("b"), 2, scale=0.3)
    inputs = make_inputs("vit")
    ad.combine("cat", ["a", "b"], [0.5, 2.0], "cat")
    ad.combine("svd", ["a", "b"], [0.5, 2.0], "svd", r=5)  # rank 5 >= rank of the sum: exact
    conv = ad.components("svd")["vit.embeddings.patch_embeddings.projection"]
    assert conv.lora_A.shape == (5, 3, 4, 4) and conv.lora_B.shape == (32, 5, 1, 1)
    with ad.use("cat"):
        want = logits(model, inputs)
    with ad.use("svd"):
        torch.testing.assert_close(logits(model, inputs), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((["a", "b"], None, "average"), {}, "unknown merge method 'average'; choose one of: linear, cat"),
        ((["a", "b"], [1.0]), {}, "1 weights for 2 adapters"),
        ((["a", "b"], [1.0, 1.0], "ties"), {}, "density is required"),
        ((["a", "b"], [1.0, 1.0], "ties"), {"density": 0.0}, r"density must be in \(0, 1\]"),
        ((["a", "b"], [1.0, 1.0], "dare_linear"), {"density": 1.2}, r"density must be in \(0, 1\]"),
        ((["a", "b"], [1.0, 1.0], "linear"), {"density": 0.5}, "density applies to"),
        ((["a", "b"], [1.0, 1.0], "cat"), {"r": 2}, "r .the SVD rank. applies"),
        ((["a", "c"], [1.0, 1.0], "linear"), {}, "needs one rank"),
        ((["a", "c"], None, "soup"), {}, "differ in"),
        ((["a", "b"], [1.0, 1.0], "soup"), {}, "drop `weights`"),
        ((["a", "nope"],), {}, "no adapter named 'nope'"),
        (([],), {}, "non-empty list"),
        ((["a", "b"], [1.0, float("nan")]), {}, "finite"),
        (
            (["a", "b"], [1.0, 1.0], "ties"),
            {"density": 0.5, "majority_sign_method": "max"},
            "majority_sign_method",
        ),
    ],
)
def test_errors_leave_the_model_unchanged(lora_model, args, kwargs, match) -> None:
    model, ad, inputs = lora_model
    before = list(ad.names)
    with pytest.raises((ValueError, KeyError), match=match):
        ad.combine("new", *args, **kwargs)
    assert ad.names == before
    ad.combine("new", ["a", "b"])  # the name is still free


def test_existing_name_is_refused(lora_model) -> None:
    _, ad, _ = lora_model
    with pytest.raises(ValueError, match="already exists"):
        ad.combine("a", ["a", "b"])


def test_dora_and_pissa_are_refused() -> None:
    model = make_model("llama")
    ad = ak.attach(model)
    ad.add("d", ak.LoRA(r=2, dora=True, init_weights=False))
    ad.add("p", ak.LoRA(r=2, init="pissa", targets=["attn.k"]))
    with pytest.raises(ValueError, match="DoRA"):
        ad.combine("x", ["d", "d"], [1.0, 1.0], "cat")
    with pytest.raises(ValueError, match="pissa"):
        ad.combine("x", ["p"], [1.0], "svd")
    assert ad.names == ["d", "p"]


# --- (IA)^3: parameter-wise, against peft's IA3 add_weighted_adapter ------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ia3_linear_matches_peft(family: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    if not hasattr(ak, "IA3"):
        pytest.skip("no (IA)^3 method in this build")
    model = make_model(family)
    ad = ak.attach(model)
    ad.add("a", ak.IA3(init_weights=False))
    ad.add("b", ak.IA3(init_weights=False))
    perturb(ad.parameters("b"), 5, scale=0.2)
    ad.export("a", tmp_path / "a", format="peft")
    ad.export("b", tmp_path / "b", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(make_model(family), str(tmp_path / "a"), adapter_name="a").eval()
        pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
        pm.add_weighted_adapter(["a", "b"], [0.6, 0.5], "m")
    pm.set_adapter("m")
    inputs = make_inputs(family)
    ad.combine("m", ["a", "b"], [0.6, 0.5], "linear")
    with ad.use("m"):
        ours = logits(model, inputs)
    with ad.use():
        assert (ours - logits(model, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(ours, logits(pm, inputs), **TOL)


def test_ia3_task_arithmetic_negation() -> None:
    if not hasattr(ak, "IA3"):
        pytest.skip("no (IA)^3 method in this build")
    model = make_model("llama")
    ad = ak.attach(model)
    ad.add("a", ak.IA3(init_weights=False))
    inputs = make_inputs("llama")
    with ad.use():
        base = logits(model, inputs)
    ad.combine("zero", ["a", "a"], [1.0, -1.0], "task_arithmetic")
    with ad.use("zero"):
        torch.testing.assert_close(logits(model, inputs), base, **TOL)
    ad.combine("neg", ["a"], [-1.0], "task_arithmetic")
    for site, comp in ad.components("neg").items():
        torch.testing.assert_close(comp.scale, 1 - (ad.components("a")[site].scale - 1))  # Zhang et al. 2023


# --- a non-LoRA method: parameter-wise merging with identity references ------------------------------------
class _Scale(Component):
    """y * l with l: (out,), identity at l = 1 (like (IA)^3); a random offset vector with random init."""

    def __init__(self, module: nn.Module, random: bool) -> None:
        super().__init__()
        self.l = nn.Parameter(torch.ones(module.out_features))
        self.u = nn.Parameter(torch.zeros(module.out_features))
        self.random = random

    def initialize(self, module: nn.Module) -> None:
        with torch.no_grad():
            self.u.normal_(std=0.01)  # a random init: no canonical origin -> θ0 = 0
            if self.random:
                self.l.add_(torch.randn_like(self.l) * 0.1)
                self.u.normal_()

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * self.l + self.u


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ScaleConfig(AdapterConfig):
    """Deliberately unregistered (the contract matrix requires rows for registered methods)."""

    init_weights: bool = True

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def build(self, module: nn.Module, name: str) -> Component:
        return _Scale(module, random=not self.init_weights)


def _scale_model() -> tuple[nn.Module, ak.Adapters]:
    model = make_model("bert")
    ad = ak.attach(model)
    ad.add("a", _ScaleConfig(targets=["attn.v"], init_weights=False))
    ad.add("b", _ScaleConfig(targets=["attn.v"], init_weights=False))
    return model, ad


def _tensor(ad: ak.Adapters, name: str, key: str) -> torch.Tensor:
    return torch.stack([c.state_dict()[key] for c in ad.components(name).values()])


def test_parameter_wise_task_arithmetic_uses_the_identity_reference() -> None:
    model, ad = _scale_model()
    la, lb = _tensor(ad, "a", "l"), _tensor(ad, "b", "l")
    ua = _tensor(ad, "a", "u")
    ad.combine("neg", ["a"], [-1.0], "task_arithmetic")
    torch.testing.assert_close(_tensor(ad, "neg", "l"), 1 - (la - 1))  # Zhang et al. 2023: 1 - (l - 1)
    torch.testing.assert_close(_tensor(ad, "neg", "u"), -ua)  # random init: reference 0
    ad.combine("zero", ["a", "a"], [1.0, -1.0], "task_arithmetic")
    inputs = make_inputs("bert")
    with ad.use():
        base = logits(model, inputs)
    with ad.use("zero"):
        torch.testing.assert_close(logits(model, inputs), base, **TOL)
    ad.combine("lin", ["a", "b"], [0.5, 0.25], "linear")  # peft's (IA)^3 rule: Σ w l
    torch.testing.assert_close(_tensor(ad, "lin", "l"), 0.5 * la + 0.25 * lb)
    ad.combine("soup", ["a", "b"], method="soup")
    torch.testing.assert_close(_tensor(ad, "soup", "l"), (la + lb) / 2)
    ad.combine("ties", ["a", "b"], [1.0, 1.0], "ties", density=0.5)
    want = torch.stack(
        [1 + merging.ties([x - 1, y - 1], [1.0, 1.0], 0.5) for x, y in zip(la, lb)]
    )  # per site: θ0 + ties(τ)
    torch.testing.assert_close(_tensor(ad, "ties", "l"), want)


def test_parameter_wise_merging_refuses_lora_only_methods_and_mixtures() -> None:
    model, ad = _scale_model()
    with pytest.raises(ValueError, match="re-factorizes LoRA"):
        ad.combine("x", ["a", "b"], [1.0, 1.0], "svd")
    ad.add("lora", ak.LoRA(r=2, targets=["attn.v"]))
    with pytest.raises(ValueError, match="cannot merge"):
        ad.combine("x", ["a", "lora"], [1.0, 1.0], "linear")
    ad.add("other", _ScaleConfig(targets=["attn.q"]))
    with pytest.raises(ValueError, match="differ in"):
        ad.combine("x", ["a", "other"], method="soup")
    assert "x" not in ad
