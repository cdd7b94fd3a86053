"""Quantized bases (``adapterkit.quant``): NF4 and int8 through bitsandbytes and torchao.

LoRA trains on NF4/int8 bases of tiny LLaMA and BERT models, matches peft's QLoRA on the same quantized
weights, merges with bounded requantization error, unmerges to the exact original codes, merges into a
dense model (``merge_and_detach(dtype=...)``), and adapters trained on a quantized base load onto the
dense base. Each backend's tests skip when its package is missing.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.backends import backend_for
from adapterkit.quant import MergeError, is_quantized
from adapterkit.targeting import CONTAINER

from conftest import make_inputs, output_of

HAS = {name: importlib.util.find_spec(name) is not None for name in ("bitsandbytes", "torchao")}


def _skip_unless(backend: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not HAS[backend], reason=f"{backend} is not installed (pip install 'adapterkit[quant]')"
    )


def _combo(backend: str, scheme: str) -> pytest.param:
    return pytest.param(backend, scheme, id=f"{backend}-{scheme}", marks=_skip_unless(backend))


COMBOS = [_combo(b, s) for b in ("bitsandbytes", "torchao") for s in ("nf4", "int8")]
BNB = [_combo("bitsandbytes", s) for s in ("nf4", "int8")]

# largest |quantized - dense| output seen on the tiny models is ~0.06 (NF4) / ~0.002 (int8)
OUTPUT_ATOL = {"nf4": 0.15, "int8": 0.01}
HEADS = {"llama": "lm_head", "bert": "classifier"}


# --- helpers -----------------------------------------------------------------------------------------------
def make_model(family: str, seed: int = 0) -> nn.Module:
    """Tiny LLaMA / BERT (as conftest's) with hidden size 64: bitsandbytes 0.50 dequantizes NF4 wrongly on CPU
    when a layer's in_features is not a multiple of its block size (64), so conftest's hidden 32 won't do."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
        return LlamaForCausalLM(cfg).eval()
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=3)  # fmt: skip
    return BertForSequenceClassification(cfg).eval()


def quantized(family: str, backend: str, scheme: str, seed: int = 0) -> nn.Module:
    return ak.quantize(make_model(family, seed), scheme, backend)


def labels_for(family: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return inputs["input_ids"] if family == "llama" else torch.tensor([0, 2])


def codes(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Copies of every quantized module's stored tensors (codes and scales), by module name."""
    out = {}
    for name, module in model.named_modules():
        if CONTAINER in name or not is_quantized(module):
            continue
        w = module.weight
        if hasattr(w, "quantized_data"):  # torchao NF4Tensor (its clone() requantizes: copy the parts)
            parts = [w.quantized_data, w.quantized_scalers, w.quantization_factor, w.scaler_mean]
        elif hasattr(w, "qdata"):  # torchao Int8Tensor
            parts = [w.qdata, w.scale]
        else:  # bitsandbytes: weight codes plus the quantization state as serialized
            parts = [v for k, v in module.state_dict().items() if CONTAINER not in k]
        out[name] = [p.detach().clone() for p in parts]
    return out


def same_codes(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]]) -> bool:
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in a
    )


def train_steps(model: nn.Module, params: list[torch.Tensor], inputs, labels, steps: int = 3) -> list[float]:
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


# --- quantize ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize(("backend", "scheme"), COMBOS)
def test_quantize_converts_every_linear_but_the_heads(family, backend, scheme):
    dense = make_model(family)
    inputs = make_inputs(family)
    names = {n for n, _ in dense.named_parameters()}
    model = quantized(family, backend, scheme)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert type(linears[HEADS[family]]) is nn.Linear and not is_quantized(linears[HEADS[family]])
    assert all(is_quantized(m) for n, m in linears.items() if n != HEADS[family])
    assert {n for n, _ in model.named_parameters()} == names  # the base's names do not change
    if backend == "bitsandbytes":  # marked as transformers marks the models it loads (peft relies on it)
        assert getattr(model, "is_loaded_in_4bit" if scheme == "nf4" else "is_loaded_in_8bit") is True
    with torch.no_grad():
        torch.testing.assert_close(
            output_of(model, inputs), output_of(dense, inputs), atol=OUTPUT_ATOL[scheme], rtol=0
        )


