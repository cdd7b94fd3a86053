"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): B learns faster than A.

§3-4 of the paper show that with one learning rate for both factors, feature learning is inefficient at large
width; setting ``η_B = λ η_A`` with ``λ ≫ 1`` (the paper recommends ``λ ≈ 2^4``) fixes it at no cost. This is an
optimizer helper, not a method: the adapter is plain LoRA (any variant), only the optimizer's parameter groups change.

The groups equal peft's ``create_loraplus_optimizer`` (peft 0.21), in its order:

=====  ==========================================================================  ==================  ============
group  parameters (trainable parameters of the whole model)                        lr                  weight decay
=====  ==========================================================================  ==================  ============
0      everything else (LoRA's A, head weights, ...)                                ``lr``              ``weight_decay``
1      every parameter of a LoRA component on an embedding                         ``lr_embedding``    ``weight_decay``
2      LoRA's B and other 1-d parameters, decayed ones                              ``ratio · lr``      ``weight_decay``
3      1-d parameters inside a LayerNorm or with ``bias`` in their name             ``ratio · lr``      0
=====  ==========================================================================  ==================  ============

"Decayed" follows transformers' rule as peft does: not inside an ``nn.LayerNorm`` and no ``bias`` in the parameter's
name. Which parameters are B (and which sit on embeddings) is read from the components, never from names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .lora import LoRAEmbedding, _LoRABase

PUBLIC = ("loraplus_param_groups", "loraplus_optimizer")
__all__ = ["loraplus_param_groups", "loraplus_optimizer"]


def loraplus_param_groups(
    adapters: Any, *, lr: float, ratio: float, lr_embedding: float = 1e-6, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """The four optimizer parameter groups of LoRA+ for the trainable parameters of ``adapters.model``.

    Args:
        adapters: the model's controller (``ak.attach(model)``); its trainable parameters are grouped (call
            ``adapters.train(name)`` first).
        lr: learning rate of A (and of everything that is not a B).
        ratio: ``η_B / η_A`` (peft's ``loraplus_lr_ratio``; the paper suggests 16).
        lr_embedding: learning rate of LoRA on embeddings (peft's ``loraplus_lr_embedding``, 1e-6).
        weight_decay: weight decay of the decayed groups (peft's ``loraplus_weight_decay``, 0).

    Returns:
        ``[{"params": [...], "lr": ..., "weight_decay": ...}, ...]`` for ``torch.optim.AdamW(groups, lr=lr)``.

    Raises:
        ValueError: a non-positive learning rate or ratio.
    """
    for key, value in (("lr", lr), ("ratio", ratio), ("lr_embedding", lr_embedding)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"LoRA+ {key} must be a positive number, got {key}={value!r}")
    model: nn.Module = adapters.model
    kind: dict[int, str] = {}  # id(param) -> "B" or "embedding", from the components that own them
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, _LoRABase):
            if isinstance(module, LoRAEmbedding):
                kind.update((id(p), "embedding") for p in module.parameters())
            else:
                kind.setdefault(id(module.lora_B), "B")
        if isinstance(module, nn.LayerNorm):
            no_decay.update(id(p) for p in module.parameters())
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        k = kind.get(id(p))
        if k == "embedding":
            groups["embedding"].append(p)
        elif k == "B" or p.ndim == 1:
            decayed = id(p) not in no_decay and "bias" not in name
            groups["B" if decayed else "B_no_decay"].append(p)
        else:
            groups["A"].append(p)
    return [
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * ratio},
    ]


def loraplus_optimizer(
    adapters: Any,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    ratio: float,
    lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_cls(loraplus_param_groups(...), lr=lr, **kwargs)``: peft's ``create_loraplus_optimizer``."""
    groups = loraplus_param_groups(
        adapters, lr=lr, ratio=ratio, lr_embedding=lr_embedding, weight_decay=weight_decay
    )
    return optimizer_cls(groups, lr=lr, **kwargs)
