"""``adapterkit inspect``: the model tree with its targetable roles, where a method's adapters would sit,
parameter counts and an estimate of training memory, without loading any weights (the model is built on
the ``meta`` device from its config)."""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch
from torch import nn

import adapterkit as ak
from adapterkit.profiles import is_inferred
from adapterkit.targeting import base_modules, unreached_parameters

from .models import ModelError, guess_task, model_class, model_config

__all__ = ["inspect_model", "estimate_memory", "tree_lines"]


def _roles_of(name: str, roles: dict[str, list[str]]) -> list[str]:
    return [r for r, pats in roles.items() if name and any(re.fullmatch(rf"(.*\.)?(?:{p})", name) for p in pats)]


def _nparams(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _shape_key(module: nn.Module) -> tuple:
    """Structure of a module (submodule names and types), to fold identical repeated layers."""
    return tuple((n, type(m).__name__) for n, m in module.named_modules())


def tree_lines(model: nn.Module, roles: dict[str, list[str]], sites: dict[str, tuple[str, int]],
               method: str, max_depth: int | None = None) -> list[str]:  # fmt: skip
    """One line per module: name, class, parameters, roles, and ``<- method kind (params)`` where an adapter
    would sit. Repeated layers identical to the first of their list are folded into one line."""
    modules = base_modules(model)
    lines: list[str] = []

    def mark(name: str) -> str:
        if name not in sites:
            return ""
        kind, n = sites[name]
        return f"  <- {method} {kind} (+{n:,})"

    def walk(name: str, module: nn.Module, depth: int) -> None:
        label = name.rsplit(".", 1)[-1] if name else type(module).__name__
        tags = _roles_of(name, roles)
        role_txt = f"  [{', '.join(tags)}]" if tags else ""
        lines.append(
            f"{'  ' * depth}{label} ({type(module).__name__}, {_nparams(module):,}){role_txt}{mark(name)}"
        )
        if max_depth is not None and depth >= max_depth:
            return
        children = [
            (n, c) for n, c in module._modules.items() if c is not None and f"{name}.{n}".lstrip(".") in modules
        ]
        first_key = None
        folded: list[str] = []
        for i, (child_name, child) in enumerate(children):
            full = f"{name}.{child_name}" if name else child_name
            if child_name.isdigit() and i > 0 and first_key is not None and _shape_key(child) == first_key:
                folded.append(full)
                continue
            if child_name.isdigit() and i == 0:
                first_key = _shape_key(child)
            walk(full, child, depth + 1)
        if folded:
            n_sites = sum(1 for s in sites if any(s == f or s.startswith(f + ".") for f in folded))
            at = f"; {method} at {n_sites} sites in them" if sites else ""
            first, last = folded[0].rsplit(".", 1)[-1], folded[-1].rsplit(".", 1)[-1]
            lines.append(f"{'  ' * (depth + 1)}{first}..{last} ({len(folded)} more like {children[0][0]}{at})")

    walk("", model, 0)
    return lines


def _cfg_int(cfg: Any, *names: str, default: int = 0) -> int:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def estimate_memory(cfg: Any, *, base_params: int, base_bytes: int, adapter_params: int, batch: int, seq: int,
                    task: str | None) -> dict[str, float]:  # fmt: skip
    """Rough training memory (bytes) on one device, as an upper bound:

    * base weights at their dtype;
    * the adapter in float32 with its gradient and AdamW's two moments (16 bytes per parameter);
    * activations kept for backward, per layer ``b·s·h·(34 + 5·a·s/h)`` bytes at 16 bits (Korthikanti et al.
      2022, "Reducing Activation Recomputation in Large Transformer Models", §4.1), scaled to the base dtype;
      frozen layers below the first adapter need less, so this is an upper bound;
    * for language-model heads, the logits and their gradient in float32 (``2·b·s·vocab·4``).
    """
    layers = _cfg_int(cfg, "num_hidden_layers", "n_layer", "num_layers")
    layers += (
        _cfg_int(cfg, "num_decoder_layers", "decoder_layers") if getattr(cfg, "is_encoder_decoder", False) else 0
    )
    hidden = _cfg_int(cfg, "hidden_size", "n_embd", "d_model", default=1)
    heads = _cfg_int(cfg, "num_attention_heads", "n_head", "num_heads", default=1)
    vocab = _cfg_int(cfg, "vocab_size")
    activations = layers * batch * seq * hidden * (34 + 5 * heads * seq / hidden) * base_bytes / 2
    logits = 2 * batch * seq * vocab * 4 if task in ("causal-lm", "seq2seq") else 0
    out = {
        "base weights": float(base_params * base_bytes),
        "adapter + grads + AdamW": float(adapter_params * 16),
        "activations": float(activations),
        "logits": float(logits),
    }
    out["total"] = sum(out.values())
    return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _build(cfg: Any, task: str | None, path: str | os.PathLike) -> tuple[nn.Module, str | None]:
    """The model of ``cfg`` for ``task`` on the meta device (nothing allocated); the bare model when the task's
    auto class does not know the architecture (e.g. Whisper is no ``AutoModelForSeq2SeqLM``)."""
    try:
        with torch.device("meta"):
            try:
                return model_class(task).from_config(cfg), task
            except ValueError as e:
                if task is None or "Unrecognized configuration class" not in str(e):
                    raise
            print(f"note: {type(cfg).__name__} has no {task} model class; showing the bare model (--task none)")
            return model_class(None).from_config(cfg), None
    except Exception as e:  # a config transformers cannot build (inconsistent sizes, unknown class, ...)
        raise ModelError(
            f"cannot build the model of {str(path)!r} from its config: {type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0]}; check its config.json"
        ) from None


def inspect_model(path: str | os.PathLike, *, task: str | None, method: str | None, overrides: dict[str, Any],
                  batch: int, seq: int, depth: int | None, tree: bool) -> dict[str, Any]:  # fmt: skip
    """Print the report for ``adapterkit inspect``; returns its numbers."""
    cfg = model_config(path)
    task = None if task == "none" else task or guess_task(cfg)
    model, task = _build(cfg, task, path)
    adapters = ak.attach(model)
    if method and task == "classify" and "heads" not in overrides:
        overrides = {**overrides, "heads": ["head"]}  # as `train` does: the new head trains with the adapter
    plan = adapters.plan(method, **overrides) if method else None
    sites = (
        {n: (kind, sum(p.numel() for p in c.parameters())) for n, (kind, c) in plan.components.items()}
        if plan
        else {}
    )
    base_params = _nparams(model)
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    base_bytes = torch.empty((), dtype=dtype).element_size()

    inferred = is_inferred(adapters.roles)
    profile = (
        f"{adapters.family} (roles inferred from the module tree)"
        if inferred
        else adapters.family or "none (targets by name, type or all-linear)"
    )
    print(f"{type(model).__name__} from {path}: {base_params:,} parameters ({str(dtype).replace('torch.', '')}), "
          f"task {task or 'none (base model)'}, profile {profile}")  # fmt: skip
    if tree:
        print()
        for line in tree_lines(model, adapters.roles, sites, plan.config.method if plan else "", depth):
            print(line)
    modules = base_modules(model)
    how = " inferred from the module tree (no hand-written profile; check them)" if inferred else ""
    print(f"\nroles (targets=...){how}:")
    for role in adapters.roles:
        names = [n for n in modules if role in _roles_of(n, {role: adapters.roles[role]})]
        if names:
            print(f"  {role:<10} {len(names):>4} modules, e.g. {names[0]}{'  (inferred)' if inferred else ''}")
    if not adapters.roles:
        print("  none: no profile and no attention/FFN blocks found; target modules by name, type or 'all-linear'")
    unreached = unreached_parameters(modules)
    if unreached:
        count = sum(math.prod(s) for s in unreached.values())
        suffixes = list(dict.fromkeys(".".join(k.split(".")[-2:]) for k in unreached))
        first, shape = next(iter(unreached.items()))
        print(f"\nnot reachable by module targets or 'all-linear': {len(unreached)} parameters of modules that are not "
              f"layers ({count:,} values, {100 * count / max(base_params, 1):.0f}% of the model; MoE expert stacks "
              f"and routers), e.g. {first} {shape}; LoRA reaches them with target_parameters={suffixes!r}")  # fmt: skip
    report: dict[str, Any] = {
        "base_params": base_params,
        "task": task,
        "family": adapters.family,
        "roles_inferred": inferred,
        "unreached": unreached,
    }
    if plan is not None:
        n = plan.num_params
        kinds: dict[str, int] = {}
        for kind, _ in sites.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        where = ", ".join(f"{v} {k}" for k, v in kinds.items())
        print(f"\n{plan.config.method}: {len(sites)} sites ({where}), {n:,} trainable parameters "
              f"({100 * n / max(base_params, 1):.3f}% of the model)")  # fmt: skip
        report.update(adapter_params=n, sites=len(sites))
    mem = estimate_memory(cfg, base_params=base_params, base_bytes=base_bytes, adapter_params=plan.num_params if plan else 0,
                          batch=batch, seq=seq, task=task)  # fmt: skip
    print(f"\nestimated training memory (batch {batch} x {seq} tokens, upper bound):")
    for k, v in mem.items():
        print(f"  {k:<24} {_fmt_bytes(v):>12}")
    report["memory"] = mem
    return report
