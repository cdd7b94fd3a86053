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

Layout (imports point downward; nothing here imports the controller, and ``import adapterkit`` imports
neither bitsandbytes nor torchao: backends match their module types lazily through ``sys.modules``):

* ``common.py``: the merge ledger, :class:`QuantizedBackend`, lazy types, and the backend-independent
  :func:`quantize` / :func:`dequantize` / :func:`merge_error` (backends register a ``Quantizer``);
* ``bnb.py`` (bitsandbytes) and ``ao.py`` (torchao): one module per backend, each registering itself;
* ``training.py``: :func:`prepare_for_kbit_training`.

The controller calls down into this package (``merge_and_detach(dtype=...)`` uses
:func:`~adapterkit.quant.common.dequantize_for_merge`); a new backend is one more module imported here.
"""

from __future__ import annotations

from . import ao, bnb  # noqa: F401  (each registers its backend and quantizer)
from .common import (
    QUANTIZERS,
    MergeError,
    MergeReport,
    QuantizedBackend,
    dequantize,
    is_quantized,
    merge_error,
    quantize,
)
from .common import (
    SCHEMES as SCHEMES,
)
from .common import (
    Quantizer as Quantizer,
)
from .common import (
    register_quantizer as register_quantizer,
)
from .training import prepare_for_kbit_training

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

BACKENDS = tuple(sorted(QUANTIZERS))
