"""AdapterHub compositions and heads (issue 16 item 3): AdapterFusion directories, saved adapter setups and adapters
saved with a flex prediction head, written by the real ``adapters`` 1.3.0 (tests/fixtures/adapterhub/make_fixtures.py,
``cases.json``'s ``compositions``), load here with the library's outputs.

- ``bert_fusion`` (bare BertModel, SeqBn members, the default "dynamic" fusion), ``gpt2_fusion`` (GPT2LMHeadModel,
  DoubleSeqBn members: fusion layers on the attention and FFN sub-layers, whose attention module returns a tuple;
  every fusion option the other way round) and ``distilbert_fusion`` (DoubleSeqBn, default fusion; the residual is
  each sub-layer's own input): ``Fuse(a, b)`` and ``Stack(a, b)``.
- ``bert_cls_head`` (BertAdapterModel: SeqBn + a classification head) onto a bare ``BertModel``, ``gpt2_clm_head``
  (GPT2AdapterModel: LoRA + a causal-LM head) and ``gpt2_cls_head`` (LoRA + a classification head on the last
  token) onto a bare ``GPT2Model``: the model returns the head's logits.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file

import adapterkit as ak
from adapterkit.formats import AdapterFileError, adapterhub_fusion
from adapterkit.methods.flex_head import FlexHeadLayer
from adapterkit.methods.fusion import Fusion, FusionLayer
from test_adapterhub import FIXTURES, TOL, _base, fresh, run

COMPOSITIONS: dict[str, dict] = json.loads((FIXTURES / "cases.json").read_text())["compositions"]
FUSIONS = sorted(c for c, i in COMPOSITIONS.items() if i["kind"] == "fusion")
HEADS = sorted(c for c, i in COMPOSITIONS.items() if i["kind"] == "head")


def _expected(case: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / case / "expected.safetensors"))


def _members(case: str) -> tuple[torch.nn.Module, ak.Adapters]:
    model = fresh(COMPOSITIONS[case]["family"])
    adapters = ak.attach(model)
    adapters.load(FIXTURES / case / "a")
    adapters.load(FIXTURES / case / "b")
    return model, adapters


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_the_fixtures_are_listed():
    assert ("bert_fusion", "fusion_pt") in SAVED and ("gpt2_fusion", "stack_setup") in SAVED
    assert FUSIONS == ["bert_fusion", "distilbert_fusion", "gpt2_fusion"]
    assert HEADS == ["bert_cls_head", "gpt2_clm_head", "gpt2_cls_head"]
    assert sorted(COMPOSITIONS) == sorted([*FUSIONS, *HEADS, "bert_fusion_head"])


SAVED = [(c, k) for c in FUSIONS for k in COMPOSITIONS[c]["saved"]]


@pytest.mark.parametrize("case,kind", [(c, k) for c, k in SAVED if k.startswith("fusion")])
def test_fusion_directory_gives_the_library_outputs(case, kind):
    model, adapters = _members(case)
    exp = _expected(case)
    if kind == "fusion_pt":
        with pytest.raises(AdapterFileError, match="allow_pickle"):
            adapters.load(FIXTURES / case / kind)
    name = adapters.load(FIXTURES / case / kind, allow_pickle=kind == "fusion_pt")
    assert name == ak.Fuse("a", "b").name == "fusion[a,b]"
    assert adapters.active == ("a",)  # loading a fusion activates nothing
    adapters.activate(ak.Fuse("a", "b"))
    out, hidden = run(model, exp)
    assert _diff(out, exp["output"]) <= TOL
    assert _diff(hidden, exp["hidden"]) <= TOL
    # the fusion changes the output: without it (a alone) the outputs differ
    adapters.activate("a")
    assert _diff(run(model, exp)[1], exp["hidden"]) > 1e-2


@pytest.mark.parametrize("case", FUSIONS)
def test_stack_gives_the_library_outputs(case):
    model, adapters = _members(case)
    exp = _expected(case)
    adapters.activate(ak.Stack("a", "b"))
    out, hidden = run(model, exp)
    assert _diff(out, exp["stack.output"]) <= TOL
    assert _diff(hidden, exp["stack.hidden"]) <= TOL


def test_fusion_config_follows_adapterhubs_fields():
    _, adapters = _members("bert_fusion")
    adapters.load(FIXTURES / "bert_fusion" / "fusion")
    cfg = adapters.config("fusion[a,b]")
    assert isinstance(cfg, Fusion)
    assert (cfg.query_input, cfg.values, cfg.value_bias, cfg.regularization) == (
        "adapter_input",
        "changes",
        False,
        0.01,
    )
    assert cfg.dropout == pytest.approx(0.1)  # BERT's attention_probs_dropout_prob (dropout_prob null)
    layers = [c for c in adapters.components("fusion[a,b]").values() if isinstance(c, FusionLayer)]
    assert len(layers) == 2 and all(layer.value.bias is None for layer in layers)
    _, other = _members("gpt2_fusion")
    other.load(FIXTURES / "gpt2_fusion" / "fusion")
    cfg = other.config("fusion[a,b]")
    assert (cfg.query_input, cfg.values, cfg.value_before_softmax, cfg.regularization) == (
        "output",
        "outputs",
        False,
        0.0,
    )
    assert len(other.components("fusion[a,b]")) == 4  # attention and FFN sub-layers of 2 layers


def test_fusion_round_trips_natively_and_detaches(tmp_path):
    model, adapters = _members("bert_fusion")
    before = {k: v.clone() for k, v in model.state_dict().items() if "ak_adapters" not in k}
    exp = _expected("bert_fusion")
    adapters.load(FIXTURES / "bert_fusion" / "fusion")
    adapters.save("fusion[a,b]", tmp_path / "fusion")
    adapters.delete("fusion[a,b]")
    assert adapters.load(tmp_path / "fusion") == "fusion[a,b]"
    adapters.activate(ak.Fuse("a", "b"))
    assert _diff(run(model, exp)[0], exp["output"]) <= TOL
    plain = adapters.detach()
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_fusion_aux_loss_is_adapterhubs_regularization():
    model, adapters = _members("bert_fusion")
    adapters.load(FIXTURES / "bert_fusion" / "fusion")
    adapters.train_fusion(["a", "b"])
    layers = [c for c in adapters.components("fusion[a,b]").values() if isinstance(c, FusionLayer)]
    want = sum(0.01 * (torch.eye(32) - layer.value.weight).pow(2).sum() for layer in layers)
    got = adapters.aux_loss()
    assert got.requires_grad
    torch.testing.assert_close(got, want)


def test_annealed_temperature_steps_per_forward():
    """AdapterHub's ``temperature: true``: T = 50, minus 0.05 after every forward, not below 1."""
    layer = FusionLayer(4, Fusion(adapters=("a", "b"), temperature=50.0, temperature_decay=0.05), torch.zeros(1))
    layer.initialize(torch.nn.Identity())
    h, outs = torch.randn(2, 4), [torch.randn(2, 4), torch.randn(2, 4)]
    for t in (50.0, 49.95, 49.9):
        assert layer.temperature == pytest.approx(t)
        layer.fuse(h, outs)
    layer.temperature = 1.01
    layer.fuse(h, outs)
    assert layer.temperature == 1.0


