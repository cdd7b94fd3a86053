"""Data-aware LoRA inits (issue 18): EVA and CorDA through ``adapters.calibrate``, equal to peft's
``init_lora_weights="eva"`` / ``"corda"`` on a tiny Llama with the same calibration batches; exports to peft;
uncalibrated adapters refuse to run."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import types
from pathlib import Path

import pytest
import torch

import adapterkit as ak

from conftest import make_model

peft = pytest.importorskip("peft")
from peft import EvaConfig, LoraConfig, PeftModel, get_peft_model, initialize_lora_eva_weights  # noqa: E402

T = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
TAU = 0.9  # converges in a few passes over the toy batches (peft's default 0.99 takes ~60 model calls)


def batches(n: int = 4, B: int = 2, T_: int = 12, seed: int = 0, labels: bool = True) -> list[dict]:
    """Padded rows (attention_mask 0) and masked labels (-100), so both of EVA's token masks matter."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 100, (B, T_), generator=g)
        mask = torch.ones(B, T_, dtype=torch.long)
        mask[-1, :3] = 0
        b = {"input_ids": ids, "attention_mask": mask}
        if labels:
            lab = ids.clone()
            lab[0, :4] = -100
            b["labels"] = lab
        out.append(b)
    return out


def peft_eva(data: list[dict], eva: dict, **lora: object) -> torch.nn.Module:
    cfg = LoraConfig(target_modules=T, init_lora_weights="eva", eva_config=EvaConfig(**eva), **lora)
    pm = get_peft_model(make_model("llama"), cfg)
    initialize_lora_eva_weights(pm, data, show_progress_bar=False)
    return pm


def ours_eva(data: list[dict], eva: dict, calls: int = 12, **lora: object) -> tuple[torch.nn.Module, ak.Adapters]:
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("e", ak.LoRA(targets=T, init="eva", eva=eva, **lora))
    adapters.calibrate("e", itertools.islice(itertools.cycle(data), calls))  # peft cycles its dataloader
    return model, adapters


def peft_layers(pm: torch.nn.Module) -> dict[str, torch.nn.Module]:
    prefix = "base_model.model."
    return {n[len(prefix) :]: m for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


# --- EVA --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("eva", "lora"),
    [
        pytest.param({"tau": TAU}, {"r": 4, "lora_alpha": 8}, id="defaults"),
        pytest.param({"tau": TAU, "rho": 1.0}, {"r": 4, "lora_alpha": 8}, id="rho1", marks=pytest.mark.slow),
        pytest.param(
            {"tau": TAU, "adjust_scaling_factors": False, "use_label_mask": False},
            {"r": 3, "lora_alpha": 5, "use_rslora": True},
            id="no-adjust-no-label-mask-rslora",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            {"tau": TAU, "rho": 3.0},
            {"r": 2, "lora_alpha": 4, "rank_pattern": {"o_proj": 4}},
            id="pattern",
            marks=pytest.mark.slow,
        ),
        pytest.param({"tau": TAU, "rho": 4.0}, {"r": 1, "lora_alpha": 2}, id="rank0"),
    ],
)
def test_eva_equals_peft(eva: dict, lora: dict) -> None:
    data = batches()
    pm = peft_eva(data, eva, **lora)
    ours = {
        "r": lora["r"],
        "alpha": lora["lora_alpha"],
        "rslora": lora.get("use_rslora", False),
        "rank_pattern": lora.get("rank_pattern", {}),
    }
    _, adapters = ours_eva(data, eva, **ours)
    theirs = peft_layers(pm)
    comps = adapters.components("e")
    assert {s for s, c in comps.items() if c.r > 0} == set(theirs)  # rank 0: peft removes the layer
    if eva.get("rho", 2.0) > 1:
        assert len({c.r for c in comps.values()}) > 1, "the toy run should redistribute ranks"
    for site, c in comps.items():
        if c.r == 0:
            continue
        layer = theirs[site]
        assert c.r == layer.r["default"]
        assert c.scaling == pytest.approx(layer.scaling["default"])
        torch.testing.assert_close(c.lora_A, layer.lora_A["default"].weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c.lora_B, layer.lora_B["default"].weight)  # zeros
    assert sum(c.r for c in comps.values()) == sum(
        ours["rank_pattern"].get(s.rsplit(".", 1)[-1], ours["r"]) for s in comps
    )


