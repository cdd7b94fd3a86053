"""Quantized base models: adapters on 8-bit and 4-bit NF4 weights (QLoRA).

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") freezes the base model
in 4-bit NormalFloat (NF4, §3 "4-bit NormalFloat Quantization") with *double quantization* of the
per-block scales (§3 "Double Quantization": the fp32 absmax of each 64-weight block is itself quantized
to 8 bits in blocks of 256) and trains LoRA factors in 16/32-bit on top::

    y = dequant(W_nf4) x  +  s · B A x          (compute dtype: bf16 or fp32)

Adapters act through hooks, so every method that works on ``nn.Linear`` works on the quantized linears
of bitsandbytes (``Linear4bit``, ``Linear8bitLt``) and torchao (an ``nn.Linear`` whose weight is an
``NF4Tensor`` or ``Int8Tensor``) without per-backend classes. Only *merging* needs to know the storage:
this module registers one :class:`~adapterkit.backends.Backend` per quantized type whose ``read``
dequantizes and whose ``add_``/``copy_`` requantize.

Public functions:

* :func:`quantize` converts a dense model's linear layers (output heads excepted) in place;
  models loaded by transformers with ``BitsAndBytesConfig`` / ``TorchAoConfig`` need nothing.
* :func:`prepare_for_kbit_training` does what peft's ``prepare_model_for_kbit_training`` does (frozen
  base, norms in fp32, gradient checkpointing with inputs that require grad) and removes a silent trap of
  bitsandbytes on CPUs with AVX512-BF16 (after one eval forward, ``Linear4bit`` stops passing gradients).
* :func:`dequantize` turns the quantized layers back into dense ``nn.Linear`` layers;
  ``adapters.merge_and_detach(dtype=...)`` merges into such a dense copy (no requantization).
* :func:`merge_error` reports what requantizing after a merge cost, per module.

Exact unmerge. Merging into a quantized weight is ``W' = Q(deq(W) + ΔW)``; subtracting ``ΔW`` again and
requantizing does not give back ``W`` (the rounding of the first requantization is lost; peft issue
2501). The backends here keep the codes a module had before each merge (a reference to the replaced
quantized parameter, no copy) and recognize an unmerge as the exact negation of a merge they recorded
(the same ``ΔW``, matched by a float64 fingerprint), so

* unmerging the last merged adapter puts back the exact codes from before its merge, and
* once every merged adapter is unmerged, in any order, the module holds its original codes again.

Only an unmerge out of order with other merged adapters still on the module goes through
dequantize-subtract-requantize (bounded by one quantization step). DoRA merges by rescaling the weight
(``copy_``), which cannot be matched that way: it unmerges within quantization error, as in peft.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .backends import Backend, backend_for, register_backend
from .targeting import CONTAINER, base_modules, select

__all__ = [
    "quantize",
    "prepare_for_kbit_training",
    "dequantize",
    "merge_error",
    "is_quantized",
    "MergeError",
    "MergeReport",
    "QuantizedBackend",
]

log = logging.getLogger(__name__)

SCHEMES = ("nf4", "int8")
BACKENDS = ("bitsandbytes", "torchao")
_PIP = {"bitsandbytes": "bitsandbytes>=0.50", "torchao": "torchao>=0.18"}


# --- virtual module types: matched by isinstance without importing the quantization libraries --------
class _LazyTypeMeta(type):
    """``isinstance(m, T)`` asks ``T.matches(m)``; used to register backends for library types without
    importing the library (a module of a library that was never imported cannot exist)."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return cls.matches(obj)


class _Bnb4bitLinear(metaclass=_LazyTypeMeta):
    """Virtual type: ``bitsandbytes.nn.Linear4bit`` (NF4/FP4)."""

    @staticmethod
    def matches(obj: Any) -> bool:
        bnb = sys.modules.get("bitsandbytes.nn")
        return bnb is not None and isinstance(obj, bnb.Linear4bit)


