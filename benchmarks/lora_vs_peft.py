#!/usr/bin/env python
"""LoRA training/inference speed and memory: adapterkit vs peft vs the frozen base model.

A LLaMA-style model is built from ``transformers.LlamaConfig`` (random init, nothing downloaded) and
copied three times with identical weights:

* ``ours``: ``ak.attach(model).add("bench", ak.LoRA(r, alpha, targets="all-linear"))``, ``train("bench")``
* ``peft``: ``get_peft_model(model, LoraConfig(r, lora_alpha, lora_dropout=0, target_modules="all-linear"))``
* ``base``: every parameter frozen; ``inputs_embeds`` requires grad so backward runs through every
  layer (the floor any LoRA implementation pays); no optimizer.

Measured (see benchmarks/README.md for the details of each method):

* training step: forward + causal-LM loss + backward + AdamW step over the trainable parameters,
  ``zero_grad(set_to_none=True)``; ours / peft / base steps alternate in ONE process (the order
  rotates every rep) after warmup; medians over reps;
* unmerged inference: ``model.eval()`` forward under ``torch.inference_mode()``, alternating likewise;
* peak memory of a training step: each variant in a fresh ``spawn`` subprocess: build, one warmup
  step, ``gc`` + ``malloc_trim(0)``, reset the kernel's peak-RSS counter (``/proc/self/clear_refs``
  ← 5), run ``--mem-steps`` steps, report ``VmHWM - VmRSS(before)``; (falls back to
  ``ru_maxrss`` minus the post-build RSS when ``clear_refs`` is not writable);
* saved activations: bytes of distinct non-parameter storages the autograd graph saves for
  backward in one step (``torch.autograd.graph.saved_tensors_hooks``), a deterministic
  complement to RSS.

Quick smoke run::

    .venv/bin/python benchmarks/lora_vs_peft.py --hidden 256 --layers 2 --heads 4 --intermediate 704 \
        --vocab 1024 --seq 64 --batch 2 --reps 2 --out /tmp/smoke.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import multiprocessing as mp
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from typing import Any

VARIANTS = ("ours", "peft", "base")

# target ratios (upper bounds) printed next to the figures
TARGETS = {
    "train": {"ours/peft": 0.95, "ours/base": 1.10},
    "memory": {"ours/peft": 1.00},
    "infer": {"ours/peft": 0.95},
}


# --- arguments ------------------------------------------------------------------------------
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
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--reps", type=int, default=5, help="timed reps per variant (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warmup reps per variant (default 1)")
    p.add_argument("--infer-reps", type=int, default=None, help="timed inference reps (default: --reps)")
    p.add_argument("--mem-steps", type=int, default=2, help="training steps in the memory measurement (default 2)")
    p.add_argument("--skip-memory", action="store_true", help="skip the subprocess memory measurement")
    p.add_argument("--skip-infer", action="store_true", help="skip the inference timing")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, print torch.profiler's top N ops (self CPU) of one train step per variant",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the markdown report here")
    args = p.parse_args(argv)
    if args.heads is None:
        args.heads = max(1, args.hidden // 64)
    if args.intermediate is None:
        args.intermediate = int(round(args.hidden * 2.75 / 64)) * 64 or args.hidden * 2
    if args.infer_reps is None:
        args.infer_reps = args.reps
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    return args


# --- model and variants ---------------------------------------------------------------------
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
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def wrap(variant: str, base, args: argparse.Namespace):
    """A copy of ``base`` with the variant applied; returns (model, optimizer or None)."""
    import torch

    model = copy.deepcopy(base)
    if variant == "ours":
        import adapterkit as ak

        adapters = ak.attach(model)
        adapters.add("bench", ak.LoRA(r=args.r, alpha=args.alpha, dropout=0.0, targets="all-linear"))
        adapters.train("bench")
    elif variant == "peft":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear")
        model = get_peft_model(model, cfg)
    elif variant == "base":
        for p in model.parameters():
            p.requires_grad_(False)
    else:
        raise ValueError(variant)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    return model, opt


def make_batch(args: argparse.Namespace):
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)


def embedding_of(model):
    return model.get_input_embeddings()


def train_step(variant: str, model, opt, ids) -> float:
    """One training step; returns the loss."""
    import torch

    if variant == "base":
        with torch.no_grad():
            emb = embedding_of(model)(ids)
        emb.requires_grad_(True)
        loss = model(inputs_embeds=emb, labels=ids, use_cache=False).loss
        loss.backward()
    else:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def infer(model, ids) -> None:
    import torch

    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)


def lora_sites(variant: str, model) -> int:
    if variant == "ours":
        import adapterkit as ak

        return len(ak.attach(model).sites("bench"))
    if variant == "peft":
        return sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.default"))
    return 0


# --- memory (fresh subprocess per variant) --------------------------------------------------
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def saved_activation_bytes(variant: str, model, ids) -> int:
    """Bytes of distinct non-parameter storages saved for backward during one forward."""
    import torch

    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in param_ptrs and ptr != 0:
                seen[ptr] = max(seen.get(ptr, 0), s.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if variant == "base":
            with torch.no_grad():
                emb = embedding_of(model)(ids)
            emb.requires_grad_(True)
            loss = model(inputs_embeds=emb, labels=ids, use_cache=False).loss
        else:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    del loss
    return sum(seen.values())


def memory_worker(variant: str, args: argparse.Namespace, queue) -> None:
    try:
        import torch

        torch.set_num_threads(args.threads)
        base = build_base(args)
        model, opt = wrap(variant, base, args)
        del base
        ids = make_batch(args)
        train_step(variant, model, opt, ids)  # warmup: lazy init, optimizer state
        gc.collect()
        _malloc_trim()
        rss0 = _proc_status_kib("VmRSS")
        maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "VmHWM after clear_refs" if _reset_peak_rss() else "ru_maxrss"
        for _ in range(args.mem_steps):
            train_step(variant, model, opt, ids)
        if method == "ru_maxrss":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if peak <= maxrss0:
                method += " (no new peak: lower bound)"
        else:
            peak = _proc_status_kib("VmHWM")
        gc.collect()
        saved = saved_activation_bytes(variant, model, ids)
        queue.put(
            {
                "variant": variant,
                "rss0_kib": rss0,
                "peak_kib": peak,
                "increase_kib": peak - rss0,
                "saved_bytes": saved,
                "method": method,
            }
        )
    except BaseException as e:  # report, don't hang the parent
        queue.put({"variant": variant, "error": f"{type(e).__name__}: {e}"})


def measure_memory(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    ctx = mp.get_context("spawn")
    out: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        q = ctx.Queue()
        proc = ctx.Process(target=memory_worker, args=(variant, args, q))
        proc.start()
        res = q.get()
        proc.join()
        if "error" in res:
            raise RuntimeError(f"memory measurement of {variant!r} failed: {res['error']}")
        out[variant] = res
        print(
            f"  memory {variant}: +{res['increase_kib'] / 1024:.1f} MiB peak over {res['rss0_kib'] / 1024:.0f} MiB "
            f"live; saved activations {res['saved_bytes'] / 2**20:.1f} MiB",
            flush=True,
        )
    return out


# --- report ---------------------------------------------------------------------------------
def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _target_cell(kind: str, ratios: dict[str, float]) -> str:
    cells = []
    for key, bound in TARGETS.get(kind, {}).items():
        ok = ratios[key] <= bound
        cells.append(f"{key} ≤ {bound:.2f}: {'✅' if ok else '❌'} ({ratios[key]:.3f})")
    return "<br>".join(cells) if cells else "—"


def render(args, timings, memory, sites, params, losses, cmd, elapsed) -> str:
    import peft
    import torch
    import transformers

    lines = [
        "# LoRA: adapterkit vs peft vs frozen base",
        "",
        f"Command: `{cmd}`",
        "",
        f"Model: LlamaForCausalLM from config, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"intermediate {args.intermediate}, vocab {args.vocab}, random init, float32. "
        f"Batch {args.batch} × {args.seq} tokens. LoRA r={args.r}, alpha={args.alpha:g}, dropout 0, "
        f"all-linear ({sites['ours']} sites ours / {sites['peft']} peft; trainable params "
        f"{params['ours']:,} ours / {params['peft']:,} peft).",
        "",
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"{args.threads} threads (`torch.set_num_threads`), {platform.processor() or platform.machine()}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}. "
        f"Timings: medians of {args.reps} timed reps (train) / {args.infer_reps} (inference) after "
        f"{args.warmup} warmup rep(s); ours/peft/base alternate in one process, order rotated each rep. "
        f"Total wall time {elapsed / 60:.1f} min; load average at the end {os.getloadavg()[0]:.2f} "
        "(other processes on the machine inflate absolute times; the alternation keeps the ratios fair).",
        "",
        "| metric | ours | peft | base | ours/peft | ours/base | peft/base | targets |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]

    def row(label, kind, vals, fmt):
        r = {
            "ours/peft": _ratio(vals["ours"], vals["peft"]),
            "ours/base": _ratio(vals["ours"], vals["base"]),
            "peft/base": _ratio(vals["peft"], vals["base"]),
        }
        lines.append(
            f"| {label} | {fmt(vals['ours'])} | {fmt(vals['peft'])} | {fmt(vals['base'])} | "
            f"{r['ours/peft']:.3f} | {r['ours/base']:.3f} | {r['peft/base']:.3f} | {_target_cell(kind, r)} |"
        )

    ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    mib = lambda v: f"{v / 2**20:.1f} MiB"  # noqa: E731
    med = {k: {v: statistics.median(ts) for v, ts in d.items()} for k, d in timings.items()}
    row("train step (fwd+bwd+AdamW), median", "train", med["train"], ms)
    if memory:
        row(
            "peak RSS increase of a train step",
            "memory",
            {v: memory[v]["increase_kib"] * 1024 for v in VARIANTS},
            mib,
        )
        row("saved activations for backward", "", {v: memory[v]["saved_bytes"] for v in VARIANTS}, mib)
    if "infer" in med:
        row("inference forward (unmerged), median", "infer", med["infer"], ms)
    lines += ["", "Per-rep timings (ms):", ""]
    for kind, d in timings.items():
        for v in VARIANTS:
            lines.append(f"- {kind} {v}: " + ", ".join(f"{t * 1000:.1f}" for t in d[v]))
    lines += [
        "",
        "First-step losses (B = 0 at init, so all three should agree): "
        + ", ".join(f"{v} {losses[v]:.6f}" for v in VARIANTS),
    ]
    if memory:
        m = next(iter(memory.values()))
        lines += [
            "",
            f"Memory: fresh `spawn` subprocess per variant; peak = {m['method']} over {args.mem_steps} "
            "train step(s) after one warmup step, minus VmRSS after warmup + gc + malloc_trim(0). "
            "Live RSS before the measured steps: "
            + ", ".join(f"{v} {memory[v]['rss0_kib'] / 1024:.0f} MiB" for v in VARIANTS)
            + ".",
        ]
    return "\n".join(lines) + "\n"


def profile_steps(args: argparse.Namespace, models, opts, ids) -> None:
    """torch.profiler table of one training step per variant (run after the timing, untimed)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for m in models.values():
        m.train()
    for v in VARIANTS:
        train_step(v, models[v], opts[v], ids)  # warm
        with (
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
            record_function(f"train_step_{v}"),
        ):
            train_step(v, models[v], opts[v], ids)
        print(f"\n## profile: {v} train step (self CPU, top {args.profile})\n", flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile), flush=True)


