"""P-tuning (``ak.PTuning``): peft equivalence both ways, generation, routing, training, errors; and prompt-method
exports from classifiers without a head copy (issue 19 item 5).

* Same weights as peft's ``PromptEncoder`` (MLP and LSTM; perturbed): float32 logits within 1e-5 on BERT sequence
  classification, GPT-2 and LLaMA (GQA) causal LM, T5 with peft's two submodules, in eval mode and in training
  mode with dropout 0 (loss and encoder gradients too). peft returns ``P + L`` causal-LM logits; ours strip the
  virtual positions (``ours == peft[:, P:]``).
* peft ``P_TUNING`` directories (the encoder's output only) load with peft's logits; our export loads in
  ``PeftModel.from_pretrained`` with ours.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.formats import AdapterFileError
from adapterkit.methods.ptuning import PTuningPrompt
from adapterkit.targeting import TargetError

from conftest import make_inputs, make_model, skip_if_peft_misses_cache_rename

peft = pytest.importorskip("peft")
from peft import PeftModel, PromptEncoderConfig, get_peft_model  # noqa: E402

warnings.filterwarnings("ignore", module="peft")
warnings.filterwarnings("ignore", message=".*dropout option adds dropout.*")
TOL = {"atol": 1e-5, "rtol": 1e-5}
TASK = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}
P = 3
H = 16


def inputs(family: str) -> dict[str, torch.Tensor]:
    x = make_inputs(family)
    x["attention_mask"][1, :2] = 0  # a left-padded row
    return x


def strip(family: str, out: torch.Tensor) -> torch.Tensor:
    """peft's causal-LM logits without the ``P`` virtual positions (ours never have them)."""
    return out[:, P:] if TASK[family] == "CAUSAL_LM" else out


@torch.no_grad()
def logits(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**x).logits


