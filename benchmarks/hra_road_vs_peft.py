#!/usr/bin/env python
"""HRA and RoAd: training step against peft (beside adapterkit's LoRA r=16), and a mixed batch of 32 RoAd adapters
routed per row against the base forward.

A LLaMA-style model is built from ``transformers.LlamaConfig`` (random init, nothing downloaded) and copied with
identical weights for every variant; each adapts every linear layer of the decoder (``all-linear``).

1. Training step (forward + causal-LM loss + backward + AdamW step, ``zero_grad(set_to_none=True)``), as
   ``benchmarks/lora_vs_peft.py``: the variants alternate in ONE process (the order rotates every rep) after warmup;
   medians over reps.

   * ``lora16``: ``ak.LoRA(r=16, alpha=32)``;
   * ``hra`` / ``peft-hra``: ``ak.HRA(r)`` / ``HRAConfig(r)`` (peft builds the ``(in, in)`` product of reflections
     and ``W H`` in every forward; adapterkit applies the reflections to the activations in compact WY form);
   * ``ether`` / ``ether+``: ``ak.HRA(variant="ether"|"ether_plus", n_blocks)`` (peft has no ETHER);
   * ``road`` / ``peft-road``: ``ak.RoAd(group_size)`` / ``RoadConfig(group_size)`` (road_1).

2. Mixed batch: ``--adapters`` RoAd adapters (road_4, random non-identity weights) on the same model, a batch of
   ``--route-batch`` rows naming them round-robin. ``base``: a copy with no adapters; ``ours``: ``with
   adapters.route(names): model(ids)``; ``peft``: ``peft_model(ids, adapter_names=names)`` (peft 0.21's mixed-batch
   inference, one sub-batch per adapter) with the same weights (exported by adapterkit; outputs checked to agree).
   Decode (1 token per row, ``--decode-steps`` forwards per ``route()`` entry, as a serving loop) and prefill
   (``--prefill-len`` tokens per row, one forward per ``route()``); ``torch.inference_mode``; medians.

Quick smoke run::

    .venv/bin/python benchmarks/hra_road_vs_peft.py --hidden 128 --layers 2 --heads 4 --intermediate 352 \\
        --vocab 512 --seq 32 --batch 2 --reps 2 --adapters 4 --route-batch 8 --prefill-len 16
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

TRAIN = ("lora16", "hra", "peft-hra", "ether", "ether+", "road", "peft-road")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408, help="a multiple of --group-size")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--r", type=int, default=8, help="HRA reflections")
    p.add_argument("--n-blocks", type=int, default=32, help="ETHER/ETHER+ diagonal blocks")
    p.add_argument("--group-size", type=int, default=64, help="RoAd group_size")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--adapters", type=int, default=32, help="RoAd adapters in the mixed batch")
    p.add_argument("--route-batch", type=int, default=32)
    p.add_argument("--prefill-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-route", action="store_true")
    p.add_argument("--out", default=None, help="also write the markdown tables here")
    return p.parse_args(argv)


def base_model(args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, args.prefill_len + args.decode_steps, 64),
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


# --- 1. training step -----------------------------------------------------------------------------------------
def build(variant: str, base, args: argparse.Namespace):
    import torch

    import adapterkit as ak

    model = copy.deepcopy(base)
    if variant.startswith("peft-"):
        from peft import HRAConfig, RoadConfig, get_peft_model

        cfg = (
            HRAConfig(r=args.r, target_modules="all-linear")
            if variant == "peft-hra"
            else RoadConfig(group_size=args.group_size, target_modules="all-linear")
        )
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        cfg = {
            "lora16": ak.LoRA(r=16, alpha=32, targets="all-linear"),
            "hra": ak.HRA(r=args.r, targets="all-linear"),
            "ether": ak.HRA(variant="ether", n_blocks=args.n_blocks, targets="all-linear"),
            "ether+": ak.HRA(variant="ether_plus", n_blocks=args.n_blocks, targets="all-linear"),
            "road": ak.RoAd(group_size=args.group_size, targets="all-linear"),
        }[variant]
        adapters = ak.attach(model)
        adapters.add("bench", cfg)
        adapters.train("bench")
        params = list(adapters.parameters("bench"))
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    return model, opt, sum(p.numel() for p in params)


def step(model, opt, ids) -> None:
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def train_table(args: argparse.Namespace, base) -> str:
    import torch

    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    built = {v: build(v, base, args) for v in TRAIN}
    for _ in range(args.warmup):
        for v in TRAIN:
            step(*built[v][:2], ids)
    times: dict[str, list[float]] = {v: [] for v in TRAIN}
    for rep in range(args.reps):
        order = TRAIN[rep % len(TRAIN) :] + TRAIN[: rep % len(TRAIN)]
        for v in order:
            t = time.perf_counter()
            step(*built[v][:2], ids)
            times[v].append(time.perf_counter() - t)
    med = {v: statistics.median(ts) * 1000 for v, ts in times.items()}
    lines = [
        f"Training step: LLaMA-style h={args.hidden} layers={args.layers} ffn={args.intermediate} seq={args.seq} "
        f"batch={args.batch}, all-linear; HRA r={args.r}, ETHER n_blocks={args.n_blocks}, RoAd road_1 "
        f"group_size={args.group_size}; medians of {args.reps}",
        "",
        "| variant | trainable | step (ms) | vs peft | vs LoRA r=16 |",
        "|---|---:|---:|---:|---:|",
    ]
    for v in TRAIN:
        peer = f"peft-{v}" if f"peft-{v}" in med else None
        vs_peft = f"{med[v] / med[peer]:.2f}×" if peer else ""
        lines.append(f"| {v} | {built[v][2]:,} | {med[v]:.1f} | {vs_peft} | {med[v] / med['lora16']:.2f}× |")
    return "\n".join(lines)


# --- 2. mixed batch of RoAd adapters ----------------------------------------------------------------------------
def route_table(args: argparse.Namespace, base) -> str:
    import torch
    from peft import PeftModel

    import adapterkit as ak

    names = [f"road{i}" for i in range(args.adapters)]
    ours = copy.deepcopy(base)
    adapters = ak.attach(ours)
    for i, n in enumerate(names):
        torch.manual_seed(i)
        adapters.add(
            n, ak.RoAd(variant="road_4", group_size=args.group_size, targets="all-linear", init_weights=False)
        )
    theirs = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            adapters.export(n, f"{tmp}/{n}", format="peft")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/{names[0]}", adapter_name=names[0])
        for n in names[1:]:
            theirs.load_adapter(f"{tmp}/{n}", adapter_name=n)
    theirs.eval()
    plain = copy.deepcopy(base)
    rows = [names[i % len(names)] for i in range(args.route_batch)]

    def decode_ids():
        return torch.randint(0, args.vocab, (args.route_batch, 1))

    def run_base(ids, steps):
        for _ in range(steps):
            plain(input_ids=ids, use_cache=False)

    def run_ours(ids, steps):
        with adapters.route(rows):
            for _ in range(steps):
                ours(input_ids=ids, use_cache=False)

    def run_peft(ids, steps):
        for _ in range(steps):
            theirs(input_ids=ids, adapter_names=rows, use_cache=False)

    lines = [
        f"Mixed batch: {args.adapters} RoAd adapters (road_4, group_size={args.group_size}, all-linear) on the same "
        f"model, {args.route_batch} rows round-robin; decode = 1 token/row ({args.decode_steps} forwards per "
        f"route()), prefill = {args.prefill_len} tokens/row; inference_mode; medians of {args.reps}",
        "",
        "| shape | base (ms/forward) | ours (ms/forward) | ours / base | peft (ms/forward) | peft / base | ours / peft |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    with torch.inference_mode():
        check = torch.randint(0, args.vocab, (args.route_batch, 8))
        with adapters.route(rows):
            a = ours(input_ids=check, use_cache=False).logits
        b = theirs(input_ids=check, adapter_names=rows, use_cache=False).logits
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 1e-4, f"ours and peft disagree on the mixed batch (relative {err:.2e})"
        for shape, ids, steps in (
            ("decode", decode_ids(), args.decode_steps),
            ("prefill", torch.randint(0, args.vocab, (args.route_batch, args.prefill_len)), 1),
        ):
            runs = {"base": run_base, "ours": run_ours, "peft": run_peft}
            for fn in runs.values():
                fn(ids, steps)  # warmup
            times: dict[str, list[float]] = {k: [] for k in runs}
            keys = list(runs)
            for rep in range(args.reps):
                for k in keys[rep % 3 :] + keys[: rep % 3]:
                    t = time.perf_counter()
                    runs[k](ids, steps)
                    times[k].append((time.perf_counter() - t) / steps)
            m = {k: statistics.median(v) * 1000 for k, v in times.items()}
            lines.append(
                f"| {shape} | {m['base']:.2f} | {m['ours']:.2f} | {m['ours'] / m['base']:.2f}× | {m['peft']:.2f} | "
                f"{m['peft'] / m['base']:.2f}× | {m['ours'] / m['peft']:.2f}× |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import peft
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    base = base_model(args)
    parts = [
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} threads, float32, CPU"
    ]
    if not args.skip_train:
        parts.append(train_table(args, base))
    if not args.skip_route:
        parts.append(route_table(args, base))
    text = "\n\n".join(parts)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
