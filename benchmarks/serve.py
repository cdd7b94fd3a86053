#!/usr/bin/env python
"""``adapterkit serve`` under open-loop load (first step of issue 15's benchmark; systems still to add: a naive peft
server and a merge-swap server behind the same front end).

A LLaMA-style model (random init) and ``--adapters`` LoRA adapters (ranks cycling through 8, 16, 32) are saved to
a temporary directory and served in-process on 127.0.0.1. Requests arrive as a Poisson process (``--rate`` per
second, open loop: one client thread per request, the real ``openai`` client, streamed so TTFT and inter-token
latency are seen by the client); request ``i`` names adapter ``k`` with probability ∝ ``k^-s`` (Zipf, ``--zipf``).
Prompts have ``--prompt`` tokens, outputs ``--output`` tokens (no EOS in the random model's config).

Systems:

* ``ours``: continuous batching, rows of different adapters in one routed forward;
* ``base``: the same requests sent to the base model (the ceiling);
* ``fifo``: ours with ``--max-running 1`` (one request at a time: what a server without batching does).

Reports per system: throughput (requests/s, output tokens/s), TTFT, inter-token and end-to-end latency p50/p99.

Quick run::

    .venv/bin/python benchmarks/serve.py --hidden 128 --layers 2 --adapters 8 --requests 16 --rate 8 --output 8
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from pathlib import Path


def build(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import adapterkit as ak

    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", *[f"w{i}" for i in range(args.vocab - 2)]]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    heads = max(1, args.hidden // 64)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=args.prompt + args.output + 8, eos_token_id=None)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "model")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(
        root / "model"
    )
    adapters = ak.attach(model)
    for i in range(args.adapters):
        name = f"a{i}"
        adapters.add(name, ak.LoRA(r=(8, 16, 32)[i % 3], targets="all-linear", init_weights=False))
        adapters.save(name, root / "adapters" / name)
        adapters.delete(name)
    return root / "model", root / "adapters"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run(system: str, model: Path, adapters: Path, args: argparse.Namespace) -> dict[str, float]:
    import openai

    from adapterkit.serve import Server

    srv = Server(model, adapters_dir=adapters, port=0, max_running=1 if system == "fifo" else args.max_running,
                 max_queue=10**6, max_active_adapters=args.adapters)  # fmt: skip
    port = srv.start_in_thread()
    rng = random.Random(args.seed)
    weights = [(k + 1) ** -args.zipf for k in range(args.adapters)]
    names = [str(model) if system == "base" else f"a{rng.choices(range(args.adapters), weights)[0]}"
             for _ in range(args.requests)]  # fmt: skip
    prompt = " ".join(f"w{rng.randrange(args.vocab - 2)}" for _ in range(args.prompt))
    results: list[tuple[float, list[float], float]] = []
    lock = threading.Lock()

    def one(name: str) -> None:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
        start = time.perf_counter()
        stamps = []
        for chunk in client.completions.create(model=name, prompt=prompt, max_tokens=args.output, temperature=0,
                                               stream=True):  # fmt: skip
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())
        end = time.perf_counter()
        with lock:
            results.append((start, stamps, end))

    # warm: load every adapter, then one concurrent burst (first batched/routed forwards pay one-time costs)
    for name in sorted(set(names)):
        one(name)
    burst = [threading.Thread(target=one, args=(n,)) for n in names[: args.max_running]]
    for t in burst:
        t.start()
    for t in burst:
        t.join()
    results.clear()
    threads = []
    t0 = time.perf_counter()
    for name in names:
        t = threading.Thread(target=one, args=(name,))
        t.start()
        threads.append(t)
        time.sleep(rng.expovariate(args.rate))
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    srv.stop()
    ttft = [s[0] - a for a, s, _ in results if s]
    itl = [b - a for _, s, _ in results for a, b in zip(s, s[1:])]
    e2e = [e - a for a, _, e in results]
    return {"req/s": len(results) / wall, "tok/s": len(results) * args.output / wall,
            "ttft p50": pct(ttft, 0.5), "ttft p99": pct(ttft, 0.99), "itl p50": pct(itl, 0.5),
            "itl p99": pct(itl, 0.99), "e2e p50": pct(e2e, 0.5), "e2e p99": pct(e2e, 0.99)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--rate", type=float, default=4.0, help="arrivals per second (Poisson)")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--output", type=int, default=32)
    p.add_argument("--max-running", type=int, default=64)
    p.add_argument("--systems", default="ours,base,fifo")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, adapters = build(Path(tmp), args)
        rows = {s: run(s, model, adapters, args) for s in args.systems.split(",")}
    keys = list(next(iter(rows.values())))
    print("| system | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for s, r in rows.items():
        print(f"| {s} | " + " | ".join(f"{r[k]:.3g}" for k in keys) + " |")
    print(f"\nN={args.adapters} adapters, zipf s={args.zipf}, {args.requests} requests at {args.rate}/s, "
          f"prompt {args.prompt}, output {args.output}, hidden {args.hidden}, {args.layers} layers")  # fmt: skip


if __name__ == "__main__":
    main()
