"""AdapterHub prefix tuning, prompt tuning, MAM and UniPELT (issue 16 item 1), and the options they need:
``PrefixTuning(positions="keep", gated=True)``, ``SequenceGated``, ``EmbeddingPrompt``; and SeqBnInv on BERT/GPT-2
(``Invertible(dim=...)`` after a non-embedding module).

The fixtures (tests/fixtures/adapterhub, written by the real ``adapters`` 1.3.0 library) are read with
``adapters.load`` and give the library's outputs; tests/test_adapterhub.py runs every fixture, this file checks
what they become, the ``positions`` option itself (generation with a KV cache, per-row routing) and the
refusals.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import adapterkit as ak
from adapterkit.methods.bottleneck_sublayer import SublayerBottleneck
from adapterkit.methods.prefix import PrefixGate, PrefixKV
from adapterkit.methods.seq_gate import LoRAGate
from adapterkit.targeting import TargetError
from test_adapterhub import CASES, FIXTURES, expected, fresh, run

from conftest import make_inputs, make_model

PREFIX = sorted(c for c, i in CASES.items() if i["method"].startswith("prefix_tuning"))
MAM = sorted(c for c, i in CASES.items() if i["method"] == "mam")
UNIPELT = sorted(c for c, i in CASES.items() if i["method"] == "unipelt")
TOL = 1e-5  # measured <= 7.2e-7 (see /tmp/notes/ahub-prefix.md)


def _load(case: str):
    info = CASES[case]
    model = fresh(info["family"])
    adapters = ak.attach(model)
    adapters.load(FIXTURES / case / "adapter", allow_pickle=info["file"] == "pickle", activate=True)
    return model, adapters


def _diff(model, case: str) -> float:
    exp = expected(case)
    out, hidden = run(model, exp)
    return max((out - exp["output"]).abs().max().item(), (hidden - exp["hidden"]).abs().max().item())


@pytest.mark.parametrize("case", PREFIX)
def test_prefix_loads_as_a_plain_prefix_that_keeps_positions(case):
    """MLP, flat and ejected files (the ejected config still says flat: false: the tensors decide) become
    ``PrefixTuning(positions="keep")`` holding the computed prefix, with the library's outputs."""
    model, adapters = _load(case)
    cfg = adapters.config("task")
    assert isinstance(cfg, ak.PrefixTuning)
    assert (cfg.num_virtual_tokens, cfg.prefix_projection, cfg.positions) == (5, False, "keep")
    if CASES[case]["method"] == "prefix_tuning_ejected":
        data = json.loads((FIXTURES / case / "adapter" / "adapter_config.json").read_text())
        assert data["config"]["flat"] is False
    assert _diff(model, case) <= TOL


@pytest.mark.parametrize("case", MAM)
def test_mam_is_a_union_of_prefix_and_parallel_bottleneck(case):
    model, adapters = _load(case)
    cfg = adapters.config("task")
    assert isinstance(cfg, ak.Union) and not cfg.gated
    prefix, bottleneck = cfg.configs
    assert isinstance(prefix, ak.PrefixTuning) and prefix.positions == "keep"
    assert isinstance(bottleneck, ak.Bottleneck)
    assert (bottleneck.placement, bottleneck.hook, bottleneck.scaling) == ("parallel", "sublayer", 4.0)
    comps = adapters.components("task")
    assert isinstance(comps[""], PrefixKV)
    assert sum(isinstance(c, SublayerBottleneck) for c in comps.values()) == 2  # one FFN sub-layer per layer
    assert _diff(model, case) <= TOL


@pytest.mark.parametrize("case", UNIPELT)
def test_unipelt_is_a_union_of_sequence_gated_members(case):
    """UniPELT: the gated prefix (a gate on each layer's self-attention), the gated SeqBn and the gated LoRA (alpha
    = r: AdapterHub's gate replaces alpha / r; GPT-2's fused c_attn has one gate output per matrix)."""
    model, adapters = _load(case)
    cfg = adapters.config("task")
    assert isinstance(cfg, ak.Union) and not cfg.gated
    prefix, bottleneck, lora = cfg.configs
    assert isinstance(prefix, ak.PrefixTuning) and prefix.gated and prefix.gate_outputs == 1
    assert isinstance(bottleneck, ak.SequenceGated) and isinstance(bottleneck.config, ak.Bottleneck)
    assert bottleneck.config.placement == "pfeiffer"
    assert isinstance(lora, ak.SequenceGated) and isinstance(lora.config, ak.LoRA)
    assert lora.config.alpha == lora.config.r == 4
    assert lora.fused_qkv == ("qv" if CASES[case]["family"] == "gpt2" else "")
    comps = adapters.components("task")
    assert sum(isinstance(c, PrefixGate) for c in comps.values()) == 2
    assert sum(isinstance(c, LoRAGate) for c in comps.values()) == (2 if CASES[case]["family"] == "gpt2" else 4)
    assert _diff(model, case) <= TOL


