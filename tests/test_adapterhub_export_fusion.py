"""AdapterHub export of fusions, flex heads and setups (issue 16, "exports back" for item 3;
``formats/adapterhub_export_fusion.py``).

- Default suite: the fusion and head fixtures written by ``adapters`` 1.3.0 (``cases.json``'s ``compositions``) load
  here, export again (``adapters.export("fusion[a,b]" | name | ak.Fuse(...), dir, format="adapterhub")``) and read
  back onto a fresh model with the same outputs (<= 1e-5; the library's recorded outputs <= 1e-4); fusions made here
  go the same way; what AdapterHub cannot hold is refused naming the field, before anything is written.
- Slow: the real library (``.venv-adapterhub``: adapters 1.3.0, transformers 4.57.6) loads our exported fusion,
  head and setup directories onto the same base weights and gives our outputs (tests/adapterhub_library_check_fusion.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapterkit as ak
from adapterhub_library import HUB_PYTHON, run_library
from adapterkit.formats.adapterhub_export import AdapterHubExportError
from adapterkit.methods.flex_head import FlexHeadLayer
from test_adapterhub import FIXTURES, TOL, fresh, run
from test_adapterhub_fusion import COMPOSITIONS, FUSIONS, HEADS, _bare, _expected, _members

ROOT = Path(__file__).resolve().parents[1]
EXACT = 1e-5


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _fused(case: str) -> tuple[torch.nn.Module, ak.Adapters]:
    model, adapters = _members(case)
    adapters.load(FIXTURES / case / "fusion")
    adapters.activate(ak.Fuse("a", "b"))
    return model, adapters


def _export_fusion(adapters: ak.Adapters, out: Path) -> None:
    for n in ("a", "b"):
        adapters.export(n, out / n, format="adapterhub")
    adapters.export("fusion[a,b]", out / "fusion", format="adapterhub")


def _inputs(exp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": exp["input_ids"], "attention_mask": exp["attention_mask"]}


def _logits(model: torch.nn.Module, exp: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(exp)).logits


# --- fusions -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", FUSIONS)
def test_fusion_export_reads_back(case, tmp_path):
    model, adapters = _fused(case)
    exp = _expected(case)
    ours = run(model, exp)[0]
    _export_fusion(adapters, tmp_path)
    files = sorted(p.name for p in (tmp_path / "fusion").iterdir())
    assert files == ["adapter_fusion_config.json", "model_adapter_fusion.safetensors"]
    saved = json.loads((FIXTURES / case / "fusion" / "adapter_fusion_config.json").read_text())
    written = json.loads((tmp_path / "fusion" / "adapter_fusion_config.json").read_text())
    assert set(written) == set(saved)
    assert (written["name"], written["adapter_names"]) == ("a,b", ["a", "b"])
    for key, value in saved["config"].items():
        if key != "value_initialized":  # how V starts in training: not a property of the weights
            assert written["config"][key] == value, key
    stored = load_file(str(FIXTURES / case / "fusion" / "model_adapter_fusion.safetensors"))
    ours_file = load_file(str(tmp_path / "fusion" / "model_adapter_fusion.safetensors"))
    prefix = {"bert": "bert.", "distilbert": "distilbert."}.get(COMPOSITIONS[case]["family"], "")
    stored = {prefix + k: v for k, v in stored.items()}  # ours always carry the base-model prefix
    assert sorted(ours_file) == sorted(stored)  # AdapterHub's keys, one for one
    assert all(torch.equal(ours_file[k], stored[k]) for k in stored)
    back = fresh(COMPOSITIONS[case]["family"])
    again = ak.attach(back)
    for n in ("a", "b", "fusion"):
        again.load(tmp_path / n)
    again.activate(ak.Fuse("a", "b"))
    out = run(back, exp)[0]
    assert _diff(out, ours) <= EXACT
    assert _diff(out, exp["output"]) <= TOL


def _seq_bn_pair(family: str = "bert", **kw) -> tuple[torch.nn.Module, ak.Adapters]:
    torch.manual_seed(0)
    model = fresh(family)
    adapters = ak.attach(model)
    placement = kw.pop("placement", "pfeiffer")
    for n in ("a", "b"):
        adapters.add(n, ak.Bottleneck(placement=placement, init_weights=False, **kw))
    return model, adapters


@pytest.mark.parametrize(
    "fields",
    [
        {"query_input": "adapter_input", "values": "changes", "value_bias": False},
        {"value_bias": False, "value_before_softmax": False, "temperature": 50.0, "temperature_decay": 0.05},
        {},  # adapterkit's default: a value bias, zero until trained, is left out
    ],
    ids=["adapterhub_equations", "annealed", "default"],
)
def test_fusion_made_here_round_trips(fields, tmp_path):
    model, adapters = _seq_bn_pair()
    name = adapters.add_fusion(["a", "b"], init_weights=False, **fields)
    adapters.activate(ak.Fuse("a", "b"))
    exp = _expected("bert_fusion")
    ours = run(model, exp)[0]
    adapters.activate("a")
    assert _diff(run(model, exp)[0], ours) > 1e-3  # the fusion does something
    adapters.activate(ak.Fuse("a", "b"))
    _export_fusion(adapters, tmp_path)
    written = json.loads((tmp_path / "fusion" / "adapter_fusion_config.json").read_text())["config"]
    assert written["temperature"] is ("temperature" in fields)
    back = fresh("bert")
    again = ak.attach(back)
    for n in ("a", "b", "fusion"):
        again.load(tmp_path / n)
    assert again.config(name).temperature == adapters.config(name).temperature
    again.activate(ak.Fuse("a", "b"))
    assert _diff(run(back, exp)[0], ours) <= EXACT


def _refused_fusion(adapters: ak.Adapters, match: str, tmp_path: Path) -> None:
    with pytest.raises(AdapterHubExportError, match=match):
        adapters.export("fusion[a,b]", tmp_path / "out", format="adapterhub")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"temperature": 2.0}, "temperature"),
        ({"regularization": 0.1}, "regularization"),
    ],
)
def test_fusion_fields_adapterhub_has_not_are_refused(fields, match, tmp_path):
    _, adapters = _seq_bn_pair()
    adapters.add_fusion(["a", "b"], **fields)
    _refused_fusion(adapters, match, tmp_path)


def test_a_trained_value_bias_is_refused(tmp_path):
    _, adapters = _seq_bn_pair()
    adapters.add_fusion(["a", "b"])
    with torch.no_grad():
        next(iter(adapters.components("fusion[a,b]").values())).value.bias.add_(0.1)
    _refused_fusion(adapters, "value_bias", tmp_path)


def test_fusions_adapterhub_computes_otherwise_are_refused(tmp_path):
    _, adapters = _seq_bn_pair(placement="parallel")
    adapters.add_fusion(["a", "b"])
    _refused_fusion(adapters, "parallel", tmp_path / "par")
    adapters = ak.attach(fresh("bert"))
    adapters.add("a", ak.Bottleneck(placement="pfeiffer"))
    adapters.add("b", ak.Bottleneck(placement="houlsby"))
    adapters.add_fusion(["a", "b"])
    _refused_fusion(adapters, "differ", tmp_path / "kinds")
    adapters = ak.attach(fresh("bert"))
    adapters.add("a", ak.Bottleneck(placement="pfeiffer"))
    adapters.add("b", ak.Bottleneck(placement="pfeiffer", targets=["encoder.layer.0.output.dropout"]))
    adapters.add_fusion(["a", "b"])
    _refused_fusion(adapters, "every", tmp_path / "leave_out")
    adapters = ak.attach(fresh("bert"))
    adapters.add("a", ak.LoRA(targets=["attn.q"]))
    adapters.add("b", ak.LoRA(targets=["attn.q"]))
    adapters.add_fusion(["a", "b"])
    _refused_fusion(adapters, "bottleneck", tmp_path / "lora")


# --- flex heads --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", HEADS)
def test_flex_head_export_reads_back(case, tmp_path):
    model = _bare(case)
    adapters = ak.attach(model)
    adapters.load(FIXTURES / case / "adapter", activate=True)
    exp = _expected(case)
    ours = _logits(model, exp)
    adapters.export("task", tmp_path, format="adapterhub")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["adapter.safetensors", "adapter_config.json", "head_config.json", "model_head.safetensors"]
    saved = json.loads((FIXTURES / case / "adapter" / "head_config.json").read_text())
    written = json.loads((tmp_path / "head_config.json").read_text())
    assert written["config"] == saved["config"]
    assert (written["model_class"], written["name"]) == (saved["model_class"], "task")
    stored = load_file(str(FIXTURES / case / "adapter" / "model_head.safetensors"))
    ours_file = load_file(str(tmp_path / "model_head.safetensors"))
    assert sorted(ours_file) == sorted(stored)
    assert all(torch.equal(ours_file[k], stored[k]) for k in stored)
    again = ak.attach(_bare(case))
    again.load(tmp_path, activate=True)
    out = _logits(again.model, exp)
    assert _diff(out, ours) <= EXACT
    assert _diff(out, exp["output"]) <= TOL


# heads made here (random init) on a bare BertModel: name -> FlexHead
MADE_HEADS = {
    "bert_cls_made_here": {"num_labels": 4, "num_layers": 2},
    "bert_tagging_made_here": {"head_type": "tagging", "num_labels": 5, "num_layers": 1},
    "bert_multilabel_made_here": {"head_type": "multilabel_classification", "num_labels": 3, "num_layers": 1},
    "bert_mlm_made_here": {
        "head_type": "masked_lm",
        "num_layers": 2,
        "activation_function": "gelu",
        "layer_norm": True,
    },
}


def _made_head(case: str) -> tuple[torch.nn.Module, ak.Adapters]:
    torch.manual_seed(1)
    model = _bare("bert_cls_head")
    adapters = ak.attach(model)
    head = ak.FlexHead(**MADE_HEADS[case])
    adapters.add("task", ak.Union(ak.Bottleneck(placement="pfeiffer", init_weights=False), head))
    adapters.activate("task")
    if head.head_type == "masked_lm":  # AdapterHub ties the output layer to the input embeddings
        [layer] = [c for c in adapters.components("task").values() if isinstance(c, FlexHeadLayer)]
        with torch.no_grad():
            layer.net[-1].weight.copy_(model.get_input_embeddings().weight)
    return model, adapters


@pytest.mark.parametrize("case", sorted(MADE_HEADS))
def test_flex_head_made_here_round_trips(case, tmp_path):
    model, adapters = _made_head(case)
    exp = _expected("bert_cls_head")
    ours = _logits(model, exp)
    adapters.export("task", tmp_path, format="adapterhub")
    written = json.loads((tmp_path / "head_config.json").read_text())["config"]
    if "lm" not in case:
        assert written["dropout_prob"] == 0.0  # ours; BERT's hidden_dropout_prob (the library's fallback) is 0.1
    again = ak.attach(_bare("bert_cls_head"))
    again.load(tmp_path, activate=True)
    assert _diff(_logits(again.model, exp), ours) <= EXACT


def test_head_alone_and_fusion_head_setup_round_trip(tmp_path):
    """``ak.Stack(ak.Fuse("a", "b"), "target")`` (a setup saved with ``head_setup="target"``) exports as that setup;
    the head adapter alone as ``save_head``'s directory."""
    model = _bare("bert_cls_head")
    adapters = ak.attach(model)
    adapters.load(FIXTURES / "bert_fusion_head" / "setup")
    exp = _expected("bert_fusion_head")
    ours = _logits(model, exp)
    adapters.export(adapters.active[0], tmp_path / "setup", format="adapterhub")
    saved = json.loads((FIXTURES / "bert_fusion_head" / "setup" / "adapter_setup.json").read_text())
    written = json.loads((tmp_path / "setup" / "adapter_setup.json").read_text())
    assert written == saved
    assert sorted(p.name for p in (tmp_path / "setup").iterdir()) == sorted(
        p.name for p in (FIXTURES / "bert_fusion_head" / "setup").iterdir()
    )
    again = ak.attach(_bare("bert_cls_head"))
    again.load(tmp_path / "setup")
    assert again.active == (ak.Stack(ak.Fuse("a", "b"), "target"),)
    assert _diff(_logits(again.model, exp), ours) <= EXACT
    adapters.export("target", tmp_path / "head", format="adapterhub")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["head_config.json", "model_head.safetensors"]
    alone = ak.attach(_bare("bert_cls_head"))
    assert alone.load(tmp_path / "head") == "target"
    assert alone.config("target").method == "flex_head"
    assert not list(tmp_path.glob(".*"))  # no temporary directory left


