"""LoRA on MoE experts stored as 3-D parameters and on routers (``LoRA(target_parameters=...)``,
``methods/lora_params.py``) against peft's ``target_parameters`` (``lora.ParamWrapper``): outputs, merges and
gradients equal peft's, and files go both ways. The contract rows are in ``tests/rows_lora_params.py``.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.methods.lora_params import LoRAParameters, peft_tensors
from adapterkit.sites import ParameterCall
from adapterkit.targeting import CONTAINER, UntargetedParametersWarning
from rows_lora_params import tiny_mixtral, tiny_qwen2_moe

peft = pytest.importorskip("peft")

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def tiny_qwen3_moe() -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)  # fmt: skip
    return Qwen3MoeForCausalLM(cfg)


def tiny_gpt_oss() -> nn.Module:
    """GPT-OSS: experts stored transposed (``is_transposed=True``: ``gate_up_proj (E, H, 2I)``), with biases."""
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(vocab_size=100, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                       layer_types=["full_attention"] * 2, rope_parameters={"rope_type": "default", "rope_theta": 1e4})  # fmt: skip
    return GptOssForCausalLM(cfg)


FACTORIES = {
    "mixtral": tiny_mixtral,
    "qwen2_moe": tiny_qwen2_moe,
    "qwen3_moe": tiny_qwen3_moe,
    "gpt_oss": tiny_gpt_oss,
}

# (id, family, peft LoraConfig kwargs, our config): the same adapter described both ways
CASES = [
    ("mixtral-experts", "mixtral", dict(target_modules=[], target_parameters=EXPERTS), ak.LoRA(targets=[], target_parameters=EXPERTS)),
    (
        "mixtral-experts-router-attn",
        "mixtral",
        dict(target_modules=["q_proj", "v_proj"], target_parameters=[*EXPERTS, "mlp.gate.weight"], lora_alpha=16),
        ak.LoRA(alpha=16, targets=["q_proj", "v_proj"], target_parameters=[*EXPERTS, "mlp.gate.weight"]),
    ),
    (
        "qwen2moe-down-rslora-patterns",
        "qwen2_moe",
        dict(target_modules=["shared_expert_gate"], target_parameters=["experts.down_proj"], use_rslora=True,
             rank_pattern={"down_proj": 4}, alpha_pattern={r"layers\.1\.mlp\.experts\.down_proj": 3}),
        ak.LoRA(targets=["shared_expert_gate"], target_parameters=["experts.down_proj"], rslora=True,
                rank_pattern={"down_proj": 4}, alpha_pattern={r"layers\.1\.mlp\.experts\.down_proj": 3}),
    ),
    ("qwen3moe-experts-router", "qwen3_moe", dict(target_modules=[], target_parameters=[*EXPERTS, "gate.weight"]),
     ak.LoRA(targets=[], target_parameters=[*EXPERTS, "gate.weight"])),
    ("gptoss-transposed", "gpt_oss", dict(target_modules=[], target_parameters=EXPERTS),
     ak.LoRA(targets=[], target_parameters=EXPERTS)),
]  # fmt: skip


def make(family: str) -> nn.Module:
    torch.manual_seed(0)
    return FACTORIES[family]().eval()


def inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(2, 100, (batch, 7), generator=g)}


@torch.no_grad()
def logits(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**x).logits.detach().clone()


@torch.no_grad()
def perturb(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def peft_model(family: str, kwargs: dict):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make(family), LoraConfig(r=2, init_lora_weights=False, **kwargs)).eval()
    perturb([p for n, p in model.named_parameters() if "lora_" in n], 7)
    return model


def ours(family: str, config: ak.AdapterConfig) -> tuple[nn.Module, ak.Adapters]:
    model = make(family)
    adapters = ak.attach(model)
    adapters.add("a", config.replace(r=2, init_weights=False))
    model.eval()
    perturb(adapters.parameters("a"), 7)
    return model, adapters


@pytest.mark.parametrize(("case", "family", "peft_kwargs", "config"), CASES, ids=[c[0] for c in CASES])
def test_peft_directory_loads_equal(case, family, peft_kwargs, config, tmp_path):
    """peft save_pretrained -> ours: outputs, the merged model and unmerging equal peft's."""
    x = inputs()
    base = logits(make(family), x)
    reference = peft_model(family, peft_kwargs)
    expected = logits(reference, x)
    assert (expected - base).abs().max() > 1e-3
    reference.save_pretrained(tmp_path / "p")

    model = make(family)
    adapters = ak.attach(model)
    adapters.load(tmp_path / "p", "p")
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=1e-5)
    assert any(isinstance(c, LoRAParameters) for c in adapters.components("p").values())

    merged_reference = logits(reference.merge_and_unload(), x)
    adapters.merge("p")
    with adapters.use():
        torch.testing.assert_close(logits(model, x), merged_reference, atol=1e-5, rtol=1e-5)
    adapters.unmerge("p")
    with adapters.use():
        torch.testing.assert_close(logits(model, x), base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("case", "family", "peft_kwargs", "config"), CASES, ids=[c[0] for c in CASES])
