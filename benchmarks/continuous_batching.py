#!/usr/bin/env python
"""transformers' own continuous batching (paged KV, flattened tokens) against ``adapterkit serve``'s engine.

Issue 15, item 3: *evaluate transformers' continuous batching (``init_continuous_batching``, flattened tokens,
paged KV) as the engine for token-wise methods with a per-token segment routing mode; adopt it where it wins*.

Everything runs in ONE process on the same workload: a LLaMA-style model (random init, nothing downloaded),
``--requests`` requests with random prompts of ``--prompt`` tokens, ``--output`` generated tokens each (greedy,
EOS ignored), all submitted at once; ``--adapters`` LoRA adapters (r=16, all linear layers, random B so they act).

Systems (each timed from submitting the first request to the last token; start-up excluded, reported apart):

* ``cb base``: transformers' ``ContinuousBatchingManager`` (``model.init_continuous_batching()``, the engine behind
  ``model.generate_batch``) on the base model; attention ``--attn`` (``sdpa`` or ``paged|eager``: the two that run
  on CPU; the flash paths need CUDA);
* ``cb lora``: the same with ONE adapterkit LoRA on every request. The manager decodes on a thread of its own, and
  ``adapters.use(name)`` is a per-thread/per-task scope (``contextvars``), so a ``use()`` scope around the call does
  not reach that thread: the adapter is made the persistent default with ``adapters.activate(name)`` instead (the
  benchmark checks and reports that ``use()`` alone yields the base model's tokens);
* ``ours base`` / ``ours lora`` / ``ours mixed N``: :class:`adapterkit.serve.engine.Engine` driven directly (no
  HTTP: an ``emit`` callback per request), built as :class:`adapterkit.serve.Server` builds it, for the base model,
  the same single LoRA, and ``--adapters`` LoRA adapters round-robin over the requests (one routed forward per step:
  what transformers' CB cannot do without a per-token routing mode).

The systems alternate within each of ``--reps`` repetitions (the order rotates); medians are reported. Greedy
outputs are compared per request: ``cb base`` against ``ours base``, ``cb lora`` against ``ours lora``.

Run (full, about 5 minutes on 2 cores)::

    .venv/bin/python benchmarks/continuous_batching.py --out benchmarks/results/continuous_batching.md

Quick (tests/test_continuous_batching_bench.py)::

    .venv/bin/python benchmarks/continuous_batching.py --quick
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

ADOPT_RATIO = 1.3  # transformers' CB must beat our engine by this much at equal work to be worth adopting


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--output", type=int, default=32, help="generated tokens per request (EOS ignored)")
    p.add_argument("--adapters", type=int, default=8, help="LoRA adapters of the mixed run (round-robin)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--max-running", type=int, default=32, help="rows per forward (both engines)")
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="prompt tokens per step (both engines)")
    p.add_argument("--page-size", type=int, default=64, help="transformers CB: tokens per KV page")
    p.add_argument(
        "--attn", type=str, default="sdpa", help="transformers CB attention: sdpa, paged|eager, or both"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each system first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny model and workload (smoke test)")
    p.add_argument("--out", type=str, default=None, help="also write the markdown report here")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.hidden, args.layers, args.heads, args.intermediate, args.vocab = 64, 2, 4, 128, 256
        args.requests, args.prompt, args.output, args.adapters, args.r = 6, 8, 4, 2, 4
        args.reps, args.warmup, args.page_size = 1, 0, 16
    if args.requests < 1 or args.prompt < 1 or args.output < 1 or args.adapters < 1:
        p.error("--requests, --prompt, --output and --adapters must be >= 1")
    return args


# --- setup ---------------------------------------------------------------------------------------------------------
def build(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The model with ``--adapters`` LoRA adapters attached through an :class:`AdapterPool` (as the server does:
    saved natively, read and installed by the pool), the engine, and the prompts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import adapterkit as ak
    from adapterkit.serve.engine import Engine
    from adapterkit.serve.pool import AdapterPool

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.prompt + args.output + 8, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    adapters = ak.attach(model)
    names = [f"a{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        adapters.add(name, ak.LoRA(r=args.r, alpha=2 * args.r, targets="all-linear", init_weights=False))
        adapters.save(name, tmp / name)
        adapters.delete(name)
    pool = AdapterPool(adapters, root=tmp)
    for name in names:  # read + install now, so no run pays a load
        pool.acquire(name)
        pool.release(name)
    engine = Engine(model, adapters, pool, eos_ids=set(), max_running=args.max_running,
                    max_queue=max(256, args.requests), max_active_adapters=max(8, args.adapters),
                    max_prefill_tokens=args.max_batch_tokens)  # fmt: skip
    engine.start()
    adapters.activate()  # adding adapters changed the persistent default: every run sets what it needs
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(1, args.vocab, (args.prompt,), generator=g).tolist() for _ in range(args.requests)]
    return {"model": model, "adapters": adapters, "pool": pool, "engine": engine, "names": names,
            "prompts": prompts}  # fmt: skip


# --- our engine ----------------------------------------------------------------------------------------------------
def run_ours(ctx: dict[str, Any], models: list[str | None], args: argparse.Namespace) -> dict[str, Any]:
    """Submit every request at once to our engine; wait for the last one. Returns tokens per request and seconds."""
    from adapterkit.serve.engine import Request

    engine = ctx["engine"]
    attn = ctx["model"].config._attn_implementation
    if "paged" in str(attn):
        raise RuntimeError(
            f"the model still runs transformers' paged attention ({attn}) outside continuous batching"
        )
    n = len(ctx["prompts"])
    tokens: list[list[int]] = [[] for _ in range(n)]
    errors: list[str] = []
    left = [n]
    done = threading.Event()
    lock = threading.Lock()

    def emitter(i: int) -> Any:
        def emit(event: tuple[Any, ...]) -> None:
            if event[0] == "token":
                tokens[i].append(int(event[1]))
                return
            if event[0] == "error":
                errors.append(str(event[1]))
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

        return emit

    reqs = [Request(model=m, prompt=list(p), max_tokens=args.output, emit=emitter(i), temperature=0.0)
            for i, (m, p) in enumerate(zip(models, ctx["prompts"]))]  # fmt: skip
    t0 = time.perf_counter()
    for r in reqs:
        engine.submit(r)
    if not done.wait(timeout=1800):
        raise RuntimeError("our engine did not finish within 30 minutes")
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"our engine failed requests: {errors[:3]}")
    return {"tokens": tokens, "seconds": seconds, "startup": 0.0}


# --- transformers' continuous batching --------------------------------------------------------------------------
def cb_config(args: argparse.Namespace) -> Any:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    pages = math.ceil((args.prompt + args.output) / args.page_size)
    # sized for the workload: left to itself on CPU the manager sizes its cache from the machine's memory
    # (measured: 43 s for 4 requests of 64+8 tokens at hidden 512, against 3 s sized like this)
    return ContinuousBatchingConfig(
        page_size=args.page_size, num_blocks=args.requests * pages + 4, max_batch_tokens=args.max_batch_tokens,
        max_requests_per_batch=args.max_running, use_cuda_graph=False, auto_switch_to_flash=False,
        allow_block_sharing=False, use_async_batching=False,
    )  # fmt: skip


def run_cb(ctx: dict[str, Any], attn: str, args: argparse.Namespace) -> dict[str, Any]:
    """Transformers' ContinuousBatchingManager (what ``generate_batch`` drives) with attention ``attn``, started,
    fed every prompt at once, drained. Adapters apply as the caller arranged (``adapters.activate``) around this
    call. The model's attention implementation is restored afterwards."""
    model = ctx["model"]
    original = model.config._attn_implementation
    if original != attn:
        model.set_attn_implementation(attn)
    try:
        return _run_cb(ctx, model, args)
    finally:  # our engine runs the model's own attention (a paged one would misread its DynamicCache)
        if model.config._attn_implementation != original:
            model.set_attn_implementation(original)


