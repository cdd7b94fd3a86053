"""AdapterHub prompt tuning (``config.architecture == "prompt_tuning"``); dispatched from ``formats/adapterhub.py``.

File: ``<p>prompt_tuning.prompt_tunings.<name>.prompt_embedding.weight: (P, H)``; config ``prompt_length``,
``combine`` (``"prefix"``; ``"prefix_after_bos"`` puts the prompt after the first token), ``prompt_init``,
``prompt_init_text``, ``random_uniform_scale`` (only for initialization).

AdapterHub prepends the prompt to the output of the model's embeddings module (after the position embeddings and,
on BERT, the LayerNorm), extends the attention mask and keeps the ``P`` positions in the outputs: that is
:class:`~adapterkit.methods.embedding_prompt.EmbeddingPrompt`, not peft-style
:class:`~adapterkit.methods.prompt.PromptTuning`. Read for BERT-like encoders and DistilBERT (model types below;
checked on the BERT and DistilBERT fixtures: adapters 1.3.0 runs DistilBERT's prompt only under sdpa attention and
without padding, see tests/fixtures/adapterhub/make_fixtures.py); refused with the reason: ``combine: "prefix_after_bos"`` and decoder models (GPT-2, LLaMA:
AdapterHub's prompt goes after their token embedding, before positions are assigned, a placement not read yet).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..methods.embedding_prompt import EmbeddingPrompt, EmbeddingsOutputPrompt
from ..plan import Plan
from ..targeting import TargetError
from .adapterhub_files import AdapterHubFile
from .io import AdapterFileError, require_float
from .peft import Fields

ARCHITECTURES = ("prompt_tuning",)
__all__ = ["ARCHITECTURES", "refusal", "plan_of", "load"]

# model types whose AdapterHub prompt sits after an ``embeddings`` module (BERT's layout)
MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "vit")


def refusal(config: dict[str, Any]) -> str | None:
    """Why this prompt-tuning config cannot be read (None: it can; the model is checked in :func:`plan_of`)."""
    combine = config.get("combine", "prefix")
    if combine != "prefix":
        return f"AdapterHub prompt tuning with combine {combine!r} is not read (only 'prefix')"
    return None


def plan_of(ctl: Any, path: str | os.PathLike, info: AdapterHubFile) -> Plan:
    """Our plan: ``EmbeddingPrompt(num_virtual_tokens=P)`` holding the file's prompt."""
    where = Path(path)
    why = refusal(info.config)
    if why is not None:
        raise AdapterFileError(f"{where}: {why}")
    model_type = getattr(getattr(ctl.model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPES:
        raise AdapterFileError(
            f"{where}: AdapterHub prompt tuning on a {model_type!r} model is not read (read for "
            f"{', '.join(MODEL_TYPES)}: the prompt after the embeddings module); decoder models put it after the "
            "token embedding, before positions are assigned"
        )
    length = Fields(info.config, where).integer("prompt_length", 10, minimum=1)
    marker = f"prompt_tuning.prompt_tunings.{info.saved_name}.prompt_embedding.weight"
    found = [v for k, v in info.tensors.items() if k == marker or k.endswith("." + marker)]
    extra = [k for k in info.tensors if not (k == marker or k.endswith("." + marker))]
    if len(found) != 1 or extra:
        raise AdapterFileError(
            f"{where}: expected one prompt tensor '{marker}', found {len(found)}"
            + (f" and other tensors {sorted(extra)[:3]}" if extra else "")
        )
    (prompt,) = found
    require_float({marker: prompt}, where)
    try:
        plan = ctl.plan(EmbeddingPrompt(num_virtual_tokens=length))
    except TargetError as e:
        raise AdapterFileError(f"AdapterHub prompt tuning {str(path)!r} does not fit this model: {e}") from None
    for _, comp in plan.components.values():
        if isinstance(comp, EmbeddingsOutputPrompt):
            if prompt.shape != comp.prompt.shape:
                raise AdapterFileError(
                    f"{where}: the prompt has shape {tuple(prompt.shape)}, expected {tuple(comp.prompt.shape)} "
                    "(prompt_length x hidden size): wrong base model?"
                )
            comp.load_state_dict({"prompt": prompt.to(comp.prompt.dtype)})
    return plan


def load(ctl: Any, path: str | os.PathLike, info: AdapterHubFile, *, name: str | None, activate: bool) -> str:
    name = name or info.saved_name
    ctl._check_new_name(name)
    ctl.install(name, plan_of(ctl, path, info), activate=activate)
    return name