# --- main -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cmd = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv])
    t_start = time.perf_counter()

    import torch

    torch.set_num_threads(args.threads)
    print(
        f"config: hidden={args.hidden} layers={args.layers} heads={args.heads} intermediate={args.intermediate} "
        f"vocab={args.vocab} batch={args.batch}x{args.seq} r={args.r} threads={args.threads}",
        flush=True,
    )

    memory = None
    if not args.skip_memory:
        print("memory (fresh subprocess per variant) ...", flush=True)
        memory = measure_memory(args)

    base = build_base(args)
    models, opts = {}, {}
    for v in VARIANTS:
        models[v], opts[v] = wrap(v, base, args)
    del base
    gc.collect()
    ids = make_batch(args)
    sites = {v: lora_sites(v, models[v]) for v in VARIANTS}
    params = {v: sum(p.numel() for p in models[v].parameters() if p.requires_grad) for v in VARIANTS}
    if sites["ours"] != sites["peft"] or params["ours"] != params["peft"]:
        print(f"WARNING: ours and peft adapt different sites/params: {sites} {params}", file=sys.stderr)

    timings: dict[str, dict[str, list[float]]] = {"train": {v: [] for v in VARIANTS}}
    losses: dict[str, float] = {}
    print(f"training steps: {args.warmup} warmup + {args.reps} timed reps, alternating", flush=True)
    for rep in range(args.warmup + args.reps):
        k = rep % len(VARIANTS)
        for v in VARIANTS[k:] + VARIANTS[:k]:
            gc.collect()
            t0 = time.perf_counter()
            loss = train_step(v, models[v], opts[v], ids)
            dt = time.perf_counter() - t0
            losses.setdefault(v, loss)
            if rep >= args.warmup:
                timings["train"][v].append(dt)
            print(f"  rep {rep}{' (warmup)' if rep < args.warmup else ''} {v}: {dt * 1000:.1f} ms", flush=True)

    if not args.skip_infer:
        timings["infer"] = {v: [] for v in VARIANTS}
        for m in models.values():
            m.eval()
        print(f"inference: {args.warmup} warmup + {args.infer_reps} timed reps, alternating", flush=True)
        for rep in range(args.warmup + args.infer_reps):
            k = rep % len(VARIANTS)
            for v in VARIANTS[k:] + VARIANTS[:k]:
                gc.collect()
                t0 = time.perf_counter()
                infer(models[v], ids)
                dt = time.perf_counter() - t0
                if rep >= args.warmup:
                    timings["infer"][v].append(dt)
                print(f"  rep {rep}{' (warmup)' if rep < args.warmup else ''} {v}: {dt * 1000:.1f} ms", flush=True)

    if args.profile:
        profile_steps(args, models, opts, ids)

    report = render(args, timings, memory, sites, params, losses, cmd, time.perf_counter() - t_start)
    print()
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
