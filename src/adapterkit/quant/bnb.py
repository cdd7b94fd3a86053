"""bitsandbytes backend: ``Linear4bit`` (NF4/FP4) and ``Linear8bitLt`` (int8, LLM.int8()).

Registers a :class:`~adapterkit.quant.common.QuantizedBackend` per module type (matched lazily: bitsandbytes
is imported only once a quantized base is used) and the ``"bitsandbytes"`` quantizer of ``ak.quantize``.
bitsandbytes 0.50 on CPU: ``Linear4bit`` repacks its weight on the first eval forward on AVX512-BF16 CPUs and
then stops passing gradients (turned off here); NF4 layers whose ``in_features`` is not a multiple of the
block size dequantize wrongly (``quantize`` warns).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
from torch import nn

from ..backends import register_backend
from .common import LazyTypeMeta, QuantizedBackend, Quantizer, linear_dims, no_view, register_quantizer

PACKAGE = "bitsandbytes"


class _Bnb4bitLinear(metaclass=LazyTypeMeta):
    """Virtual type: ``bitsandbytes.nn.Linear4bit`` (NF4/FP4)."""

    @staticmethod
    def matches(obj: Any) -> bool:
        bnb = sys.modules.get("bitsandbytes.nn")
        return bnb is not None and isinstance(obj, bnb.Linear4bit)


class _Bnb8bitLinear(metaclass=LazyTypeMeta):
    """Virtual type: ``bitsandbytes.nn.Linear8bitLt`` with int8 weights (``has_fp16_weights=False``)."""

    @staticmethod
    def matches(obj: Any) -> bool:
        bnb = sys.modules.get("bitsandbytes.nn")
        return bnb is not None and isinstance(obj, bnb.Linear8bitLt) and obj.weight.dtype == torch.int8


def unpack_cpu(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference repacking of a ``Linear4bit`` weight in place (what its own
    ``state_dict()`` does), so the codes are in the canonical layout again."""
    from bitsandbytes import functional as bnbF

    weight = module.weight
    state = weight.quant_state
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = bnbF._convert_weight_packed_for_cpu_inverse(weight.data, state)
        module.quant_state = weight.quant_state


@dataclasses.dataclass(frozen=True)
class _Bnb4bitBackend(QuantizedBackend):
    def dequantize(self, module: nn.Module) -> torch.Tensor:
        from bitsandbytes import functional as bnbF

        unpack_cpu(module)
        w = module.weight
        return bnbF.dequantize_4bit(w.data, w.quant_state).to(torch.float32)

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        unpack_cpu(module)
        old = module.weight
        state = old.quant_state
        codes, new_state = bnb.functional.quantize_4bit(
            weight.to(state.dtype).contiguous(),
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=old.data.dtype,
        )
        module.weight = bnb.nn.Params4bit(
            codes,
            requires_grad=False,
            quant_state=new_state,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=old.data.dtype,
            module=module,
            bnb_quantized=True,
        )
        module.quant_state = new_state

    def snapshot(self, module: nn.Module) -> Any:
        unpack_cpu(module)
        return module.weight, module.quant_state

    def restore(self, module: nn.Module, state: Any) -> None:
        module.weight, module.quant_state = state

    def stored_dtype(self, module: nn.Module) -> torch.dtype:
        unpack_cpu(module)
        return module.weight.quant_state.dtype

    def prepare_for_training(self, module: nn.Module) -> None:
        """Keep (and restore) the training layout: repacked for CPU inference, the layer passes no gradient
        to its input (see ``prepare_for_kbit_training``)."""
        module.support_avx512bf16_for_cpu = False
        unpack_cpu(module)


@dataclasses.dataclass(frozen=True)
class _Bnb8bitBackend(QuantizedBackend):
    """``Linear8bitLt``: int8 codes ``CB: (out, in)`` with one absmax per row ``SCB: (out,)`` (LLM.int8,
    Dettmers et al. 2022, §3.1 vector-wise quantization). The scales live on the weight until the first
    forward and on ``module.state`` after it."""

    @staticmethod
    def _scales(module: nn.Module) -> torch.Tensor:
        scb = getattr(module.weight, "SCB", None)
        return module.state.SCB if scb is None else scb

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        from bitsandbytes import functional as bnbF

        return bnbF.int8_vectorwise_dequant(module.weight.data, self._scales(module)).to(torch.float32)

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        # as Int8Params._quantize: via float16, one absmax per output row
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        module.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)
        module.state.CB = None
        module.state.SCB = None

    def snapshot(self, module: nn.Module) -> Any:
        return module.weight, module.state.CB, module.state.SCB

    def restore(self, module: nn.Module, state: Any) -> None:
        module.weight, module.state.CB, module.state.SCB = state

    def stored_dtype(self, module: nn.Module) -> torch.dtype:
        return torch.float16  # Int8Params quantizes via float16


def _bnb_nf4(lin: nn.Linear, compute_dtype: torch.dtype | None, double_quant: bool, blocksize: int) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(
        lin.in_features,
        lin.out_features,
        bias=lin.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
        device="meta",
    )
    weight = lin.weight.detach()
    q.weight = bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type="nf4",
        module=q,
    ).to(weight.device)
    # bitsandbytes repacks Linear4bit weights in place on the first eval forward on AVX512-BF16 CPUs, after
    # which the module stops passing gradients to its input; keep the training layout
    q.support_avx512bf16_for_cpu = False
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach(), requires_grad=False)
    return q.train(lin.training)


def _bnb_int8(lin: nn.Linear, threshold: float) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear8bitLt(
        lin.in_features,
        lin.out_features,
        bias=lin.bias is not None,
        has_fp16_weights=False,
        threshold=threshold,
        device="meta",
    )
    weight = lin.weight.detach()
    q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(weight.device)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach(), requires_grad=False)
    return q.train(lin.training)


def convert(lin: nn.Linear, scheme: str, options: dict[str, Any]) -> nn.Module:
    if scheme == "nf4":
        return _bnb_nf4(lin, options["compute_dtype"], options["double_quant"], options["blocksize"])
    return _bnb_int8(lin, options["int8_threshold"])


def check(modules: dict[str, nn.Module], chosen: list[str], scheme: str, blocksize: int) -> list[str]:
    misfit = [n for n in chosen if modules[n].in_features % blocksize and modules[n].weight.device.type == "cpu"]
    if scheme != "nf4" or not misfit:
        return []
    return [
        f"bitsandbytes dequantizes NF4 weights wrongly on CPU when in_features is not a multiple of "
        f"blocksize={blocksize} (bitsandbytes 0.50; {len(misfit)} layers, e.g. {misfit[0]!r}); their outputs will "
        "be off: exclude them or use backend='torchao'"
    ]


def mark(model: nn.Module, scheme: str) -> None:
    """As transformers marks the models it loads, so peft and Trainer see them."""
    setattr(model, "is_loaded_in_4bit" if scheme == "nf4" else "is_loaded_in_8bit", True)


register_backend(_Bnb4bitLinear, _Bnb4bitBackend("linear", linear_dims, no_view))
register_backend(_Bnb8bitLinear, _Bnb8bitBackend("linear", linear_dims, no_view))
register_quantizer(PACKAGE, Quantizer(pip="bitsandbytes>=0.50", convert=convert, check=check, mark=mark))
