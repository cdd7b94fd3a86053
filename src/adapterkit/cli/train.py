"""Trainer glue: Hugging Face ``Trainer`` training an adapterkit adapter, checkpointing only the adapter.

The loop is ``transformers.Trainer``'s (progress bar, evaluation and checkpoint each epoch or every
``--eval-steps``, best-checkpoint keeping, resuming with optimizer, scheduler and RNG state). What changes:

* checkpoints hold the adapter in the native format (``adapter_config.json`` + ``adapter.safetensors``,
  the head copy included), not the base model; resuming and loading the best checkpoint read it back into
  the live components. Where a component saves something other than its trainable parameters (prefix
  tuning with ``prefix_projection`` saves the computed prefix, not the MLP that makes it), the checkpoint
  also holds those parameters as trained (``training_state.safetensors``), and resuming and best-checkpoint
  reloads restore them from it (the optimizer state refers to them);
* distributed data parallel on CPU uses gloo (``use_cpu`` + ``ddp_backend="gloo"``): without them each
  process would train alone;
* ``adapterkit.trainer.AdapterCallback`` is installed: ``adapters.step()`` after every optimizer step and the
  adapters' auxiliary losses added to the training loss (methods that act during training: AdaLoRA, DyLoRA);
* ``--fsdp`` shards every transformer block and then the root with FSDP2 (``fully_shard``) before training.
  accelerate only enables FSDP on accelerators, so the model is sharded here and the Trainer is told the
  model handles its own gradient reduction (``is_distributed_loading_by_transformers``, the flag transformers
  uses for models sharded at load time). Adapter tensors are gathered (``full_tensor``) to be saved, and the
  optimizer state is checkpointed as a full state dict (``torch.distributed.checkpoint.state_dict``).

LLM fine-tuning options (alpaca-lora / TRL SFTTrainer style):

* QLoRA: ``--quantize nf4|int8`` quantizes the base with ``ak.quantize`` (bitsandbytes by default,
  ``--quant-backend torchao``) and prepares it with ``ak.prepare_for_kbit_training``; ``--dtype bf16|fp16|fp32``
  loads the base weights in that dtype (adapter parameters stay float32 on a half-precision base, as peft's
  ``autocast_adapter_dtype``); ``--gradient-checkpointing``. A checkpoint saved already quantized (by
  transformers, ``quantization_config`` in its config.json) loads as it is: transformers' Trainer refuses a
  quantized model unless peft adapters are attached (``validate_quantization_for_training`` reads peft's
  ``_hf_peft_config_loaded`` flag), so :class:`AdapterTrainer` sets that flag while the Trainer is built when the
  model carries trainable adapterkit adapters.
* chat data (``messages``) with the chat template and loss on assistant turns (``data.ChatRenderer``);
  examples whose response tokens ``--max-length`` cuts away entirely are dropped with a warning (an error
  with ``--strict``);
* ``--packing`` (``data.pack``), ``--group-by-length``, ``--optim adamw|adamw_8bit|adafactor``,
  ``--early-stopping N``, ``--report-to none|tensorboard|wandb``, ``--fp16``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import adapterkit as ak
from adapterkit.component import Component
from adapterkit.formats.io import read_tensors
from adapterkit.targeting import base_modules

__all__ = ["AdapterTrainer", "compute_metrics_for", "best_metric", "last_checkpoint", "shard_fsdp2", "world_size"]

CHECKPOINTS = "checkpoints"
TRAINING_STATE = "training_state"  # checkpoints: trainable tensors the native save leaves out


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def best_metric(task: str, regression: bool) -> tuple[str, bool]:
    """(metric name, greater is better) used to keep the best checkpoint."""
    if task == "classify":
        return ("pearson", True) if regression else ("accuracy", True)
    return ("loss", False)


# --- metrics -------------------------------------------------------------------------------------------
def compute_metrics_for(task: str, regression: bool, num_labels: int) -> Any:
    """The ``compute_metrics`` function for ``task``: accuracy (+F1 for two classes), Pearson/MSE for
    regression, next-token (causal) or target-token (seq2seq) accuracy for generation tasks."""

    def classify(pred: Any) -> dict[str, float]:
        logits, labels = _first(pred.predictions), np.asarray(pred.label_ids)
        if regression:
            p = np.asarray(logits).reshape(-1).astype(np.float64)
            y = labels.reshape(-1).astype(np.float64)
            r = float(np.corrcoef(p, y)[0, 1]) if p.std() > 0 and y.std() > 0 else 0.0
            return {"pearson": r, "mse": float(np.mean((p - y) ** 2))}
        guess = np.asarray(logits).argmax(-1)
        out = {"accuracy": float((guess == labels).mean())}
        if num_labels == 2:
            tp = float(((guess == 1) & (labels == 1)).sum())
            fp, fn = float(((guess == 1) & (labels != 1)).sum()), float(((guess != 1) & (labels == 1)).sum())
            out["f1"] = 2 * tp / max(2 * tp + fp + fn, 1.0)
        return out

    def tokens(pred: Any) -> dict[str, float]:
        guess, labels = np.asarray(_first(pred.predictions)), np.asarray(pred.label_ids)
        if task == "causal-lm":  # position t predicts token t+1
            guess, labels = guess[:, :-1], labels[:, 1:]
        n = min(guess.shape[1], labels.shape[1])
        guess, labels = guess[:, :n], labels[:, :n]
        mask = labels != -100
        return {"accuracy": float((guess[mask] == labels[mask]).mean()) if mask.any() else 0.0}

    return classify if task == "classify" else tokens


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (tuple, list)) else x


def argmax_logits(logits: Any, labels: Any) -> torch.Tensor:
    """``preprocess_logits_for_metrics``: keep token ids, not (batch, seq, vocab) logits."""
    return _first(logits).argmax(-1)


# --- FSDP2 ---------------------------------------------------------------------------------------------
def shard_fsdp2(model: nn.Module, device: torch.device) -> int:
    """Shard ``model`` with FSDP2: each transformer block (the classes in ``_no_split_modules``), then the
    root. Adapter components live inside the modules they act on, so they are sharded with their block.
    Returns the number of sharded blocks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    block_types = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for n, m in base_modules(model).items() if n and type(m).__name__ in block_types]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(blocks)


