#!/usr/bin/env python
"""``adapterkit serve`` against a naive peft server and a merge-swap server under open-loop load (issue 15).

Every system runs behind the **same** HTTP front end (``adapterkit.serve.api.create_app``: validation,
tokenization, SSE streaming) and is driven by the same client (``openai.AsyncOpenAI``, streamed, so TTFT and
inter-token latency are seen by the client; the load generator is this process). Each system serves from a
**process of its own** (its peak RSS, ``VmHWM``, is its own), forked from one multiprocessing fork server that
imported torch/transformers/peft/adapterkit once. All servers start together before any measurement and live for
the whole run; at every rate the systems take turns with the same arrivals, back to back (so a swing of machine
load hits them alike).

Systems:

* ``ours``: adapterkit's engine: continuous batching, rows of different adapters in one routed forward;
* ``base``: the same arrival process sent to the base model through our engine (the ceiling; it does not depend
  on the adapters, so it runs once and is the reference of every configuration);
* ``peft``: a naive peft server (``benchmarks/serve_baselines.py``: ``PeftModel`` with every LoRA adapter,
  FIFO, one request at a time, ``set_adapter`` per request, greedy decode with a KV cache);
* ``merge``: a merge-swap server (same-adapter static batches on merged weights, unmerged on a switch).

Workload: a LLaMA-style model (random init, ``--hidden``, ``--layers``); configurations ``N`` LoRA adapters
(``--adapters``, ranks cycling through 8, 16, 32, all linear layers) with Zipf popularity ``p_i ∝ i^-s``
(``--zipf``); plus ``--mixed`` adapters cycling through LoRA, a bottleneck (``seq_bn``) and (IA)^3 (ours only:
the baselines serve LoRA through peft, which has no bottleneck adapters). The LoRA servers register
``max(--adapters)`` adapters; a configuration's ``N`` decides which of them its requests name. Requests arrive as
a Poisson process; prompts of ``--prompt`` tokens (random words, one per token), ``--output`` generated tokens
(the random model has no EOS). The rate starts at ``--rate-start`` and doubles until throughput stops rising
(< ``--rise`` times the best so far) or the p99 end-to-end latency exceeds ``--explode`` times the first point's
p50 while the offered rate is not kept up with; each point sends ``--duration`` seconds of arrivals
(``--min-requests``..``--max-requests``). On the ``--target`` configuration one more point at half of ours'
saturated throughput runs for ``ours`` and ``base`` (same arrivals): the TTFT target. ``--time-budget`` (counted
from the start, building and server start-up included) bounds the run: the target configuration and base run
first, then the mixed run, then the others from the largest N; configurations past the budget are reported as
skipped.

Outputs ``--out`` + ``.md`` (tables, targets, command, versions, load averages), ``.json`` (every point) and
``.png`` (latency against request rate).

Full run (12 minutes on 2 quiet cores, load average 1.5; the time budget cuts it short on a busy machine)::

    .venv/bin/python benchmarks/serve.py --out benchmarks/results/serve

Smoke run (tests/test_serve_bench.py, slow)::

    .venv/bin/python benchmarks/serve.py --hidden 64 --layers 2 --vocab 64 --adapters 3 --zipf 1 --mixed 3 \\
        --target "lora N=3 s=1" --prompt 6 --output 3 --rate-start 8 --max-points 1 --duration 0.5 \\
        --min-requests 3 --max-running 4 --out /tmp/serve_smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SYSTEMS = ("ours", "base", "peft", "merge")
RANKS = (8, 16, 32)


# --- files ---------------------------------------------------------------------------------------------------
def build(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Model + tokenizer, ``max(--adapters)`` LoRA adapters natively and in peft's format (same weights), the
    mixed adapters natively; one directory per configuration holding links to its adapters."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import adapterkit as ak

    torch.manual_seed(args.seed)
    vocab = ["[PAD]", "[UNK]", *[f"w{i}" for i in range(args.vocab - 2)]]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    heads = max(1, args.hidden // 64)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=args.prompt + args.output + 8, eos_token_id=None,
                      pad_token_id=0)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "model")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(
        root / "model"
    )
    adapters = ak.attach(model)
    gen = torch.Generator().manual_seed(args.seed)
    n_lora = max(args.adapters, default=0)
    for i in range(n_lora):
        name = f"a{i}"
        adapters.add(
            name, ak.LoRA(r=RANKS[i % 3], alpha=2 * RANKS[i % 3], targets="all-linear", init_weights=False)
        )
        adapters.save(name, root / "native" / name)
        adapters.export(name, root / "peft" / name, format="peft")
        adapters.delete(name)
    for i in range(args.mixed):
        name, kind = f"m{i}", i % 3
        spec: Any = (ak.LoRA(r=RANKS[(i // 3) % 3], targets="all-linear", init_weights=False), "seq_bn",
                     ak.IA3(init_weights=False))[kind]  # fmt: skip
        adapters.add(name, spec)
        if kind == 1:  # the preset starts as an identity (up projection zero): make it act
            with torch.no_grad():
                for p in adapters.parameters(name):
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        adapters.save(name, root / "native" / name)
        adapters.delete(name)
    configs: dict[str, Any] = {}
    for n in args.adapters:
        for s in args.zipf if n > 1 else args.zipf[:1]:
            key = f"lora N={n} s={s:g}" if n > 1 else "lora N=1"
            configs[key] = {"names": [f"a{i}" for i in range(n)], "zipf": s, "group": "lora"}
    if args.mixed:
        configs[f"mixed N={args.mixed} s={args.mixed_zipf:g}"] = {
            "names": [f"m{i}" for i in range(args.mixed)], "zipf": args.mixed_zipf, "group": "mixed",
        }  # fmt: skip
    # what each server registers: every LoRA adapter (natively for ours, in peft's format for the baselines), or
    # every mixed adapter (ours only); a configuration's N only decides which of them its requests name
    dirs = {}
    for group, fmt, names in (("lora", "native", [f"a{i}" for i in range(n_lora)]),
                              ("lora", "peft", [f"a{i}" for i in range(n_lora)]),
                              ("mixed", "native", [f"m{i}" for i in range(args.mixed)])):  # fmt: skip
        d = root / "dirs" / f"{group}-{fmt}"
        d.mkdir(parents=True)
        for name in names:
            (d / name).symlink_to(root / fmt / name, target_is_directory=True)
        dirs[group, fmt] = d
    return {"model": root / "model", "configs": configs, "dirs": dirs}


# --- the server subprocesses ---------------------------------------------------------------------------------
# Servers (and the file builder) run in processes forked from one multiprocessing fork server that imported torch,
# transformers, peft and adapterkit once (8 s of CPU each time otherwise) and ran no torch op (OpenMP is not
# fork-safe after use). Each server is a process of its own: its VmHWM is its own peak RSS.
PRELOAD = ["torch", "transformers", "peft", "fastapi", "uvicorn", "adapterkit", "adapterkit.serve",
           "adapterkit.serve.api", "adapterkit.serve.engine", "serve_baselines"]  # fmt: skip


def _context() -> Any:
    import multiprocessing

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # serve_baselines, for the fork server and its children
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _build_entry(root: Path, args: argparse.Namespace, conn: Any) -> None:
    try:
        conn.send(("ok", build(root, args)))
    except BaseException as e:
        import traceback

        conn.send(("error", traceback.format_exc()))
        raise SystemExit(1) from e


def build_in_child(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    ctx = _context()
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_build_entry, args=(root, args, there), daemon=True)
    proc.start()
    status, value = here.recv()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"building the model and adapters failed:\n{value}")
    return value


def _serve_entry(system: str, model_dir: Path, adapters_dir: Path, args: argparse.Namespace, conn: Any,
                 log: Path) -> None:  # fmt: skip
    """Serve ``system`` on 127.0.0.1 (sends the port through ``conn``) until ``conn`` receives anything."""
    import logging

    import torch

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # this server's warnings and tracebacks
    os.dup2(fd, 2)
    logging.basicConfig(level=logging.WARNING)
    try:
        torch.set_num_threads(args.threads)
        if system in ("ours", "base"):
            from adapterkit.serve import Server

            server: Any = Server(model_dir, adapters_dir=adapters_dir, port=0, max_running=args.max_running,
                                 max_queue=10**6, max_active_adapters=args.max_active_adapters,
                                 adapter_pool_mb=args.adapter_pool_mb)  # fmt: skip
            engine, app = server.engine, server.app
            port = server.start_in_thread(timeout=120)
            stop = server.stop
        else:
            engine, app = _baseline(system, model_dir, adapters_dir, args)
            port, stop = _uvicorn_in_thread(app, engine)

        @app.get("/bench/stats")
        async def _stats() -> dict[str, Any]:
            return dict(engine.stats)

    except BaseException:
        import traceback

        conn.send(("error", traceback.format_exc()))
        raise
    conn.send(("ok", port))
    conn.recv()
    stop()


def _baseline(system: str, model_dir: Path, adapters_dir: Path, args: argparse.Namespace) -> tuple[Any, Any]:
    """A baseline engine (serve_baselines.py) behind adapterkit's front end: ``ServerState`` + ``create_app``
    built here (``Server`` would load a second copy of the model for its own engine)."""
    from serve_baselines import MergeSwapEngine, NaivePeftEngine, load_peft_model
    from transformers import AutoTokenizer

    from adapterkit.serve.api import ServerState, create_app
    from adapterkit.serve.metrics import Metrics
    from adapterkit.serve.pool import AdapterPool

    dirs = {p.name: p for p in sorted(adapters_dir.iterdir()) if (p / "adapter_config.json").is_file()}
    model = load_peft_model(model_dir, dirs)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    metrics = Metrics(str(model_dir))
    pool = AdapterPool(None, root=adapters_dir, metrics=metrics)  # the registry only: the engine loaded them all
    kw: dict[str, Any] = {"metrics": metrics, "max_queue": 10**6, "loaded": len(dirs), "eos_ids": set()}
    if system == "peft":
        engine: Any = NaivePeftEngine(model, **kw)
    else:
        engine = MergeSwapEngine(model, max_batch=args.max_running, pad_id=tokenizer.pad_token_id or 0, **kw)
    state = ServerState(engine=engine, pool=pool, tokenizer=tokenizer, base_name=str(model_dir),
                        base_path=str(model_dir), context_len=model.config.max_position_embeddings,
                        metrics=metrics)  # fmt: skip
    return engine, create_app(state)


def _uvicorn_in_thread(app: Any, engine: Any) -> tuple[int, Any]:
    import socket

    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    engine.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=15)
        engine.stop()
        sock.close()

    return sock.getsockname()[1], stop


class Child:
    """One system's server process."""

    def __init__(self, system: str, model: Path, adapters_dir: Path, args: argparse.Namespace, log: Path) -> None:
        """Starts the process; :meth:`ready` waits until it serves."""
        ctx = _context()
        self.system, self.log, self.port = system, log, 0
        self.conn, there = ctx.Pipe()
        self.proc = ctx.Process(target=_serve_entry, args=(system, model, adapters_dir, args, there, log),
                                daemon=True)  # fmt: skip
        self.proc.start()

    def ready(self, timeout: float = 900) -> Child:
        if self.port:
            return self
        if not self.conn.poll(timeout):
            self.proc.kill()
            raise RuntimeError(
                f"the {self.system} server did not start in {timeout:g} s:\n{self.log.read_text()[-3000:]}"
            )
        status, value = self.conn.recv()
        if status != "ok":
            self.proc.join(timeout=10)
            raise RuntimeError(f"the {self.system} server did not start:\n{value}")
        self.port = int(value)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def get(self, path: str) -> str:
        import urllib.request

        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return r.read().decode()

    def counters(self) -> dict[str, float]:
        out = {}
        for line in self.get("/metrics").splitlines():
            for key in ("adapter_loads_total", "adapter_evictions_total"):
                if line.startswith("adapterkit:" + key):
                    out[key.removesuffix("_total")] = float(line.split()[-1])
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send("stop")
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# --- load ------------------------------------------------------------------------------------------------------
def arrivals(names: list[str], zipf: float, rate: float, n: int, args: argparse.Namespace,
             seed: int) -> list[tuple[float, str, str]]:  # fmt: skip
    """``n`` requests ``(arrival offset s, model, prompt)``: Poisson at ``rate``/s, adapter ``i`` (1-based rank)
    with probability ∝ ``i^-zipf``; the same for every system at this rate and seed."""
    rng = random.Random(seed)
    weights = [(k + 1) ** -zipf for k in range(len(names))]
    t, out = 0.0, []
    for _ in range(n):
        prompt = " ".join(f"w{rng.randrange(args.vocab - 2)}" for _ in range(args.prompt))
        out.append((t, rng.choices(names, weights)[0], prompt))
        t += rng.expovariate(rate)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def _drive(url: str, reqs: list[tuple[float, str, str]], output: int, timeout: float) -> dict[str, Any]:
    import openai

    # one client for all requests (its pool allows 1000 connections; a point sends at most --max-requests)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=timeout)
    loop = asyncio.get_running_loop()
    results: list[dict[str, Any]] = []
    errors: list[str] = []

    async def one(at: float, model: str, prompt: str) -> None:
        await asyncio.sleep(max(0.0, t0 + at - loop.time()))
        start = time.perf_counter()
        stamps: list[float] = []
        usage = None
        try:
            stream = await client.completions.create(model=model, prompt=prompt, max_tokens=output, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})  # fmt: skip
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    stamps.append(time.perf_counter())
                if chunk.usage is not None:
                    usage = chunk.usage
        except Exception as e:  # counted, reported
            errors.append(f"{type(e).__name__}: {e}"[:200])
            return
        end = time.perf_counter()
        results.append({"start": start, "stamps": stamps, "end": end,
                        "tokens": usage.completion_tokens if usage else len(stamps),
                        "prompt_tokens": usage.prompt_tokens if usage else None})  # fmt: skip

    t0 = loop.time() + 0.05
    wall0 = time.perf_counter() + 0.05
    tasks = [asyncio.create_task(one(*r)) for r in reqs]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = (
        (max((r["end"] for r in results), default=wall0) - wall0) if not pending else time.perf_counter() - wall0
    )
    await client.close()
    return {"results": results, "errors": errors, "timed_out": len(pending), "wall": wall}