@torch.no_grad()
def perturb(params, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(0.3 * torch.randn(p.shape, generator=g))


def peft_model(family: str, kind: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = PromptEncoderConfig(
        task_type=TASK[family],
        num_virtual_tokens=P,
        encoder_reparameterization_type=kind,
        encoder_hidden_size=H,
        **kw,
    )
    pm = get_peft_model(make_model(family), cfg).eval()
    perturb(pm.prompt_encoder.parameters())
    return pm


def ours_like(pm: nn.Module, family: str, kind: str, **kw) -> tuple[nn.Module, ak.Adapters]:
    """Our model with an adapter holding the peft model's encoder weights (same parameter names)."""
    model = make_model(family)
    adapters = ak.attach(model)
    subs = pm.peft_config["default"].num_transformer_submodules
    adapters.add(
        "a",
        ak.PTuning(
            num_virtual_tokens=P,
            encoder_reparameterization_type=kind,
            encoder_hidden_size=H,
            num_transformer_submodules=subs,
            **kw,
        ),
    )
    comp = prompt_of(adapters, "a")
    comp.encoder.load_state_dict(pm.prompt_encoder["default"].state_dict())
    return model, adapters


def prompt_of(adapters: ak.Adapters, name: str) -> PTuningPrompt:
    (comp,) = [c for c in adapters.components(name).values() if isinstance(c, PTuningPrompt)]
    return comp


def no_dropout(model: nn.Module) -> None:
    """Dropout off in training mode: ``nn.Dropout`` modules and attention modules' float ``dropout`` (T5)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0


CASES = [(f, k) for f in ("bert", "gpt2", "llama") for k in ("MLP", "LSTM")] + [("t5", "LSTM")]
IDS = [f"{f}-{k}" for f, k in CASES]


# --- equal to peft on the same weights ----------------------------------------------------------
@pytest.mark.parametrize(("family", "kind"), CASES, ids=IDS)
def test_equal_to_peft_on_the_same_weights(family, kind):
    """Eval-mode logits equal; in training mode (dropout 0) logits, loss and encoder gradients equal too."""
    pm = peft_model(family, kind)
    model, adapters = ours_like(pm, family, kind)
    x = inputs(family)
    torch.testing.assert_close(logits(model, x), strip(family, logits(pm, x)), **TOL)

    no_dropout(model)
    no_dropout(pm)
    model.train()
    pm.train()
    x["labels"] = (
        torch.tensor([0, 2])
        if family == "bert"
        else x["input_ids"][:, :4].contiguous()
        if family == "t5"
        else x["input_ids"]
    )
    ours, theirs = model(**x), pm(**x)
    torch.testing.assert_close(ours.logits, strip(family, theirs.logits), **TOL)
    torch.testing.assert_close(ours.loss, theirs.loss, **TOL)
    ours.loss.backward()
    theirs.loss.backward()
    mine = dict(prompt_of(adapters, "a").encoder.named_parameters())
    for name, p in pm.prompt_encoder["default"].named_parameters():
        torch.testing.assert_close(mine[name].grad, p.grad, **TOL, msg=name)


def test_t5_lstm_reads_the_whole_table():
    """With peft's two submodules the prompt is the first ``P`` rows of an LSTM run over ``2 P`` rows."""
    pm = peft_model("t5", "LSTM")
    assert pm.peft_config["default"].num_transformer_submodules == 2
    model, adapters = ours_like(pm, "t5", "LSTM")
    comp = prompt_of(adapters, "a")
    assert comp.encoder.embedding.weight.shape[0] == 2 * P and comp.prompt.shape[0] == P
    x = inputs("t5")
    before = logits(model, x)
    with torch.no_grad():
        comp.encoder.embedding.weight[P:] += 1.0  # the second block changes the first P outputs
    assert (logits(model, x) - before).abs().max() > 1e-4


# --- peft files both ways -----------------------------------------------------------------------
@pytest.mark.parametrize(("family", "kind"), CASES, ids=IDS)
def test_peft_to_adapterkit(family, kind, tmp_path):
    """A peft-saved P-tuning adapter (the encoder output) loads with peft's logits (SEQ_CLS: with its classifier
    copy); the loaded component holds only the stored output."""
    pm = peft_model(family, kind)
    if family == "bert":
        perturb(pm.base_model.classifier.modules_to_save["default"].parameters(), seed=8)
    pm.save_pretrained(tmp_path)
    x = inputs(family)
    expected = strip(family, logits(pm, x))
    model = make_model(family)
    adapters = ak.attach(model)
    assert adapters.load(tmp_path) == "default"
    cfg = adapters.config("default")
    assert cfg.method == "p_tuning" and cfg.encoder_reparameterization_type.value == kind
    assert cfg.num_transformer_submodules == (2 if family == "t5" else 1) and cfg.stored_prompt
    comp = prompt_of(adapters, "default")
    assert [n for n, _ in comp.named_parameters()] == ["prompt_embeddings"]
    if family == "bert":
        assert adapters.sites("default")["classifier"] == "head"
    torch.testing.assert_close(logits(model, x), expected, **TOL)


@pytest.mark.parametrize(("family", "kind"), CASES, ids=IDS)
def test_adapterkit_to_peft(family, kind, tmp_path):
    """``export(format="peft")`` writes the encoder output; ``PeftModel.from_pretrained`` gives our logits, and the
    directory loads back into adapterkit with them."""
    model = make_model(family)
    adapters = ak.attach(model)
    torch.manual_seed(0)
    heads = ["head"] if family == "bert" else []
    subs = 2 if family == "t5" else 1
    adapters.add(
        "a",
        ak.PTuning(
            num_virtual_tokens=P,
            encoder_reparameterization_type=kind,
            num_transformer_submodules=subs,
            heads=heads,
        ),
    )
    perturb(adapters.parameters("a"))
    x = inputs(family)
    expected = logits(model, x)
    adapters.export("a", tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "P_TUNING" and data["task_type"] == TASK[family]
    assert data["encoder_reparameterization_type"] == kind and data["encoder_hidden_size"] == 32
    assert data["num_transformer_submodules"] == subs

    pm = PeftModel.from_pretrained(make_model(family), tmp_path).eval()
    torch.testing.assert_close(strip(family, logits(pm, x)), expected, **TOL)
    again = make_model(family)
    ak.attach(again).load(tmp_path)
    torch.testing.assert_close(logits(again, x), expected, **TOL)


def test_native_save_keeps_the_encoder_and_a_peft_loaded_prompt_round_trips(tmp_path):
    """Native files hold the encoder (training continues through it); an adapter loaded from peft's files holds
    the stored output, and its native save/load and re-export keep that."""
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.PTuning(num_virtual_tokens=P, encoder_reparameterization_type="LSTM"))
    perturb(adapters.parameters("a"))
    x = inputs("llama")
    expected = logits(model, x)
    adapters.save("a", tmp_path / "native")
    fresh = make_model("llama")
    fa = ak.attach(fresh)
    fa.load(tmp_path / "native")
    assert fa.config("a") == adapters.config("a")
    assert {n.split(".")[1] for n, _ in prompt_of(fa, "a").named_parameters()} == {
        "embedding",
        "lstm_head",
        "mlp_head",
    }
    torch.testing.assert_close(logits(fresh, x), expected, **TOL)

    adapters.export("a", tmp_path / "peft")
    third = make_model("llama")
    ta = ak.attach(third)
    ta.load(tmp_path / "peft", name="p")
    ta.save("p", tmp_path / "native2")
    fourth = make_model("llama")
    fo = ak.attach(fourth)
    fo.load(tmp_path / "native2")
    assert [n for n, _ in prompt_of(fo, "p").named_parameters()] == ["prompt_embeddings"]
    torch.testing.assert_close(logits(fourth, x), expected, **TOL)
    fo.export("p", tmp_path / "peft2")
    pm = PeftModel.from_pretrained(make_model("llama"), tmp_path / "peft2").eval()
    torch.testing.assert_close(strip("llama", logits(pm, x)), expected, **TOL)


def test_peft_files_that_do_not_fit_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    pm = peft_model("llama", "MLP")
    pm.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    adapters = ak.attach(make_model("gpt2"))
    adapters.add("x", ak.PTuning(num_virtual_tokens=2))
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({"prompt_embeddings": tensors["prompt_embeddings"][:, :16].contiguous()}, weights)
    with pytest.raises(AdapterFileError, match="is 16 wide but token_dim says 32"):
        adapters.load(tmp_path, name="y")
    data["token_dim"] = 16
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(AdapterFileError, match="does not fit.*prompt_embeddings"):
        adapters.load(tmp_path, name="y")
    save_file(tensors, weights)
    data["token_dim"] = 32
    data["num_virtual_tokens"] = 5
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(AdapterFileError, match=r"expected \(5, dim\)"):
        ak.attach(make_model("llama")).load(tmp_path)
    data["num_virtual_tokens"], data["encoder_reparameterization_type"] = P, "GRU"
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(AdapterFileError, match="encoder_reparameterization_type"):
        ak.attach(make_model("llama")).load(tmp_path)
    assert adapters.names == ["x"]


# --- generation ---------------------------------------------------------------------------------
@torch.no_grad()
def reference_generate(family: str, prompt: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, steps: int):
    """Greedy decoding without cache on a clean base model, the prompt put in front by hand each step."""
    base = make_model(family)
    batch = ids.shape[0]
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        embeds = torch.cat([prompt.expand(batch, -1, -1), base.get_input_embeddings()(ids)], dim=1)
        out = base(
            inputs_embeds=embeds,
            attention_mask=torch.cat([mask.new_ones(batch, P), mask], 1),
            position_ids=torch.cat([torch.arange(P).expand(batch, -1), pos + P], 1),
            use_cache=False,
        )
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, mask.new_ones(batch, 1)], 1)
    return ids


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_with_cache_equals_reference(family):
    model = make_model(family)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    adapters = ak.attach(model)
    torch.manual_seed(3)
    adapters.add("a", ak.PTuning(num_virtual_tokens=P, encoder_reparameterization_type="LSTM"))
    perturb(adapters.parameters("a"))
    x = inputs(family)
    steps = 5
    out = model.generate(**x, max_new_tokens=steps, do_sample=False)
    with torch.no_grad():
        prompt = prompt_of(adapters, "a").prompt
    ref = reference_generate(family, prompt, x["input_ids"], x["attention_mask"], steps)
    assert out.tolist() == ref.tolist()
    assert torch.equal(model.generate(**x, max_new_tokens=steps, do_sample=False, use_cache=False), out)


