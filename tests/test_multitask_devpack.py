"""``benchmarks/multitask_devpack.py``: the carried folder holds float16 weights, the tokenizer files and the GLUE
splits, replaces an older one whole, and refuses missing tasks by name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import multitask_devpack as dp  # noqa: E402


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.randn(4, 3), "ids": torch.arange(5)}, model / "model.safetensors")
    for name in ("config.json", "vocab.txt"):
        (model / name).write_text(name)
    data = tmp_path / "glue"
    for task in ("SST-2", "RTE"):
        (data / task).mkdir(parents=True)
        for split in ("train.tsv", "dev.tsv", "test.tsv"):
            (data / task / split).write_text(f"{task} {split}")
    return model, data


def test_devpack_writes_half_weights_and_splits(tmp_path: Path) -> None:
    model, data = _inputs(tmp_path)
    out = tmp_path / "pack"
    (out / "stale").mkdir(parents=True)  # an older pack is replaced, not merged
    argv = [str(out), "--model", str(model), "--data", str(data), "--tasks", "SST-2,RTE"]
    assert dp.main(argv) == 0
    w, src = load_file(out / "model" / "model.safetensors"), load_file(model / "model.safetensors")
    assert w["w"].dtype == torch.float16 and torch.equal(w["w"], src["w"].half())
    assert torch.equal(w["ids"], src["ids"])  # integer tensors stay as they are
    assert (out / "model" / "vocab.txt").read_text() == "vocab.txt"
    assert sorted(p.name for p in (out / "glue" / "RTE").iterdir()) == ["dev.tsv", "train.tsv"]
    assert not (out / "stale").exists()


def test_devpack_names_missing_tasks(tmp_path: Path) -> None:
    model, data = _inputs(tmp_path)
    with pytest.raises(SystemExit, match=r"\['CoLA'\]"):
        dp.main([str(tmp_path / "pack"), "--model", str(model), "--data", str(data), "--tasks", "SST-2,CoLA"])
    assert not (tmp_path / "pack").exists()
