"""VB-LoRA (``ak.VBLoRA``): peft equivalence both ways (float32 logits within 1e-5 on the same perturbed weights, eval
mode, full logits and ``save_only_topk_weights``), the equations, the shared bank, the top-k-only state, the batched
routed path and refusals.

* peft -> adapterkit: ``get_peft_model(VBLoRAConfig)``, perturb every trainable tensor (the bank and the logits; top-k
  ties are then irrelevant), ``save_pretrained``, ``ak.attach(other).load(dir)`` on an identical model.
* adapterkit -> peft: ``init_weights=False``, perturb, ``export(format="peft")``, ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import adapterkit as ak
from adapterkit.formats import AdapterFileError
from adapterkit.methods.vblora import VBLoRALinear, VectorBank, logits_from_topk, mix, topk_state

from conftest import make_inputs, make_model, output_of

peft = pytest.importorskip("peft")
from peft import PeftModel, get_peft_model  # noqa: E402

warnings.filterwarnings("ignore", module="peft")

TOL = {"atol": 1e-5, "rtol": 1e-5}


@torch.no_grad()
def perturb(params: Any, seed: int = 123, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def logits(model: nn.Module, x: dict) -> torch.Tensor:
    return output_of(model, x).float()


# family, peft target_modules, our targets, config fields shared by both
CASES = [
    ("llama", ["q_proj", "v_proj", "down_proj"], ["q_proj", "v_proj", "down_proj"], dict(r=4, num_vectors=16, vector_length=8)),
    ("gpt2", ["c_attn", "c_fc"], ["c_attn", "c_fc"], dict(r=2, num_vectors=12, vector_length=16, topk=3)),  # Conv1D
]  # fmt: skip
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("topk_only", [False, True], ids=["logits", "topk-only"])
@pytest.mark.parametrize(("family", "peft_targets", "targets", "kw"), CASES, ids=IDS)
def test_peft_to_adapterkit(family, peft_targets, targets, kw, topk_only, tmp_path):
    x = make_inputs(family)
    base = make_model(family)
    base_out = logits(base, x)
    cfg = peft.VBLoRAConfig(target_modules=peft_targets, save_only_topk_weights=topk_only, **kw)
    pm = get_peft_model(base, cfg).eval()
    perturb(trainable(pm))
    expected = logits(pm, x)
    assert (expected - base_out).abs().max() > 1e-3
    pm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("_topk_indices") for k in saved) == topk_only
    model = make_model(family)
    adapters = ak.attach(model)
    name = adapters.load(tmp_path)
    model.eval()
    got = adapters.config(name)
    assert isinstance(got, ak.VBLoRA) and got.save_only_topk_weights == topk_only
    assert (got.r, got.num_vectors, got.vector_length, got.topk) == (
        kw["r"],
        kw["num_vectors"],
        kw["vector_length"],
        kw.get("topk", 2),
    )
    assert len(adapters.sites(name)) == 2 * len(peft_targets)
    torch.testing.assert_close(logits(model, x), expected, **TOL)
    if topk_only:  # and equal to peft's own reload of its top-k file
        again = PeftModel.from_pretrained(make_model(family), tmp_path).eval()
        torch.testing.assert_close(logits(again, x), expected, **TOL)
        # served and merged, never trained
        adapters.merge(name)
        torch.testing.assert_close(logits(model, x), expected, **TOL)
        adapters.unmerge(name)
        model.train()
        with pytest.raises(RuntimeError, match="save_only_topk_weights"):
            output_of(model, x)


@pytest.mark.parametrize("topk_only", [False, True], ids=["logits", "topk-only"])
@pytest.mark.parametrize(("family", "peft_targets", "targets", "kw"), CASES, ids=IDS)
def test_adapterkit_to_peft(family, peft_targets, targets, kw, topk_only, tmp_path):
    x = make_inputs(family)
    model = make_model(family)
    adapters = ak.attach(model)
    adapters.add("a", ak.VBLoRA(targets=targets, init_weights=False, save_only_topk_weights=topk_only, **kw))
    model.eval()
    perturb(adapters.parameters("a"))
    expected = logits(model, x)
    adapters.export("a", tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VBLORA" and config["save_only_topk_weights"] == topk_only
    assert config["fan_in_fan_out"] == (family == "gpt2")
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(k.endswith("vblora_vector_bank") for k in saved) == 1
    assert any(k.endswith("_topk_indices") for k in saved) == topk_only
    pm = PeftModel.from_pretrained(make_model(family), tmp_path).eval()
    torch.testing.assert_close(logits(pm, x), expected, **TOL)
    # and back: the directory loads into ours with equal logits
    again = make_model(family)
    ak.attach(again).load(tmp_path)
    again.eval()
    torch.testing.assert_close(logits(again, x), expected, **TOL)


def test_defaults_and_init_follow_peft():
    ours = ak.VBLoRA()
    theirs = peft.VBLoRAConfig()
    for field in ("r", "num_vectors", "vector_length", "topk", "save_only_topk_weights"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.dropout == theirs.vblora_dropout
    assert ours.init_vector_bank_bound == theirs.init_vector_bank_bound
    assert ours.init_logits_std == theirs.init_logits_std
    model = make_model("llama")
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", ak.VBLoRA(num_vectors=64, vector_length=8, targets=["q_proj", "up_proj"]))
    comps = list(adapters.components("a").values())
    bank = comps[0].bank.vector_bank
    assert bank.shape == (64, 8) and bank.abs().max() <= 0.02
    assert all(c.bank.vector_bank is bank for c in comps)  # one bank for the adapter
    q, up = comps[0], comps[1]
    assert q.logits_A.shape == (4, 32 // 8, 64) and q.logits_B.shape == (32 // 8, 4, 64)
    assert up.logits_A.shape == (4, 32 // 8, 64) and up.logits_B.shape == (64 // 8, 4, 64)
    all_logits = torch.cat([p.detach().flatten() for c in comps for p in (c.logits_A, c.logits_B)])
    assert 0.08 < all_logits.std().item() < 0.12
    # not an identity at init, but close: A and B are both mixtures of the small bank
    x = make_inputs("llama")
    with adapters.use():
        base = logits(model, x)
    delta = (logits(model, x) - base).abs().max().item()
    assert 0 < delta < 1e-2


def test_equations_and_shared_bank():
    """A/B are the top-k softmax mixtures of the bank (sub-vectors along A's rows and B's columns); the forward is
    ``y + B A x``; the bank is one parameter, counted and saved once, trained by every site."""
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.VBLoRA(r=3, num_vectors=10, vector_length=8, topk=3, init_weights=False,
                                targets=["q_proj", "k_proj", "down_proj"]))  # fmt: skip
    comps = list(adapters.components("a").values())
    comp = comps[-1]  # down_proj: 64 -> 32
    assert isinstance(comp, VBLoRALinear) and isinstance(comp.bank, VectorBank)
    V = comp.bank.vector_bank.detach()
    A, B = comp.factors()
    for i in range(3):
        for j in range(64 // 8):
            lg = comp.logits_A[i, j].detach()
            top = lg.topk(3)
            want = (torch.softmax(top.values, -1)[:, None] * V[top.indices]).sum(0)
            torch.testing.assert_close(A[i, j * 8 : (j + 1) * 8], want)
    for j in range(32 // 8):
        for i in range(3):
            lg = comp.logits_B[j, i].detach()
            top = lg.topk(3)
            want = (torch.softmax(top.values, -1)[:, None] * V[top.indices]).sum(0)
            torch.testing.assert_close(B[j * 8 : (j + 1) * 8, i], want)
    xs, ys = torch.randn(2, 5, 64), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(comp.post(xs, ys.clone()), ys + xs @ A.T @ B.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comp.delta_weight(model), B @ A)
    # one bank: one parameter in adapters.parameters, in the summary and in the native file
    params = list(adapters.parameters("a"))
    assert sum(p is comp.bank.vector_bank for p in params) == 1
    expected = sum(c.logits_A.numel() + c.logits_B.numel() for c in comps) + V.numel()
    assert sum(p.numel() for p in params) == expected
    assert adapters.summary().rows[0]["params"] == expected
    adapters.train("a")
    output_of(model, make_inputs("llama")).sum().backward()
    bank_grad = comp.bank.vector_bank.grad
    assert bank_grad is not None and bank_grad.abs().sum() > 0
    assert all(c.logits_A.grad is not None and c.logits_B.grad is not None for c in comps)


def test_save_only_topk_weights_files(tmp_path):
    """``save_only_topk_weights`` shapes peft exports (int16 indices past 255 vectors); native files keep full logits,
    so a trained adapter resumes from them, while one loaded from a top-k file (−inf logits) keeps refusing to
    train after a native round trip; merging (also into a dense copy) works in both."""
    x = make_inputs("gpt2")
    model = make_model("gpt2")
    adapters = ak.attach(model)
    cfg = ak.VBLoRA(r=2, num_vectors=300, vector_length=16, save_only_topk_weights=True, init_weights=False)
    adapters.add("a", cfg)
    model.eval()
    perturb(adapters.parameters("a"))
    expected = logits(model, x)
    # native: full logits, trainable after loading
    adapters.save("a", tmp_path / "native")
    saved = load_file(tmp_path / "native" / "adapter.safetensors")
    assert any(k.endswith("logits_A") for k in saved) and not any("topk" in k for k in saved)
    # peft export: the top-k form
    adapters.export("a", tmp_path / "peft", format="peft")
    exported = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    idx = [v for k, v in exported.items() if k.endswith("_topk_indices")]
    assert idx and all(v.dtype == torch.int16 for v in idx)  # 256 <= num_vectors < 2**15
    assert not any(k.endswith(("logits_A", "logits_B")) for k in exported)
    full = sum(c.logits_A.numel() + c.logits_B.numel() for c in adapters.components("a").values()) * 4
    assert sum(v.numel() * v.element_size() for k, v in exported.items() if "topk" in k) < full / 50
    for path, trains in ((tmp_path / "native", True), (tmp_path / "peft", False)):
        fresh = make_model("gpt2")
        fa = ak.attach(fresh)
        name = fa.load(path)
        fresh.eval()
        torch.testing.assert_close(logits(fresh, x), expected, **TOL)
        fa.save(name, tmp_path / f"again-{trains}")  # a native round trip keeps what it can do
        again = make_model("gpt2")
        ga = ak.attach(again)
        ga.load(tmp_path / f"again-{trains}")
        again.eval()
        torch.testing.assert_close(logits(again, x), expected, **TOL)
        dense = ga.merge_and_detach(dtype=torch.float32)
        torch.testing.assert_close(logits(dense, x), expected, **TOL)
        fa.train(name)
        if trains:
            output_of(fresh, x).sum().backward()
        else:
            with pytest.raises(RuntimeError, match="save_only_topk_weights file.*to resume training"):
                output_of(fresh, x)


def test_topk_helpers_round_trip():
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(3, 4, 20, generator=g)
    bank = torch.randn(20, 6, generator=g)
    for k in (1, 2, 5):
        indices, weights = topk_state(lg, k, 20)
        assert indices.dtype == torch.uint8 and weights.shape == (3, 4, k - 1)
        rebuilt = logits_from_topk(indices, weights, 20)
        assert torch.isinf(rebuilt).sum() == 3 * 4 * (20 - k)
        torch.testing.assert_close(mix(rebuilt, bank, k), mix(lg, bank, k))


def test_routed_path_is_batched():
    """A mixed batch runs through VBLoRALinear.routed (each adapter's A/B built once per site, no per-adapter post)
    and equals per-row runs, without and with gradients."""
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.VBLoRA(r=3, num_vectors=16, vector_length=8, init_weights=False))
    adapters.add("b", ak.VBLoRA(r=2, num_vectors=8, vector_length=16, topk=1, init_weights=False))
    model.eval()
    rows = ["b", None, "a", "b"]
    x = make_inputs("llama", batch=4)
    singles = []
    for i, n in enumerate(rows):
        with adapters.use(n):
            singles.append(logits(model, {k: v[i : i + 1] for k, v in x.items()}))
    comps = [*adapters.components("a").values(), *adapters.components("b").values()]
    for c in comps:
        c.__dict__.pop("_factor_cache", None)  # the single-row runs cached their factors
    builds = []
    orig_build, orig_post = VBLoRALinear._build, VBLoRALinear.post

    def counting(self):
        builds.append(self)
        return orig_build(self)

    def refuse(self, x, y):
        raise AssertionError("routing fell back to one post per adapter")

    try:
        VBLoRALinear._build, VBLoRALinear.post = counting, refuse
        with adapters.route(rows):
            mixed = logits(model, x)
        assert sorted(map(id, builds)) == sorted(map(id, comps))  # once per adapter and site
        with adapters.route(rows):  # weights unchanged: the stacked factors are reused
            logits(model, x)
        assert len(builds) == len(comps)
    finally:
        VBLoRALinear._build, VBLoRALinear.post = orig_build, orig_post
    torch.testing.assert_close(mixed, torch.cat(singles), **TOL)
    # with gradients (a mixed training batch) too
    adapters.train("a")
    for p in adapters.parameters("b"):
        p.requires_grad_(True)
    model.eval()
    with adapters.route(rows):
        out = output_of(model, x)
    torch.testing.assert_close(out.detach(), torch.cat(singles), **TOL)
    out.sum().backward()
    assert all(p.grad is not None for n in ("a", "b") for p in adapters.parameters(n))


def test_eval_cache_follows_parameter_changes():
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.VBLoRA(num_vectors=16, vector_length=8, init_weights=False))
    x = make_inputs("llama")
    first = logits(model, x)
    torch.testing.assert_close(logits(model, x), first, atol=0, rtol=0)
    comp = next(iter(adapters.components("a").values()))
    with torch.no_grad():
        comp.bank.vector_bank.mul_(2.0)
    second = logits(model, x)
    assert (second - first).abs().max() > 1e-4
    with torch.enable_grad():
        torch.testing.assert_close(output_of(model, x).detach(), second, **TOL)
    # a training step with fused AdamW (which does not bump parameter versions), then eval again: no stale factors
    adapters.train("a")
    opt = torch.optim.AdamW(list(adapters.parameters("a")), lr=0.5, fused=True)
    output_of(model, x).pow(2).mean().backward()
    opt.step()
    adapters.step()
    third = logits(model, x)
    assert (third - second).abs().max() > 1e-4
    comp.__dict__.pop("_factor_cache")
    torch.testing.assert_close(logits(model, x), third, atol=0, rtol=0)


def test_refusals():
    with pytest.raises(ValueError, match="topk=5 exceeds num_vectors=4.*lower topk or raise num_vectors"):
        ak.VBLoRA(num_vectors=4, topk=5)
    for field, bad in (("r", 0), ("num_vectors", -1), ("vector_length", 2.5), ("topk", 0), ("topk", True)):
        with pytest.raises(ValueError, match=f"VBLoRA {field} must be a positive integer"):
            ak.VBLoRA(**{field: bad})
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        ak.VBLoRA(dropout=1.0)
    with pytest.raises(ValueError, match="init_logits_std must be a non-negative number"):
        ak.VBLoRA(init_logits_std=-1)
    with pytest.raises(ValueError, match="save_only_topk_weights must be True or False"):
        ak.VBLoRA(save_only_topk_weights="yes")
    model = make_model("llama")
    adapters = ak.attach(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # k_proj is 32 -> 16: vector_length 32 divides the input, not the output
    with pytest.raises(
        ValueError, match=r"vector_length=32 does not divide the output size 16 of '.*k_proj'.*divisor of 16"
    ):
        adapters.add("a", ak.VBLoRA(vector_length=32, targets=["q_proj", "k_proj"]))
    with pytest.raises(ValueError, match=r"vblora cannot act on \['model.embed_tokens'\] \(Embedding\)"):
        adapters.add("a", ak.VBLoRA(vector_length=8, targets=["embed_tokens"]))
    assert adapters.names == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_peft_file_refusals(tmp_path):
    base = make_model("llama")
    pm = get_peft_model(base, peft.VBLoRAConfig(target_modules=["q_proj"], num_vectors=8, vector_length=8))
    pm.save_pretrained(tmp_path / "ok")
    cfg_path = tmp_path / "ok" / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    # a bias-training file
    (tmp_path / "bias").mkdir()
    (tmp_path / "bias" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "ok" / "adapter_model.safetensors").read_bytes()
    )
    (tmp_path / "bias" / "adapter_config.json").write_text(json.dumps({**data, "bias": "all"}))
    with pytest.raises(AdapterFileError, match="bias='all'"):
        ak.attach(make_model("llama")).load(tmp_path / "bias")
    # a config whose bank size disagrees with the file
    (tmp_path / "size").mkdir()
    (tmp_path / "size" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "ok" / "adapter_model.safetensors").read_bytes()
    )
    (tmp_path / "size" / "adapter_config.json").write_text(json.dumps({**data, "num_vectors": 9}))
    with pytest.raises(AdapterFileError, match="num_vectors=9"):
        ak.attach(make_model("llama")).load(tmp_path / "size")
    # a model whose sizes vector_length does not divide
    (tmp_path / "len").mkdir()
    (tmp_path / "len" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "ok" / "adapter_model.safetensors").read_bytes()
    )
    (tmp_path / "len" / "adapter_config.json").write_text(json.dumps({**data, "vector_length": 64}))
    with pytest.raises(AdapterFileError):
        ak.attach(make_model("llama")).load(tmp_path / "len")
    # an unrelated export refuses nothing: the good file loads
    ak.attach(make_model("llama")).load(tmp_path / "ok")


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_in_place_training_forward_matches_out_of_place(family, monkeypatch):
    """Training forwards accumulate ``h Bᵀ`` into the layer's own output (no bias: a fresh tensor; with a bias or
    GPT-2's Conv1D: the base of a whole-tensor view); loss and every gradient equal the out-of-place ``addmm``."""
    from adapterkit.methods import vblora

    x = make_inputs(family)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = make_model(family)
        adapters = ak.attach(model)
        torch.manual_seed(0)
        adapters.add(
            "a", ak.VBLoRA(r=2, num_vectors=8, vector_length=16, init_weights=False, targets="all-linear")
        )
        adapters.train("a")
        model.train()
        out = output_of(model, x)
        loss = (out.float() ** 2).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    calls = []
    real = vblora._sole_owner
    monkeypatch.setattr(vblora, "_sole_owner", lambda y: calls.append(real(y)) or calls[-1])
    loss, grads = run()
    assert any(c is not None for c in calls)  # the in-place path ran
    monkeypatch.setattr(vblora, "_sole_owner", lambda y: None)
    ref_loss, ref_grads = run()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-6, rtol=1e-5, msg=n)


def test_heads_round_trip_through_peft(tmp_path):
    """A classifier head copy (peft's ``modules_to_save``) travels with the adapter both ways."""
    x = make_inputs("bert")
    model = make_model("bert")
    adapters = ak.attach(model)
    adapters.add("a", ak.VBLoRA(num_vectors=16, vector_length=8, init_weights=False, heads=["classifier"]))
    model.eval()
    perturb(adapters.parameters("a"))
    expected = logits(model, x)
    adapters.export("a", tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    pm = PeftModel.from_pretrained(make_model("bert"), tmp_path).eval()
    torch.testing.assert_close(logits(pm, x), expected, **TOL)
    again = make_model("bert")
    ak.attach(again).load(tmp_path)
    again.eval()
    torch.testing.assert_close(logits(again, x), expected, **TOL)
