"""peft interop for P-tuning (``peft_type: "P_TUNING"``, peft's ``PromptEncoderConfig``); dispatched from
``formats/peft.py``.

Layout (peft 0.21): ``adapter_config.json`` with ``num_virtual_tokens``, ``token_dim``,
``num_transformer_submodules``, ``encoder_reparameterization_type`` (``MLP``/``LSTM``), ``encoder_hidden_size``,
``encoder_num_layers``, ``encoder_dropout`` and ``task_type``; ``adapter_model.safetensors`` with

=========================================  ===========================================  ===========================
key                                        meaning                                      adapterkit
=========================================  ===========================================  ===========================
``prompt_embeddings``                      the prompt encoder's *output* for the whole  ``PTuningPrompt`` holding
                                           table, ``(P * num_transformer_submodules,    it as ``prompt_embeddings``
                                           token_dim)``
``base_model.<module>.<param>``            ``modules_to_save`` copy (classifier)        ``HeadCopy``
=========================================  ===========================================  ===========================

peft saves ``get_prompt_embedding_to_save`` (the encoder run over the table), never the encoder's weights; in
inference mode it uses that tensor directly as the prompt. So a loaded adapter computes peft's outputs but has no
encoder: it has ``stored_prompt=True`` and holds the stored output as a trainable parameter (see :mod:`adapterkit.methods.ptuning`). Our export
writes the encoder's output the same way, with ``inference_mode: true``; ``task_type`` as prompt tuning's
(:func:`~adapterkit.formats.peft_prompt.prompt_task_type`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..component import Component
from ..methods.ptuning import PTuning, PTuningPrompt
from ..targeting import base_modules
from .io import AdapterFileError, read_adapter, require_float
from .peft import Fields
from .peft import write as write_peft
from .peft_prompt import EMBEDDINGS, head_tensors, install, model_fields, prompt_task_type, split_heads

PEFT_TYPE = "P_TUNING"
METHOD = "p_tuning"

__all__ = ["PEFT_TYPE", "METHOD", "save", "load"]


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    cfg = ctl.config(name)
    assert isinstance(cfg, PTuning)
    (prompt,) = [c for c in ctl.components(name).values() if isinstance(c, PTuningPrompt)]
    heads, tensors = head_tensors(ctl, name)
    with torch.no_grad():
        was = prompt.training
        prompt.eval()  # peft saves the output without dropout (its saving runs in the model's eval mode)
        try:
            out = prompt.virtual_tokens().detach().clone()
        finally:
            prompt.train(was)
    tensors[EMBEDDINGS] = out
    dim = int(out.shape[1])
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": prompt_task_type(ctl, name),
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "token_dim": dim,
        "num_transformer_submodules": cfg.num_transformer_submodules,
        "encoder_reparameterization_type": cfg.encoder_reparameterization_type.value,
        "encoder_hidden_size": cfg.encoder_hidden_size or dim,
        "encoder_num_layers": cfg.encoder_num_layers,
        "encoder_dropout": cfg.encoder_dropout,
        "modules_to_save": heads or None,
        "inference_mode": True,  # the file holds the encoder's output, which peft then uses directly
        "revision": None,
        "auto_mapping": None,
        **model_fields(ctl),
    }
    write_peft(path, tensors, config)


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    directory = Path(path)
    data, raw = read_adapter(directory, "adapter_model", allow_pickle=allow_pickle)
    fields = Fields(data, directory)
    n = fields.integer("num_virtual_tokens")
    submodules = data.get("num_transformer_submodules")
    submodules = 1 if submodules is None else fields.integer("num_transformer_submodules")
    if EMBEDDINGS not in raw:
        raise AdapterFileError(f"{directory} has no {EMBEDDINGS!r} tensor: not a peft P-tuning adapter")
    require_float({EMBEDDINGS: raw[EMBEDDINGS]}, directory)
    emb = raw.pop(EMBEDDINGS)
    if emb.dim() != 2 or emb.shape[0] != n * submodules:
        raise AdapterFileError(
            f"{EMBEDDINGS!r} in {directory} has shape {tuple(emb.shape)}; expected ({n * submodules}, dim) "
            f"(num_virtual_tokens {n} x num_transformer_submodules {submodules})"
        )
    token_dim = data.get("token_dim")
    if token_dim is not None and fields.integer("token_dim") != emb.shape[1]:
        raise AdapterFileError(
            f"{EMBEDDINGS!r} in {directory} is {emb.shape[1]} wide but token_dim says {token_dim}"
        )
    modules = base_modules(ctl.model)
    heads = split_heads(raw, modules, fields.names("modules_to_save"), directory)
    hidden = data.get("encoder_hidden_size")
    cfg = fields.build(
        PTuning,
        num_virtual_tokens=n,
        encoder_reparameterization_type=fields.choice(
            "encoder_reparameterization_type", "MLP", ("MLP", "LSTM", "mlp", "lstm")
        ),
        encoder_hidden_size=None if hidden is None else fields.integer("encoder_hidden_size"),
        encoder_num_layers=fields.integer("encoder_num_layers", 2),
        encoder_dropout=fields.number("encoder_dropout", 0.0),
        num_transformer_submodules=submodules,
        stored_prompt=True,
        heads=tuple(heads),
    )

    def state_of(site: str, comp: Component) -> dict[str, torch.Tensor]:
        return {EMBEDDINGS: emb.clone()} if isinstance(comp, PTuningPrompt) else heads.get(site, {})

    return install(ctl, cfg, state_of, name or "default", path, activate)