@pytest.mark.parametrize(("backend", "scheme"), COMBOS)
def test_lora_trains_on_a_quantized_base(backend, scheme):
    for family in ("llama", "bert"):
        model = quantized(family, backend, scheme)
        inputs = make_inputs(family)
        before = codes(model)
        adapters = ak.attach(model)
        adapters.add("a", ak.LoRA(r=4, alpha=8, targets="all-linear"))
        ak.prepare_for_kbit_training(model)
        adapters.train("a")
        params = list(adapters.parameters("a"))
        assert all(p.dtype == torch.float32 for p in params)
        assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
        model.train()
        model(**inputs, labels=labels_for(family, inputs)).loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        assert all(c.lora_B.grad.abs().sum() > 0 for c in adapters.components("a").values())  # B = 0 at init
        for p in params:
            p.grad = None
        losses = train_steps(model, params, inputs, labels_for(family, inputs))
        assert losses[-1] < losses[0], (family, losses)
        assert same_codes(codes(model), before)  # the base never changes


# --- against peft's QLoRA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("backend", "scheme"), BNB)
def test_matches_peft_qlora_on_the_same_quantized_weights(backend, scheme):
    peft = pytest.importorskip("peft")
    inputs = make_inputs("llama")
    labels = inputs["input_ids"]
    ours, theirs = quantized("llama", backend, scheme), quantized("llama", backend, scheme)
    assert same_codes(codes(ours), codes(theirs))  # quantization is deterministic: the same weights

    adapters = ak.attach(ours)
    torch.manual_seed(0)
    adapters.add("a", ak.LoRA(r=4, alpha=8, targets=["attn.q", "attn.v", "ffn.down"], init_weights=False))
    ak.prepare_for_kbit_training(ours, gradient_checkpointing=False)
    adapters.train("a")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = peft.prepare_model_for_kbit_training(theirs, use_gradient_checkpointing=False)
    theirs = peft.get_peft_model(theirs, cfg)
    assert (
        "bnb" in type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__
    )  # peft's QLoRA layers
    pairs = []
    with torch.no_grad():
        for name, comp in adapters.components("a").items():
            layer = theirs.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(comp.lora_A)
            layer.lora_B["default"].weight.copy_(comp.lora_B)
            pairs += [(comp.lora_A, layer.lora_A["default"].weight), (comp.lora_B, layer.lora_B["default"].weight)]
        torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=1e-5, rtol=0)

    ours_losses = train_steps(ours, list(adapters.parameters("a")), inputs, labels)
    peft_losses = train_steps(theirs, [p for p in theirs.parameters() if p.requires_grad], inputs, labels)
    assert ours_losses == pytest.approx(peft_losses, abs=1e-5)
    for mine, peft_p in pairs:
        torch.testing.assert_close(mine, peft_p, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), atol=1e-5, rtol=0)


# --- merging --------------------------------------------------------------------------------------------------
NF4_HALF_GAP = (1.0 - 0.6961928009986877) / 2  # widest gap between NF4 levels (-1 and -0.696), halved


def _error_bound(module: nn.Module, target: torch.Tensor) -> torch.Tensor:
    """Elementwise bound of ``|requantized - target|``: half a quantization step of the block's scale."""
    out, inp = target.shape
    w = module.weight
    if hasattr(w, "quantized_data") or hasattr(w, "quant_state"):  # NF4, blocks of 64 along the flattened weight
        blocks = target.reshape(-1, 64)
        # the block absmax is itself quantized to 8 bits (double quantization): 3% of it on top (seen: 1.7%)
        bound = (NF4_HALF_GAP + 0.03) * blocks.abs().amax(dim=1, keepdim=True)
        return bound.expand_as(blocks).reshape(out, inp) + 1e-6
    row_max = target.abs().amax(dim=1, keepdim=True)  # int8: one absmax per output row
    rounding = target.abs() * 2.0**-10 if hasattr(w, "SCB") else 0.0  # bitsandbytes quantizes via float16
    return 0.5 * row_max / 127 * 1.001 + rounding + 1e-6