def test_t5_generate_with_cache_equals_no_cache():
    model = make_model("t5")
    adapters = ak.attach(model)
    torch.manual_seed(1)
    adapters.add("a", ak.PTuning(num_virtual_tokens=P))
    perturb(adapters.parameters("a"))
    x = inputs("t5")
    kw = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"], "max_new_tokens": 4}
    assert torch.equal(model.generate(**kw), model.generate(**kw, use_cache=False))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_equals_peft(family):
    skip_if_peft_misses_cache_rename("peft's generate() with virtual tokens")
    pm = peft_model(family, "MLP")
    model, _ = ours_like(pm, family, "MLP")
    x = make_inputs(family)
    kw = {
        "input_ids": x["input_ids"],
        "attention_mask": x["attention_mask"],
        "max_new_tokens": 5,
        "do_sample": False,
    }
    assert pm.generate(**kw).tolist() == model.generate(**kw).tolist()


# --- routing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "bert", "t5"])
def test_mixed_batch_routing_equals_per_row_runs(family):
    """Two P-tuning adapters of different lengths and a base row in one batch (one batched call: model-level
    components have no per-row fallback) == each row run alone with its adapter."""
    model = make_model(family)
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", ak.PTuning(num_virtual_tokens=3, encoder_reparameterization_type="LSTM"))
    adapters.add("b", ak.PTuning(num_virtual_tokens=2, encoder_hidden_size=8))
    perturb(adapters.parameters())
    x = make_inputs(family, batch=3)
    x["attention_mask"][1, :2] = 0
    routes = ["b", None, "a"]
    with torch.no_grad(), adapters.route(routes):
        got = model(**x).logits
    for row, name in enumerate(routes):
        adapters.activate([] if name is None else [name])
        with torch.no_grad():
            alone = model(**{k: v[row : row + 1] for k, v in x.items()}).logits
        torch.testing.assert_close(got[row : row + 1], alone, **TOL)