def _reshard(model: nn.Module) -> bool:
    """Put FSDP2 modules' registered parameters back to their sharded DTensors (the root stays unsharded after
    an evaluation). Returns whether the model is FSDP2-sharded at all."""
    from torch.distributed.fsdp import FSDPModule

    sharded = False
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
            sharded = True
    return sharded


@contextmanager
def full_adapter_params(adapters: ak.Adapters, name: str) -> Iterator[None]:
    """Within the block, adapter ``name``'s FSDP2-sharded parameters are plain full tensors (gathered on every
    rank: call it on all ranks). Without FSDP2 this does nothing."""
    from torch.distributed.tensor import DTensor

    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    if _reshard(adapters.model):
        with torch.no_grad():
            for comp in adapters.components(name).values():
                for mod in comp.modules():
                    for key, p in list(mod._parameters.items()):
                        if isinstance(p, DTensor):
                            mod._parameters[key] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                            swapped.append((mod, key, p))
    try:
        yield
    finally:
        for mod, key, sharded in swapped:
            mod._parameters[key] = sharded


def _copy_into_shards(comp: nn.Module, state: dict[str, torch.Tensor], site: str) -> None:
    """Copy full tensors into a component whose parameters are FSDP2 shards (each rank keeps its slice)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = dict(comp.named_parameters())
    own.update(comp.named_buffers())
    if set(own) != set(state):
        raise ValueError(
            f"checkpoint tensors for {site!r} do not match the adapter: {sorted(set(own) ^ set(state))}"
        )
    with torch.no_grad():
        for k, p in own.items():
            t = state[k].to(p.dtype)
            if isinstance(p, DTensor):
                p.copy_(distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None))
            else:
                p.copy_(t)


def _site_state(tensors: dict[str, torch.Tensor], site: str) -> dict[str, torch.Tensor]:
    prefix = site + "."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def import_adapter_weights(adapters: ak.Adapters, name: str, directory: str | os.PathLike) -> None:
    """Load a checkpoint of adapter ``name`` into its existing components: each component's trainable state
    from ``training_state.safetensors`` when the checkpoint has it for that component, else what the native
    ``adapter.safetensors`` holds (read back with the component's ``import_state``)."""
    directory = Path(directory)
    tensors = read_tensors(directory, "adapter")
    raw = (
        read_tensors(directory, TRAINING_STATE) if (directory / f"{TRAINING_STATE}.safetensors").is_file() else {}
    )
    modules = base_modules(adapters.model)
    sharded = _reshard(adapters.model)
    for site, comp in adapters.components(name).items():
        state = _site_state(raw, site)
        if state:  # the parameters as trained: load them exactly (whatever the component saves natively)
            if sharded:
                _copy_into_shards(comp, state, site)
            else:
                try:
                    Component.import_state(comp, state, modules[site])
                except ValueError as e:
                    raise ValueError(
                        f"checkpoint {str(directory)!r} does not fit adapter site {site!r}: {e}"
                    ) from None
            continue
        own = comp.state_dict() if sharded else comp.export_state()
        state = {k: v for k, v in _site_state(tensors, site).items() if k in own}
        if sharded:
            _copy_into_shards(comp, state, site)
        else:
            try:
                comp.import_state(state, modules[site])
            except ValueError as e:
                raise ValueError(
                    f"checkpoint {str(directory)!r} does not fit adapter site {site!r}: {e}"
                ) from None


def _training_state(adapters: ak.Adapters, name: str) -> dict[str, torch.Tensor]:
    """``site.key -> tensor``: the full state of every component whose native save differs from it (other
    keys or other values, e.g. a prefix MLP saved as the prefix it computes)."""
    out: dict[str, torch.Tensor] = {}
    for site, comp in adapters.components(name).items():
        foreign = comp._foreign_bank_keys()  # a Bank shared by every site is saved by its owner only
        own = {k: v for k, v in comp.state_dict().items() if k not in foreign}
        saved = comp.export_state()
        if set(own) != set(saved) or any(not torch.equal(own[k], saved[k]) for k in own):
            out.update({f"{site}.{k}": v for k, v in own.items()})
    return out


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file under a temp name, then rename it into place."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"}
        )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_adapter(adapters: ak.Adapters, name: str, directory: str | os.PathLike, *, write: bool,
                 checkpoint: bool = False) -> None:  # fmt: skip
    """Save adapter ``name`` natively (every rank must call it under FSDP2; only ``write`` ranks write).
    A ``checkpoint`` also gets the trainable state that the native save leaves out (``training_state``)."""
    with full_adapter_params(adapters, name):
        if write:
            if checkpoint:
                raw = _training_state(adapters, name)
                if raw:
                    _save_tensors(Path(directory) / f"{TRAINING_STATE}.safetensors", raw)
            adapters.save(name, directory)


