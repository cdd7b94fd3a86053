"""Prediction heads saved with an AdapterHub adapter (``save_adapter(..., with_head=True)``: ``head_config.json`` +
``model_head.safetensors`` or ``pytorch_model_head.bin``); used by ``formats/adapterhub.py``. See
../shared/formats/adapterhub.md ("Heads") and issue 16 item 3.

- **Flex heads** (``"config": {"head_type": ...}``, written from ``*AdapterModel`` classes; keys
  ``heads.<name>.<i>.{weight,bias}``): loaded as a part of the adapter, our
  :class:`~adapterkit.methods.flex_head.FlexHead` on the model root, so the adapter becomes
  ``ak.Union(<its method>, ak.FlexHead(...))`` and the bare base model returns the head's ``logits`` while it is
  active (``detach()`` removes it). Head types: classification (BERT-like models: the first token; GPT-2, GPT-J,
  LLaMA, Mistral: the last non-padding token; BART, mBART, PLBart, T5, mT5: the decoder's output at the last eos
  token of ``input_ids``, ``FlexHead(cls_token="eos")``; as the library), multilabel classification, tagging,
  causal/masked/seq2seq LM. Whisper's classification heads and other head types (question answering, multiple
  choice, dependency parsing, image classification) are refused, naming the type.
- **Static heads** (``"config": null``: the model's own head, written when ``adapters.init`` wraps a
  ``*ForSequenceClassification`` / ``*ForCausalLM`` model, and by our AdapterHub export of head copies; keys are the
  model's own, e.g. ``classifier.weight``): when every stored tensor equals this model's own (GPT-2's tied
  ``lm_head``, an untrained head) there is nothing to load; otherwise, on a model of the saving class, they load
  as the adapter's head copies (``heads=[...]``, peft's ``modules_to_save``: one per stored module) holding the
  file's values, as the library loads them into the model's head. On another model class the head is left out with
  a warning (the library skips it too).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..methods.flex_head import HEAD_TYPES, FlexHead, FlexHeadLayer
from ..methods.heads import HeadCopy
from ..methods.union import Union
from ..plan import HEAD, TARGET, Plan
from ..targeting import base_modules
from .io import AdapterFileError, read_json, read_tensors, require_float

__all__ = ["CONFIG", "Head", "read_head", "with_head", "WithHead"]

CONFIG = "head_config.json"
_WEIGHTS = (("model_head", "safetensors"), ("pytorch_model_head", "bin"))
# AdapterHub model classes whose classification heads read the last non-padding token, and those that read the
# last eos token of input_ids (FlexHead(cls_token="eos"); Whisper's inputs are audio features: not read)
_LAST_TOKEN_CLASSIFIERS = ("GPT2", "GPTJ", "Llama", "Mistral")
_EOS_CLASSIFIERS = ("Bart", "MBart", "PLBart", "MT5", "T5", "Whisper")


class Head:
    """A head read from a directory: a flex head's config and tensors under our names (``net.<i>.*``), or
    (``config`` None) a static head's tensors per module of the model (``copies``: module -> {leaf: tensor})."""

    def __init__(
        self,
        config: FlexHead | None,
        state: dict[str, torch.Tensor],
        where: Path,
        copies: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self.where = where
        self.copies = copies or {}


def _static(ctl: Any, data: dict[str, Any], tensors: dict[str, torch.Tensor] | None, where: Path) -> Head | None:
    """A static head: nothing when it equals the model's own, head copies when it differs on the saving class."""
    if tensors is not None and data.get("model_class") == type(ctl.model).__name__:
        if _static_is_ours(ctl.model, tensors):
            return None
        modules = base_modules(ctl.model)
        copies: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            module, _, leaf = key.rpartition(".")
            if module not in modules or module == "":
                copies = {}
                break
            copies.setdefault(module, {})[leaf] = value
        if copies:
            require_float(tensors, where)
            return Head(None, {}, where, copies)
    warnings.warn(
        f'{where} also holds a static prediction head ({CONFIG} with "config": null, model class '
        f"{data.get('model_class')!r}) that does not fit this {type(ctl.model).__name__}; static heads from "
        "AdapterHub files are not loaded yet on other model classes: the model keeps its own head",
        stacklevel=6,
    )
    return None


def _weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor] | None:
    for stem, ext in _WEIGHTS:
        if (path / f"{stem}.{ext}").is_file():
            return read_tensors(path, stem, allow_pickle=allow_pickle)
    return None