def test_export_loads_in_peft_with_peft_keys(case, family, peft_kwargs, config, tmp_path):
    """ours -> export -> PeftModel.from_pretrained: equal outputs; the file's keys and shapes are peft's own."""
    from peft import PeftModel
    from safetensors.torch import load_file

    x = inputs()
    model, adapters = ours(family, config)
    expected = logits(model, x)
    adapters.export("a", tmp_path / "ours")
    loaded = PeftModel.from_pretrained(make(family), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, x), expected, atol=1e-5, rtol=1e-5)

    peft_model(family, peft_kwargs).save_pretrained(tmp_path / "p")
    mine = {k: tuple(v.shape) for k, v in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()}
    theirs = {k: tuple(v.shape) for k, v in load_file(tmp_path / "p" / "adapter_model.safetensors").items()}
    assert mine == theirs


def test_gradients_equal_peft():
    """One backward: peft's lora_A/lora_B gradients, in peft's layout, equal ours converted."""
    family, kwargs = "mixtral", dict(target_modules=[], target_parameters=[*EXPERTS, "mlp.gate.weight"])
    reference = peft_model(family, kwargs)
    model, adapters = ours(family, ak.LoRA(targets=[], target_parameters=[*EXPERTS, "mlp.gate.weight"]))
    # same values: our factors from peft's
    with torch.no_grad():
        for site, comp in adapters.components("a").items():
            wrapper = reference.base_model.model.get_submodule(site)
            for p in comp.names:
                layer = wrapper
                while layer.parameter_name != p:
                    layer = layer.base_layer
                A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                if comp.lora_A[p].dim() == 3:
                    e, r, i = comp.lora_A[p].shape
                    A, B = A.reshape(e, r, i), B.reshape(B.shape[0], r, e).permute(2, 0, 1)
                comp.lora_A[p].copy_(A)
                comp.lora_B[p].copy_(B)
    x = inputs()
    adapters.train("a")
    reference.train()
    model(**x).logits.square().mean().backward()
    reference(**x).logits.square().mean().backward()
    for site, comp in adapters.components("a").items():
        grads = {p: (comp.lora_A[p].grad, comp.lora_B[p].grad) for p in comp.names}
        with torch.no_grad():  # peft's layout of our gradients (the factors are not needed any more)
            for p in comp.names:
                comp.lora_A[p].copy_(grads[p][0])
                comp.lora_B[p].copy_(grads[p][1])
            ours_grads = peft_tensors(comp, adapters._sites[site].module)
        wrapper = reference.base_model.model.get_submodule(site)
        depth = 0
        while True:
            prefix = "base_layer." * depth
            torch.testing.assert_close(ours_grads[f"{prefix}lora_A.weight"], wrapper.lora_A["default"].weight.grad)
            torch.testing.assert_close(ours_grads[f"{prefix}lora_B.weight"], wrapper.lora_B["default"].weight.grad)
            if not isinstance(getattr(wrapper, "base_layer", None), type(wrapper)):
                break
            wrapper, depth = wrapper.base_layer, depth + 1
    assert all(p.grad is None for n, p in model.named_parameters() if CONTAINER not in n)


def test_half_precision_base_equals_peft(tmp_path):
    """bf16 base: adapter tensors in float32, the update folded in the weight's dtype (as peft), outputs bf16."""
    from peft import PeftModel

    x = inputs()
    model, adapters = ours("mixtral", ak.LoRA(targets=[], target_parameters=EXPERTS))
    adapters.export("a", tmp_path / "a")
    model = make("mixtral").to(torch.bfloat16)
    adapters = ak.attach(model)
    adapters.load(tmp_path / "a", "a")
    assert all(p.dtype == torch.float32 for p in adapters.parameters("a"))
    reference = PeftModel.from_pretrained(make("mixtral").to(torch.bfloat16), tmp_path / "a").eval()
    got, expected = logits(model, x), logits(reference, x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


def test_router_as_module_target_equals_parameter_target():
    x = inputs()
    results = []
    for config in (
        ak.LoRA(targets=["gate", "experts"]),
        ak.LoRA(targets=[], target_parameters=["mlp.gate.weight", *EXPERTS]),
    ):
        model, adapters = ours("mixtral", config)
        assert set(adapters.sites("a")) == {
            f"model.layers.{i}.mlp.{m}" for i in (0, 1) for m in ("gate", "experts")
        }
        results.append(logits(model, x))
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)


