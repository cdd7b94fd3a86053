"""What every AdapterHub export writer shares (``formats/adapterhub_export.py`` and its ``adapterhub_export_*``
modules): the error, the library version and model types written for, and the mapping of our module paths to
AdapterHub's (transformers 4.57 names; the format: ../shared/formats/adapterhub.md)."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..profiles import profile_for
from ..targeting import TargetError, select

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
    "KINDS",
    "role_sites",
    "layer_of",
    "location",
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


def role_sites(ctl: Any, role: str, modules: dict[str, nn.Module]) -> list[str]:
    """The modules of ``role`` among ``modules`` (none when the model's profile lacks the role)."""
    family, roles = profile_for(ctl.model)
    if role not in roles:
        return []
    try:
        return select(ctl.model, [role], family=family, roles=roles, modules=modules)
    except TargetError:
        return []


def layer_of(site: str, blocks: list[str]) -> int | None:
    """Index of the block holding ``site`` (None: outside every block)."""
    for i, block in enumerate(blocks):
        if site == block or site.startswith(block + "."):
            return i
    return None


KINDS = {"attn.sublayer": "mh", "cross.sublayer": "cross", "ffn.sublayer": "output"}


def location(mtype: str, kind: str, site: str, block: str) -> str:
    """AdapterHub's module holding the ``adapters`` ModuleDict of this sub-layer adapter (4.57 names)."""
    if mtype in ("t5", "mt5"):
        return site.rpartition(".")[0]  # the block.{i}.layer.{j} module itself
    hub_block = hub_path(mtype, block)
    if mtype in BERT_LIKE:
        table = {"mh": ".attention.output", "output": ".output"}
    elif mtype == "vit":
        table = {"mh": ".attention_adapters", "output": ".output.output_adapters"}
    else:  # distilbert, gpt2, llama, mistral, bart: BottleneckLayer sub-modules of the layer
        table = {"mh": ".attention_adapters", "output": ".output_adapters", "cross": ".cross_attention_adapters"}
    if kind not in table:
        raise AdapterHubExportError(f"AdapterHub has no {kind} adapter in {mtype!r} layers ({site!r})")
    return hub_block + table[kind]
