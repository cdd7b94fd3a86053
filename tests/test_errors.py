"""Bad inputs: each raises one clear error naming the offending value, and leaves the model unchanged
(same state_dict and module names, no hooks, same outputs). add/load are all-or-nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import adapterkit as ak
from adapterkit.targeting import CONTAINER

from conftest import make_inputs, make_model, output_of


class Snapshot:
    """What must not change when an operation fails."""

    def __init__(self, model: nn.Module, family: str) -> None:
        self.model = model
        self.inputs = make_inputs(family)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.names = {n for n, _ in model.named_modules()}
        self.hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
        self.output = self.run()

    @torch.no_grad()
    def run(self) -> torch.Tensor:
        return output_of(self.model, self.inputs)

    def assert_unchanged(self) -> None:
        state = self.model.state_dict()
        assert state.keys() == self.state.keys()
        changed = [k for k in state if not torch.equal(state[k], self.state[k])]
        assert not changed, changed[:5]
        assert {n for n, _ in self.model.named_modules()} == self.names
        hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in self.model.named_modules()}
        assert hooks == self.hooks
        assert torch.equal(self.run(), self.output)


def fresh(family: str, seed: int = 0):
    model = make_model(family, seed)
    adapters = ak.attach(model)
    return model, adapters, Snapshot(model, family)


def assert_bare(model: nn.Module) -> None:
    for n, m in model.named_modules():
        assert CONTAINER not in n
        assert not m._forward_hooks, n
        assert not m._forward_pre_hooks, n


def saved_adapter(tmp_path: Path, family: str = "llama", **cfg) -> Path:
    model = make_model(family)
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(init_weights=False, **cfg))
    adapters.save("a", tmp_path / "a")
    return tmp_path / "a"


# --- targets -----------------------------------------------------------------------------------------
def test_unknown_role_for_family():
    model, adapters, snap = fresh("gpt2")
    with pytest.raises(ak.TargetError, match=r"'attn\.q'") as info:
        adapters.add("a", ak.LoRA(targets=["attn.q"]))
    msg = str(info.value)
    assert "gpt2" in msg and "attn.qkv" in msg  # names the family and what exists instead
    assert adapters.names == []
    snap.assert_unchanged()
    assert_bare(model)


def test_unknown_module_name_suggests_close_match():
    model, adapters, snap = fresh("llama")
    with pytest.raises(ak.TargetError, match=r"'q_prj'") as info:
        adapters.add("a", ak.LoRA(targets=["q_prj"]))
    assert "did you mean" in str(info.value) and "'q_proj'" in str(info.value)
    assert adapters.names == []
    snap.assert_unchanged()
    assert_bare(model)


def test_one_bad_selector_among_good_ones_attaches_nothing():
    model, adapters, snap = fresh("llama")
    with pytest.raises(ak.TargetError, match="v_prj"):
        adapters.add("a", ak.LoRA(targets=["attn.q", "v_prj"]))
    assert adapters.names == []
    snap.assert_unchanged()
    assert_bare(model)


def test_targets_left_empty_by_exclude():
    model, adapters, snap = fresh("bert")
    with pytest.raises(ak.TargetError, match="leave no module"):
        adapters.add("a", ak.LoRA(targets=["attn.q"], exclude=["query"]))
    snap.assert_unchanged()


def test_invalid_regex():
    model, adapters, snap = fresh("bert")
    with pytest.raises(ak.TargetError, match=r"not a valid regular expression"):
        adapters.add("a", ak.LoRA(targets=[r"layer\.(0"]))
    snap.assert_unchanged()


# --- config values -----------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [0, -1])
def test_bad_rank_fails_at_construction(r):
    with pytest.raises(ValueError, match=rf"r={r}\b"):
        ak.LoRA(r=r)


def test_bad_rank_override_in_add():
    model, adapters, snap = fresh("bert")
    with pytest.raises(ValueError, match=r"r=0"):
        adapters.add("a", "lora", r=0)
    assert adapters.names == []
    snap.assert_unchanged()


def test_bad_rank_pattern():
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\]"):
        ak.LoRA(rank_pattern={"q_proj": 0})


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_bad_dropout(dropout):
    with pytest.raises(ValueError, match=str(dropout)):
        ak.LoRA(dropout=dropout)


def test_bad_enum_values_name_the_value():
    with pytest.raises(ValueError, match="lora_onyl"):
        ak.LoRA(bias="lora_onyl")
    with pytest.raises(ValueError, match="pisa"):
        ak.LoRA(init="pisa")


def test_unknown_method_name():
    model, adapters, snap = fresh("bert")
    with pytest.raises(ValueError, match=r"'lorra'") as info:
        adapters.add("x", "lorra")
    assert "did you mean 'lora'" in str(info.value)
    assert adapters.names == []
    snap.assert_unchanged()


def test_duplicate_adapter_name():
    model, adapters, _ = fresh("bert")
    adapters.add("a", ak.LoRA(init_weights=False))
    snap = Snapshot(model, "bert")
    with pytest.raises(ValueError, match=r"'a' already exists"):
        adapters.add("a", ak.LoRA(r=2))
    assert adapters.names == ["a"]
    assert adapters.config("a").r == 8
    snap.assert_unchanged()


@pytest.mark.parametrize("name", ["my.adapter", "", "tab\tname"])
def test_bad_adapter_name(name):
    model, adapters, snap = fresh("bert")
    with pytest.raises(ValueError, match="adapter names") as info:
        adapters.add(name, ak.LoRA())
    assert repr(name) in str(info.value)
    assert adapters.names == []
    snap.assert_unchanged()


def test_unknown_adapter_in_verbs():
    model, adapters, snap = fresh("bert")
    adapters.add("a", ak.LoRA())
    for call in (
        lambda: adapters.activate("b"),
        lambda: adapters.merge("b"),
        lambda: adapters.delete("b"),
        lambda: adapters.train("b"),
        lambda: adapters.use("b").__enter__(),
    ):
        with pytest.raises(KeyError, match=r"'b'"):
            call()
    assert adapters.active == ("a",)


# --- add is all-or-nothing ---------------------------------------------------------------------------
def test_target_the_method_cannot_act_on_attaches_nothing():
    model, adapters, snap = fresh("llama")
    with pytest.raises(ak.TargetError, match=r"model\.layers\.0\.input_layernorm") as info:
        adapters.add("a", ak.LoRA(targets=["attn.q", "model.layers.0.input_layernorm"]))
    assert "LlamaRMSNorm" in str(info.value)
    assert adapters.names == [] and adapters.active == ()
    snap.assert_unchanged()
    assert_bare(model)


def test_failure_midway_through_install_rolls_back():
    """The second site cannot be installed: the first (already attached, PiSSA-modified) is undone."""
    model, adapters, snap = fresh("llama")
    q1 = model.model.layers[1].self_attn.q_proj
    q1.__dict__[CONTAINER] = "in the way"  # makes Site() refuse this module
    with pytest.raises(RuntimeError, match=r"layers\.1\.self_attn\.q_proj"):
        adapters.add("a", ak.LoRA(init="pissa", targets=["attn.q"]))
    del q1.__dict__[CONTAINER]
    assert adapters.names == [] and adapters.active == ()
    snap.assert_unchanged()
    assert_bare(model)
    adapters.add("a", ak.LoRA(targets=["attn.q"]))  # and the model is still usable
    assert adapters.names == ["a"]


def test_dry_run_and_plan_change_nothing():
    model, adapters, snap = fresh("t5")
    plan = adapters.add("a", ak.LoRA(init="pissa"), dry_run=True)
    assert plan.sites and adapters.names == []
    adapters.plan(ak.LoRA(targets="all-linear", bias="all"))
    snap.assert_unchanged()
    assert_bare(model)


# --- save ------------------------------------------------------------------------------------------
def test_save_writes_exactly_two_files_and_no_temp_files(tmp_path):
    model, adapters, _ = fresh("bert")
    adapters.add("a", ak.LoRA(init_weights=False))
    adapters.save("a", tmp_path / "out")
    adapters.save("a", tmp_path / "out")  # overwriting is atomic too
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["adapter.safetensors", "adapter_config.json", "out"]


def test_save_unknown_adapter_writes_nothing(tmp_path):
    model, adapters, _ = fresh("bert")
    adapters.add("a", ak.LoRA())
    with pytest.raises(KeyError, match=r"'b'"):
        adapters.save("b", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- load: wrong base model --------------------------------------------------------------------------
def _wide_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_load_onto_llama_with_other_hidden_size(tmp_path):
    path = saved_adapter(tmp_path, "llama")
    model = _wide_llama()
    adapters = ak.attach(model)
    snap = Snapshot(model, "llama")
    with pytest.raises(ak.AdapterFileError, match="hidden size") as info:
        adapters.load(path)
    assert "32" in str(info.value) and "48" in str(info.value)
    assert adapters.names == []
    snap.assert_unchanged()
    assert_bare(model)


def test_load_llama_adapter_onto_bert(tmp_path):
    path = saved_adapter(tmp_path, "llama")
    model, adapters, snap = fresh("bert")
    with pytest.raises(ak.AdapterFileError, match="LlamaForCausalLM") as info:
        adapters.load(path)
    assert "model.layers.0.self_attn.q_proj" in str(info.value)
    assert adapters.names == []
    snap.assert_unchanged()
    assert_bare(model)


def test_load_peft_export_onto_wrong_model(tmp_path):
    model, adapters, _ = fresh("llama")
    adapters.add("a", ak.LoRA(init_weights=False))
    adapters.export("a", tmp_path / "peft", format="peft")
    other, other_adapters, snap = fresh("bert")
    with pytest.raises(ak.AdapterFileError, match="q_proj"):
        other_adapters.load(tmp_path / "peft")
    snap.assert_unchanged()
    assert_bare(other)


# --- load: broken directories ------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    model, adapters, snap = fresh("llama")
    missing = tmp_path / "nope"
    with pytest.raises(ak.AdapterFileError, match="does not exist") as info:
        adapters.load(missing)
    assert str(missing) in str(info.value)
    snap.assert_unchanged()


def test_directory_without_config(tmp_path):
    model, adapters, snap = fresh("llama")
    with pytest.raises(ak.AdapterFileError, match="adapter_config.json"):
        adapters.load(tmp_path)
    snap.assert_unchanged()


def test_missing_safetensors(tmp_path):
    path = saved_adapter(tmp_path)
    (path / "adapter.safetensors").unlink()
    model, adapters, snap = fresh("llama")
    with pytest.raises(ak.AdapterFileError, match=r"adapter\.safetensors"):
        adapters.load(path)
    assert adapters.names == []
    snap.assert_unchanged()


def test_corrupt_safetensors(tmp_path):
    path = saved_adapter(tmp_path)
    (path / "adapter.safetensors").write_bytes(b"\x00\xffnot a safetensors file" * 10)
    model, adapters, snap = fresh("llama")
    with pytest.raises(ak.AdapterFileError, match="corrupt") as info:
        adapters.load(path)
    assert "adapter.safetensors" in str(info.value)
    assert adapters.names == []
    snap.assert_unchanged()
    assert_bare(model)


def test_truncated_safetensors(tmp_path):
    path = saved_adapter(tmp_path)
    data = (path / "adapter.safetensors").read_bytes()
    (path / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    model, adapters, snap = fresh("llama")
    with pytest.raises(ak.AdapterFileError, match=r"adapter\.safetensors"):
        adapters.load(path)
    snap.assert_unchanged()


def test_corrupt_json(tmp_path):
    path = saved_adapter(tmp_path)
    (path / "adapter_config.json").write_text('{"format": "adapterkit", "config": ')
    model, adapters, snap = fresh("llama")
    with pytest.raises(ak.AdapterFileError, match="not valid JSON") as info:
        adapters.load(path)
    assert "adapter_config.json" in str(info.value)
    snap.assert_unchanged()


def test_tensor_with_wrong_shape(tmp_path):
    from safetensors.torch import save_file

    path = saved_adapter(tmp_path)
    tensors = load_file(path / "adapter.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A"))
    tensors[key] = torch.zeros(3, 32)
    save_file(tensors, path / "adapter.safetensors")
    model, adapters, snap = fresh("llama")
    with pytest.raises(ak.AdapterFileError, match="shape mismatch"):
        adapters.load(path)
    assert adapters.names == []
    snap.assert_unchanged()
    assert_bare(model)


def test_load_under_existing_name(tmp_path):
    path = saved_adapter(tmp_path)
    model, adapters, _ = fresh("llama")
    adapters.add("a", ak.LoRA())
    snap = Snapshot(model, "llama")
    with pytest.raises(ValueError, match=r"'a' already exists"):
        adapters.load(path)
    snap.assert_unchanged()
    assert adapters.load(path, name="b") == "b"


def test_pickle_only_directory(tmp_path):
    path = saved_adapter(tmp_path)
    reference, ref_adapters, _ = fresh("llama")
    ref_adapters.load(path)
    expected = Snapshot(reference, "llama").output

    st = path / "adapter.safetensors"
    torch.save(load_file(st), path / "adapter.bin")
    st.unlink()
    model, adapters, snap = fresh("llama")
    with pytest.raises(ak.AdapterFileError, match="allow_pickle") as info:
        adapters.load(path)
    assert "adapter.bin" in str(info.value)
    assert adapters.names == []
    snap.assert_unchanged()
    assert_bare(model)

    assert adapters.load(path, allow_pickle=True) == "a"
    torch.testing.assert_close(snap.run(), expected, atol=1e-6, rtol=0)


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    path = saved_adapter(tmp_path)
    (path / "adapter.safetensors").unlink()
    torch.save({"x": Path("/")}, path / "adapter.bin")  # not a tensor dict: weights_only rejects it
    model, adapters, snap = fresh("llama")
    with pytest.raises(ak.AdapterFileError, match=r"adapter\.bin"):
        adapters.load(path, allow_pickle=True)
    snap.assert_unchanged()


def test_peft_dir_with_unsupported_type(tmp_path):
    d = tmp_path / "fourierft"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "FOURIERFT", "num_virtual_tokens": 4}))
    model, adapters, snap = fresh("llama")
    with pytest.raises(ak.AdapterFileError, match="FOURIERFT"):
        adapters.load(d)
    assert adapters.names == []
    snap.assert_unchanged()


def test_config_of_unknown_format(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"hello": "world"}))
    model, adapters, snap = fresh("llama")
    with pytest.raises(ak.AdapterFileError, match="neither an adapterkit nor a peft"):
        adapters.load(tmp_path)
    snap.assert_unchanged()


def test_config_with_unknown_method(tmp_path):
    path = saved_adapter(tmp_path)
    data = json.loads((path / "adapter_config.json").read_text())
    data["config"]["method"] = "lorra"
    (path / "adapter_config.json").write_text(json.dumps(data))
    model, adapters, snap = fresh("llama")
    with pytest.raises(ak.AdapterFileError, match="lorra"):
        adapters.load(path)
    snap.assert_unchanged()


def test_config_from_newer_adapterkit(tmp_path):
    path = saved_adapter(tmp_path)
    data = json.loads((path / "adapter_config.json").read_text())
    data["format_version"] = 99
    (path / "adapter_config.json").write_text(json.dumps(data))
    model, adapters, snap = fresh("llama")
    with pytest.raises(ak.AdapterFileError, match="newer adapterkit"):
        adapters.load(path)
    snap.assert_unchanged()


def test_attach_non_module():
    with pytest.raises(TypeError, match="dict"):
        ak.attach({})


@pytest.mark.parametrize("name", ["half", "train", "float", "modules"])
def test_adapter_name_that_is_a_module_attribute_is_refused(name):
    model, adapters, snap = fresh("bert")
    with pytest.raises(ValueError, match="attribute of torch modules"):
        adapters.add(name, ak.LoRA())
    assert adapters.names == []
    snap.assert_unchanged()
