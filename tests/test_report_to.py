"""``adapterkit train --report-to tensorboard|wandb`` (issue 19 item 11): the success paths, on a tiny LLaMA with a
word-level tokenizer saved to a temporary directory, 2 optimizer steps.

* tensorboard: event files under ``OUT/checkpoints/runs/`` holding the logged training loss of every step;
* wandb: ``WANDB_MODE=offline`` (every wandb directory under the test's tmp dir, the wandb servers and any proxy
  pointed at a closed local port, so any network use would fail): an offline run directory whose run file holds
  the logged loss and the Trainer's arguments.

The missing-package errors are tested in tests/test_cli_llm.py (they need the packages absent).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adapterkit.cli import app

pytest.importorskip("accelerate")  # the HF Trainer behind `adapterkit train`

WORDS = ["the", "film", "is", "good", "bad", "great", "awful", "rate", "say", "one", "word"]
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
STEPS = 2
TRAIN = ["--task", "causal-lm", "--text-column", "text", "--max-steps", str(STEPS), "--batch-size", "4",
         "--dev-fraction", "0.25", "--no-progress", "--threads", "1", "--logging-steps", "1", "--lr", "1e-2",
         "--max-length", "16"]  # fmt: skip
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection fails at once


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("report")
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(root / "llama")  # fmt: skip
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64, bos_token_id=2, eos_token_id=3,
                      pad_token_id=0)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(root / "llama")
    rows = [{"text": f"rate the film say one word the film is {w}"} for w in ["good", "bad", "great", "awful"] * 3]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"llama": root / "llama", "data": root / "data.jsonl"}


def _train(files: dict[str, Path], out: Path, reporter: str) -> None:
    args = [
        "train",
        "--model",
        files["llama"],
        "--data",
        files["data"],
        *TRAIN,
        "--report-to",
        reporter,
        "--out",
        out,
    ]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"train failed:\n{result.output}\n{result.exception!r}"


def test_report_to_tensorboard_writes_the_training_loss(files, tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'adapterkit[report]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(files, tmp_path / "o", "tensorboard")
    events = list((tmp_path / "o" / "checkpoints" / "runs").rglob("events.out.tfevents*"))
    assert events, "no tensorboard event file under OUT/checkpoints/runs"
    scalars: dict[str, list] = {}
    for run in sorted({p.parent for p in events}):
        acc = EventAccumulator(str(run))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    assert "train/loss" in scalars, sorted(scalars)
    losses = scalars["train/loss"]
    assert sorted(e.step for e in losses) == list(range(1, STEPS + 1))
    assert all(e.value > 0 and e.value == e.value for e in losses)  # positive, not NaN


def test_report_to_wandb_offline_writes_a_run_without_network(files, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="pip install 'adapterkit[report]'")
    home = tmp_path / "wandb-home"
    for key, value in {
        "WANDB_MODE": "offline",  # never the network
        "WANDB_DIR": str(tmp_path),
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_SILENT": "true",
        "WANDB_PROJECT": "adapterkit-test",
        "WANDB_BASE_URL": CLOSED,
        "HTTP_PROXY": CLOSED,
        "HTTPS_PROXY": CLOSED,
        "NO_PROXY": "",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    if wandb.run is not None:  # left open by an earlier in-process train (the callback would log into it)
        wandb.finish()
    wandb.teardown()  # wandb reads its settings (WANDB_DIR, ...) once per process: read the ones set here
    try:
        _train(files, tmp_path / "o", "wandb")
        # train ends the run it started (else a second in-process train, e.g. in a notebook, would log into it)
        assert wandb.run is None
    finally:
        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run = runs[0]
    (record,) = run.glob("run-*.wandb")  # the run's records (history, config), what `wandb sync` would upload
    data = record.read_bytes()
    assert b"train/loss" in data and b"learning_rate" in data  # the logged loss, the Trainer's arguments
    logs = "".join(p.read_text(errors="replace") for p in run.glob("logs/*.log"))
    assert "127.0.0.1:9" not in logs  # no connection was even tried