@pytest.mark.parametrize(("backend", "scheme"), COMBOS)
def test_merge_error_is_bounded_and_reported(backend, scheme):
    model = quantized("llama", backend, scheme)
    inputs = make_inputs("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=4, alpha=8, targets="all-linear", init_weights=False))
    model.eval()
    with torch.no_grad():
        unmerged = output_of(model, inputs)
    targets = {}
    for name, comp in adapters.components("a").items():
        module = model.get_submodule(name)
        backend_ = backend_for(module)
        targets[name] = (backend_.read(module) + comp.delta_weight(module).float(), comp.delta_weight(module))
    adapters.merge("a")
    report = ak.merge_error(model)
    assert set(report.modules) == set(targets)
    for name, (target, delta) in targets.items():
        module = model.get_submodule(name)
        err = backend_for(module).read(module) - target
        assert (err.abs() <= _error_bound(module, target)).all(), name
        got = report.modules[name]
        assert isinstance(got, MergeError) and got.writes == 1
        assert got.max_abs == pytest.approx(err.abs().max().item(), rel=1e-5)
        assert got.rel_delta == pytest.approx((err.norm() / delta.norm()).item(), rel=1e-4)
    with torch.no_grad():
        merged = output_of(model, inputs)
    assert (merged - unmerged).abs().max() < OUTPUT_ATOL[scheme] * 2
    assert "max |err|" in str(report)


@pytest.mark.parametrize(("backend", "scheme"), COMBOS)
def test_unmerge_restores_the_exact_quantized_weights(backend, scheme):
    model = quantized("llama", backend, scheme)
    adapters = ak.attach(model)
    for i, name in enumerate("abc"):
        torch.manual_seed(i)
        adapters.add(name, ak.LoRA(r=4, alpha=8, targets=["attn.q", "attn.v", "ffn.down"], init_weights=False))
    original = codes(model)

    # last in, first out: every intermediate state comes back exactly
    adapters.merge("a")
    after_a = codes(model)
    assert not same_codes(after_a, original)
    adapters.merge("b")
    adapters.unmerge("b")
    assert same_codes(codes(model), after_a)
    adapters.unmerge("a")
    assert same_codes(codes(model), original)
    assert not ak.merge_error(model).modules

    # out of order: approximate while others stay merged, exact once none is
    adapters.merge("a")
    adapters.merge("b")
    adapters.merge("c")
    adapters.unmerge("a")
    adapters.unmerge("c")
    adapters.unmerge("b")
    assert same_codes(codes(model), original)

    # delete and detach while merged also give the original codes back
    adapters.merge("c")
    adapters.delete("c")
    assert same_codes(codes(model), original)
    adapters.merge("a")
    adapters.detach()
    assert same_codes(codes(model), original)
    assert all(not k.startswith("_adapterkit") for m in model.modules() for k in m.__dict__)


def test_unmerging_by_arithmetic_would_not_restore_the_codes():
    """Why the original codes are kept: Q(deq(Q(deq(W) + dW)) - dW) != W (peft issue 2501)."""
    pytest.importorskip("bitsandbytes")
    model = quantized("llama", "bitsandbytes", "nf4")
    module = model.get_submodule("model.layers.0.self_attn.q_proj")
    backend = backend_for(module)
    w0 = backend.read(module)
    delta = 0.02 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(0))
    backend.requantize(module, w0 + delta)
    backend.requantize(module, backend.read(module) - delta)
    assert not torch.equal(backend.read(module), w0)


