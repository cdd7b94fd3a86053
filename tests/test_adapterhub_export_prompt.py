"""AdapterHub export of prefix tuning, prompt tuning, the gates and the unions (MAM, UniPELT) (issue 16 item 4;
formats/adapterhub_export_prompt.py, formats/adapterhub_export_union.py).

- Default suite: the library's prefix/prompt/MAM/UniPELT/gated fixtures are exported again and read back by our
  reader with the library's recorded outputs (padded batches too); adapters built here (random, no identities) go
  the same round trip; what AdapterHub cannot hold exactly (peft-style prefix positions, peft-style prompt tuning,
  per-token union gates, ...) is refused naming the field to change, before anything is written.
- Slow: the real library (``.venv-adapterhub``: adapters 1.3.0, transformers 4.57.6) loads those exports, written
  as ``adapter.safetensors``, onto the same base weights and gives our outputs (tests/adapterhub_library_check.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import adapterkit as ak
from adapterhub_library import HUB_PYTHON, run_library
from adapterkit.formats.adapterhub_export import AdapterHubExportError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_adapterhub import CASES, FIXTURES, expected, fresh, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
METHODS = {
    "prefix_tuning",
    "prefix_tuning_flat",
    "prefix_tuning_ejected",
    "prefix_tuning_gated",
    "mam",
    "unipelt",
    "prompt_tuning",
    "lora_gated",
    "seq_bn_inv",  # the coupling after BERT's embeddings module / GPT-2's drop (LLaMA's token embedding too)
}
FIXTURE_CASES = sorted(c for c, i in CASES.items() if i["method"] in METHODS)


def _inputs(family: str) -> dict[str, torch.Tensor]:
    exp = load_file(str(FIXTURES / "base" / family / "expected.safetensors"))
    return {"input_ids": exp["input_ids"], "attention_mask": exp["attention_mask"]}


def _keep(n: int, **kw) -> ak.PrefixTuning:
    return ak.PrefixTuning(num_virtual_tokens=n, positions="keep", **kw)


def _gated(inner: ak.AdapterConfig, **kw) -> ak.SequenceGated:
    return ak.SequenceGated(config=inner, init_weights=False, **kw)


# adapters built here: (family, config). Prefixes and prompts start random; the rest init_weights=False.
NATIVE: dict[str, tuple[str, Callable[[], ak.AdapterConfig]]] = {
    "bert_prefix_flat": ("bert", lambda: _keep(3)),
    "gpt2_prefix_mlp": ("gpt2", lambda: _keep(4, prefix_projection=True, encoder_hidden_size=16)),
    # kv_dim 16 < hidden 32: the MLP's input is zero-padded; separate key/value gates
    "llama_prefix_mlp_gated": (
        "llama",
        lambda: _keep(
            3, prefix_projection=True, encoder_hidden_size=8, gated=True, gate_outputs=2, init_weights=False
        ),
    ),  # fmt: skip
    "bert_prompt": ("bert", lambda: ak.EmbeddingPrompt(num_virtual_tokens=3)),
    "bert_mam": (
        "bert",
        lambda: ak.Union(
            _keep(4, prefix_projection=True, encoder_hidden_size=8),
            ak.Bottleneck(placement="parallel", reduction_factor=4, scaling=4.0),
            init_weights=False,
        ),
    ),
    # (init_weights=False on each member: Union(init_weights=False) cannot replace a SequenceGated's field)
    "llama_unipelt": (
        "llama",
        lambda: ak.Union(
            _keep(5, gated=True, init_weights=False),
            _gated(ak.Bottleneck(placement="pfeiffer", reduction_factor=16, init_weights=False)),
            _gated(ak.LoRA(r=4, alpha=8, targets=["attn.q", "attn.v"], init_weights=False)),
        ),
    ),
    # one gate for all of c_attn (repeated per enabled matrix), alpha/r folded into B
    "gpt2_unipelt_fused": (
        "gpt2",
        lambda: ak.Union(
            _gated(ak.LoRA(r=2, alpha=8, targets=["attn.qkv"], init_weights=False)),
            _keep(3, gated=True, init_weights=False),
        ),
    ),
    "gpt2_lora_gated_mixed": (  # c_attn's gate repeated, and a gated c_fc ("intermediate")
        "gpt2",
        lambda: _gated(ak.LoRA(r=2, alpha=4, targets=["attn.qkv", "ffn.up"], init_weights=False)),
    ),
    "gpt2_lora_gated_kv": (
        "gpt2",
        lambda: _gated(ak.LoRA(r=2, alpha=2, targets=["attn.qkv"], init_weights=False), fused_qkv="qkv"),
    ),
    "gpt2_seq_bn_inv": (
        "gpt2",
        lambda: ak.Union(
            ak.Bottleneck(placement="pfeiffer", init_weights=False),
            ak.Invertible(targets=["transformer.drop"], dim=32, inverse_at_output=False, init_weights=False),
        ),
    ),
    # on a model with a head: keys under bert. (the pool, the prompt); the union with a static head copy
    "bertcls_prompt": ("bertcls", lambda: ak.EmbeddingPrompt(num_virtual_tokens=2)),
    "bertcls_unipelt_head": (
        "bertcls",
        lambda: ak.Union(
            _keep(3, gated=True, init_weights=False),
            _gated(ak.Bottleneck(placement="pfeiffer", init_weights=False)),
            _gated(ak.LoRA(r=2, targets=["attn.q", "attn.v"], init_weights=False)),
            heads=["classifier"],
        ),
    ),
    "bert_double_seq_bn_gated": ("bert", lambda: _gated(ak.Bottleneck(placement="houlsby", init_weights=False))),
    # the prefix inside each attention module (inject="attention"): some layers only (AdapterHub's leave_out), gated
    "bert_prefix_leave_out": ("bert", lambda: _keep(3, inject="attention", layers=[1])),
    "gpt2_prefix_leave_out_gated": (
        "gpt2",
        lambda: _keep(3, inject="attention", layers=[0], gated=True, init_weights=False),
    ),
    "llama_prefix_attention": ("llama", lambda: _keep(2, inject="attention")),
    "distilbert_prompt": ("distilbert", lambda: ak.EmbeddingPrompt(num_virtual_tokens=3)),
}


# cases our reader does not read back (the library does: the slow test)
NOT_READ_BACK = {
    "gpt2_lora_gated_mixed": "our reader takes gated LoRA on GPT-2's fused c_attn alone, not with other modules",
}


def _native(case: str) -> tuple[torch.nn.Module, ak.Adapters]:
    family, make = NATIVE[case]
    torch.manual_seed(sum(map(ord, case)))
    model = fresh(family)
    adapters = ak.attach(model)
    adapters.add("task", make())
    adapters.activate("task")
    return model, adapters


def _fixture(case: str) -> tuple[torch.nn.Module, ak.Adapters]:
    info = CASES[case]
    model = fresh(info["family"])
    adapters = ak.attach(model)
    adapters.load(FIXTURES / case / "adapter", allow_pickle=info["file"] == "pickle", activate=True)
    return model, adapters


def _member_keys(config: dict) -> list[set[str]]:
    members = config["configs"] if config.get("architecture") == "union" else [config]
    return [set(m) for m in members]


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_fixture_export_reads_back_with_the_library_outputs(case, tmp_path):
    model, adapters = _fixture(case)
    exp = expected(case)
    ours, _ = run(model, exp)
    adapters.export("task", tmp_path, format="adapterhub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    saved = json.loads((FIXTURES / case / "adapter" / "adapter_config.json").read_text())
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(written) == set(saved) and _member_keys(written["config"]) == _member_keys(saved["config"])
    back = fresh(CASES[case]["family"])
    ak.attach(back).load(tmp_path, activate=True)
    out, hidden = run(back, exp)
    assert (out - exp["output"]).abs().max().item() <= TOL
    assert (hidden - exp["hidden"]).abs().max().item() <= TOL
    assert (out - ours).abs().max().item() <= 1e-5
    if "padded.output" in exp:  # left-padded batch: the prefix mask, the gates' means over padding
        padded = {"input_ids": exp["input_ids"], "attention_mask": exp["padded.attention_mask"]}
        out, _ = run(back, padded)
        assert (out - exp["padded.output"]).abs().max().item() <= TOL


@pytest.mark.parametrize("case", sorted(NATIVE))
def test_native_adapter_round_trip(case, tmp_path):
    model, adapters = _native(case)
    family = NATIVE[case][0]
    inputs = _inputs(family)
    ours, _ = run(model, inputs)
    adapters.export("task", tmp_path, format="adapterhub")
    if case in NOT_READ_BACK:
        pytest.skip(NOT_READ_BACK[case])
    back = fresh(family)
    ak.attach(back).load(tmp_path, activate=True)
    out, _ = run(back, inputs)
    if out.shape == run(fresh(family), inputs)[0].shape:
        assert (ours - run(fresh(family), inputs)[0]).abs().max().item() > 1e-3  # no identity
    assert (out - ours).abs().max().item() <= 1e-5


def test_prefix_layout(tmp_path):
    """The MLP form keeps its layers (the GQA embedding zero-padded to the hidden size); every layer's pool path has
    its own copy (safetensors holds no shared storage); separate key/value gates; flat where not reparametrized."""
    _, adapters = _native("llama_prefix_mlp_gated")
    adapters.export("task", tmp_path / "llama", format="adapterhub")
    cfg = json.loads((tmp_path / "llama" / "adapter_config.json").read_text())["config"]
    assert (cfg["flat"], cfg["bottleneck_size"], cfg["prefix_length"]) == (False, 8, 3)
    assert (cfg["use_gating"], cfg["shared_gating"]) == (True, False)
    pool = "prefix_tunings.task.self_prefix"
    with safe_open(str(tmp_path / "llama" / "adapter.safetensors"), "pt") as f:
        keys = set(f.keys())
        wte = f.get_tensor(f"model.prefix_tuning.{pool}.wte.weight")
        assert wte.shape == (3, 32) and not wte[:, 16:].any()
        assert torch.equal(wte, f.get_tensor(f"model.layers.1.self_attn.prefix_tuning.pool.{pool}.wte.weight"))
        assert f.get_tensor("model.layers.0.self_attn.prefix_tuning.prefix_gates.task.weight").shape == (2, 32)
    assert len([k for k in keys if k.endswith("wte.weight")]) == 3  # the pool + 2 layers
    _, adapters = _native("bert_prefix_flat")
    adapters.export("task", tmp_path / "bert", format="adapterhub")
    cfg = json.loads((tmp_path / "bert" / "adapter_config.json").read_text())["config"]
    assert cfg["flat"] is True and not cfg["use_gating"]
    with safe_open(str(tmp_path / "bert" / "adapter.safetensors"), "pt") as f:
        assert f.get_tensor(f"prefix_tuning.{pool}.control_trans").shape == (3 * 2 * 2 * 32,)


def test_unipelt_layout(tmp_path):
    """UniPELT's members in order, each with use_gating; the gated LoRA's alpha / r folded into B (alpha = r);
    c_attn's one-output gate repeated per enabled matrix."""
    _, adapters = _native("gpt2_unipelt_fused")
    adapters.export("task", tmp_path, format="adapterhub")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())["config"]
    lora, prefix = cfg["configs"]
    assert (cfg["architecture"], lora["architecture"], prefix["architecture"]) == (
        "union",
        "lora",
        "prefix_tuning",
    )
    assert lora["use_gating"] and prefix["use_gating"] and lora["alpha"] == lora["r"] == 2
    assert lora["attn_matrices"] == ["q", "k", "v"] and not lora["intermediate_lora"]
    with safe_open(str(tmp_path / "adapter.safetensors"), "pt") as f:
        gate = f.get_tensor("transformer.h.0.attn.c_attn.loras.task.gate.weight")
        assert gate.shape == (3, 32) and torch.equal(gate[0], gate[2])
    _, adapters = _native("gpt2_lora_gated_mixed")
    adapters.export("task", tmp_path / "mixed", format="adapterhub")
    cfg = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())["config"]
    assert cfg["use_gating"] and cfg["intermediate_lora"] and (cfg["r"], cfg["alpha"]) == (2, 2)
    with safe_open(str(tmp_path / "mixed" / "adapter.safetensors"), "pt") as f:
        assert f.get_tensor("transformer.h.1.mlp.c_fc.loras.task.gate.weight").shape == (1, 32)