def test_all_linear_names_what_it_leaves_out():
    model = make("mixtral")
    with pytest.warns(UntargetedParametersWarning, match=r"experts\.gate_up_proj.*target_parameters=") as record:
        sites = ak.attach(model).plan(ak.LoRA(targets="all-linear")).sites
    assert not any("experts" in s or s.endswith(".gate") for s in sites)
    message = str(record[0].message)
    assert "mlp.gate.weight" in message and "(4, 96, 32)" in message and "% of the model's parameters" in message


def test_all_linear_with_target_parameters_warns_only_about_the_rest():
    import warnings

    model = make("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntargetedParametersWarning)
        ak.attach(model).plan(ak.LoRA(targets="all-linear", target_parameters=[*EXPERTS, "mlp.gate.weight"]))
    with pytest.warns(UntargetedParametersWarning, match=r"mlp\.gate\.weight") as record:
        ak.attach(make("mixtral")).plan(ak.LoRA(targets="all-linear", target_parameters=EXPERTS))
    assert "experts.gate_up_proj" not in str(record[0].message)


def test_errors_name_what_to_change():
    model = make("mixtral")
    adapters = ak.attach(model)
    with pytest.raises(
        ak.TargetError, match=r"'experts\.gate_proj' matches no parameter.*did you mean 'experts\.gate_up_proj'"
    ):
        adapters.plan(ak.LoRA(targets=[], target_parameters=["experts.gate_proj"]))
    with pytest.raises(ak.TargetError, match="floating 2-D matrix or 3-D stack"):
        adapters.plan(ak.LoRA(targets=[], target_parameters=["input_layernorm.weight"]))
    with pytest.raises(ak.TargetError, match="adapt either the module or its parameters"):
        adapters.plan(ak.LoRA(targets=["q_proj"], target_parameters=["q_proj.weight"]))
    for bad in (dict(dropout=0.1), dict(dora=True), dict(init="pissa")):
        with pytest.raises(ValueError, match="target_parameters does not support"):
            ak.LoRA(target_parameters=EXPERTS, **bad)
        with pytest.raises(TypeError, match="does not support"):
            adapters.plan(ak.LoRA(targets=["experts"], **bad))
    with pytest.raises(ValueError, match="parameter names or dotted suffixes"):
        ak.LoRA(target_parameters=[3])
    # layers drops targets; nothing left is refused as before
    with pytest.raises(ak.TargetError, match="would not act on any module"):
        adapters.plan(ak.LoRA(targets=[], target_parameters=EXPERTS, layers=[5]))


def test_mixed_batch_routing_is_refused_uniform_routing_works():
    model, adapters = ours("mixtral", ak.LoRA(targets=[], target_parameters=EXPERTS))
    x = inputs(batch=2)
    expected = logits(model, x)
    with adapters.route(["a", "a"]):
        torch.testing.assert_close(logits(model, x), expected, atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="whole call"), adapters.route(["a", None]):
        model(**x)
    _assert_parameters_in_place(model)


def _assert_parameters_in_place(model: nn.Module) -> None:
    for name, module in model.named_modules():
        for p_name, p in module._parameters.items():
            assert p is None or isinstance(p, nn.Parameter), f"{name}.{p_name} left swapped"


def test_errors_and_interrupts_inside_the_forward_restore_the_parameters():
    model, adapters = ours("mixtral", ak.LoRA(targets=[], target_parameters=EXPERTS))
    x = inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = logits(model, x)
    experts = model.model.layers[1].mlp.experts

    def boom(module, args, kwargs):  # runs after our pre-hook asked for the override, before the forward
        raise KeyboardInterrupt

    handle = experts.register_forward_pre_hook(boom, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        model(**x)
    handle.remove()
    _assert_parameters_in_place(model)
    torch.testing.assert_close(logits(model, x), expected, atol=0, rtol=0)  # no stale request

    inner = experts.forward._inner
    experts.forward._inner = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("inside"))
    with pytest.raises(RuntimeError, match="inside"):
        model(**x)
    experts.forward._inner = inner
    _assert_parameters_in_place(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(logits(model, x), expected, atol=0, rtol=0)


def test_threads_keep_their_own_adapter():
    """use() scopes of concurrent threads stay separate at the swapped parameters (the module's lock)."""
    model, adapters = ours("mixtral", ak.LoRA(targets=[], target_parameters=EXPERTS))
    x = inputs()
    with adapters.use():
        base = logits(model, x)
    adapted = logits(model, x)
    errors: list[str] = []

    def run(name: str | None, expected: torch.Tensor) -> None:
        for _ in range(8):
            with adapters.use(name):
                got = logits(model, x)
            if not torch.equal(got, expected):
                errors.append(f"{name}: {(got - expected).abs().max().item()}")

    threads = [threading.Thread(target=run, args=a) for a in [(None, base), ("a", adapted)] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_detach_removes_the_forward_wrapper_and_two_adapters_stack():
    model = make("mixtral")
    x = inputs()
    base = logits(model, x)
    experts = model.model.layers[0].mlp.experts
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(targets=[], target_parameters=EXPERTS, init_weights=False))
    adapters.add("b", ak.LoRA(r=4, targets=["experts"], init_weights=False))
    assert isinstance(experts.__dict__.get("forward"), ParameterCall)
    a, b = adapters.components("a"), adapters.components("b")
    site = "model.layers.0.mlp.experts"
    # both active: W + ΔA + ΔB, i.e. the merged sum
    adapters.activate("a", "b")
    stacked = logits(model, x)
    adapters.merge("a")
    adapters.merge("b")
    with adapters.use():
        torch.testing.assert_close(logits(model, x), stacked, atol=1e-5, rtol=1e-5)
    assert a[site].merged and b[site].merged
    adapters.delete("a")
    assert isinstance(experts.__dict__.get("forward"), ParameterCall)
    adapters.detach()
    assert "forward" not in experts.__dict__
    torch.testing.assert_close(logits(model, x), base, atol=1e-6, rtol=0)


def test_native_save_load_keeps_per_expert_layout(tmp_path):
    from safetensors.torch import load_file

    model, adapters = ours("qwen2_moe", ak.LoRA(targets=["experts"]))
    adapters.save("a", tmp_path / "a")
    keys = {k: tuple(v.shape) for k, v in load_file(tmp_path / "a" / "adapter.safetensors").items()}
    assert keys["model.layers.0.mlp.experts.lora_A.gate_up_proj"] == (4, 2, 32)  # (E, r, in)
    assert keys["model.layers.0.mlp.experts.lora_B.gate_up_proj"] == (4, 48, 2)  # (E, out, r)
    assert keys["model.layers.0.mlp.experts.lora_A.down_proj"] == (4, 2, 24)


def test_exclude_and_layers_apply_to_parameter_targets():
    adapters = ak.attach(make("mixtral"))
    sites = adapters.plan(ak.LoRA(targets=[], target_parameters=EXPERTS, exclude=["layers.0.mlp.experts"])).sites
    assert sites == ["model.layers.1.mlp.experts"]
    assert adapters.plan(ak.LoRA(targets=[], target_parameters=EXPERTS, layers=[0])).sites == [
        "model.layers.0.mlp.experts"
    ]


def test_all_linear_warning_leaves_out_what_target_parameters_names():
    import warnings

    from adapterkit.targeting import base_modules, select

    model = make("mixtral")
    kw = {"family": None, "roles": {}, "modules": base_modules(model)}
    with pytest.warns(UntargetedParametersWarning, match=r"leaves out 2 .*mlp\.gate\.weight") as record:
        select(model, ["all-linear"], parameters=EXPERTS, **kw)
    assert "experts" not in str(record[0].message).split(":", 1)[1].split(". LoRA")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select(model, ["all-linear"], parameters=[*EXPERTS, "gate.weight"], **kw)


def test_gradient_checkpointing_recomputes_with_the_adapter():
    """Recomputation in backward calls the experts again: the same request/override path, the same gradients."""

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model, adapters = ours("mixtral", ak.LoRA(targets=[], target_parameters=EXPERTS))
        adapters.train("a")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        x = inputs()
        model(**x, labels=x["input_ids"]).loss.backward()
        _assert_parameters_in_place(model)
        return [p.grad for p in adapters.parameters("a")]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_target_parameters_alone_adapt_no_module_as_peft():
    from peft import LoraConfig, get_peft_model

    reference = get_peft_model(make("mixtral"), LoraConfig(r=2, target_parameters=["experts.gate_up_proj"]))
    wrapped = sorted(
        {
            n.split(".lora_A")[0][len("base_model.model.") :]
            for n, _ in reference.named_parameters()
            if ".lora_A" in n
        }
    )
    assert (
        ak.attach(make("mixtral")).plan(ak.LoRA(r=2, target_parameters=["experts.gate_up_proj"])).sites == wrapped
    )


def test_module_selectors_that_name_parameters_say_how_to_reach_them():
    adapters = ak.attach(make("mixtral"))
    with pytest.raises(
        ak.TargetError, match=r"names the parameter .*gate_up_proj.*target_parameters=\['experts\.gate_up_proj'\]"
    ):
        adapters.plan(ak.LoRA(targets=["gate_up_proj"]))
    # transformers 4 names of Mixtral's experts (w1/w2/w3) match no module here
    with pytest.raises(ak.TargetError, match=r"MoE experts are 3-D parameters.*target_parameters=\["):
        adapters.plan(ak.LoRA(targets=["w1", "w2"]))
