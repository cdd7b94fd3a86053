"""peft interop: read and write directories of peft's ``save_pretrained``.

A directory holds ``adapter_config.json`` (with ``peft_type``) and ``adapter_model.safetensors`` (keys
``base_model.model.<module path>.<tensor>``). Each method family has its own converter module
``formats/peft_<family>.py`` defining:

- ``PEFT_TYPE``: peft's type string (``"LORA"``, ``"IA3"``, ...),
- ``METHOD``: our registered method name (``"lora"``, ...),
- ``save(ctl, name, path)`` and ``load(ctl, path, *, name, allow_pickle, activate) -> str``.

Converters are discovered here, so adding one touches no shared file.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Any

from ..targeting import base_modules
from .io import AdapterFileError, pending_config, read_json, write_adapter

PREFIX = "base_model.model."

__all__ = ["PREFIX", "converters", "save", "load", "write", "task_type", "adapter_task_type", "Fields"]

_TASKS = (
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM", ("ForConditionalGeneration",)),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM", ("ForCausalLM", "LMHeadModel")),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS", ("ForSequenceClassification",)),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS", ("ForTokenClassification",)),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS", ("ForQuestionAnswering",)),
)


def task_type(model: Any, default: str | None = None) -> str | None:
    """peft's ``task_type`` for a transformers model, from its class (auto-class tables, then the name):
    ``CAUSAL_LM``, ``SEQ_2_SEQ_LM`` (encoder-decoder generation), ``SEQ_CLS``, ``TOKEN_CLS``, ``QUESTION_ANS``;
    ``default`` for any other model. peft picks its model wrapper (and ``AutoPeftModelFor...`` its class) from it.

    Prompt methods need a task (``default="FEATURE_EXTRACTION"``); the others write None for other models, so
    peft wraps them in its plain ``PeftModel``, which passes any inputs through (its feature-extraction wrapper
    passes ``input_ids``, which vision models do not take).
    """
    cls = type(model).__name__
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # pragma: no cover - transformers is needed for peft files anyway
        modeling_auto = None
    for table, task, _suffixes in _TASKS:
        names = getattr(modeling_auto, table, {}) if modeling_auto is not None else {}
        flat = {n for v in names.values() for n in ((v,) if isinstance(v, str) else v)}
        if cls in flat:
            return task
    enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    for _, task, suffixes in _TASKS:
        if cls.endswith(suffixes) and (task != "SEQ_2_SEQ_LM" or enc_dec):
            return task
    return default


def write(path: str | os.PathLike, tensors: dict[str, Any], config: dict[str, Any]) -> None:
    """Write a peft directory (``adapter_model.safetensors`` + ``adapter_config.json``), all-or-nothing
    (``io.write_adapter``)."""
    write_adapter(path, "adapter_model.safetensors", tensors, config)


def converters() -> dict[str, ModuleType]:
    """peft type -> converter module (every ``formats/peft_*.py``)."""
    package = __name__.rpartition(".")[0]
    out: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.startswith("peft_"):
            module = importlib.import_module(f"{package}.{info.name}")
            out[module.PEFT_TYPE] = module
    return out


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    method = ctl.config(name).method
    by_method = {m.METHOD: m for m in converters().values()}
    if method not in by_method:
        raise ValueError(
            f"adapter {name!r} is {method!r}, which peft's format cannot hold; peft export is available for: "
            f"{', '.join(sorted(by_method))} (use format='native' otherwise)"
        )
    by_method[method].save(ctl, name, path)


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    data = pending_config(path) or read_json(Path(path) / "adapter_config.json")
    kind = data.get("peft_type")
    table = converters()
    if not isinstance(kind, str) or kind not in table:
        raise AdapterFileError(
            f"{Path(path) / 'adapter_config.json'}: peft adapters of type {kind!r:.60} are not supported yet; "
            f"supported: {', '.join(sorted(table))}"
        )
    return table[kind].load(ctl, path, name=name, allow_pickle=allow_pickle, activate=activate)


# the modules peft's task wrappers add to ``modules_to_save`` (a name suffix match, as in peft's _set_trainable)
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def adapter_task_type(ctl: Any, name: str) -> str | None:
    """The ``task_type`` to export adapter ``name`` with: the model's (:func:`task_type`), except that for
    SEQ_CLS, TOKEN_CLS and QUESTION_ANS it is None unless the adapter has its own copy (``heads``) of every
    output head peft's wrapper for that task trains and expects in the file (``classifier``/``score``,
    ``qa_outputs``). peft then uses its plain ``PeftModel``, which computes what we do with the base head
    (and, unlike the task wrappers, lets ``add_weighted_adapter`` combine such adapters)."""
    task = task_type(ctl.model)
    suffixes = _TASK_HEADS.get(task or "", ())
    if suffixes:
        heads = {site for site, kind in ctl.sites(name).items() if kind == "head"}
        if any(site.endswith(suffixes) and site not in heads for site in base_modules(ctl.model)):
            return None
    return task


class Fields:
    """Typed reads of a peft ``adapter_config.json``: a field of the wrong type or out of range raises
    :class:`AdapterFileError` naming the file and the field (not a bare TypeError/ValueError later)."""

    def __init__(self, data: dict[str, Any], directory: str | os.PathLike) -> None:
        self.data = data
        self.where = Path(directory) / "adapter_config.json"

    def error(self, key: str, value: Any, expected: str) -> AdapterFileError:
        return AdapterFileError(f"{self.where}: {key!r} must be {expected}, not {value!r:.80}")

    def integer(self, key: str, default: int | None = None, *, minimum: int = 1) -> int:
        """An integer >= ``minimum`` (``default`` None: the field is required)."""
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, value, f"an integer >= {minimum}")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, value, "a number")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, value, "true or false")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.data.get(key, default)
        if value not in choices or not isinstance(value, str):
            raise self.error(key, value, "one of " + ", ".join(repr(c) for c in choices))
        return value

    def names(self, key: str) -> list[str]:
        """A list of module names (null: none)."""
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, value, "a list of module names or null")
        return value

    def pattern_or_names(self, key: str) -> str | list[str]:
        """A regular expression or a list of module names (null: none)."""
        value = self.data.get(key)
        return value if isinstance(value, str) else self.names(key)

    def numbers(self, key: str) -> dict[str, float]:
        """A map from module-name patterns to numbers (null: empty)."""
        value = self.data.get(key) or {}
        if not isinstance(value, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
        ):
            raise self.error(key, value, "an object mapping module-name patterns to numbers")
        return value

    def build(self, make: Any, **kwargs: Any) -> Any:
        """``make(**kwargs)`` (an adapter config), its ValueError/TypeError reported against the file."""
        try:
            return make(**kwargs)
        except (TypeError, ValueError) as e:
            raise AdapterFileError(f"{self.where} is invalid: {e}") from None
