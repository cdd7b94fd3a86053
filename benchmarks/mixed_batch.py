#!/usr/bin/env python
"""Mixed-adapter batches: adapterkit's routed batches vs peft's ``adapter_names=`` vs the base model.

A LLaMA-style model (random init, nothing downloaded) carries N LoRA adapters (r=16 on all seven
projections). Each row of a batch of 32 names its adapter, round-robin over the N adapters. Three
variants run the same batch in ONE process, alternating (the order rotates every rep); medians:

* ``base``: the model without adapters (``adapters.use()`` / ``peft.disable_adapter()`` are not used:
  a separate copy with no hooks at all);
* ``ours``: ``with adapters.route(names): model(input_ids)`` (gathered batched matmuls over stacked
  adapter weights);
* ``peft``: ``peft_model(input_ids, adapter_names=names)`` (peft 0.21's mixed-batch inference), with the
  same adapter weights (exported by adapterkit, loaded by peft; outputs are checked to agree).

Shapes: decode (1 token per row, no KV cache: the per-token projection cost) and prefill (128 tokens
per row). For decode, a serving loop enters ``route()`` once per request batch and runs many steps (as
``generate()`` does), so the stacked adapter weights are built once per ``route()``: the timing runs
``--decode-steps`` forwards per ``route()`` entry and reports the time per forward. Prefill enters
``route()`` for every forward. Float32, ``torch.set_num_threads(--threads)``, ``torch.inference_mode``.

Run::

    .venv/bin/python benchmarks/mixed_batch.py --out benchmarks/results/mixed_batch.md
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

TARGETS = "decode N=32: ours <= 1.4x base and >= 6x peft throughput; prefill: ours <= 1.10x base at every N"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--prefill-len", type=int, default=128)
    p.add_argument("--adapters", type=str, default="1,2,4,8,16,32", help="comma-separated N values")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--decode-steps", type=int, default=8, help="decode forwards per route() entry")
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--out", type=str, default=None, help="also write the markdown table here")
    return p.parse_args(argv)


def build_models(args: argparse.Namespace, n_max: int, tmp: str):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    import adapterkit as ak

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(256, args.prefill_len),
    )
    base = LlamaForCausalLM(cfg).eval()
    ours = copy.deepcopy(base)
    adapters = ak.attach(ours)
    names = [f"a{i}" for i in range(n_max)]
    targets = ["attn.q", "attn.k", "attn.v", "attn.out", "ffn.gate", "ffn.up", "ffn.down"]
    for i, n in enumerate(names):
        torch.manual_seed(100 + i)
        adapters.add(n, ak.LoRA(r=args.r, alpha=2 * args.r, targets=targets, init_weights=False))
    peft_model = None
    if not args.skip_peft:
        for n in names:
            adapters.export(n, os.path.join(tmp, n), format="peft")
        peft_model = peft.PeftModel.from_pretrained(
            copy.deepcopy(base), os.path.join(tmp, names[0]), adapter_name=names[0]
        )
        for n in names[1:]:
            peft_model.load_adapter(os.path.join(tmp, n), adapter_name=n)
        peft_model.eval()
    return base, ours, adapters, peft_model, names


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ns = [int(n) for n in args.adapters.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        base, ours, adapters, peft_model, names = build_models(args, max(ns), tmp)
    g = torch.Generator().manual_seed(1)
    rows_out = []
    for shape, length in (("decode", 1), ("prefill", args.prefill_len)):
        ids = torch.randint(0, args.vocab, (args.batch, length), generator=g)
        steps = args.decode_steps if shape == "decode" else 1
        for n in ns:
            per_row = [names[i % n] for i in range(args.batch)]

            def run_base(ids: torch.Tensor = ids, steps: int = steps) -> None:
                for _ in range(steps):
                    base(input_ids=ids)

            def run_ours(ids: torch.Tensor = ids, steps: int = steps, per_row: list = per_row) -> None:
                with adapters.route(per_row):
                    for _ in range(steps):
                        ours(input_ids=ids)

            def run_peft(ids: torch.Tensor = ids, steps: int = steps, per_row: list = per_row) -> None:
                for _ in range(steps):
                    peft_model(input_ids=ids, adapter_names=per_row)

            variants = {"base": run_base, "ours": run_ours}
            if peft_model is not None:
                variants["peft"] = run_peft
            with torch.inference_mode():
                if peft_model is not None:  # same weights -> same logits
                    with adapters.route(per_row):
                        a = ours(input_ids=ids).logits
                    b = peft_model(input_ids=ids, adapter_names=per_row).logits
                    err = (a - b).abs().max().item()
                    if err > 1e-3:
                        raise SystemExit(f"ours and peft disagree ({shape}, N={n}): max abs diff {err}")
                for fn in variants.values():  # warmup
                    fn()
                times: dict[str, list[float]] = {k: [] for k in variants}
                order = list(variants)
                for rep in range(args.reps):
                    for k in order[rep % len(order) :] + order[: rep % len(order)]:
                        times[k].append(timed(variants[k]) / steps)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {
                "shape": shape,
                "N": n,
                "base_tok_s": args.batch * length / med["base"],
                "ours_tok_s": args.batch * length / med["ours"],
                "ours/base": med["ours"] / med["base"],
            }
            if "peft" in med:
                row["peft_tok_s"] = args.batch * length / med["peft"]
                row["peft/base"] = med["peft"] / med["base"]
                row["ours_speedup_vs_peft"] = med["peft"] / med["ours"]
            rows_out.append(row)
            print(
                f"{shape:<8} N={n:<3} base {row['base_tok_s']:>9.0f} tok/s  ours {row['ours_tok_s']:>9.0f} tok/s "
                f"({row['ours/base']:.2f}x base time)"
                + (
                    f"  peft {row['peft_tok_s']:>9.0f} tok/s ({row['peft/base']:.2f}x base time); "
                    f"ours {row['ours_speedup_vs_peft']:.1f}x peft throughput"
                    if "peft" in med
                    else ""
                ),
                flush=True,
            )
    table = render(rows_out, args)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


def render(rows: list[dict], args: argparse.Namespace) -> str:
    import peft
    import transformers

    cmd = "python benchmarks/mixed_batch.py " + " ".join(sys.argv[1:])
    lines = [
        f"Command: `{cmd.strip()}`",
        "",
        f"LLaMA-style hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate "
        f"{args.intermediate}, vocab {args.vocab}; LoRA r={args.r} on 7 projections; batch {args.batch}; float32; "
        f"{args.threads} threads; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}; {platform.processor() or platform.machine()}.",
        f"Targets: {TARGETS}.",
        "",
        "| shape | N adapters | base tok/s | ours tok/s | ours time / base | peft tok/s | peft time / base "
        "| ours throughput / peft |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['N']} | {r['base_tok_s']:.0f} | {r['ours_tok_s']:.0f} | {r['ours/base']:.2f}x | "
            f"{r.get('peft_tok_s', float('nan')):.0f} | {r.get('peft/base', float('nan')):.2f}x | "
            f"{r.get('ours_speedup_vs_peft', float('nan')):.1f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