def _complete(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was written to the end: its JSON files parse (the trainer state is written last)
    and its tensor files have a readable header."""
    import json

    from safetensors import safe_open

    try:
        for name in ("trainer_state.json", "adapter_config.json"):
            if not isinstance(json.loads((checkpoint / name).read_text()), dict):
                return False
        for name in ("adapter.safetensors", f"{TRAINING_STATE}.safetensors"):
            if name == "adapter.safetensors" or (checkpoint / name).exists():
                with safe_open(str(checkpoint / name), "pt") as f:
                    f.keys()
    except Exception:  # OSError, JSONDecodeError, UnicodeDecodeError, safetensors' SafetensorError
        return False
    return True


def last_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``directory`` (see :func:`_complete`); an interrupted save of a
    later one is skipped."""
    d = Path(directory)
    if not d.is_dir():
        return None
    found = []
    for c in d.glob("checkpoint-*"):
        step = c.name.rsplit("-", 1)[-1]
        if step.isdigit():
            found.append((int(step), c))
    for _, c in sorted(found, reverse=True):
        if _complete(c):
            return c
    return None


# --- the Trainer -----------------------------------------------------------------------------------------
def _trainer_base() -> type:
    from transformers import Trainer

    return Trainer


class AdapterTrainer(_trainer_base()):  # type: ignore[misc]
    """``transformers.Trainer`` whose checkpoints hold adapter ``adapter_name`` only (native format)."""

    def __init__(self, *args: Any, adapters: ak.Adapters, adapter_name: str, fsdp: bool = False, **kwargs: Any):
        model = kwargs.get("model", args[0] if args else None)
        # transformers refuses to train a model it quantized unless peft adapters are attached (it reads peft's
        # flag, validate_quantization_for_training): adapterkit's adapters are attached, so raise the flag while
        # the Trainer checks (only then: the flag also changes what save_pretrained writes)
        flag = "_hf_peft_config_loaded"
        mark = (
            model is not None
            and getattr(model, "is_quantized", False)
            and not getattr(model, flag, False)
            and any(p.requires_grad for p in adapters.parameters(adapter_name))
        )
        if mark:
            setattr(model, flag, True)
        try:
            super().__init__(*args, **kwargs)
        finally:
            if mark:
                setattr(model, flag, False)
        self.adapters = adapters
        self.adapter_name = adapter_name
        self.fsdp2 = fsdp

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        save_adapter(self.adapters, self.adapter_name, output_dir, write=self.args.should_save, checkpoint=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        try:
            import_adapter_weights(self.adapters, self.adapter_name, resume_from_checkpoint)
        except ValueError as e:
            raise ValueError(
                f"cannot resume: {e}; the run that wrote it used other options or data (method, --opt, --targets, "
                "number of labels): resume with the same ones, or pass --overwrite instead of --resume to start over"
            ) from None

    def _load_best_model(self) -> None:
        import_adapter_weights(self.adapters, self.adapter_name, self.state.best_model_checkpoint)

    # Under FSDP2 the optimizer state holds sharded tensors: checkpoint it as one full state dict.
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.fsdp2:
            return super()._save_optimizer_and_scheduler(output_dir)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.args.should_save:
            torch.save(full, os.path.join(output_dir, "optimizer.pt"))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self.fsdp2 or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        full = torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location="cpu", weights_only=True)
        set_optimizer_state_dict(
            self.model, self.optimizer, optim_state_dict=full, options=StateDictOptions(full_state_dict=True)
        )
        self.lr_scheduler.load_state_dict(
            torch.load(os.path.join(checkpoint, "scheduler.pt"), map_location="cpu", weights_only=True)
        )


def history(log_history: list[dict[str, Any]], task: str) -> dict[str, list[dict[str, Any]]]:
    """Split the Trainer's log history into training-loss points and evaluation points (with perplexity for
    generation tasks)."""
    train, evals = [], []
    for entry in log_history:
        if "loss" in entry and "eval_loss" not in entry:
            train.append(
                {k: entry[k] for k in ("step", "epoch", "loss", "learning_rate", "grad_norm") if k in entry}
            )
        elif any(k.startswith("eval_") for k in entry):
            point = {"step": entry.get("step"), "epoch": entry.get("epoch")}
            point.update(
                {
                    k[5:]: v
                    for k, v in entry.items()
                    if k.startswith("eval_") and not k.endswith(("_per_second", "runtime", "_time"))
                }
            )
            if task != "classify" and isinstance(point.get("loss"), float) and point["loss"] < 50:
                point.setdefault("perplexity", math.exp(point["loss"]))
            evals.append(point)
    return {"train": train, "eval": evals}


# --- the `train` command -----------------------------------------------------------------------------------
def _say(*lines: str) -> None:
    if rank() == 0:
        for line in lines:
            print(line, flush=True)


def ddp_backend(use_cpu: bool, world: int) -> str | None:
    """The process-group backend of a ``torchrun`` launch: gloo on CPU, NCCL on CUDA, none for one process."""
    if world <= 1:
        return None
    return "gloo" if use_cpu else "nccl"


OPTIMIZERS = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "adafactor": "adafactor"}
REPORTERS = {"none": None, "tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def _reporting(o: dict[str, Any]) -> list[str]:
    """``--report-to``: [] or the one integration, refused with the install command when its package is missing."""
    import importlib.util

    which = o.get("report_to") or "none"
    if which not in REPORTERS:
        raise ValueError(f"--report-to {which!r}: use one of {', '.join(REPORTERS)}")
    packages = REPORTERS[which]
    if packages is None:
        return []
    if not any(importlib.util.find_spec(p) is not None for p in packages):
        raise ImportError(f"--report-to {which} needs the {packages[0]} package: pip install {packages[0]}")
    return [which]


def _optimizer(o: dict[str, Any]) -> str:
    """``--optim``: the Trainer's optimizer name (adamw_8bit needs bitsandbytes, made visible to transformers)."""
    which = o.get("optim") or "adamw"
    if which not in OPTIMIZERS:
        raise ValueError(f"--optim {which!r}: use one of {', '.join(OPTIMIZERS)}")
    if which != "adamw" and o.get("loraplus_ratio"):
        raise ValueError("--loraplus-ratio builds its own AdamW: drop --optim or --loraplus-ratio")
    if which == "adamw_8bit":
        import importlib.util

        from .models import reveal_quantization_libraries

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError("--optim adamw_8bit needs bitsandbytes: pip install bitsandbytes")
        reveal_quantization_libraries(("bitsandbytes",))
    return OPTIMIZERS[which]


def _training_args(o: dict[str, Any], out: Path, task: str, metric: str, greater: bool, use_cpu: bool) -> Any:
    from transformers import TrainingArguments

    strategy = "steps" if o["eval_steps"] else "epoch"
    distributed = world_size() > 1
    if o["bf16"] and o.get("fp16"):
        raise ValueError("--bf16 and --fp16 are two mixed-precision modes: pick one")
    reporting = _reporting(o)
    extra: dict[str, Any] = {}
    if o.get("group_by_length"):  # LengthGroupedSampler; transformers >= 5.x names it train_sampling_strategy
        fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        if "train_sampling_strategy" in fields:
            extra["train_sampling_strategy"] = "group_by_length"
        else:
            extra["group_by_length"] = True
    if reporting:
        extra["run_name"] = f"{o['name']}-{out.name}"  # tensorboard logs go to OUT/checkpoints/runs/
    return TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        num_train_epochs=o["epochs"],
        max_steps=o["max_steps"] if o["max_steps"] is not None else -1,
        per_device_train_batch_size=o["batch_size"],
        per_device_eval_batch_size=o["eval_batch_size"] or max(o["batch_size"], 32),
        gradient_accumulation_steps=o["grad_accum"],
        learning_rate=o["lr"],
        weight_decay=o["weight_decay"],
        warmup_steps=o["warmup"] if o["warmup"] < 1 else int(o["warmup"]),
        lr_scheduler_type=o["scheduler"],
        max_grad_norm=o["max_grad_norm"],
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=o["eval_steps"],
        save_steps=o["eval_steps"],
        load_best_model_at_end=True,
        metric_for_best_model=metric,
        greater_is_better=greater,
        save_total_limit=o["save_total_limit"],
        logging_steps=o["logging_steps"],
        seed=o["seed"],
        bf16=o["bf16"],
        fp16=bool(o.get("fp16")),
        optim=_optimizer(o),
        use_cpu=use_cpu,
        ddp_backend=ddp_backend(use_cpu, world_size()),
        ddp_find_unused_parameters=False if distributed else None,
        # classification losses are per-example means: scaling them by the world size (meant for token-count
        # normalised LM losses) would double the gradients of a 2-process run
        average_tokens_across_devices=task != "classify",
        remove_unused_columns=False,
        label_names=["labels"],
        report_to=reporting,
        disable_tqdm=not o["progress"],
        dataloader_num_workers=0,
        save_only_model=False,
        **extra,
    )


