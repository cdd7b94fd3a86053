"""One decode step of a continuous-batching server, ours (routed over many LoRA adapters) against the base model.

The engine's hot loop without HTTP or scheduling: a LLaMA-style model (hidden 512, 4 layers, intermediate 1408,
vocab 1000, as ``benchmarks/serve.py``), 64 LoRA adapters on all linear layers (r cycling 8/16/32, alpha 2r), a batch
of 64 rows whose adapters follow Zipf popularity ``p_i ∝ i^-s``, a KV cache of ``--context`` tokens. Each measured
step replaces ``--churn`` random rows by new draws first (requests finishing and joining, as at saturation), so the
route plan changes from step to step like the engine's. Times are the thread's CPU time (steadier than wall time on a
shared machine); base and routed steps alternate. Prints medians and the ratio routed / base.

    .venv/bin/python benchmarks/routed_decode.py [--adapters 64] [--batch 64] [--zipf 1] [--churn 2] [--steps 30]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import adapterkit as ak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--churn", type=int, default=2, help="rows replaced before each step")
    p.add_argument("--context", type=int, default=80, help="KV cache length")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                      intermediate_size=1408, vocab_size=1000)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    adapters = ak.attach(model)
    for i in range(a.adapters):
        r = (8, 16, 32)[i % 3]
        adapters.add(f"a{i}", ak.LoRA(r=r, alpha=2 * r, targets="all-linear", init_weights=False))
    rng = random.Random(0)
    weights = [1 / (i + 1) ** a.zipf for i in range(a.adapters)]
    rows = [f"a{i}" for i in rng.choices(range(a.adapters), weights, k=a.batch)]
    kv = torch.randn(a.batch, 8, a.context, 64)
    ids = torch.randint(0, 1000, (a.batch, 1))

    def step(names: list[str] | None) -> float:
        cache = DynamicCache()
        for layer in range(cfg.num_hidden_layers):
            cache.update(kv.clone(), kv.clone(), layer)
        scope = adapters.use(None) if names is None else adapters.route(names)
        with torch.inference_mode(), scope:
            start = time.thread_time()
            model(input_ids=ids, cache=cache, use_cache=True)
            return time.thread_time() - start

    step(None), step(rows)  # warm-up
    base, routed = [], []
    for _ in range(a.steps):
        for _ in range(a.churn):
            rows[rng.randrange(a.batch)] = f"a{rng.choices(range(a.adapters), weights)[0]}"
        base.append(step(None))
        routed.append(step(list(rows)))
    b, r = statistics.median(base) * 1e3, statistics.median(routed) * 1e3
    print(
        f"distinct adapters in the last batch: {len(set(rows))} of {a.adapters}; batch {a.batch}, churn {a.churn}"
    )
    print(
        f"base step {b:.1f} ms, routed step {r:.1f} ms (CPU time, medians of {a.steps}): routed / base {r / b:.2f}"
    )


if __name__ == "__main__":
    main()
