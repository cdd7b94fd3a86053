"""``adapterkit``: train, evaluate, merge, export and inspect adapters from the command line.

Commands (``adapterkit COMMAND --help`` documents each)::

    adapterkit train    --model PATH --data PATH --task classify --method lora --out DIR [--config run.yaml]
    adapterkit eval     DIR [--data PATH]
    adapterkit merge    DIR --out MERGED
    adapterkit export   DIR --format peft [--target vllm --rank 16 | --target diffusers] --out PEFT_DIR
    adapterkit inspect  --model PATH [--method lora --targets all-linear]
    adapterkit generate DIR --prompt "..."
    adapterkit serve    --model PATH [--adapters DIR] [--adapter NAME=PATH] [--port 8000]

``train`` runs Hugging Face's ``Trainer`` (see ``adapterkit.cli.train``); distributed runs use the same
command under ``torchrun`` (``torchrun --nproc_per_node 2 -m adapterkit.cli train ... [--fsdp]``).

Every command takes ``--config FILE`` (YAML or JSON): its keys are option names (``max_length`` or
``max-length``) and stand in for flags; flags given on the command line win. ``opt`` may be a mapping of
method options (``opt: {r: 16, alpha: 32}``).
"""

from __future__ import annotations

import enum
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402

__all__ = ["app", "main"]

app = typer.Typer(
    name="adapterkit",
    help="Train, evaluate, merge, export and inspect parameter-efficient adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Task(str, enum.Enum):
    classify = "classify"
    causal_lm = "causal-lm"
    seq2seq = "seq2seq"


class InspectTask(str, enum.Enum):
    classify = "classify"
    causal_lm = "causal-lm"
    seq2seq = "seq2seq"
    none = "none"


class ExportFormat(str, enum.Enum):
    peft = "peft"
    native = "native"
    adapterhub = "adapterhub"


class ExportTarget(str, enum.Enum):
    peft = "peft"
    vllm = "vllm"
    diffusers = "diffusers"


# --- --config FILE -----------------------------------------------------------------------------------------
def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise typer.BadParameter(f"config file {str(path)!r} does not exist", param_hint="--config")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise typer.BadParameter(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}",
                                 param_hint="--config") from None  # fmt: skip
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path} must hold a mapping of option names to values", param_hint="--config")
    return data


def _config_callback(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """Eager ``--config``: its values become the command's defaults (``ctx.default_map``), so flags win."""
    if value is None:
        return None
    data = _read_config(Path(value))
    known = {p.name: p for p in ctx.command.params if p.name and p.name != "config"}
    defaults: dict[str, Any] = {}
    for key, v in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise typer.BadParameter(
                f"{value}: unknown option {key!r}; options of `{ctx.command.name}`: {', '.join(sorted(known))}",
                param_hint="--config",
            )
        if name == "opt" and isinstance(v, dict):
            v = [f"{k}={json.dumps(x)}" for k, x in v.items()]
        elif getattr(known[name], "multiple", False) and isinstance(v, str):
            v = [v]
        defaults[name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", is_eager=True, callback=_config_callback, exists=False,
                 help="YAML/JSON file whose keys stand in for this command's flags (flags win)."),
]  # fmt: skip


# --- parsing helpers -----------------------------------------------------------------------------------------
def _split(values: list[str] | None) -> list[str] | None:
    """Repeated and comma-separated values; None when not given, [] for 'none'."""
    if values is None:
        return None
    out = [v.strip() for item in values for v in str(item).split(",") if v.strip()]
    return [] if out in (["none"], ["None"]) else out