def test_heads_adapterhub_builds_otherwise_are_refused(tmp_path):
    model = _bare("gpt2_cls_head")
    adapters = ak.attach(model)
    adapters.add("task", ak.Union(ak.LoRA(targets=["attn.qkv"]), ak.FlexHead(num_labels=3)))  # first token
    with pytest.raises(AdapterHubExportError, match="cls_token='last'"):
        adapters.export("task", tmp_path / "cls", format="adapterhub")
    adapters.add("lm", ak.Union(ak.LoRA(targets=["attn.qkv"]), ak.FlexHead(head_type="causal_lm", num_layers=1)))
    with pytest.raises(AdapterHubExportError, match="tie_word_embeddings"):
        adapters.export("lm", tmp_path / "lm", format="adapterhub")
    assert not (tmp_path / "cls").exists() and not (tmp_path / "lm").exists()


# --- setups ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", ["fuse", "stack"])
def test_setup_export_reads_back(block, tmp_path):
    model, adapters = _fused("gpt2_fusion")
    setup = ak.Fuse("a", "b") if block == "fuse" else ak.Stack("a", "b")
    adapters.activate(setup)
    exp = _expected("gpt2_fusion")
    ours = run(model, exp)[0]
    assert _diff(ours, exp["output" if block == "fuse" else "stack.output"]) <= TOL
    adapters.export(setup, tmp_path, format="adapterhub")
    fixture = FIXTURES / "gpt2_fusion" / ("setup" if block == "fuse" else "stack_setup")
    written = json.loads((tmp_path / "adapter_setup.json").read_text())
    assert written == json.loads((fixture / "adapter_setup.json").read_text())
    again = ak.attach(fresh("gpt2"))
    again.load(tmp_path)
    assert again.active == (setup,)
    assert _diff(run(again.model, exp)[0], ours) <= EXACT


