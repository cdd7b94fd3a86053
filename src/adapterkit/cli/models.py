"""Loading base models and tokenizers for a task, and the ``run.json`` a training run leaves behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TASKS", "RUN_FILE", "guess_task", "load_tokenizer", "load_model", "read_run", "model_class", "check_adapter_size",
    "add_adapter", "load_adapter", "DTYPES", "prequantized", "reveal_quantization_libraries", "quantize_base",
    "check_packing",
]  # fmt: skip

TASKS = ("classify", "causal-lm", "seq2seq")
RUN_FILE = "run.json"


class ModelError(ValueError):
    """A model path, task or architecture problem; the message names what to change."""


QUANT_ENV = "ADAPTERKIT_QUANT_LIBS"
QUANT_LIBRARIES = ("bitsandbytes", "torchao")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def hide_quantization_libraries() -> None:
    """Keep transformers (and peft) from importing bitsandbytes and torchao in this CLI process.

    transformers imports every installed quantization library while it loads its Trainer and model code,
    and they print warnings on a machine without their kernels (torchao's "Could not load this library",
    torch pytree deprecations, bitsandbytes' "Failed to load CPU gemm_4bit_forward"). The CLI trains and
    evaluates full-precision bases, so it hides them (``sys.modules[name] = None``: they read as not installed)
    unless ``ADAPTERKIT_QUANT_LIBS=1``. A pre-quantized checkpoint is then refused by :func:`load_model` with
    a message naming that variable. Libraries already imported stay as they are.
    """
    import sys

    if os.environ.get(QUANT_ENV, "") not in ("", "0"):
        return
    for name in QUANT_LIBRARIES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def prequantized(path: str | os.PathLike) -> str | None:
    """The ``quant_method`` of a checkpoint saved already quantized (its config.json has a
    ``quantization_config``), else None."""
    file = Path(path) / "config.json"
    try:
        quant = json.loads(file.read_text()).get("quantization_config") if file.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    if not quant:
        return None
    return str(quant.get("quant_method", "?")) if isinstance(quant, dict) else "?"


def reveal_quantization_libraries(names: tuple[str, ...] = QUANT_LIBRARIES) -> None:
    """Undo :func:`hide_quantization_libraries` for ``names`` (a quantized base is about to be used: ``--quantize``,
    or a checkpoint saved already quantized). transformers' cached "is bitsandbytes/torchao available" answers are
    cleared so that it sees them."""
    import sys

    revealed = False
    for name in names:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]
            revealed = True
    iu = sys.modules.get("transformers.utils.import_utils")
    if revealed and iu is not None:
        for fn in ("is_bitsandbytes_available", "is_torchao_available"):
            clear = getattr(getattr(iu, fn, None), "cache_clear", None)
            if callable(clear):
                clear()


def _reveal_for(path: str | os.PathLike) -> None:
    """A checkpoint saved quantized needs its library: reveal the hidden ones (see :func:`hide_quantization_libraries`)."""
    method = prequantized(path)
    if method:
        reveal_quantization_libraries(tuple(n for n in QUANT_LIBRARIES if n == method) or QUANT_LIBRARIES)


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()  # "some weights were newly initialized": expected for a new head
    logging.disable_progress_bar()


def model_config(path: str | os.PathLike) -> Any:
    from transformers import AutoConfig

    _reveal_for(path)
    _quiet_transformers()
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a model config from {str(path)!r}: {str(e).splitlines()[0]}") from None


def guess_task(config: Any) -> str | None:
    """The task a checkpoint was saved for, from its ``architectures`` (None when it does not say)."""
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith(("ForSequenceClassification",)):
            return "classify"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")) and getattr(
            config, "is_encoder_decoder", False
        ):
            return "seq2seq"
    return None


def model_class(task: str | None) -> Any:
    import transformers as tf

    return {
        "classify": tf.AutoModelForSequenceClassification,
        "causal-lm": tf.AutoModelForCausalLM,
        "seq2seq": tf.AutoModelForSeq2SeqLM,
        None: tf.AutoModel,
    }[task]


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The checkpoint's tokenizer, with a pad token (EOS, or [SEP] for BERT-style vocabularies) if it has none."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"cannot load a tokenizer from {str(path)!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.sep_token
    return tok


def load_model(path: str | os.PathLike, task: str, *, labels: list[str] | None = None, regression: bool = False,
               pad_token_id: int | None = None, seed: int = 42, dtype: torch.dtype | None = None) -> torch.nn.Module:  # fmt: skip
    """The base model for ``task``; classification gets a fresh head of ``len(labels)`` outputs (1 for
    regression), initialized from ``seed`` so that every process of a distributed run starts the same.
    ``dtype``: the base weights' dtype (None: the checkpoint's). A checkpoint saved already quantized
    (``quantization_config`` in its config.json) loads quantized, on the CPU unless a GPU is there."""
    _reveal_for(path)
    _quiet_transformers()
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if task == "classify":
        names = labels or ["0", "1"]
        # a checkpoint saved with another number of labels gets a new head of the right size
        kwargs.update(num_labels=1 if regression else len(names), ignore_mismatched_sizes=True)
        if regression:
            kwargs["problem_type"] = "regression"
        else:
            kwargs.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    if prequantized(path) and torch.cuda.is_available():
        kwargs.setdefault("device_map", {"": torch.cuda.current_device()})
    torch.manual_seed(seed)
    try:
        model = model_class(task).from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(
            f"cannot load {str(path)!r} as a {task} model: {str(e).splitlines()[0]}; check --model and --task"
        ) from None
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id  # sequence classification on decoders finds the last token by it
    return model


def check_output_directory(out: Path) -> None:
    """Refuse an ``--out`` that cannot become a directory (checked before anything is loaded or written)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OSError(f"--out {str(out)!r} is an existing file, not a directory: pass a directory path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OSError(f"--out {str(out)!r}: {str(parent)!r} is a file, not a directory")
            break


def read_run(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``run.json`` of a training output directory ({} when absent)."""
    p = Path(directory) / RUN_FILE
    if not p.is_file():
        return {}
    return json.loads(p.read_text())


def _memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


def _large_options(config: Any) -> str:
    """The config's integer options of 100,000 or more (``r=1000000000``), to name in a message."""
    import dataclasses

    found = [
        f"{f.name}={getattr(config, f.name)}"
        for f in dataclasses.fields(config)
        if isinstance(getattr(config, f.name), int) and not isinstance(getattr(config, f.name), bool)
        and getattr(config, f.name) >= 100_000
    ]  # fmt: skip
    for part in getattr(config, "configs", ()) or ():  # a union's members
        if dataclasses.is_dataclass(part):
            inner = _large_options(part)
            if inner:
                found.append(f"{part.method}: {inner}")
    return ", ".join(found)


def check_adapter_size(path: str | os.PathLike, task: str | None, config: Any, *, source: str) -> None:
    """Refuse an adapter config whose tensors would not fit in this machine's memory (an absurd rank or size),
    before anything is allocated: the adapter is planned on a ``meta``-device copy of the model (no memory).
    ``source`` names where the config came from (``--opt``, an adapter_config.json). Configs the meta copy
    cannot plan are left to the real build."""
    import adapterkit as ak

    limit = _memory_bytes()
    if limit is None:
        return
    try:
        cfg = model_config(path)
        with torch.device("meta"):
            meta = model_class(task).from_config(cfg)
        n = ak.attach(meta).plan(config).num_params
    except Exception:  # noqa: BLE001 - only a pre-check: the real build reports its own errors
        return
    if n * 4 > limit:
        big = _large_options(config)
        raise ModelError(
            f"the {config.method} adapter ({source}) would have {n:,} parameters ({n * 4 / 2**30:,.0f} GiB in "
            f"float32), more than this machine's memory ({limit / 2**30:,.0f} GiB)"
            + (f": {big} is far too large" if big else "")
            + "; lower the adapter's size options (r, reduction_factor, num_virtual_tokens, ...)"
        )


def _build_error(e: BaseException, method: str, source: str) -> ModelError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ModelError(
        f"building the {method} adapter ({source}) failed: {first}; lower the adapter's size options "
        "(r, reduction_factor, num_virtual_tokens, ...) or free memory"
    )


def _allocation_failed(e: BaseException) -> bool:
    text = str(e).lower()
    return (
        isinstance(e, MemoryError)
        or "out of memory" in text
        or "can't allocate" in text
        or "tried to allocate" in text
    )


def add_adapter(adapters: Any, name: str, method: str, *, source: str, **overrides: Any) -> None:
    """``adapters.add`` with allocation failures (out of memory) reported as a :class:`ModelError`."""
    try:
        adapters.add(name, method, **overrides)
    except (RuntimeError, MemoryError) as e:
        if not _allocation_failed(e):
            raise
        raise _build_error(e, method, source) from None


def load_adapter(adapters: Any, directory: str | os.PathLike, *, method: str, **kwargs: Any) -> str:
    """``adapters.load`` with allocation failures (out of memory) reported as a :class:`ModelError`."""
    try:
        return adapters.load(directory, **kwargs)
    except (RuntimeError, MemoryError) as e:
        if not _allocation_failed(e):
            raise
        raise _build_error(e, method, f"in {str(directory)!r}") from None


def quantize_base(model: torch.nn.Module, scheme: str, backend: str = "bitsandbytes", *,
                  path: str | os.PathLike = "") -> torch.nn.Module:  # fmt: skip
    """``train --quantize``: ``ak.quantize`` the base's linear layers (output heads kept dense) in place, QLoRA
    style (NF4 with double quantization, or int8). Refuses a checkpoint saved already quantized."""
    import adapterkit as ak

    if getattr(model, "is_quantized", False) or prequantized(path):
        raise ModelError(
            f"{str(path)!r} was saved already quantized ({prequantized(path) or 'quantized'}): drop --quantize, it "
            "loads quantized as it is"
        )
    reveal_quantization_libraries((backend,) if backend in QUANT_LIBRARIES else QUANT_LIBRARIES)
    return ak.quantize(model, scheme, backend)


def check_packing(model: torch.nn.Module) -> None:
    """Refuse ``--packing`` on a model whose attention does not keep packed examples apart.

    Packed rows carry no attention mask, only position ids restarting per example (see ``data.pack``); models
    whose masks come from transformers' ``masking_utils`` turn them into a block-diagonal causal mask. This
    probe packs two short sequences into one row and compares the logits with the sequences run alone.
    """
    vocab = int(getattr(model.get_input_embeddings(), "num_embeddings", 0) or 0)
    if vocab < 4:
        return
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(1, vocab, (1, n), generator=g).to(device) for n in (3, 4))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False).logits.float()
            alone = model(input_ids=b, use_cache=False).logits.float()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ModelError(
            f"--packing needs a model that takes position_ids; {type(model).__name__} failed: {str(e).splitlines()[0]}"
        ) from None
    finally:
        model.train(was_training)
    gap = (packed[:, 3:] - alone).abs().max().item()
    scale = alone.abs().max().item() or 1.0
    if not gap <= 1e-2 * scale + 1e-3:
        raise ModelError(
            f"--packing: {type(model).__name__} lets packed examples attend to each other (it does not build its "
            f"attention mask from position ids; logits differ by {gap:.3g}): train without --packing"
        )