def _parse_opts(values: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values are read as JSON (``r=16``, ``dora=true``, ``rank_pattern={"q": 4}``),
    else kept as strings (``init=pissa``). A value that starts like a JSON object, list or string must be
    valid JSON."""
    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--opt")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError as e:
            if raw.strip()[:1] in ("{", "[", '"'):
                raise typer.BadParameter(
                    f"the value of {key!r} is not valid JSON ({e.msg} at character {e.pos + 1} of {raw!r}); "
                    f"""write it as JSON, e.g. {key}='{{"q": 4}}' or {key}='["a", "b"]' (quote it for the shell)""",
                    param_hint="--opt",
                ) from None
            out[key] = raw
    return out


def _check_numbers(**checks: tuple[Any, str]) -> None:
    """Refuse option values outside their range: ``flag_name=(value, rule)`` with rule ``>0``, ``>=0``,
    ``>=1`` or ``0<x<=1``; None means "not given" and passes. Floats must be finite."""
    import math

    tests = {
        ">0": (lambda v: v > 0, "a positive number"),
        ">=0": (lambda v: v >= 0, "a number >= 0"),
        ">=1": (lambda v: v >= 1, "a whole number >= 1"),
        "0<x<=1": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    }
    for name, (value, rule) in checks.items():
        if value is None:
            continue
        ok, what = tests[rule]
        if not (isinstance(value, int) or math.isfinite(value)) or not ok(value):
            raise typer.BadParameter(f"must be {what}, got {value!r}", param_hint=f"--{name.replace('_', '-')}")


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's own errors (bad method, target, file, data) into one message and exit status 1.
    Set ``ADAPTERKIT_DEBUG=1`` to see the traceback instead."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get("ADAPTERKIT_DEBUG"):
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except (typer.BadParameter, typer.Exit, typer.Abort):
            raise
        except (ValueError, KeyError, TypeError, OSError, ImportError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            if isinstance(e, ImportError):
                msg = f"{msg}\nthe CLI's training extras are missing: pip install 'adapterkit[cli]'"
            typer.echo(f"Error: {msg}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _configure_logging() -> None:
    import warnings

    from .models import hide_quantization_libraries

    hide_quantization_libraries()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


# --- train -------------------------------------------------------------------------------------------------------
@app.command()
@_friendly
def train(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Base model: a local directory (save_pretrained) or a hub id.")
    ],
    data: Annotated[
        list[str],
        typer.Option(
            "--data",
            "-d",
            help="Training data: a .csv/.tsv/.json/.jsonl file, or a directory with train.* and dev.* (GLUE layout); "
            "multi-task: NAME=PATH per task, repeated or comma-separated (task ids in that order).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output directory: the adapter, run.json, metrics.json, curve.png and checkpoints/.",
        ),
    ],
    task: Annotated[
        Task | None, typer.Option(help="classify, causal-lm or seq2seq (default: from the model's config).")
    ] = None,
    method: Annotated[str, typer.Option(help="Registered method or preset name (lora, ...).")] = "lora",
    targets: Annotated[
        list[str] | None,
        typer.Option(
            help="Where the method acts: roles (attn.q), module names, patterns or all-linear; repeat or comma-separate."
        ),
    ] = None,
    opt: Annotated[
        list[str] | None,
        typer.Option(help="Method option KEY=VALUE (JSON value), e.g. --opt r=16 --opt alpha=32; repeatable."),
    ] = None,
    heads: Annotated[
        list[str] | None,
        typer.Option(
            help="Modules the adapter owns a trainable copy of (default for classify: the head role; 'none' for no head)."
        ),
    ] = None,
    name: Annotated[str, typer.Option(help="Adapter name.")] = "default",
    dev: Annotated[
        list[str] | None,
        typer.Option(
            help="Dev file (default: the data directory's dev.*, else a held-out part of train); multi-task: "
            "NAME=FILE per task."
        ),
    ] = None,
    task_column: Annotated[
        str | None,
        typer.Option(
            help="Multi-task from one table: the column naming each row's task (task ids: the sorted task names)."
        ),
    ] = None,
    dev_fraction: Annotated[
        float, typer.Option(help="Share of the training rows held out as dev set when there is no dev file.")
    ] = 0.1,
    text_column: Annotated[
        list[str] | None,
        typer.Option(
            help="Text column(s): one, or two for sentence pairs (classify) / source and target (seq2seq)."
        ),
    ] = None,
    label_column: Annotated[str | None, typer.Option(help="Label column (classify).")] = None,
    instruction_column: Annotated[
        str, typer.Option(help="Instruction column of alpaca-style data.")
    ] = "instruction",
    input_column: Annotated[str, typer.Option(help="Optional input column of alpaca-style data.")] = "input",
    output_column: Annotated[str, typer.Option(help="Response column of alpaca-style data.")] = "output",
    template: Annotated[
        str,
        typer.Option(
            help="Prompt template for instruction data: alpaca, plain, or a format string with {instruction} and {input}."
        ),
    ] = "alpaca",
    chat_template: Annotated[
        str | None,
        typer.Option(
            help="Chat data (a messages column): a Jinja chat template file, or chatml (default: the tokenizer's)."
        ),
    ] = None,
    train_on_prompt: Annotated[
        bool,
        typer.Option(
            help="Causal LM: also compute the loss on prompt tokens (chat data: on every turn, not only the assistant's)."
        ),
    ] = False,
    train_size: Annotated[int | None, typer.Option(help="Use only this many (shuffled) training rows.")] = None,
    dev_size: Annotated[int | None, typer.Option(help="Use only this many dev rows.")] = None,
    max_length: Annotated[
        int | None,
        typer.Option(help="Truncate examples to this many tokens (default 256, alpaca-lora's cutoff_len)."),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            help="Fail when truncation leaves an example without response tokens (default: warn, drop it)."
        ),
    ] = False,
    packing: Annotated[
        bool,
        typer.Option(
            help="Causal LM: pack examples into rows of --max-length tokens (position ids restart per example; no cross-example attention)."
        ),
    ] = False,
    group_by_length: Annotated[bool, typer.Option(help="Batch examples of similar length together.")] = False,
    epochs: Annotated[float, typer.Option(help="Training epochs.")] = 3.0,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many optimizer steps (overrides --epochs).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size per process.")] = 16,
    eval_batch_size: Annotated[int | None, typer.Option(help="Evaluation batch size per process.")] = None,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 5e-4,
    optim: Annotated[
        str, typer.Option(help="Optimizer: adamw, adamw_8bit (bitsandbytes) or adafactor.")
    ] = "adamw",
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    loraplus_ratio: Annotated[
        float | None,
        typer.Option(help="LoRA+ (Hayou et al. 2024): LoRA B matrices learn at this many times --lr (e.g. 16)."),
    ] = None,
    calibration_batches: Annotated[
        int | None,
        typer.Option(
            help="Adapters initialized from activations (--opt init=eva|corda): batches of 4 training examples run "
            "before training (EVA: until converged, at most this many, default 1000; CorDA: this many, default 64)."
        ),
    ] = None,
    warmup: Annotated[
        float, typer.Option(help="Warmup: a share of the steps if < 1, else a number of steps.")
    ] = 0.0,
    scheduler: Annotated[
        str, typer.Option(help="Learning-rate schedule (transformers names: linear, cosine, constant, ...).")
    ] = "linear",
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm.")] = 1.0,
    eval_steps: Annotated[
        int | None, typer.Option(help="Evaluate and checkpoint every N steps (default: every epoch).")
    ] = None,
    logging_steps: Annotated[int, typer.Option(help="Log the training loss every N steps.")] = 10,
    save_total_limit: Annotated[int, typer.Option(help="Checkpoints to keep (the best one is always kept).")] = 2,
    early_stopping: Annotated[
        int | None, typer.Option(help="Stop after N evaluations without a better dev metric.")
    ] = None,
    report_to: Annotated[
        str, typer.Option(help="Log to none, tensorboard (OUT/checkpoints/runs) or wandb.")
    ] = "none",
    seed: Annotated[int, typer.Option(help="Seed for the data split, shuffling and initialization.")] = 42,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads per process.")] = None,
    bf16: Annotated[bool, typer.Option(help="bfloat16 mixed precision.")] = False,
    fp16: Annotated[bool, typer.Option(help="float16 mixed precision (loss scaling).")] = False,
    dtype: Annotated[
        str | None, typer.Option(help="Base weights' dtype: bf16, fp16 or fp32 (default: the checkpoint's).")
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="QLoRA: quantize the base's linear layers to nf4 or int8 (ak.quantize) before adding the adapter."
        ),
    ] = None,
    quant_backend: Annotated[
        str, typer.Option(help="Library for --quantize: bitsandbytes or torchao.")
    ] = "bitsandbytes",
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations in the backward pass (less memory, slower).")
    ] = False,
    cpu: Annotated[bool, typer.Option(help="Train on CPU even if a GPU is present.")] = False,
    fsdp: Annotated[
        bool, typer.Option(help="Shard the model with FSDP2 (fully_shard); launch with torchrun.")
    ] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue from the last complete checkpoint in OUT/checkpoints.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Delete the checkpoints of an earlier run in OUT first.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    config: ConfigOpt = None,
) -> None:
    """Train an adapter with the Hugging Face Trainer; save it (native format), metrics.json and curve.png to OUT.

    Example: adapterkit train --model ./minilm --data glue/SST-2 --task classify --method lora --targets attn.q,attn.v --opt r=8 --out out/sst2
    """
    _configure_logging()
    options = dict(locals())
    options.pop("config")
    options["task"] = task.value if task is not None else None
    options["targets"] = _split(targets)
    options["heads"] = _split(heads)
    options["text_column"] = _split(text_column)
    options["opt"] = _parse_opts(opt)
    _check_numbers(
        epochs=(epochs, ">0"), max_steps=(max_steps, ">=1"), batch_size=(batch_size, ">=1"),
        eval_batch_size=(eval_batch_size, ">=1"), grad_accum=(grad_accum, ">=1"), lr=(lr, ">0"),
        weight_decay=(weight_decay, ">=0"), warmup=(warmup, ">=0"), max_grad_norm=(max_grad_norm, ">=0"),
        loraplus_ratio=(loraplus_ratio, ">0"), eval_steps=(eval_steps, ">=1"), logging_steps=(logging_steps, ">=1"),
        save_total_limit=(save_total_limit, ">=1"), max_length=(max_length, ">=1"), train_size=(train_size, ">=1"),
        dev_size=(dev_size, ">=1"), dev_fraction=(dev_fraction, ">0"), threads=(threads, ">=1"), seed=(seed, ">=0"),
        early_stopping=(early_stopping, ">=1"), calibration_batches=(calibration_batches, ">=1"),
    )  # fmt: skip
    for flag, value, allowed in (
        ("quantize", quantize, ("nf4", "int8")),
        ("dtype", dtype, ("bf16", "fp16", "fp32")),
        ("optim", optim, ("adamw", "adamw_8bit", "adafactor")),
        ("report-to", report_to, ("none", "tensorboard", "wandb")),
        ("quant-backend", quant_backend, ("bitsandbytes", "torchao")),
    ):
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=f"--{flag}")
    if "." in name or not name:
        raise typer.BadParameter(
            f"adapter names cannot be empty or contain '.', got {name!r}", param_hint="--name"
        )
    from .train import run_train

    run_train(options)


# --- eval ---------------------------------------------------------------------------------------------------------
AdapterArg = Annotated[Path, typer.Argument(help="Adapter directory (what `adapterkit train --out` wrote).")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Base model (default: the one in run.json).")]
TaskOpt = Annotated[Task | None, typer.Option(help="Task (default: from run.json or the model's config).")]
NumLabelsOpt = Annotated[int | None, typer.Option(help="Classes of the head, for adapters without run.json.")]


@app.command("eval")
@_friendly
def eval_(
    adapter: AdapterArg,
    data: Annotated[
        str | None,
        typer.Option(
            "--data", "-d", help="Evaluation file, or a directory with a dev file (default: the run's dev set)."
        ),
    ] = None,
    dev: Annotated[str | None, typer.Option(help="Dev file (with --data DIR).")] = None,
    model: ModelOpt = None,
    task: TaskOpt = None,
    batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 64,
    max_length: Annotated[int | None, typer.Option(help="Truncation length (default: the training one).")] = None,
    num_labels: NumLabelsOpt = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the metrics to this JSON file.")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Evaluate an adapter on its dev set (or --data) and print the accuracy."""
    _configure_logging()
    _check_numbers(batch_size=(batch_size, ">=1"), max_length=(max_length, ">=1"), num_labels=(num_labels, ">=1"))
    from .ops import run_eval

    metrics = run_eval(adapter, model=model, data=data, dev=dev, task=task.value if task else None,
                       batch_size=batch_size, max_length=max_length, num_labels=num_labels)  # fmt: skip
    if json_out is not None:
        json_out.write_text(json.dumps(metrics, indent=2) + "\n")


# --- merge / export ------------------------------------------------------------------------------------------------
@app.command()
@_friendly
def merge(
    adapter: AdapterArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the merged model (save_pretrained).")],
    model: ModelOpt = None,
    task: TaskOpt = None,
    num_labels: NumLabelsOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Merge the adapter into the base weights and save a plain transformers model (+ tokenizer)."""
    _configure_logging()
    _check_numbers(num_labels=(num_labels, ">=1"))
    from .ops import run_merge

    run_merge(adapter, out, model=model, task=task.value if task else None, num_labels=num_labels)


@app.command()
@_friendly
def export(
    adapter: AdapterArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the exported adapter.")],
    fmt: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            "-f",
            help="peft (PeftModel.from_pretrained), native, or adapterhub (adapters' load_adapter).",
        ),
    ] = ExportFormat.peft,
    target: Annotated[
        ExportTarget,
        typer.Option(
            help="peft: what peft loads; vllm: a plain LoRA vLLM's --lora-modules (and LoRAX) accept (ranks padded "
            "to a --max-lora-rank choice, DoRA/LoHa/LoKr/VeRA/(IA)^3 converted by truncated SVD), or a refusal "
            "naming each module vLLM cannot take; diffusers: pytorch_lora_weights.safetensors for diffusers' "
            "load_lora_adapter / load_lora_weights (LoRA and LoKr)."
        ),
    ] = ExportTarget.peft,
    rank: Annotated[
        int | None,
        typer.Option(
            help="--target vllm: the largest rank of any module; larger LoRA modules and converted methods are "
            "truncated SVDs at this rank (default: the adapter's r)."
        ),
    ] = None,
    prefix: Annotated[
        str | None,
        typer.Option(
            help="--target diffusers: the component prefix of every key (default: text_encoder for transformers "
            "models; '' for bare module paths)."
        ),
    ] = None,
    model: ModelOpt = None,
    task: TaskOpt = None,
    num_labels: NumLabelsOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Write the adapter in another library's format (peft), or for a server (--target vllm) or diffusers.

    Example: adapterkit export out/sql --format peft --target vllm --rank 16 --out out/sql-vllm
    """
    _configure_logging()
    _check_numbers(num_labels=(num_labels, ">=1"), rank=(rank, ">=1"))
    if rank is not None and target is not ExportTarget.vllm:
        raise typer.BadParameter("--rank applies to --target vllm only", param_hint="--rank")
    if prefix is not None and target is not ExportTarget.diffusers:
        raise typer.BadParameter("--prefix applies to --target diffusers only", param_hint="--prefix")
    if target is ExportTarget.peft:
        from .ops import run_export

        run_export(adapter, out, fmt=fmt.value, model=model, task=task.value if task else None,
                   num_labels=num_labels)  # fmt: skip
        return
    if fmt is not ExportFormat.peft:
        raise typer.BadParameter(
            f"--target {target.value} writes peft's format: pass --format peft", param_hint="--format"
        )
    from .models import check_output_directory
    from .ops import load_adapted

    if target is ExportTarget.diffusers:
        check_output_directory(out)
        _, adapters, name, _, _ = load_adapted(adapter, model=model, task=task.value if task else None,
                                               num_labels=num_labels)  # fmt: skip
        try:
            written = adapters.export(name, out, target="diffusers", prefix=prefix)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--target") from None
        typer.echo(f"exported adapter {name!r} for diffusers to {written}")
        return
    from ..formats.vllm import REPORT, allowed_rank
    from ..formats.vllm import export as export_vllm

    if rank is not None:
        try:
            allowed_rank(rank)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--rank") from None
    check_output_directory(out)
    _, adapters, name, _, _ = load_adapted(adapter, model=model, task=task.value if task else None,
                                           num_labels=num_labels)  # fmt: skip
    result = export_vllm(adapters, name, out, rank=rank)
    typer.echo(result.table())
    for line in result.notes:
        typer.echo(f"note: {line}")
    typer.echo(
        f"exported adapter {name!r} for vLLM to {out} (peft LoRA, r={result.rank}, lora_alpha={result.lora_alpha}, "
        f"max relative error {result.max_error:.3g}; report: {out / REPORT})"
    )


# --- inspect -------------------------------------------------------------------------------------------------------------
@app.command("inspect")
@_friendly
def inspect_(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model directory or hub id (only its config is read).")
    ],
    task: Annotated[
        InspectTask | None,
        typer.Option(help="Task head to build (default: from the config; none: the bare model)."),
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="Show where this method's adapters would sit (e.g. lora).")
    ] = None,
    targets: Annotated[
        list[str] | None, typer.Option(help="Targets for --method (roles, names, patterns, all-linear).")
    ] = None,
    opt: Annotated[
        list[str] | None, typer.Option(help="Method option KEY=VALUE (JSON value); repeatable.")
    ] = None,
    heads: Annotated[list[str] | None, typer.Option(help="Head modules the adapter would own a copy of.")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size for the memory estimate.")] = 8,
    max_length: Annotated[int, typer.Option(help="Sequence length for the memory estimate.")] = 512,
    depth: Annotated[int | None, typer.Option(help="Show the module tree down to this depth.")] = None,
    tree: Annotated[bool, typer.Option(help="Print the module tree.")] = True,
    config: ConfigOpt = None,
) -> None:
    """Module tree with targetable roles, where adapters would sit, parameter counts, estimated training memory."""
    _configure_logging()
    _check_numbers(batch_size=(batch_size, ">=1"), max_length=(max_length, ">=1"), depth=(depth, ">=0"))
    from .inspect import inspect_model

    overrides = _parse_opts(opt)
    if _split(targets):
        overrides["targets"] = _split(targets)
    if _split(heads):
        overrides["heads"] = _split(heads)
    if overrides and method is None:
        method = "lora"
    inspect_model(model, task=task.value if task else None, method=method, overrides=overrides,
                  batch=batch_size, seq=max_length, depth=depth, tree=tree)  # fmt: skip


# --- generate -------------------------------------------------------------------------------------------------------------
@app.command()
@_friendly
def generate(
    adapter: AdapterArg,
    prompt: Annotated[
        list[str],
        typer.Option(
            "--prompt",
            "-p",
            help='Instruction or prompt, or a JSON list of chat messages ([{"role": "user", "content": "..."}]); repeatable.',
        ),
    ],
    model: ModelOpt = None,
    template: Annotated[
        str | None, typer.Option(help="Prompt template (default: the adapter's training template).")
    ] = None,
    raw: Annotated[bool, typer.Option(help="Send the prompt as is, without a template.")] = False,
    chat_template: Annotated[
        str | None,
        typer.Option(
            help="Chat template file (or chatml) for chat prompts (default: the adapter's training one)."
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold.")] = 0.9,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    config: ConfigOpt = None,
) -> None:
    """Generate with a causal LM and its adapter."""
    _configure_logging()
    _check_numbers(
        max_new_tokens=(max_new_tokens, ">=1"), temperature=(temperature, ">=0"), top_p=(top_p, "0<x<=1")
    )
    from .ops import run_generate

    run_generate(adapter, prompt, model=model, template=template, raw=raw, max_new_tokens=max_new_tokens,
                 temperature=temperature, top_p=top_p, seed=seed, chat_template=chat_template)  # fmt: skip


# --- serve ----------------------------------------------------------------------------------------------------------------
@app.command()
@_friendly
def serve(
    model: Annotated[str, typer.Option("--model", "-m", help="Base causal LM directory (with its tokenizer).")],
    adapters: Annotated[
        Path | None, typer.Option(help="Directory whose subfolders are adapters, each named by its folder.")
    ] = None,
    adapter: Annotated[list[str] | None, typer.Option(help="NAME=PATH: one more adapter; repeatable.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port; the log line names it).")] = 8000,
    api_key: Annotated[str | None, typer.Option(help="Require `Authorization: Bearer KEY` on /v1.")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, float16 or bfloat16.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    max_running: Annotated[int, typer.Option(help="Requests decoded together.")] = 32,
    max_queue: Annotated[int, typer.Option(help="Waiting requests before 429.")] = 256,
    max_active_adapters: Annotated[int, typer.Option(help="Distinct adapters in one step.")] = 8,
    adapter_pool_mb: Annotated[float | None, typer.Option(help="Memory budget of loaded adapters (LRU).")] = None,
    allow_runtime_adapter_updates: Annotated[
        bool, typer.Option(help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter.")
    ] = False,
    drain_timeout: Annotated[float, typer.Option(help="Seconds SIGTERM waits for in-flight requests.")] = 30.0,
    config: ConfigOpt = None,
) -> None:
    """Serve the base model and its adapters over an OpenAI-compatible HTTP API (continuous batching, requests
    of different adapters in one forward).

    Example: adapterkit serve --model ./llama --adapters ./adapters --port 8000
    """
    _configure_logging()
    _check_numbers(
        max_running=(max_running, ">=1"), max_queue=(max_queue, ">=1"),
        max_active_adapters=(max_active_adapters, ">=1"), drain_timeout=(drain_timeout, ">=0"),
    )  # fmt: skip
    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise typer.BadParameter(f"unknown dtype {dtype!r}", param_hint="--dtype")
    extra = {}
    for spec in adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"{spec!r} is not NAME=PATH", param_hint="--adapter")
        extra[name] = path
    import logging

    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from ..serve import Server

    Server(model, adapters_dir=adapters, adapters=extra, host=host, port=port, api_key=api_key, dtype=dtype,
           max_running=max_running, max_queue=max_queue, max_active_adapters=max_active_adapters,
           adapter_pool_mb=adapter_pool_mb, allow_runtime_adapter_updates=allow_runtime_adapter_updates,
           drain_timeout=drain_timeout).run()  # fmt: skip


def main() -> None:
    """Console entry point (``python -m adapterkit.cli``)."""
    app()
