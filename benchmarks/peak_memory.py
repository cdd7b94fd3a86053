#!/usr/bin/env python
"""Peak memory of one training step: the LyCORIS and rotation methods (issue 17) against peft, beside LoRA r=16.

Each variant is built exactly as in ``lycoris_vs_peft.py`` (LoKr, LoHa), ``oft_vs_peft.py`` (OFT, BOFT) and
``hra_road_vs_peft.py`` (HRA, RoAd) — same LLaMA-style model, every linear layer adapted — but in a process of its
own (forked from one that imported torch, transformers, peft and adapterkit), so one variant's allocations cannot
hide another's (freed memory the allocator keeps would). In the child: build the model and the variant, reset the
process's peak RSS (``/proc/self/clear_refs``), run ``--steps`` training steps and read ``VmHWM``. Reported: the
peak above the resident size of the built model (activations, gradients, AdamW states, temporaries: what training
the method costs), and the process's peak RSS. Memory does not depend on the machine's load, unlike timings.

    .venv/bin/python benchmarks/peak_memory.py --out benchmarks/results/peak_memory.md
    .venv/bin/python benchmarks/peak_memory.py --hidden 256 --layers 1 --seq 16 --variants lokr,peft-lokr  # smoke

Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hra_road_vs_peft as hra_road  # noqa: E402
import lycoris_vs_peft as lycoris  # noqa: E402
import oft_vs_peft as oft  # noqa: E402

# variant -> the benchmark module whose ``build`` makes it
SOURCES = {
    "lora16": lycoris,
    "lokr": lycoris,
    "peft-lokr": lycoris,
    "loha": lycoris,
    "peft-loha": lycoris,
    "oft": oft,
    "peft-oft": oft,
    "boft": oft,
    "peft-boft": oft,
    "hra": hra_road,
    "peft-hra": hra_road,
    "road": hra_road,
    "peft-road": hra_road,
}
SHAPE = ("hidden", "layers", "heads", "intermediate", "vocab", "seq", "batch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--variants", default=",".join(SOURCES), help="comma-separated subset of " + ", ".join(SOURCES))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the markdown table here")
    return p.parse_args(argv)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(variant: str, args: argparse.Namespace, out: mp.Queue) -> None:
    """Build ``variant`` and measure; puts ``(variant, trainable, step_peak_mib, process_peak_mib)``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    src = SOURCES[variant]
    own = src.parse_args(
        [f"--{k}={getattr(args, k)}" for k in SHAPE]
    )  # the method settings: that script's defaults
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 64),
    )  # fmt: skip
    base = LlamaForCausalLM(cfg)
    model, opt, trainable = src.build(variant, base, own)
    del base
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    for _ in range(args.steps):
        src.step(model, opt, ids)
    peak = _status_kb("VmHWM")
    out.put((variant, trainable, (peak - before) / 1024, peak / 1024))


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(SOURCES))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(SOURCES)}")
    import peft  # noqa: F401  (imported before forking, as the build functions need it)
    import torch  # noqa: F401

    import adapterkit  # noqa: F401

    ctx = mp.get_context("fork")
    rows = {}
    for v in variants:
        q = ctx.Queue()
        proc = ctx.Process(target=_child, args=(v, args, q))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"{v}: the measuring process failed (exit code {proc.exitcode})")
        name, trainable, step_peak, process_peak = q.get()
        rows[name] = (trainable, step_peak, process_peak)
        print(f"{name}: step peak {step_peak:.1f} MiB above {process_peak - step_peak:.1f} MiB", flush=True)
    lines = [
        f"LLaMA-style h={args.hidden} layers={args.layers} ffn={args.intermediate} seq={args.seq} batch={args.batch}, "
        f"all-linear, float32 CPU, {args.threads} thread(s); each variant in its own process, peak over its first "
        f"{args.steps} training steps",
        "",
        "| variant | trainable | training peak above the built model (MiB) | vs peft | process peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for v, (trainable, step_peak, process_peak) in rows.items():
        peer = rows.get(f"peft-{v}")
        vs = f"{step_peak / peer[1]:.2f}×" if peer else ""
        lines.append(f"| {v} | {trainable:,} | {step_peak:.1f} | {vs} | {process_peak:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