def _run_cb(ctx: dict[str, Any], model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=args.output, do_sample=False, eos_token_id=-1, pad_token_id=0)
    t0 = time.perf_counter()
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb_config(args))
    manager.start()
    startup = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        ids = manager.add_requests(inputs=[list(p) for p in ctx["prompts"]], max_new_tokens=args.output)
        results: dict[str, Any] = {}
        deadline = time.monotonic() + 1800
        while len(results) < len(ids):
            out = manager.get_result(timeout=1)
            if out is not None and out.is_finished():
                results[out.request_id] = out
            elif out is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread stopped unexpectedly")
            if time.monotonic() > deadline:
                raise RuntimeError("transformers' continuous batching did not finish within 30 minutes")
        seconds = time.perf_counter() - t1
    finally:
        manager.stop(block=True, timeout=30)
        if hasattr(model, "destroy_cached_continuous_batching_manager"):
            model.destroy_cached_continuous_batching_manager()
    failed = [r for r in results.values() if r.error is not None]
    if failed:
        raise RuntimeError(f"transformers' continuous batching failed requests: {failed[0].error}")
    tokens = [list(results[i].generated_tokens) for i in ids]
    return {"tokens": tokens, "seconds": seconds, "startup": startup}


# --- comparison --------------------------------------------------------------------------------------------------
def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """Requests whose greedy tokens are identical, and for the others the first position where they differ."""
    same = sum(x == y for x, y in zip(a, b))
    first = [next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
             for x, y in zip(a, b) if x != y]  # fmt: skip
    return {"equal": same, "total": len(a), "first_diff": sorted(first)}


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": version("transformers"),
        "adapterkit": version("adapterkit") if _has("adapterkit") else "src", "cpu": platform.processor() or "?",
    }  # fmt: skip