def test_routing_prompt_and_ptuning_together_is_refused():
    model = make_model("gpt2")
    adapters = ak.attach(model)
    adapters.add("a", ak.PTuning(num_virtual_tokens=2))
    adapters.add("b", ak.PromptTuning(num_virtual_tokens=2))
    with pytest.raises(NotImplementedError, match="together"), adapters.route(["a", "b"]):
        model(**make_inputs("gpt2"))


# --- training -----------------------------------------------------------------------------------
def _train(
    model: nn.Module, adapters: ak.Adapters, name: str, family: str, steps: int = 8, lr: float = 0.05
) -> list[float]:
    adapters.train(name)
    model.train()
    x = make_inputs(family)
    x["labels"] = torch.full_like(x["input_ids"], 5)
    opt = torch.optim.Adam(adapters.parameters(name), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**x).loss
        loss.backward()
        for pname, p in model.named_parameters():
            if "ak_adapters" not in pname:
                assert p.grad is None, pname
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_training_lowers_loss_through_the_encoder(kind):
    model = make_model("gpt2")
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", ak.PTuning(num_virtual_tokens=4, encoder_reparameterization_type=kind, encoder_dropout=0.1))
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if "ak_adapters" not in k}
    losses = _train(model, adapters, "a", "gpt2")
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)


def test_a_prompt_loaded_from_peft_trains_as_a_plain_prompt(tmp_path):
    """peft's files hold no encoder: further training updates the stored output directly."""
    peft_model("gpt2", "MLP").save_pretrained(tmp_path)
    model = make_model("gpt2")
    adapters = ak.attach(model)
    adapters.load(tmp_path)
    comp = prompt_of(adapters, "default")
    start = comp.prompt_embeddings.detach().clone()
    losses = _train(model, adapters, "default", "gpt2", steps=10, lr=0.3)
    assert losses[-1] < losses[0] - 0.05, losses
    assert not torch.equal(comp.prompt_embeddings, start)


# --- config and errors --------------------------------------------------------------------------
def test_config_validation():
    assert ak.PTuning(encoder_reparameterization_type="lstm").encoder_reparameterization_type.value == "LSTM"
    assert ak.get_config("p_tuning", num_virtual_tokens=4) == ak.PTuning(num_virtual_tokens=4)
    for bad, match in [
        ({"encoder_reparameterization_type": "GRU"}, "'MLP' or 'LSTM'"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"encoder_num_layers": 0}, "encoder_num_layers"),
        ({"encoder_dropout": 1.0}, "encoder_dropout"),
        ({"encoder_hidden_size": -1}, "encoder_hidden_size"),
        ({"num_transformer_submodules": 0}, "num_transformer_submodules"),
    ]:
        with pytest.raises(ValueError, match=match):
            ak.PTuning(**bad)
    adapters = ak.attach(make_model("gpt2"))
    with pytest.raises(TargetError, match="token_dim=64.*32 wide"):
        adapters.add("a", ak.PTuning(token_dim=64))
    with pytest.raises(TargetError, match="whole model"):
        adapters.add("a", ak.PTuning(targets=["attn.qkv"]))
    assert adapters.names == []