def _refused(family: str, config: Callable[[], ak.AdapterConfig], match: str, tmp_path: Path) -> None:
    adapters = ak.attach(fresh(family))
    adapters.add("task", config())
    target = tmp_path / "out"
    with pytest.raises(AdapterHubExportError, match=match):
        adapters.export("task", target, format="adapterhub")
    assert not target.exists()


@pytest.mark.parametrize(
    "family, config, match",
    [
        ("gpt2", lambda: ak.PrefixTuning(num_virtual_tokens=4), r"positions='keep'"),
        (
            "bert",
            lambda: ak.Union(
                ak.Bottleneck(), ak.Invertible(targets=["encoder.layer.0.output"], dim=32, inverse_at_output=False)
            ),
            r"targets=\['embeddings'\]",
        ),
        ("bert", lambda: "mam", r"positions='keep'"),
        ("llama", lambda: "unipelt", r"gated=True.*SequenceGated"),
        ("bert", lambda: "prompt_tuning", r"EmbeddingPrompt"),
        (
            "bert",
            lambda: ak.Union(_keep(2), ak.EmbeddingPrompt(num_virtual_tokens=2)),
            r"EmbeddingPrompt.*does not",
        ),
        ("bert", lambda: ak.Union(ak.LoRA(targets=["attn.q"]), ak.IA3(feedforward=())), r"several members of one"),
        ("gpt2", lambda: ak.Union(ak.LoReFT(r=2, prefix=1), _keep(2)), r"LoReFT.*does not write"),
        ("bert", lambda: ak.Union(ak.MoV(), _keep(2)), r"MoV.*does not write"),  # an IA3 subclass
        (
            "gpt2",
            lambda: _gated(ak.LoRA(targets=["attn.qkv"], init_weights=False), fused_qkv="qv"),
            r"leaves ungated.*fused_qkv",
        ),
    ],
    ids=[
        "prefix_shift",
        "invertible_site",
        "mam_preset",
        "unipelt_preset",
        "peft_prompt",
        "union_prompt",
        "union_two_loras",
        "union_reft",
        "union_ia3_subclass",
        "ungated_fused_matrix",
    ],  # fmt: skip
)
def test_what_adapterhub_cannot_hold_is_refused(family, config, match, tmp_path):
    _refused(family, config, match, tmp_path)


