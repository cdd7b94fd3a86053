"""``export --target vllm`` (``adapterkit.formats.vllm``) against vLLM's documented constraints (vLLM itself does not
run here): the ``adapter_config.json`` fields vLLM's ``PEFTHelper`` reads, the tensor names its loader parses, ranks
from its ``--max-lora-rank`` choices reached by zero padding (outputs unchanged), DoRA/LoHa/LoKr/VeRA/(IA)^3
converted by truncated SVD with the reported error, refusals naming each module, and ``vllm_check`` on files
that break a constraint. Every export must also load in peft and in adapterkit with the original logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterkit as ak
from adapterkit.formats import vllm as V

from conftest import make_inputs, make_model, output_of

TOL = dict(rtol=1e-5, atol=1e-5)
LLAMA_QV = ["q_proj", "v_proj"]


def _adapted(family: str, config: ak.AdapterConfig | str, **overrides) -> tuple[torch.nn.Module, ak.Adapters]:
    model = make_model(family)
    adapters = ak.attach(model)
    adapters.add("x", config, **overrides)
    return model, adapters


@torch.no_grad()
def _logits(model: torch.nn.Module, family: str) -> torch.Tensor:
    return output_of(model, make_inputs(family))


@torch.no_grad()
def _peft_logits(family: str, directory: Path) -> torch.Tensor:
    from peft import PeftModel

    return _logits(PeftModel.from_pretrained(make_model(family), directory).eval(), family)


@torch.no_grad()
def _ak_logits(family: str, directory: Path) -> torch.Tensor:
    model = make_model(family)
    ak.attach(model).load(directory, "v", activate=True)
    return _logits(model, family)


def _check_vllm_fields(directory: Path, model: torch.nn.Module, result: V.VllmExport) -> dict:
    """What vLLM's PEFTHelper and loader read, and vllm_check passing."""
    cfg = json.loads((directory / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] in V.MAX_LORA_RANKS and cfg["r"] == result.rank
    assert cfg["lora_alpha"] == result.lora_alpha and not cfg["use_rslora"]
    assert cfg["modules_to_save"] is None and cfg["use_dora"] is False and cfg["bias"] == "none"
    assert not cfg["lora_bias"] and not cfg["rank_pattern"] and not cfg["alpha_pattern"]
    assert sorted(cfg["target_modules"]) == sorted(m.module for m in result.modules)
    tensors = load_file(directory / "adapter_model.safetensors")
    for key, value in tensors.items():
        assert key.startswith("base_model.model.") and key.endswith(V._LORA_SUFFIXES), key
        is_a = key.endswith(("lora_A.weight", "lora_embedding_A"))
        assert (value.shape[0] if is_a else value.shape[1]) == result.rank, key
    assert V.vllm_check(directory, model=model, max_lora_rank=result.rank) == []
    report = json.loads((directory / V.REPORT).read_text())
    assert report["r"] == result.rank and [m["module"] for m in report["modules"]] == [
        m.module for m in result.modules
    ]
    return cfg


def test_allowed_rank_rounds_up_to_a_max_lora_rank_choice():
    assert [V.allowed_rank(r) for r in (1, 2, 8, 9, 16, 17, 256, 257, 320, 321, 512)] == [
        8,
        8,
        8,
        16,
        16,
        32,
        256,
        320,
        320,
        512,
        512,
    ]  # fmt: skip  (1 -> 8: rank 1 is only offered by the newest vLLM)
    for bad in (0, -3, 513, 1.5, True):
        with pytest.raises(ValueError, match="rank"):
            V.allowed_rank(bad)


@pytest.mark.parametrize("family,targets", [("llama", LLAMA_QV), ("gpt2", ["c_attn", "c_fc"])])
def test_lora_is_zero_padded_to_an_allowed_rank_with_the_same_logits(family, targets, tmp_path):
    model, adapters = _adapted(family, ak.LoRA(r=3, alpha=7, targets=targets, init_weights=False))
    expected = _logits(model, family)
    result = V.export(adapters, "x", tmp_path)
    cfg = _check_vllm_fields(tmp_path, model, result)
    assert cfg["r"] == 8 and cfg["lora_alpha"] / cfg["r"] == pytest.approx(7 / 3, rel=1e-15)
    assert cfg["fan_in_fan_out"] is (family == "gpt2")
    assert {m.conversion for m in result.modules} == {"pad"} and result.max_error < 1e-6
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for site, comp in adapters.components("x").items():
        A, B = tensors[f"base_model.model.{site}.lora_A.weight"], tensors[f"base_model.model.{site}.lora_B.weight"]
        assert torch.equal(A[:3], comp.lora_A.detach()) and torch.equal(B[:, :3], comp.lora_B.detach())
        assert not A[3:].any() and not B[:, 3:].any()  # zero padding: B' A' = B A
    torch.testing.assert_close(_peft_logits(family, tmp_path), expected, **TOL)
    torch.testing.assert_close(_ak_logits(family, tmp_path), expected, **TOL)


def test_rank_patterns_rslora_and_pissa_become_one_rank_and_one_scaling(tmp_path):
    cfg = ak.LoRA(r=4, alpha=6, rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3},
                  targets=LLAMA_QV, init_weights=False)  # fmt: skip
    model, adapters = _adapted("llama", cfg)
    expected = _logits(model, "llama")
    result = V.export(adapters, "x", tmp_path)
    assert result.rank == 8 and sorted({m.rank for m in result.modules}) == [2, 4]
    _check_vllm_fields(tmp_path, model, result)
    torch.testing.assert_close(_peft_logits("llama", tmp_path), expected, **TOL)
    torch.testing.assert_close(_ak_logits("llama", tmp_path), expected, **TOL)

    model, adapters = _adapted("llama", ak.LoRA(r=4, init="pissa", targets=LLAMA_QV))
    with torch.no_grad():
        for comp in adapters.components("x").values():
            comp.lora_B.add_(0.05 * torch.randn_like(comp.lora_B))
    expected = _logits(model, "llama")
    result = V.export(adapters, "x", tmp_path / "pissa")
    assert result.rank == 8 and {m.rank for m in result.modules} == {8}  # [A; A0], [B, -B0]
    _check_vllm_fields(tmp_path / "pissa", model, result)
    torch.testing.assert_close(_peft_logits("llama", tmp_path / "pissa"), expected, **TOL)


