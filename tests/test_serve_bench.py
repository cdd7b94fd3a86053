"""``benchmarks/serve.py`` and its baseline servers (``benchmarks/serve_baselines.py``), so the serving benchmark
does not rot.

* default suite: the naive peft and merge-swap engines in-process (no HTTP): greedy outputs equal a no-cache
  reference per adapter and for the base model, prompts of different lengths (merge-swap's left padding), the
  front end's error statuses;
* slow: the benchmark script end to end in a smoke configuration (every system behind the real HTTP front end,
  one rate point each, the mixed LoRA/bottleneck/(IA)^3 run, the report files). It starts five server processes:
  25 s on 2 quiet cores, 50-100 s when other suites share them, past the default suite's budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    import adapterkit as ak

    root = tmp_path_factory.mktemp("serve_bench")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, eos_token_id=None, pad_token_id=0)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "model")
    adapters = ak.attach(model)
    dirs = {}
    for i, r in enumerate((4, 8)):
        adapters.add(f"a{i}", ak.LoRA(r=r, alpha=2 * r, targets="all-linear", init_weights=False))
        adapters.export(f"a{i}", root / f"a{i}", format="peft")
        dirs[f"a{i}"] = root / f"a{i}"
    return {"model": root / "model", "dirs": dirs}


def _reference(peft_model: Any, name: str | None, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by full recomputation, no cache, one request alone."""
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad(), peft_model.disable_adapter() if name is None else _active(peft_model, name):
        for _ in range(n):
            tok = int(peft_model(input_ids=ids).logits[0, -1].argmax())
            out.append(tok)
            ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return out


class _active:
    def __init__(self, model: Any, name: str) -> None:
        self.model, self.name = model, name

    def __enter__(self) -> None:
        self.model.set_adapter(self.name, inference_mode=True)

    def __exit__(self, *exc: object) -> None:
        return None


def _serve(engine: Any, reqs: list[tuple[str | None, list[int], int]]) -> list[tuple[list[int], tuple[Any, ...]]]:
    """Submit every request at once (the engine thread is held until all are queued); tokens and final event."""
    from adapterkit.serve.engine import Request

    events: list[list[tuple[Any, ...]]] = [[] for _ in reqs]
    done = threading.Semaphore(0)

    def emitter(i: int) -> Any:
        def emit(ev: tuple[Any, ...]) -> None:
            events[i].append(ev)
            if ev[0] != "token":
                done.release()

        return emit

    with engine.cond:  # queued together: merge-swap sees them in one batch
        engine.start()
        for i, (name, prompt, n) in enumerate(reqs):
            engine.submit(Request(model=name, prompt=prompt, max_tokens=n, emit=emitter(i)))
    for _ in reqs:
        assert done.acquire(timeout=60)
    engine.stop()
    return [([e[1] for e in evs if e[0] == "token"], evs[-1]) for evs in events]


@pytest.mark.parametrize("kind", ["peft", "merge"])
def test_baseline_engines_match_reference(files: dict[str, Any], kind: str) -> None:
    from serve_baselines import MergeSwapEngine, NaivePeftEngine, load_peft_model

    model = load_peft_model(files["model"], files["dirs"])
    reqs = [("a0", [3, 4, 5, 6], 5), ("a1", [7, 8], 4), (None, [9, 10, 11], 3), ("a0", [12, 13], 6),
            ("a1", [5, 6, 7, 8, 9], 2)]  # fmt: skip
    refs = [_reference(model, name, prompt, n) for name, prompt, n in reqs]
    engine = NaivePeftEngine(model, loaded=2) if kind == "peft" else MergeSwapEngine(model, max_batch=8, loaded=2)
    got = _serve(engine, reqs)
    for (tokens, last), ref, req in zip(got, refs, reqs):
        assert last == ("done", "length"), req
        assert tokens == ref, req
    if kind == "merge":
        # a0 (2 rows, prompts 4 and 2 tokens: left padding), a1, base, in the order of their oldest request
        assert engine.stats["batches"] == 3 and engine.stats["max_batch"] == 2
        assert engine.stats["merges"] == 2 and engine.stats["unmerges"] == 2
    else:
        assert engine.stats["max_batch"] == 1 and engine.stats["requests"] == 5


def test_baseline_engine_refusals(files: dict[str, Any]) -> None:
    from serve_baselines import NaivePeftEngine, load_peft_model

    from adapterkit.serve.engine import EngineError, Request

    engine = NaivePeftEngine(load_peft_model(files["model"], {}), max_queue=1)
    with pytest.raises(EngineError) as e:  # greedy only
        engine.submit(Request(model=None, prompt=[1], max_tokens=1, emit=lambda ev: None, temperature=0.7))
    assert e.value.status == 400
    engine.submit(Request(model=None, prompt=[1], max_tokens=1, emit=lambda ev: None))
    with pytest.raises(EngineError) as e:  # queue full (the engine thread is not started)
        engine.submit(Request(model=None, prompt=[1], max_tokens=1, emit=lambda ev: None))
    assert e.value.status == 429
    engine.stop()
    with pytest.raises(EngineError) as e:
        engine.submit(Request(model=None, prompt=[1], max_tokens=1, emit=lambda ev: None))
    assert e.value.status == 503


SMOKE = ["--hidden", "64", "--layers", "2", "--vocab", "64", "--adapters", "3", "--zipf", "1", "--mixed", "3",
         "--target", "lora N=3 s=1", "--prompt", "6", "--output", "3", "--rate-start", "8", "--max-points", "1",
         "--duration", "0.5", "--min-requests", "3", "--max-running", "4", "--threads", "1",
         "--point-timeout", "60"]  # fmt: skip


@pytest.mark.slow
def test_serve_benchmark_smoke(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    out = tmp_path / "serve"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve.py"), *SMOKE, "--out", str(out), "--logs", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
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
    servers = report["servers"]
    assert set(servers) == {"ours", "peft", "merge", "base", "ours (mixed)"}  # one process per system
    assert all(info["peak_rss_mb"] > 50 for info in servers.values())
    assert servers["ours"]["counters"]["adapter_loads"] == 3
    assert servers["ours (mixed)"]["counters"]["adapter_loads"] == 3
    assert servers["peft"]["counters"]["adapter_loads"] == 3  # loaded at start
    assert servers["merge"]["engine_total"]["merges"] >= 1
    # the TTFT target's point: base gets the same arrivals at half of ours' saturated throughput
    ours = configs["lora N=3 s=1"]["systems"]["ours"]
    assert report["base"]["half_rate"]["rate"] == ours["half_rate"]["rate"] > 0
    # same weights, same greedy decode: the naive peft server answers exactly as ours
    assert report["agreement"]["peft"] == "3/3"
    assert set(report["targets"]) >= {"config", "ours / peft (saturated req/s)", "ours / merge (saturated req/s)"}
    md = out.with_suffix(".md").read_text()
    assert "| lora N=3 s=1 | merge |" in md and "## Targets" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
