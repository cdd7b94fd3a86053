"""``benchmarks/serve.py`` in a smoke configuration, so the serving benchmark does not rot: every system (ours, base,
the naive peft server, the merge-swap server) behind the real HTTP front end, one rate point each, the mixed
LoRA/bottleneck/(IA)^3 run, and the report files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--hidden", "64", "--layers", "2", "--vocab", "64", "--adapters", "3", "--zipf", "1", "--mixed", "3",
         "--target", "lora N=3 s=1", "--prompt", "6", "--output", "3", "--rate-start", "8", "--max-points", "1",
         "--duration", "0.5", "--min-requests", "3", "--max-running", "4", "--threads", "1",
         "--point-timeout", "60"]  # fmt: skip


def test_serve_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "serve"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve.py"), *SMOKE, "--out", str(out), "--logs", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    configs = report["configs"]
    assert set(configs) == {"lora N=3 s=1", "mixed N=3 s=1"}
    assert set(configs["lora N=3 s=1"]["systems"]) == {"ours", "peft", "merge"}
    assert set(configs["mixed N=3 s=1"]["systems"]) == {"ours"}  # the baselines serve LoRA only
    for key, system, res in [(k, s, r) for k, e in configs.items() for s, r in e["systems"].items()] + [
        ("base", "base", report["base"])
    ]:
        assert res["points"], (key, system)
        for point in res["points"]:
            assert point["completed"] == point["requests"] and point["errors"] == 0, (key, system, point)
            assert point["tokens_ok"] and point["prompt_ok"], (key, system, point)
        assert res["peak_rss_mb"] > 50, (key, system)
    lora = configs["lora N=3 s=1"]["systems"]
    assert lora["ours"]["counters"]["adapter_loads"] == 3
    assert lora["peft"]["counters"]["adapter_loads"] == 3  # loaded at start
    assert lora["merge"]["engine_total"]["merges"] >= 1
    # the TTFT target's point: base gets the same arrivals at half of ours' saturated throughput
    assert report["base"]["half_rate"]["rate"] == lora["ours"]["half_rate"]["rate"] > 0
    # same weights, same greedy decode: the naive peft server answers exactly as ours
    assert report["agreement"]["lora N=3 s=1"]["peft"] == "3/3"
    assert set(report["targets"]) >= {"config", "ours / peft (saturated req/s)", "ours / merge (saturated req/s)"}
    md = out.with_suffix(".md").read_text()
    assert "| lora N=3 s=1 | merge |" in md and "## Targets" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
