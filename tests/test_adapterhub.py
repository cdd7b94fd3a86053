"""AdapterHub interop (issue 16): adapters saved by the real ``adapters`` 1.3.0 library load onto the same base
model (saved by transformers 4.57.6, loaded here with the project's transformers) and give the library's outputs.

The fixtures and the library's outputs are written by tests/fixtures/adapterhub/make_fixtures.py in its own venv
(see that file); ``cases.json`` lists them. Every adapter weight there is perturbed, so no adapter is an identity.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapterkit as ak
from adapterkit.formats import adapterhub, detect

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "adapterhub"
CASES: dict[str, dict] = json.loads((FIXTURES / "cases.json").read_text())["cases"]
TOL = 1e-4

SUPPORTED = {
    "lora",
    "lora_all",
    "lora_k",
    "lora_leave_out",
    "ia3",
    "ia3_all",
    "loreft",
    "double_seq_bn",
    "double_seq_bn_leave_out",
    "compacter",
    "compacter_own_rule",
    "seq_bn",
    "par_bn",
    "seq_bn_ln",
    "seq_bn_ln_after_res",
    "seq_bn_post_add",
    "adapter_plus",
    "par_bn_mh",
    "double_seq_bn_cross",
}
SUPPORTED_CASES = {"llama_seq_bn_inv"}  # the coupling on the token embedding's output
# read with the library's outputs, but not written back by formats/adapterhub_export.py (tests/test_adapterhub_export.py
# re-exports SUPPORTED and SUPPORTED_CASES only); details in tests/test_adapterhub_prefix.py
READ_ONLY = {
    "prefix_tuning",
    "prefix_tuning_flat",
    "prefix_tuning_ejected",
    "mam",
    "unipelt",
    "prompt_tuning",
    "seq_bn_inv",  # BERT (after the embeddings module) and GPT-2 (after wte + wpe)
    "prefix_tuning_gated",
    "lora_gated",
}
MISSING: dict[str, str] = {}  # method -> why its fixtures do not load yet (strict xfail)


def _model_class(family: str):
    import transformers

    return {
        "bert": transformers.BertModel,
        "bertcls": transformers.BertForSequenceClassification,
        "gpt2": transformers.GPT2LMHeadModel,
        "llama": transformers.LlamaForCausalLM,
        "distilbert": transformers.DistilBertModel,
        "t5": transformers.T5EncoderModel,
        "bart": transformers.BartModel,
        "vit": transformers.ViTModel,  # saved with transformers 4.57's module names, loaded with 5's
    }[family]


@functools.cache
def _base(family: str) -> torch.nn.Module:
    from transformers.utils import logging

    logging.set_verbosity_error()  # the load report of a bare BertModel saved without its pooler
    kwargs = {"add_pooling_layer": False} if family in ("bert", "vit") else {}
    return _model_class(family).from_pretrained(str(FIXTURES / "base" / family), **kwargs).eval()


def fresh(family: str) -> torch.nn.Module:
    return copy.deepcopy(_base(family))


def expected(case: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / case / "expected.safetensors"))


def run(model: torch.nn.Module, exp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output, hidden)`` as the fixture script records them (logits or last hidden state; last hidden state)."""
    inputs = (
        {"pixel_values": exp["pixel_values"]}
        if "pixel_values" in exp
        else {"input_ids": exp["input_ids"], "attention_mask": exp["attention_mask"]}
    )
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    states = out.hidden_states if getattr(out, "hidden_states", None) is not None else out.decoder_hidden_states
    hidden = states[-1]  # BartModel: the decoder's
    return (out.logits if hasattr(out, "logits") else hidden), hidden


def _marks(case: str) -> list:
    method = CASES[case]["method"]
    if method in SUPPORTED or method in READ_ONLY or case in SUPPORTED_CASES:
        return []
    return [pytest.mark.xfail(strict=True, raises=ak.AdapterFileError, reason=MISSING[method])]


# refused on purpose (test_unsupported_methods_are_refused_with_the_missing_piece): the library lost a tensor
REFUSED = {"compacter_bare"}
ALL = [
    pytest.param(case, marks=_marks(case), id=case)
    for case in sorted(CASES)
    if CASES[case]["method"] not in REFUSED
]


def test_base_models_match_the_fixture_writer():
    """The base models alone give transformers 4.57's outputs: any difference below is the adapter's."""
    for family in ("bert", "bertcls", "gpt2", "llama", "distilbert", "t5", "bart", "vit"):
        exp = load_file(str(FIXTURES / "base" / family / "expected.safetensors"))
        out, hidden = run(fresh(family), exp)
        assert (out - exp["output"]).abs().max() <= TOL
        assert (hidden - exp["hidden"]).abs().max() <= TOL


