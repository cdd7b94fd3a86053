"""torchao backend: an ``nn.Linear`` whose weight is a torchao tensor subclass (``NF4Tensor``, ``Int8Tensor``).

Registers a :class:`~adapterkit.quant.common.QuantizedBackend` for such linears (matched lazily: torchao is
imported only once a quantized base is used) and the ``"torchao"`` quantizer of ``ak.quantize``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import torch
from torch import nn

from ..backends import register_backend
from .common import LazyTypeMeta, QuantizedBackend, Quantizer, linear_dims, no_view, register_quantizer

PACKAGE = "torchao"


def _torchao_tensor_types() -> tuple[type, ...]:
    if sys.modules.get("torchao") is None:  # never imported, or hidden (``sys.modules["torchao"] = None``)
        return ()
    from torchao.quantization import NF4Tensor
    from torchao.utils import TorchAOBaseTensor

    return (TorchAOBaseTensor, NF4Tensor)


class _TorchAOLinear(metaclass=LazyTypeMeta):
    """Virtual type: an ``nn.Linear`` whose weight is a torchao tensor subclass (``NF4Tensor``,
    ``Int8Tensor``, ...); torchao keeps the module class and swaps the weight."""

    @staticmethod
    def matches(obj: Any) -> bool:
        types = _torchao_tensor_types()
        return bool(types) and isinstance(obj, nn.Linear) and isinstance(obj.weight, types)


def _torchao_requantize(old: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` quantized like ``old`` (same block sizes / granularity, mapping and activation settings)."""
    from torchao.quantization import Int8Tensor, MappingType, NF4Tensor, PerGroup, PerRow, PerTensor, to_nf4

    if isinstance(old, NF4Tensor):
        return to_nf4(weight.to(old.dtype).contiguous(), old.block_size, old.scaler_block_size)
    if isinstance(old, Int8Tensor) and old.qdata.dim() == 2:
        out, inp = old.shape
        block = list(old.block_size)
        granularity = (
            PerTensor() if block == [out, inp] else PerRow() if block == [1, inp] else PerGroup(block[-1])
        )
        symmetric = old.zero_point is None or not bool(old.zero_point.any())
        return Int8Tensor.from_hp(
            weight.to(old.dtype).contiguous(),
            granularity=granularity,
            mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC,
            act_quant_kwargs=old.act_quant_kwargs,
            act_quant_scale=old.act_quant_scale,
            act_quant_zero_point=old.act_quant_zero_point,
            act_pre_scale=old.act_pre_scale,
            reduce_range=bool(old.reduce_range),
        )
    raise TypeError(
        f"merging into torchao {type(old).__name__} weights is not supported (NF4Tensor and 2-D Int8Tensor can be "
        "requantized); use adapters.merge_and_detach(dtype=...) for a dense merged model"
    )


@dataclasses.dataclass(frozen=True)
class _TorchAOBackend(QuantizedBackend):
    def dequantize(self, module: nn.Module) -> torch.Tensor:
        from torchao.quantization import Int8Tensor, NF4Tensor

        w = module.weight
        if isinstance(w, NF4Tensor):
            return w.get_original_weight().to(torch.float32)
        if isinstance(w, Int8Tensor):
            return w.dequantize(torch.float32)
        return w.dequantize().to(torch.float32)

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        module.weight = nn.Parameter(_torchao_requantize(module.weight, weight), requires_grad=False)

    def snapshot(self, module: nn.Module) -> Any:
        return module.weight

    def restore(self, module: nn.Module, state: Any) -> None:
        module.weight = state

    def to_dense(self, module: nn.Module, dtype: torch.dtype) -> nn.Module:
        """In place: torchao keeps the ``nn.Linear`` and swaps its weight, so the dense one goes back there."""
        module.weight = nn.Parameter(self.read(module).to(dtype), requires_grad=False)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)
        module.__dict__.pop("extra_repr", None)  # set by torchao's quantize_
        return module


def _torchao_nf4(lin: nn.Linear, blocksize: int) -> nn.Module:
    from torchao.quantization import to_nf4

    weight = lin.weight.detach().contiguous()
    # scales are double-quantized in blocks of 256 (QLoRA); smaller layers use the largest block that fits
    scaler_block = math.gcd(weight.numel() // blocksize, 256)
    lin.weight = nn.Parameter(to_nf4(weight, blocksize, scaler_block), requires_grad=False)
    return lin


def _torchao_int8(lin: nn.Linear) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(lin, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=lambda m, fqn: m is lin)
    return lin


def convert(lin: nn.Linear, scheme: str, options: dict[str, Any]) -> nn.Module:
    return _torchao_nf4(lin, options["blocksize"]) if scheme == "nf4" else _torchao_int8(lin)


def check(modules: dict[str, nn.Module], chosen: list[str], scheme: str, blocksize: int) -> list[str]:
    odd = [n for n in chosen if modules[n].weight.numel() % blocksize]
    if scheme == "nf4" and odd:  # checked up front: nothing is converted then
        raise ValueError(
            f"torchao NF4 needs weights whose size divides by blocksize={blocksize}: {odd[:3]} do not; "
            "exclude them or pick another blocksize"
        )
    return []


register_backend(_TorchAOLinear, _TorchAOBackend("linear", linear_dims, no_view))
register_quantizer(PACKAGE, Quantizer(pip="torchao>=0.18", convert=convert, check=check))
