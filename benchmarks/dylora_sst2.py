#!/usr/bin/env python
"""DyLoRA on SST-2: one DyLoRA run evaluated at ranks b = 1, 2, 4, 8, beside separate LoRA runs at those ranks.

The recipe is ``benchmarks/methods_sst2.py``'s (MiniLM-L6 with a fresh 2-way head, 8,000 training sentences, 2 epochs
of batch 32, max length 64, AdamW with linear decay and 6% warmup, seed 42, all 872 dev sentences), with its LoRA row's
targets (``attn.q``, ``attn.v``) and learning rate (1e-3). Scaling: LoRA rank r uses ``alpha = 16`` (``s = 16/r``),
DyLoRA rank b ``s = 16/b`` (Valipour et al. 2023, Eq. 5), so each evaluated rank has the scaling of the LoRA it is
compared with. DyLoRA: ``r_max = 8``, ranks drawn uniformly in 1..8 every step (one per step for the adapter),
``frozen=True`` (the paper's Algorithm 1). The loop calls ``adapters.step()`` after every optimizer step.

Run (about 5 minutes per training run on 2 quiet cores; 5 runs)::

    .venv/bin/python benchmarks/dylora_sst2.py --out benchmarks/results/dylora_sst2.md
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import lora_sst2 as demo  # noqa: E402  (data reading, model path, accuracy)

import adapterkit as ak  # noqa: E402

RANKS = (1, 2, 4, 8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="dylora," + ",".join(f"lora{r}" for r in RANKS))
    p.add_argument("--train-size", type=int, default=8000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--unfrozen", action="store_true", help="DyLoRA frozen=False (train every rank <= b each step)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dev-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=demo.DATA)
    p.add_argument("--out", type=Path, default=None, help="markdown table (rows also to OUT.json)")
    return p.parse_args(argv)


def train_one(run: str, args: argparse.Namespace, tokenizer, train_rows, dev_rows) -> list[dict]:
    model = demo.load_model(demo.model_path(), args.seed)
    adapters = ak.attach(model)
    targets = ["attn.q", "attn.v"]
    if run == "dylora":
        config = ak.DyLoRA(
            r_max=max(RANKS), alpha=args.alpha, seed=args.seed, frozen=not args.unfrozen, targets=targets
        )
    else:
        config = ak.LoRA(r=int(run.removeprefix("lora")), alpha=args.alpha, targets=targets)
    adapters.add(run, config.replace(heads=("classifier",)))
    adapters.train(run)
    trainable = [p for p in model.parameters() if p.requires_grad]
    steps = args.epochs * math.ceil(len(train_rows) / args.batch_size)
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    warm = max(1, int(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    torch.manual_seed(args.seed)
    model.train()
    t0 = time.perf_counter()
    for step, batch in enumerate(demo.batches(train_rows, args.batch_size, steps, args.seed), 1):
        enc = tokenizer([s for s, _ in batch], padding=True, truncation=True, max_length=args.max_length,
                        return_tensors="pt")  # fmt: skip
        loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss + adapters.aux_loss()
        loss.backward()
        opt.step()
        adapters.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0:
            print(
                f"  {run} step {step}/{steps} loss {loss.item():.4f} {time.perf_counter() - t0:.0f}s", flush=True
            )
    seconds = time.perf_counter() - t0
    rows = []
    for b in RANKS if run == "dylora" else (int(run.removeprefix("lora")),):
        if run == "dylora":
            adapters.set_rank(run, b)
        acc = demo.accuracy(model, tokenizer, dev_rows, args.max_length)
        rows.append({"run": run, "rank": b, "acc": 100.0 * acc, "seconds": seconds,
                     "trainable": sum(p.numel() for p in trainable)})  # fmt: skip
        print(f"{run} at rank {b}: dev {100 * acc:.1f}% ({seconds:.0f}s training)", flush=True)
    return rows


def render(rows: list[dict], args: argparse.Namespace, n_train: int, n_dev: int) -> str:
    by = {(r["run"], r["rank"]): r for r in rows}
    lines = [
        "Command: `python benchmarks/dylora_sst2.py"
        + (f" --out {args.out}" if args.out else "")
        + (f" --train-size {args.train_size}" if args.train_size != 8000 else "")
        + "`",
        "",
        f"MiniLM-L6, SST-2: {n_train:,} training sentences, {args.epochs} epochs, batch {args.batch_size}, max length "
        f"{args.max_length}, lr {args.lr:g}, seed {args.seed}, targets attn.q/attn.v + own classifier head; dev = "
        f"{n_dev} sentences. One DyLoRA run (r_max 8, {'frozen=False' if args.unfrozen else 'frozen'}, alpha {args.alpha:g}) "
        "evaluated at each rank; one LoRA "
        f"run per rank (alpha {args.alpha:g}). torch {torch.__version__}.",
        "",
        "| rank | DyLoRA (one run) | LoRA at that rank (own run) |",
        "|---:|---:|---:|",
    ]
    for b in RANKS:
        d, lo = by.get(("dylora", b)), by.get((f"lora{b}", b))
        cells = [f"{r['acc']:.1f}%" if r else "n/a" for r in (d, lo)]
        lines.append(f"| {b} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo.model_path())
    train_rows = demo.read_tsv(args.data / "train.tsv")
    random.Random(args.seed).shuffle(train_rows)
    train_rows = train_rows[: args.train_size]
    dev_rows = demo.read_tsv(args.data / "dev.tsv")[: args.dev_size]
    rows: list[dict] = []
    store = args.out.with_suffix(".json") if args.out else None
    for run in args.runs.split(","):
        rows += train_one(run.strip(), args, tokenizer, train_rows, dev_rows)
        if args.out:  # after every run, so a long run leaves its figures so far
            args.out.write_text(render(rows, args, len(train_rows), len(dev_rows)) + "\n")
            store.write_text(json.dumps(rows, indent=1) + "\n")
    print(render(rows, args, len(train_rows), len(dev_rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