@pytest.mark.parametrize("case", ALL)
def test_fixture_gives_the_library_outputs(case):
    info = CASES[case]
    model = fresh(info["family"])
    exp = expected(case)
    adapters = ak.attach(model)
    directory = FIXTURES / case / "adapter"
    assert detect(directory) is adapterhub
    name = adapters.load(directory, allow_pickle=info["file"] == "pickle", activate=True)
    assert name == "task"
    out, hidden = run(model, exp)
    assert out.shape == exp["output"].shape
    assert (out - exp["output"]).abs().max().item() <= TOL
    assert (hidden - exp["hidden"]).abs().max().item() <= TOL
    adapters.detach()
    base = fresh(info["family"]).state_dict()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("case", "family", "inner"),
    [
        ("bertcls_lora", "bertcls", "bert"),  # keys 'bert.encoder...' onto a bare BertModel
        ("gpt2_lora", "gpt2", "transformer"),  # 'transformer.h...' onto a bare GPT2Model
        ("llama_ia3", "llama", "model"),  # 'model.layers...' onto a bare LlamaModel
    ],
)
def test_prefixed_keys_load_onto_the_bare_model(case, family, inner):
    bare = getattr(fresh(family), inner)
    exp = expected(case)
    adapters = ak.attach(bare)
    adapters.load(FIXTURES / case / "adapter", activate=True)
    with torch.no_grad():
        out = bare(input_ids=exp["input_ids"], attention_mask=exp["attention_mask"]).last_hidden_state
    assert (out - exp["hidden"]).abs().max().item() <= TOL


def test_bare_keys_load_onto_a_model_with_a_head():
    """A LoRA saved from a bare BertModel (keys 'encoder...') onto BertForSequenceClassification ('bert.' added)."""
    model = fresh("bertcls")
    adapters = ak.attach(model)
    adapters.load(FIXTURES / "bert_lora" / "adapter", name="x")
    assert sorted(adapters.sites("x")) == [
        f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")
    ]


def test_pickle_needs_allow_pickle():
    adapters = ak.attach(fresh("bert"))
    with pytest.raises(ak.AdapterFileError, match="allow_pickle=True"):
        adapters.load(FIXTURES / "bert_lora_pt" / "adapter")
    assert adapters.names == []


def test_safetensors_preferred_over_pickle(tmp_path):
    """Both files present: the safetensors file is read (as the library's load_adapter does), no pickle needed."""
    d = tmp_path / "both"
    shutil.copytree(FIXTURES / "bert_lora" / "adapter", d)
    shutil.copy(FIXTURES / "bert_lora_pt" / "adapter" / "pytorch_adapter.bin", d)
    model = fresh("bert")
    adapters = ak.attach(model)
    adapters.load(d, activate=True)
    exp = expected("bert_lora")
    assert (run(model, exp)[0] - exp["output"]).abs().max().item() <= TOL


def test_gpt2_fused_lora_is_one_block_lora():
    """GPT-2's fused c_attn pair (q and v groups) becomes one LoRA of rank 2r, alpha 2*alpha on that module."""
    adapters = ak.attach(fresh("gpt2"))
    adapters.load(FIXTURES / "gpt2_lora" / "adapter")
    cfg = adapters.config("task")
    site = "transformer.h.0.attn.c_attn"
    assert cfg.rank_for(site) == 8 and cfg.scaling_for(site) == 2.0


def _edited(tmp_path, case: str, **changes) -> Path:
    d = tmp_path / case
    shutil.copytree(FIXTURES / case / "adapter", d)
    data = json.loads((d / "adapter_config.json").read_text())
    data["config"].update(changes)
    (d / "adapter_config.json").write_text(json.dumps(data))
    return d


def test_old_versions_get_the_library_scaling_fix(tmp_path):
    """adapters < 1.1.0 scaled LoRA with r != alpha wrongly; its loader sets alpha = r, and so do we."""
    d = _edited(tmp_path, "bert_lora")
    data = json.loads((d / "adapter_config.json").read_text())
    data["version"] = "adapters.1.0.1"
    (d / "adapter_config.json").write_text(json.dumps(data))
    adapters = ak.attach(fresh("bert"))
    adapters.load(d)
    assert adapters.config("task").alpha == 4


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"use_gating": True}, "use_gating"),
        ({"vera_d": 0.1}, "VeRA"),
        ({"composition_mode": "mul"}, "composition_mode"),
        ({"attn_matrices": ["q", "x"]}, "attn_matrices"),
    ],
)
def test_unsupported_lora_options_are_refused(tmp_path, changes, match):
    adapters = ak.attach(fresh("bert"))
    with pytest.raises(ak.AdapterFileError, match=match):
        adapters.load(_edited(tmp_path, "bert_lora", **changes))
    assert adapters.names == []


