#!/usr/bin/env python
"""VB-LoRA training step: adapterkit vs peft (beside adapterkit's LoRA at the same rank and the frozen base), at the
shape of ``benchmarks/lora_vs_peft.py``.

A LLaMA-style model is built from ``transformers.LlamaConfig`` (random init, nothing downloaded) and copied with
identical weights for every variant; the adapters act on every linear layer of the decoder (``all-linear``):

* ``peft``: ``get_peft_model(model, VBLoRAConfig(r, num_vectors, vector_length, topk, target_modules="all-linear"))``;
* ``ours``: peft's adapter saved with ``save_pretrained`` and loaded with ``ak.attach(copy).load(dir)``, so both start
  from the same bank and logits (the first-step losses must agree), then ``adapters.train(name)``;
* ``lora``: ``ak.LoRA(r, alpha=2r)`` on the same sites (a low-rank adapter with stored factors: the floor VB-LoRA's
  shared-bank parameterization adds to);
* ``base``: every parameter frozen; ``inputs_embeds`` requires grad so backward runs through every layer; no
  optimizer (as ``lora_vs_peft.py``).

One training step = forward + causal-LM loss + backward + AdamW step over the trainable parameters +
``zero_grad(set_to_none=True)``. The variants alternate in ONE process (the order rotates every rep) after warmup;
medians over reps. VB-LoRA needs ``vector_length`` to divide the hidden and MLP sizes.

Quick smoke run::

    .venv/bin/python benchmarks/vblora_vs_peft.py --hidden 256 --layers 2 --heads 4 --intermediate 768 \\
        --vocab 1024 --seq 64 --batch 2 --reps 3
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
import warnings

VARIANTS = ("ours", "peft", "lora", "base")
TARGET = 0.95  # the bound on ours / peft


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default hidden/64, i.e. 16 at 1024)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default 2.75*hidden = 2816 at 1024)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default 8192)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--r", type=int, default=4, help="rank (default 4, peft's VBLoRAConfig default)")
    p.add_argument("--num-vectors", type=int, default=256, help="vectors in the bank (default 256)")
    p.add_argument("--vector-length", type=int, default=256, help="bank vector length (default 256)")
    p.add_argument("--topk", type=int, default=2, help="vectors mixed per sub-vector (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--reps", type=int, default=5, help="timed reps per variant (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warmup reps per variant (default 1)")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, print torch.profiler's top N ops (self CPU) of one train step of ours and peft",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the markdown report here")
    args = p.parse_args(argv)
    if args.heads is None:
        args.heads = max(1, args.hidden // 64)
    if args.intermediate is None:
        args.intermediate = int(round(args.hidden * 2.75 / 64)) * 64 or args.hidden * 2
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    for flag, size in (("--hidden", args.hidden), ("--intermediate", args.intermediate)):
        if size % args.vector_length:
            p.error(f"--vector-length {args.vector_length} does not divide {flag} {size}: pick sizes it divides")
    return args


def build_base(args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.seq),
        tie_word_embeddings=False,
        attention_dropout=0.0,
        use_cache=False,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import peft
    import torch
    import transformers
    from peft import VBLoRAConfig, get_peft_model

    import adapterkit as ak

    torch.set_num_threads(args.threads)
    base = build_base(args)
    ids = torch.randint(
        0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed + 1)
    )
    models, opts = {}, {}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(
            copy.deepcopy(base),
            VBLoRAConfig(
                r=args.r,
                num_vectors=args.num_vectors,
                vector_length=args.vector_length,
                topk=args.topk,
                target_modules="all-linear",
            ),  # fmt: skip
        )
    models["peft"] = pm
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        m = copy.deepcopy(base)
        adapters = ak.attach(m)
        adapters.load(tmp, name="bench")
    adapters.train("bench")
    models["ours"] = m
    lm = copy.deepcopy(base)
    lora = ak.attach(lm)
    lora.add("bench", ak.LoRA(r=args.r, alpha=2 * args.r, targets=list(adapters.sites("bench"))))
    lora.train("bench")
    models["lora"] = lm
    models["base"] = copy.deepcopy(base)
    for k, model in models.items():
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opts[k] = torch.optim.AdamW(params, lr=1e-4) if params else None
    sites = {
        "ours": len(adapters.sites("bench")),
        "peft": sum(n.endswith("vblora_logits_A.default") for n, _ in pm.named_parameters()),
    }
    n_params = {
        k: sum(p.numel() for p in models[k].parameters() if p.requires_grad) for k in ("ours", "peft", "lora")
    }

    def step(k: str) -> float:
        model, opt = models[k], opts[k]
        if opt is None:  # base: backward through every layer, nothing to update
            with torch.no_grad():
                emb = model.get_input_embeddings()(ids)
            emb.requires_grad_(True)
            loss = model(inputs_embeds=emb, labels=ids, use_cache=False).loss
            loss.backward()
            return float(loss.detach())
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = {k: step(k) for k in VARIANTS}
    for _ in range(args.warmup - 1):
        for k in VARIANTS:
            step(k)
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    order = list(VARIANTS)
    t_start = time.perf_counter()
    for rep in range(args.reps):
        for k in order[rep % len(order) :] + order[: rep % len(order)]:
            t0 = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t0)
        print(
            f"  rep {rep + 1}/{args.reps}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in VARIANTS), flush=True
        )
    elapsed = time.perf_counter() - t_start
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    try:
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
    except OSError:
        load = "unknown"

    cmd = " ".join(["benchmarks/vblora_vs_peft.py", *(argv if argv is not None else sys.argv[1:])])
    ratio = med["ours"] / med["peft"]
    lines = [
        "# VB-LoRA training step: adapterkit vs peft",
        "",
        f"Command: `.venv/bin/python {cmd}`",
        "",
        f"LLaMA hidden {args.hidden}, {args.layers} layers, {args.heads} heads, MLP {args.intermediate}, vocab "
        f"{args.vocab}, float32; batch {args.batch} x {args.seq} tokens; all-linear ({sites['ours']} sites ours / "
        f"{sites['peft']} peft); VB-LoRA r {args.r}, {args.num_vectors} vectors of length {args.vector_length}, "
        f"top-{args.topk} (trainable params {n_params['ours']:,} ours / {n_params['peft']:,} peft; LoRA r {args.r}: "
        f"{n_params['lora']:,}); AdamW; {args.threads} threads; median of {args.reps} reps after {args.warmup} "
        f"warmup, the variants alternating in one process (order rotated each rep); timed loop {elapsed:.0f} s; "
        f"load average at the end {load}.",
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}",
        "",
        "| variant | median step (s) | / peft | / base | fastest step (s) | / peft | every rep (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for k in VARIANTS:
        reps = ", ".join(f"{t:.2f}" for t in times[k])
        lines.append(
            f"| {k} | {med[k]:.3f} | {med[k] / med['peft']:.3f}x | {med[k] / med['base']:.3f}x | {low[k]:.3f} | "
            f"{low[k] / low['peft']:.3f}x | {reps} |"
        )
    lines += [
        "",
        f"ours / peft (median): {ratio:.3f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'not met'}); "
        f"fastest reps: {low['ours'] / low['peft']:.3f}.",
        f"First-step losses (same bank and logits in ours and peft): ours {first['ours']:.6f}, peft "
        f"{first['peft']:.6f}; LoRA (B = 0) {first['lora']:.6f}, base {first['base']:.6f}.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for k in ("ours", "peft"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(k)
            print(f"--- {k}: top {args.profile} ops by self CPU time ---")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
    return {"median_s": med, "times": times, "ratio": ratio, "first_loss": first}


if __name__ == "__main__":
    main()