@pytest.mark.parametrize("block", [ak.Parallel("a", "b"), ak.BatchSplit("a", "b", batch_sizes=[1, 1])], ids=repr)
def test_parallel_and_batch_split_setups_read_back(block, tmp_path):
    model, adapters = _fused("bert_fusion")
    adapters.activate(block)
    exp = _expected("bert_fusion")
    ours = run(model, exp)[0]
    adapters.export(block, tmp_path, format="adapterhub")
    written = json.loads((tmp_path / "adapter_setup.json").read_text())["adapter_setup"]
    assert written["type"] == type(block).__name__
    assert written.get("kwargs") == ({"batch_sizes": [1, 1]} if isinstance(block, ak.BatchSplit) else None)
    again = ak.attach(fresh("bert"))
    again.load(tmp_path)
    assert again.active == (block,)
    assert _diff(run(again.model, exp)[0], ours) <= EXACT


def test_setups_adapterhub_computes_otherwise_are_refused(tmp_path):
    _, adapters = _fused("bert_fusion")
    for block, match in [
        (ak.Average("a", "b"), "Average"),
        (ak.Split("a", "b", splits=[3]), "Split"),
        (ak.Stack("a", "missing"), "not on this model"),
    ]:
        with pytest.raises(AdapterHubExportError, match=match):
            adapters.export(block, tmp_path / "out", format="adapterhub")
    assert not list(tmp_path.iterdir())