def _has(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
    except PackageNotFoundError:
        return False
    return True


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    attns = ["sdpa", "paged|eager"] if args.attn == "both" else [args.attn]
    load_before = loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = build(args, Path(tmp))
    adapters, names, n = ctx["adapters"], ctx["names"], args.requests
    one = names[0]
    mixed = [names[i % len(names)] for i in range(n)]

    def cb(attn: str, adapter: str | None) -> Any:
        def fn() -> dict[str, Any]:
            adapters.activate(adapter)  # persistent default: reaches the manager's own thread
            try:
                return run_cb(ctx, attn, args)
            finally:
                adapters.activate()

        return fn

    systems: dict[str, Any] = {}
    for attn in attns:
        systems[f"cb base ({attn})"] = cb(attn, None)
        systems[f"cb lora ({attn})"] = cb(attn, one)
    systems["ours base"] = lambda: run_ours(ctx, [None] * n, args)
    systems["ours lora"] = lambda: run_ours(ctx, [one] * n, args)
    systems[f"ours mixed N={len(names)}"] = lambda: run_ours(ctx, mixed, args)
    keys = list(systems)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    try:
        for _ in range(args.warmup):
            for k in keys:  # warm-up (first-call costs: allocator, lazy imports), not timed
                warm = systems[k]()
                print(f"warm-up {k}: {warm['seconds']:.2f} s", file=sys.stderr, flush=True)
        for rep in range(args.reps):
            order = keys[rep % len(keys) :] + keys[: rep % len(keys)]
            for k in order:
                runs[k].append(systems[k]())
                print(f"rep {rep} {k}: {runs[k][-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
        # does a use() scope in the caller's thread reach the manager's thread? (it should not: contextvars)
        with adapters.use(one):
            scoped = run_cb(ctx, attns[0], args)
    finally:
        ctx["engine"].stop()
    out_tokens = n * args.output
    rows = {}
    for k in keys:
        secs = [r["seconds"] for r in runs[k]]
        med = statistics.median(secs)
        rows[k] = {"seconds": med, "tok_s": out_tokens / med, "all": secs,
                   "startup": statistics.median(r["startup"] for r in runs[k])}  # fmt: skip
    last = {k: runs[k][-1]["tokens"] for k in keys}
    checks = {}
    for attn in attns:
        checks[f"cb base ({attn}) vs ours base"] = agreement(last[f"cb base ({attn})"], last["ours base"])
        checks[f"cb lora ({attn}) vs ours lora"] = agreement(last[f"cb lora ({attn})"], last["ours lora"])
    checks["lora differs from base (ours)"] = agreement(last["ours lora"], last["ours base"])
    checks[f"cb under use() only vs cb base ({attns[0]})"] = agreement(
        scoped["tokens"], last[f"cb base ({attns[0]})"]
    )
    report = {"args": vars(args), "rows": rows, "checks": checks, "versions": versions(),
              "load": {"before": load_before, "after": loadavg()},
              "engine_stats": dict(ctx["engine"].stats)}  # fmt: skip
    text = markdown(report, args, attns)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return report


def markdown(report: dict[str, Any], args: argparse.Namespace, attns: list[str]) -> str:
    rows, checks = report["rows"], report["checks"]
    cmd = ".venv/bin/python benchmarks/continuous_batching.py " + " ".join(args.argv)
    lines = [
        "# transformers' continuous batching vs adapterkit's engine (issue 15, item 3)",
        "",
        f"Command: `{cmd.strip()}`  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + "  ",
        f"Load average (1/5/15 min) before: {report['load']['before']}, after: {report['load']['after']} "
        f"(shared machine; {args.threads} torch threads)",
        "",
        f"Workload: LLaMA-style random model, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"vocab {args.vocab}; {args.requests} requests submitted at once, prompts {args.prompt} tokens, "
        f"{args.output} output tokens each (greedy, EOS ignored); LoRA r={args.r} on all linear layers; "
        f"{args.max_running} rows per forward and {args.max_batch_tokens} prompt tokens per step in both engines; "
        f"CB page size {args.page_size}. Medians of {args.reps} alternating repetitions after {args.warmup} "
        "untimed warm-up round(s).",
        "",
        "| system | seconds | output tok/s | vs ours base | vs ours (same adapters) | start-up s | runs (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    base = rows["ours base"]["tok_s"]
    for k, r in rows.items():
        same = "ours lora" if "lora" in k else "ours base" if "base" in k else k
        lines.append(
            f"| {k} | {r['seconds']:.2f} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | "
            f"{r['tok_s'] / rows[same]['tok_s']:.2f}x | {r['startup']:.2f} | "
            + ", ".join(f"{s:.2f}" for s in r["all"])
            + " |"
        )
    lines += [
        "",
        "Greedy agreement (requests with identical tokens; first differing positions of the others):",
        "",
    ]
    for k, c in checks.items():
        diff = f", first differences at {c['first_diff']}" if c["first_diff"] else ""
        lines.append(f"- {k}: {c['equal']}/{c['total']} equal{diff}")
    lines += ["", "Verdict: " + verdict(rows, attns)]
    return "\n".join(lines) + "\n"


def verdict(rows: dict[str, Any], attns: list[str]) -> str:
    best = max(attns, key=lambda a: rows[f"cb lora ({a})"]["tok_s"])
    lora = rows[f"cb lora ({best})"]["tok_s"] / rows["ours lora"]["tok_s"]
    base = rows[f"cb base ({best})"]["tok_s"] / rows["ours base"]["tok_s"]
    if lora > ADOPT_RATIO and base > ADOPT_RATIO:
        return (f"transformers' CB ({best}) is {lora:.2f}x our engine with one LoRA and {base:.2f}x on the base "
                f"model (> {ADOPT_RATIO}x): worth a per-token segment routing mode.")  # fmt: skip
    return (f"not adopted: transformers' CB ({best}) reaches {lora:.2f}x our engine's throughput with one LoRA and "
            f"{base:.2f}x on the base model (adoption needs > {ADOPT_RATIO}x at equal work), and it cannot mix "
            "adapters in one forward without a routing mode of its own.")  # fmt: skip


if __name__ == "__main__":
    main()
