"""Quiet imports: ``import adapterkit`` and the CLI load no quantization library (bitsandbytes, torchao) and
print no warnings from them; a pre-quantized checkpoint is refused by the CLI with the variable that allows it.
Each check runs in a fresh interpreter (imports are per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

QUANT = ("bitsandbytes", "torchao")
NOISE = ("Could not load this library", "gemm_4bit", "_pytree", "register_constant", "kernels-community")


def _python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "ADAPTERKIT_QUANT_LIBS"}
    environ.update(HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-c", code], env=environ, cwd=tmp_path, capture_output=True, text=True,
                          timeout=240)  # fmt: skip


def _loaded(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_adapterkit_loads_no_quantization_library(tmp_path):
    code = f"import sys, json, adapterkit; print(json.dumps([m for m in {QUANT!r} if sys.modules.get(m)]))"
    assert _loaded(_python(code, tmp_path)) == []


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    path = tmp_path_factory.mktemp("imports") / "bert"
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def test_cli_inspect_is_quiet_and_loads_no_quantization_library(tiny_classifier, tmp_path):
    """The CLI path that imports transformers' model code (which probes every installed quantization library)."""
    code = (
        "import sys, json\n"
        "from adapterkit.cli import app\n"
        "from typer.testing import CliRunner\n"
        f"r = CliRunner().invoke(app, ['inspect', '--model', {str(tiny_classifier)!r}, '--method', 'lora'])\n"
        "assert r.exit_code == 0, r.output\n"
        "from transformers import Trainer, TrainingArguments\n"  # what train/eval import
        f"print(json.dumps([m for m in {QUANT!r} if sys.modules.get(m)]))\n"
    )
    proc = _python(code, tmp_path)
    assert _loaded(proc) == []
    assert not [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)], proc.stderr


def test_cli_loads_a_prequantized_checkpoint_revealing_its_library_only(tiny_classifier, tmp_path):
    """A checkpoint saved already quantized is a base (issue 19, item 9): the quiet CLI reveals the one library
    its ``quant_method`` names (bitsandbytes here) and keeps the others (torchao) hidden."""
    quantized = tmp_path / "q"
    quantized.mkdir()
    for f in tiny_classifier.iterdir():
        (quantized / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(cfg))
    code = (
        "import sys\n"
        "from adapterkit.cli import app\n"
        "from typer.testing import CliRunner\n"
        f"r = CliRunner().invoke(app, ['inspect', '--model', {str(quantized)!r}, '--method', 'lora'])\n"
        "print(r.exit_code); print(sys.modules.get('torchao', 'absent')); print(r.output)\n"
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "0", proc.stdout  # no refusal
    assert lines[1] in ("None", "absent")  # torchao stays hidden: the checkpoint is bitsandbytes'
