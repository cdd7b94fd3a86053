"""What every AdapterHub export writer shares (``formats/adapterhub_export.py`` and its ``adapterhub_export_*``
modules): the error, the library version and model types written for, and the mapping of our module paths to
AdapterHub's (transformers 4.57 names; the format: ../shared/formats/adapterhub.md)."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

__all__ = [
    "AdapterHubExportError",
    "VERSION",
    "MODEL_TYPES",
    "BERT_LIKE",
    "SWAPPED_MLP",
    "model_type",
    "hub_path",
    "targets",
    "owner",
]

VERSION = "adapters.1.3.0"  # the library version whose load_adapter this format is written for

# model types both libraries support (adapters 1.3.0's models/ that have a profile here with the same module names)
BERT_LIKE = ("bert", "roberta", "xlm-roberta", "electra")
MODEL_TYPES = (*BERT_LIKE, "distilbert", "gpt2", "llama", "mistral", "t5", "mt5", "bart", "vit")
# LLaMA and Mistral wrap mlp.down_proj as AdapterHub's "intermediate" and mlp.up_proj as its "output"
SWAPPED_MLP = ("llama", "mistral")


class AdapterHubExportError(ValueError):
    """An adapter that AdapterHub's format cannot hold exactly (the message says why and what would fit)."""


def model_type(ctl: Any) -> str:
    """The model's ``config.model_type``, one both libraries support.

    Raises:
        AdapterHubExportError: another model type.
    """
    mtype = getattr(getattr(ctl.model, "config", None), "model_type", None)
    if mtype not in MODEL_TYPES:
        raise AdapterHubExportError(
            f"AdapterHub export supports the model types both libraries have ({', '.join(MODEL_TYPES)}); "
            f"this {type(ctl.model).__name__} is {mtype!r}"
        )
    return mtype


def hub_path(mtype: str, path: str) -> str:
    """Our module path in transformers 4.57's names (what ``adapters`` 1.3.0 runs on); only ViT was renamed."""
    if mtype != "vit" or not re.search(r"(^|\.)layers\.\d+(\.|$)", path):
        return path
    path = re.sub(r"(^|\.)layers\.(\d+)(?=\.|$)", r"\1encoder.layer.\2", path)
    for ours, theirs in (
        (".attention.q_proj", ".attention.attention.query"),
        (".attention.k_proj", ".attention.attention.key"),
        (".attention.v_proj", ".attention.attention.value"),
        (".attention.o_proj", ".attention.output.dense"),
        (".mlp.fc1", ".intermediate.dense"),
        (".mlp.fc2", ".output.dense"),
    ):
        if path.endswith(ours):
            return path[: -len(ours)] + theirs
    return path


def targets(ctl: Any, name: str) -> dict[str, Any]:
    """The adapter's components except its head copies (site -> component)."""
    kinds = ctl.sites(name)
    return {s: c for s, c in ctl.components(name).items() if kinds[s] != "head"}


def owner(model: nn.Module) -> str:
    """The key prefix of modules AdapterHub keeps on the base model (``shared_parameters``, ``invertible_adapters``,
    the prefix-tuning pool, the prompt): ``"bert."`` on a model with a head, ``""`` on the bare base model."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    return f"{prefix}." if prefix and hasattr(model, prefix) else ""