@pytest.mark.slow
def test_eva_whiten_equals_peft_where_inputs_differ() -> None:
    """peft whitens the components of an equal-input group (q/k/v) in place once per layer of the group, and the A
    of earlier layers are views of them: those layers are divided by sqrt(S) several times. We divide once (the
    paper); layers with their own inputs (o_proj, down_proj) are equal."""
    data = batches()
    eva = {"tau": TAU, "whiten": True}
    pm = peft_eva(data, eva, r=4, lora_alpha=8)
    _, adapters = ours_eva(data, eva, r=4, alpha=8)
    theirs = peft_layers(pm)
    for site, c in adapters.components("e").items():
        if site.endswith(("o_proj", "down_proj")) and c.r:
            torch.testing.assert_close(c.lora_A, theirs[site].lora_A["default"].weight, atol=1e-5, rtol=1e-5)


def test_eva_not_converged_names_calibrate_and_cycling() -> None:
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("e", ak.LoRA(targets=T, init="eva", eva={"tau": 0.999999}))
    with pytest.raises(RuntimeError, match="did not converge.*itertools.cycle"):
        adapters.calibrate("e", batches(2))
    with pytest.raises(RuntimeError, match=r"adapters\.calibrate"):
        model(**batches(1)[0])


def test_eva_calibration_continues_across_calls() -> None:
    """An unconverged calibration can be continued with more batches: the same result as one longer call."""
    data = batches()
    eva = {"tau": TAU}
    _, once = ours_eva(data, eva, calls=12, r=2, alpha=4)
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("e", ak.LoRA(targets=T, init="eva", eva=eva, r=2, alpha=4))
    with pytest.raises(RuntimeError, match="did not converge"):
        adapters.calibrate("e", data[:2])
    adapters.calibrate("e", itertools.islice(itertools.cycle(data[2:] + data), 10))
    for site, c in adapters.components("e").items():
        torch.testing.assert_close(c.lora_A, once.components("e")[site].lora_A, atol=0, rtol=0)


def test_eva_export_loads_in_peft_and_back(tmp_path: Path) -> None:
    data = batches()
    model, adapters = ours_eva(data, {"tau": TAU, "rho": 4.0}, calls=20, r=1, alpha=2)  # some sites get rank 0
    comps = adapters.components("e")
    torch.manual_seed(3)
    with torch.no_grad():
        for c in comps.values():
            c.lora_B.normal_(std=0.1)  # as if trained
    x = batches(1, seed=7, labels=False)[0]
    with torch.no_grad():
        expected = model(**x).logits
        with adapters.disabled():
            base = model(**x).logits
        with adapters.route(["e", None]):  # per-row routing (rank-0 sites fall back to one call per adapter)
            routed = model(**x).logits
    torch.testing.assert_close(routed, torch.stack([expected[0], base[1]]))
    adapters.export("e", tmp_path / "peft", format="peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True
    assert 0 in {c.r for c in comps.values()}
    assert cfg["rank_pattern"] == {s: c.r for s, c in comps.items() if c.r not in (0, 1)}
    assert set(cfg["target_modules"]) == {s for s, c in comps.items() if c.r}
    pm = PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(**x).logits, expected, atol=1e-5, rtol=1e-5)
    # native round trip keeps the redistributed ranks and needs no calibration
    adapters.save("e", tmp_path / "native")
    fresh = make_model("llama")
    ak.attach(fresh).load(tmp_path / "native")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x).logits, expected)
    adapters.merge("e")
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, expected, atol=1e-5, rtol=1e-5)


def test_peft_eva_directory_loads(tmp_path: Path) -> None:
    """peft saves EVA adapters with init_lora_weights="eva": a plain LoRA on the original model."""
    pm = peft_eva(batches(), {"tau": TAU}, r=4, lora_alpha=8)
    with torch.no_grad():
        for m in peft_layers(pm).values():
            m.lora_B["default"].weight.normal_(std=0.1)
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "eva"
    x = batches(1, seed=7, labels=False)[0]
    with torch.no_grad():
        expected = pm.eval()(**x).logits
    model = make_model("llama")
    ak.attach(model).load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, expected, atol=1e-5, rtol=1e-5)


