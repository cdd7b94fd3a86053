#!/usr/bin/env python
"""LoKr and LoHa training speed and saved activations: adapterkit vs peft, beside adapterkit's LoRA r=16.

A LLaMA-style model is built from ``transformers.LlamaConfig`` (random init, nothing downloaded) and copied with
identical weights for every variant; each adapts every linear layer of the decoder (``all-linear``):

* ``lora16``: ``ak.LoRA(r=16, alpha=32)`` (the reference the issue's targets compare to);
* ``lokr`` / ``peft-lokr``: ``ak.LoKr(r, alpha)`` / ``LoKrConfig(r, alpha)`` (default ``decompose_factor=-1``);
* ``loha`` / ``peft-loha``: ``ak.LoHa(r, alpha)`` / ``LoHaConfig(r, alpha)``.

Measured, as in ``benchmarks/lora_vs_peft.py``: a training step (forward + causal-LM loss + backward + AdamW step,
``zero_grad(set_to_none=True)``); the variants alternate in ONE process (the order rotates every rep) after
warmup; medians over reps. Saved activations: bytes of distinct non-parameter storages the autograd graph saves
for backward in one step (peft keeps each dense ΔW; adapterkit applies the factors to the activations).

Quick smoke run::

    .venv/bin/python benchmarks/lycoris_vs_peft.py --hidden 256 --layers 2 --heads 4 --intermediate 704 \\
        --vocab 1024 --seq 64 --batch 2 --reps 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

VARIANTS = ("lora16", "lokr", "peft-lokr", "loha", "peft-loha")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--r", type=int, default=8, help="LoKr/LoHa rank")
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    return p.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build(variant: str, base, args: argparse.Namespace):
    import torch

    import adapterkit as ak

    model = copy.deepcopy(base)
    if variant.startswith("peft-"):
        from peft import LoHaConfig, LoKrConfig, get_peft_model

        make = LoKrConfig if variant == "peft-lokr" else LoHaConfig
        model = get_peft_model(model, make(r=args.r, alpha=args.alpha, target_modules="all-linear"))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        cfg = {
            "lora16": ak.LoRA(r=16, alpha=32, targets="all-linear"),
            "lokr": ak.LoKr(r=args.r, alpha=args.alpha, targets="all-linear"),
            "loha": ak.LoHa(r=args.r, alpha=args.alpha, targets="all-linear"),
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


def saved_activation_bytes(model, ids) -> int:
    import torch

    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            if s.data_ptr() not in param_ptrs and s.data_ptr() != 0:
                seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    del loss
    return sum(seen.values())


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 64),
    )  # fmt: skip
    base = LlamaForCausalLM(cfg).to(args.device)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    built = {v: build(v, base, args) for v in VARIANTS}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for _ in range(args.warmup):
        for v in VARIANTS:
            step(*built[v][:2], ids)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(args.reps):
        order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
        for v in order:
            sync()
            t = time.perf_counter()
            step(*built[v][:2], ids)
            sync()
            times[v].append(time.perf_counter() - t)
    med = {v: statistics.median(ts) * 1000 for v, ts in times.items()}
    saved = {v: saved_activation_bytes(built[v][0], ids) / 2**20 for v in VARIANTS}
    lines = [
        f"LLaMA-style h={args.hidden} layers={args.layers} ffn={args.intermediate} seq={args.seq} "
        f"batch={args.batch}, all-linear, r={args.r} (LoRA r=16), {args.device}, medians of {args.reps}",
        "",
        "| variant | trainable | step (ms) | vs peft | vs LoRA r=16 | saved activations (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in VARIANTS:
        peer = f"peft-{v}" if f"peft-{v}" in med else None
        vs_peft = f"{med[v] / med[peer]:.2f}×" if peer else ""
        lines.append(
            f"| {v} | {built[v][2]:,} | {med[v]:.1f} | {vs_peft} | {med[v] / med['lora16']:.2f}× | {saved[v]:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
