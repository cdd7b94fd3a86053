"""LLaMA-Adapter (``ak.LlamaAdapter``): peft equivalence, other families through roles, generation, errors.

* peft (0.21) ``AdaptionPromptConfig`` equivalence on tiny LLaMA and Mistral (grouped-query attention: 2 key/value
  heads for 4 query heads), float32 logits within 1e-5 on the same perturbed prompts and non-zero gates, with a
  left-padded row; peft's ``save_pretrained`` directories load with equal logits and our exports load in
  ``PeftModel.from_pretrained`` with equal logits.
* Families peft lacks (Qwen2, Qwen3 with q/k norms, Gemma, Gemma 2 with its own score scale, Phi-3 with a fused
  q/k/v projection and partial rotary): logits equal an independent reference built from the query the
  attention itself computes (captured inside the attention function), not from our recomputation.
* ``generate()`` (greedy) with a KV cache equals ``generate(use_cache=False)`` on every family, and peft's on LLaMA.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.formats import AdapterFileError
from adapterkit.methods.llama_adapter import AdaptionPrompt
from adapterkit.targeting import TargetError

from conftest import make_inputs, make_model

peft = pytest.importorskip("peft")
from peft import AdaptionPromptConfig, PeftModel, get_peft_model  # noqa: E402

warnings.filterwarnings("ignore", module="peft")
TOL = {"atol": 1e-5, "rtol": 1e-5}

_COMMON = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),  # per-head q_norm / k_norm
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "query_pre_attn_scalar": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.5}),  # fused qkv_proj
    # sliding-window layers with their own rotary embedding, per-head q/k norms
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 8, "query_pre_attn_scalar": 16, "sliding_window": 4},
    ),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),  # q/k norms over all heads
}


def tiny(family: str, seed: int = 0) -> nn.Module:
    """A 3-layer causal LM of ``family`` (4 query heads, 2 key/value heads, head size 8)."""
    import transformers

    config_cls, model_cls, extra = _FAMILIES[family]
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**_COMMON, **extra)).eval()


def inputs() -> dict[str, torch.Tensor]:
    x = make_inputs("llama")
    x["attention_mask"][1, :2] = 0  # a left-padded row
    return x


@torch.no_grad()
def logits(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**x).logits


@torch.no_grad()
def perturb(adapters: ak.Adapters, name: str, seed: int = 7) -> None:
    """Random prompts and gates well away from zero."""
    g = torch.Generator().manual_seed(seed)
    for p in adapters.parameters(name):
        p.copy_(torch.randn(p.shape, generator=g) + (0.5 if p.dim() == 1 else 0.0))


def copy_to_peft(adapters: ak.Adapters, name: str, pm: nn.Module) -> None:
    state = pm.state_dict()
    with torch.no_grad():
        for site, comp in adapters.components(name).items():
            state[f"base_model.model.{site}.adaption_prompt"].copy_(comp.adaption_prompt)
            state[f"base_model.model.{site}.adaption_gate"].copy_(comp.adaption_gate)


# --- peft equivalence ----------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "layers"), [("llama", 3), ("mistral", 1)])
def test_logits_equal_peft(family, layers):
    model, x = tiny(family), inputs()
    base = logits(model, x)
    adapters = ak.attach(model)
    adapters.add("a", ak.LlamaAdapter(adapter_len=4, adapter_layers=layers))
    assert torch.equal(logits(model, x), base)  # zero gates: the base model exactly
    perturb(adapters, "a")
    pm = get_peft_model(tiny(family), AdaptionPromptConfig(adapter_len=4, adapter_layers=layers)).eval()
    copy_to_peft(adapters, "a", pm)
    ours = logits(model, x)
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, logits(pm, x), **TOL)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_peft_directory_loads(family, tmp_path):
    pm = get_peft_model(tiny(family), AdaptionPromptConfig(adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM"))
    pm.eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "adaption_" in n:
                p.normal_(generator=torch.Generator().manual_seed(len(n)))
    pm.save_pretrained(tmp_path)
    model, x = tiny(family), inputs()
    adapters = ak.attach(model)
    assert adapters.load(tmp_path, name="p") == "p"
    assert adapters.config("p") == ak.LlamaAdapter(adapter_len=3, adapter_layers=2)
    assert list(adapters.sites("p")) == ["model.layers.1.self_attn", "model.layers.2.self_attn"]
    torch.testing.assert_close(logits(model, x), logits(pm, x), **TOL)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_export_loads_in_peft(family, tmp_path):
    model, x = tiny(family), inputs()
    adapters = ak.attach(model)
    adapters.add("a", ak.LlamaAdapter(adapter_len=5, adapter_layers=2))
    perturb(adapters, "a")
    adapters.export("a", tmp_path, format="peft")
    pm = PeftModel.from_pretrained(tiny(family), tmp_path).eval()
    torch.testing.assert_close(logits(pm, x), logits(model, x), **TOL)
    again = ak.attach(tiny(family))  # and back
    again.load(tmp_path, name="b")
    torch.testing.assert_close(logits(again.model, x), logits(model, x), atol=0, rtol=0)


def test_generate_equals_peft():
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.LlamaAdapter(adapter_len=3, adapter_layers=2))
    perturb(adapters, "a")
    pm = get_peft_model(make_model("llama"), AdaptionPromptConfig(adapter_len=3, adapter_layers=2)).eval()
    copy_to_peft(adapters, "a", pm)
    kw = {**make_inputs("llama"), "max_new_tokens": 8, "do_sample": False}
    ours = model.generate(**kw)
    assert ours.tolist() == pm.generate(**kw).tolist()
    with adapters.use():
        assert model.generate(**kw).tolist() != ours.tolist()  # the adapter changed what is generated


# --- other families, through roles ---------------------------------------------------------------
def _attention_functions():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS


@torch.no_grad()
def reference_logits(family: str, adapters: ak.Adapters, name: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """The adapted model computed independently: a fresh copy of the base whose attention function records the
    query each layer really uses (after its norm and rotary embedding), and forward hooks that add
    ``W_o(g · softmax(q K_pᵀ · scale) V_p)`` with ``K_p``, ``V_p`` projected here from the prompt by the layer's
    own weights (split by hand for a fused projection; the key norm where the layer has one)."""
    import sys

    model = tiny(family)
    impl = model.config._attn_implementation
    # eager attention is the modeling module's own function (looked up as a global at call time), else the table's
    table = sys.modules[type(model).__module__].__dict__ if impl == "eager" else _attention_functions()
    key = "eager_attention_forward" if impl == "eager" else impl
    inner = table[key]
    queries: dict[int, torch.Tensor] = {}

    def capture(module, query, key, value, attention_mask, **kw):
        queries[id(module)] = query
        return inner(module, query, key, value, attention_mask, **kw)

    modules = dict(model.named_modules())
    handles = []
    for site, comp in adapters.components(name).items():
        attn = modules[site]
        prompt, gate = comp.adaption_prompt, comp.adaption_gate

        def hook(module, args, output, prompt=prompt, gate=gate):
            cfg = module.config
            hd, h, kvh = module.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
            if hasattr(module, "qkv_proj"):
                w = module.qkv_proj.weight
                k = prompt @ w[h * hd : (h + kvh) * hd].T
                v = prompt @ w[(h + kvh) * hd :].T
            else:
                k, v = module.k_proj(prompt), module.v_proj(prompt)
            k, v = k.view(1, -1, kvh, hd), v.view(1, -1, kvh, hd)
            if hasattr(module, "k_norm"):  # per head (Qwen3, Gemma 3) or over all heads (OLMo 2)
                per_head = module.k_norm.weight.numel() == hd
                k = module.k_norm(k) if per_head else module.k_norm(k.flatten(2)).view(k.shape)
            k = k.transpose(1, 2).repeat_interleave(h // kvh, 1)
            v = v.transpose(1, 2).repeat_interleave(h // kvh, 1)
            q = queries[id(module)]
            s = q @ k.transpose(2, 3) * module.scaling
            cap = getattr(module, "attn_logit_softcapping", None)
            if cap:
                s = torch.tanh(s / cap) * cap
            a = gate * F.softmax(s, dim=-1) @ v
            delta = a.transpose(1, 2).flatten(2) @ module.o_proj.weight.T
            return (output[0] + delta, *output[1:])

        handles.append(attn.register_forward_hook(hook))
    table[key] = capture
    try:
        return logits(model, x)
    finally:
        table[key] = inner
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_families_equal_reference(family):
    """Qwen2/3, Gemma 1/2/3, Phi-3, OLMo 2 (and LLaMA/Mistral): the query is the one the layer uses (its norm, its
    rotary embedding, partial or not), the rest as peft."""
    model, x = tiny(family), inputs()
    base = logits(model, x)
    adapters = ak.attach(model)
    adapters.add("a", ak.LlamaAdapter(adapter_len=3, adapter_layers=2))
    assert torch.equal(logits(model, x), base)
    perturb(adapters, "a")
    ours = logits(model, x)
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, reference_logits(family, adapters, "a", x), **TOL)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3"])
def test_generate_with_cache_equals_without(family):
    """Rotary queries at each cached step (LLaMA), q/k norms (Qwen3), soft-capped scores (Gemma 2), fused q/k/v
    with partial rotary (Phi-3); Mistral, Qwen2 and Gemma take LLaMA's path."""
    model = tiny(family)
    adapters = ak.attach(model)
    adapters.add("a", ak.LlamaAdapter(adapter_len=3, adapter_layers=2, gate="head"))
    perturb(adapters, "a")
    kw = {**inputs(), "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(**kw)
    assert torch.equal(model.generate(**kw, use_cache=False), cached)
    with adapters.use():
        assert not torch.equal(model.generate(**kw), cached)


def test_grouped_query_attention_repeats_heads():
    """The 2 key/value heads of the prompt serve query heads (0, 1) and (2, 3), as transformers' repeat_kv."""
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.LlamaAdapter(adapter_len=3, adapter_layers=1))
    (comp,) = adapters.components("a").values()
    assert (comp.layout.heads, comp.layout.kv_heads) == (4, 2)
    k, v = comp.prompt_kv(comp.adaption_prompt)
    assert k.shape == v.shape == (1, 4, 3, 8)
    assert torch.equal(k[:, 0], k[:, 1]) and torch.equal(k[:, 2], k[:, 3]) and not torch.equal(k[:, 0], k[:, 2])


