"""Smoke test of benchmarks/continuous_batching.py (issue 15, item 3): the quick configuration runs in-process,
every system produces tokens, and greedy outputs of transformers' continuous batching equal our engine's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "continuous_batching.py"


def _bench():
    spec = importlib.util.spec_from_file_location("continuous_batching_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_runs_and_outputs_agree(tmp_path: Path) -> None:
    out = tmp_path / "cb.md"
    report = _bench().main(["--quick", "--out", str(out)])
    rows, checks = report["rows"], report["checks"]
    assert set(rows) == {"cb base (sdpa)", "cb lora (sdpa)", "ours base", "ours lora", "ours mixed N=2"}
    assert all(r["tok_s"] > 0 for r in rows.values())
    for key in ("cb base (sdpa) vs ours base", "cb lora (sdpa) vs ours lora"):
        assert checks[key]["equal"] == checks[key]["total"], (key, checks[key])
    # the adapter acts (its tokens differ from the base model's), so the LoRA agreement above means something
    assert checks["lora differs from base (ours)"]["equal"] < checks["lora differs from base (ours)"]["total"]
    # a use() scope in the caller's thread does not reach the manager's thread (contextvars): base tokens
    use_only = checks["cb under use() only vs cb base (sdpa)"]
    assert use_only["equal"] == use_only["total"]
    text = out.read_text()
    assert "| ours mixed N=2 |" in text and "Verdict:" in text