def run_point(
    child: Child, reqs: list[tuple[float, str, str]], rate: float, args: argparse.Namespace, label: str = ""
) -> dict:
    before = json.loads(child.get("/bench/stats"))
    got = asyncio.run(_drive(child.url, reqs, args.output, args.point_timeout))
    after = json.loads(child.get("/bench/stats"))
    res, wall = got["results"], max(got["wall"], 1e-9)
    ttft = [r["stamps"][0] - r["start"] for r in res if r["stamps"]]
    itl = [b - a for r in res for a, b in zip(r["stamps"], r["stamps"][1:])]
    e2e = [r["end"] - r["start"] for r in res]
    rows = after.get("batched_rows", 0) - before.get("batched_rows", 0)
    steps = (after.get("steps", 0) - before.get("steps", 0)) or (
        after.get("forwards", 0) - before.get("forwards", 0)
    )
    point = {
        "rate": rate, "requests": len(reqs), "completed": len(res), "errors": len(got["errors"]),
        "timed_out": got["timed_out"], "wall_s": wall, "req_s": len(res) / wall,
        "tok_s": sum(r["tokens"] for r in res) / wall, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
        "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99), "e2e_p50": pct(e2e, 0.5), "e2e_p99": pct(e2e, 0.99),
        "mean_batch": rows / steps if steps else float("nan"),
        "tokens_ok": all(r["tokens"] == args.output for r in res),
        "prompt_ok": all(r["prompt_tokens"] in (None, args.prompt) for r in res),
        "engine": {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))},
    }  # fmt: skip
    if got["errors"]:
        point["first_error"] = got["errors"][0]
    log(f"    {label:5} rate {rate:7.2f}/s: {len(res)}/{len(reqs)} done, {point['req_s']:.2f} req/s, "
        f"{point['tok_s']:.0f} tok/s, ttft p50/p99 {point['ttft_p50']:.3f}/{point['ttft_p99']:.3f} s, "
        f"e2e p50/p99 {point['e2e_p50']:.2f}/{point['e2e_p99']:.2f} s, batch {point['mean_batch']:.1f}"
        + (f", {len(got['errors'])} errors ({got['errors'][0]})" if got["errors"] else ""))  # fmt: skip
    return point