DEFAULT_MAX_LENGTH = 256  # alpaca-lora's cutoff_len

# Options of the LLM workflow, with their defaults (older callers of run_train pass dicts without them).
LLM_DEFAULTS: dict[str, Any] = {
    "quantize": None, "quant_backend": "bitsandbytes", "dtype": None, "gradient_checkpointing": False,
    "chat_template": None, "packing": False, "group_by_length": False, "optim": "adamw", "early_stopping": None,
    "report_to": "none", "fp16": False, "strict": False,
}  # fmt: skip


def _check_llm_options(o: dict[str, Any], task: str) -> None:
    from adapterkit.quant import SCHEMES

    from .models import DTYPES

    if o["quantize"] is not None and o["quantize"] not in SCHEMES:
        raise ValueError(f"--quantize {o['quantize']!r}: use one of {', '.join(SCHEMES)}")
    if o["dtype"] is not None and o["dtype"] not in DTYPES:
        raise ValueError(f"--dtype {o['dtype']!r}: use one of {', '.join(DTYPES)}")
    if o["packing"] and task != "causal-lm":
        raise ValueError(f"--packing packs causal-lm examples; this run is {task}: drop --packing")
    if o["early_stopping"] is not None and o["early_stopping"] < 1:
        raise ValueError(
            f"--early-stopping must be a whole number >= 1 (evaluations without improvement), got {o['early_stopping']}"
        )
    if o["fsdp"] and (o["quantize"] or o["packing"]):
        raise ValueError("--fsdp cannot be combined with --quantize or --packing yet: drop one of them")