def test_mlp_depth_and_dropout():
    """``encoder_num_layers`` hidden layers (2 = peft's), dropout after each hidden ReLU in training only."""
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.PTuning(num_virtual_tokens=P, encoder_num_layers=3, encoder_dropout=0.5))
    comp = prompt_of(adapters, "a")
    kinds = [type(m).__name__ for m in comp.encoder.mlp_head]
    assert kinds == ["Linear", "ReLU", "Dropout"] * 3 + ["Linear"]
    comp.eval()
    assert torch.equal(comp.prompt, comp.prompt)
    comp.train()
    torch.manual_seed(0)
    assert not torch.equal(comp.prompt, comp.prompt)


# --- issue 19 item 5: prompt-method exports from classifiers without a head copy ----------------------------
def _bert(cls_name: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64,
                                  num_labels=2 if cls_name.endswith("QuestionAnswering") else 3)  # fmt: skip
    return getattr(transformers, cls_name)(cfg).eval()


def _output(out) -> torch.Tensor:
    for key in ("logits", "start_logits", "last_hidden_state"):
        if key in out:
            return out[key]
    raise AssertionError(list(out.keys()))


HEADLESS = [
    (cls, method)
    for cls in (
        "BertForSequenceClassification",
        "BertModel",
        "BertForTokenClassification",
        "BertForQuestionAnswering",
    )
    for method in ("prompt", "ptuning")
]


@pytest.mark.parametrize(("cls_name", "method"), HEADLESS, ids=[f"{c}-{m}" for c, m in HEADLESS])
def test_prompt_export_without_a_head_copy_loads_in_peft(cls_name, method, tmp_path):
    """peft's classification wrappers expect the head copy in the file (KeyError 'base_model.classifier.weight'
    before); such an adapter exports as FEATURE_EXTRACTION, which prepends the prompt and keeps the base head."""
    model = _bert(cls_name)
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add(
        "a", ak.PromptTuning(num_virtual_tokens=P) if method == "prompt" else ak.PTuning(num_virtual_tokens=P)
    )
    perturb(adapters.parameters("a"))
    x = make_inputs("bert")
    x["attention_mask"][1, :2] = 0
    with torch.no_grad():
        expected = _output(model(**x))
    adapters.export("a", tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["task_type"] == "FEATURE_EXTRACTION" and data["modules_to_save"] is None
    pm = PeftModel.from_pretrained(_bert(cls_name), tmp_path).eval()
    with torch.no_grad():
        got = _output(pm(**x))
    if got.shape[1] == expected.shape[1] + P and cls_name in (
        "BertForTokenClassification",
        "BertForQuestionAnswering",
    ):
        got = got[:, P:]  # peft returns the virtual positions of token-level outputs; ours strip them
    torch.testing.assert_close(got, expected, **TOL)


def test_prompt_export_with_a_head_copy_keeps_the_task(tmp_path):
    model = _bert("BertForSequenceClassification")
    adapters = ak.attach(model)
    adapters.add("a", ak.PromptTuning(num_virtual_tokens=P, heads=["head"]))
    adapters.export("a", tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"


def test_ptuning_manual_reference_equals_loss():
    """The loss ignores the virtual positions: position P-1 predicts the first real token, as in peft."""
    model = make_model("gpt2")
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", ak.PTuning(num_virtual_tokens=P))
    x = make_inputs("gpt2")
    labels = x["input_ids"].clone()
    out = model(**x, labels=labels)
    base = make_model("gpt2")
    with torch.no_grad():
        prompt = prompt_of(adapters, "a").prompt
        full = base(
            inputs_embeds=torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(x["input_ids"])], 1)
        ).logits
    targets = torch.cat([torch.full((2, P), -100), labels], 1)
    manual = F.cross_entropy(full[:, :-1].reshape(-1, 100), targets[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual, **TOL)


# --- issue 19 item 5: prompt methods on models that do not fit them ---------------------------------------------
def _clip_text(with_projection: bool) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, projection_dim=16)  # fmt: skip
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def _deberta_v2() -> nn.Module:
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(0)
    cfg = DebertaV2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=64, pooler_hidden_size=32)  # fmt: skip
    return DebertaV2Model(cfg).eval()


PROMPT_METHODS = {
    "prompt": lambda: ak.PromptTuning(num_virtual_tokens=P),
    "ptuning": lambda: ak.PTuning(num_virtual_tokens=P),
}
UNFIT = [
    ("clip-text", "no inputs_embeds.*CLIP's text model"),
    ("clip-text-projection", "no inputs_embeds"),
    ("whisper", "encoder of WhisperForConditionalGeneration .*takes no input_ids.*input_features"),
    ("clip", "CLIPModel: it exposes no single input token embedding"),
]