# --- training ------------------------------------------------------------------------------------
def test_training_moves_gate_then_prompt():
    """Zero-init attention: the first step's gradient reaches the gate only (the prompt's passes through it)."""
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.LlamaAdapter(adapter_len=3, adapter_layers=2))
    adapters.train("a")
    x = make_inputs("llama")
    opt = torch.optim.SGD(adapters.parameters("a"), lr=0.5)
    losses = []
    for _ in range(4):
        loss = model(**x, labels=x["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        if not losses:
            comps = list(adapters.components("a").values())
            assert all(c.adaption_gate.grad.abs().sum() > 0 for c in comps)
            assert all(c.adaption_prompt.grad.abs().sum() == 0 for c in comps)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if "ak_adapters" not in n)


def test_bfloat16_base_keeps_float32_adapter():
    model = make_model("llama").to(torch.bfloat16)
    adapters = ak.attach(model)
    adapters.add("a", ak.LlamaAdapter(adapter_len=3, init_weights=False))
    assert all(p.dtype == torch.float32 for p in adapters.parameters("a"))
    out = model(**make_inputs("llama")).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_routed_rows_with_lora_on_key_projection():
    """Another method on k_proj is routed per row: the prompt's keys are projected for every row."""
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("la", ak.LlamaAdapter(adapter_len=3, init_weights=False))
    adapters.add("lora", ak.LoRA(targets=["attn.k"], init_weights=False))
    x = make_inputs("llama", batch=3)
    rows = ["la", "lora", None]
    with adapters.route(rows):
        mixed = logits(model, x)
    for i, name in enumerate(rows):
        with adapters.use(name):
            torch.testing.assert_close(
                mixed[i : i + 1], logits(model, {k: v[i : i + 1] for k, v in x.items()}), **TOL
            )
    with adapters.use(ak.Stack("lora", "la")):
        stacked = logits(model, x)  # the prompt's keys go through the LoRA on k_proj too
    assert torch.isfinite(stacked).all()


# --- errors --------------------------------------------------------------------------------------
def test_too_many_layers_is_refused():
    adapters = ak.attach(make_model("llama"))
    with pytest.raises(ValueError, match=r"adapter_layers=3.*2 targeted attention layers.*adapter_layers <= 2"):
        adapters.add("a", ak.LlamaAdapter(adapter_layers=3))
    assert adapters.names == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("adapter_len", 0), ("adapter_layers", 0), ("gate", "token"), ("adapter_len", 2.5), ("project_output", 1)],
)
def test_bad_config_values(field, value):
    with pytest.raises(ValueError, match=field):
        ak.LlamaAdapter(**{field: value})