def n_requests(rate: float, args: argparse.Namespace) -> int:
    return int(min(args.max_requests, max(args.min_requests, round(rate * args.duration))))


def warm(child: Child, names: list[str], args: argparse.Namespace, full: bool) -> None:
    """First calls pay one-time costs: ``full`` (our engine, which loads adapters on first use): every adapter once,
    then one burst of ``--max-running`` requests; else (the baselines loaded everything at start) 4 requests."""
    prompt = lambda w: " ".join([w] * args.prompt)  # noqa: E731
    batches = [[(0.0, n, prompt("w1")) for n in names[: None if full else 4]]]
    if full:
        batches.append([(0.0, names[i % len(names)], prompt("w2")) for i in range(args.max_running)])
    for batch in batches:
        got = asyncio.run(_drive(child.url, batch, 2, args.point_timeout * 4))
        if got["errors"] or got["timed_out"]:
            raise RuntimeError(f"warm-up failed: {got['errors'][:3]} ({got['timed_out']} timed out)")


def outputs(child: Child, names: list[str], args: argparse.Namespace) -> dict[str, str]:
    """Greedy output text per adapter for one fixed prompt, one request at a time (compared across systems)."""
    got = asyncio.run(_texts(child.url, names, " ".join(f"w{3 + i}" for i in range(args.prompt)), args.output))
    return dict(zip(names, got))


