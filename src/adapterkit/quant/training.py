"""Training on quantized bases: :func:`prepare_for_kbit_training` (peft's ``prepare_model_for_kbit_training``).

Backend-specific fixes go through ``QuantizedBackend.prepare_for_training``; nothing here imports a backend.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..backends import backend_for
from ..targeting import base_modules
from .common import QuantizedBackend

# --- training preparation --------------------------------------------------------------------------------------
_NORM_TYPES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def _is_norm(module: nn.Module) -> bool:
    """torch's norm layers and the models' own (``LlamaRMSNorm``, ``T5LayerNorm``, ...)."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


_NORM_HOOK = "_adapterkit_norm_hook"


def _keep_input_dtype(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and output.dtype != x.dtype:
        return output.to(x.dtype)
    return None


def _norm_in_fp32(module: nn.Module) -> None:
    """Float32 parameters; the output keeps the input's dtype (a norm with fp32 weights would otherwise turn
    bf16 activations into fp32 ones, which the next bf16 layer refuses without autocast)."""
    for p in module.parameters(recurse=False):
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.to(torch.float32)
    if _NORM_HOOK not in module.__dict__:
        module.__dict__[_NORM_HOOK] = module.register_forward_hook(_keep_input_dtype)


def prepare_for_kbit_training(
    model: nn.Module,
    *,
    gradient_checkpointing: bool = True,
    use_reentrant: bool = False,
    norms_in_fp32: bool = True,
) -> nn.Module:
    """Set a (quantized) model up for adapter training, as peft's ``prepare_model_for_kbit_training``.

    * Freezes the base model's parameters (adapters already added keep their ``requires_grad``: unlike
      peft's helper this can be called before or after ``adapters.add``/``train``).
    * Casts normalization layers' parameters to float32 (QLoRA trains with fp32 norms) and keeps their
      outputs in the input's dtype (a forward hook), so bf16 activations stay bf16 without autocast. Other
      parameters keep their dtype: peft casts every non-quantized parameter to fp32 (embeddings and heads
      included), which also turns the activations fp32.
    * Gradient checkpointing (transformers models) with ``use_reentrant`` (default False, torch's
      recommendation), and the input embeddings' output marked as requiring grad, so that reentrant
      checkpointing over a frozen, quantized model still sees inputs that require grad (the "element 0 of
      tensors does not require grad" error otherwise); ``config.use_cache`` is turned off.
    * bitsandbytes ``Linear4bit`` on CPUs with AVX512-BF16: bitsandbytes repacks the weight for inference on
      the first eval forward, after which the layer silently stops passing gradients to its input (only the
      adapters after the last such layer would learn). The repacking is turned off and undone.

    Raises:
        ValueError: ``gradient_checkpointing=True`` on a model without ``gradient_checkpointing_enable``.
    """
    for module in model.modules():
        backend = backend_for(module)
        if isinstance(backend, QuantizedBackend):
            backend.prepare_for_training(module)
    for module in base_modules(model).values():
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
        if norms_in_fp32 and _is_norm(module):
            _norm_in_fp32(module)
    if gradient_checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if not callable(enable):
            raise ValueError(
                f"{type(model).__name__} has no gradient_checkpointing_enable(); pass gradient_checkpointing=False "
                "and wrap its blocks in torch.utils.checkpoint yourself"
            )
        enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        if callable(getattr(model, "enable_input_require_grads", None)):
            model.enable_input_require_grads()
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False
    return model