def test_model_without_attention_roles_names_alternatives():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    adapters = ak.attach(model)
    with pytest.raises(TargetError, match=r"no attention roles.*ak\.PrefixTuning\(\).*ak\.LoRA\(\)"):
        adapters.add("a", ak.LlamaAdapter())


def test_encoder_decoder_is_refused():
    adapters = ak.attach(make_model("t5"))
    with pytest.raises(TargetError, match=r"encoder-decoder.*ak\.PrefixTuning\(\)"):
        adapters.add("a", ak.LlamaAdapter())


def test_not_an_attention_module_is_refused():
    adapters = ak.attach(make_model("llama"))
    with pytest.raises(TargetError, match=r"query, key and value projections of 'model\.layers\.0\.mlp'"):
        adapters.add("a", ak.LlamaAdapter(targets=["ffn"]))


def test_merge_is_refused():
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.LlamaAdapter(init_weights=False))
    with pytest.raises(TypeError, match="cannot be merged"):
        adapters.merge("a")


def test_peft_export_refusals(tmp_path):
    adapters = ak.attach(make_model("llama"))
    adapters.add("head", ak.LlamaAdapter(gate="head"))
    with pytest.raises(ValueError, match="one gate per head"):
        adapters.export("head", tmp_path / "h", format="peft")
    adapters.add("low", ak.LlamaAdapter(layers=[0]))
    with pytest.raises(ValueError, match="top adapter_layers=1"):
        adapters.export("low", tmp_path / "l", format="peft")
    qwen = ak.attach(tiny("qwen2"))
    qwen.add("a", ak.LlamaAdapter())
    with pytest.raises(ValueError, match="not 'qwen2'.*format='native'"):
        qwen.export("a", tmp_path / "q", format="peft")
    biased = ak.attach(tiny_llama_with_bias())
    biased.add("a", ak.LlamaAdapter())
    with pytest.raises(ValueError, match="bias"):
        biased.export("a", tmp_path / "b", format="peft")


