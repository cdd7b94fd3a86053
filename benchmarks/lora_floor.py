#!/usr/bin/env python
"""The cost of an unmerged LoRA branch against its base linear layer, GEMM by GEMM.

For each linear-layer shape of ``lora_vs_peft.py``'s LLaMA-style model (hidden 1024, intermediate 2816;
batch 8 × 256 tokens, r = 16, float32) this times, under ``torch.no_grad``:

* the base GEMM ``x @ W^T``,
* LoRA's first GEMM ``h = x @ A^T`` (one per site, and one for q/k/v together as ``x @ [A_q; A_k; A_v]^T``),
* LoRA's second GEMM added in place into the base output ``y += s · h @ B^T`` (``addmm_``, what adapterkit does),

and prints the LoRA branch as a share of the base GEMM per site and for the whole decoder layer (4 attention
projections + gate/up/down). That share is the floor for ``ours/base`` in unmerged inference: no
implementation that keeps the base output and adds LoRA's can go below it, whatever its Python overhead.

Run (about half a minute)::

    .venv/bin/python benchmarks/lora_floor.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def timed(reps: int, fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    """Median milliseconds of ``fn(*args, **kwargs)`` over ``reps`` runs after one warmup."""
    fn(*args, **kwargs)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--tokens", type=int, default=8 * 256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h, i, n, r = args.hidden, args.intermediate, args.tokens, args.r
    # (site, in, out, count per layer)
    shapes = [("attn q/k/v/o", h, h, 4), ("mlp gate/up", h, i, 2), ("mlp down", i, h, 1)]
    print(f"tokens {n}, r {r}, threads {args.threads}, float32; medians of {args.reps}")
    print(f"{'site':<14} {'base GEMM':>10} {'x@A^T':>8} {'y+=h@B^T':>9} {'LoRA/base':>9}")
    base_total = lora_total = 0.0
    with torch.no_grad():
        for site, d_in, d_out, count in shapes:
            x = torch.randn(n, d_in)
            W = torch.randn(d_out, d_in) / d_in**0.5
            A = torch.randn(r, d_in) / d_in**0.5
            B = torch.randn(d_out, r) / r**0.5
            y = F.linear(x, W)
            hr = F.linear(x, A)
            t_base = timed(args.reps, F.linear, x, W)
            t_a = timed(args.reps, F.linear, x, A)
            t_b = timed(args.reps, y.addmm_, hr, B.t(), alpha=0.5)
            print(f"{site:<14} {t_base:9.2f}ms {t_a:7.2f}ms {t_b:8.2f}ms {100 * (t_a + t_b) / t_base:8.1f}%")
            base_total += count * t_base
            lora_total += count * (t_a + t_b)
        x = torch.randn(n, h)
        A3 = torch.randn(3 * r, h)
        A1 = A3[:r].contiguous()
        t_three = 3 * timed(args.reps, F.linear, x, A1)
        t_one = timed(args.reps, F.linear, x, A3)
    print(f"decoder layer: base GEMMs {base_total:.1f} ms, LoRA branches {lora_total:.1f} ms "
          f"= {100 * lora_total / base_total:.1f}% of the base GEMMs")  # fmt: skip
    print(f"q/k/v first GEMMs: three of rank {r} {t_three:.2f} ms, one of rank {3 * r} {t_one:.2f} ms "
          f"(saves {t_three - t_one:.2f} ms = {100 * (t_three - t_one) / base_total:.2f}% of the layer's base GEMMs)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
