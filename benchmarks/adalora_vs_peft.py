#!/usr/bin/env python
"""AdaLoRA training step: adapterkit vs peft (beside adapterkit's LoRA at the same rank), at the shape of
``benchmarks/lora_vs_peft.py``.

A LLaMA-style model is built from ``transformers.LlamaConfig`` (random init, nothing downloaded) and copied with
identical weights for every variant; each adapts every linear layer of the decoder (``all-linear``).

One training step = forward + causal-LM loss (+ the orthogonality regularizer) + backward + AdamW step + the
rank allocation + ``zero_grad(set_to_none=True)``:

* ``ours``: ``ak.AdaLoRA(init_r, target_r, total_step)``; ``loss = out.loss + adapters.aux_loss()``;
  ``adapters.step()`` after ``optimizer.step()``;
* ``peft``: ``get_peft_model(model, AdaLoraConfig(..., task_type="CAUSAL_LM"))`` (the task wrapper is what adds
  peft's regularizer to ``out.loss``); ``model.base_model.update_and_allocate(step)`` after ``optimizer.step()``;
* ``lora``: ``ak.LoRA(r=init_r)`` (no allocation, no regularizer), the floor of a low-rank adapter here.

``tinit=0, deltaT=1`` and a long ``total_step``: every timed step scores every weight and reallocates the budget
(the most expensive phase). The variants alternate in ONE process (the order rotates every rep) after warmup;
medians over reps. The allocation (``adapters.step()`` / ``update_and_allocate``) is also timed on its own, and the
report states the load average before and after the run (figures taken at a load above 2 are marked as not valid:
other jobs on the cores dominate them).

Quick smoke run::

    .venv/bin/python benchmarks/adalora_vs_peft.py --hidden 128 --layers 2 --heads 4 --intermediate 352 \\
        --vocab 512 --seq 32 --batch 2 --reps 2
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import warnings

VARIANTS = ("ours", "peft", "lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=None, help="default hidden/64")
    p.add_argument("--intermediate", type=int, default=None, help="default 2.75*hidden")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--init-r", type=int, default=12)
    p.add_argument("--target-r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the markdown report here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import adapterkit as ak

    torch.set_num_threads(args.threads)
    heads = args.heads or max(1, args.hidden // 64)
    inter = args.intermediate or int(2.75 * args.hidden)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=inter,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max(args.seq, 64))  # fmt: skip
    torch.manual_seed(args.seed)
    base = LlamaForCausalLM(cfg).eval()
    total = 10_000
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}

    runs = {}
    # ours
    m = copy.deepcopy(base).train()
    a = ak.attach(m)
    a.add("ada", ak.AdaLoRA(init_r=args.init_r, target_r=args.target_r, alpha=args.alpha, total_step=total,
                            targets="all-linear"))  # fmt: skip
    a.train("ada")
    opt = torch.optim.AdamW(list(a.parameters("ada")), lr=1e-4)

    alloc: dict[str, list[float]] = {"ours": [], "peft": [], "lora": []}

    def step_ours(m=m, a=a, opt=opt):
        (m(**batch).loss + a.aux_loss()).backward()
        opt.step()
        t0 = time.perf_counter()
        a.step()
        alloc["ours"].append(time.perf_counter() - t0)
        opt.zero_grad(set_to_none=True)

    runs["ours"] = step_ours
    # peft
    from peft import AdaLoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(
            copy.deepcopy(base),
            AdaLoraConfig(
                init_r=args.init_r,
                target_r=args.target_r,
                lora_alpha=args.alpha,
                total_step=total,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),  # fmt: skip
        ).train()
    popt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    pstep = [0]

    def step_peft(pm=pm, popt=popt):
        pm(**batch).loss.backward()
        popt.step()
        t0 = time.perf_counter()
        pm.base_model.update_and_allocate(pstep[0])
        alloc["peft"].append(time.perf_counter() - t0)
        pstep[0] += 1
        popt.zero_grad(set_to_none=True)

    runs["peft"] = step_peft
    # LoRA at init_r
    lm = copy.deepcopy(base).train()
    la = ak.attach(lm)
    la.add("lora", ak.LoRA(r=args.init_r, alpha=args.alpha, targets="all-linear"))
    la.train("lora")
    lopt = torch.optim.AdamW(list(la.parameters("lora")), lr=1e-4)

    def step_lora(lm=lm, lopt=lopt):
        lm(**batch).loss.backward()
        lopt.step()
        lopt.zero_grad(set_to_none=True)

    runs["lora"] = step_lora

    load_before = os.getloadavg()[0]
    for fn in runs.values():
        for _ in range(args.warmup):
            fn()
    for v in alloc.values():
        v.clear()
    times: dict[str, list[float]] = {k: [] for k in runs}
    order = list(VARIANTS)
    for rep in range(args.reps):
        for k in order[rep % len(order) :] + order[: rep % len(order)]:
            t0 = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    load = (load_before, os.getloadavg()[0])
    loaded = max(load) > 2
    import peft
    import transformers

    lines = [
        "# AdaLoRA training step: adapterkit vs peft" + (" (NOT VALID: measured under load)" if loaded else ""),
        "",
        f"`{' '.join(['benchmarks/adalora_vs_peft.py', *(argv if argv is not None else sys.argv[1:])])}`",
        "",
        f"LLaMA hidden {args.hidden}, {args.layers} layers, {heads} heads, MLP {inter}, vocab {args.vocab}; batch "
        f"{args.batch} x {args.seq} tokens; all-linear; init_r {args.init_r} -> target_r {args.target_r}; "
        f"{args.threads} threads; median of {args.reps} reps after {args.warmup} warmup.",
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; 1-minute load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after"
        + (" (above 2: other jobs share the cores)" if loaded else ""),
        "",
        "| variant | median step (s) | / peft | fastest step (s) | / peft | allocation, median (ms) | every rep (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    low = {k: min(v) for k, v in times.items()}
    for k in VARIANTS:
        reps = ", ".join(f"{t:.2f}" for t in times[k])
        ms = f"{statistics.median(alloc[k]) * 1e3:.1f}" if alloc[k] else "-"
        lines.append(
            f"| {k} | {med[k]:.3f} | {med[k] / med['peft']:.2f}x | {low[k]:.3f} | {low[k] / low['peft']:.2f}x | {ms} "
            f"| {reps} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return {"median_s": med, "times": times, "allocation_s": alloc, "load": load}


if __name__ == "__main__":
    main()