def tiny_llama_with_bias() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**_COMMON, attention_bias=True)).eval()


def test_peft_gpt2_both_ways(tmp_path):
    """peft's GPT-2 path adds the result without c_proj: its files load as project_output=False, equal logits."""
    x = make_inputs("gpt2")
    x["attention_mask"][1, :2] = 0
    pm = get_peft_model(make_model("gpt2"), AdaptionPromptConfig(adapter_len=3, adapter_layers=2)).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "adaption_" in n:
                p.normal_(generator=torch.Generator().manual_seed(len(n)))
    pm.save_pretrained(tmp_path / "peft")
    adapters = ak.attach(make_model("gpt2"))
    adapters.load(tmp_path / "peft", name="p")
    assert adapters.config("p") == ak.LlamaAdapter(adapter_len=3, adapter_layers=2, project_output=False)
    ours = logits(adapters.model, x)
    torch.testing.assert_close(ours, logits(pm, x), **TOL)
    adapters.export("p", tmp_path / "ours", format="peft")
    back = PeftModel.from_pretrained(make_model("gpt2"), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, x), ours, **TOL)
    adapters.add("projected", ak.LlamaAdapter(adapter_len=3))
    with pytest.raises(ValueError, match="project_output=True"):
        adapters.export("projected", tmp_path / "no", format="peft")