class _Bnb8bitLinear(metaclass=_LazyTypeMeta):
    """Virtual type: ``bitsandbytes.nn.Linear8bitLt`` with int8 weights (``has_fp16_weights=False``)."""

    @staticmethod
    def matches(obj: Any) -> bool:
        bnb = sys.modules.get("bitsandbytes.nn")
        return bnb is not None and isinstance(obj, bnb.Linear8bitLt) and obj.weight.dtype == torch.int8


def _torchao_tensor_types() -> tuple[type, ...]:
    if sys.modules.get("torchao") is None:  # never imported, or hidden (``sys.modules["torchao"] = None``)
        return ()
    from torchao.quantization import NF4Tensor
    from torchao.utils import TorchAOBaseTensor

    return (TorchAOBaseTensor, NF4Tensor)


class _TorchAOLinear(metaclass=_LazyTypeMeta):
    """Virtual type: an ``nn.Linear`` whose weight is a torchao tensor subclass (``NF4Tensor``,
    ``Int8Tensor``, ...); torchao keeps the module class and swaps the weight."""

    @staticmethod
    def matches(obj: Any) -> bool:
        types = _torchao_tensor_types()
        return bool(types) and isinstance(obj, nn.Linear) and isinstance(obj.weight, types)


# --- merge bookkeeping -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MergeError:
    """What the last requantization of one module cost.

    Attributes:
        max_abs: ``max |W_q - W_target|`` over the weight, where ``W_target = deq(W) + ΔW``.
        rms: root mean square of ``W_q - W_target``.
        rel_weight: ``||W_q - W_target||_F / ||W_target||_F``.
        rel_delta: ``||W_q - W_target||_F / ||ΔW||_F``: the requantization noise relative to the merged
            update; above ~1 the merged adapter's effect is mostly lost in the rounding.
        writes: requantizing writes currently live on the module (several merged adapters: the error of the
            whole is bounded by the sum of theirs; the fields describe the last one).
    """

    max_abs: float
    rms: float
    rel_weight: float
    rel_delta: float
    writes: int = 1


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """Per-module :class:`MergeError` of a model's quantized modules that currently hold merged weights."""

    modules: dict[str, MergeError]

    @property
    def max_abs(self) -> float:
        return max((e.max_abs for e in self.modules.values()), default=0.0)

    @property
    def max_rel_delta(self) -> float:
        return max((e.rel_delta for e in self.modules.values()), default=0.0)

    def __str__(self) -> str:
        if not self.modules:
            return "no quantized module holds a merged adapter (unmerged weights are the exact original codes)"
        head = f"{'module':<56} {'max |err|':>10} {'rms':>10} {'err/|W|':>9} {'err/|dW|':>9}"
        lines = [head, "-" * len(head)]
        for name, e in self.modules.items():
            lines.append(
                f"{name:<56} {e.max_abs:>10.3g} {e.rms:>10.3g} {e.rel_weight:>9.2e} {e.rel_delta:>9.3f}"
                + (f"  ({e.writes} writes)" if e.writes > 1 else "")
            )
        return "\n".join(lines)


@dataclasses.dataclass
class _Entry:
    key: tuple[Any, ...]  # fingerprint of the signed update alpha * delta
    before: Any  # the module's quantized state before this write (None: no longer valid)
    error: MergeError


@dataclasses.dataclass
class _Ledger:
    """Per-module history of requantizing writes; lives in ``module.__dict__`` while any is live."""

    original: Any
    entries: list[_Entry] = dataclasses.field(default_factory=list)


_LEDGER = "_adapterkit_quant_ledger"


