"""peft interop for prompt tuning (``peft_type: "PROMPT_TUNING"``); dispatched from ``formats/peft.py``.

Layout (peft 0.21): ``adapter_config.json`` with ``num_virtual_tokens``, ``token_dim``,
``num_transformer_submodules`` and ``task_type``; ``adapter_model.safetensors`` with

=========================================  =================================================  =================
key                                        meaning                                            adapterkit
=========================================  =================================================  =================
``prompt_embeddings``                      ``(P * num_transformer_submodules, token_dim)``    ``SoftPrompt.prompt``
``base_model.<module>.<param>``            ``modules_to_save`` copy (classifier of SEQ_CLS)   ``HeadCopy``
=========================================  =================================================  =================

peft's ``SEQ_2_SEQ_LM`` prompt tuning allocates ``2 P`` rows but only reads the first ``P`` (the encoder's
prompt); loading keeps those, exporting writes ``num_transformer_submodules: 1``. ``task_type`` follows the
model class on export (``CAUSAL_LM``, ``SEQ_2_SEQ_LM``, ``SEQ_CLS``, ``TOKEN_CLS``, ``QUESTION_ANS``, else
``FEATURE_EXTRACTION``); peft picks its model wrapper from it. A classifier (``SEQ_CLS``, ``TOKEN_CLS``,
``QUESTION_ANS``) whose adapter has no copy of its output head (``heads=[...]`` unset) is exported as
``FEATURE_EXTRACTION`` (:func:`prompt_task_type`): peft's classification wrappers add the head to
``modules_to_save`` and fail with a KeyError when the file lacks it, while its feature-extraction wrapper
prepends the prompt and keeps the base head, which is what the adapter computes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..component import Component
from ..methods.prompt import PromptTuning, SoftPrompt
from ..plan import Plan
from ..targeting import base_modules
from .io import AdapterFileError, import_checked, read_adapter, require_float
from .peft import Fields, adapter_task_type, task_type, write

PEFT_TYPE = "PROMPT_TUNING"
METHOD = "prompt_tuning"
EMBEDDINGS = "prompt_embeddings"
HEAD_PREFIXES = ("base_model.model.", "base_model.")

__all__ = [
    "PEFT_TYPE",
    "METHOD",
    "save",
    "load",
    "task_type",
    "prompt_task_type",
    "head_tensors",
    "split_heads",
    "install",
    "model_fields",
]


def prompt_task_type(ctl: Any, name: str) -> str:
    """peft's ``task_type`` for a prompt-method export of adapter ``name``: the model's
    (:func:`~adapterkit.formats.peft.adapter_task_type`), ``FEATURE_EXTRACTION`` where that is None (models of no
    peft task, and classifiers whose adapter has no copy of the output head). peft's plain ``PeftModel`` (task
    None) would not prepend the prompt; its classification wrappers expect the head copy in the file."""
    return adapter_task_type(ctl, name) or "FEATURE_EXTRACTION"


def head_tensors(ctl: Any, name: str) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The adapter's head copies as peft stores ``modules_to_save`` of prompt methods."""
    heads, tensors = [], {}
    for site, kind in ctl.sites(name).items():
        if kind != "head":
            continue
        heads.append(site)
        for k, v in ctl.components(name)[site].head.state_dict().items():
            tensors[f"base_model.{site}.{k}"] = v
    return heads, tensors


def split_heads(
    raw: dict[str, torch.Tensor], modules: dict[str, nn.Module], selectors: list[str], directory: Path
) -> dict[str, dict[str, torch.Tensor]]:
    """``base_model.<module>.<param>`` tensors -> module name -> ``{"head.<param>": tensor}``.

    Raises:
        AdapterFileError: a key that is no head of this model.
    """

    def is_head(site: str) -> bool:
        return site in modules and any(site == s or site.endswith("." + s) for s in selectors)

    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        rest = next((key[len(p) :] for p in HEAD_PREFIXES if key.startswith(p)), None)
        parts = rest.split(".") if rest is not None else []
        site = next(
            (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if is_head(".".join(parts[:i]))), None
        )
        if site is None:
            raise AdapterFileError(f"key {key!r} in {directory} is neither the prompt nor a head of this model")
        heads.setdefault(site, {})["head." + rest[len(site) + 1 :]] = value
    return heads


def install(
    ctl: Any,
    cfg: Any,
    state_of: Callable[[str, Component], dict[str, torch.Tensor]],
    name: str,
    path: Any,
    activate: bool,
) -> str:
    """Plan ``cfg`` on the model, load each component's ``state_of(module name, component)`` and attach it
    (all-or-nothing: the model is untouched until every state fits)."""
    ctl._check_new_name(name)
    modules = base_modules(ctl.model)
    try:
        plan = ctl.plan(cfg)
        for site, (_, comp) in plan.components.items():
            import_checked(comp, state_of(site, comp), modules[site])
    except (TypeError, ValueError) as e:
        raise AdapterFileError(
            f"peft adapter {str(path)!r} does not fit this {type(ctl.model).__name__}: {e}"
        ) from None
    ctl.install(name, Plan(plan.config, plan.components), activate=activate)
    return name


def model_fields(ctl: Any) -> dict[str, Any]:
    """The model-derived fields of a prompt-method ``adapter_config.json`` (layers, heads, base model name)."""
    config = getattr(ctl.model, "config", None)
    return {
        "num_layers": getattr(config, "num_hidden_layers", None),
        "num_attention_heads": getattr(config, "num_attention_heads", None),
        "base_model_name_or_path": getattr(ctl.model, "name_or_path", None) or None,
    }


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    cfg = ctl.config(name)
    assert isinstance(cfg, PromptTuning)
    (prompt,) = [c for c in ctl.components(name).values() if isinstance(c, SoftPrompt)]
    heads, tensors = head_tensors(ctl, name)
    tensors[EMBEDDINGS] = prompt.prompt.detach()
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": prompt_task_type(ctl, name),
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "token_dim": int(prompt.prompt.shape[1]),
        "num_transformer_submodules": 1,
        "prompt_tuning_init": "RANDOM",  # the values are trained; peft does not re-initialize in inference mode
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "modules_to_save": heads or None,
        "inference_mode": True,
        "revision": None,
        "auto_mapping": None,
        **model_fields(ctl),
    }
    write(path, tensors, config)


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    directory = Path(path)
    data, raw = read_adapter(directory, "adapter_model", allow_pickle=allow_pickle)
    fields = Fields(data, directory)
    n = fields.integer("num_virtual_tokens")
    if EMBEDDINGS not in raw:
        raise AdapterFileError(f"{directory} has no {EMBEDDINGS!r} tensor: not a peft prompt-tuning adapter")
    require_float({EMBEDDINGS: raw[EMBEDDINGS]}, directory)
    emb = raw.pop(EMBEDDINGS)
    if emb.dim() != 2 or emb.shape[0] < n:
        raise AdapterFileError(f"{EMBEDDINGS!r} in {directory} has shape {tuple(emb.shape)}; expected ({n}, dim)")
    modules = base_modules(ctl.model)
    heads = split_heads(raw, modules, fields.names("modules_to_save"), directory)
    cfg = fields.build(PromptTuning, num_virtual_tokens=n, init="random", heads=tuple(heads))

    def state_of(site: str, comp: Component) -> dict[str, torch.Tensor]:
        # the first n rows: the (encoder) prompt; peft's prompt tuning never reads a second submodule's rows
        return {"prompt": emb[:n].clone()} if isinstance(comp, SoftPrompt) else heads.get(site, {})

    return install(ctl, cfg, state_of, name or "default", path, activate)
