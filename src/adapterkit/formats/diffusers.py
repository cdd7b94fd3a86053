"""Export for diffusers' own loaders: ``model.load_lora_adapter(dir, prefix=...)`` on a diffusers model (a
``UNet2DConditionModel``, an SD3/Flux transformer, ...) and ``load_lora_into_text_encoder`` for a pipeline's
text encoder (issue 19, item 6).

A peft directory does not load there: its keys carry peft's wrapper prefix ``base_model.model.`` and diffusers
filters keys by a component prefix (``unet.``, ``transformer.``, ``text_encoder.``) instead, reading
``pytorch_lora_weights.safetensors``. What diffusers 0.42 reads (``diffusers/loaders/peft.py``
``load_lora_adapter``, ``utils/peft_utils.py`` ``_create_lora_config``/``_create_lokr_config``, ``loaders/
lora_base.py`` ``write_lora_layers``; read 2026-12):

- the file ``pytorch_lora_weights.safetensors``, tensors keyed ``<prefix>.<module path>.lora_A.weight`` (and
  ``lora_B``, ``lora_magnitude_vector``, ``lokr_w1``, ...: peft's own tensor names);
- the safetensors metadata entry ``lora_adapter_metadata``: the JSON of peft's ``LoraConfig``/``LoKrConfig``
  keyword arguments with every key prefixed the same way. diffusers builds the config from it when present
  (otherwise it guesses ranks from shapes and alphas from ``network_alphas``), so ranks, alphas, patterns and
  DoRA survive exactly.

LoRA (DoRA, rsLoRA, rank/alpha patterns included) and LoKr are written (diffusers loads no other peft type);
adapter-owned head copies are refused (diffusers has no ``modules_to_save``). Other mergeable methods can be
converted to LoRA first with ``export(..., target="vllm", rank=...)``'s SVD, or written as kohya/LyCORIS files.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from .io import read_json, read_tensors
from .peft import PREFIX
from .peft import save as save_peft

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
_METHODS = {"lora": "LORA", "lokr": "LOKR"}
_NOT_CONFIG = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping")


def default_prefix(model: Any) -> str:
    """The component prefix diffusers' pipelines use for ``model``: ``unet`` for UNets, ``text_encoder`` for
    transformers models (a pipeline's text encoder; pass ``text_encoder_2`` for SDXL's second one),
    ``transformer`` otherwise (SD3, Flux, ... : the default of ``load_lora_adapter``)."""
    name = type(model).__name__
    if "UNet" in name:
        return "unet"
    if type(model).__module__.startswith("transformers."):
        return "text_encoder"
    return "transformer"


def export(ctl: Any, name: str, path: str | os.PathLike, *, prefix: str | None = None) -> Path:
    """Write adapter ``name`` as ``<path>/pytorch_lora_weights.safetensors`` for diffusers.

    Load it with ``model.load_lora_adapter(path, prefix=prefix, use_safetensors=True)`` (diffusers looks for a
    pickled ``.bin`` unless told ``use_safetensors=True`` or ``weight_name=``), or a pipeline's
    ``load_lora_weights(path)`` when the prefix is the pipeline's component name.

    Args:
        ctl: the :class:`~adapterkit.Adapters` holding the adapter.
        name: the adapter (a LoRA or LoKr adapter).
        path: output directory.
        prefix: the component prefix of every key (default: :func:`default_prefix`); ``""`` writes bare module
            paths (load with ``prefix=None``).

    Returns:
        The written file.

    Raises:
        ValueError: the adapter is neither LoRA nor LoKr, or it owns head copies (``heads=``).
    """
    method = str(ctl.config(name).method)
    if method not in _METHODS:
        raise ValueError(
            f"adapter {name!r} is {method!r}; diffusers' load_lora_adapter loads LoRA and LoKr only: convert it "
            f"to LoRA with export(..., target='vllm', rank=16) or write a kohya/LyCORIS file"
        )
    prefix = default_prefix(ctl.model) if prefix is None else prefix
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapterkit-diffusers-", dir=out))
    try:
        save_peft(ctl, name, staging / "peft")
        config = read_json(staging / "peft" / "adapter_config.json")
        tensors = read_tensors(staging / "peft", "adapter_model")
        if config.get("modules_to_save"):
            raise ValueError(
                f"adapter {name!r} owns copies of {', '.join(config['modules_to_save'])} (heads=); diffusers "
                "cannot load them: export an adapter without heads"
            )
        lead = f"{prefix}." if prefix else ""
        weights = {lead + k.removeprefix(PREFIX): v for k, v in tensors.items()}
        kwargs = {k: v for k, v in config.items() if k not in _NOT_CONFIG}
        metadata = {"format": "pt", METADATA_KEY: json.dumps({lead + k: v for k, v in kwargs.items()}, indent=2,
                                                             sort_keys=True)}  # fmt: skip
        tmp = out / f".{WEIGHT_NAME}.{secrets.token_hex(4)}"
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, out / WEIGHT_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / WEIGHT_NAME