def test_routed_rows_mix_projected_and_unprojected():
    model = make_model("gpt2")
    adapters = ak.attach(model)
    adapters.add("a", ak.LlamaAdapter(adapter_len=3, init_weights=False))
    adapters.add("b", ak.LlamaAdapter(adapter_len=2, init_weights=False, project_output=False))
    x = make_inputs("gpt2", batch=3)
    rows = ["b", "a", None]
    with adapters.route(rows):
        mixed = logits(model, x)
    for i, name in enumerate(rows):
        with adapters.use(name):
            torch.testing.assert_close(
                mixed[i : i + 1], logits(model, {k: v[i : i + 1] for k, v in x.items()}), **TOL
            )


def test_peft_file_for_another_depth_is_refused(tmp_path):
    pm = get_peft_model(tiny("llama"), AdaptionPromptConfig(adapter_len=2, adapter_layers=3))
    pm.save_pretrained(tmp_path)
    adapters = ak.attach(make_model("llama"))  # 2 layers
    with pytest.raises(AdapterFileError):
        adapters.load(tmp_path)
    assert adapters.names == []


def test_bias_of_output_projection_is_left_out():
    """With an o_proj bias the adapter is still the identity at a zero gate (peft would add the bias)."""
    model, x = tiny_llama_with_bias(), inputs()
    base = logits(model, x)
    adapters = ak.attach(model)
    adapters.add("a", ak.LlamaAdapter(adapter_len=2))
    assert torch.equal(logits(model, x), base)


def test_scale_is_the_modules_own():
    model = tiny("gemma2")
    adapters = ak.attach(model)
    adapters.add("a", ak.LlamaAdapter(adapter_len=2, adapter_layers=1))
    (comp,) = adapters.components("a").values()
    assert isinstance(comp, AdaptionPrompt)
    assert math.isclose(comp.layout.scaling, 16**-0.5)
    assert comp.layout.softcap == model.config.attn_logit_softcapping


def test_routed_generate_equals_per_row_runs():
    """Rows of one generate() use different adapters (different prompt lengths, per-layer and per-head gates)."""
    model = tiny("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.LlamaAdapter(adapter_len=3, adapter_layers=2))
    adapters.add("b", ak.LlamaAdapter(adapter_len=2, gate="head"))
    perturb(adapters, "a")
    perturb(adapters, "b", seed=8)
    x = make_inputs("llama", batch=3)
    rows = ["b", None, "a"]
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with adapters.route(rows):
        mixed = model.generate(**x, **kw)
    for i, name in enumerate(rows):
        with adapters.use(name):
            alone = model.generate(**{k: v[i : i + 1] for k, v in x.items()}, **kw)
        assert mixed[i].tolist() == alone[0].tolist()


def test_deepcopy_keeps_a_working_adapter():
    import copy

    model, x = make_model("llama"), make_inputs("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.LlamaAdapter(adapter_len=3, init_weights=False))
    twin = copy.deepcopy(model)
    torch.testing.assert_close(logits(twin, x), logits(model, x), atol=0, rtol=0)
    comp = next(iter(ak.attach(twin).components("a").values()))
    twin_modules = {id(m) for m in twin.modules()}
    assert id(comp.layout.q) in twin_modules and id(comp.layout.out) in twin_modules
