"""``adapterkit inspect`` on what a new user tries (issue 19, item 8): ``--task none`` (its help offers it), Whisper
(no ``AutoModelForSeq2SeqLM``), MoE expert stacks that no module target reaches, a config transformers cannot
build (a clear error, not a traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import MixtralConfig, WhisperConfig
from typer.testing import CliRunner

from adapterkit.cli import app

WHISPER = dict(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=8,
               max_source_positions=16, max_target_positions=16)  # fmt: skip
TOKENS = dict(pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)


def _inspect(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["inspect", *map(str, args), "--no-tree"])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inspect")
    WhisperConfig(**WHISPER, **TOKENS).save_pretrained(root / "whisper")
    WhisperConfig(**WHISPER).save_pretrained(root / "whisper-bad")  # pad id 50256 >= vocab 100
    MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4).save_pretrained(root / "mixtral")  # fmt: skip
    return {p.name: p for p in root.iterdir()}


def test_task_none_is_accepted_and_shows_the_bare_model(configs) -> None:
    code, out = _inspect("--model", configs["mixtral"], "--task", "none")
    assert code == 0, out
    assert "MixtralModel from" in out and "task none (base model)" in out


def test_whisper_opens_with_inferred_roles_and_seq2seq_falls_back_to_the_bare_model(configs) -> None:
    code, out = _inspect("--model", configs["whisper"], "--method", "lora")
    assert code == 0, out
    assert "WhisperModel from" in out and "attn.q" in out and "lora:" in out
    code, out = _inspect("--model", configs["whisper"], "--task", "seq2seq")
    assert code == 0, out
    assert "has no seq2seq model class; showing the bare model" in out and "task none (base model)" in out


@pytest.mark.filterwarnings("ignore::adapterkit.targeting.UntargetedParametersWarning")
def test_moe_expert_stacks_are_flagged_with_the_way_to_reach_them(configs) -> None:
    code, out = _inspect("--model", configs["mixtral"], "--method", "lora", "--targets", "all-linear")
    assert code == 0, out
    assert "not reachable by module targets or 'all-linear'" in out
    assert "experts.gate_up_proj" in out and "target_parameters=" in out


def test_a_config_transformers_cannot_build_is_a_clear_error(configs) -> None:
    code, out = _inspect("--model", configs["whisper-bad"])
    assert code != 0
    assert "cannot build the model of" in out and "check its config.json" in out and "Traceback" not in out