def test_separate_key_and_value_prefix_gates():
    """shared_gating false: two gate outputs, keys scaled by the first and values by the second."""
    model, adapters = _load("llama_prefix_tuning_gated")
    cfg = adapters.config("task")
    assert cfg.gated and cfg.gate_outputs == 2
    gates = [c for c in adapters.components("task").values() if isinstance(c, PrefixGate)]
    assert [tuple(g.gate.weight.shape) for g in gates] == [(2, 32), (2, 32)]
    assert _diff(model, "llama_prefix_tuning_gated") <= TOL
    with torch.no_grad():
        for g in gates:
            g.gate.weight.copy_(g.gate.weight.flip(0))  # keys and values swapped: another model
            g.gate.bias.copy_(g.gate.bias.flip(0))
    assert _diff(model, "llama_prefix_tuning_gated") > 1e-4


def test_gated_lora_on_fused_k_and_v():
    """GPT-2's fused c_attn with k and v enabled: one gate output per enabled matrix (k, v), LoRA alpha = r."""
    model, adapters = _load("gpt2_lora_gated")
    cfg = adapters.config("task")
    assert isinstance(cfg, ak.SequenceGated) and cfg.fused_qkv == "kv"
    assert cfg.config.alpha == cfg.config.r == 2
    assert _diff(model, "gpt2_lora_gated") <= TOL


@pytest.mark.parametrize("kind", [PrefixGate, LoRAGate, SublayerBottleneck])
def test_each_unipelt_gate_matters(kind):
    """A gate set to 0.5 everywhere (zero weights and bias) changes the outputs: each gate is read and used."""
    model, adapters = _load("llama_unipelt")
    with torch.no_grad():
        for comp in adapters.components("task").values():
            if isinstance(comp, kind):
                comp.gate.weight.zero_()
                comp.gate.bias.zero_()
    assert _diff(model, "llama_unipelt") > 1e-4


@pytest.mark.parametrize(
    "case", ["llama_prefix_tuning", "bert_prefix_tuning_ejected", "gpt2_mam", "bert_unipelt", "gpt2_unipelt"]
)
def test_native_save_reloads_the_same(case, tmp_path):
    model, adapters = _load(case)
    adapters.save("task", tmp_path / "native")
    again = fresh(CASES[case]["family"])
    ak.attach(again).load(tmp_path / "native", activate=True)
    assert _diff(again, case) <= TOL


def test_positions_without_the_option_differ():
    """The option matters: the same prefix under peft's shifted positions misses the library's outputs."""
    model, adapters = _load("llama_prefix_tuning")
    prefix = adapters.components("task")[""].prefix.detach().clone()
    base = fresh("llama")
    shifted = ak.attach(base)
    shifted.add("s", ak.PrefixTuning(num_virtual_tokens=5))
    shifted.components("s")[""].import_state({"prefix": prefix}, base)
    shifted.activate("s")
    assert _diff(base, "llama_prefix_tuning") > 1e-3


def test_prompt_tuning_is_a_prompt_after_the_embeddings():
    """AdapterHub's prompt goes after BERT's embeddings module (positions and LayerNorm applied to the real tokens
    only) and the outputs keep the P virtual positions: EmbeddingPrompt, with the library's outputs."""
    model, adapters = _load("bert_prompt_tuning")
    cfg = adapters.config("task")
    assert isinstance(cfg, ak.EmbeddingPrompt) and cfg.num_virtual_tokens == 4
    assert sorted(adapters.sites("task")) == ["", "embeddings"]
    exp = expected("bert_prompt_tuning")
    assert run(model, exp)[0].shape == (2, 4 + exp["input_ids"].shape[1], 32)
    assert _diff(model, "bert_prompt_tuning") <= TOL


