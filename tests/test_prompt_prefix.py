"""Prompt tuning, prefix tuning and P-tuning v2: peft equivalence, generation with a KV cache, loss, training.

* peft (0.21) equivalence, both directions, float32 logits within 1e-5, on BERT sequence classification,
  GPT-2, LLaMA with grouped-query attention (2 key/value heads for 4 query heads) and T5, with a left-padded
  row. peft returns ``P + L`` logits for causal LM prompt tuning; adapterkit strips the virtual positions,
  so ``ours == peft[:, P:]``.
* ``generate()`` (greedy, KV cache) equals a reference loop without cache that feeds the whole sequence each
  step with the soft prompt / prefix built by hand, token for token, also with left padding.
* labels: the loss equals a manual cross-entropy that ignores the virtual positions; training lowers it and
  only the adapter's parameters get gradients.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import adapterkit as ak
from adapterkit.formats import AdapterFileError
from adapterkit.methods.prefix import PrefixKV
from adapterkit.methods.prompt import SoftPrompt
from adapterkit.targeting import TargetError

from conftest import PEFT_MISSES_CACHE_RENAME, make_inputs, make_model, skip_if_peft_misses_cache_rename

peft = pytest.importorskip("peft")
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: E402

warnings.filterwarnings("ignore", module="peft")
TOL = {"atol": 1e-5, "rtol": 1e-5}
TASK = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bart": "SEQ_2_SEQ_LM"}
P = 3


def inputs(family: str) -> dict[str, torch.Tensor]:
    x = make_inputs(family)
    x["attention_mask"][1, :2] = 0  # a left-padded row
    return x


@torch.no_grad()
def logits(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**x).logits


def peft_logits(pm: torch.nn.Module, family: str, kind: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    out = logits(pm, x)
    return out[:, P:] if kind == "prompt" and TASK[family] == "CAUSAL_LM" else out


def peft_config(family: str, kind: str, **kw):
    cls = PromptTuningConfig if kind == "prompt" else PrefixTuningConfig
    return cls(task_type=TASK[family], num_virtual_tokens=P, **kw)


def ours_config(kind: str, **kw) -> ak.AdapterConfig:
    return (
        ak.PromptTuning(num_virtual_tokens=P, **kw)
        if kind == "prompt"
        else ak.PrefixTuning(num_virtual_tokens=P, **kw)
    )


@torch.no_grad()
def perturb(params, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(0.3 * torch.randn(p.shape, generator=g))


CASES = [(f, k) for f in TASK for k in ("prompt", "prefix")]


# --- peft equivalence ----------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "kind"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_peft_to_adapterkit(family, kind, tmp_path):
    """A peft-saved adapter loads with ``adapters.load`` and gives peft's logits (SEQ_CLS: with its classifier)."""
    if family == "bert" and kind == "prefix":
        skip_if_peft_misses_cache_rename("peft's prefix tuning on BERT")
    torch.manual_seed(0)
    pm = get_peft_model(make_model(family), peft_config(family, kind)).eval()
    perturb(pm.prompt_encoder.parameters())
    if family == "bert":  # the classifier copy peft keeps in modules_to_save
        perturb(pm.base_model.classifier.modules_to_save["default"].parameters(), seed=8)
    pm.save_pretrained(tmp_path)
    x = inputs(family)
    expected = peft_logits(pm, family, kind, x)

    model = make_model(family)
    adapters = ak.attach(model)
    assert adapters.load(tmp_path) == "default"
    assert adapters.config("default").method == f"{kind}_tuning"
    if family == "bert":
        assert adapters.sites("default")["classifier"] == "head"
    torch.testing.assert_close(logits(model, x), expected, **TOL)


