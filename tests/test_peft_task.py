"""peft exports carry the model's ``task_type`` (issue 14, item 7), so peft's ``AutoPeftModelFor...`` classes load
them. Classification tasks need the adapter's own copy of the head (peft's task wrappers train and load it);
without one the export says None and peft's plain ``PeftModel`` uses the base head, as we do."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import adapterkit as ak

from conftest import make_inputs, make_model, output_of

peft = pytest.importorskip("peft")

METHODS = {
    "lora": lambda: ak.LoRA(init_weights=False),
    "ia3": lambda: ak.IA3(),
    "vera": lambda: ak.VeRA(r=8),
}
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": None, "t5": "SEQ_2_SEQ_LM", "vit": None}


def _perturb(adapters: ak.Adapters, name: str) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapters.parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(TASKS))
def test_export_writes_the_task_type_of_the_model(method: str, family: str, tmp_path: Path) -> None:
    adapters = ak.attach(make_model(family))
    adapters.add("a", METHODS[method]())
    adapters.export("a", tmp_path / "a", format="peft")
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert data["task_type"] == TASKS[family]
    if family == "bert":  # with its own classifier: SEQ_CLS
        adapters.add("h", dataclasses.replace(METHODS[method](), heads=("classifier",)))
        adapters.export("h", tmp_path / "h", format="peft")
        data = json.loads((tmp_path / "h" / "adapter_config.json").read_text())
        assert data["task_type"] == "SEQ_CLS" and data["modules_to_save"] == ["classifier"]


def _causal_lm_on_disk(tmp_path: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    make_model("llama").save_pretrained(tmp_path / "base")
    return LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()


@pytest.mark.parametrize("method", list(METHODS))
def test_auto_peft_model_for_causal_lm_loads_the_export(method: str, tmp_path: Path) -> None:
    model = _causal_lm_on_disk(tmp_path)
    adapters = ak.attach(model)
    adapters.add("a", METHODS[method]())
    _perturb(adapters, "a")
    adapters.activate("a")
    x = make_inputs("llama")
    with torch.no_grad():
        expected = output_of(model, x)
    adapters.export("a", tmp_path / "peft", format="peft")
    data = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert data["base_model_name_or_path"] == str(tmp_path / "base")

    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft").eval()
    assert isinstance(loaded, peft.PeftModelForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, expected, atol=1e-5, rtol=1e-4)


def test_auto_peft_model_for_sequence_classification_loads_an_export_with_its_head(tmp_path: Path) -> None:
    from transformers import BertForSequenceClassification

    make_model("bert").save_pretrained(tmp_path / "base")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(init_weights=False, heads=["classifier"]))
    _perturb(adapters, "a")
    adapters.activate("a")
    x = make_inputs("bert")
    with torch.no_grad():
        expected = output_of(model, x)
    adapters.export("a", tmp_path / "peft", format="peft")

    loaded = peft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, expected, atol=1e-5, rtol=1e-4)
    again = make_model("bert")  # and back into adapterkit: the same outputs
    ak.attach(again).load(tmp_path / "peft", activate=True)
    with torch.no_grad():
        torch.testing.assert_close(output_of(again, x), expected, atol=1e-5, rtol=1e-4)