def test_prompt_tuning_native_round_trip_and_peft_style_differs(tmp_path):
    model, adapters = _load("bert_prompt_tuning")
    adapters.save("task", tmp_path / "native")
    again = fresh("bert")
    ak.attach(again).load(tmp_path / "native", activate=True)
    assert _diff(again, "bert_prompt_tuning") <= TOL
    # the same prompt in front of inputs_embeds (peft's placement) is another model
    prompt = adapters.components("task")["embeddings"].prompt.detach()
    other = fresh("bert")
    peft_style = ak.attach(other)
    peft_style.add("p", ak.PromptTuning(num_virtual_tokens=4))
    with torch.no_grad():
        peft_style.components("p")[""].prompt.copy_(prompt)
    exp = expected("bert_prompt_tuning")
    with torch.no_grad():
        ours = other(input_ids=exp["input_ids"], attention_mask=exp["attention_mask"]).last_hidden_state
    assert ours.shape == exp["output"].shape  # a bare BertModel keeps the virtual positions there too
    assert (ours - exp["output"]).abs().max().item() > 1e-3


def test_embedding_prompt_needs_an_embeddings_module():
    adapters = ak.attach(make_model("gpt2"))
    with pytest.raises(TargetError, match="`embeddings` module"):
        adapters.add("p", ak.EmbeddingPrompt(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        ak.EmbeddingPrompt(num_virtual_tokens=0)


PADDED = sorted(c for c in CASES if "padded.output" in expected(c))


def test_padded_fixtures_exist():
    assert {CASES[c]["method"] for c in PADDED} == {"prefix_tuning", "mam", "unipelt", "prompt_tuning"}


@pytest.mark.parametrize("case", PADDED)
def test_left_padded_batch_gives_the_library_outputs(case):
    """The same inputs with row 1 left-padded by 3: the prefix positions (0..L-1 whatever the padding, as the
    library numbers them without position_ids), gates averaged over padded positions too, the prompt's mask."""
    model, _ = _load(case)
    exp = expected(case)
    with torch.no_grad():
        out = model(
            input_ids=exp["input_ids"], attention_mask=exp["padded.attention_mask"], output_hidden_states=True
        )
    got = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert (got - exp["padded.output"]).abs().max().item() <= TOL  # measured <= 4.8e-7, padded positions too
    assert (out.hidden_states[-1] - exp["padded.hidden"]).abs().max().item() <= TOL
    assert (exp["padded.output"] - exp["output"]).abs().max().item() > 1e-3  # the padding matters


@pytest.mark.parametrize(
    ("case", "site"), [("bert_seq_bn_inv", "embeddings"), ("gpt2_seq_bn_inv", "transformer.drop")]
)
def test_seq_bn_inv_couples_where_the_library_hooks_it(case, site):
    """SeqBnInv: the NICE coupling after BERT's embeddings module / GPT-2's drop (after wte + wpe), as the library's
    post_embedding_forward hooks; no inverse at the LM head (a plain model under adapters.init has none)."""
    model, adapters = _load(case)
    _, invertible = adapters.config("task").configs
    assert isinstance(invertible, ak.Invertible)
    assert (tuple(invertible.targets), invertible.dim, invertible.inverse_at_output) == ((site,), 32, False)
    assert _diff(model, case) <= TOL


def test_invertible_dim_is_checked():
    adapters = ak.attach(make_model("llama"))
    with pytest.raises(ValueError, match="outputs 32 features, but dim=16"):
        adapters.add("i", ak.Invertible(dim=16))
    with pytest.raises(TargetError, match="invertible cannot act on"):
        adapters.add("j", ak.Invertible(targets=["model.norm"]))
    with pytest.raises(ValueError, match="dim must be an integer >= 2"):
        ak.Invertible(dim=1)


# --- PrefixTuning(positions="keep") -------------------------------------------------------------------------
P = 3


def _perturbed(model, cfg, name="a", seed=3):
    adapters = ak.attach(model)
    torch.manual_seed(seed)
    adapters.add(name, cfg)
    with torch.no_grad():
        for p in adapters.parameters(name):
            p.add_(0.3 * torch.randn(p.shape))
    return adapters


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_keep_equals_shift_with_positions_moved_back(family):
    """``keep`` gives the real tokens the positions a run without prefix gives them: the ``shift`` adapter with
    explicit ``position_ids - P`` (which it moves forward by P again) computes the same."""
    x = make_inputs(family)
    keep_model, shift_model = make_model(family), make_model(family)
    keep = ak.attach(keep_model)
    keep.add("a", ak.PrefixTuning(num_virtual_tokens=P, positions="keep"))
    shift = ak.attach(shift_model)
    shift.add("a", ak.PrefixTuning(num_virtual_tokens=P))
    with torch.no_grad():
        shift.components("a")[""].prefix.copy_(keep.components("a")[""].prefix)
    keep.activate("a")
    shift.activate("a")
    length = x["input_ids"].shape[1]
    pos = (torch.arange(length) - P).expand(x["input_ids"].shape[0], -1)
    with torch.no_grad():
        a = keep_model(**x).logits
        b = shift_model(**x, position_ids=pos).logits
        c = keep_model(**x, position_ids=pos + P).logits  # given positions are used as they are
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=0)


@torch.no_grad()
def _reference(family, prefix, ids, mask, steps):
    """Greedy decoding without our hook: the prefix put into a fresh cache by hand, the whole sequence fed each
    step, the real tokens numbered as without a prefix (padding-aware, as generate() numbers them)."""
    from transformers import DynamicCache

    base = make_model(family)
    cfg = base.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = prefix.view(P, cfg.num_hidden_layers, 2, heads, head_dim)
    batch = ids.shape[0]
    for _ in range(steps):
        cache = DynamicCache(config=cfg)
        for i in range(cfg.num_hidden_layers):
            k = kv[:, i, 0].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
            v = kv[:, i, 1].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
            cache.update(k, v, i)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = base(
            input_ids=ids,
            attention_mask=torch.cat([mask.new_ones(batch, P), mask], 1),
            position_ids=pos,
            past_key_values=cache,
        )
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, mask.new_ones(batch, 1)], 1)
    return ids


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_keep_generate_with_cache_equals_reference(family, padded):
    model = make_model(family)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    adapters = _perturbed(model, ak.PrefixTuning(num_virtual_tokens=P, positions="keep"))
    adapters.activate("a")
    x = make_inputs(family)
    if padded:
        x["attention_mask"][1, :2] = 0
    steps = 5
    out = model.generate(**x, max_new_tokens=steps, do_sample=False)
    prefix = adapters.components("a")[""].prefix.detach()
    assert out.tolist() == _reference(family, prefix, x["input_ids"], x["attention_mask"], steps).tolist()
    assert torch.equal(model.generate(**x, max_new_tokens=steps, do_sample=False, use_cache=False), out)