def test_input_embedding_and_lm_head_lora_use_vllms_names(tmp_path):
    model, adapters = _adapted(
        "llama", ak.LoRA(r=4, targets=["embed_tokens", "lm_head", "q_proj"], init_weights=False)
    )
    expected = _logits(model, "llama")
    result = V.export(adapters, "x", tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.model.embed_tokens.lora_embedding_B",
            "base_model.model.lm_head.lora_A.weight"} <= keys  # fmt: skip
    _check_vllm_fields(tmp_path, model, result)
    assert any("embed_tokens" in w for w in result.notes) and any("'lm_head'" in w for w in result.notes)
    torch.testing.assert_close(_peft_logits("llama", tmp_path), expected, **TOL)
    torch.testing.assert_close(_ak_logits("llama", tmp_path), expected, **TOL)


def _eckart_young(delta: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(delta.double())
    return (s[k:].square().sum().sqrt() / s.square().sum().sqrt()).item()


def test_dora_becomes_a_truncated_svd_lora_with_the_reported_error(tmp_path):
    model, adapters = _adapted("llama", ak.LoRA(r=4, dora=True, targets=LLAMA_QV, init_weights=False))
    torch.manual_seed(3)
    with torch.no_grad():  # a trained magnitude: ΔW = m (W + sBA) / ||W + sBA|| - W is full rank
        for comp in adapters.components("x").values():
            comp.magnitude.mul_(1 + 0.2 * torch.randn_like(comp.magnitude))
    expected = _logits(model, "llama")
    modules = dict(model.named_modules())
    deltas = {s: V._weight_change(c, modules[s])[0] for s, c in adapters.components("x").items()}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = V.export(adapters, "x", tmp_path / "full", rank=32)  # >= min(out, in) of every module: exact
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not adapters.is_merged("x")
    assert full.rank == 32 and {m.conversion for m in full.modules} == {"svd"}
    assert {m.source for m in full.modules} == {"dora r=4"} and full.max_error < 1e-6
    _check_vllm_fields(tmp_path / "full", model, full)
    torch.testing.assert_close(_peft_logits("llama", tmp_path / "full"), expected, **TOL)
    torch.testing.assert_close(_ak_logits("llama", tmp_path / "full"), expected, **TOL)

    low = V.export(adapters, "x", tmp_path / "low", rank=4)
    assert low.rank == 8  # truncated at 4, padded to vLLM's choice 8
    for m in low.modules:
        assert m.rank == 4 and m.error == pytest.approx(_eckart_young(deltas[m.module], 4), rel=1e-4, abs=1e-7)
        assert m.error > 1e-3
    report = json.loads((tmp_path / "low" / V.REPORT).read_text())
    assert report["max_relative_error"] == pytest.approx(low.max_error)
    assert "relative error" in low.table() and f"{low.modules[0].error:.3g}" in low.table()


@pytest.mark.parametrize(
    "method,opts,true_rank",
    [("loha", dict(r=2, targets=["q_proj"]), 4), ("lokr", dict(r=2, targets=["q_proj"]), None),
     ("vera", dict(r=4, targets=["q_proj"]), 4), ("ia3", dict(), None), ("oft", dict(), None),
     ("road", dict(group_size=16), None)],
)  # fmt: skip
def test_mergeable_methods_convert_exactly_at_full_rank(method, opts, true_rank, tmp_path):
    model, adapters = _adapted("llama", method, init_weights=False, **opts)
    expected = _logits(model, "llama")
    rank = true_rank or 64  # >= min(out, in) of every llama module
    result = V.export(adapters, "x", tmp_path, rank=rank)
    assert {m.conversion for m in result.modules} == {"svd"} and result.max_error < 1e-6
    _check_vllm_fields(tmp_path, model, result)
    torch.testing.assert_close(_peft_logits("llama", tmp_path), expected, **TOL)
    torch.testing.assert_close(_ak_logits("llama", tmp_path), expected, **TOL)
    if true_rank:
        assert V.export(adapters, "x", tmp_path / "low", rank=1).max_error > 1e-3


def test_unions_and_dora_on_the_input_embedding_convert(tmp_path):
    union = ak.Union(ak.LoRA(r=2, targets=["q_proj"], init_weights=False), ak.IA3(init_weights=False))
    model, adapters = _adapted("llama", union)
    expected = _logits(model, "llama")
    result = V.export(adapters, "x", tmp_path / "union", rank=64)
    assert result.method == "union" and result.max_error < 1e-6
    _check_vllm_fields(tmp_path / "union", model, result)
    torch.testing.assert_close(_peft_logits("llama", tmp_path / "union"), expected, **TOL)

    model, adapters = _adapted("llama", ak.LoRA(r=2, dora=True, targets=["embed_tokens"], init_weights=False))
    with torch.no_grad():
        for comp in adapters.components("x").values():
            comp.magnitude.mul_(1 + 0.2 * torch.randn_like(comp.magnitude))
    expected = _logits(model, "llama")
    result = V.export(adapters, "x", tmp_path / "emb", rank=32)  # embedding dim 32: exact
    assert result.max_error < 1e-6
    keys = set(load_file(tmp_path / "emb" / "adapter_model.safetensors"))
    assert keys == {
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "base_model.model.model.embed_tokens.lora_embedding_B",
    }
    _check_vllm_fields(tmp_path / "emb", model, result)
    torch.testing.assert_close(_peft_logits("llama", tmp_path / "emb"), expected, **TOL)
    torch.testing.assert_close(_ak_logits("llama", tmp_path / "emb"), expected, **TOL)


@pytest.mark.parametrize("dora", [False, True])
def test_merged_adapters_export_the_same_file(dora, tmp_path):
    model, adapters = _adapted("llama", ak.LoRA(r=4, dora=dora, targets=LLAMA_QV, init_weights=False))
    with torch.no_grad():
        for comp in adapters.components("x").values():
            if dora:
                comp.magnitude.mul_(1 + 0.2 * torch.randn_like(comp.magnitude))
    expected = _logits(model, "llama")
    V.export(adapters, "x", tmp_path / "unmerged", rank=32)
    adapters.merge("x")
    V.export(adapters, "x", tmp_path / "merged", rank=32)
    adapters.unmerge("x")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("unmerged", "merged"))
    assert a.keys() == b.keys()
    for key in (k for k in a if k.endswith("lora_A.weight")):
        key_b = key.replace("lora_A", "lora_B")  # compare B A: SVD factors are unique only up to signs
        torch.testing.assert_close(b[key_b] @ b[key], a[key_b] @ a[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_peft_logits("llama", tmp_path / "merged"), expected, **TOL)


def test_truncated_svd_is_near_optimal_on_large_matrices():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(600, 8, generator=g, dtype=torch.float64) @ torch.randn(
        8, 520, generator=g, dtype=torch.float64
    )
    M += 0.05 * torch.randn(600, 520, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(M)
    for k in (4, 16):  # the randomized path (k + 10 <= 260)
        A, B = V.truncated_svd(M, k)
        assert A.shape == (k, 520) and B.shape == (600, k)
        error = (torch.linalg.matrix_norm(M - B @ A) / torch.linalg.matrix_norm(M)).item()
        best = (s[k:].square().sum().sqrt() / s.square().sum().sqrt()).item()  # Eckart-Young
        assert best * (1 - 1e-9) <= error <= best * 1.01
    assert torch.equal(V.truncated_svd(M, 4)[0], V.truncated_svd(M, 4)[0])  # seeded: reproducible


def test_larger_lora_modules_are_truncated_to_rank(tmp_path):
    model, adapters = _adapted("llama", ak.LoRA(r=12, targets=LLAMA_QV, init_weights=False))
    result = V.export(adapters, "x", tmp_path, rank=8)
    assert result.rank == 8 and {(m.conversion, m.rank) for m in result.modules} == {("svd", 8)}
    assert all(m.error > 0 for m in result.modules)
    padded = V.export(adapters, "x", tmp_path / "p", rank=16)
    assert padded.rank == 16 and {m.conversion for m in padded.modules} == {"pad"}


def _refused(adapters: ak.Adapters, path: Path) -> dict[str, str]:
    with pytest.raises(V.VllmExportError) as info:
        V.export(adapters, "x", path)
    assert not path.exists()  # nothing written
    for site, why in info.value.refusals.items():
        assert site in str(info.value) and why in str(info.value)
    return info.value.refusals


def test_refusals_name_each_module_and_the_reason(tmp_path):
    _, adapters = _adapted("llama", ak.LoRA(r=4, targets=LLAMA_QV, heads=["lm_head"]))
    assert "modules_to_save" in _refused(adapters, tmp_path / "a")["lm_head"]

    _, adapters = _adapted("gpt2", ak.LoRA(r=4, targets=["c_attn"], bias="lora_only"))
    refusals = _refused(adapters, tmp_path / "b")
    assert set(refusals) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    assert all("bias" in why for why in refusals.values())

    _, adapters = _adapted("gpt2", ak.LoRA(r=4, targets=["wpe", "c_attn"]))
    assert "input embedding" in _refused(adapters, tmp_path / "c")["transformer.wpe"]

    model = make_model("gpt2")
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "Conv1D":
                module.bias.normal_()
    adapters = ak.attach(model)
    adapters.add("x", "ia3", init_weights=False)
    refusals = _refused(adapters, tmp_path / "d")
    assert all("bias" in why for site, why in refusals.items() if "c_attn" in site)  # output scaling scales b

    _, adapters = _adapted("vit", ak.LoRA(r=4, targets=["projection", "attn.q"]))
    refusals = _refused(adapters, tmp_path / "vit")
    assert list(refusals) == ["vit.embeddings.patch_embeddings.projection"] and "Conv2d" in str(refusals)

    for method in ("prompt_tuning", "bottleneck"):
        _, adapters = _adapted("llama", method)
        refusals = _refused(adapters, tmp_path / method)
        assert refusals and all("not a weight change" in why for why in refusals.values())

    _, adapters = _adapted("llama", ak.LoRA(r=4, targets=LLAMA_QV))
    with pytest.raises(ValueError, match="512"):
        V.export(adapters, "x", tmp_path / "f", rank=600)


def _rewrite(directory: Path, **changes) -> None:
    cfg = json.loads((directory / "adapter_config.json").read_text())
    cfg.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(cfg))


def test_vllm_check_flags_what_vllm_refuses(tmp_path):
    model, adapters = _adapted("llama", ak.LoRA(r=4, targets=LLAMA_QV, init_weights=False))
    V.export(adapters, "x", tmp_path / "ok")
    assert V.vllm_check(tmp_path / "ok", model=model) == []
    assert any("max_lora_rank 1" in p for p in V.vllm_check(tmp_path / "ok", max_lora_rank=1))

    bad = tmp_path / "bad"
    V.export(adapters, "x", bad)
    _rewrite(bad, use_dora=True, modules_to_save=["lm_head"], bias="all", r=1024, init_lora_weights="pissa",
             rank_pattern={"q_proj": 4})  # fmt: skip
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(3)
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, bad / "adapter_model.safetensors")
    problems = "\n".join(V.vllm_check(bad, model=model))
    for needle in ("DoRA", "modules_to_save", "bias", "greater than max_lora_rank 512", "pissa", "rank_pattern",
                   "lm_head.weight: not a LoRA weight", "q_proj: lora_B is missing"):  # fmt: skip
        assert needle in problems, (needle, problems)

    # peft's own export of a DoRA adapter (magnitude vectors) is what vLLM refuses
    _, adapters = _adapted("llama", ak.LoRA(r=4, dora=True, targets=LLAMA_QV))
    adapters.export("x", tmp_path / "dora", format="peft")
    problems = "\n".join(V.vllm_check(tmp_path / "dora"))
    assert "DoRA" in problems and "lora_magnitude_vector: not a LoRA weight" in problems


