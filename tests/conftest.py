"""Tiny random models (built from configs, no downloads) shared by the test suite."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the CLI runs in-process in tests (CliRunner): keep it from hiding quantization libraries from other tests of the
# same worker (tests/test_imports.py checks the hiding in subprocesses)
os.environ.setdefault("ADAPTERKIT_QUANT_LIBS", "1")
warnings.filterwarnings("ignore", message=".*token_id.*")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _peft_misses_cache_rename() -> str | None:
    """Why peft cannot run prompt/prefix tuning on the installed transformers, or None.

    transformers 5.24 renamed the KV-cache argument ``past_key_values`` to ``cache``. peft 0.21.x still looks
    for ``past_key_values``: its prefix tuning refuses encoders ("Model does not support past key values which
    are required for prefix tuning"), and its ``prepare_inputs_for_generation`` never sees a cache, so prompt
    and prefix ``generate()`` re-insert the virtual tokens on every step. Our own reference tests still run.
    """
    from importlib.metadata import version

    from packaging.version import Version

    tf, pf = Version(version("transformers")), Version(version("peft"))
    if tf >= Version("5.24") and pf < Version("0.22"):
        return f"peft {pf} predates transformers {tf}'s rename of past_key_values to cache (peft < 0.22 on transformers >= 5.24)"
    return None


PEFT_MISSES_CACHE_RENAME = _peft_misses_cache_rename()


def skip_if_peft_misses_cache_rename(what: str) -> None:
    """Skip a peft-equivalence test of ``what`` on the versions where peft itself is broken."""
    if PEFT_MISSES_CACHE_RENAME:
        pytest.skip(f"{what}: {PEFT_MISSES_CACHE_RENAME}")


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)  # fmt: skip
    return BertForSequenceClassification(cfg)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(cfg)


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
    return T5ForConditionalGeneration(cfg)


def _bart_sizes() -> dict:
    return dict(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=1, bos_token_id=0,
                eos_token_id=2, decoder_start_token_id=2)  # fmt: skip


def _tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(max_position_embeddings=64, **_bart_sizes()))


def _tiny_mbart():
    from transformers import MBartConfig, MBartForConditionalGeneration

    return MBartForConditionalGeneration(MBartConfig(max_position_embeddings=64, **_bart_sizes()))


def _tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    # input_features: (batch, num_mel_bins, 2 * max_source_positions)
    cfg = WhisperConfig(num_mel_bins=8, max_source_positions=16, max_target_positions=64, **_bart_sizes())
    return WhisperForConditionalGeneration(cfg)


def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=3)  # fmt: skip
    return ViTForImageClassification(cfg)


def _tiny_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                       num_labels=3)  # fmt: skip
    return ResNetForImageClassification(cfg)


def _tiny_clip_vision():
    from transformers import CLIPConfig, CLIPForImageClassification

    vision = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)  # fmt: skip
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    return CLIPForImageClassification(CLIPConfig(text_config=text, vision_config=vision, num_labels=3))


# families for rows of particular methods (convolutional adapters, vision-language bottlenecks); tests that run
# over every family (the ``family`` fixture) use MODEL_FACTORIES only
EXTRA_FACTORIES: dict[str, Callable[[], torch.nn.Module]] = {"resnet": _tiny_resnet, "clip": _tiny_clip_vision}
IMAGE_FAMILIES = ("vit", "resnet", "clip")

MODEL_FACTORIES: dict[str, Callable[[], torch.nn.Module]] = {
    "bert": _tiny_bert,
    "gpt2": _tiny_gpt2,
    "llama": _tiny_llama,
    "t5": _tiny_t5,
    "vit": _tiny_vit,
    "bart": _tiny_bart,
    "mbart": _tiny_mbart,
    "whisper": _tiny_whisper,
}


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``family`` in eval mode, identical for the same seed."""
    torch.manual_seed(seed)
    return {**MODEL_FACTORIES, **EXTRA_FACTORIES}[family]().eval()


def make_inputs(family: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs for ``make_model(family)``; the second row is left-padded where padding applies."""
    g = torch.Generator().manual_seed(seed)
    if family in IMAGE_FAMILIES:
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(2, 100, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if family == "whisper":
        return {"input_features": torch.randn(batch, 8, 32, generator=g), "decoder_input_ids": ids[:, :4]}
    if family in ("t5", "bart", "mbart"):
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids, "attention_mask": mask}


def output_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out.logits


@pytest.fixture(params=list(MODEL_FACTORIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared is missing ({SHARED}); it holds the shared data this test needs")
    return SHARED