@pytest.mark.parametrize(
    ("backend", "scheme", "dtype"),
    [pytest.param(*c.values, torch.float32, id=f"{c.id}-fp32", marks=c.marks) for c in COMBOS]
    + [pytest.param(*c.values, torch.bfloat16, id=f"{c.id}-bf16", marks=c.marks) for c in COMBOS[:1]],
)
def test_merge_and_detach_to_a_dense_model(backend, scheme, dtype):
    model = quantized("llama", backend, scheme)
    inputs = make_inputs("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=4, alpha=8, targets="all-linear", init_weights=False))
    adapters.add("b", ak.LoRA(r=2, targets=["attn.q"], init_weights=False))
    model.train()  # bitsandbytes int8 quantizes activations in eval mode; in train mode both sides are dense
    with torch.no_grad():
        expected = output_of(model, inputs)  # "a" only
    adapters.merge("b")  # a merged (requantized) adapter that is not kept is first unmerged exactly
    dense = adapters.merge_and_detach(["a"], dtype=dtype)
    assert dense is model and not any(is_quantized(m) for m in dense.modules())
    assert all(type(m) is nn.Linear for n, m in dense.named_modules() if n.endswith(("_proj", "lm_head")))
    assert all(p.dtype == dtype for p in dense.parameters())
    assert not any(CONTAINER in n for n, _ in dense.named_modules())
    with torch.no_grad():
        got = output_of(dense, inputs).float()
    atol = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


# --- files -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("backend", "scheme"), COMBOS)
def test_adapter_trained_on_a_quantized_base_loads_onto_the_dense_base(backend, scheme, tmp_path):
    inputs = make_inputs("llama")
    model = quantized("llama", backend, scheme)
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=4, alpha=8, targets="all-linear"))
    ak.prepare_for_kbit_training(model, gradient_checkpointing=False)
    adapters.train("a")
    train_steps(model, list(adapters.parameters("a")), inputs, inputs["input_ids"])
    adapters.save("a", tmp_path / "a")
    trained = {k: v.clone() for k, v in model.state_dict().items() if CONTAINER in k}
    with torch.no_grad():
        on_quantized = output_of(model, inputs)

    dense = make_model("llama")
    dense_adapters = ak.attach(dense)
    assert dense_adapters.load(tmp_path / "a") == "a"
    loaded = {k: v for k, v in dense.state_dict().items() if CONTAINER in k}
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    with torch.no_grad():
        on_dense = output_of(dense, inputs)
    torch.testing.assert_close(on_dense, on_quantized, atol=OUTPUT_ATOL[scheme], rtol=0)

    again = ak.attach(quantized("llama", backend, scheme))  # and back onto a quantized base
    again.load(tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(output_of(again.model, inputs), on_quantized, atol=1e-6, rtol=0)


# --- models that transformers quantized ---------------------------------------------------------------------------
def _transformers_quantized(tmp_path, kind: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TorchAoConfig

    make_model("llama").save_pretrained(tmp_path / "dense")
    if kind == "bnb-nf4":
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    elif kind == "bnb-int8":
        qcfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        from torchao.quantization import Int8WeightOnlyConfig

        qcfg = TorchAoConfig(Int8WeightOnlyConfig(set_inductor_config=False))
    return AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=qcfg, device_map="cpu")


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("bnb-nf4", marks=_skip_unless("bitsandbytes")),
        pytest.param("bnb-int8", marks=_skip_unless("bitsandbytes")),
        pytest.param("torchao-int8", marks=_skip_unless("torchao")),
    ],
)
def test_models_quantized_by_transformers(kind, tmp_path):
    model = _transformers_quantized(tmp_path, kind)
    inputs = make_inputs("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=4, alpha=8, targets="all-linear"))
    assert len(adapters.sites("a")) == 14  # 7 projections x 2 layers, lm_head excepted
    ak.prepare_for_kbit_training(model)  # also disables bitsandbytes' CPU repacking (tiny shapes break it)
    adapters.train("a")
    losses = train_steps(model, list(adapters.parameters("a")), inputs, inputs["input_ids"])
    assert losses[-1] < losses[0]
    original = codes(model)
    adapters.merge("a")
    assert ak.merge_error(model).modules
    adapters.unmerge("a")
    assert same_codes(codes(model), original)
    dense = adapters.merge_and_detach(dtype=torch.float32)
    assert not any(is_quantized(m) for m in dense.modules())
    assert not getattr(dense, "is_quantized", False) and getattr(dense, "hf_quantizer", None) is None


# --- every method trains on a quantized base -----------------------------------------------------------------
def _matrix_rows() -> list:
    """LLaMA and BERT rows of the contract matrix: the first of each (method, family), DoRA and PiSSA by
    default, the others marked slow."""
    from test_contract import MATRIX

    seen, out = set(), []
    for row, family, config in MATRIX:
        if family not in ("llama", "bert"):
            continue
        quick = (config.method, family) not in seen or row in ("llama-dora", "llama-pissa")
        seen.add((config.method, family))
        out.append(pytest.param(config, family, id=row, marks=() if quick else pytest.mark.slow))
    return out


# methods that change individual base weights refuse packed (quantized) ones at add(), naming the fix
DENSE_ONLY = {"sparse_delta", "diff_pruning"}


@pytest.mark.skipif(not HAS["bitsandbytes"], reason="bitsandbytes is not installed")
@pytest.mark.parametrize(("config", "family"), _matrix_rows())
def test_every_method_trains_on_an_nf4_base(config, family):
    """The contract rows of LLaMA and BERT, on NF4: the same parameters get gradients as on the dense base."""
    inputs = make_inputs(family)
    if config.method in DENSE_ONLY:
        adapters = ak.attach(quantized(family, "bitsandbytes", "nf4"))
        with pytest.raises((TypeError, ValueError), match="quantized"):
            adapters.add("a", config.replace(init_weights=False))
        return
    runs = {}
    for kind in ("dense", "nf4"):
        model = make_model(family) if kind == "dense" else quantized(family, "bitsandbytes", "nf4")
        before = codes(model)
        adapters = ak.attach(model)
        torch.manual_seed(0)
        adapters.add("a", config.replace(init_weights=False))
        ak.prepare_for_kbit_training(model, gradient_checkpointing=False)
        adapters.train("a")
        model.train()
        loss = model(**inputs, labels=labels_for(family, inputs)).loss
        loss.backward()
        assert torch.isfinite(loss)
        if getattr(
            config, "top_k", None
        ):  # hard routing: NF4's rounding may pick other experts than the dense run
            runs[kind] = [p.grad is not None for p in adapters.parameters("a")]
        else:
            runs[kind] = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in adapters.parameters("a")]
        adapters.detach()  # PiSSA/OLoRA requantize the residual while attached and restore it exactly here
        assert same_codes(codes(model), before)
    assert runs["nf4"] == runs["dense"]