def _fingerprint(x: torch.Tensor) -> tuple[Any, ...]:
    """Float64 sums of ``x`` (total, position-weighted over both axes, absolute): equal for bitwise-equal
    tensors, exactly negated (but the absolute sum) for ``-x``, and distinct for different updates in
    practice."""
    x64 = x.detach().double().reshape(x.shape[0], -1)
    rows = torch.arange(1, x64.shape[0] + 1, dtype=torch.float64, device=x.device)
    cols = torch.arange(1, x64.shape[1] + 1, dtype=torch.float64, device=x.device)
    return (
        tuple(x.shape),
        float(x64.sum()),
        float(rows @ x64.sum(dim=1)),
        float(x64.sum(dim=0) @ cols),
        float(x64.abs().sum()),
    )


def _negated(key: tuple[Any, ...]) -> tuple[Any, ...]:
    shape, total, by_row, by_col, absolute = key
    return (shape, -total, -by_row, -by_col, absolute)


@dataclasses.dataclass(frozen=True)
class QuantizedBackend(Backend):
    """A :class:`Backend` for quantized weights: ``read`` dequantizes (float32, canonical ``(out, in)``),
    ``add_``/``copy_`` requantize in the module's own format and keep the codes they replace so that
    unmerging restores them exactly (see the module docstring).

    Subclasses implement :meth:`dequantize`, :meth:`requantize`, :meth:`snapshot` and :meth:`restore`.
    """

    # -- storage-specific -------------------------------------------------------------------------------
    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The module's weight as a float32 ``(out, in)`` tensor."""
        raise NotImplementedError

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Replace the module's weight by ``weight`` (``(out, in)``) quantized like the current one,
        installing a new parameter (the old one stays untouched, so a snapshot may keep it)."""
        raise NotImplementedError

    def snapshot(self, module: nn.Module) -> Any:
        """Everything that :meth:`restore` needs to put the current quantized weight back bit-for-bit."""
        raise NotImplementedError

    def restore(self, module: nn.Module, state: Any) -> None:
        raise NotImplementedError

    # -- the Backend interface ----------------------------------------------------------------------------
    def read(self, module: nn.Module) -> torch.Tensor:
        """The dequantized weight (float32, a new tensor)."""
        return self.dequantize(module)

    def shape(self, module: nn.Module) -> tuple[int, ...]:
        """``(out, in)``: the shape of the dense weight this one was quantized from."""
        return module.out_features, module.in_features

    @torch.no_grad()
    def add_(self, module: nn.Module, delta: torch.Tensor, alpha: float = 1.0) -> None:
        """``W <- Q(deq(W) + alpha * delta)``, or the exact codes from before the write that this one
        undoes."""
        update = delta.detach().to(torch.float32) * alpha
        key = _fingerprint(update)
        ledger: _Ledger | None = module.__dict__.get(_LEDGER)
        undone = None
        if ledger is not None:
            undo_key = _negated(key)
            undone = next(
                (i for i in reversed(range(len(ledger.entries))) if ledger.entries[i].key == undo_key), None
            )
        if undone is not None:
            entry = ledger.entries.pop(undone)
            if not ledger.entries:  # nothing merged any more: the original codes
                self.restore(module, ledger.original)
                del module.__dict__[_LEDGER]
                return
            if undone == len(ledger.entries) and entry.before is not None:  # the last write: its snapshot
                self.restore(module, entry.before)
                return
            for later in ledger.entries[undone:]:  # their snapshots contain the update just removed
                later.before = None
            self._write(module, self.dequantize(module) + update, update)  # out of order: approximate
            return
        if ledger is None:
            ledger = module.__dict__[_LEDGER] = _Ledger(original=self.snapshot(module))
        before = self.snapshot(module)
        error = self._write(module, self.dequantize(module) + update, update)
        ledger.entries.append(_Entry(key, before, error))

    @torch.no_grad()
    def copy_(self, module: nn.Module, value: torch.Tensor) -> None:
        """``W <- Q(value)``; writing back exactly the dequantized original restores the original codes
        (PiSSA/OLoRA detach). Any other value starts the module's history over."""
        value = value.detach().to(torch.float32)
        ledger: _Ledger | None = module.__dict__.pop(_LEDGER, None)
        if ledger is not None:
            self.restore(module, ledger.original)
            original = self.dequantize(module)
            if value.shape == original.shape and torch.equal(value, original):
                return
        self.requantize(module, value)

    def _write(self, module: nn.Module, target: torch.Tensor, update: torch.Tensor) -> MergeError:
        self.requantize(module, target)
        err = self.dequantize(module) - target
        norm = err.norm().item()
        return MergeError(
            max_abs=err.abs().max().item(),
            rms=norm / math.sqrt(max(err.numel(), 1)),
            rel_weight=norm / max(target.norm().item(), 1e-30),
            rel_delta=norm / max(update.norm().item(), 1e-30),
        )


