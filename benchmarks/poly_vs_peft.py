#!/usr/bin/env python
"""Polytropon and Multi-Head Routing: adapterkit's ``ak.Poly`` vs peft's ``PolyConfig`` vs the frozen base, on the
same weights, with mixed-task batches.

A LLaMA-style model is built from ``transformers.LlamaConfig`` (random init, seeded, nothing downloaded). For each
``--splits`` value (1: Polytropon; more: MHR's heads), peft's adapter is built with ``init_weights=False``, every
trainable tensor perturbed, saved with ``save_pretrained`` and loaded into adapterkit on an identical copy of the
base, so both start from the same skills and allocation; the script checks that the eval logits agree (float32,
max |Δ| printed) and that the trainable-parameter counts are equal. Every row of a batch carries its own task id
(``task_ids``, drawn uniformly from ``--tasks``), as in a multi-task batch.

Measured, as in ``benchmarks/lora_vs_peft.py``: a training step (forward + causal-LM loss + backward + AdamW step
over the trainable parameters, ``zero_grad(set_to_none=True)``; both libraries draw the relaxed-Bernoulli allocation
per row in training) and unmerged inference (``eval()``, ``torch.inference_mode()``). ours / peft / base alternate
in ONE process (the order rotating every rep) after warmup; medians over reps. The base runs forward + backward
with ``inputs_embeds`` requiring grad, so backward goes through every layer. Ratios are printed; nothing is
asserted about speed.

Quick smoke run::

    .venv/bin/python benchmarks/poly_vs_peft.py --hidden 256 --layers 2 --vocab 1024 --seq 32 --batch 4 --reps 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--tasks", type=int, default=4, help="n_tasks; each row's id is drawn from [0, tasks)")
    p.add_argument("--skills", type=int, default=4, help="n_skills")
    p.add_argument("--splits", default="1,8", help="comma-separated n_splits values (1: Polytropon, >1: MHR)")
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names (both libraries)")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    return p.parse_args(argv)


def build_base(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=args.seq)  # fmt: skip
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def perturb(params: list[nn.Parameter], seed: int) -> None:
    """Move every tensor off peft's init (B = 0 would make both adapters the identity and hide a wrong mixing)."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * 0.05)


def build_pair(base: nn.Module, splits: int, args: argparse.Namespace, tmp: Path) -> tuple[nn.Module, nn.Module]:
    """(ours, peft's) Poly models on copies of ``base`` with the same perturbed weights."""
    from peft import PolyConfig, get_peft_model

    import adapterkit as ak

    cfg = PolyConfig(task_type="CAUSAL_LM", target_modules=args.targets.split(","), r=args.r, n_tasks=args.tasks,
                     n_skills=args.skills, n_splits=splits, init_weights=False)  # fmt: skip
    theirs = get_peft_model(copy.deepcopy(base), cfg)
    perturb([p for p in theirs.parameters() if p.requires_grad], seed=args.seed + splits)
    theirs.save_pretrained(tmp)
    ours = copy.deepcopy(base)
    adapters = ak.attach(ours)
    name = adapters.load(tmp)
    adapters.train(name)
    return ours, theirs


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def timed(models: dict[str, nn.Module], fn: Callable[[str], float], args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of ``fn(name)`` per model, the models alternating with a rotating order after warmup."""
    times: dict[str, list[float]] = {n: [] for n in models}
    names = list(models)
    for rep in range(args.warmup + args.reps):
        k = rep % len(names)
        for n in names[k:] + names[:k]:
            dt = fn(n)
            if rep >= args.warmup:
                times[n].append(dt)
    return {n: statistics.median(v) for n, v in times.items()}


def bench(base: nn.Module, splits: int, args: argparse.Namespace) -> dict[str, Any]:
    """One ``n_splits`` value: agreement check, trainable counts, train-step and inference medians."""
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = build_pair(base, splits, args, Path(tmp))
    frozen = copy.deepcopy(base).requires_grad_(False)
    models = {"ours": ours, "peft": theirs, "base": frozen}
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    tasks = torch.randint(0, args.tasks, (args.batch,), generator=g)
    with torch.inference_mode():
        ours.eval(), theirs.eval()
        mine = ours(input_ids=ids, task_ids=tasks).logits
        diff = (mine - theirs(input_ids=ids, task_ids=tasks).logits).abs().max()
        effect = (mine - frozen(input_ids=ids).logits).abs().max()  # the adapter acts: not the identity
    if not effect > 1e-3:
        raise SystemExit(
            f"n_splits={splits}: the adapters leave the logits unchanged (max |Δ| {float(effect):.1e})"
        )
    counts = {n: sum(p.numel() for p in trainable(models[n])) for n in ("ours", "peft")}
    if counts["ours"] != counts["peft"]:
        raise SystemExit(f"trainable parameters differ: {counts}")
    optims = {n: torch.optim.AdamW(trainable(models[n]), lr=1e-4) for n in ("ours", "peft")}

    def step(name: str) -> float:
        model = models[name].train()
        t = time.perf_counter()
        if name == "base":
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            model(inputs_embeds=emb, labels=ids).loss.backward()
        else:
            model(input_ids=ids, labels=ids, task_ids=tasks).loss.backward()
            optims[name].step()
            optims[name].zero_grad(set_to_none=True)
        return time.perf_counter() - t

    def infer(name: str) -> float:
        model = models[name].eval()
        kw = {} if name == "base" else {"task_ids": tasks}
        t = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, **kw)
        return time.perf_counter() - t

    return {"splits": splits, "max_diff": float(diff), "effect": float(effect), "trainable": counts["ours"],
            "train": timed(models, step, args), "infer": timed(models, infer, args)}  # fmt: skip


def report(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    import peft
    import transformers

    lines = [
        f"Command: `{command}`",
        "",
        f"LLaMA-style model (random init): hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"intermediate {args.intermediate}, vocab {args.vocab}; batch {args.batch} × {args.seq} tokens, every row its "
        f"own task id of {args.tasks}; Poly r={args.r}, {args.skills} skills on {args.targets}; float32, "
        f"{args.threads} thread(s), {args.warmup} warmup + {args.reps} timed reps, medians. torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}.",
        "",
        "| n_splits | trainable | max abs logit diff (vs base) | train step: ours / peft / base (ms) | ours ÷ peft | "
        "inference: ours / peft / base (ms) | ours ÷ peft |",
        "|---:|---:|---:|---|---:|---|---:|",
    ]
    for r in rows:
        tr, inf = r["train"], r["infer"]
        lines.append(
            f"| {r['splits']} | {r['trainable']:,} | {r['max_diff']:.1e} ({r['effect']:.1e}) | "
            f"{tr['ours'] * 1e3:.1f} / {tr['peft'] * 1e3:.1f} / {tr['base'] * 1e3:.1f} | {tr['ours'] / tr['peft']:.2f} | "
            f"{inf['ours'] * 1e3:.1f} / {inf['peft'] * 1e3:.1f} / {inf['base'] * 1e3:.1f} | "
            f"{inf['ours'] / inf['peft']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import sys

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="peft")
    base = build_base(args)
    rows = [bench(base, int(s), args) for s in args.splits.split(",")]
    text = report(
        rows, args, "python benchmarks/poly_vs_peft.py " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