def test_gated_prefix_generates_with_the_gate_of_the_prompt():
    """Gates act once, when the prefix enters the KV cache: generate()'s steps reuse the prompt's gated prefix. The
    first new token is the full forward's; later steps equal decoding by hand with the same cache."""
    model = make_model("llama")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    adapters = _perturbed(
        model, ak.PrefixTuning(num_virtual_tokens=P, positions="keep", gated=True, init_weights=False)
    )
    adapters.activate("a")
    x = make_inputs("llama")
    out = model.generate(**x, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        first = model(**x).logits[:, -1].argmax(-1)
        step = model(**x, use_cache=True)
        ids, mask, cache = out[:, : x["input_ids"].shape[1] + 1], x["attention_mask"], step.past_key_values
        for _ in range(3):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            nxt = model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True)
            cache = nxt.past_key_values
            ids = torch.cat([ids, nxt.logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert out[:, x["input_ids"].shape[1]].tolist() == first.tolist()
    assert out.tolist() == ids.tolist()


def test_routed_rows_with_keep_shift_and_base_each_equal_their_run_alone():
    family = "llama"
    model = make_model(family)
    adapters = _perturbed(model, ak.PrefixTuning(num_virtual_tokens=P, positions="keep"), "keep")
    _perturbed(model, ak.PrefixTuning(num_virtual_tokens=P + 2), "shift", seed=4)
    x = make_inputs(family, batch=3)
    names = ["keep", "shift", None]
    alone = []
    with torch.no_grad():
        for b, n in enumerate(names):
            row = {k: v[b : b + 1] for k, v in x.items()}
            adapters.activate(n)
            alone.append(model(**row).logits)
        adapters.activate()
        with adapters.route(names):
            routed = model(**x).logits
    torch.testing.assert_close(routed, torch.cat(alone), atol=1e-5, rtol=0)


def test_positions_option_is_checked():
    with pytest.raises(ValueError, match="positions must be one of 'shift', 'keep'"):
        ak.PrefixTuning(positions="zero")
    adapters = ak.attach(make_model("t5"))
    with pytest.raises(TargetError, match="positions='keep' needs explicit decoder_position_ids"):
        adapters.add("a", ak.PrefixTuning(positions="keep"))
    assert ak.PrefixTuning().positions == "shift"  # peft's semantics stay the default


def test_native_config_round_trip_keeps_the_option(tmp_path):
    model = make_model("gpt2")
    adapters = _perturbed(model, ak.PrefixTuning(num_virtual_tokens=P, positions="keep"))
    adapters.save("a", tmp_path / "a")
    again = ak.attach(make_model("gpt2"))
    again.load(tmp_path / "a")
    assert again.config("a").positions == "keep"


# --- refusals ------------------------------------------------------------------------------------------------
def _edited(tmp_path, case: str, edit) -> str:
    d = tmp_path / case
    shutil.copytree(FIXTURES / case / "adapter", d)
    data = json.loads((d / "adapter_config.json").read_text())
    edit(data["config"])
    (d / "adapter_config.json").write_text(json.dumps(data))
    return d


@pytest.mark.parametrize(
    ("case", "edit", "match"),
    [
        ("bert_prefix_tuning", lambda c: c.update(leave_out=["0"]), "leave_out"),  # leave_out itself is read
        ("bert_mam", lambda c: c["configs"][0].update(leave_out=[-1]), "leave_out"),
        ("bert_mam", lambda c: c["configs"].append(dict(c["configs"][0])), "several members of one kind"),
        ("bert_mam", lambda c: c["configs"].append({"architecture": "reft"}), "members are not read"),
        ("bert_prompt_tuning", lambda c: c.update(combine="prefix_after_bos"), "prefix_after_bos"),
    ],
)
def test_what_cannot_be_read_is_refused_before_the_pickle(tmp_path, case, edit, match):
    adapters = ak.attach(fresh(CASES[case]["family"]))
    with pytest.raises(ak.AdapterFileError, match=match):
        adapters.load(_edited(tmp_path, case, edit))  # no allow_pickle: refused before the weights are read
    assert adapters.names == []


def test_prompt_tuning_on_a_decoder_is_refused():
    adapters = ak.attach(fresh("gpt2"))
    with pytest.raises(ak.AdapterFileError, match="prompt tuning on a 'gpt2' model is not read"):
        adapters.load(FIXTURES / "bert_prompt_tuning" / "adapter")
    assert adapters.names == []


def test_wrong_base_model_is_refused():
    adapters = ak.attach(fresh("bert"))
    with pytest.raises(ak.AdapterFileError, match="wrong base model"):
        adapters.load(FIXTURES / "gpt2_prefix_tuning_flat" / "adapter", allow_pickle=True)
    assert adapters.names == []


@pytest.mark.parametrize("opts", [{"positions": "keep"}, {"gated": True}])
def test_peft_export_refuses_adapterhub_style_prefixes(tmp_path, opts) -> None:
    """peft's prefix numbers positions after the prefix and has no gate: such adapters are not written as peft's."""
    adapters = ak.attach(make_model("llama"))
    adapters.add("p", ak.PrefixTuning(num_virtual_tokens=2, **opts))
    with pytest.raises(ValueError, match="AdapterHub-style prefix"):
        adapters.export("p", tmp_path / "p", format="peft")
    assert not (tmp_path / "p" / "adapter_model.safetensors").exists()


def test_sequence_gated_survives_replace() -> None:
    """``replace()`` re-validates a SequenceGated whose targets were copied from its gated config (a Union with
    ``init_weights=False`` does that to each member); targets set on SequenceGated itself stay refused."""
    gated = ak.SequenceGated(config=ak.LoRA(targets=["attn.q"]))
    again = gated.replace(init_weights=False)
    assert again.config.targets == ("attn.q",) or list(again.config.targets) == ["attn.q"]
    assert not again.config.init_weights
    ak.Union(ak.PrefixTuning(positions="keep"), gated, init_weights=False)
    with pytest.raises(ValueError, match="on the gated config"):
        gated.replace(targets=["attn.v"])
