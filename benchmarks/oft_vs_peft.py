#!/usr/bin/env python
"""OFT v2 and BOFT training speed and saved activations: adapterkit vs peft, beside adapterkit's LoRA r=16.

A LLaMA-style model is built from ``transformers.LlamaConfig`` (random init, nothing downloaded) and copied with
identical weights for every variant; each adapts every linear layer of the decoder (``all-linear``):

* ``base``: no adapter, every weight frozen, the gradient taken to the input embeddings (backward runs through every
  layer, as in ``benchmarks/lora_vs_peft.py``): the floor no adapter's step can go below;
* ``lora16``: ``ak.LoRA(r=16, alpha=32)`` (the reference the issue's targets compare to);
* ``oft`` / ``peft-oft``: ``ak.OFT(oft_block_size=b)`` / ``OFTConfig(oft_block_size=b)`` (Cayley–Neumann, 5 terms:
  both rotate the activations block by block);
* ``boft`` / ``peft-boft``: ``ak.BOFT(boft_block_size=b / 2...)`` / ``BOFTConfig`` with ``boft_n_butterfly_factor=1``
  (peft on CPU forces 1: its butterfly kernel is CUDA-only). peft builds the dense ``(in, in)`` rotation every
  forward and multiplies the activations by it; adapterkit applies the block factors to the activations.

Measured, as in ``benchmarks/lycoris_vs_peft.py``: a training step (forward + causal-LM loss + backward + AdamW step,
``zero_grad(set_to_none=True)``); the variants alternate in ONE process (the order rotates every rep) after
warmup; medians over reps. Saved activations: bytes of distinct non-parameter storages the autograd graph saves
for backward in one step. 1-token forward: an unmerged eval forward of one token under ``inference_mode`` (a decode
step's adapter overhead; adapterkit reuses the rotation blocks while the weights are unchanged, peft rebuilds them).

Quick smoke run::

    .venv/bin/python benchmarks/oft_vs_peft.py --hidden 256 --layers 2 --heads 4 --intermediate 704 \\
        --vocab 1024 --seq 64 --batch 2 --reps 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

VARIANTS = ("base", "lora16", "oft", "peft-oft", "boft", "peft-boft")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=32, help="OFT block size")
    p.add_argument("--boft-block", type=int, default=8, help="BOFT block size")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS)
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--infer-reps", type=int, default=30, help="one-token forwards per variant (0: skip)")
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
    if variant == "base":  # the floor: every weight frozen, backward through every layer (inputs_embeds)
        model.requires_grad_(False)
        model.train()
        return model, None, 0
    if variant.startswith("peft-"):
        from peft import BOFTConfig, OFTConfig, get_peft_model

        if variant == "peft-oft":
            cfg = OFTConfig(oft_block_size=args.block, target_modules="all-linear")
        else:
            cfg = BOFTConfig(
                boft_block_size=args.boft_block, boft_n_butterfly_factor=1, target_modules="all-linear"
            )
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        cfg = {
            "lora16": lambda: ak.LoRA(r=16, alpha=32, targets="all-linear"),
            "oft": lambda: ak.OFT(oft_block_size=args.block, targets="all-linear"),
            "boft": lambda: ak.BOFT(
                boft_block_size=args.boft_block, boft_n_butterfly_factor=1, targets="all-linear"
            ),
        }[variant]()
        adapters = ak.attach(model)
        adapters.add("bench", cfg)
        adapters.train("bench")
        params = list(adapters.parameters("bench"))
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    return model, opt, sum(p.numel() for p in params)


def step(model, opt, ids) -> None:
    if opt is None:  # base: the gradient flows back to the input embeddings only
        import torch

        with torch.no_grad():
            emb = model.get_input_embeddings()(ids)
        emb.requires_grad_(True)
        model(inputs_embeds=emb, labels=ids, use_cache=False).loss.backward()
        return
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


def one_token_ms(built: dict, variants: tuple[str, ...], ids, reps: int, sync) -> dict[str, float]:
    """Median time of an unmerged eval forward of one token (``inference_mode``, no KV cache), the variants
    alternating: the per-token cost of a decode step, where peft rebuilds its rotation on every call."""
    import torch

    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:
        built[v][0].eval()
    with torch.inference_mode():
        for rep in range(reps + 2):
            for v in variants:
                sync()
                t = time.perf_counter()
                built[v][0](input_ids=ids, use_cache=False)
                sync()
                if rep >= 2:  # the first two are warmup
                    times[v].append(time.perf_counter() - t)
    for v in variants:
        built[v][0].train()
    return {v: statistics.median(ts) * 1000 for v, ts in times.items()}


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
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
    built = {v: build(v, base, args) for v in variants}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for _ in range(args.warmup):
        for v in variants:
            step(*built[v][:2], ids)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(args.reps):
        order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
        for v in order:
            sync()
            t = time.perf_counter()
            step(*built[v][:2], ids)
            sync()
            times[v].append(time.perf_counter() - t)
    med = {v: statistics.median(ts) * 1000 for v, ts in times.items()}
    saved = {v: saved_activation_bytes(built[v][0], ids) / 2**20 for v in variants}
    one = one_token_ms(built, variants, ids[:1, :1], args.infer_reps, sync) if args.infer_reps else {}
    lines = [
        f"LLaMA-style h={args.hidden} layers={args.layers} ffn={args.intermediate} seq={args.seq} "
        f"batch={args.batch}, all-linear, OFT block {args.block}, BOFT block {args.boft_block} (1 butterfly "
        f"factor), LoRA r=16, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"medians of {args.reps}",
        "",
        "| variant | trainable | step (ms) | vs peft | vs LoRA r=16 | saved activations (MiB) | 1-token forward (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        peer = f"peft-{v}" if f"peft-{v}" in med else None
        vs_peft = f"{med[v] / med[peer]:.2f}×" if peer else ""
        vs_lora = f"{med[v] / med['lora16']:.2f}×" if "lora16" in med else ""
        tok = f"{one[v]:.2f}" if v in one else ""
        lines.append(f"| {v} | {built[v][2]:,} | {med[v]:.1f} | {vs_peft} | {vs_lora} | {saved[v]:.1f} | {tok} |")
    if "base" in med and "peft-oft" in med:  # what the "OFT <= 0.8x peft" asks, against the floor
        lines += [
            "",
            f"Frozen base step (no adapter, backward through every layer): {med['base']:.1f} ms; peft's OFT step is "
            f"{med['peft-oft'] / med['base']:.2f}x that, so OFT <= 0.8x peft's would be "
            f"{0.8 * med['peft-oft'] / med['base']:.2f}x the frozen base model's own step.",
        ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
