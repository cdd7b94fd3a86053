"""peft interop for prefix tuning / P-tuning v2 (``peft_type: "PREFIX_TUNING"``); dispatched from ``formats/peft.py``.

Layout (peft 0.21): ``adapter_config.json`` with ``num_virtual_tokens``, ``num_layers``, ``token_dim`` (the
key/value width: ``num_key_value_heads * head_dim`` with grouped-query attention), ``num_attention_heads``
(key/value heads), ``num_transformer_submodules``, ``prefix_projection`` and ``task_type``;
``adapter_model.safetensors`` holds ``prompt_embeddings: (P, num_layers * 2 * token_dim)``, the computed
prefix even when peft trained through the MLP, plus ``modules_to_save`` copies (``base_model.<module>.<param>``).
adapterkit's ``PrefixKV.prefix`` has the same layout.

Encoder-decoder models (``num_transformer_submodules: 2``): peft 0.21 gives decoder layer ``i`` the prefix
stored in layer slot ``(2 i) mod num_layers`` (it duplicates the per-layer list for the cross-attention and
splits it in fours), so loading reads those slots, which makes the logits equal peft's. Exporting writes
``2 L`` slots with layer ``i``'s prefix in slot ``2 i`` (odd slots zero, never read), so any prefix survives
the round trip exactly; peft reads such a file correctly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..component import Component
from ..methods.prefix import PrefixKV, PrefixTuning
from ..targeting import base_modules
from .io import AdapterFileError, read_adapter, require_float
from .peft import Fields, write
from .peft_prompt import EMBEDDINGS, head_tensors, install, prompt_task_type, split_heads

PEFT_TYPE = "PREFIX_TUNING"
METHOD = "prefix_tuning"

__all__ = ["PEFT_TYPE", "METHOD", "save", "load"]


def _component(ctl: Any, name: str) -> PrefixKV:
    (comp,) = [c for c in ctl.components(name).values() if isinstance(c, PrefixKV)]
    return comp


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    cfg = ctl.config(name)
    assert isinstance(cfg, PrefixTuning)
    if getattr(cfg, "positions", "shift") != "shift" or getattr(cfg, "gated", False):
        raise ValueError(
            f"adapter {name!r} is an AdapterHub-style prefix (positions={cfg.positions!r}, gated={cfg.gated}); peft's "
            "prefix tuning numbers positions after the prefix and has no gate, so it would compute something else: "
            "export it with format='native' (or as AdapterHub's once that export exists)"
        )
    comp = _component(ctl, name)
    lay, n = comp.layout, comp.num_virtual_tokens
    prefix = comp.values().detach()  # (P, L * 2 * kv_dim)
    slots = lay.num_layers
    if lay.encoder_decoder:  # peft reads slot 2i for decoder layer i (see the module docstring)
        slots = 2 * lay.num_layers
        stored = prefix.new_zeros(n, slots, 2 * lay.kv_dim)
        stored[:, 0::2] = prefix.view(n, lay.num_layers, 2 * lay.kv_dim)
        prefix = stored.view(n, -1)
    heads, tensors = head_tensors(ctl, name)
    tensors[EMBEDDINGS] = prefix
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": prompt_task_type(ctl, name),
        "num_virtual_tokens": n,
        "num_layers": slots,
        "token_dim": lay.kv_dim,
        "num_attention_heads": lay.num_kv_heads,
        "num_transformer_submodules": 2 if lay.encoder_decoder else 1,
        "encoder_hidden_size": lay.kv_dim,
        "prefix_projection": False,  # the MLP (if any) is folded into the stored prefix
        "init_weights": None,
        "modules_to_save": heads or None,
        "inference_mode": True,
        "revision": None,
        "auto_mapping": None,
        "base_model_name_or_path": getattr(ctl.model, "name_or_path", None) or None,
    }
    write(path, tensors, config)


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    directory = Path(path)
    data, raw = read_adapter(directory, "adapter_model", allow_pickle=allow_pickle)
    fields = Fields(data, directory)
    n, slots, width = (fields.integer(k) for k in ("num_virtual_tokens", "num_layers", "token_dim"))
    if EMBEDDINGS not in raw:
        raise AdapterFileError(f"{directory} has no {EMBEDDINGS!r} tensor: not a peft prefix-tuning adapter")
    require_float({EMBEDDINGS: raw[EMBEDDINGS]}, directory)
    stored = raw.pop(EMBEDDINGS)
    if tuple(stored.shape) != (n, slots * 2 * width):
        raise AdapterFileError(
            f"{EMBEDDINGS!r} in {directory} has shape {tuple(stored.shape)}, but its config says "
            f"({n}, num_layers {slots} x 2 x token_dim {width})"
        )
    modules = base_modules(ctl.model)
    heads = split_heads(raw, modules, fields.names("modules_to_save"), directory)
    cfg = fields.build(PrefixTuning, num_virtual_tokens=n, prefix_projection=False, heads=tuple(heads))
    submodules = data.get("num_transformer_submodules")
    if submodules is None:  # older peft files: the task tells
        submodules = 2 if data.get("task_type") == "SEQ_2_SEQ_LM" else 1
    elif isinstance(submodules, bool) or submodules not in (1, 2):
        raise fields.error("num_transformer_submodules", submodules, "1 or 2")

    def state_of(site: str, comp: Component) -> dict[str, torch.Tensor]:
        if not isinstance(comp, PrefixKV):
            return heads.get(site, {})
        lay = comp.layout
        if width != lay.kv_dim:
            raise ValueError(
                f"its prefixes are {width} wide per layer, but this model's keys/values are {lay.kv_dim} wide "
                f"({lay.num_kv_heads} key/value heads x {lay.head_dim}); was it saved for another model, or by a "
                "peft version before grouped-query attention support?"
            )
        per_slot = stored.view(n, slots, 2 * width)
        if submodules == 2:  # peft's reading for encoder-decoder models: slot (2 i) mod num_layers
            if slots < lay.num_layers:
                raise ValueError(f"it holds {slots} layer slots; this decoder has {lay.num_layers} layers")
            index = [(2 * i) % slots for i in range(lay.num_layers)]
            return {"prefix": per_slot[:, index].reshape(n, -1).clone()}
        if slots != lay.num_layers:
            raise ValueError(f"it holds prefixes for {slots} layers; this model has {lay.num_layers}")
        return {"prefix": stored.clone()}

    return install(ctl, cfg, state_of, name or "default", path, activate)