def test_wrong_base_model_is_refused():
    adapters = ak.attach(fresh("bert"))
    with pytest.raises(ak.AdapterFileError, match="wrong base model"):
        adapters.load(FIXTURES / "llama_lora" / "adapter")
    assert adapters.names == []


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("bert_compacter_bare", "shared phm_rule is missing from the file"),  # issue 16 item 5
    ],
)
def test_unsupported_methods_are_refused_with_the_missing_piece(case, match):
    adapters = ak.attach(fresh(CASES[case]["family"]))
    with pytest.raises(ak.AdapterFileError, match=match):
        adapters.load(FIXTURES / case / "adapter")
    assert adapters.names == []


def test_bottleneck_without_original_ln_before_is_placed_by_roles(tmp_path):
    """An output-only sequential adapter that leaves the model's residual and LayerNorm alone (SeqBn with
    original_ln_before false) sits on role ffn.sublayer only (its residual tapped at ffn.residual)."""
    d = _edited(tmp_path, "bert_double_seq_bn", mh_adapter=False)
    tensors = load_file(str(d / "adapter.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v for k, v in tensors.items() if ".attention." not in k}, str(d / "adapter.safetensors"))
    adapters = ak.attach(fresh("bert"))
    adapters.load(d)
    assert sorted(adapters.sites("task")) == [
        f"encoder.layer.{i}.{m}" for i in range(2) for m in ("intermediate", "output.dropout")
    ]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"orthogonality": False}, "NoReft/DiReft"),
        ({"non_linearity": "relu"}, "non_linearity"),
    ],
)
def test_unsupported_reft_options_are_refused(tmp_path, changes, match):
    adapters = ak.attach(fresh("bert"))
    with pytest.raises(ak.AdapterFileError, match=match):
        adapters.load(_edited(tmp_path, "bert_loreft", **changes))
    assert adapters.names == []


@pytest.mark.parametrize(
    "case",
    [
        "gpt2_lora",
        "gpt2_ia3_all",
        "bert_loreft",
        "bert_par_bn",
        "bertcls_compacter",
        "gpt2_seq_bn",
        "llama_double_seq_bn",
        "bert_seq_bn",
        "gpt2_par_bn",
        "t5_seq_bn",
        "bert_seq_bn_ln",
        "bert_seq_bn_inv",
        "bert_prompt_tuning",
        "gpt2_lora_gated",
    ],
)
def test_native_save_of_a_loaded_adapter_reloads_the_same(tmp_path, case):
    """What a loaded AdapterHub adapter becomes is an ordinary adapter: its config plans the same components, so a
    native save loads back to the library's outputs."""
    info = CASES[case]
    model = fresh(info["family"])
    adapters = ak.attach(model)
    adapters.load(FIXTURES / case / "adapter", allow_pickle=info["file"] == "pickle")
    adapters.save("task", tmp_path / "native")
    again = fresh(info["family"])
    reloaded = ak.attach(again)
    reloaded.load(tmp_path / "native", activate=True)
    exp = expected(case)
    assert (run(again, exp)[0] - exp["output"]).abs().max().item() <= TOL


@pytest.mark.parametrize(
    "case",
    [
        "llama_lora",
        "gpt2_seq_bn",
        "bert_loreft",
        "llama_seq_bn_inv",
        "distilbert_par_bn",
        "bert_prompt_tuning",
        "gpt2_seq_bn_inv",
        "gpt2_lora_gated",
    ],
)
def test_read_then_install(case):
    """``read`` (the server's loader-thread half of ``load``) works for AdapterHub directories too."""
    info = CASES[case]
    model = fresh(info["family"])
    adapters = ak.attach(model)
    read = adapters.read(FIXTURES / case / "adapter")
    assert adapters.names == []
    adapters.install(read.name, read.plan, activate=True)
    exp = expected(case)
    assert (run(model, exp)[0] - exp["output"]).abs().max().item() <= TOL


def test_a_saved_head_is_not_loaded_silently(tmp_path):
    d = tmp_path / "with_head"
    shutil.copytree(FIXTURES / "bert_lora" / "adapter", d)
    (d / "head_config.json").write_text(json.dumps({"config": None, "name": None, "model_class": "BertModel"}))
    adapters = ak.attach(fresh("bert"))
    with pytest.warns(UserWarning, match="heads from AdapterHub files are not loaded yet"):
        adapters.load(d)
    assert adapters.names == ["task"]