def _no_view(module: nn.Module) -> torch.Tensor:
    raise TypeError(f"{type(module).__name__} stores a quantized weight: it has no writable dense view")


def _linear_dims(module: nn.Module) -> tuple[int, int]:
    return module.in_features, module.out_features


# --- bitsandbytes ------------------------------------------------------------------------------------------
def _bnb_unpack_cpu(module: nn.Module) -> None:
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

        _bnb_unpack_cpu(module)
        w = module.weight
        return bnbF.dequantize_4bit(w.data, w.quant_state).to(torch.float32)

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        _bnb_unpack_cpu(module)
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
        _bnb_unpack_cpu(module)
        return module.weight, module.quant_state

    def restore(self, module: nn.Module, state: Any) -> None:
        module.weight, module.quant_state = state


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


# --- torchao -----------------------------------------------------------------------------------------------
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


register_backend(_Bnb4bitLinear, _Bnb4bitBackend("linear", _linear_dims, _no_view))
register_backend(_Bnb8bitLinear, _Bnb8bitBackend("linear", _linear_dims, _no_view))
register_backend(_TorchAOLinear, _TorchAOBackend("linear", _linear_dims, _no_view))


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized linear that adapterkit can read (and merge into)."""
    return isinstance(backend_for(module), QuantizedBackend)


# --- quantize -----------------------------------------------------------------------------------------------
def _require(backend: str) -> None:
    if importlib.util.find_spec(backend) is None:
        raise ImportError(
            f"backend={backend!r} needs the {backend} package: pip install '{_PIP[backend]}' "
            "(or pip install 'adapterkit[quant]')"
        )


def quantize(
    model: nn.Module,
    scheme: str = "nf4",
    backend: str = "bitsandbytes",
    *,
    targets: Sequence[Any] = ("all-linear",),
    exclude: Sequence[Any] = (),
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = True,
    blocksize: int = 64,
    int8_threshold: float = 6.0,
) -> nn.Module:
    """Quantize ``model``'s linear layers in place (output heads and already quantized layers excepted).

    Args:
        model: a dense model (quantize before adding adapters).
        scheme: ``"nf4"`` (4-bit NormalFloat, QLoRA §3) or ``"int8"`` (8-bit absmax per output row).
        backend: ``"bitsandbytes"`` (``Linear4bit`` / ``Linear8bitLt`` modules replace the ``nn.Linear``
            modules, under the same names) or ``"torchao"`` (the ``nn.Linear`` modules stay and their weights
            become ``NF4Tensor`` / ``Int8Tensor``).
        targets: which modules (selectors as in ``LoRA(targets=...)``); only plain ``nn.Linear`` modules
            among them are converted. Default: every linear layer except the output heads.
        exclude: selectors of modules to keep dense.
        compute_dtype: bitsandbytes NF4 only: dtype of the matmuls (None: the input's dtype, bf16 or fp32).
            torchao dequantizes to the input's dtype.
        double_quant: NF4: quantize the per-block scales too (QLoRA §3 "Double Quantization"; 8-bit scales
            in blocks of 256, saving ~0.37 bit per weight). torchao's NF4 always does.
        blocksize: NF4 block size (weights per absmax scale), 64 in QLoRA.
        int8_threshold: bitsandbytes int8: LLM.int8() outlier threshold of the inference matmul (the
            activations' columns above it run in 16 bits); 6.0 as in transformers.

    Returns:
        ``model`` (changed in place).

    Raises:
        ValueError: unknown scheme/backend, adapters already attached, or nothing to quantize.
        ImportError: the backend's package is not installed.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown quantization backend {backend!r}; use one of {', '.join(BACKENDS)}")
    _require(backend)
    if any(CONTAINER in m._modules for m in model.modules()):
        raise ValueError(
            "quantize() the base model before adding adapters: this model already carries adapters "
            "(delete them or call adapters.detach() first)"
        )
    from .profiles import profile_for

    family, roles = profile_for(model)
    names = select(model, list(targets), family=family, roles=roles, exclude=list(exclude))
    modules = base_modules(model)
    chosen = [n for n in names if type(modules[n]) is nn.Linear]
    if not chosen:
        raise ValueError(
            f"no plain nn.Linear module to quantize among the {len(names)} selected modules of "
            f"{type(model).__name__} (already quantized?)"
        )
    convert = {
        ("bitsandbytes", "nf4"): lambda lin: _bnb_nf4(lin, compute_dtype, double_quant, blocksize),
        ("bitsandbytes", "int8"): lambda lin: _bnb_int8(lin, int8_threshold),
        ("torchao", "nf4"): lambda lin: _torchao_nf4(lin, blocksize),
        ("torchao", "int8"): lambda lin: _torchao_int8(lin),
    }[(backend, scheme)]
    misfit = [n for n in chosen if modules[n].in_features % blocksize and modules[n].weight.device.type == "cpu"]
    if backend == "bitsandbytes" and scheme == "nf4" and misfit:
        warnings.warn(
            f"bitsandbytes dequantizes NF4 weights wrongly on CPU when in_features is not a multiple of "
            f"blocksize={blocksize} (bitsandbytes 0.50; {len(misfit)} layers, e.g. {misfit[0]!r}); their outputs will "
            "be off: exclude them or use backend='torchao'",
            stacklevel=2,
        )
    odd = [n for n in chosen if modules[n].weight.numel() % blocksize]
    if backend == "torchao" and scheme == "nf4" and odd:  # checked up front: nothing is converted then
        raise ValueError(
            f"torchao NF4 needs weights whose size divides by blocksize={blocksize}: {odd[:3]} do not; "
            "exclude them or pick another blocksize"
        )
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        new = convert(modules[name])
        if new is not modules[name]:
            setattr(modules[parent_name], child, new)
    if backend == "bitsandbytes":  # as transformers marks the models it loads, so peft and Trainer see them
        setattr(model, "is_loaded_in_4bit" if scheme == "nf4" else "is_loaded_in_8bit", True)
    return model


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


# --- dequantize -----------------------------------------------------------------------------------------------
def _dense_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain ``nn.Linear`` of ``dtype`` holding ``module``'s dequantized weight (frozen, like the base)."""
    weight = backend_for(module).read(module).to(dtype)
    dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    dense.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        dense.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return dense.train(module.training)


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized linear of ``model`` by a dense ``nn.Linear`` (in place).

    Args:
        dtype: dtype of the dense weights; None: the dtype the weights had before quantization
            (bitsandbytes NF4, torchao) or float16 (bitsandbytes int8, which quantizes via float16).

    Raises:
        ValueError: the model carries adapters (use ``adapters.merge_and_detach(dtype=...)``).
    """
    if any(CONTAINER in m._modules for m in model.modules()):
        raise ValueError(
            "dequantize() needs a model without adapters: use adapters.merge_and_detach(dtype=...) to merge "
            "them into a dense model, or adapters.detach() first"
        )
    modules = base_modules(model)
    for name, module in modules.items():
        if not is_quantized(module):
            continue
        to = dtype or _stored_dtype(module)
        if isinstance(module, _TorchAOLinear):
            weight = backend_for(module).read(module).to(to)
            module.weight = nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(to)
            module.__dict__.pop("extra_repr", None)  # set by torchao's quantize_
        else:
            parent, _, child = name.rpartition(".")
            setattr(modules[parent], child, _dense_linear(module, to))
        module.__dict__.pop(_LEDGER, None)
    if not any(is_quantized(m) for m in model.modules()):
        _unmark(model)
    return model


def _unmark(model: nn.Module) -> None:
    """Drop the marks of a quantized model (transformers' and ours) once nothing in it is quantized."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)


def _stored_dtype(module: nn.Module) -> torch.dtype:
    if isinstance(module, _Bnb4bitLinear):
        _bnb_unpack_cpu(module)
        return module.weight.quant_state.dtype
    if isinstance(module, _Bnb8bitLinear):
        return torch.float16
    return module.weight.dtype  # torchao tensors keep the original dtype


def merge_dense(ctl: Any, names: Sequence[str], dtype: torch.dtype) -> nn.Module:
    """``adapters.merge_and_detach(names, dtype=...)``: a dense model of ``dtype`` with ``names`` merged.

    Quantized layers are dequantized from their *original* codes (every adapter is unmerged first, exactly)
    into float32 where an adapter merges, the adapters are merged there in float32 (no requantization, so
    the only error is the base's own quantization), and every floating tensor is then cast to ``dtype``.
    """
    from .controller import Plan, attach

    comps = {n: ctl.components(n) for n in names}
    bad = [f"{n}:{m}" for n, cs in comps.items() for m, c in cs.items() if not c.mergeable]
    if bad:
        raise TypeError(f"cannot merge {bad[:3]}: those components are not mergeable")
    saved = {
        n: (
            ctl.config(n),
            ctl.sites(n),
            {m: {k: v.detach().clone() for k, v in c.export_state().items()} for m, c in cs.items()},
        )
        for n, cs in comps.items()
    }
    model = ctl.detach()  # unmerges everything: the original quantized codes
    merge_sites = {m for _, sites, _ in saved.values() for m in sites}
    modules = base_modules(model)
    for name, module in modules.items():
        if is_quantized(module):
            to = torch.float32 if name in merge_sites else dtype
            if isinstance(module, _TorchAOLinear):
                module.weight = nn.Parameter(backend_for(module).read(module).to(to), requires_grad=False)
                module.__dict__.pop("extra_repr", None)
            else:
                parent, _, child = name.rpartition(".")
                setattr(modules[parent], child, _dense_linear(module, to))
            module.__dict__.pop(_LEDGER, None)
    _unmark(model)
    dense = attach(model)
    modules = base_modules(model)
    for n, (cfg, sites, states) in saved.items():
        plan = dense.plan(cfg)
        planned = {m: kind for m, (kind, _) in plan.components.items()}
        if planned != sites:
            raise RuntimeError(
                f"adapter {n!r} resolves to other sites on the dequantized model: {planned} != {sites}"
            )
        for m, (_, comp) in plan.components.items():
            own = comp.state_dict()
            comp.import_state({k: v for k, v in states[m].items() if k in own}, modules[m])
        dense.install(n, Plan(plan.config, plan.components))
    model = dense.merge_and_detach(list(names))
    return model.to(dtype)


def merge_error(model: nn.Module) -> MergeReport:
    """What requantizing cost at each quantized module of ``model`` that currently holds merged weights."""
    out = {}
    for name, module in base_modules(model).items():
        ledger: _Ledger | None = module.__dict__.get(_LEDGER)
        if ledger is not None and ledger.entries:
            out[name] = dataclasses.replace(ledger.entries[-1].error, writes=len(ledger.entries))
    return MergeReport(out)


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
        if isinstance(module, _Bnb4bitLinear):
            module.support_avx512bf16_for_cpu = False
            _bnb_unpack_cpu(module)
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