@pytest.mark.parametrize(("family", "kind"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_adapterkit_to_peft(family, kind, tmp_path):
    """``export(format="peft")`` loads in ``PeftModel.from_pretrained`` and gives our logits."""
    model = make_model(family)
    adapters = ak.attach(model)
    torch.manual_seed(0)
    heads = ["head"] if family == "bert" else []
    adapters.add("a", ours_config(kind, heads=heads))
    perturb(adapters.parameters("a"))
    x = inputs(family)
    expected = logits(model, x)
    adapters.export("a", tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["task_type"] == TASK[family]
    assert data["peft_type"] == f"{kind.upper()}_TUNING"

    if not (family == "bert" and kind == "prefix" and PEFT_MISSES_CACHE_RENAME):
        pm = PeftModel.from_pretrained(make_model(family), tmp_path).eval()
        torch.testing.assert_close(peft_logits(pm, family, kind, x), expected, **TOL)
    # and back: the exported directory loads into adapterkit with the same outputs
    again = make_model(family)
    ak.attach(again).load(tmp_path)
    torch.testing.assert_close(logits(again, x), expected, **TOL)


def test_peft_prefix_projection_loads_as_plain_prefix(tmp_path):
    """peft saves the MLP's output; the loaded adapter holds only the prefix, with peft's logits."""
    torch.manual_seed(0)
    pm = get_peft_model(make_model("llama"), peft_config("llama", "prefix", prefix_projection=True)).eval()
    perturb(pm.prompt_encoder.parameters())
    pm.save_pretrained(tmp_path)
    x = inputs("llama")
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.load(tmp_path)
    (comp,) = adapters.components("default").values()
    assert [n for n, _ in comp.named_parameters()] == ["prefix"]
    torch.testing.assert_close(logits(model, x), peft_logits(pm, "llama", "prefix", x), **TOL)


def test_our_prefix_projection_exports_and_saves_folded(tmp_path):
    """Li & Liang §4.3: the MLP trains; what is saved (natively and for peft) is the prefix it computes."""
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.PrefixTuning(num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=24))
    (comp,) = adapters.components("a").values()
    assert {n.split(".")[0] for n, _ in comp.named_parameters()} == {"embedding", "transform"}
    perturb(adapters.parameters("a"))
    x = inputs("llama")
    expected = logits(model, x)

    adapters.save("a", tmp_path / "native")
    fresh = make_model("llama")
    fresh_adapters = ak.attach(fresh)
    fresh_adapters.load(tmp_path / "native")
    assert fresh_adapters.config("a") == adapters.config("a")
    (loaded,) = fresh_adapters.components("a").values()
    assert [n for n, _ in loaded.named_parameters()] == ["prefix"]
    torch.testing.assert_close(logits(fresh, x), expected, **TOL)

    adapters.export("a", tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["prefix_projection"] is False
    pm = PeftModel.from_pretrained(make_model("llama"), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(pm, x), expected, **TOL)


def test_t5_prefix_follows_peft_layer_slots(tmp_path):
    """peft gives T5 decoder layer i the prefix in slot (2 i) mod L; our export writes 2 L slots so that any
    per-layer prefix survives, and a distinct prefix per layer really reaches its layer."""
    model = make_model("t5")
    adapters = ak.attach(model)
    adapters.add("a", ak.PrefixTuning(num_virtual_tokens=P))
    x = inputs("t5")
    with torch.no_grad():
        comp = adapters.components("a")[""]
        per_layer = comp.prefix.view(P, 2, -1)
        per_layer[:, 1] = per_layer[:, 0] * -2.0  # layers differ
        before = logits(model, x)
        per_layer[:, 1] = per_layer[:, 0]
        same = logits(model, x)
    assert (before - same).abs().max() > 1e-3  # the second layer's prefix matters
    adapters.export("a", tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["num_layers"] == 4 and data["num_transformer_submodules"] == 2


def test_peft_t5_prompt_reads_encoder_rows(tmp_path):
    """peft allocates 2 P rows for SEQ_2_SEQ_LM prompt tuning and reads the first P; so do we."""
    torch.manual_seed(0)
    pm = get_peft_model(make_model("t5"), peft_config("t5", "prompt")).eval()
    assert pm.prompt_encoder["default"].embedding.weight.shape[0] == 2 * P
    pm.save_pretrained(tmp_path)
    model = make_model("t5")
    adapters = ak.attach(model)
    adapters.load(tmp_path)
    sites = adapters.sites("default")
    assert sites == {"": "target", "encoder": "extra"}
    prompt = adapters.components("default")["encoder"].prompt
    torch.testing.assert_close(prompt, pm.prompt_encoder["default"].embedding.weight[:P], atol=0, rtol=0)


def test_peft_file_for_another_model_is_refused(tmp_path):
    pm = get_peft_model(make_model("llama"), peft_config("llama", "prefix")).eval()
    pm.save_pretrained(tmp_path)
    adapters = ak.attach(make_model("gpt2"))
    with pytest.raises(AdapterFileError, match="wide"):
        adapters.load(tmp_path)
    assert adapters.names == []


# --- generation with a KV cache ------------------------------------------------------------------
GEN = [(f, k) for f in ("gpt2", "llama") for k in ("prompt", "prefix")]


def _prefix_cache(model, prefix: torch.Tensor, batch: int):
    """A DynamicCache holding the prefix, built by hand from peft's layout (P, L * 2 * kv_heads * head_dim)."""
    from transformers import DynamicCache

    cfg = model.config
    layers = cfg.num_hidden_layers
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = prefix.view(P, layers, 2, heads, head_dim)
    cache = DynamicCache(config=cfg)
    for i in range(layers):
        k = kv[:, i, 0].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
        v = kv[:, i, 1].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
        cache.update(k, v, i)
    return cache


@torch.no_grad()
def reference_generate(family: str, kind: str, comp, ids: torch.Tensor, mask: torch.Tensor, steps: int):
    """Greedy decoding without cache on a clean copy of the base model: each step feeds the whole sequence
    with the virtual tokens put in by hand; real tokens get padding-aware positions after the P virtual ones."""
    base = make_model(family)
    batch = ids.shape[0]
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ones = mask.new_ones(batch, P)
        if kind == "prompt":
            embeds = torch.cat([comp.prompt.expand(batch, -1, -1), base.get_input_embeddings()(ids)], dim=1)
            out = base(
                inputs_embeds=embeds,
                attention_mask=torch.cat([ones, mask], 1),
                position_ids=torch.cat([torch.arange(P).expand(batch, -1), pos + P], 1),
                use_cache=False,
            )
        else:
            out = base(
                input_ids=ids,
                attention_mask=torch.cat([ones, mask], 1),
                position_ids=pos + P,
                past_key_values=_prefix_cache(base, comp.prefix, batch),
            )
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, mask.new_ones(batch, 1)], 1)
    return ids


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
@pytest.mark.parametrize(("family", "kind"), GEN, ids=[f"{f}-{k}" for f, k in GEN])
def test_generate_with_cache_equals_reference(family, kind, padded):
    model = make_model(family)
    model.generation_config.eos_token_id = None  # always run all steps
    model.generation_config.pad_token_id = 0
    adapters = ak.attach(model)
    torch.manual_seed(3)
    adapters.add("a", ours_config(kind))
    perturb(adapters.parameters("a"))
    x = inputs(family) if padded else make_inputs(family)
    steps = 6
    out = model.generate(**x, max_new_tokens=steps, do_sample=False)
    (comp,) = adapters.components("a").values()
    ref = reference_generate(family, kind, comp, x["input_ids"], x["attention_mask"], steps)
    assert out.tolist() == ref.tolist()
    assert torch.equal(model.generate(**x, max_new_tokens=steps, do_sample=False, use_cache=False), out)


@pytest.mark.parametrize(("family", "kind"), CASES[2:], ids=[f"{f}-{k}" for f, k in CASES[2:]])
def test_generate_equals_peft(family, kind):
    """Without padding (peft drops the padding-aware positions of prompt tuning), generation equals peft's."""
    skip_if_peft_misses_cache_rename("peft's generate() with virtual tokens")
    model = make_model(family)
    adapters = ak.attach(model)
    torch.manual_seed(3)
    adapters.add("a", ours_config(kind))
    perturb(adapters.parameters("a"))
    x = make_inputs(family)
    kw = {
        "input_ids": x["input_ids"],
        "attention_mask": x["attention_mask"],
        "max_new_tokens": 5,
        "do_sample": False,
    }
    ours = model.generate(**kw)
    pm = get_peft_model(make_model(family), peft_config(family, kind)).eval()
    comp = next(c for c in adapters.components("a").values() if isinstance(c, (SoftPrompt, PrefixKV)))
    with torch.no_grad():
        weight = pm.prompt_encoder["default"].embedding.weight
        if kind == "prompt":
            weight[:P].copy_(comp.prompt)
        elif TASK[family] == "SEQ_2_SEQ_LM":  # peft's slot (2 i) mod L for decoder layer i
            weight.copy_(comp.prefix.view(P, 2, -1)[:, [0, 0]].reshape(P, -1))
            comp.prefix.view(P, 2, -1)[:, 1] = comp.prefix.view(P, 2, -1)[:, 0]
            ours = model.generate(**kw)
        else:
            weight.copy_(comp.prefix)
    assert pm.generate(**kw).tolist() == ours.tolist()


def test_stacked_prompt_and_prefix_generate_consistently():
    """Two model-level adapters active together: each adds its virtual tokens once; cache == no cache."""
    model = make_model("llama")
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("pre", ak.PrefixTuning(num_virtual_tokens=2))
    adapters.add("prompt", ak.PromptTuning(num_virtual_tokens=3))
    adapters.add("prompt2", ak.PromptTuning(num_virtual_tokens=2))
    adapters.activate("prompt", "pre", "prompt2")
    x = inputs("llama")
    out = model.generate(**x, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(**x, max_new_tokens=5, do_sample=False, use_cache=False), out)
    assert logits(model, x).shape == (2, 7, 100)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_beam_search_with_cache_equals_no_cache(family):
    model = make_model(family)
    adapters = ak.attach(model)
    torch.manual_seed(2)
    adapters.add("pre", ak.PrefixTuning(num_virtual_tokens=2))
    adapters.add("prompt", ak.PromptTuning(num_virtual_tokens=2))
    adapters.activate("pre", "prompt")
    x = inputs(family)
    kw = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"], "max_new_tokens": 4, "num_beams": 3}
    assert torch.equal(model.generate(**kw), model.generate(**kw, use_cache=False))


def test_t5_generate_with_cache_equals_no_cache():
    for config in (ak.PromptTuning(num_virtual_tokens=P), ak.PrefixTuning(num_virtual_tokens=P)):
        model = make_model("t5")
        adapters = ak.attach(model)
        torch.manual_seed(1)
        adapters.add("a", config)
        perturb(adapters.parameters("a"))
        x = inputs("t5")
        kw = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"], "max_new_tokens": 5}
        assert torch.equal(model.generate(**kw), model.generate(**kw, use_cache=False))


# --- labels, loss, training ----------------------------------------------------------------------
def test_causal_lm_loss_ignores_virtual_positions():
    model = make_model("gpt2")
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", ak.PromptTuning(num_virtual_tokens=P))
    x = make_inputs("gpt2")
    labels = x["input_ids"].clone()
    labels[0, :2] = -100
    out = model(**x, labels=labels)
    assert out.logits.shape == (2, 7, 100)  # the prompt positions are stripped from the logits

    base = make_model("gpt2")
    comp = adapters.components("a")[""]
    with torch.no_grad():
        embeds = torch.cat([comp.prompt.expand(2, -1, -1), base.get_input_embeddings()(x["input_ids"])], 1)
        full = base(inputs_embeds=embeds).logits  # (2, P + 7, V)
    # position P-1 (the last virtual token) predicts the first real token, as in peft
    targets = torch.cat([torch.full((2, P), -100), labels], 1)
    manual = F.cross_entropy(full[:, :-1].reshape(-1, 100), targets[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual, **TOL)
    torch.testing.assert_close(out.logits, full[:, P:], **TOL)


@pytest.mark.parametrize(("family", "kind"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_loss_equals_peft(family, kind):
    if family == "bert" and kind == "prefix":
        skip_if_peft_misses_cache_rename("peft's prefix tuning on BERT")
    model = make_model(family)
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", ours_config(kind))
    x = inputs(family)
    x["labels"] = (
        torch.tensor([0, 2])
        if family == "bert"
        else x["input_ids"][:, :4].contiguous()
        if TASK[family] == "SEQ_2_SEQ_LM"
        else x["input_ids"]
    )
    pm = get_peft_model(make_model(family), peft_config(family, kind)).eval()
    comp = next(c for c in adapters.components("a").values() if isinstance(c, (SoftPrompt, PrefixKV)))
    with torch.no_grad():
        weight = pm.prompt_encoder["default"].embedding.weight
        if kind == "prompt":
            weight[:P].copy_(comp.prompt)
        else:
            if TASK[family] == "SEQ_2_SEQ_LM":  # peft's slot (2 i) mod L for decoder layer i
                comp.prefix.view(P, 2, -1)[:, 1] = comp.prefix.view(P, 2, -1)[:, 0]
            weight.copy_(comp.prefix)
        torch.testing.assert_close(model(**x).loss, pm(**x).loss, **TOL)


@pytest.mark.parametrize(
    "config",
    [ak.PromptTuning(num_virtual_tokens=4), ak.PrefixTuning(num_virtual_tokens=4, prefix_projection=True)],
    ids=["prompt", "prefix-projection"],
)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_lowers_loss_and_only_adapter_params_learn(family, config):
    model = make_model(family)
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", config)
    adapters.train("a")
    model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if "ak_adapters" not in k}
    x = make_inputs(family)
    x["labels"] = torch.full_like(x["input_ids"], 5)  # a target the frozen random model can be steered to
    opt = torch.optim.Adam(adapters.parameters("a"), lr=0.1)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = model(**x).loss
        loss.backward()
        for name, p in model.named_parameters():
            if "ak_adapters" not in name:
                assert p.grad is None, name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- API and errors ------------------------------------------------------------------------------
def test_prompt_config_validation_and_text_init():
    with pytest.raises(ValueError, match="init_token_ids"):
        ak.PromptTuning(init="text")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        ak.PromptTuning(num_virtual_tokens=0)

    class Tok:
        def encode(self, text):
            return [ord(c) % 50 + 2 for c in text]

    cfg = ak.PromptTuning.from_text("abc", Tok(), num_virtual_tokens=5)
    assert cfg.init_token_ids == (ord("a") % 50 + 2, ord("b") % 50 + 2, ord("c") % 50 + 2)
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", cfg)
    ids = torch.tensor(list(cfg.init_token_ids) * 2)[:5]
    torch.testing.assert_close(adapters.components("a")[""].prompt, model.get_input_embeddings().weight[ids])
    assert ak.get_config("ptuning_v2") == ak.PrefixTuning(num_virtual_tokens=20, prefix_projection=False)


def test_model_level_methods_refuse_module_targets_and_mixed_kinds_in_one_routing():
    model = make_model("gpt2")
    adapters = ak.attach(model)
    with pytest.raises(TargetError, match="whole model"):
        adapters.add("a", ak.PromptTuning(targets=["attn.qkv"]))
    with pytest.raises(TargetError, match="whole model"):
        adapters.add("a", ak.PrefixTuning(targets=["attn.qkv"]))
    assert adapters.names == []
    adapters.add("a", ak.PrefixTuning(num_virtual_tokens=2))
    adapters.add("b", ak.PromptTuning(num_virtual_tokens=2))
    with pytest.raises(NotImplementedError, match="together"), adapters.route(["a", "b"]):
        model(**make_inputs("gpt2"))


@pytest.mark.parametrize("name", ["a", "b"])
def test_routing_every_row_to_one_model_level_adapter_is_its_ordinary_run(name):
    """A plan with one adapter on every row takes the unrouted path, so model-level methods route too."""
    model = make_model("gpt2")
    adapters = ak.attach(model)
    adapters.add("a", ak.PrefixTuning(num_virtual_tokens=2))
    adapters.add("b", ak.PromptTuning(num_virtual_tokens=2))
    x = make_inputs("gpt2")
    batch = x["input_ids"].shape[0]
    with torch.no_grad():
        adapters.activate(name)
        expected = model(**x).logits
        adapters.activate([])
        with adapters.route([name] * batch):
            got = model(**x).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_cache_without_the_prefix_is_refused():
    model = make_model("llama")
    x = make_inputs("llama")
    with torch.no_grad():
        cache = model(**x, use_cache=True).past_key_values  # computed by the base model
    adapters = ak.attach(model)
    adapters.add("a", ak.PrefixTuning(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="without this prefix"):
        model(input_ids=x["input_ids"][:, :1], past_key_values=cache)


def test_token_classification_labels_and_logits_line_up():
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=5)  # fmt: skip
    model = BertForTokenClassification(cfg).eval()
    ak.attach(model).add("a", ak.PromptTuning(num_virtual_tokens=P))
    x = make_inputs("bert")
    labels = torch.randint(0, 5, (2, 7))
    out = model(**x, labels=labels)
    assert out.logits.shape == (2, 7, 5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, 5), labels.reshape(-1)), **TOL)


def test_prefix_on_a_model_that_ignores_the_cache_raises():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64
    )
    model = DistilBertForSequenceClassification(cfg).eval()
    adapters = ak.attach(model)
    adapters.add("a", ak.PrefixTuning(num_virtual_tokens=P))
    with pytest.raises(TypeError, match="did not read past_key_values"):
        model(**make_inputs("bert"))
    adapters.delete("a")
    adapters.add("b", ak.PromptTuning(num_virtual_tokens=P))  # prompt tuning works on it
    assert model(**make_inputs("bert")).logits.shape == (2, 2)


# --- flat encoder-decoder configs: BART, mBART, Whisper ------------------------------------------
SEQ2SEQ = ["bart", "mbart", "whisper"]


def _seq2seq(family: str) -> torch.nn.Module:
    """A tiny ``family`` model with larger random weights (greedy decoding then varies), and no forced or
    suppressed tokens, so ``generate()`` is a plain argmax loop."""
    model = make_model(family)
    perturb(model.parameters(), seed=11)
    gen = model.generation_config
    gen.eos_token_id = gen.forced_eos_token_id = gen.forced_bos_token_id = None
    gen.begin_suppress_tokens = gen.suppress_tokens = None
    return model


def _prefix_cache_seq2seq(model, prefix: torch.Tensor, batch: int):
    """An EncoderDecoderCache whose decoder self-attention holds the prefix, built by hand from peft's layout
    ``(P, L * 2 * heads * head_dim)`` with the sizes of the config's *decoder* fields."""
    from transformers import DynamicCache, EncoderDecoderCache

    cfg = model.config
    layers, heads = cfg.decoder_layers, cfg.decoder_attention_heads
    kv = prefix.view(P, layers, 2, heads, cfg.d_model // heads)
    self_attn = DynamicCache()
    for i in range(layers):
        k = kv[:, i, 0].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
        v = kv[:, i, 1].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
        self_attn.update(k, v, i)
    return EncoderDecoderCache(self_attn, DynamicCache())


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_prefix_on_flat_encoder_decoder_configs(family):
    """BART-style configs keep the decoder sizes in ``decoder_*`` fields, which transformers'
    ``get_text_config(decoder=True)`` resets to the class defaults on the copy it returns (a 2-layer BART read as
    12 layers x 16 heads, IndexError). The layout comes from the model; logits equal the base model run with the
    prefix put into its cache by hand, and generate() with the cache equals a greedy reference loop and
    ``use_cache=False`` (greedy and beam search)."""
    from adapterkit.methods.prefix import KVLayout
    from adapterkit.methods.prompt import cache_key

    model = _seq2seq(family)
    cfg = model.config
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", ak.PrefixTuning(num_virtual_tokens=P))
    comp = adapters.components("a")[""]
    heads = cfg.decoder_attention_heads
    assert comp.layout == KVLayout(cfg.decoder_layers, heads, cfg.d_model // heads, True)
    assert (cfg.decoder_layers, heads) == (2, 4) and cfg.get_text_config(decoder=True).decoder_layers != 2

    x = make_inputs(family)
    batch = x["decoder_input_ids"].shape[0]
    base = _seq2seq(family)
    key = cache_key(type(base))
    with torch.no_grad():
        ref = base(**x, **{key: _prefix_cache_seq2seq(base, comp.prefix, batch)}, use_cache=True).logits
    ours = logits(model, x)
    torch.testing.assert_close(ours, ref, **TOL)
    assert (ours - logits(base, x)).abs().max() > 1e-3  # the prefix changes the output

    enc = {k: v for k, v in x.items() if not k.startswith("decoder")}
    steps = 5
    out = model.generate(**enc, max_new_tokens=steps, do_sample=False)
    ids = torch.full((batch, 1), cfg.decoder_start_token_id)
    with torch.no_grad():
        for _ in range(steps):  # no cache reuse: the whole decoder sequence each step, the prefix put in by hand
            cache = _prefix_cache_seq2seq(base, comp.prefix, batch)
            step = base(**enc, decoder_input_ids=ids, **{key: cache}, use_cache=True).logits[:, -1]
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], 1)
    assert out[:, -steps:].tolist() == ids[:, 1:].tolist()
    assert len(set(out[:, -steps:].flatten().tolist())) > 1  # not a degenerate constant sequence
    assert torch.equal(model.generate(**enc, max_new_tokens=steps, do_sample=False, use_cache=False), out)
    beam = {"max_new_tokens": 4, "num_beams": 3, "do_sample": False}
    assert torch.equal(model.generate(**enc, **beam), model.generate(**enc, **beam, use_cache=False))
