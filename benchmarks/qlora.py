#!/usr/bin/env python
"""LoRA training on fp32, bf16, int8 and NF4 bases: base-weight memory, peak step memory and step time,
adapterkit beside peft.

A LLaMA-style ``LlamaForCausalLM`` is built from ``LlamaConfig`` (random init, seeded, nothing downloaded;
default hidden 1024, 8 layers, 16 heads, intermediate 2816, vocab 8192). For each base it is built twice
with the same seed, once for each library, so both train on identical (quantized) weights:

==========  ===============================================================================================
base        weights
==========  ===============================================================================================
``fp32``    float32 everywhere
``bf16``    ``model.to(torch.bfloat16)``
``int8``    bf16, then ``ak.quantize(model, "int8", backend="bitsandbytes")`` (``Linear8bitLt``, lm_head dense)
``nf4``     bf16, then ``ak.quantize(model, "nf4", compute_dtype=torch.bfloat16)`` (``Linear4bit``, NF4 with
            double quantization, QLoRA §3; lm_head dense)
==========  ===============================================================================================

* ``ours``: ``ak.attach(m).add("bench", ak.LoRA(r, alpha, targets="all-linear"))``, then for quantized bases
  ``ak.prepare_for_kbit_training(m)`` (fp32 norms, gradient checkpointing), ``train("bench")``.
* ``peft``: for quantized bases ``prepare_model_for_kbit_training(m)`` (peft's recipe: every non-quantized
  parameter cast to fp32, gradient checkpointing), then ``get_peft_model(m, LoraConfig(..., target_modules=
  "all-linear"))``.
* Dense bases: gradient checkpointing (``use_reentrant=False``) on both, as the quantized recipes do
  (``--no-checkpointing`` turns it off everywhere).

Measured:

* base-weight memory: bytes of the base model's tensors as held in memory (quantized codes, block scales,
  double-quantization state, code books), for the linear layers that get quantized and for the whole
  model; the target is NF4 linear-layer weights ≤ 0.30 × bf16;
* training step (forward + causal-LM loss + backward + AdamW over the trainable parameters): ours and peft
  alternate in one process after warmup, medians over ``--reps``; target ours/peft ≤ 1.00;
* peak memory of a step: RSS high-water mark over one step (``/proc/self/clear_refs`` ← 5, ``VmHWM``) minus
  the RSS before it (after ``gc`` + ``malloc_trim``): activations, gradients, optimizer state, temporaries.

Results go to ``benchmarks/results/qlora.md`` (``--out``) from one command::

    .venv/bin/python benchmarks/qlora.py --small --out benchmarks/results/qlora.md   # ~1 min here
    .venv/bin/python benchmarks/qlora.py --out benchmarks/results/qlora.md           # hidden 1024, 8 layers
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from typing import Any

BASES = ("fp32", "bf16", "int8", "nf4")
LIBS = ("ours", "peft")
NF4_TARGET = 0.30  # NF4 / bf16 base-weight memory of the quantized layers (issue 6)
TIME_TARGET = 1.00  # ours / peft step time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--small",
        action="store_true",
        help="hidden 256, 2 layers, vocab 1024, batch 2x64, 5 reps (about a minute)",
    )
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=None, help="default hidden/64")
    p.add_argument("--intermediate", type=int, default=None, help="default 2.75*hidden rounded to 64")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bases", default=",".join(BASES), help=f"comma-separated subset of {','.join(BASES)}")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the markdown report here")
    args = p.parse_args(argv)
    if args.small:
        args.hidden, args.layers, args.vocab, args.seq, args.batch, args.reps = 256, 2, 1024, 64, 2, 5
    args.heads = args.heads or max(1, args.hidden // 64)
    args.intermediate = args.intermediate or int(round(args.hidden * 2.75 / 64)) * 64
    args.bases = [b for b in args.bases.split(",") if b]
    bad = [b for b in args.bases if b not in BASES]
    if bad:
        p.error(f"unknown bases {bad}; choose from {', '.join(BASES)}")
    return args


# --- models ---------------------------------------------------------------------------------------------------
def build(base: str, args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import adapterkit as ak

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 64),
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    if base != "fp32":
        model = model.to(torch.bfloat16)
    if base == "int8":
        ak.quantize(model, "int8", backend="bitsandbytes")
    elif base == "nf4":
        ak.quantize(model, "nf4", backend="bitsandbytes", compute_dtype=torch.bfloat16)
    return model


def wrap(lib: str, base: str, args: argparse.Namespace):
    """(model, optimizer, number of LoRA sites) for one library on one base."""
    import torch

    model = build(base, args)
    quantized = base in ("int8", "nf4")
    if lib == "ours":
        import adapterkit as ak

        adapters = ak.attach(model)
        adapters.add("bench", ak.LoRA(r=args.r, alpha=args.alpha, targets="all-linear"))
        if quantized:
            ak.prepare_for_kbit_training(model, gradient_checkpointing=args.checkpointing)
        elif args.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        adapters.train("bench")
        sites = len(adapters.sites("bench"))
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        kw = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        if quantized:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.checkpointing, **kw)
        elif args.checkpointing:
            model.gradient_checkpointing_enable(**kw)
        cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear")
        model = get_peft_model(model, cfg)
        sites = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.default"))
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4), sites


def train_step(model, opt, ids) -> float:
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# --- memory -------------------------------------------------------------------------------------------------
def tensor_bytes(module) -> int:
    """Bytes a module's own tensors hold in memory, quantization state included (no double counting)."""
    import torch

    seen: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor):
            if hasattr(t, "__tensor_flatten__") and type(t) is not torch.nn.Parameter:  # torchao subclasses
                names, _ = t.__tensor_flatten__()
                for n in names:
                    add(getattr(t, n))
                return
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    def add_state(state) -> None:  # bitsandbytes QuantState (absmax, code, nested state2, offset)
        if state is None:
            return
        for name in ("absmax", "code", "offset"):
            add(getattr(state, name, None))
        add_state(getattr(state, "state2", None))

    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        add(t)
        add_state(getattr(t, "quant_state", None))
        add(getattr(t, "SCB", None))
    state = getattr(module, "state", None)  # Linear8bitLt keeps CB/SCB here after the first forward
    add(getattr(state, "SCB", None))
    return sum(seen.values())


