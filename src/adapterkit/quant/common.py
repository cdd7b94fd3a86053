r"""What every quantization backend shares: the merge ledger behind exact unmerges, the
:class:`QuantizedBackend` interface, lazy (import-free) module types, and the backend-independent entry
points (:func:`quantize` via the registered :class:`Quantizer`\ s, :func:`dequantize`, :func:`merge_error`).

Nothing here imports a quantization library or a backend module: ``quant/bnb.py`` and ``quant/ao.py`` import
this module and register themselves (``register_backend``, :func:`register_quantizer`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import warnings
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import nn

from ..backends import Backend, backend_for
from ..profiles import profile_for
from ..targeting import CONTAINER, base_modules, select

SCHEMES = ("nf4", "int8")


# --- virtual module types: matched by isinstance without importing the quantization libraries --------
class LazyTypeMeta(type):
    """``isinstance(m, T)`` asks ``T.matches(m)``; used to register backends for library types without
    importing the library (a module of a library that was never imported cannot exist). ``matches`` reads
    ``sys.modules.get(name)``, which is None both for a library never imported and for one hidden with
    ``sys.modules[name] = None`` (the CLI's quiet mode)."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return cls.matches(obj)


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


LEDGER = "_adapterkit_quant_ledger"


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

    # -- whole-module conversions (dequantize, merge_and_detach(dtype=...), prepare_for_kbit_training) ----------
    def stored_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype of the weights before quantization (what :func:`dequantize` restores by default)."""
        return module.weight.dtype

    def to_dense(self, module: nn.Module, dtype: torch.dtype) -> nn.Module:
        """A dense module of ``dtype`` computing what ``module`` computes: a new frozen ``nn.Linear`` by
        default; backends that keep the module class may convert ``module`` in place and return it."""
        return dense_linear(module, self.read(module).to(dtype), dtype)

    def prepare_for_training(self, module: nn.Module) -> None:
        """Undo what would keep ``module`` from training adapters (called by ``prepare_for_kbit_training``)."""

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
        ledger: _Ledger | None = module.__dict__.get(LEDGER)
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
                del module.__dict__[LEDGER]
                return
            if undone == len(ledger.entries) and entry.before is not None:  # the last write: its snapshot
                self.restore(module, entry.before)
                return
            for later in ledger.entries[undone:]:  # their snapshots contain the update just removed
                later.before = None
            self._write(module, self.dequantize(module) + update, update)  # out of order: approximate
            return
        if ledger is None:
            ledger = module.__dict__[LEDGER] = _Ledger(original=self.snapshot(module))
        before = self.snapshot(module)
        error = self._write(module, self.dequantize(module) + update, update)
        ledger.entries.append(_Entry(key, before, error))

    @torch.no_grad()
    def copy_(self, module: nn.Module, value: torch.Tensor) -> None:
        """``W <- Q(value)``; writing back exactly the dequantized original restores the original codes
        (PiSSA/OLoRA detach). Any other value starts the module's history over."""
        value = value.detach().to(torch.float32)
        ledger: _Ledger | None = module.__dict__.pop(LEDGER, None)
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


def no_view(module: nn.Module) -> torch.Tensor:
    raise TypeError(f"{type(module).__name__} stores a quantized weight: it has no writable dense view")


def linear_dims(module: nn.Module) -> tuple[int, int]:
    return module.in_features, module.out_features


def dense_linear(module: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """A plain ``nn.Linear`` of ``dtype`` holding ``weight`` and ``module``'s bias (frozen, like the base)."""
    dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    dense.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if module.bias is not None:
        dense.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return dense.train(module.training)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized linear that adapterkit can read (and merge into)."""
    return isinstance(backend_for(module), QuantizedBackend)


# --- quantize -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Quantizer:
    """How :func:`quantize` converts ``nn.Linear`` modules with one library (one per backend module).

    Attributes:
        pip: the requirement to install when the package is missing.
        convert: ``(linear, scheme, options) -> module`` (a new module, or ``linear`` changed in place);
            ``options``: ``compute_dtype``, ``double_quant``, ``blocksize``, ``int8_threshold``.
        check: ``(modules, chosen, scheme, blocksize) -> warnings``, run before anything is converted: raises
            for what cannot be converted, returns messages about what will be off (``quantize`` warns them).
        mark: ``(model, scheme)`` after the conversion (e.g. transformers' ``is_loaded_in_4bit``).
    """

    pip: str
    convert: Callable[[nn.Linear, str, dict[str, Any]], nn.Module]
    check: Callable[[dict[str, nn.Module], list[str], str, int], list[str]] | None = None
    mark: Callable[[nn.Module, str], None] | None = None


QUANTIZERS: dict[str, Quantizer] = {}  # backend name (= its package's import name) -> quantizer


def register_quantizer(name: str, quantizer: Quantizer) -> None:
    QUANTIZERS[name] = quantizer


def _require(backend: str) -> None:
    if importlib.util.find_spec(backend) is None:
        raise ImportError(
            f"backend={backend!r} needs the {backend} package: pip install '{QUANTIZERS[backend].pip}' "
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
    if backend not in QUANTIZERS:
        raise ValueError(f"unknown quantization backend {backend!r}; use one of {', '.join(sorted(QUANTIZERS))}")
    quantizer = QUANTIZERS[backend]
    _require(backend)
    if any(CONTAINER in m._modules for m in model.modules()):
        raise ValueError(
            "quantize() the base model before adding adapters: this model already carries adapters "
            "(delete them or call adapters.detach() first)"
        )
    family, roles = profile_for(model)
    names = select(model, list(targets), family=family, roles=roles, exclude=list(exclude))
    modules = base_modules(model)
    chosen = [n for n in names if type(modules[n]) is nn.Linear]
    if not chosen:
        raise ValueError(
            f"no plain nn.Linear module to quantize among the {len(names)} selected modules of "
            f"{type(model).__name__} (already quantized?)"
        )
    for message in quantizer.check(modules, chosen, scheme, blocksize) if quantizer.check else ():
        warnings.warn(message, stacklevel=2)
    options = {
        "compute_dtype": compute_dtype,
        "double_quant": double_quant,
        "blocksize": blocksize,
        "int8_threshold": int8_threshold,
    }
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        new = quantizer.convert(modules[name], scheme, options)
        if new is not modules[name]:
            setattr(modules[parent_name], child, new)
    if quantizer.mark is not None:
        quantizer.mark(model, scheme)
    return model


# --- dequantize -----------------------------------------------------------------------------------------------
def _to_dense(model: nn.Module, dtype_of: Callable[[str, nn.Module, QuantizedBackend], torch.dtype]) -> None:
    modules = base_modules(model)
    for name, module in modules.items():
        backend = backend_for(module)
        if not isinstance(backend, QuantizedBackend):
            continue
        dense = backend.to_dense(module, dtype_of(name, module, backend))
        if dense is not module:
            parent, _, child = name.rpartition(".")
            setattr(modules[parent], child, dense)
        module.__dict__.pop(LEDGER, None)


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
    _to_dense(model, lambda name, module, backend: dtype or backend.stored_dtype(module))
    if not any(is_quantized(m) for m in model.modules()):
        _unmark(model)
    return model


def dequantize_for_merge(model: nn.Module, merge_sites: Collection[str], dtype: torch.dtype) -> nn.Module:
    """For ``adapters.merge_and_detach(dtype=...)`` (after ``detach()``, so from the original codes): every
    quantized linear becomes dense, in float32 at ``merge_sites`` (where adapters will merge, without
    requantization) and in ``dtype`` elsewhere; the model's quantization marks are dropped."""
    _to_dense(model, lambda name, module, backend: torch.float32 if name in merge_sites else dtype)
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


def merge_error(model: nn.Module) -> MergeReport:
    """What requantizing cost at each quantized module of ``model`` that currently holds merged weights."""
    out = {}
    for name, module in base_modules(model).items():
        ledger: _Ledger | None = module.__dict__.get(LEDGER)
        if ledger is not None and ledger.entries:
            out[name] = dataclasses.replace(ledger.entries[-1].error, writes=len(ledger.entries))
    return MergeReport(out)