def _unfit(kind: str) -> nn.Module:
    if kind.startswith("clip-text"):
        return _clip_text(kind.endswith("projection"))
    if kind == "clip":
        from transformers import CLIPConfig, CLIPModel

        text = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 4, "max_position_embeddings": 32}  # fmt: skip
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                  "image_size": 16, "patch_size": 8}  # fmt: skip
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    return make_model(kind)


@pytest.mark.parametrize("method", list(PROMPT_METHODS))
@pytest.mark.parametrize(("kind", "why"), UNFIT, ids=[k for k, _ in UNFIT])
def test_prompt_methods_refuse_models_that_do_not_fit_them(kind, why, method):
    """One clear error at ``add`` naming why and what to use instead (CLIP's text model takes input_ids but no
    inputs_embeds: before, the forward ended in "You have to specify input_ids")."""
    adapters = ak.attach(_unfit(kind))
    with pytest.raises(TargetError, match=why) as err:
        adapters.add("p", PROMPT_METHODS[method]())
    assert "LoRA (ak.LoRA())" in str(err.value)
    assert adapters.names == []


@pytest.mark.parametrize("method", list(PROMPT_METHODS))
def test_prompt_methods_work_on_deberta_v2_with_a_mask(method):
    """DeBERTa-v2 ignores a KV cache (prefix tuning cannot act on it) but takes inputs_embeds: prompts work, padded."""
    model = _deberta_v2()
    ak.attach(model).add("p", PROMPT_METHODS[method]())
    x = make_inputs("bert")
    x["attention_mask"][1, :2] = 0
    with torch.no_grad():
        out = model(**x).last_hidden_state
    assert out.shape == (2, P + 7, 32) and torch.isfinite(out).all()


def test_prefix_on_deberta_v2_is_refused_at_add():
    """DeBERTa-v2's layers cannot receive a KV cache (no module of a layer takes one, nor **kwargs): refused at
    ``add`` (before: with an attention mask, a raw shape error in the embeddings, which multiply by the mask)."""
    adapters = ak.attach(_deberta_v2())
    with pytest.raises(TargetError, match=r"DebertaV2Model: its layers take no KV cache.*DebertaV2Layer") as err:
        adapters.add("p", ak.PrefixTuning(num_virtual_tokens=P))
    assert "LoRA (ak.LoRA())" in str(err.value) and "prompt tuning (ak.PromptTuning())" in str(err.value)
    assert adapters.names == []


@pytest.mark.parametrize("mask", [True, False], ids=["mask", "no-mask"])
def test_prefix_on_clip_text_says_why_at_the_first_call(mask):
    """CLIP's text model passes the cache to its layers through ``**kwargs`` and ignores it: the first call says
    so (with a mask: instead of the raw shape error its attention met), never suggesting prompt tuning (it takes no
    inputs_embeds); the model is left as it was."""
    model = _clip_text(False)
    block = model.text_model.encoder.layers[0] if hasattr(model, "text_model") else model.encoder.layers[0]
    adapters = ak.attach(model)
    adapters.add("p", ak.PrefixTuning(num_virtual_tokens=P))
    x = make_inputs("bert")
    if not mask:
        del x["attention_mask"]
    why = "failed without having read it.*RuntimeError" if mask else "takes no KV cache"
    with pytest.raises(TypeError, match=rf"CLIPTextModel did not read past_key_values.*{why}.*LoRA") as err:
        model(**x)
    assert "PromptTuning" not in str(err.value)
    assert "forward" not in block.__dict__  # the watched block's forward is put back
    adapters.delete("p")
    with torch.no_grad():
        assert model(**x).last_hidden_state.shape == (2, 7, 32)


def test_the_encoder_runs_once_per_prefill_not_per_decoding_step():
    """Decoding steps with a KV cache only need the prompt's length: the encoder runs for the prefill alone."""
    model = make_model("llama")
    model.generation_config.eos_token_id = None
    adapters = ak.attach(model)
    adapters.add("a", ak.PTuning(num_virtual_tokens=P, encoder_reparameterization_type="LSTM"))
    calls = []
    prompt_of(adapters, "a").encoder.register_forward_hook(lambda *_: calls.append(1))
    x = make_inputs("llama")
    model.generate(**x, max_new_tokens=6, do_sample=False)
    assert len(calls) == 1
    with adapters.route(["a", None]):
        model.generate(**x, max_new_tokens=6, do_sample=False)
    assert len(calls) == 2
