"""Prompt and prefix tuning on models that do not fit them: one clear error saying why and what to use instead,
never a raw shape error (issue 19 item 5).

Where the refusal happens (DEVELOPERS.md "Decisions"): at ``add`` when the model's signatures or config show it
cannot take the method (no token input, no decoder, layers that cannot receive a KV cache), at the first call when
only running the model shows it (layers that receive the cache through ``**kwargs`` and ignore it).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.targeting import TargetError

from conftest import make_inputs, make_model

P = 3
PROMPTS = {
    "prompt": lambda: ak.PromptTuning(num_virtual_tokens=P),
    "ptuning": lambda: ak.PTuning(num_virtual_tokens=P),
}


def _whisper_classifier() -> nn.Module:
    from transformers import WhisperConfig, WhisperForAudioClassification

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                        max_source_positions=16, max_target_positions=32, num_labels=3)  # fmt: skip
    return WhisperForAudioClassification(cfg).eval()


def _clip_text(cls: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=32, projection_dim=16)  # fmt: skip
    return getattr(transformers, cls)(cfg).eval()


def _distilbert() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64
    )
    return DistilBertForSequenceClassification(cfg).eval()


def _padded(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    x["attention_mask"][1, :2] = 0
    return x


# --- WhisperForAudioClassification: Whisper's encoder-decoder config, the encoder alone -------------------------
def test_prefix_on_whisper_audio_classification_is_refused_at_add():
    """Before: ``add`` passed (its config says encoder-decoder and its forward takes ``labels``) and the first call
    failed with "could not find the batch size"."""
    adapters = ak.attach(_whisper_classifier())
    with pytest.raises(
        TargetError,
        match=r"WhisperForAudioClassification: it takes no decoder token ids .*its inputs: input_features",
    ) as err:
        adapters.add("p", ak.PrefixTuning(num_virtual_tokens=P))
    assert "LoRA (ak.LoRA())" in str(err.value)
    assert adapters.names == []


@pytest.mark.parametrize("method", list(PROMPTS))
def test_prompts_on_whisper_audio_classification_are_refused_without_suggesting_prefix_tuning(method):
    """Prompt tuning refuses its encoder (audio features, no token ids); prefix tuning, suggested for Whisper's
    decoder, is not suggested for a model that has no decoder."""
    adapters = ak.attach(_whisper_classifier())
    with pytest.raises(TargetError, match="takes no input_ids/inputs_embeds.*input_features") as err:
        adapters.add("p", PROMPTS[method]())
    assert "LoRA (ak.LoRA())" in str(err.value) and "prefix tuning" not in str(err.value)
    assert adapters.names == []


def test_lora_is_what_whisper_audio_classification_takes():
    """The suggested alternative works on it."""
    model = _whisper_classifier()
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(input_features=x).logits
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(targets=["q_proj", "v_proj"], r=2, init_weights=False))
    with torch.no_grad():
        assert not torch.allclose(model(input_features=x).logits, base)


# --- models whose layers are given the cache through **kwargs and ignore it: the first call says so ------------
def _t5_encoder() -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)).eval()


IGNORING = {
    "t5-encoder": _t5_encoder,  # T5's encoder layers pass the cache on but only decoders read it
    "clip-text": lambda: _clip_text("CLIPTextModel"),
    "clip-text-projection": lambda: _clip_text("CLIPTextModelWithProjection"),
    "distilbert": _distilbert,
}


@pytest.mark.parametrize("kind", list(IGNORING))
def test_prefix_on_a_model_that_ignores_the_cache_says_why_with_a_padded_mask(kind):
    """With a padded attention mask (extended by ``P`` for the prefix) the first layer's attention met the real
    tokens' mask in a raw shape error; now one TypeError names the model, the layer, the original error (chained)
    and the alternatives."""
    model = IGNORING[kind]()
    adapters = ak.attach(model)
    adapters.add("p", ak.PrefixTuning(num_virtual_tokens=P))
    name = type(model).__name__
    with pytest.raises(
        TypeError, match=rf"{name} did not read past_key_values .*(first layer|takes no KV cache)"
    ) as e:
        model(**_padded(make_inputs("bert")))
    assert "LoRA (ak.LoRA())" in str(e.value)
    assert ("PromptTuning" in str(e.value)) == (not kind.startswith("clip"))  # CLIP text: no inputs_embeds
    assert not any("forward" in m.__dict__ for m in model.modules())  # no wrapper left behind
    with pytest.raises(TypeError, match="did not read past_key_values"):  # the same on every call, not only once
        model(**_padded(make_inputs("bert")))


def test_prefix_on_clip_text_says_why_under_per_row_routing():
    model = _clip_text("CLIPTextModel")
    adapters = ak.attach(model)
    adapters.add("p", ak.PrefixTuning(num_virtual_tokens=P))
    adapters.add("q", ak.PrefixTuning(num_virtual_tokens=P + 1))
    with adapters.route(["p", "q"]), pytest.raises(TypeError, match="CLIPTextModel did not read past_key_values"):
        model(**_padded(make_inputs("bert")))
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_clip_model_with_a_prefix_says_why():
    """CLIPModel (two towers): prefix tuning would act on the text tower, which ignores the cache."""
    from transformers import CLIPConfig, CLIPModel

    text = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "max_position_embeddings": 32}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 16, "patch_size": 8}  # fmt: skip
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    adapters = ak.attach(model)
    adapters.add("p", ak.PrefixTuning(num_virtual_tokens=P))
    x = {**_padded(make_inputs("bert")), "pixel_values": torch.randn(2, 3, 16, 16)}
    with pytest.raises(TypeError, match="CLIPModel did not read past_key_values.*CLIPEncoderLayer.*LoRA"):
        model(**x)


# --- the checks do not refuse models that read the cache ----------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5", "bart", "whisper"])
def test_prefix_still_works_and_the_first_call_check_stops(family):
    """Models that read the cache pass both checks; after the first call no wrapper is installed again."""
    model = make_model(family)
    adapters = ak.attach(model)
    adapters.add("p", ak.PrefixTuning(num_virtual_tokens=P))
    x = make_inputs(family)
    if "attention_mask" in x:
        x = _padded(x)
    with torch.no_grad():
        first = model(**x)
    component = next(c for c in adapters.components("p").values())
    assert component.__dict__.get("_reaches_layers") is True
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        again = model(**x)
    torch.testing.assert_close(again.logits if hasattr(again, "logits") else again[0], first.logits
                               if hasattr(first, "logits") else first[0])  # fmt: skip


def test_deberta_v1_is_refused_at_add_too():
    from transformers import DebertaConfig, DebertaModel

    cfg = DebertaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    adapters = ak.attach(DebertaModel(cfg).eval())
    with pytest.raises(TargetError, match="DebertaModel: its layers take no KV cache.*DebertaLayer"):
        adapters.add("p", ak.PrefixTuning(num_virtual_tokens=P))


def test_the_first_call_check_puts_back_a_forward_set_on_the_block():
    """A block whose ``forward`` is already an instance attribute (accelerate's device hooks set one) gets it back,
    and it still runs."""
    model = make_model("gpt2")
    block = model.transformer.h[0]
    calls = []
    original = block.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    block.forward = counted
    ak.attach(model).add("p", ak.PrefixTuning(num_virtual_tokens=P))
    with torch.no_grad():
        model(**_padded(make_inputs("gpt2")))
    assert block.__dict__["forward"] is counted and calls == [1]


# --- inputs longer than the learned position table leaves room for (P virtual tokens + L tokens) ----------------
def _short_positions(kind: str) -> nn.Module:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if kind == "bert":
        return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=16)).eval()  # fmt: skip
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16)).eval()


POSITIONED = {**PROMPTS, "prefix": lambda: ak.PrefixTuning(num_virtual_tokens=P)}


@pytest.mark.parametrize("method", list(POSITIONED))
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_virtual_tokens_beyond_the_position_table_say_so(kind, method):
    """16 learned positions, P = 3: 13 tokens fit, 14 ended in a raw index/shape error inside the embeddings."""
    model = _short_positions(kind)
    ak.attach(model).add("p", POSITIONED[method]())
    with torch.no_grad():
        model(input_ids=torch.randint(2, 100, (2, 16 - P)))  # exactly full: runs
        with pytest.raises(
            ValueError, match=rf"needs 17 positions \({P} virtual tokens \+ 14 tokens\).* for 16.*at most 13"
        ):
            model(input_ids=torch.randint(2, 100, (2, 14)))