def _drop_without_target(encoded: Any, what: str, max_length: int, strict: bool) -> Any:
    """Warn about (or, ``strict``, refuse) examples left without a loss token, and drop them."""
    from .data import DataError

    if not encoded.no_target:
        return encoded
    parts = []
    if encoded.cut:
        parts.append(
            f"{len(encoded.cut)} of {len(encoded)} {what} examples lose every response token to --max-length "
            f"{max_length} (e.g. example {encoded.cut[0] + 1}); raise --max-length or shorten their prompts"
        )
    if encoded.empty:
        parts.append(
            f"{len(encoded.empty)} of {len(encoded)} {what} examples have no response tokens at all (an empty output "
            f"or no assistant turn, e.g. example {encoded.empty[0] + 1})"
        )
    message = "; ".join(parts)
    if strict:
        raise DataError(f"{message} (--strict)")
    kept = encoded.without(encoded.no_target)
    if not len(kept):
        raise DataError(f"{message}: no {what} example is left to learn from")
    _say(
        f"warning: {message}: their loss would be 0, so the {len(encoded.no_target)} are dropped (--strict makes this an error)"
    )
    return kept


def _model_level(adapters: ak.Adapters, name: str) -> bool:
    """Adapter ``name`` rewrites the whole model call (prompt/prefix tuning, LoReFT, UniPELT gates): it adds
    virtual tokens or a cache per row, which a packed row would share between its examples."""
    for comp in adapters.components(name).values():
        for sub in comp.modules():
            if isinstance(sub, Component) and type(sub).pre_call is not Component.pre_call:
                return True
    return "" in adapters.sites(name)


def _adapter_in_fp32(adapters: ak.Adapters, name: str, method: str) -> int:
    """On a half-precision base, LoRA factors train in float32 (peft's ``autocast_adapter_dtype``): LoRA casts its
    input to its own dtype and its output back. Head copies keep the base dtype. Returns the parameters cast."""
    if method != "lora":
        return 0
    n = 0
    for site, kind in adapters.sites(name).items():
        if kind == "head":
            continue
        for p in adapters.components(name)[site].parameters():
            if p.is_floating_point() and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
                n += 1
    return n


