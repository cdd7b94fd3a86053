"""``benchmarks/poly_vs_peft.py`` end to end on a tiny LLaMA: peft's Poly/MHR weights load into ours with equal
logits, the adapters act, and the report has a row per ``n_splits`` (no timing is checked)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import poly_vs_peft as pb  # noqa: E402


def test_poly_vs_peft_smoke(tmp_path: Path) -> None:
    out = tmp_path / "poly.md"
    pb.main(["--hidden", "32", "--layers", "1", "--heads", "4", "--intermediate", "64", "--vocab", "64",
             "--seq", "8", "--batch", "3", "--r", "2", "--tasks", "3", "--skills", "2", "--splits", "1,4",
             "--reps", "1", "--warmup", "0", "--threads", "1", "--out", str(out)])  # fmt: skip
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 1 |") or line.startswith("| 4 |")]
    assert len(rows) == 2
    for row in rows:
        diff = float(row.split("|")[3].split()[0])
        assert diff <= 1e-5