def weight_memory(model) -> dict[str, int]:
    """Base-model bytes: the decoder's linear layers (the ones ``quantize`` converts) and the whole model."""
    from adapterkit.targeting import CONTAINER

    linear = total = 0
    for name, module in model.named_modules():
        if CONTAINER in name.split("."):
            continue
        n = tensor_bytes(module)
        total += n
        if name.endswith(("_proj",)):
            linear += n
    return {"linear": linear, "total": total}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def step_peak_bytes(model, opt, ids) -> int | None:
    """RSS high-water mark over one training step minus the RSS before it."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")
    if before is None or not _reset_peak():
        train_step(model, opt, ids)
        return None
    train_step(model, opt, ids)
    return (_status_kib("VmHWM") - before) * 1024


# --- run ------------------------------------------------------------------------------------------------------
def run_base(base: str, args: argparse.Namespace, ids) -> dict[str, Any]:
    res: dict[str, Any] = {"times": {lib: [] for lib in LIBS}}
    models, opts = {}, {}
    for lib in LIBS:
        if lib == "ours":
            res["weights"] = weight_memory(build(base, args))
        models[lib], opts[lib], sites = wrap(lib, base, args)
        res.setdefault("sites", {})[lib] = sites
        res.setdefault("loss", {})[lib] = train_step(models[lib], opts[lib], ids)  # warmup (lazy init, Adam state)
        res.setdefault("peak", {})[lib] = step_peak_bytes(models[lib], opts[lib], ids)
        for _ in range(args.warmup - 1):
            train_step(models[lib], opts[lib], ids)
    for rep in range(args.reps):
        order = LIBS if rep % 2 == 0 else LIBS[::-1]
        for lib in order:
            gc.collect()
            t0 = time.perf_counter()
            train_step(models[lib], opts[lib], ids)
            res["times"][lib].append(time.perf_counter() - t0)
    med = {lib: statistics.median(res["times"][lib]) for lib in LIBS}
    print(
        f"  {base}: ours {med['ours'] * 1000:.1f} ms, peft {med['peft'] * 1000:.1f} ms "
        f"(ours/peft {med['ours'] / med['peft']:.3f}); linear weights {res['weights']['linear'] / 2**20:.1f} MiB",
        flush=True,
    )
    return res


def render(args, results, cmd: str, elapsed: float) -> str:
    import bitsandbytes
    import peft
    import torch
    import transformers

    mib = lambda v: "n/a" if v is None else f"{v / 2**20:.1f} MiB"  # noqa: E731
    ref = results.get("bf16", {}).get("weights")
    lines = [
        "# QLoRA: LoRA training on fp32, bf16, int8 and NF4 bases, adapterkit beside peft",
        "",
        f"Command: `{cmd}`",
        "",
        f"Model: LlamaForCausalLM from config, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"intermediate {args.intermediate}, vocab {args.vocab}, random init. Batch {args.batch} × {args.seq} "
        f"tokens. LoRA r={args.r}, alpha={args.alpha:g}, dropout 0, all-linear; gradient checkpointing "
        f"{'on' if args.checkpointing else 'off'}. int8/NF4 via bitsandbytes {bitsandbytes.__version__} "
        "(NF4: double quantization, compute dtype bf16; int8: LLM.int8 rows); non-quantized parts bf16.",
        "",
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"threads: {args.threads}, {platform.machine()}, CPU capability {torch.backends.cpu.get_cpu_capability()}. "
        f"Step times: medians of {args.reps} reps after {args.warmup} warmup step(s), ours/peft alternating in "
        f"one process. Total wall time {elapsed / 60:.1f} min; load average at the end {os.getloadavg()[0]:.2f} "
        "(other processes on the machine inflate absolute times; alternation keeps the ratios fair).",
        "",
        "| base | linear-layer weights | × bf16 | whole model | × bf16 | step ours | step peft | ours/peft "
        "| step peak ours | step peak peft | targets |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for base, res in results.items():
        w = res["weights"]
        lin_ratio = w["linear"] / ref["linear"] if ref else float("nan")
        tot_ratio = w["total"] / ref["total"] if ref else float("nan")
        med = {lib: statistics.median(res["times"][lib]) for lib in LIBS}
        ratio = med["ours"] / med["peft"]
        targets = [f"ours/peft ≤ {TIME_TARGET:.2f}: {'✅' if ratio <= TIME_TARGET else '❌'}"]
        if base == "nf4" and ref:
            ok = lin_ratio <= NF4_TARGET
            targets.insert(0, f"NF4 weights ≤ {NF4_TARGET:.2f}× bf16: {'✅' if ok else '❌'} ({lin_ratio:.3f})")
        lines.append(
            f"| {base} | {mib(w['linear'])} | {lin_ratio:.3f} | {mib(w['total'])} | {tot_ratio:.3f} | "
            f"{med['ours'] * 1000:.1f} ms | {med['peft'] * 1000:.1f} ms | {ratio:.3f} | "
            f"{mib(res['peak']['ours'])} | {mib(res['peak']['peft'])} | {'<br>'.join(targets)} |"
        )
    lines += ["", "Per-rep step times (ms):", ""]
    for base, res in results.items():
        for lib in LIBS:
            lines.append(f"- {base} {lib}: " + ", ".join(f"{t * 1000:.1f}" for t in res["times"][lib]))
    lines += [
        "",
        "LoRA sites ours / peft: "
        + ", ".join(f"{b} {r['sites']['ours']}/{r['sites']['peft']}" for b, r in results.items())
        + ". First-step losses ours / peft (B = 0 at init; on int8/NF4 peft runs its non-quantized parts in "
        "fp32, ours in bf16): "
        + ", ".join(f"{b} {r['loss']['ours']:.4f}/{r['loss']['peft']:.4f}" for b, r in results.items())
        + ".",
        "",
        "Weights: bytes of the base model's tensors as held in memory (quantized codes, block scales, "
        "double-quantization state and code books included), for the decoder's `*_proj` linear layers (the "
        "ones quantized) and for the whole model (embeddings, norms and lm_head stay bf16/fp32). Step peak: "
        "RSS high-water mark over one training step minus the RSS before it (activations, gradients, "
        "optimizer state, temporaries such as dequantized weights); peft's k-bit recipe casts the "
        "non-quantized parameters and hence the activations to fp32, ours keeps bf16 activations with fp32 "
        "norms.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cmd = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv])
    t_start = time.perf_counter()
    warnings.filterwarnings("ignore")

    import torch

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=g)
    print(
        f"config: hidden={args.hidden} layers={args.layers} heads={args.heads} intermediate={args.intermediate} "
        f"vocab={args.vocab} batch={args.batch}x{args.seq} r={args.r} threads={args.threads}",
        flush=True,
    )
    results = {}
    for base in args.bases:
        results[base] = run_base(base, args, ids)
        gc.collect()
    report = render(args, results, cmd, time.perf_counter() - t_start)
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