# --- the real library --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_library_loads_our_compositions_with_our_outputs(tmp_path):
    """``adapters`` 1.3.0 loads our exported fusions (+ members), flex heads and setups onto the same base weights
    and gives our outputs (<= 1e-4)."""
    if not HUB_PYTHON.is_file():
        pytest.skip(f"{HUB_PYTHON} is missing (make it as tests/fixtures/adapterhub/make_fixtures.py says)")
    manifest: dict[str, dict] = {}
    ours: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for case in FUSIONS:
        model, adapters = _fused(case)
        exp = _expected(case)
        ours[case] = run(model, exp)
        out = tmp_path / case
        _export_fusion(adapters, out)
        family = COMPOSITIONS[case]["family"]
        manifest[case] = {"kind": "fusion", "family": family, "adapters": [str(out / "a"), str(out / "b")],
                          "fusion": str(out / "fusion"), "names": ["a", "b"]}  # fmt: skip
        if case == "bert_fusion":  # Parallel / BatchSplit (GPT-2: tests/test_adapterhub_setups.py)
            for key, block in (
                ("parallel", ak.Parallel("a", "b")),
                ("batch_split", ak.BatchSplit("a", "b", batch_sizes=[1, 1])),
            ):
                adapters.activate(block)
                ours[f"bert_{key}_setup"] = run(model, exp)
                adapters.export(block, tmp_path / f"bert_{key}_setup", format="adapterhub")
                manifest[f"bert_{key}_setup"] = {"kind": "setup", "family": family, "head_model": False,
                                                 "setup": str(tmp_path / f"bert_{key}_setup")}  # fmt: skip
            adapters.activate(ak.Fuse("a", "b"))
        if case == "gpt2_fusion":
            adapters.activate(ak.Stack("a", "b"))
            ours["gpt2_stack_setup"] = run(model, exp)
            adapters.export(ak.Stack("a", "b"), tmp_path / "gpt2_stack_setup", format="adapterhub")
            manifest["gpt2_stack_setup"] = {"kind": "setup", "family": family, "head_model": False,
                                            "setup": str(tmp_path / "gpt2_stack_setup")}  # fmt: skip
    made_model, made = _seq_bn_pair()
    made.add_fusion(
        ["a", "b"], init_weights=False, query_input="adapter_input", values="changes", value_bias=False
    )
    made.activate(ak.Fuse("a", "b"))
    ours["bert_fusion_made_here"] = run(made_model, _expected("bert_fusion"))
    _export_fusion(made, tmp_path / "made")
    manifest["bert_fusion_made_here"] = {"kind": "fusion", "family": "bert", "names": ["a", "b"],
                                         "adapters": [str(tmp_path / "made" / n) for n in ("a", "b")],
                                         "fusion": str(tmp_path / "made" / "fusion")}  # fmt: skip
    for case in HEADS:
        model = _bare(case)
        adapters = ak.attach(model)
        adapters.load(FIXTURES / case / "adapter", activate=True)
        exp = _expected(case)
        with torch.no_grad():
            o = model(**_inputs(exp))
        ours[case] = (o.logits, o.last_hidden_state)
        adapters.export("task", tmp_path / case, format="adapterhub")
        manifest[case] = {"kind": "head", "family": COMPOSITIONS[case]["family"], "adapter": str(tmp_path / case),
                          "name": "task"}  # fmt: skip
    for case in sorted(MADE_HEADS):
        model, adapters = _made_head(case)
        with torch.no_grad():
            o = model(**_inputs(_expected("bert_cls_head")))
        ours[case] = (o.logits, o.last_hidden_state)
        adapters.export("task", tmp_path / case, format="adapterhub")
        manifest[case] = {"kind": "head", "family": "bert", "adapter": str(tmp_path / case), "name": "task"}
    model = _bare("bert_cls_head")
    adapters = ak.attach(model)
    adapters.load(FIXTURES / "bert_fusion_head" / "setup")
    with torch.no_grad():
        o = model(**_inputs(_expected("bert_fusion_head")))
    ours["bert_fusion_head"] = (o.logits, o.last_hidden_state)
    adapters.export(adapters.active[0], tmp_path / "bert_fusion_head", format="adapterhub")
    manifest["bert_fusion_head"] = {"kind": "setup", "family": "bert", "head_model": True,
                                    "setup": str(tmp_path / "bert_fusion_head")}  # fmt: skip
    theirs = run_library("adapterhub_library_check_fusion.py", manifest, tmp_path)
    worst = {}
    for key, (out, hidden) in ours.items():
        assert theirs[f"{key}.missing"].item() == 0, key
        worst[key] = (_diff(theirs[f"{key}.output"], out), _diff(theirs[f"{key}.hidden"], hidden))
    print("\ncase: max|library - ours| output, hidden")
    for key, (d_out, d_hid) in worst.items():
        print(f"  {key:28s} {d_out:.1e} {d_hid:.1e}")
    bad = {k: v for k, v in worst.items() if v[0] > TOL or v[1] > TOL}
    assert not bad, bad