# --- CorDA -------------------------------------------------------------------------------------------------------
def _preprocess_corda():
    try:
        import attr  # noqa: F401  (peft 0.21's corda.py imports attrs' `dataclass`)
    except ImportError:
        sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    return CordaConfig, preprocess_corda


def corda_batches(n: int = 4, seed: int = 0) -> list[dict]:
    """One sequence per batch: peft's CorDA hook takes ``input[0].squeeze(0)`` (one sample per call)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, 100, (1, 16), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
@pytest.mark.parametrize("rslora", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_corda_equals_peft(mode: str, rslora: bool, tmp_path: Path) -> None:
    CordaConfig, preprocess_corda = _preprocess_corda()
    data = corda_batches()
    targets = ["q_proj", "v_proj", "down_proj"]
    model = make_model("llama")
    cfg = LoraConfig(
        r=4, lora_alpha=6, use_rslora=rslora, target_modules=targets, init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=mode),
    )  # fmt: skip
    with torch.no_grad():
        preprocess_corda(model, cfg, run_model=lambda: [model(**b) for b in data])
    pm = get_peft_model(model, cfg).eval()

    ours = make_model("llama")
    original = {n: p.detach().clone() for n, p in ours.named_parameters()}
    adapters = ak.attach(ours)
    adapters.add(
        "c", ak.LoRA(targets=targets, init="corda", corda={"corda_method": mode}, r=4, alpha=6, rslora=rslora)
    )
    assert adapters.calibrate("c", data) == 4
    theirs, modules = peft_layers(pm), dict(ours.named_modules())
    for site, c in adapters.components("c").items():
        layer = theirs[site]
        torch.testing.assert_close(c.lora_A, layer.lora_A["default"].weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c.lora_B, layer.lora_B["default"].weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(modules[site].weight, layer.base_layer.weight, atol=1e-5, rtol=1e-5)  # residual
    x = corda_batches(1, seed=5)[0]
    with torch.no_grad():
        base = make_model("llama")(**x).logits
        torch.testing.assert_close(ours(**x).logits, base, atol=1e-4, rtol=1e-4)  # W_res + s B A = W
        torch.testing.assert_close(ours(**x).logits, pm(**x).logits, atol=1e-5, rtol=1e-5)

    # exported as peft converts it (path_initial_model_for_weight_conversion): a LoRA on the original weights
    with torch.no_grad():
        for c in adapters.components("c").values():
            c.lora_A.add_(0.05 * torch.randn_like(c.lora_A))
            c.lora_B.add_(0.05 * torch.randn_like(c.lora_B))
        trained = ours(**x).logits
    adapters.export("c", tmp_path, format="peft")
    exported = json.loads((tmp_path / "adapter_config.json").read_text())
    assert exported["r"] == 8 and exported["init_lora_weights"] is True
    loaded = PeftModel.from_pretrained(make_model("llama"), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, trained, atol=1e-4, rtol=1e-4)
    adapters.delete("c")  # the original weights come back bit for bit
    for n, p in ours.named_parameters():
        assert torch.equal(p, original[n]), n


def test_corda_native_round_trip(tmp_path: Path) -> None:
    data = corda_batches()
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("c", ak.LoRA(targets=["q_proj", "v_proj"], init="corda", corda={"corda_method": "kpm"}))
    adapters.calibrate("c", data)
    with torch.no_grad():
        for c in adapters.components("c").values():
            c.lora_B.add_(0.05)
    x = corda_batches(1, seed=5)[0]
    with torch.no_grad():
        expected = model(**x).logits
    adapters.save("c", tmp_path)
    fresh = make_model("llama")
    ak.attach(fresh).load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x).logits, expected, atol=1e-5, rtol=1e-5)


# --- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["eva", "corda"])
def test_uncalibrated_refuses_forward_merge_export(init: str, tmp_path: Path) -> None:
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add(
        "a",
        ak.LoRA(targets=["q_proj", "o_proj"], init=init, r=2, **({"eva": {"tau": TAU}} if init == "eva" else {})),
    )
    x = corda_batches(1)[0]
    with pytest.raises(RuntimeError, match=r"adapters\.calibrate"):
        model(**x)
    with pytest.raises(RuntimeError, match=r"adapters\.calibrate"), adapters.route(["a"]), torch.no_grad():
        model(**x)
    adapters.train("a")
    with pytest.raises(RuntimeError, match=r"adapters\.calibrate"):
        model(**x).logits.sum().backward()
    with pytest.raises(RuntimeError, match=r"adapters\.calibrate"):
        adapters.merge("a")
    with pytest.raises(RuntimeError, match=r"adapters\.calibrate"):
        adapters.export("a", tmp_path, format="peft")
    adapters.calibrate(
        "a", corda_batches(8) if init == "corda" else itertools.islice(itertools.cycle(batches()), 30)
    )
    model(**x)  # fine now
    with pytest.raises(RuntimeError, match="already calibrated"):
        adapters.calibrate("a", corda_batches(2))


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="eva= options need init='eva'"):
        ak.LoRA(eva={"rho": 1.0})
    with pytest.raises(ValueError, match="unknown options"):
        ak.LoRA(init="eva", eva={"rhoo": 1.0})
    with pytest.raises(ValueError, match="rho"):
        ak.LoRA(init="eva", eva={"rho": 0.5})
    with pytest.raises(ValueError, match="corda_method"):
        ak.LoRA(init="corda", corda={"corda_method": "xpm"})
    with pytest.raises(ValueError, match="dora"):
        ak.LoRA(init="corda", dora=True)
    adapters = ak.attach(make_model("llama"))
    with pytest.raises(TypeError, match="linear layers"):
        adapters.add("a", ak.LoRA(targets=["embed_tokens"], init="eva"))
    cfg = ak.LoRA(init="eva", eva={"tau": 0.9})
    assert type(cfg).__name__ == "LoRA" and cfg.to_dict()["eva"] == {"tau": 0.9}


GPT2_TARGETS = ["c_attn", "c_fc", "c_proj"]


def test_corda_conv1d_gpt2_equals_peft() -> None:
    """GPT-2's Conv1D (weight stored (in, out), peft's fan_in_fan_out)."""
    CordaConfig, preprocess_corda = _preprocess_corda()
    data, targets = corda_batches(), GPT2_TARGETS
    model = make_model("gpt2")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda", fan_in_fan_out=True,
                     corda_config=CordaConfig(corda_method="ipm"))  # fmt: skip
    with torch.no_grad():
        preprocess_corda(model, cfg, run_model=lambda: [model(**b) for b in data])
    theirs = peft_layers(get_peft_model(model, cfg))
    ours = make_model("gpt2")
    adapters = ak.attach(ours)
    adapters.add("c", ak.LoRA(targets=targets, init="corda", r=4, alpha=8))
    adapters.calibrate("c", data)
    modules = dict(ours.named_modules())
    for site, c in adapters.components("c").items():
        torch.testing.assert_close(c.lora_A, theirs[site].lora_A["default"].weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(modules[site].weight, theirs[site].base_layer.weight, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_eva_conv1d_gpt2_equals_peft() -> None:
    data, targets = corda_batches(), GPT2_TARGETS
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva", fan_in_fan_out=True,
                     eva_config=EvaConfig(tau=TAU))  # fmt: skip
    pm = get_peft_model(make_model("gpt2"), cfg)
    initialize_lora_eva_weights(pm, data, show_progress_bar=False)
    theirs = peft_layers(pm)
    adapters = ak.attach(make_model("gpt2"))
    adapters.add("e", ak.LoRA(targets=targets, init="eva", eva={"tau": TAU}, r=4, alpha=8))
    adapters.calibrate("e", itertools.islice(itertools.cycle(data), 30))
    for site, c in adapters.components("e").items():
        assert c.r == (theirs[site].r["default"] if site in theirs else 0)
        if c.r:
            torch.testing.assert_close(c.lora_A, theirs[site].lora_A["default"].weight, atol=1e-5, rtol=1e-5)


def test_eva_root_hooks_live_only_until_calibration_or_delete() -> None:
    model = make_model("llama")
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    adapters = ak.attach(model)
    adapters.add("e", ak.LoRA(targets=["o_proj"], r=1, init="eva", eva={"tau": 0.0}))
    added = (len(model._forward_pre_hooks), len(model._forward_hooks))
    assert added[0] > hooks[0] and added[1] > hooks[1]  # the token mask of each model call
    adapters.delete("e")
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    adapters.add("e", ak.LoRA(targets=["o_proj"], r=1, init="eva", eva={"tau": 0.0}))
    adapters.calibrate("e", batches(3))
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