def _static_is_ours(model: Any, tensors: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return all(
        k in own and own[k].shape == v.shape and torch.equal(own[k].cpu(), v.cpu()) for k, v in tensors.items()
    )


def read_head(ctl: Any, path: str | os.PathLike, *, allow_pickle: bool) -> Head | None:
    """The flex head saved in ``path`` (None: no head, or a static head equal to the model's own or not loaded)."""
    where = Path(path)
    if not (where / CONFIG).is_file():
        return None
    data = read_json(where / CONFIG)
    config = data.get("config")
    if config is None:  # a static head: the model's own
        return _static(ctl, data, _weights(where, allow_pickle), where)
    if not isinstance(config, dict):
        raise AdapterFileError(f"{where / CONFIG}: 'config' must be an object or null")
    kind = config.get("head_type")
    if kind not in HEAD_TYPES:
        raise AdapterFileError(
            f"{where / CONFIG}: AdapterHub {kind!r} heads are not read (read: {', '.join(HEAD_TYPES)}); load the "
            "adapter without its head by removing head_config.json from a copy of the directory"
        )
    model_class = str(data.get("model_class") or "")
    classifier = kind in ("classification", "multilabel_classification")
    eos = classifier and model_class.startswith(_EOS_CLASSIFIERS)
    if eos and model_class.startswith("Whisper"):
        raise AdapterFileError(
            f"{where / CONFIG}: {model_class}'s classification head reads the last eos token of the decoder inputs of "
            "an audio model, which is not read (classification heads of text models are)"
        )
    tensors = _weights(where, allow_pickle)
    if tensors is None:
        raise AdapterFileError(
            f"{where} has {CONFIG} but neither model_head.safetensors nor pytorch_model_head.bin"
        )
    require_float(tensors, where)
    name = data.get("name")
    prefix = f"heads.{name}."
    state: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            raise AdapterFileError(
                f"key {key!r} in {where} is not a tensor of head {name!r} ('{prefix}<i>.weight')"
            )
        state["net." + key[len(prefix) :]] = value
    hidden = data.get("hidden_size")
    dropout = config.get("dropout_prob")
    if dropout is None:  # PredictionHead._get_dropout_prob: classifier_dropout, else hidden_dropout_prob
        mc = getattr(ctl.model, "config", None)
        dropout = getattr(mc, "classifier_dropout", None)
        if dropout is None:
            dropout = getattr(mc, "hidden_dropout_prob", 0.0) or 0.0
    eps = getattr(getattr(ctl.model, "config", None), "layer_norm_eps", 1e-12)
    try:
        cfg = FlexHead(
            head_type=kind,
            num_labels=int(config.get("num_labels") or 2),
            num_layers=int(config.get("layers", 1)),
            activation_function=config.get("activation_function"),
            bias=bool(config.get("bias", True)),
            use_pooler=bool(config.get("use_pooler", False)),
            cls_token="eos"
            if eos
            else "last"
            if classifier and model_class.startswith(_LAST_TOKEN_CLASSIFIERS)
            else "first",
            layer_norm=bool(config.get("layer_norm", False)),
            embedding_size=config.get("embedding_size"),
            vocab_size=config.get("vocab_size"),
            dropout=float(dropout) if kind not in ("causal_lm", "masked_lm", "seq2seq_lm") else 0.0,
            layer_norm_eps=float(eps),
            hidden_size=hidden if isinstance(hidden, int) else None,
            label2id=config.get("label2id"),
        )
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{where / CONFIG}: {e}") from None
    return Head(cfg, state, where)


def _with_copies(ctl: Any, plan: Plan, head: Head) -> Plan:
    """``plan`` with a static head's modules as head copies holding the file's values."""
    modules = base_modules(ctl.model)
    comps = dict(plan.components)
    for m, state in head.copies.items():
        if m in comps:
            raise AdapterFileError(f"{head.where}: {m!r} is both adapted and a saved head")
        copy = HeadCopy(modules[m])
        own = copy.state_dict()
        unknown = sorted(set(state) - {k[len("head.") :] for k in own})
        if unknown:
            raise AdapterFileError(f"{head.where}: {m!r} has no {unknown}")
        full = {k: state.get(k[len("head.") :], v).to(v.dtype) for k, v in own.items()}
        try:
            copy.import_state(full, modules[m])
        except ValueError as e:
            raise AdapterFileError(f"{head.where}: {m!r}: {e}") from None
        comps[m] = (HEAD, copy)
    added = tuple(m for m in head.copies if m not in plan.config.heads)
    cfg = plan.config.replace(heads=tuple(plan.config.heads) + added)
    return Plan(cfg, {n: comps[n] for n in modules if n in comps})


def _head_component(ctl: Any, head: Head) -> tuple[str, FlexHeadLayer]:
    """The flex head's component (on the model root) holding the file's values."""
    assert head.config is not None
    kind, comp = ctl.plan(head.config).components[""]
    if not isinstance(comp, FlexHeadLayer):
        raise AdapterFileError(f"{head.where}: unexpected head component {type(comp).__name__}")
    own = comp.state_dict()
    if set(own) != set(head.state):
        raise AdapterFileError(
            f"{head.where}: the head's tensors {sorted(head.state)} do not match its config (expected {sorted(own)})"
        )
    try:
        comp.import_state({k: head.state[k].to(own[k].dtype) for k in own}, base_modules(ctl.model)[""])
    except ValueError as e:
        raise AdapterFileError(f"{head.where}: {e}") from None
    return kind, comp


def is_head_only(path: str | os.PathLike) -> bool:
    """A directory written by ``save_head`` (``head_config.json`` without an adapter)."""
    return (Path(path) / CONFIG).is_file() and not (Path(path) / "adapter_config.json").is_file()


def load_head_only(
    ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool
) -> str:
    """A ``save_head`` directory as an adapter of its own: a :class:`FlexHead` alone (its name: ``name``, else the
    saved head name). Activate it after (stacked on) what computes the hidden states, e.g.
    ``ak.Stack(ak.Fuse("a", "b"), "target")``."""
    where = Path(path)
    data = read_json(where / CONFIG)
    if data.get("config") is None:
        raise AdapterFileError(
            f'{where}: a static head alone ("config": null) is the model\'s own head: nothing to load'
        )
    head = read_head(ctl, where, allow_pickle=allow_pickle)
    assert head is not None and head.config is not None
    name = name or str(data.get("name") or "")
    ctl._check_new_name(name)
    kind, comp = _head_component(ctl, head)
    ctl.install(name, Plan(head.config, {"": (kind, comp)}), activate=activate)
    return name


def with_head(ctl: Any, plan: Plan, head: Head) -> Plan:
    """``plan`` with ``head`` added: a flex head as a part (``Union(<members>, FlexHead)``, the head component on
    the root), a static head as head copies."""
    if head.config is None:
        return _with_copies(ctl, plan, head)
    cfg = plan.config
    members = list(cfg.configs) if isinstance(cfg, Union) else [cfg]
    extra = (
        {"gated": cfg.gated, "init_weights": cfg.init_weights, "heads": cfg.heads}
        if isinstance(cfg, Union)
        else {}
    )
    if not isinstance(cfg, Union) and cfg.heads:
        extra["heads"] = cfg.heads
        members = [cfg.replace(heads=())]
    union = Union(*members, head.config, **extra)
    kind, comp = _head_component(ctl, head)
    modules = base_modules(ctl.model)
    comps = dict(plan.components)
    if "" in comps:
        old_kind, old = comps[""]
        comps[""] = (TARGET, union.combine("", modules[""], [old, comp]))
    else:
        comps[""] = (kind, comp)
    ordered = {n: comps[n] for n in modules if n in comps}
    return Plan(union, ordered)


class WithHead:
    """The controller as a reader sees it, with ``install`` adding ``head`` to the plan it is given."""

    def __init__(self, ctl: Any, head: Head) -> None:
        self._inner = ctl
        self._head = head

    def __getattr__(self, key: str) -> Any:
        return getattr(self._inner, key)

    def install(self, name: str, plan: Plan, *, activate: bool = False) -> None:
        self._inner.install(name, with_head(self._inner, plan, self._head), activate=activate)