# --- prepare_for_kbit_training -------------------------------------------------------------------------------------
def _adapter_grads(model: nn.Module, eval_pass_first: bool, prepare: bool = True) -> list[torch.Tensor | None]:
    inputs = make_inputs("llama")
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", ak.LoRA(r=4, targets="all-linear", init_weights=False))
    adapters.train("a")
    if eval_pass_first:  # e.g. an evaluation before training
        model.eval()
        with torch.no_grad():
            model(**inputs)
    if prepare:
        ak.prepare_for_kbit_training(model, gradient_checkpointing=False)
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    return [p.grad for p in adapters.parameters("a")]


@pytest.mark.skipif(not HAS["bitsandbytes"], reason="bitsandbytes is not installed")
@pytest.mark.filterwarnings("ignore:.*gemv_4bit.*autograd kernel")  # the very trap: no autograd kernel
def test_prepare_undoes_the_bitsandbytes_cpu_repacking_that_stops_gradients():
    import bitsandbytes as bnb

    if not bnb.functional.has_avx512bf16():
        pytest.skip("bitsandbytes repacks Linear4bit weights for inference only on CPUs with AVX512-BF16")

    def as_loaded_by_transformers() -> nn.Module:
        model = quantized("llama", "bitsandbytes", "nf4")
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = True  # bitsandbytes' default; ak.quantize turns it off
        return model

    reference = _adapter_grads(as_loaded_by_transformers(), eval_pass_first=False)
    trap = _adapter_grads(as_loaded_by_transformers(), eval_pass_first=True, prepare=False)
    # the trap: no gradient flows through the repacked layers (only around them, through the residuals)
    assert any(g is None or ((g - r).norm() / r.norm()).item() > 0.5 for g, r in zip(trap, reference))
    got = _adapter_grads(as_loaded_by_transformers(), eval_pass_first=True)
    assert all(g is not None for g in got)
    for g, r in zip(got, reference, strict=True):
        # repacking rounds the block scales through bf16, so the unpacked weights differ slightly
        assert ((g - r).norm() / r.norm()).item() < 0.05


