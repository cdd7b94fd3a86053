"""AdapterHub export (issue 16 item 4): ``adapters.export(name, dir, format="adapterhub")`` writes what ``adapters``
1.3.0's ``load_adapter`` reads, with our outputs.

- Default suite: every AdapterHub fixture we read is exported again and read back by our reader onto a fresh model
  with the library's recorded outputs; adapters built here (random, not identities) go the same round trip;
  adapters AdapterHub cannot hold are refused with the reason, before anything is written.
- Slow: the real library (``.venv-adapterhub``: adapters 1.3.0, transformers 4.57.6) loads our exports onto the same
  base weights (tests/fixtures/adapterhub/base) and gives our outputs (tests/adapterhub_library_check.py).
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
from adapterkit.formats import adapterhub, adapterhub_export, detect
from adapterkit.formats.adapterhub_export import AdapterHubExportError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_adapterhub import CASES, FIXTURES, SUPPORTED, SUPPORTED_CASES, expected, fresh, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4

# fixture cases our reader loads (the *_pt pickles hold the same adapters as their safetensors twins)
FIXTURE_CASES = sorted(
    c for c, i in CASES.items() if (i["method"] in SUPPORTED or c in SUPPORTED_CASES) and not c.endswith("_pt")
)


def _base_inputs(family: str) -> dict[str, torch.Tensor]:
    exp = load_file(str(FIXTURES / "base" / family / "expected.safetensors"))
    if "pixel_values" in exp:
        return {"pixel_values": exp["pixel_values"]}
    return {"input_ids": exp["input_ids"], "attention_mask": exp["attention_mask"]}


def _run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return run(model, inputs)


# adapters built here, on the fixtures' base models: (family, how to add it as "task"). Random init (no identity).
def _lora_mixed(a: ak.Adapters) -> None:  # rsLoRA + a rank pattern: padded to one r, scales folded into B
    a.add("task", ak.LoRA(r=4, alpha=8, rslora=True, rank_pattern={r"layer\.1\.": 2}, init_weights=False,
                          targets=["attn.q", "attn.v", "ffn.up"]))  # fmt: skip


def _lora_irregular(a: ak.Adapters) -> None:  # v in layer 0, q in layer 1: the flags imply zeros elsewhere
    a.add("task", ak.LoRA(r=2, alpha=4, init_weights=False,
                          targets=["encoder.layer.0.attention.self.value", "encoder.layer.1.attention.self.query"]))  # fmt: skip


def _lora_with_head(a: ak.Adapters) -> None:  # the classifier copy trained too: AdapterHub's static head
    a.add("task", ak.LoRA(r=2, init_weights=False, targets=["attn.q", "attn.v"], heads=["classifier"]))
    with torch.no_grad():
        for p in a.components("task")["classifier"].parameters():
            p.add_(torch.randn_like(p))


NATIVE: dict[str, tuple[str, Callable[[ak.Adapters], None]]] = {
    "bertcls_lora_head": ("bertcls", _lora_with_head),
    "bert_lora_mixed": ("bert", _lora_mixed),
    "bert_lora_irregular": ("bert", _lora_irregular),
    "gpt2_lora_fused": (
        "gpt2",
        lambda a: a.add("task", ak.LoRA(r=4, alpha=16, init_weights=False, targets=["attn.qkv", "ffn.down"])),
    ),  # fmt: skip
    "llama_lora_mlp": (
        "llama",
        lambda a: a.add(
            "task", ak.LoRA(r=3, alpha=3, init_weights=False, targets=["attn.k", "ffn.up", "ffn.down"])
        ),
    ),  # fmt: skip
    "bart_lora": ("bart", lambda a: a.add("task", ak.LoRA(r=2, init_weights=False, targets=["attn.q", "attn.v"]))),
    "llama_ia3": (
        "llama",
        lambda a: a.add(
            "task", ak.IA3(targets=["attn.k", "attn.v", "ffn.down"], feedforward=(), init_weights=False)
        ),
    ),  # fmt: skip
    "gpt2_ia3": (
        "gpt2",
        lambda a: a.add("task", ak.IA3(targets=["attn.qkv", "ffn.up"], feedforward=(), init_weights=False)),
    ),  # fmt: skip
    "bert_seq_bn": ("bert", lambda a: a.add("task", ak.Bottleneck(placement="pfeiffer", init_weights=False))),
    "bert_compacter_bare": (
        "bert",
        lambda a: a.add(
            "task", ak.Bottleneck(placement="houlsby", phm_dim=4, reduction_factor=8, init_weights=False)
        ),
    ),  # fmt: skip
    "gpt2_par_bn_learned": (
        "gpt2",
        lambda a: a.add("task", ak.Bottleneck(placement="parallel", scaling="learned", init_weights=False)),
    ),  # fmt: skip
    "llama_double_seq_bn_ln": (
        "llama",
        lambda a: a.add(
            "task", ak.Bottleneck(placement="houlsby", ln_before=True, ln_after=True, init_weights=False)
        ),
    ),  # fmt: skip
    "t5_par_bn": ("t5", lambda a: a.add("task", ak.Bottleneck(placement="parallel", init_weights=False))),
    "bart_houlsby_cross": (
        "bart",
        lambda a: a.add("task", ak.Bottleneck(placement="houlsby", cross_adapter=True, init_weights=False)),
    ),  # fmt: skip
    "llama_loreft": ("llama", lambda a: a.add("task", ak.LoReFT(r=2, prefix=2, suffix=2, init_weights=False))),
    "bert_loreft_tied": (
        "bert",
        lambda a: a.add("task", ak.LoReFT(r=3, prefix=3, suffix=0, share_weights=True, init_weights=False)),
    ),  # fmt: skip
    "gpt2_loreft_prefix": (
        "gpt2",
        lambda a: a.add("task", ak.LoReFT(r=2, prefix=3, suffix=0, init_weights=False)),
    ),
    "vit_lora": (
        "vit",
        lambda a: a.add("task", ak.LoRA(r=2, init_weights=False, targets=["attn.q", "attn.v", "ffn.up"])),
    ),  # fmt: skip
    "vit_seq_bn": ("vit", lambda a: a.add("task", ak.Bottleneck(placement="pfeiffer", init_weights=False))),
    "llama_seq_bn_inv": (
        "llama",
        lambda a: a.add(
            "task",
            ak.Union(
                ak.Bottleneck(placement="pfeiffer", non_linearity="swish", init_weights=False),
                ak.Invertible(
                    targets=["embed"], non_linearity="swish", inverse_at_output=False, init_weights=False
                ),
            ),
        ),
    ),  # fmt: skip
}
NOT_READ_BACK: dict[str, str] = {}  # cases whose export our reader cannot read back (none now)


def _native(case: str) -> tuple[torch.nn.Module, ak.Adapters]:
    family, add = NATIVE[case]
    torch.manual_seed(sum(map(ord, case)))
    model = fresh(family)
    adapters = ak.attach(model)
    add(adapters)
    adapters.activate("task")
    return model, adapters


def _fixture(case: str) -> tuple[torch.nn.Module, ak.Adapters]:
    info = CASES[case]
    model = fresh(info["family"])
    adapters = ak.attach(model)
    adapters.load(FIXTURES / case / "adapter", allow_pickle=info["file"] == "pickle", activate=True)
    return model, adapters


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_fixture_export_reads_back_with_the_library_outputs(case, tmp_path):
    model, adapters = _fixture(case)
    exp = expected(case)
    ours, _ = run(model, exp)
    adapters.export("task", tmp_path, format="adapterhub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert detect(tmp_path) is adapterhub
    saved = json.loads((FIXTURES / case / "adapter" / "adapter_config.json").read_text())
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(written) == set(saved) and set(written["config"]) == set(saved["config"])
    for key in ("architecture", "composition_mode", "r", "alpha", "attn_matrices", "leave_out", "mh_adapter",
                "output_adapter", "is_parallel", "phm_layer", "reduction_factor", "original_ln_before", "scaling",
                "prefix_positions", "suffix_positions", "tied_weights", "non_linearity"):  # fmt: skip
        if key == "alpha" and saved["config"].get("composition_mode") == "scale":
            continue  # (IA)^3: alpha is folded into the vectors (lora_B * alpha), written with alpha 1
        assert written["config"].get(key) == saved["config"].get(key), key
    back = fresh(CASES[case]["family"])
    ak.attach(back).load(tmp_path, activate=True)
    out, hidden = run(back, exp)
    assert (out - exp["output"]).abs().max().item() <= TOL
    assert (hidden - exp["hidden"]).abs().max().item() <= TOL
    assert (out - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", sorted(NATIVE))
def test_native_adapter_round_trip(case, tmp_path):
    if case in NOT_READ_BACK:
        pytest.skip(NOT_READ_BACK[case])
    model, adapters = _native(case)
    family = NATIVE[case][0]
    inputs = _base_inputs(family)
    ours, _ = _run(model, inputs)
    base, _ = _run(fresh(family), inputs)
    assert (ours - base).abs().max().item() > 1e-3  # the adapter is no identity
    adapters.export("task", tmp_path, format="adapterhub")
    back = fresh(family)
    if (tmp_path / "head_config.json").is_file():  # a static head: read back as the adapter's head copy
        assert json.loads((tmp_path / "head_config.json").read_text())["model_class"] == type(model).__name__
    ak.attach(back).load(tmp_path, activate=True)
    out, _ = _run(back, inputs)
    assert (out - ours).abs().max().item() <= 1e-5


def test_lora_layout_follows_adapterhub(tmp_path):
    """GPT-2's fused c_attn: our rank-4 LoRA becomes one group per matrix, A repeated; mixed ranks/scales are padded
    to one r with the scales folded into B; irregular slots are written as zeros."""
    _, adapters = _native("gpt2_lora_fused")
    adapters.export("task", tmp_path / "gpt2", format="adapterhub")
    cfg = json.loads((tmp_path / "gpt2" / "adapter_config.json").read_text())["config"]
    assert (cfg["r"], cfg["alpha"], cfg["attn_matrices"], cfg["output_lora"]) == (4, 16, ["q", "k", "v"], True)
    with safe_open(str(tmp_path / "gpt2" / "adapter.safetensors"), "pt") as f:
        A = f.get_tensor("transformer.h.0.attn.c_attn.loras.task.lora_A")
        assert A.shape == (12, 32) and torch.equal(A[:4], A[4:8])
    _, adapters = _native("bert_lora_mixed")
    adapters.export("task", tmp_path / "mixed", format="adapterhub")
    cfg = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())["config"]
    assert (cfg["r"], cfg["alpha"], cfg["intermediate_lora"]) == (4, 8, True)
    _, adapters = _native("bert_lora_irregular")
    adapters.export("task", tmp_path / "irr", format="adapterhub")
    cfg = json.loads((tmp_path / "irr" / "adapter_config.json").read_text())["config"]
    assert cfg["attn_matrices"] == ["q", "v"] and cfg["leave_out"] == []
    with safe_open(str(tmp_path / "irr" / "adapter.safetensors"), "pt") as f:
        assert not f.get_tensor("encoder.layer.0.attention.self.query.loras.task.lora_B").any()
        assert f.get_tensor("encoder.layer.0.attention.self.value.loras.task.lora_B").any()


def _refused(model_family: str, add: Callable[[ak.Adapters], None], match: str, tmp_path: Path) -> None:
    adapters = ak.attach(fresh(model_family))
    add(adapters)
    target = tmp_path / "out"
    with pytest.raises(AdapterHubExportError, match=match):
        adapters.export("task", target, format="adapterhub")
    assert not target.exists()


@pytest.mark.parametrize(
    "family, add, match",
    [
        (
            "bert",
            lambda a: a.add("task", ak.Bottleneck(placement="pfeiffer", hook="projection")),
            "hook='projection'",
        ),
        ("llama", lambda a: a.add("task", ak.LoRA(dora=True, targets=["attn.q"])), "DoRA"),
        ("llama", lambda a: a.add("task", ak.LoRA(targets=["attn.out"])), "cannot put it"),
        ("gpt2", lambda a: a.add("task", ak.LoRA(bias="lora_only", targets=["attn.qkv"])), "bias"),
        ("bert", lambda a: a.add("task", ak.IA3()), "scales the module's input"),
        ("llama", lambda a: a.add("task", ak.PrefixTuning(num_virtual_tokens=4)), "does not write"),
        (
            "bert",
            lambda a: a.add(
                "task",
                ak.Bottleneck(
                    placement="houlsby",
                    targets=["encoder.layer.0.output.dropout", "encoder.layer.1.attention.output.dropout"],
                ),
            ),
            "same kinds",
        ),  # fmt: skip
        ("gpt2", lambda a: a.add("task", ak.LoRA(targets=["attn.qkv"], heads=["lm_head"])), "tied"),
    ],
    ids=[
        "projection_hook",
        "dora",
        "lora_on_o_proj",
        "lora_bias",
        "ia3_feedforward",
        "prefix_tuning",
        "irregular_bottleneck",
        "head",
    ],  # fmt: skip
)
def test_what_adapterhub_cannot_hold_is_refused(family, add, match, tmp_path):
    _refused(family, add, match, tmp_path)


def test_unions_and_bad_names_are_refused(tmp_path):
    adapters = ak.attach(fresh("llama"))
    adapters.add("task", ak.Union(ak.LoRA(targets=["attn.q"]), ak.LoRA(r=2, targets=["ffn.down"])))
    with pytest.raises(AdapterHubExportError, match="does not write"):
        adapters.export("task", tmp_path / "union", format="adapterhub")
    adapters.add("inv", ak.Union(ak.Bottleneck(), ak.Invertible(targets=["embed"])))  # the LM head inverse too
    with pytest.raises(AdapterHubExportError, match="inverse_at_output"):
        adapters.export("inv", tmp_path / "inv", format="adapterhub")
    adapters = ak.attach(fresh("gpt2"))
    adapters.add("inv", ak.Union(ak.Bottleneck(), ak.Invertible(targets=["embed"], inverse_at_output=False)))
    with pytest.raises(AdapterHubExportError, match="position"):
        adapters.export("inv", tmp_path / "gpt2_inv", format="adapterhub")
    assert not (tmp_path / "inv").exists() and not (tmp_path / "gpt2_inv").exists()
    adapters = ak.attach(fresh("bert"))
    adapters.add("a,b", ak.LoRA(targets=["attn.q"]))
    with pytest.raises(AdapterHubExportError, match="cannot contain"):
        adapterhub_export.save(adapters, "a,b", tmp_path / "comma")  # what export(format="adapterhub") calls
    with pytest.raises(ValueError, match="adapterhub"):
        adapters.export("a,b", tmp_path / "x", format="nope")


# --- the real library --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_library_loads_our_exports_with_our_outputs(tmp_path):
    """``adapters`` 1.3.0 loads every export above onto the same base weights and gives our outputs (<= 1e-4)."""
    if not HUB_PYTHON.is_file():
        pytest.skip(f"{HUB_PYTHON} is missing (make it as tests/fixtures/adapterhub/make_fixtures.py says)")
    manifest: dict[str, dict[str, str]] = {}
    ours: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    runs = [(case, case, False) for case in FIXTURE_CASES] + [(f"native_{c}", c, True) for c in sorted(NATIVE)]
    for key, case, native in runs:
        model, adapters = _native(case) if native else _fixture(case)
        family = NATIVE[case][0] if native else CASES[case]["family"]
        out, hidden = _run(model, _base_inputs(family))
        base, _ = _run(fresh(family), _base_inputs(family))
        ours[key] = (out, hidden, (out - base).abs().max())
        adapters.export("task", tmp_path / key, format="adapterhub")
        manifest[key] = {"family": family, "adapter": str(tmp_path / key), "name": "task"}
    theirs = run_library("adapterhub_library_check.py", manifest, tmp_path)
    worst = {}
    for key, (out, hidden, change) in ours.items():
        assert theirs[f"{key}.missing"].item() == 0, key
        d_out = (theirs[f"{key}.output"] - out).abs().max().item()
        d_hid = (theirs[f"{key}.hidden"] - hidden).abs().max().item()
        worst[key] = (d_out, d_hid, change.item())
    print("\ncase: max|library - ours| output, hidden; |adapted - base|")
    for key, (d_out, d_hid, change) in worst.items():
        print(f"  {key:36s} {d_out:.1e} {d_hid:.1e}  {change:.2g}")
    bad = {k: v for k, v in worst.items() if v[0] > TOL or v[1] > TOL}
    assert not bad, bad