async def _texts(url: str, names: list[str], prompt: str, output: int) -> list[str]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    out = []
    for name in names:
        r = await client.completions.create(model=name, prompt=prompt, max_tokens=output, temperature=0)
        out.append(r.choices[0].text)
    await client.close()
    return out


def agreement(report: dict[str, Any]) -> dict[str, str]:
    """Per baseline: how many of the checked adapters' greedy outputs equal ours."""
    servers = report["servers"]
    ours = servers.get("ours", {}).get("check")
    out: dict[str, str] = {}
    for system in ("peft", "merge"):
        if ours and servers.get(system, {}).get("check"):
            same = sum(servers[system]["check"].get(n) == t for n, t in ours.items())
            out[system] = f"{same}/{len(ours)}"
    return out


def sweep(children: dict[str, tuple[Child, list[str], float]], args: argparse.Namespace,
          deadline: float) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Rate sweep of several systems at once: at each rate every system still rising gets the same arrivals in
    turn (so a change of machine load hits them alike); a system drops out when its throughput stops rising
    (< ``--rise`` × its best) or its latency explodes. ``children``: system -> (server, model names, zipf s)."""
    out = {s: {"points": [], "stop": "max points"} for s in children}
    best = dict.fromkeys(children, 0.0)
    active = list(children)
    rate = args.rate_start
    for _ in range(args.max_points):
        if not active:
            break
        if time.monotonic() > deadline:
            for s in active:
                out[s]["stop"] = "time budget"
            break
        for system in list(active):
            child, names, zipf = children[system]
            reqs = arrivals(names, zipf, rate, n_requests(rate, args), args, seed=args.seed + int(rate * 1000))
            p = run_point(child, reqs, rate, args, system)
            points = out[system]["points"]
            points.append(p)
            if p["req_s"] < args.rise * best[system]:
                out[system]["stop"] = "throughput stopped rising"
                active.remove(system)
            elif p["req_s"] < 0.9 * rate and p["e2e_p99"] > args.explode * points[0]["e2e_p50"]:
                out[system]["stop"] = "latency exploded"
                active.remove(system)
            best[system] = max(best[system], p["req_s"])
        rate *= 2
    for res in out.values():
        res.update(summarize(res, args.ttft_slo))
    return out


def summarize(sw: dict[str, Any], slo: float) -> dict[str, Any]:
    """Saturated throughput (the best point) and the *sustained* point: the highest rate whose p99 TTFT stays
    within ``slo`` seconds with every request answered (else the lowest rate, marked)."""
    pts = sw["points"]
    if not pts:
        return {}
    sat = max(pts, key=lambda p: p["req_s"])
    kept = [p for p in pts if p["ttft_p99"] <= slo and p["completed"] == p["requests"]]
    sustained = (
        max(kept, key=lambda p: p["rate"]) if kept else {**min(pts, key=lambda p: p["rate"]), "slo_missed": True}
    )
    return {"sat_req_s": sat["req_s"], "sat_tok_s": sat["tok_s"], "sat_rate": sat["rate"],
            "sustained": sustained}  # fmt: skip


# --- driver ----------------------------------------------------------------------------------------------------
_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", flush=True)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": str(os.cpu_count())}
    for pkg in ("adapterkit", "torch", "transformers", "peft", "fastapi", "uvicorn", "openai"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "?"
    with contextlib.suppress(OSError):
        git = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True, timeout=10).stdout  # noqa: E731
        out["commit"] = git("rev-parse", "--short", "HEAD").strip()
        if os.environ.get("PYTHONPATH"):  # the library may come from elsewhere than this checkout
            out["commit"] += f" (PYTHONPATH={os.environ['PYTHONPATH']})"
        elif git("status", "--porcelain", "--", str(HERE.parent / "src")).strip():
            out["commit"] += " + uncommitted changes under src/"
    return out


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--adapters", type=ints, default=[1, 8, 64], help="N of the LoRA configurations")
    p.add_argument("--zipf", type=floats, default=[0.0, 1.0], help="s of the LoRA configurations")
    p.add_argument(
        "--mixed", type=int, default=64, help="adapters of the mixed LoRA/bottleneck/(IA)^3 run (0: none)"
    )
    p.add_argument("--mixed-zipf", type=float, default=1.0)
    p.add_argument("--target", default="lora N=64 s=1", help="configuration the targets are computed on")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--output", type=int, default=32)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--rate-start", type=float, default=2.0, help="first offered rate (requests/s); doubles")
    p.add_argument("--max-points", type=int, default=7, help="rates per sweep at most")
    p.add_argument("--duration", type=float, default=3.0, help="seconds of arrivals per rate point")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--max-requests", type=int, default=128)
    p.add_argument("--point-timeout", type=float, default=90.0, help="seconds a rate point may take")
    p.add_argument("--rise", type=float, default=1.1, help="a point must beat the best throughput by this factor")
    p.add_argument("--explode", type=float, default=20.0)
    p.add_argument("--ttft-slo", type=float, default=1.0, help="p99 TTFT (s) of the table's sustained point")
    p.add_argument("--time-budget", type=float, default=1150.0, help="seconds; later points are skipped")
    p.add_argument("--max-running", type=int, default=64)
    p.add_argument("--max-active-adapters", type=int, default=64)
    p.add_argument("--adapter-pool-mb", type=float, default=None)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of each server (more than the free cores: OpenMP spin-waits)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="writes OUT.md, OUT.json, OUT.png")
    p.add_argument("--logs", default=None, help="directory for the servers' stderr (default: a temporary one)")
    args = p.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    bad = set(systems) - set(SYSTEMS)
    if bad:
        p.error(f"--systems: unknown {sorted(bad)}; choose from {','.join(SYSTEMS)}")
    deadline = time.monotonic() + args.time_budget
    meta = {"versions": versions(), "loadavg_start": loadavg(), "argv": sys.argv[1:] if argv is None else argv,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}  # fmt: skip
    log(f"load average at start: {meta['loadavg_start']}")
    report: dict[str, Any] = {"meta": meta, "configs": {}, "base": None}
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
        files = build_in_child(Path(tmp), args)
        logs = Path(args.logs) if args.logs else Path(tmp) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        servers = Servers(files, args, logs)
        report["servers"] = servers.info
        try:
            groups = {c["group"] for c in files["configs"].values()}
            servers.start([(s, g) for g in ("lora", "mixed") if g in groups for s in systems
                           if (s == "ours" or g == "lora") and not (s == "base" and g != "lora")])  # fmt: skip
            # the target configuration first, then base (its reference), then the rest from the last defined (the
            # mixed run, then the largest N) to the first: a time budget that runs out skips the least telling
            # runs; the systems take turns within a configuration
            order = [k for k in files["configs"] if k == args.target] + [
                k for k in reversed(files["configs"]) if k != args.target
            ]
            for i, key in enumerate(order):
                cfg = files["configs"][key]
                entry: dict[str, Any] = {"zipf": cfg["zipf"], "n": len(cfg["names"]), "systems": {}}
                report["configs"][key] = entry
                here = [s for s in systems if s != "base" and (s == "ours" or cfg["group"] == "lora")]
                with_base = "base" in systems and i == 0  # base runs once, beside the first configuration
                if time.monotonic() > deadline:
                    for system in here:
                        entry["systems"][system] = {"skipped": "time budget"}
                    log(f"{key}: skipped (time budget)")
                    continue
                log(f"{key}: {', '.join(here + ['base'] * with_base)}")
                children = {s: (servers.get(s, cfg["group"]), cfg["names"], cfg["zipf"]) for s in here}
                if with_base:
                    children["base"] = (servers.get("base", "lora"), [str(files["model"])], 0.0)
                res = sweep(children, args, deadline + (120 if i == 0 else 0))
                if key == args.target and res.get("ours", {}).get("sat_req_s"):
                    rate = res["ours"]["sat_req_s"] / 2
                    for system in ("ours", "base") if with_base else ("ours",):
                        child, names, zipf = children[system]
                        res[system]["half_rate"] = half_point(child, names, zipf, rate, args, system)
                if with_base:
                    report["base"] = res.pop("base")
                entry["systems"].update(res)
        finally:
            servers.close()
        report["configs"] = {k: report["configs"][k] for k in files["configs"] if k in report["configs"]}
    meta["loadavg_end"] = loadavg()
    meta["seconds"] = round(time.monotonic() - _T0)
    report["targets"] = targets(report, args.target)
    report["agreement"] = agreement(report)
    if args.out:
        write(report, Path(args.out), args)
    print(markdown(report, args))
    return report


def half_point(child: Child, names: list[str], zipf: float, rate: float, args: argparse.Namespace,
               label: str) -> dict[str, Any]:  # fmt: skip
    """The TTFT target's point: ``rate`` (half of ours' saturated throughput), the same arrivals for ours and base."""
    reqs = arrivals(names, zipf, rate, n_requests(rate, args), args, seed=args.seed + 7)
    return run_point(child, reqs, rate, args, label + " at ½ of ours' saturation")


class Servers:
    """One server process per system, started on first use (warmed with every adapter it registers, its greedy
    outputs recorded) and kept until :meth:`close`, which records its peak RSS, counters and engine totals."""

    def __init__(self, files: dict[str, Any], args: argparse.Namespace, logs: Path) -> None:
        self.files, self.args, self.logs = files, args, logs
        self.children: dict[str, Child] = {}
        self.info: dict[str, dict[str, Any]] = {}

    @staticmethod
    def label(system: str, group: str) -> str:
        return system if group == "lora" else f"{system} ({group})"

    def start(self, wanted: list[tuple[str, str]]) -> None:
        """Start the processes of ``wanted`` ``(system, group)`` together and wait until all serve: the baselines
        load every adapter at start (peft's ``load_adapter`` walks every module, so N loads cost O(N^2)); loading
        them side by side before any measurement keeps that off the sweeps."""
        t0 = time.monotonic()
        for system, group in wanted:
            label = self.label(system, group)
            if label not in self.children:
                fmt = "peft" if system in ("peft", "merge") else "native"
                log(f"  starting the {label} server")
                self.children[label] = Child(system, self.files["model"], self.files["dirs"][group, fmt], self.args,
                                             self.logs / f"{system}-{group}.log")  # fmt: skip
                self.info[label] = {"system": system}
        for label in list(self.children):
            self.children[label].ready()
            self.info[label].setdefault("start_s", round(time.monotonic() - t0, 1))
        log(f"  {len(self.children)} servers up")

    def get(self, system: str, group: str) -> Child:
        """The server of ``system`` for ``group``, warmed (every adapter once) on first use."""
        label = self.label(system, group)
        if label not in self.children:
            self.start([(system, group)])
        child, info = self.children[label], self.info[label]
        if "check" not in info:
            fmt = "peft" if system in ("peft", "merge") else "native"
            adapters_dir = self.files["dirs"][group, fmt]
            t0 = time.monotonic()
            info["loadavg_start"] = loadavg()
            if system == "base":
                names = [str(self.files["model"])]
            else:
                names = sorted((p.name for p in adapters_dir.iterdir()), key=lambda n: int(n[1:]))
            warm(child, names, self.args, full=system in ("ours", "base"))
            info["adapters"] = 0 if system == "base" else len(names)
            info["warm_s"] = round(time.monotonic() - t0, 1)
            info["check"] = outputs(child, names[:4], self.args)
        return child

    def close(self) -> None:
        for label, child in self.children.items():
            info = self.info.setdefault(label, {})
            try:
                info["peak_rss_mb"] = child.peak_rss_mb()
                info["counters"] = child.counters()
                info["engine_total"] = json.loads(child.get("/bench/stats"))
                info["loadavg_end"] = loadavg()
            finally:
                child.close()


def targets(report: dict[str, Any], key: str) -> dict[str, Any]:
    """The issue's targets at configuration ``key``, as ratios (reported, never asserted)."""
    cfg = report["configs"].get(key)
    base = report.get("base") or {}
    if not cfg or "ours" not in cfg["systems"] or not cfg["systems"]["ours"].get("sat_req_s"):
        return {"config": key, "note": "not run"}
    ours = cfg["systems"]["ours"]["sat_req_s"]
    out: dict[str, Any] = {"config": key}

    def ratio(name: str, other: float | None, goal: float, better: str = "higher") -> None:
        if not other or not math.isfinite(other):
            out[name] = {"goal": goal, "value": None, "met": None}
            return
        v = ours / other if better == "higher" else other
        out[name] = {"goal": goal, "value": v, "met": v >= goal if better == "higher" else v <= goal}

    ratio("ours / peft (saturated req/s)", cfg["systems"].get("peft", {}).get("sat_req_s"), 5.0)
    ratio("ours / merge (saturated req/s)", cfg["systems"].get("merge", {}).get("sat_req_s"), 2.0)
    ratio("ours / base (saturated req/s)", base.get("sat_req_s"), 0.7)
    o = cfg["systems"]["ours"].get("half_rate", {})
    b = base.get("half_rate") or {}
    if o.get("ttft_p99") and b.get("ttft_p99"):
        v = o["ttft_p99"] / b["ttft_p99"]
        out["p99 TTFT ours / base at half our saturation rate"] = {"goal": 2.0, "value": v, "met": v <= 2.0,
                                                                   "rate": o["rate"]}  # fmt: skip
    return out


# --- report ------------------------------------------------------------------------------------------------------
def _f(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{nd}g}" if isinstance(x, float) else str(x)


def _ms(x: Any) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x * 1000:.0f}"