def test_fusion_needs_its_members_first():
    adapters = ak.attach(fresh("bert"))
    adapters.load(FIXTURES / "bert_fusion" / "a")
    with pytest.raises(AdapterFileError, match=r"\['b'\] are not loaded"):
        adapters.load(FIXTURES / "bert_fusion" / "fusion")
    assert adapters.names == ["a"]


def test_fusion_over_parallel_adapters_is_refused(tmp_path):
    """AdapterHub's Fuse over ParBn adds the residual twice (adapters 1.3.0): not reproduced, refused."""
    adapters = ak.attach(fresh("bert"))
    for n in ("a", "b"):
        d = tmp_path / n
        shutil.copytree(FIXTURES / "bert_par_bn" / "adapter", d)
        adapters.load(d, name=n)
    with pytest.raises(AdapterFileError, match="parallel adapters adds the residual twice"):
        adapters.load(FIXTURES / "bert_fusion" / "fusion")
    assert adapters.names == ["a", "b"]


@pytest.mark.parametrize("case,setup", [(c, k) for c, k in SAVED if k.endswith("setup")])
def test_setup_directory_loads_and_activates(case, setup):
    key = "output" if setup == "setup" else "stack.output"
    model = fresh(COMPOSITIONS[case]["family"])
    adapters = ak.attach(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gpt2's static lm_head in the member directories equals the model's own
        adapters.load(FIXTURES / case / setup)
    if setup == "setup":
        assert adapters.names == ["a", "b", "fusion[a,b]"]
        assert adapters.active == (ak.Fuse("a", "b"),)
    else:
        assert adapters.names == ["a", "b"]
        assert adapters.active == (ak.Stack("a", "b"),)
    exp = _expected(case)
    assert _diff(run(model, exp)[0], exp[key]) <= TOL


def test_setup_load_is_all_or_nothing(tmp_path):
    d = tmp_path / "setup"
    shutil.copytree(FIXTURES / "bert_fusion" / "setup", d)
    (d / "a,b" / "model_adapter_fusion.safetensors").write_bytes(b"broken")
    adapters = ak.attach(fresh("bert"))
    with pytest.raises(AdapterFileError, match="corrupt"):
        adapters.load(d)
    assert adapters.names == [] and adapters.active == ()
    with pytest.raises(AdapterFileError, match="several adapters"):
        adapters.read(FIXTURES / "bert_fusion" / "setup")


def test_setup_names_are_checked_before_anything_loads():
    adapters = ak.attach(fresh("bert"))
    adapters.load(FIXTURES / "bert_fusion" / "a")
    with pytest.raises(AdapterFileError, match=r"\['a'\] already exist"):
        adapters.load(FIXTURES / "bert_fusion" / "setup")
    assert adapters.names == ["a"]


def test_decoder_classifier_reads_the_last_non_padding_token():
    """AdapterHub's GPT-2/LLaMA classifiers: ``count(input_ids != pad_token_id) − 1`` (no pad id: the last token)."""
    model = _bare("gpt2_cls_head")
    adapters = ak.attach(model)
    adapters.load(FIXTURES / "gpt2_cls_head" / "adapter", activate=True)
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    with torch.no_grad():
        last = model(input_ids=ids).logits
        model.config.pad_token_id = 0
        [layer] = [c for c in adapters.components("task").values() if isinstance(c, FlexHeadLayer)]
        layer.pad_token_id = 0
        padded = model(input_ids=ids).logits
        short = model(input_ids=ids[:1, :3]).logits
    assert _diff(padded[1], last[1]) == 0
    assert _diff(padded[0], short[0]) <= 1e-6  # the head read position 2 (causal: as if the pads were absent)
    assert _diff(padded[0], last[0]) > 1e-4


def _bare(case: str) -> torch.nn.Module:
    if COMPOSITIONS[case]["family"] == "bert":
        return copy.deepcopy(_base("bert"))  # a bare BertModel
    return transformers.GPT2Model.from_pretrained(str(FIXTURES / "base" / "gpt2")).eval()


@pytest.mark.parametrize("case", HEADS)
def test_flex_head_gives_the_library_logits_on_the_bare_model(case):
    model = _bare(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = ak.attach(model)
    exp = _expected(case)
    inputs = {"input_ids": exp["input_ids"], "attention_mask": exp["attention_mask"]}
    name = adapters.load(FIXTURES / case / "adapter", activate=True)
    assert name == "task"
    assert any(isinstance(c, FlexHeadLayer) for c in adapters.components("task").values())
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    assert out.logits.shape == exp["output"].shape
    assert _diff(out.logits, exp["output"]) <= TOL
    assert _diff(out.hidden_states[-1], exp["hidden"]) <= TOL
    assert _diff(out.last_hidden_state, exp["hidden"]) <= TOL  # the model's own outputs stay
    with adapters.use(), torch.no_grad():
        assert "logits" not in model(**inputs)
    with torch.no_grad():
        as_tuple = model(**inputs, return_dict=False)
    assert _diff(as_tuple[-1], exp["output"]) <= TOL
    plain = adapters.detach()
    with torch.no_grad():
        assert "logits" not in plain(**inputs)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_flex_head_round_trips_natively(tmp_path):
    model = _bare("bert_cls_head")
    adapters = ak.attach(model)
    exp = _expected("bert_cls_head")
    adapters.load(FIXTURES / "bert_cls_head" / "adapter")
    adapters.save("task", tmp_path / "task")
    again = ak.attach(_bare("bert_cls_head"))
    again.load(tmp_path / "task", activate=True)
    with torch.no_grad():
        out = again.model(input_ids=exp["input_ids"], attention_mask=exp["attention_mask"])
    assert _diff(out.logits, exp["output"]) <= TOL


def test_unread_head_types_are_refused(tmp_path):
    d = tmp_path / "qa"
    shutil.copytree(FIXTURES / "bert_cls_head" / "adapter", d)
    data = json.loads((d / "head_config.json").read_text())
    data["config"]["head_type"] = "question_answering"
    (d / "head_config.json").write_text(json.dumps(data))
    adapters = ak.attach(_bare("bert_cls_head"))
    with pytest.raises(AdapterFileError, match="'question_answering' heads are not read"):
        adapters.load(d)
    assert adapters.names == []


def test_detection():
    assert adapterhub_fusion.is_fusion(FIXTURES / "bert_fusion" / "fusion")
    assert not adapterhub_fusion.is_fusion(FIXTURES / "bert_fusion" / "a")


def test_static_head_that_differs_loads_as_head_copies(tmp_path):
    """A static head (``"config": null``, the model's own modules' tensors) written from the same model class:
    the adapter owns copies holding the file's values; the model's own head is untouched."""
    from safetensors.torch import save_file

    d = tmp_path / "with_head"
    shutil.copytree(FIXTURES / "bertcls_lora" / "adapter", d)
    model = fresh("bertcls")
    g = torch.Generator().manual_seed(0)
    head = {k: v + torch.randn(v.shape, generator=g) for k, v in model.classifier.state_dict().items()}
    save_file({f"classifier.{k}": v for k, v in head.items()}, str(d / "model_head.safetensors"))
    config = {"config": None, "name": None, "model_class": "BertForSequenceClassification", "num_labels": 3}
    (d / "head_config.json").write_text(json.dumps(config))
    own = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    adapters = ak.attach(model)
    adapters.load(d, activate=True)
    assert adapters.config("task").heads == ("classifier",)
    exp = _expected("bertcls_lora")
    out, hidden = run(model, exp)
    reference = fresh("bertcls")
    reference.classifier.load_state_dict(head)
    ref_adapters = ak.attach(reference)
    ref_adapters.load(FIXTURES / "bertcls_lora" / "adapter", activate=True)
    assert _diff(out, run(reference, exp)[0]) <= 1e-6
    assert _diff(out, exp["output"]) > 1e-3  # the file's head, not the model's
    assert all(torch.equal(own[k], getattr(model.classifier, k)) for k in own)
    # the same head equal to the model's own: nothing to load, no warning
    save_file({f"classifier.{k}": v for k, v in own.items()}, str(d / "model_head.safetensors"))
    again = ak.attach(fresh("bertcls"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.load(d)
    assert again.config("task").heads == ()


def test_fusion_setup_with_its_own_head():
    """AdapterFusion trained with a target-task head (``save_adapter_setup(dir, Fuse(a, b), head_setup="target")``
    from BertAdapterModel): the head loads as an adapter of its own, active after the fusion, on a bare BertModel."""
    model = _bare("bert_cls_head")
    adapters = ak.attach(model)
    adapters.load(FIXTURES / "bert_fusion_head" / "setup")
    assert adapters.names == ["a", "b", "fusion[a,b]", "target"]
    assert adapters.active == (ak.Stack(ak.Fuse("a", "b"), "target"),)
    exp = _expected("bert_fusion_head")
    with torch.no_grad():
        out = model(input_ids=exp["input_ids"], attention_mask=exp["attention_mask"])
    assert _diff(out.logits, exp["output"]) <= TOL
    assert _diff(out.last_hidden_state, exp["hidden"]) <= TOL


def test_head_directory_loads_alone():
    """A ``save_head`` directory is a head adapter of its own (a FlexHead alone)."""
    model = _bare("bert_cls_head")
    adapters = ak.attach(model)
    assert adapters.load(FIXTURES / "bert_fusion_head" / "setup" / "target") == "target"
    assert adapters.config("target").method == "flex_head"
    adapters.activate("target")
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3)


def test_add_fusion_takes_adapterhubs_equations():
    """``add_fusion`` with AdapterHub's equations as fields: with the library's weights copied in, its outputs."""
    model, adapters = _members("bert_fusion")
    name = adapters.add_fusion(["a", "b"], query_input="adapter_input", values="changes", value_bias=False)
    assert adapters.config(name).values == "changes"
    loaded = adapterhub_fusion.plan_of(adapters, FIXTURES / "bert_fusion" / "fusion", allow_pickle=False)[1]
    ours = adapters.components(name)
    with torch.no_grad():
        for site, (_, comp) in loaded.components.items():
            ours[site].load_state_dict(comp.state_dict())
    adapters.activate(ak.Fuse("a", "b"))
    exp = _expected("bert_fusion")
    assert _diff(run(model, exp)[0], exp["output"]) <= TOL