def test_prefix_on_heads_of_another_size_is_refused(tmp_path):
    """AdapterHub cuts the prefix into heads of hidden_size // num_attention_heads: a model with its own head_dim
    (here 16, not 32 // 4) cannot hold our prefix."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
    adapters = ak.attach(LlamaForCausalLM(config).eval())
    adapters.add("task", _keep(2, prefix_projection=True))
    with pytest.raises(AdapterHubExportError, match=r"2 key/value heads of 16 features.*2 heads of 8"):
        adapters.export("task", tmp_path / "out", format="adapterhub")
    assert not (tmp_path / "out").exists()


# --- the real library --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_library_loads_our_exports_with_our_outputs(tmp_path):
    """``adapters`` 1.3.0 ``load_adapter(dir, use_safetensors=True)`` reads every export above (safetensors, the
    prefix pool's copies as separate tensors) onto the same base weights and gives our outputs (<= 1e-4), on a
    right-padded batch too (eager attention, as the fixtures were recorded)."""
    if not HUB_PYTHON.is_file():
        pytest.skip(f"{HUB_PYTHON} is missing (make it as tests/fixtures/adapterhub/make_fixtures.py says)")
    manifest: dict[str, dict] = {}
    ours: dict[str, tuple[torch.Tensor, ...]] = {}
    runs = [(case, case, False) for case in FIXTURE_CASES] + [(f"native_{c}", c, True) for c in sorted(NATIVE)]
    for key, case, native in runs:
        model, adapters = _native(case) if native else _fixture(case)
        family = NATIVE[case][0] if native else CASES[case]["family"]
        inputs = _inputs(family)
        padded = {**inputs, "attention_mask": inputs["attention_mask"].clone()}
        padded["attention_mask"][1, -3:] = 0  # right padding, as adapterhub_library_check.py pads (see there)
        ours[key] = (*run(model, inputs), run(model, padded)[0])
        adapters.export("task", tmp_path / key, format="adapterhub")
        # the library runs DistilBERT's prompt only under sdpa, and changes unpadded rows of a padded batch there
        sdpa_prompt = family == "distilbert" and "prompt" in case
        manifest[key] = {
            "family": family,
            "adapter": str(tmp_path / key),
            "name": "task",
            "padded": not sdpa_prompt,
        }
        # the fixtures' attention (see adapterhub_library_check.py)
        manifest[key]["attn_implementation"] = "sdpa" if sdpa_prompt else "eager"
    theirs = run_library("adapterhub_library_check.py", manifest, tmp_path)
    worst = {}
    for key, (out, hidden, padded_out) in ours.items():
        assert theirs[f"{key}.missing"].item() == 0, key
        d_out = (theirs[f"{key}.output"] - out).abs().max().item()
        d_hid = (theirs[f"{key}.hidden"] - hidden).abs().max().item()
        d_pad = (theirs[f"{key}.padded"] - padded_out).abs().max().item() if f"{key}.padded" in theirs else 0.0
        worst[key] = (d_out, d_hid, d_pad)
    print("\ncase: max|library - ours| output, hidden, output on a padded batch")
    for key, (d_out, d_hid, d_pad) in worst.items():
        print(f"  {key:36s} {d_out:.1e} {d_hid:.1e} {d_pad:.1e}")
    bad = {k: v for k, v in worst.items() if max(v) > TOL}
    assert not bad, bad
