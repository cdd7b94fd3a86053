"""peft interop for VB-LoRA (``peft_type: "VBLORA"``); dispatched from ``formats/peft.py``.

Layout (peft 0.21): ``adapter_config.json`` with ``r``, ``num_vectors``, ``vector_length``, ``topk``,
``save_only_topk_weights``, ``vblora_dropout``, ``init_vector_bank_bound``, ``init_logits_std``, ``fan_in_fan_out``,
``bias``, ``target_modules``, ``modules_to_save``; ``adapter_model.safetensors`` with

=================================================================  =======================  ========================
key                                                                shape                    adapterkit tensor
=================================================================  =======================  ========================
``base_model.model.<module path>.vblora_logits_A``                 ``(r, in/b, h)``         ``VBLoRALinear.logits_A``
``base_model.model.<module path>.vblora_logits_B``                 ``(out/b, r, h)``        ``VBLoRALinear.logits_B``
``base_model.vblora_vector_bank``                                  ``(h, b)``               the shared ``VectorBank``
``base_model.model.<head>.<param>``                                head                     ``HeadCopy``
=================================================================  =======================  ========================

With ``save_only_topk_weights`` each logits tensor ``…vblora_logits_X`` is stored as ``…vblora_logits_X_topk_indices``
``(…, k)`` (uint8/int16/int32/int64 by the bank's size) and ``…vblora_logits_X_topk_weights`` ``(…, k − 1)`` (softmax
weights; the last is ``1 − Σ``); both libraries rebuild the logits as ``log w`` at the kept indices and ``−inf``
elsewhere, which gives the same mixtures (such an adapter serves and merges but does not train). Exports write that
form when the adapter's config has ``save_only_topk_weights=True`` (native files keep the full logits). peft's ``bias="all"``/``"vblora_only"`` (training
the base biases) is not supported: such files are refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..component import Component
from ..methods.vblora import VBLoRA
from ._peft_sites import check_sites, export_state, install_planned, peft_config, read_sites
from .io import AdapterFileError, import_checked, read_adapter, require_float
from .peft import PREFIX, Fields, write

PEFT_TYPE = "VBLORA"
METHOD = "vblora"
BANK = "base_model.vblora_vector_bank"
_OURS = ("logits_A", "logits_B")
_FORMS = ("", "_topk_indices", "_topk_weights")


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    cfg = ctl._record(name).config
    assert isinstance(cfg, VBLoRA)
    conv1d: list[bool] = []
    banks: list[torch.Tensor] = []

    def site_tensors(site: str, comp: Any, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        conv1d.append(type(module).__name__ == "Conv1D")
        banks.append(comp.bank.vector_bank)
        state = comp.topk_state() if cfg.save_only_topk_weights else {k: getattr(comp, k) for k in _OURS}
        return {f"vblora_{k}": v for k, v in state.items()}

    tensors, targets, heads = export_state(ctl, name, site_tensors)
    tensors[BANK] = banks[-1].detach().contiguous()  # one bank shared by every site
    config = peft_config(
        ctl, name, PEFT_TYPE, targets, heads, r=cfg.r, num_vectors=cfg.num_vectors,
        vector_length=cfg.vector_length, topk=cfg.topk, save_only_topk_weights=cfg.save_only_topk_weights,
        vblora_dropout=cfg.dropout, fan_in_fan_out=any(conv1d), bias="none",
        init_vector_bank_bound=cfg.init_vector_bank_bound, init_logits_std=cfg.init_logits_std,
        exclude_modules=None, layers_to_transform=None, layers_pattern=None,
    )  # fmt: skip
    write(path, tensors, config)


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    directory = Path(path)
    data, raw = read_adapter(directory, "adapter_model", allow_pickle=allow_pickle)
    fields = Fields(data, directory)
    if fields.choice("bias", "none", ("none", "all", "vblora_only")) != "none":
        raise AdapterFileError(
            f"{fields.where}: peft VB-LoRA adapters with bias={data['bias']!r} (trained base biases) are not "
            "supported yet"
        )
    name = name or "default"
    ctl._check_new_name(name)
    if BANK not in raw:
        raise AdapterFileError(f"{directory} has no {BANK!r}: a peft VB-LoRA file holds its vector bank there")
    bank = raw[BANK]
    require_float({BANK: bank}, directory)
    # top-k indices are integers: set them aside so the shared checks (floating tensors only) see the rest
    indices = {k: raw[k] for k in raw if k.endswith("_topk_indices")}
    rest = {k: v for k, v in raw.items() if k not in indices}
    suffixes = {
        f"vblora_{ours}{form}": f"{ours}{form}" for ours in _OURS for form in _FORMS if form != "_topk_indices"
    }
    modules, per_site, heads = read_sites(
        ctl, rest, fields, path, suffixes, "VB-LoRA logits (keys ending in '.vblora_logits_A')", skip=(BANK,)
    )
    for key, value in indices.items():
        rest_key = key[len(PREFIX) :] if key.startswith(PREFIX) else ""
        site, _, leaf = rest_key.rpartition(".")
        if not leaf.startswith("vblora_logits_"):
            raise AdapterFileError(f"key {key!r} in {directory} does not belong to this model")
        check_sites([site], modules, path, ctl.model)
        per_site.setdefault(site, {})[leaf.removeprefix("vblora_")] = value
    num_vectors = fields.integer("num_vectors", 256)
    vector_length = fields.integer("vector_length", 256)
    if tuple(bank.shape) != (num_vectors, vector_length):
        raise AdapterFileError(
            f"{directory}: {BANK} is {tuple(bank.shape)}, but the config says num_vectors={num_vectors}, "
            f"vector_length={vector_length}"
        )
    cfg = fields.build(
        VBLoRA,
        r=fields.integer("r", 4),
        num_vectors=num_vectors,
        vector_length=vector_length,
        topk=fields.integer("topk", 2),
        save_only_topk_weights=fields.flag("save_only_topk_weights", False),
        dropout=fields.number("vblora_dropout", 0.0),
        init_vector_bank_bound=fields.number("init_vector_bank_bound", 0.02),
        init_logits_std=fields.number("init_logits_std", 0.1),
        targets=tuple(per_site),
        heads=tuple(heads),
    )

    def load_into(site: str, kind: str, comp: Component, module: Any) -> None:
        if kind == "head":
            import_checked(comp, heads[site], module)
        else:  # every site is handed the bank; its owner (the first site) keeps it, the others share it
            import_checked(comp, {**per_site[site], "bank.vector_bank": bank}, module)

    return install_planned(ctl, name, cfg, path, load_into, activate=activate)