def _rows(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    rows = []
    for key, entry in report["configs"].items():
        for system, res in entry["systems"].items():
            rows.append((key, system if key.startswith("lora") else Servers.label(system, "mixed"), res))
    if report.get("base"):
        rows.append(("any (base requests)", "base", report["base"]))
    return rows


def markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    meta = report["meta"]
    out = ["# `benchmarks/serve.py`: adapterkit serve against a naive peft server and a merge-swap server", ""]
    out.append(f"LLaMA-style, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, float32; prompts "
               f"{args.prompt} tokens, outputs {args.output} tokens (no EOS); open-loop Poisson arrivals from "
               f"`openai.AsyncOpenAI` (streamed), every system behind adapterkit's HTTP front end in a server process "
               f"of its own; ours and base: `--max-running {args.max_running} --max-active-adapters "
               f"{args.max_active_adapters}`, merge-swap batches up to {args.max_running}; {args.threads} torch "
               f"thread(s) per server. Rates from {args.rate_start:g}/s, doubling until throughput stops rising "
               f"(< {args.rise:g}× the best so far) or latency explodes; {args.duration:g} s of arrivals per point "
               f"({args.min_requests}..{args.max_requests} requests).")  # fmt: skip
    out += ["", "## Throughput and latency", ""]
    out.append("| configuration | system | saturated req/s | output tok/s | sustained rate | TTFT p50 / p99 ms | "
               "ITL p50 / p99 ms | e2e p50 / p99 ms |")  # fmt: skip
    out.append("|---|---|---|---|---|---|---|---|")
    for key, system, res in _rows(report):
        if "skipped" in res or not res.get("points"):
            out.append(f"| {key} | {system} | skipped ({res.get('skipped', 'no points')}) |" + " |" * 5)
            continue
        s = res["sustained"]
        out.append(f"| {key} | {system} | {_f(res['sat_req_s'])} | {_f(res['sat_tok_s'])} | {_f(s['rate'])}/s"
                   f"{' (SLO missed)' if s.get('slo_missed') else ''} | "
                   f"{_ms(s['ttft_p50'])} / {_ms(s['ttft_p99'])} | {_ms(s['itl_p50'])} / {_ms(s['itl_p99'])} | "
                   f"{_ms(s['e2e_p50'])} / {_ms(s['e2e_p99'])} |")  # fmt: skip
    out += ["", f"Saturated: the best throughput of the sweep (completed requests / time from the first arrival "
            f"to the last completion, as vLLM's `benchmark_serving`). Latencies are at the *sustained* rate: the "
            f"highest offered rate whose p99 TTFT stayed within {args.ttft_slo:g} s with every request answered "
            f"(else the lowest rate, marked SLO missed). Percentiles over few requests are the extreme ones (p99 of "
            f"16 requests is the maximum). Base requests do not depend on the adapters: base runs once."]  # fmt: skip
    t = report.get("targets", {})
    out += ["", f"## Targets ({t.get('config')}; reported, not asserted)", "", "| target | goal | value | met |",
            "|---|---|---|---|"]  # fmt: skip
    for name, v in t.items():
        if isinstance(v, dict):
            goal = f"≤ {v['goal']:g}×" if "TTFT" in name else f"≥ {v['goal']:g}×"
            extra = f" (at {v['rate']:.2f}/s)" if "rate" in v else ""
            met = "-" if v["met"] is None else "yes" if v["met"] else "**no**"
            out.append(f"| {name}{extra} | {goal} | {_f(v['value'])} | {met} |")
    out += ["", "## Servers", "", "| server | adapters registered | start / warm-up s | peak RSS MB | "
            "loads / evictions | adapter switches | decode forwards | mean rows per forward | load avg start → end |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, info in report.get("servers", {}).items():
        c, eng = info.get("counters", {}), info.get("engine_total", {})
        forwards = eng.get("steps", eng.get("forwards"))
        rows = eng.get("batched_rows")
        switches = eng.get("merges", eng.get("adapter_switches", "-"))
        if "merge_ms" in eng:
            switches = f"{switches} ({eng['merge_ms'] / 1000:.1f} s merging)"
        out.append(f"| {label} | {info.get('adapters', '-')} | {info.get('start_s', '-')} / {info.get('warm_s', '-')} | "
                   f"{_f(info.get('peak_rss_mb'), 4)} | {_f(c.get('adapter_loads'))} / "
                   f"{_f(c.get('adapter_evictions'))} | {switches} | {forwards} | "
                   f"{_f(rows / forwards if rows and forwards else None)} | {info.get('loadavg_start', '?')} → "
                   f"{info.get('loadavg_end', '?')} |")  # fmt: skip
    out += ["", "Start: every server process starts at once, before any measurement (seconds until each serves: "
            "model and, for the baselines, every adapter loaded); warm-up: ours every adapter once (loads them), then "
            "one burst of `--max-running` requests (base: the burst; baselines: 4 requests). "
            "Peak RSS: the server process's `VmHWM` (each system is a process of its own, forked from one "
            "process that imported torch, transformers, peft and adapterkit). Loads/evictions: the server's "
            "`adapter_loads_total` / `adapter_evictions_total` (the baselines load every adapter at start and never "
            "evict). Adapter switches: merges (merge-swap), `set_adapter` changes (naive peft). Forwards and rows "
            "over the whole run, warm-up included (ours: decode steps only; baselines: every forward)."]  # fmt: skip
    if report.get("agreement"):
        out += ["", "Greedy outputs equal to ours (one fixed prompt, the first 4 adapters, float32): "
                + ", ".join(f"{s} {v}" for s, v in report["agreement"].items()) + "."]  # fmt: skip
    out += ["", "## Every point", "",
            "| configuration | system | offered /s | done | req/s | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms "
            "| e2e p50 / p99 ms | mean batch | errors |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, system, res in _rows(report):
        pts = list(res.get("points", []))
        if res.get("half_rate"):
            pts.append({**res["half_rate"], "half": True})
        for pt in pts:
            tag = " (½ of ours' sat.)" if pt.get("half") else ""
            out.append(f"| {key} | {system} | {pt['rate']:.2f}{tag} | {pt['completed']}/{pt['requests']} | "
                       f"{_f(pt['req_s'])} | {_f(pt['tok_s'])} | {_ms(pt['ttft_p50'])} / {_ms(pt['ttft_p99'])} | "
                       f"{_ms(pt['itl_p50'])} / {_ms(pt['itl_p99'])} | {_ms(pt['e2e_p50'])} / {_ms(pt['e2e_p99'])} "
                       f"| {_f(pt['mean_batch'])} | {pt['errors'] + pt['timed_out']} |")  # fmt: skip
    v = meta["versions"]
    out += ["", "## Run", "", "```bash", ".venv/bin/python benchmarks/serve.py " + " ".join(meta["argv"]), "```", "",
            f"Started {meta['started']}, {meta.get('seconds', '?')} s; load average (1/5/15 min) at start "
            f"{meta['loadavg_start']}, at end {meta.get('loadavg_end', '?')}; {v['cpus']} CPUs ({v['machine']}); "
            + ", ".join(f"{k} {v[k]}" for k in ("python", "adapterkit", "torch", "transformers", "peft", "fastapi",
                                                 "uvicorn", "openai", "commit") if k in v) + "."]  # fmt: skip
    return "\n".join(out) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    keys = list(report["configs"])
    cols = min(3, len(keys)) or 1
    nrows = math.ceil(len(keys) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
    colors = {"ours": "tab:blue", "base": "tab:gray", "peft": "tab:red", "merge": "tab:orange"}
    for ax, key in zip(axes.flat, keys):
        systems = dict(report["configs"][key]["systems"])
        if report.get("base"):
            systems["base"] = report["base"]
        for system, res in systems.items():
            pts = sorted(res.get("points", []), key=lambda p: p["rate"])
            if not pts:
                continue
            x = [p["rate"] for p in pts]
            ax.plot(x, [p["e2e_p50"] for p in pts], "-o", color=colors[system], label=f"{system} e2e p50", ms=3)
            ax.plot(x, [p["ttft_p99"] for p in pts], "--", color=colors[system], label=f"{system} TTFT p99", lw=1)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("offered request rate (req/s)")
        ax.set_ylabel("latency (s)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels) // 2)), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict[str, Any], out: Path, args: argparse.Namespace) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(
        markdown(report, args) + f"\n![latency against request rate]({out.name}.png)\n"
    )
    plot(report, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