@pytest.mark.parametrize("reentrant", [False, True])
def test_prepare_sets_up_checkpointing_without_grad_traps(reentrant):
    backend = "bitsandbytes" if HAS["bitsandbytes"] else "torchao"
    if not HAS[backend]:
        pytest.skip("neither bitsandbytes nor torchao is installed")
    inputs = make_inputs("llama")
    grads = {}
    for checkpointing in (False, True):
        model = quantized("llama", backend, "nf4").to(torch.bfloat16)
        adapters = ak.attach(model)
        torch.manual_seed(0)
        adapters.add("a", ak.LoRA(r=4, targets="all-linear", init_weights=False))
        adapters.train("a")  # before prepare: prepare leaves adapter parameters trainable (peft's does not)
        ak.prepare_for_kbit_training(model, gradient_checkpointing=checkpointing, use_reentrant=reentrant)
        norms = [m for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]
        assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
        assert model.get_input_embeddings().weight.dtype == torch.bfloat16  # only norms are upcast
        assert all(p.requires_grad for p in adapters.parameters("a"))
        assert not any(p.requires_grad for n, p in model.named_parameters() if CONTAINER not in n)
        assert model.config.use_cache is not checkpointing
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads[checkpointing] = [p.grad for p in adapters.parameters("a")]
    assert all(g is not None for g in grads[True])
    for g, r in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(g, r)


# --- errors --------------------------------------------------------------------------------------------------------
def test_errors_name_what_to_change(monkeypatch):
    model = make_model("llama")
    with pytest.raises(ValueError, match="unknown quantization scheme 'nf3'"):
        ak.quantize(model, "nf3")
    with pytest.raises(ValueError, match="unknown quantization backend 'gptq'"):
        ak.quantize(model, "nf4", backend="gptq")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install 'adapterkit\[quant\]'"):
        ak.quantize(model, "nf4", backend="torchao")
    monkeypatch.undo()
    ak.attach(model).add("a", ak.LoRA())
    with pytest.raises(ValueError, match="before adding adapters"):
        ak.quantize(model, "int8")
    with pytest.raises(ValueError, match="merge_and_detach"):
        ak.dequantize(model)
    with pytest.raises(ValueError, match="gradient_checkpointing=False"):
        ak.prepare_for_kbit_training(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.skipif(not HAS["bitsandbytes"], reason="bitsandbytes is not installed")
def test_dequantize_and_copy():
    model = quantized("llama", "bitsandbytes", "nf4")
    inputs = make_inputs("llama")
    with torch.no_grad():
        expected = output_of(model, inputs)
        twin = copy.deepcopy(model)  # quantized models deep-copy (peft comparisons, EMA, ...)
        torch.testing.assert_close(output_of(twin, inputs), expected)
    ak.dequantize(model)
    assert not any(is_quantized(m) for m in model.modules()) and not model.is_loaded_in_4bit
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, inputs), expected, atol=1e-5, rtol=0)
