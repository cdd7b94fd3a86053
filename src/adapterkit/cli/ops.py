"""The commands that use a trained adapter: ``eval``, ``merge``, ``export``, ``generate``.

Each reads the adapter directory and, when present, the ``run.json`` that ``adapterkit train`` wrote next to
it (base model path, task, labels, max length, prompt template, data recipe). Flags override it; an adapter
saved from Python (no ``run.json``) needs ``--model`` and, for classification, ``--num-labels``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

import adapterkit as ak
from adapterkit.config import config_from_dict

from .models import (
    DTYPES,
    ModelError,
    check_adapter_size,
    check_output_directory,
    guess_task,
    load_adapter,
    load_model,
    load_tokenizer,
    model_config,
    quantize_base,
    read_run,
)

__all__ = ["load_adapted", "run_eval", "run_merge", "run_export", "run_generate"]


def _adapter_meta(adapter: Path) -> dict[str, Any]:
    from adapterkit.formats.io import read_json

    cfg = adapter / "adapter_config.json"
    if not cfg.is_file():
        raise ak.AdapterFileError(
            f"{str(adapter)!r} has no adapter_config.json: pass the directory `adapterkit train --out` wrote"
        )
    return read_json(cfg)


def _saved_shapes(adapter: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of ``adapter.safetensors`` (header only; {} when it cannot be read: loading reports it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(adapter / "adapter.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception:  # noqa: BLE001
        return {}


def _check_heads(adapter: Path, meta: dict[str, Any], net: torch.nn.Module, labels: list[str] | None,
                 from_run: bool) -> None:  # fmt: skip
    """Refuse a head copy whose shape differs from the model's head (another number of labels) with a message
    naming the labels, before the adapter is loaded."""
    from adapterkit.targeting import base_modules

    shapes = _saved_shapes(adapter)
    modules = base_modules(net)
    for site, kind in (meta.get("sites") or {}).items():
        if kind != "head" or site not in modules:
            continue
        for pname, p in modules[site].named_parameters():
            saved = shapes.get(f"{site}.head.{pname}")
            if saved is None or saved == tuple(p.shape):
                continue
            n = saved[0] if saved else 0
            have = f"{len(labels)} labels ({', '.join(labels[:10])})" if labels else f"{p.shape[0]} outputs"
            hint = (
                "run.json's labels do not match the adapter: the adapter directory was altered"
                if from_run
                else f"pass --num-labels {n}"
            )
            raise ModelError(
                f"the adapter's copy of the head {site!r} has {n} outputs ({pname} {list(saved)}), but the model was "
                f"built for {have}: {hint}"
            )


def load_adapted(adapter: str | os.PathLike, *, model: str | None = None, task: str | None = None,
                 num_labels: int | None = None,
                 as_trained: bool = False) -> tuple[torch.nn.Module, ak.Adapters, str, dict[str, Any], Any]:  # fmt: skip
    """(model, adapters, adapter name, run info, tokenizer): the base model with the adapter loaded and active.

    ``as_trained`` (eval, generate): the base as the run trained on it, in run.json's ``--dtype`` and quantized with
    its ``--quantize``; otherwise (merge, export) the checkpoint as saved (a QLoRA adapter merges into the dense
    base)."""
    adapter = Path(adapter)
    meta = _adapter_meta(adapter)
    run = read_run(adapter)
    base = model or run.get("model")
    if base is None:
        raise ModelError(f"{str(adapter)!r} has no run.json naming its base model: pass --model PATH")
    task = task or run.get("task") or guess_task(model_config(base))
    if task is None:
        raise ModelError(f"cannot tell the task of {str(base)!r}: pass --task classify|causal-lm|seq2seq")
    labels = run.get("labels")
    if task == "classify" and labels is None and not run.get("regression"):
        labels = [str(i) for i in range(num_labels or 2)]
    elif task == "classify" and num_labels is not None and labels is not None and num_labels != len(labels):
        raise ModelError(
            f"--num-labels {num_labels} contradicts the {len(labels)} labels in {str(adapter / 'run.json')!r}: "
            "drop --num-labels"
        )
    method = str((meta.get("config") or {}).get("method", "?"))
    try:
        config = config_from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ak.AdapterFileError(f"{str(adapter / 'adapter_config.json')!r} is invalid: {e}") from None
    check_adapter_size(base, task, config, source=f"in {str(adapter)!r}")
    tokenizer = load_tokenizer(base)
    dtype = DTYPES.get(run.get("dtype") or "") if as_trained else None
    net = load_model(
        base,
        task,
        labels=labels,
        regression=bool(run.get("regression")),
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
    )
    if as_trained and run.get("quantize"):
        quantize_base(net, run["quantize"], run.get("quant_backend") or "bitsandbytes", path=base)
    net.eval()
    if task == "classify":
        _check_heads(adapter, meta, net, labels, from_run=run.get("labels") is not None)
    adapters = ak.attach(net)
    name = load_adapter(adapters, adapter, method=method, name=meta.get("name") or run.get("name"), activate=True)
    return net, adapters, name, {**run, "task": task, "model": base, "labels": labels}, tokenizer


def run_eval(adapter: Path, *, model: str | None, data: str | None, dev: str | None, task: str | None,
             batch_size: int, max_length: int | None, num_labels: int | None) -> dict[str, float]:  # fmt: skip
    """Evaluate an adapter on a dev set: the one it was trained with (rebuilt from run.json), a data
    directory's dev file, or a given file (all its rows). Prints the metrics; returns them."""
    import tempfile

    from transformers import PrinterCallback, Trainer, TrainingArguments

    from . import data as D
    from .train import argmax_logits, compute_metrics_for

    net, adapters, name, run, tokenizer = load_adapted(adapter, model=model, task=task, num_labels=num_labels,
                                                       as_trained=True)  # fmt: skip
    task = run["task"]
    recipe = dict(run.get("data") or {})
    if data is not None or dev is not None:
        if data is None:
            data, dev = dev, None
        p = Path(data)
        # a file given on its own is the evaluation set; a directory contributes its dev file
        recipe.update(
            data=str(p), dev=dev if dev else (str(p) if p.is_file() else None), train_size=None, dev_size=None
        )
        if p.is_dir() and D.resolve_files(p, None)[1] is None:
            raise D.DataError(f"{str(p)!r} has no dev/validation file: pass the evaluation file itself")
    if not recipe.get("data"):
        raise D.DataError(f"{str(adapter)!r} has no run.json with the data it was trained on: pass --data FILE")
    recipe["task"] = task
    spec = D.DataSpec(**{k: v for k, v in recipe.items() if k in D.DataSpec.__dataclass_fields__})
    splits = D.load_splits(spec)
    head = run.get("labels")
    if task == "classify" and head is not None and not splits.regression:

        def label_of(r: dict) -> str:  # multi-task data from several datasets: each task's own label column
            cols = splits.task_columns[r[D.TASK_KEY]] if splits.task_columns else splits.columns
            return str(r[cols["label"]]).strip()

        unknown = sorted({label_of(r) for r in splits.dev} - set(head))
        unknown = [u for u in unknown if not (D._is_int(u) and 0 <= int(u) < len(head))]
        if unknown:
            fix = (
                "pass --num-labels N (the labels are 0..N-1) if it was trained with more"
                if not (Path(adapter) / "run.json").is_file()
                else "evaluate on data with the labels it was trained on"
            )
            raise D.DataError(
                f"{splits.dev_source} has labels the adapter's head does not have: {unknown[:5]}; its {len(head)} "
                f"outputs are the labels {head[:10]}: {fix}"
            )
        splits.labels = head  # score with the label order the head was trained with
    max_length = max_length or run.get("max_length") or 128
    template = run.get("template", "alpaca")
    dev_set = D.encode(splits.dev, splits, tokenizer, task=task, max_length=max_length, template=template,
                       train_on_prompt=bool(run.get("train_on_prompt")),
                       task_ids=bool(run.get("task_ids")) and splits.tasks is not None)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=batch_size, report_to=[],
                                 use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
                                 label_names=["labels"], disable_tqdm=True)  # fmt: skip
        trainer = Trainer(
            model=net, args=args, eval_dataset=dev_set, data_collator=D.collator(tokenizer, task),
            compute_metrics=compute_metrics_for(task, splits.regression, len(splits.labels or [None])),
            preprocess_logits_for_metrics=None if task == "classify" else argmax_logits,
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        raw = trainer.evaluate()
    metrics = {
        k[5:]: v
        for k, v in raw.items()
        if k.startswith("eval_") and not k.endswith(("_per_second", "runtime", "_time"))
    }
    print(
        f"adapter {name!r} ({adapters.config(name).method}) on {run['model']}: {len(dev_set):,} examples from {splits.dev_source}"
    )
    for k, v in metrics.items():
        print(f"  {k:<10} {v:.4%}" if k in ("accuracy", "f1") else f"  {k:<10} {v:.4f}")
    if "accuracy" in metrics:
        print(f"accuracy: {metrics['accuracy']:.2%}")
    curve = Path(adapter) / "curve.png"
    if curve.is_file():
        print(f"training curve: {curve}")
    return metrics


def run_merge(adapter: Path, out: Path, *, model: str | None, task: str | None, num_labels: int | None) -> None:
    """Fold the adapter into the base weights and write a plain transformers model (+ tokenizer) to ``out``."""
    check_output_directory(out)
    net, adapters, name, run, tokenizer = load_adapted(adapter, model=model, task=task, num_labels=num_labels)
    plain = adapters.merge_and_detach([name])
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged adapter {name!r} into {run['model']}: wrote {out} (load it with from_pretrained)")


def run_export(adapter: Path, out: Path, *, fmt: str, model: str | None, task: str | None,
               num_labels: int | None) -> None:  # fmt: skip
    """Write the adapter in another format (``peft``: loads with ``PeftModel.from_pretrained``; ``adapterhub``: with
    ``adapters``' ``load_adapter``, see docs/from_adapterhub.md)."""
    check_output_directory(out)
    net, adapters, name, run, _ = load_adapted(adapter, model=model, task=task, num_labels=num_labels)
    adapters.export(name, out, format=fmt)
    print(f"exported adapter {name!r} as {fmt} to {out}")


def run_generate(adapter: Path, prompts: list[str], *, model: str | None, template: str | None, raw: bool,
                 max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 chat_template: str | None = None) -> list[str]:  # fmt: skip
    """Generate a response per prompt with a causal LM and its adapter; prints and returns them.

    Prompts are rendered with the adapter's training template (``--template`` to change it, ``--raw`` to send
    them as they are); chat adapters and JSON messages prompts with the chat template (see ``cli/chat.py``).
    """
    from .chat import chat_prompt
    from .data import render_prompt

    net, adapters, name, run, tokenizer = load_adapted(adapter, model=model, task="causal-lm", as_trained=True)
    if run.get("task", "causal-lm") != "causal-lm":
        raise ModelError(f"adapter {name!r} was trained for {run['task']}; generate needs a causal-lm adapter")
    template = template or run.get("template") or "alpaca"
    columns = run.get("columns") or {}
    use_template = not raw and "instruction" in columns if run else not raw
    outputs = []
    torch.manual_seed(seed)
    for prompt in prompts:
        chat = chat_prompt(tokenizer, prompt, run, raw=raw, chat_template=chat_template)
        text = chat if chat is not None else render_prompt(template, prompt) if use_template else prompt
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=chat is None)
        enc = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}  # no token_type_ids for decoders
        gen = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        if temperature > 0:
            gen.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            gen.update(do_sample=False)
        with torch.no_grad():
            ids = net.generate(**enc, **gen)
        response = tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        outputs.append(response)
        print(response)
    return outputs