def test_cli_export_target_vllm(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from typer.testing import CliRunner

    from adapterkit.cli import app

    base = tmp_path / "llama"
    model = make_model("llama")
    model.save_pretrained(base)
    vocab = {f"w{i}": i for i in range(100)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w1")),
                                  unk_token="w1", eos_token="w0", pad_token="w0")  # fmt: skip
    tok.save_pretrained(base)
    adapters = ak.attach(model)
    adapters.add("sql", ak.LoRA(r=4, dora=True, targets=LLAMA_QV, init_weights=False))
    adapters.save("sql", tmp_path / "sql")
    expected = _logits(model, "llama")

    def run(*args):
        return CliRunner().invoke(app, ["export", str(tmp_path / "sql"), "--model", str(base), *map(str, args)])

    result = run("--format", "peft", "--target", "vllm", "--rank", "32", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "relative error" in result.output and "r=32" in result.output and "dora r=4" in result.output
    _check_vllm_fields(tmp_path / "out", model, _report_of(tmp_path / "out"))
    torch.testing.assert_close(_peft_logits("llama", tmp_path / "out"), expected, **TOL)

    for args, needle in (
        (("--target", "vllm", "--rank", "1000", "--out", tmp_path / "x"), "512"),
        (("--target", "vllm", "--format", "native", "--out", tmp_path / "x"), "--format peft"),
        (("--rank", "8", "--out", tmp_path / "x"), "--target vllm"),
    ):
        result = run(*args)
        assert result.exit_code != 0 and needle in result.output, result.output
    assert not (tmp_path / "x").exists()


def _report_of(directory: Path) -> V.VllmExport:
    data = json.loads((directory / V.REPORT).read_text())
    modules = [V.ModuleExport(**m) for m in data["modules"]]
    return V.VllmExport(data["adapter"], data["method"], data["r"], data["lora_alpha"], modules, data["notes"])


def test_adapters_export_with_target_vllm(tmp_path):
    """The public verb: ``adapters.export(name, path, target="vllm", rank=...)`` is the same export."""
    model, adapters = _adapted("llama", ak.LoRA(r=4, dora=True, targets=LLAMA_QV, init_weights=False))
    report = adapters.export("x", tmp_path / "api", target="vllm", rank=8)
    V.export(adapters, "x", tmp_path / "direct", rank=8)
    assert report.rank == 8 and (tmp_path / "api" / V.REPORT).is_file()
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("api", "direct"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="only applies to target='vllm'"):
        adapters.export("x", tmp_path / "bad", rank=8)
    with pytest.raises(ValueError, match="targets are 'vllm' and 'diffusers'"):
        adapters.export("x", tmp_path / "bad", format="native", target="vllm")