# --- multi-task ------------------------------------------------------------------------------------------
def _one(value: Any) -> Any:
    """The single value of an option that may come as a list (``--data`` repeated once)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"expected one path, got {len(value)}: {list(value)}; name each as NAME=PATH")
        return value[0]
    return value


def _needs_task_ids(cfg: ak.AdapterConfig) -> bool:
    """Whether the method conditions on task ids (Poly/MHR, HyperFormer; a union with such a part)."""
    return any(getattr(part, "needs_task_ids", False) for part in cfg.parts())


def _multitask_overrides(
    cfg: ak.AdapterConfig, o: dict[str, Any], overrides: dict[str, Any], tasks: list[str], routed: bool
) -> dict[str, Any]:
    """The method options for multi-task data: ``n_tasks`` set to the number of tasks unless ``--opt n_tasks=K``
    gives at least as many; a note when the method reads no task ids (it trains one adapter on the mixed tasks)."""
    fields = {f.name for f in dataclasses.fields(cfg)} if dataclasses.is_dataclass(cfg) else set()
    overrides = dict(overrides)
    if "n_tasks" in fields:
        given = o["opt"].get("n_tasks")
        if given is None:
            overrides["n_tasks"] = len(tasks)
        elif not isinstance(given, int) or given < len(tasks):
            raise ValueError(
                f"--opt n_tasks={given!r} is fewer than the {len(tasks)} tasks in the data ({', '.join(tasks)}): "
                "raise it or drop it (the number of tasks is the default)"
            )
    ids = ", ".join(f"{t}={i}" for i, t in enumerate(tasks))
    if routed:
        _say(f"multi-task: {len(tasks)} tasks, task ids {ids} (each batch passes its rows' task_ids)")
    else:
        _say(
            f"multi-task: {len(tasks)} tasks ({ids}); method {o['method']!r} reads no task ids, so one adapter "
            "learns the mixed tasks (task-conditioned methods: poly, hyperformer); dev scores are reported per task"
        )
    return overrides


def evaluate_tasks(trainer: Any, splits: Any, tokenizer: Any, enc: dict[str, Any], o: dict[str, Any]) -> dict:
    """Dev metrics of each task of multi-task data (the Trainer's ``evaluate`` on that task's dev rows), with the
    number of examples: ``{task: {"accuracy": ..., "examples": n, ...}}``."""
    from . import data as D

    out: dict[str, dict[str, Any]] = {}
    for name in splits.tasks:
        rows = D.task_rows(splits.dev, name)
        if not rows:
            out[name] = {"examples": 0}
            continue
        subset = _drop_without_target(
            D.encode(rows, splits, tokenizer, **enc), f"{name} dev", o["max_length"], False
        )
        prefix = "eval_task"
        found = trainer.evaluate(eval_dataset=subset, metric_key_prefix=prefix)
        scores = {k[len(prefix) + 1 :]: v for k, v in found.items() if k.startswith(prefix + "_")}
        keep = {k: v for k, v in scores.items() if not k.endswith(("runtime", "per_second", "epoch"))}
        out[name] = {**keep, "examples": len(subset)}
    return out


def _fmt_scores(scores: dict[str, Any] | None) -> str:
    if not scores:
        return "no dev rows"
    shown = [f"{k} {v:.4f}" for k, v in scores.items() if k not in ("examples", "loss") and isinstance(v, float)]
    return ", ".join(shown) + f" ({scores.get('examples', 0)} examples)"


def run_train(o: dict[str, Any]) -> dict[str, Any]:
    """The ``adapterkit train`` command (``o``: the parsed options). Returns the metrics written to metrics.json."""
    import json
    import shutil
    import time

    from . import data as D
    from .models import (
        DTYPES,
        RUN_FILE,
        ModelError,
        add_adapter,
        check_adapter_size,
        check_output_directory,
        check_packing,
        guess_task,
        load_model,
        load_tokenizer,
        model_config,
        prequantized,
        quantize_base,
    )

    t0 = time.perf_counter()
    o = {**LLM_DEFAULTS, **{k: v for k, v in o.items() if v is not None or k not in LLM_DEFAULTS}}
    if o.get("max_length") is None:
        o["max_length"] = DEFAULT_MAX_LENGTH
    out = Path(o["out"])
    if o["threads"]:
        torch.set_num_threads(o["threads"])
    overrides = dict(o["opt"])
    if o["targets"]:
        overrides["targets"] = o["targets"]
    cfg = ak.get_config(o["method"], **overrides)  # a bad method or option fails now, before anything is loaded
    if not getattr(cfg, "standalone", True):
        raise ValueError(
            f"method {o['method']!r} is not trained on its own: {type(cfg).standalone_note}; the CLI trains one "
            "adapter: pick another --method"
        )
    check_output_directory(out)

    task = o["task"] or guess_task(model_config(o["model"]))
    if task is None:
        raise ModelError(
            f"cannot tell the task of {str(o['model'])!r} from its config: pass --task classify|causal-lm|seq2seq"
        )
    _check_llm_options(o, task)
    heads = o["heads"] if o["heads"] is not None else (["head"] if task == "classify" else [])
    overrides["heads"] = heads
    check_adapter_size(o["model"], task, ak.get_config(o["method"], **overrides), source="from --method and --opt")

    ckpt_dir = out / CHECKPOINTS
    resume_from = last_checkpoint(ckpt_dir) if o["resume"] else None
    if ckpt_dir.is_dir() and any(ckpt_dir.glob("checkpoint-*")) and not o["resume"]:
        if not o["overwrite"]:
            raise ValueError(
                f"{out} already holds checkpoints of an earlier run: pass --resume to continue it or --overwrite "
                "to start over"
            )
        if rank() == 0:
            shutil.rmtree(ckpt_dir)
    if o["resume"] and resume_from is None:
        _say(f"no complete checkpoint in {ckpt_dir}: starting from scratch")
    elif resume_from is not None:
        _say(f"resuming from {resume_from}")

    sources = D.parse_sources(o["data"], "--data")
    dev_sources = D.parse_sources(o["dev"], "--dev") if o["dev"] else None
    if dev_sources is not None and sources is None:
        raise D.DataError("--dev NAME=FILE names the dev file of one task: give the data as --data NAME=PATH too")
    if sources is not None and o["dev"] and dev_sources is None:
        raise D.DataError(
            "with several datasets, give their dev files as --dev NAME=FILE (or leave --dev out: each dataset's own "
            "dev file, else a held-out part)"
        )
    data_arg = ",".join(f"{k}={v}" for k, v in sources.items()) if sources else str(_one(o["data"]))
    spec = D.DataSpec(
        data=data_arg, task=task, dev=None if dev_sources or not o["dev"] else str(_one(o["dev"])),
        sources=sources, dev_sources=dev_sources, task_column=o.get("task_column"),
        text_columns=o["text_column"] or None,
        label_column=o["label_column"], instruction_column=o["instruction_column"], input_column=o["input_column"],
        output_column=o["output_column"], template=o["template"], dev_fraction=o["dev_fraction"],
        train_size=o["train_size"], dev_size=o["dev_size"], seed=o["seed"],
        chat_template=D.read_chat_template(o["chat_template"]),
    )  # fmt: skip
    splits = D.load_splits(spec)
    if spec.chat_template is not None and "messages" not in splits.columns:
        raise D.DataError(
            f"--chat-template applies to chat data (a messages column); the columns are {splits.columns}"
        )
    routed = _needs_task_ids(cfg)
    if splits.tasks is not None and routed and o["packing"]:
        raise ValueError(
            f"--packing cannot train {o['method']} on multi-task data: a packed row holds examples of several tasks "
            "and the method reads one task id per row; train without --packing"
        )
    if splits.tasks is not None:
        overrides = _multitask_overrides(cfg, o, overrides, splits.tasks, routed)
    tokenizer = load_tokenizer(o["model"])
    enc = dict(task=task, max_length=o["max_length"], template=o["template"], train_on_prompt=o["train_on_prompt"],
               task_ids=routed and splits.tasks is not None)  # fmt: skip
    train_set = _drop_without_target(
        D.encode(splits.train, splits, tokenizer, **enc), "training", o["max_length"], o["strict"]
    )
    dev_set = _drop_without_target(
        D.encode(splits.dev, splits, tokenizer, **enc), "dev", o["max_length"], o["strict"]
    )
    examples = len(train_set)
    _, pad_id = D.special_ids(tokenizer)
    if o["packing"]:
        train_set = D.pack(train_set, o["max_length"])
        _say(
            f"packing: {examples:,} training examples in {len(train_set):,} rows of up to {o['max_length']} tokens"
        )
    _say(
        f"data: {examples:,} training and {len(dev_set):,} dev examples ({splits.dev_source}); columns {splits.columns}"
    )

    dtype = DTYPES[o["dtype"]] if o["dtype"] else None
    model = load_model(o["model"], task, labels=splits.labels, regression=splits.regression,
                       pad_token_id=tokenizer.pad_token_id, seed=o["seed"], dtype=dtype)  # fmt: skip
    if o["quantize"]:
        quantize_base(model, o["quantize"], o["quant_backend"], path=o["model"])
    quantized = bool(o["quantize"] or prequantized(o["model"]) or getattr(model, "is_quantized", False))
    if o["packing"]:
        check_packing(model)
    if o["packing"] or o["gradient_checkpointing"]:
        # training needs no KV cache, and with one transformers ignores the packed position ids' boundaries
        model.config.use_cache = False
    name = o["name"]
    adapters = ak.attach(model)
    add_adapter(adapters, name, o["method"], source="from --method and --opt", **overrides)
    adapters.train(name)
    if o["packing"] and _model_level(adapters, name):
        raise ValueError(
            f"--packing cannot train {o['method']}: its virtual tokens / cache are per row, and a packed row holds "
            "several examples; train without --packing"
        )
    if dtype in (torch.float16, torch.bfloat16) or (quantized and o["fp16"]):
        _adapter_in_fp32(adapters, name, o["method"])
    if quantized:
        ak.prepare_for_kbit_training(model, gradient_checkpointing=o["gradient_checkpointing"])
    elif o["gradient_checkpointing"]:
        if not callable(getattr(model, "gradient_checkpointing_enable", None)):
            raise ModelError(
                f"{type(model).__name__} does not support gradient checkpointing: drop --gradient-checkpointing"
            )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from .calibration import calibrate_for_training

    # adapters initialized from activations (--opt init=eva|corda): calibrate on training batches (collated as for
    # training) before any optimizer exists, since EVA replaces A and B by tensors of the rank it allocates
    collate = D.collator(tokenizer, task)
    calibrate_for_training(
        adapters, name, train_set, D.PackedCollator(pad_id, fallback=collate) if o["packing"] else collate,
        batches=o.get("calibration_batches"), seed=o["seed"], say=_say,
    )  # fmt: skip
    summary = adapters.summary()
    _say(str(summary))

    metric, greater = best_metric(task, splits.regression)
    use_cpu = o["cpu"] or not torch.cuda.is_available()
    args = _training_args(o, out, task, metric, greater, use_cpu)
    num_labels = len(splits.labels or [None])
    optimizers: tuple[Any, Any] = (None, None)
    if o.get("loraplus_ratio"):  # LoRA+ (Hayou et al. 2024): B's learning rate = ratio x --lr
        if o["fsdp"]:
            raise ValueError("--loraplus-ratio cannot be combined with --fsdp yet: drop one of them")
        optimizers = (
            ak.loraplus_optimizer(
                adapters, torch.optim.AdamW, lr=o["lr"], ratio=o["loraplus_ratio"], weight_decay=o["weight_decay"]
            ),
            None,
        )
    trainer = AdapterTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=dev_set,
        data_collator=D.collator(tokenizer, task),
        compute_metrics=compute_metrics_for(task, splits.regression, num_labels),
        preprocess_logits_for_metrics=None if task == "classify" else argmax_logits,
        adapters=adapters, adapter_name=name, fsdp=o["fsdp"], optimizers=optimizers,
    )  # fmt: skip
    if o["packing"]:  # training batches are packed rows; evaluation stays on whole, padded examples
        trainer.data_collator = D.PackedCollator(pad_id, fallback=trainer.data_collator)
    if o["early_stopping"]:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=o["early_stopping"]))
    from ..trainer import AdapterCallback

    # adapters.step() after every optimizer step and aux losses in the training loss (methods like AdaLoRA, DyLoRA)
    trainer.add_callback(AdapterCallback(adapters))
    if o["fsdp"]:
        if world_size() < 2:
            raise ValueError(
                "--fsdp shards the model across processes: launch with torchrun --nproc_per_node N (N >= 2)"
            )
        n = shard_fsdp2(model, args.device)
        trainer.is_distributed_loading_by_transformers = True  # FSDP2 reduces the gradients itself
        _say(f"FSDP2: {n} blocks and the root sharded over {world_size()} processes")

    wandb = sys.modules.get("wandb")
    own_run = "wandb" in (trainer.args.report_to or []) and (wandb is None or wandb.run is None)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        hist = history(trainer.state.log_history, task)
        final = trainer.evaluate()  # the best checkpoint, loaded back at the end of training
        per_task = None
        if splits.tasks is not None:
            per_task = evaluate_tasks(trainer, splits, tokenizer, enc, o)
    finally:
        # a run this call started ends with it: a second `train` in the same process (a notebook, CliRunner) would
        # otherwise log into it (transformers' WandbCallback only starts a run when none is open)
        if own_run and "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish()

    write = trainer.args.should_save
    save_adapter(adapters, name, out, write=write)
    metrics = {
        "task": task,
        "method": o["method"],
        "model": str(o["model"]),
        "adapter": str(out),
        "adapter_name": name,
        "train_examples": examples,
        "train_rows": len(train_set),
        "dev_examples": len(dev_set),
        "dev_source": splits.dev_source,
        "trainable_params": summary.trainable_params,
        "trainable_percent": summary.trainable_percent,
        "world_size": world_size(),
        "fsdp": o["fsdp"],
        "metric": metric,
        "best": {
            "step": trainer.state.best_global_step,
            "value": trainer.state.best_metric,
            "checkpoint": trainer.state.best_model_checkpoint,
        },
        "final_eval": {k[5:]: v for k, v in final.items() if k.startswith("eval_")},
        "global_step": trainer.state.global_step,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "seconds": time.perf_counter() - t0,
        "history": hist,
    }
    if splits.tasks is not None:
        metrics["tasks"] = {t: i for i, t in enumerate(splits.tasks)}
        metrics["task_ids"] = routed
        metrics["per_task"] = per_task
    if write:
        run = {
            "model": str(Path(o["model"]).resolve()) if Path(o["model"]).exists() else str(o["model"]),
            "task": task, "method": o["method"], "name": name, "labels": splits.labels, "regression": splits.regression,
            "max_length": o["max_length"], "template": o["template"], "train_on_prompt": o["train_on_prompt"],
            "data": spec.to_dict(absolute=True), "columns": splits.columns,
            "chat_template": spec.chat_template, "packing": o["packing"], "quantize": o["quantize"],
            "quant_backend": o["quant_backend"] if o["quantize"] else None, "dtype": o["dtype"],
            "tasks": {t: i for i, t in enumerate(splits.tasks)} if splits.tasks is not None else None,
            "task_column": spec.task_column, "task_ids": routed and splits.tasks is not None,
        }  # fmt: skip
        (out / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        from .plot import plot_curve

        plot_curve(
            hist, out / "curve.png", metric=metric, title=f"{o['method']} on {Path(o['model']).name}: {name}"
        )
        shown = metrics["final_eval"].get(metric if metric != "loss" else "accuracy")
        _say(
            "",
            f"dev {metric if metric != 'loss' else 'token accuracy'}: {shown:.4f} (best checkpoint: step {trainer.state.best_global_step})"
            if shown is not None else "",
            f"adapter:  {out}  ({summary.trainable_params:,} trainable parameters, {summary.trainable_percent:.2f}% of the model)",
            *(
                f"  {t} (task id {i}): {_fmt_scores(per_task[t])}" for i, t in enumerate(splits.tasks or [])
            ),
            f"metrics:  {out / 'metrics.json'}",
            f"curve:    {out / 'curve.png'}",
        )  # fmt: skip
    return metrics
