#!/usr/bin/env python
"""LoRA on MoE experts (3-D parameters) and routers: adapterkit's ``LoRA(target_parameters=...)`` vs peft's
``LoraConfig(target_parameters=...)`` (``lora.ParamWrapper``) vs the frozen base, on a random Mixtral.

One process; ours / peft / base alternate every rep (order rotating) after warmup, medians reported:

* training step: forward + causal-LM loss + backward + AdamW step over the trainable parameters;
* inference: ``model.eval()`` forward under ``torch.inference_mode()``.

Both adapters target the experts' ``gate_up_proj``/``down_proj`` and the router weight (``targets=[]`` /
``target_modules=[]``); the base run freezes everything and lets ``inputs_embeds`` require grad, so backward
runs through every layer.

    .venv/bin/python benchmarks/moe_experts_vs_peft.py --hidden 256 --experts 8 --layers 2 --seq 128 --batch 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                        num_local_experts=args.experts, num_experts_per_tok=2, max_position_embeddings=args.seq)  # fmt: skip
    return MixtralForCausalLM(cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model

    import adapterkit as ak

    params = ["experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"]
    ours = build(args)
    adapters = ak.attach(ours)
    adapters.add("bench", ak.LoRA(r=args.r, alpha=2 * args.r, targets=[], target_parameters=params))
    adapters.train("bench")
    theirs = get_peft_model(
        build(args), LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=[], target_parameters=params)
    )
    base = build(args)
    base.requires_grad_(False)
    models = {"ours": ours, "peft": theirs, "base": base}
    optims = {
        n: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)
        for n, m in models.items()
        if n != "base"
    }
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)

    def step(name: str) -> float:
        model = models[name]
        model.train()
        t = time.perf_counter()
        if name == "base":
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=emb, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if name in optims:
            optims[name].step()
            optims[name].zero_grad(set_to_none=True)
        return time.perf_counter() - t

    def infer(name: str) -> float:
        model = models[name].eval()
        t = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids)
        return time.perf_counter() - t

    for kind, fn in (("train step", step), ("inference", infer)):
        times: dict[str, list[float]] = {n: [] for n in models}
        names = list(models)
        for rep in range(args.warmup + args.reps):
            order = names[rep % 3 :] + names[: rep % 3]
            for n in order:
                dt = fn(n)
                if rep >= args.warmup:
                    times[n].append(dt)
        med = {n: statistics.median(v) for n, v in times.items()}
        print(
            f"{kind}: ours {med['ours'] * 1e3:.1f} ms, peft {med['peft'] * 1e3:.1f} ms, base {med['base'] * 1e3:.1f} ms"
            f" (ours/peft {med['ours'] / med['peft']:.2f}x)"
        )
    trainable = sum(q.numel() for q in adapters.parameters("bench"))
    print(
        f"trainable: ours {trainable:,}, peft {sum(q.numel() for q in theirs.parameters() if q.requires_grad):,}; "
        f"torch {torch.__version__}, threads {args.threads}"
    )


if __name__ == "__main__":
    main()
