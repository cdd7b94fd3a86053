"""peft interop for LLaMA-Adapter (``peft_type: "ADAPTION_PROMPT"``); dispatched from ``formats/peft.py``.

Layout (peft 0.21): ``adapter_config.json`` with ``adapter_len``, ``adapter_layers`` (counted from the top),
``target_modules`` (the attention modules' attribute name, ``"self_attn"`` on LLaMA/Mistral) and ``task_type``;
``adapter_model.safetensors`` holds, per adapted attention module,

=====================================================  ==========================  ==============================
key                                                    shape                       adapterkit
=====================================================  ==========================  ==============================
``base_model.model.<attention>.adaption_prompt``       ``(1, adapter_len, hidden)``  ``AdaptionPrompt.adaption_prompt``
``base_model.model.<attention>.adaption_gate``         ``(1,)``                    ``AdaptionPrompt.adaption_gate``
=====================================================  ==========================  ==============================

peft adapts the top ``adapter_layers`` modules whose names end in ``.<target_modules>``, so a file is read as
``LlamaAdapter(adapter_len, adapter_layers)`` and its modules must be the ones that config plans here. peft's GPT-2
path adds the gated result without the output projection ``c_proj``: GPT-2 files load as
``project_output=False``, and only such GPT-2 adapters export (LLaMA/Mistral ones need ``project_output=True``).
Refused, with the reason: ``modules_to_save``, and on export per-head gates (``gate="head"``: peft has one gate per
layer), models peft cannot load (its ``adaption_prompt`` knows ``llama``, ``mistral`` and ``gpt2``; others get
``format="native"``), output projections with a bias (peft adds the bias to the adapter's output) and adapters on
another set of layers than peft's top ``adapter_layers``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..methods.llama_adapter import AdaptionPrompt, LlamaAdapter
from ._peft_sites import install_planned, read_sites
from .io import AdapterFileError, read_adapter
from .peft import PREFIX, Fields, task_type, write

PEFT_TYPE = "ADAPTION_PROMPT"
METHOD = "llama_adapter"
# peft's TRANSFORMERS_MODEL_CONFIG: model type -> (attention attribute, whether the result goes through the output
# projection, i.e. our project_output)
PEFT_MODEL_TYPES = {"llama": ("self_attn", True), "mistral": ("self_attn", True), "gpt2": ("attn", False)}
_SUFFIXES = {"adaption_prompt": "adaption_prompt", "adaption_gate": "adaption_gate"}

__all__ = ["PEFT_TYPE", "METHOD", "save", "load"]


def _model_type(ctl: Any) -> str | None:
    return getattr(getattr(ctl.model, "config", None), "model_type", None)


def _peft_parents(ctl: Any, target: str) -> list[str]:
    """The modules peft's ``add_adapter`` finds for ``target_modules`` (names ending in ``.<target>``), in order."""
    return [n for n, _ in ctl.model.named_modules() if n.endswith("." + target) and "ak_adapters" not in n]


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    cfg = ctl.config(name)
    assert isinstance(cfg, LlamaAdapter)
    mtype = _model_type(ctl)
    if mtype not in PEFT_MODEL_TYPES:
        raise ValueError(
            f"peft's adaption_prompt supports {', '.join(sorted(PEFT_MODEL_TYPES))} models, not {mtype!r}: peft "
            "could not load this export; use format='native'"
        )
    target, projected = PEFT_MODEL_TYPES[mtype]
    if cfg.project_output != projected:
        raise ValueError(
            f"peft's adaption_prompt on {mtype} adds the result {'through' if projected else 'without'} the output "
            f"projection, but adapter {name!r} has project_output={cfg.project_output}; use format='native'"
        )
    if cfg.gate != "layer":
        raise ValueError(
            f"adapter {name!r} has one gate per head (gate='head'); peft's adaption_prompt has one gate per layer, "
            "so it cannot hold it; use format='native'"
        )
    comps = ctl.components(name)
    kinds = ctl.sites(name)
    if any(kind == "head" for kind in kinds.values()):
        raise ValueError(
            f"adapter {name!r} has head copies (heads=...), which peft's adaption_prompt does not save; use "
            "format='native'"
        )
    sites = sorted(comps, key=list(dict(ctl.model.named_modules())).index)
    parents = _peft_parents(ctl, target)
    if sites != parents[len(parents) - len(sites) :]:
        raise ValueError(
            f"adapter {name!r} sits on {sites}, but peft adapts the top adapter_layers={len(sites)} modules named "
            f"'{target}' ({parents[len(parents) - len(sites) :]}); use format='native'"
        )
    tensors: dict[str, torch.Tensor] = {}
    for site in sites:
        comp = comps[site]
        assert isinstance(comp, AdaptionPrompt)
        out = comp.layout.out
        if projected and out is not None and isinstance(getattr(out, "bias", None), torch.Tensor):
            raise ValueError(
                f"{site}'s output projection has a bias, which peft adds to the adapter's output (so its model is "
                "no identity at a zero gate and differs from ours); use format='native'"
            )
        tensors[f"{PREFIX}{site}.adaption_prompt"] = comp.adaption_prompt.detach().contiguous()
        tensors[f"{PREFIX}{site}.adaption_gate"] = comp.adaption_gate.detach().contiguous()
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": task_type(ctl.model, default="CAUSAL_LM"),
        "base_model_name_or_path": getattr(ctl.model, "name_or_path", None) or None,
        "target_modules": target,
        "adapter_len": cfg.adapter_len,
        "adapter_layers": len(sites),
        "inference_mode": True,
        "revision": None,
        "auto_mapping": None,
    }
    write(path, tensors, config)


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    directory = Path(path)
    data, raw = read_adapter(directory, "adapter_model", allow_pickle=allow_pickle)
    fields = Fields(data, directory)
    n, layers = fields.integer("adapter_len"), fields.integer("adapter_layers")
    default_target, projected = PEFT_MODEL_TYPES.get(_model_type(ctl) or "", ("self_attn", True))
    if fields.names("modules_to_save"):
        raise AdapterFileError(f"{fields.where}: modules_to_save with adaption prompts is not supported")
    name = name or "default"
    ctl._check_new_name(name)
    _, per_site, _ = read_sites(
        ctl, raw, fields, path, _SUFFIXES, "adaption prompts (keys ending in '.adaption_prompt')"
    )
    target = data.get("target_modules") or default_target
    if not isinstance(target, str):
        raise fields.error("target_modules", target, "the attention modules' name (a string)")
    cfg = fields.build(LlamaAdapter, adapter_len=n, adapter_layers=layers, project_output=projected)
    planned = list(ctl.plan(cfg).components) if per_site else []
    if sorted(planned) != sorted(per_site) or not all(s.endswith("." + target) for s in per_site):
        raise AdapterFileError(
            f"peft adapter {str(path)!r} holds prompts for {sorted(per_site)}, but the top adapter_layers={layers} "
            f"attention modules of this {type(ctl.model).__name__} are {planned}: wrong base model?"
        )

    def load_into(site: str, kind: str, comp: Any, module: torch.nn.Module) -> None:
        state = per_site[site]
        if set(state) != set(_SUFFIXES.values()):
            raise ValueError(f"{site} needs adaption_prompt and adaption_gate, the file has {sorted(state)}")
        out = comp.layout.out
        if projected and out is not None and isinstance(getattr(out, "bias", None), torch.Tensor):
            raise ValueError(
                f"{site}'s output projection has a bias, which peft adds to the adapter's output; adapterkit "
                "leaves it out (identity at a zero gate), so this file cannot be loaded exactly"
            )
        prompt, gate = state["adaption_prompt"], state["adaption_gate"]
        if tuple(prompt.shape) != tuple(comp.adaption_prompt.shape):
            raise ValueError(
                f"{site}.adaption_prompt has shape {tuple(prompt.shape)}, expected {tuple(comp.adaption_prompt.shape)}"
            )
        if tuple(gate.shape) != tuple(comp.adaption_gate.shape):
            raise ValueError(f"{site}.adaption_gate has shape {tuple(gate.shape)}, expected (1,)")
        comp.import_state({"adaption_prompt": prompt, "adaption_gate": gate}, module)

    return install_planned(ctl, name, cfg, path, load_into, activate=activate)
