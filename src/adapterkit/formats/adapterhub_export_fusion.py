"""AdapterHub export of compositions and heads (issue 16: "exports back" for item 3; the inverse of
``formats/adapterhub_fusion.py``, ``adapterhub_setup.py`` and ``adapterhub_heads.py``). Called from the ``save`` entry
of ``formats/adapterhub_export.py`` for what :func:`handles` says; the format: ../shared/formats/adapterhub.md.

``adapters.export(name, dir, format="adapterhub")`` writes, by what ``name`` is:

- **A fusion** (``name`` = ``"fusion[a,b]"``, an :class:`~adapterkit.methods.fusion.Fusion` made by
  ``add_fusion(["a", "b"], ...)`` or loaded from AdapterHub) -> ``save_adapter_fusion``'s directory:
  ``adapter_fusion_config.json`` (``"adapter_names": ["a", "b"]``, ``"name": "a,b"``) and
  ``model_adapter_fusion.safetensors`` with ``<location>.adapter_fusion_layer.a,b.{query,key,value}.*`` at the
  members' bottleneck locations, always with the base-model prefix (``bert.encoder...``: the library's fusion loader
  strips a prefix on a bare model but never adds one, so a bare ``BertModel``'s own unprefixed fusion file does not
  load into ``BertAdapterModel``; ours loads into both). ``load_adapter_fusion(dir, use_safetensors=True)`` reads it
  after the members.
  The fields map one to one: ``query_input="output"`` <-> ``query_before_ln: true``, ``values="outputs"`` <->
  ``residual_before: true``, ``query``/``key``/``value``/``value_before_softmax`` as they are, ``temperature`` 1 and
  no decay <-> ``false``, ``T = 50`` with decay 0.05 <-> ``true``, ``regularization`` 0 / 0.01 <-> false / true,
  ``dropout`` > 0 -> ``dropout_prob`` (0 -> ``null``: the library then trains with the model's attention dropout;
  outputs in eval are the same). Refused, naming the field: another temperature or regularization, a value matrix
  with a non-zero bias (AdapterHub's ``V`` has none; adapterkit's default fusion has one, zero until trained:
  ``add_fusion(..., value_bias=False)`` avoids it), members that are not sequential sub-layer bottleneck adapters
  (AdapterHub fuses only bottleneck adapters; its Fuse over ParBn adds the residual twice), members with other
  sub-layer kinds or arrangements, members or fusion layers missing in some layer (AdapterHub puts a fusion layer at
  every location of the members' kinds: ``leave_out`` is not followed by the fusion).
- **An adapter with a flex head** (``ak.Union(<method>, ak.FlexHead(...))``, what AdapterHub files with a head load
  as) -> the adapter's own files without the head, plus ``head_config.json`` (``"model_class":
  "<Arch>AdapterModel"``, the head config as the library's head class writes it) + ``model_head.safetensors``
  (``heads.<name>.<i>.*``): ``load_adapter(dir)`` on the ``*AdapterModel`` adds the head too. A :class:`FlexHead`
  adapter alone -> ``save_head``'s directory (those two files only). Refused: head types the model's
  ``*AdapterModel`` has not (ViT: ``image_classification`` only), a classifier whose token (``cls_token``) is not
  the one the library reads on this model type (``"first"``; GPT-2/LLaMA/Mistral ``"last"``; T5/mT5/BART
  ``"eos"``), an LM head whose output layer differs from the input embeddings when the model ties them (the library
  ties them on load, so the file would overwrite the embeddings), another LayerNorm epsilon, a second (static)
  head.
- **A composition** (``name`` an ``ak.Stack`` / ``ak.Fuse`` / ``ak.Parallel`` / ``ak.BatchSplit`` / ``ak.Average`` /
  ``ak.Split`` block) ->
  ``save_adapter_setup``'s directory: ``adapter_setup.json`` (the block in the library's ``to_dict`` form), one
  adapter directory per adapter (``<dir>/<name>/``, written as above, heads included), one fusion directory per
  ``Fuse`` at the top or directly under it (``<dir>/a,b/``). A :class:`FlexHead` adapter stacked last
  (``ak.Stack(ak.Fuse("a", "b"), "target")``, what a setup with ``head_setup="target"`` loads as) is written as
  ``head_setup: "target"`` and ``<dir>/target/`` (``save_head``); so is the head adapter ``head[b]`` that a fused
  adapter's own head loads as (``head_setup: "head[b]"``: the library activates it alike). A ``Branch`` of
  :class:`FlexHead` adapters stacked last (``ak.Stack("a", "b", ak.Branch("head[a]", "head[b]"))``, what a
  ``head_setup`` list of several heads on the same rows loads as) is written as ``head_setup: ["head[a]",
  "head[b]"]`` and one ``save_head`` directory per head (the library runs each on the whole output). ``Parallel`` /
  ``BatchSplit`` of adapters with heads are written with their heads and ``head_setup`` null (the library then
  activates one head per child itself). ``Average`` and ``Split`` over adapter names as the library computes them
  (``adapterhub_setup.members_kind``): ``Average`` of sequential bottlenecks with ``combine="outputs"``, of ParBn or
  LoRA adapters with ``combine="changes"``, weights summing to ``1/n`` (written times ``n``: the library's
  ``mean(w_i h_i)`` divides them again); ``Split`` with its ``length`` (written as each part's length). Refused:
  other Averages and Splits, a head anywhere else. ``Fuse`` over ``Stack`` children of adapter names is written with
  the fusion of the children's last adapters (``Fuse(Stack("a", "b"), "c")``: ``fusion[b,c]``, in ``<dir>/b,c/``),
  other blocks under ``Fuse`` are refused. All or nothing: written into a temporary
  directory, then moved into place. ``Parallel`` / ``BatchSplit`` / ``Fuse`` over blocks holding sequential bottlenecks with
  ``original_ln_before`` are refused too (the library prepares their state twice: ``prepared_twice``).

Everything is checked before anything is written; errors are :class:`AdapterHubExportError`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..compose import Average, BatchSplit, Block, Branch, Fuse, Parallel, Split, Stack
from ..methods.bottleneck_sublayer import SublayerBottleneck
from ..methods.flex_head import LANGUAGE_MODELS, FlexHead, FlexHeadLayer
from ..methods.fusion import Fusion, FusionLayer
from ..methods.union import Union
from ..targeting import base_modules
from .adapterhub_export_common import (
    KINDS,
    VERSION,
    AdapterHubExportError,
    layer_of,
    location,
    model_type,
    role_sites,
)
from .adapterhub_setup import _ARRANGEMENT, block_names, fusion_dir, members_kind, prepared_twice

__all__ = ["handles", "save", "ADAPTER_MODELS"]

FUSION_CONFIG, FUSION_WEIGHTS = "adapter_fusion_config.json", "model_adapter_fusion.safetensors"
HEAD_CONFIG, HEAD_WEIGHTS = "head_config.json", "model_head.safetensors"
SETUP = "adapter_setup.json"

# model type -> AdapterHub's flex-head model class (adapters 1.3.0) and the head types it has (of ours)
ADAPTER_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{
        t: (c, ("classification", "multilabel_classification", "tagging", "masked_lm", "causal_lm"))
        for t, c in (
            ("bert", "BertAdapterModel"),
            ("roberta", "RobertaAdapterModel"),
            ("xlm-roberta", "XLMRobertaAdapterModel"),
            ("electra", "ElectraAdapterModel"),
            ("distilbert", "DistilBertAdapterModel"),
        )
    },
    **{
        t: (c, ("classification", "multilabel_classification", "tagging", "causal_lm"))
        for t, c in (
            ("gpt2", "GPT2AdapterModel"),
            ("llama", "LlamaAdapterModel"),
            ("mistral", "MistralAdapterModel"),
        )
    },
    **{
        t: (c, ("classification", "multilabel_classification", "seq2seq_lm"))  # classifiers: the last eos token
        for t, c in (("t5", "T5AdapterModel"), ("mt5", "MT5AdapterModel"), ("bart", "BartAdapterModel"))
    },
    "vit": ("ViTAdapterModel", ()),  # image_classification only
}
_LAST_TOKEN = ("gpt2", "llama", "mistral")  # model types whose AdapterHub classifiers read the last non-pad token
_EOS_TOKEN = ("t5", "mt5", "bart")  # ... and the last eos token of input_ids (FlexHead(cls_token="eos"))

SaveAdapter = Callable[[Any, str, "str | os.PathLike[str]"], None]


# --- dispatch ----------------------------------------------------------------------------------------------------


def _flex(cfg: Any) -> FlexHead | None:
    """The :class:`FlexHead` of an adapter config (alone or a member of a :class:`Union`), None if it has none."""
    if isinstance(cfg, FlexHead):
        return cfg
    if isinstance(cfg, Union):
        heads = [c for c in cfg.configs if isinstance(c, FlexHead)]
        return heads[0] if heads else None
    return None


def handles(ctl: Any, name: Any) -> bool:
    """Whether ``formats/adapterhub_export.save`` hands ``name`` to :func:`save`: a composition block, a fusion, an
    adapter with (or being) a flex head."""
    if isinstance(name, Block):
        return True
    if not isinstance(name, str) or name not in ctl.names:
        return False
    cfg = ctl.config(name)
    return isinstance(cfg, Fusion) or _flex(cfg) is not None


def save(ctl: Any, name: str | Block, path: str | os.PathLike, save_adapter: SaveAdapter) -> None:
    """Write ``name`` (see the module docstring) to directory ``path``; ``save_adapter`` writes one plain adapter
    (``formats.adapterhub_export.save``).

    Raises:
        AdapterHubExportError: what AdapterHub's format cannot hold (nothing is written).
    """
    if isinstance(name, Block):
        _save_setup(ctl, name, Path(path), save_adapter)
    elif isinstance(ctl.config(name), Fusion):
        config, tensors = fusion_files(ctl, name)
        _write(Path(path), {FUSION_CONFIG: config}, {FUSION_WEIGHTS: tensors})
    else:
        _save_with_head(ctl, name, Path(path), save_adapter)


# --- fusions -----------------------------------------------------------------------------------------------------
# where AdapterHub keeps a sub-layer's bottleneck adapters and their fusion layer: the same as
def _check_name(name: str, what: str) -> None:
    if not name or "." in name or "," in name:
        raise AdapterHubExportError(
            f"{what} {name!r}: AdapterHub finds tensors by '.<name>.' and joins fusion members with ',', so names "
            "cannot contain '.' or ','; rename it (adapters.rename) before exporting"
        )


def _fusion_fields(name: str, cfg: Fusion, model: Any) -> dict[str, Any]:
    """AdapterHub's ``AdapterFusionConfig`` for our fusion config (refusing what it cannot express).
    ``dropout_prob`` is null where the library's fallback (the model's ``attention_probs_dropout_prob``) gives ours."""
    fallback = float(getattr(getattr(model, "config", None), "attention_probs_dropout_prob", 0.0) or 0.0)
    if cfg.temperature == 1.0 and cfg.temperature_decay == 0.0:
        hot = False
    elif cfg.temperature == 50.0 and cfg.temperature_decay == 0.05:
        hot = True
    else:
        raise AdapterHubExportError(
            f"fusion {name!r}: temperature {cfg.temperature} with temperature_decay {cfg.temperature_decay}; "
            "AdapterHub has T = 1 (temperature: false) or T = 50 annealed by 0.05 per forward (temperature: true) "
            "only: use Fusion temperature=1.0, temperature_decay=0.0 or temperature=50.0, temperature_decay=0.05"
        )
    if cfg.regularization not in (0.0, 0.01):
        raise AdapterHubExportError(
            f"fusion {name!r}: regularization {cfg.regularization}; AdapterHub's is 0.01 (regularization: true) or "
            "none: use 0.0 or 0.01"
        )
    return {
        "dropout_prob": float(cfg.dropout) if 0 < cfg.dropout != fallback else None,
        "key": bool(cfg.key),
        "query": bool(cfg.query),
        "query_before_ln": cfg.query_input == "output",
        "regularization": cfg.regularization == 0.01,
        "residual_before": cfg.values == "outputs",
        "temperature": hot,
        "value": bool(cfg.value),
        "value_before_softmax": bool(cfg.value_before_softmax),
        "value_initialized": True,
    }


def _bottleneck_of(cfg: Any) -> Any:
    from ..methods.bottleneck import Bottleneck

    if isinstance(cfg, Bottleneck):
        return cfg
    inner = getattr(cfg, "config", None)  # SequenceGated
    if isinstance(inner, Bottleneck):
        return inner
    if isinstance(cfg, Union):
        found = [c for c in cfg.configs if isinstance(c, Bottleneck)]
        return found[0] if len(found) == 1 else None
    return None


def fusion_files(ctl: Any, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_fusion_config.json, tensors)`` of fusion ``name``.

    Raises:
        AdapterHubExportError: the fusion or its members have no exact AdapterHub form (module docstring).
    """
    cfg: Fusion = ctl.config(name)
    members = list(cfg.adapters)
    for m in members:
        _check_name(m, f"fusion {name!r}: member")
        if m not in ctl.names:
            raise AdapterHubExportError(f"fusion {name!r}: its member {m!r} is not on this model")
    fields = _fusion_fields(name, cfg, ctl.model)
    mtype = model_type(ctl)
    modules = base_modules(ctl.model)
    blocks = role_sites(ctl, "block", modules)
    if not blocks:
        raise AdapterHubExportError(
            f"no transformer layers (role 'block') found in this {type(ctl.model).__name__}"
        )
    role_of = {s: role for role in KINDS for s in role_sites(ctl, role, modules)}
    arrangement = {}
    kinds: dict[str, set[str]] = {}
    for m in members:
        bn = _bottleneck_of(ctl.config(m))
        subs = {s: c for s, c in ctl.components(m).items() if isinstance(c, SublayerBottleneck)}
        if bn is None or not subs or bn.hook.value != "sublayer":
            raise AdapterHubExportError(
                f"fusion {name!r}: member {m!r} is a {type(ctl.config(m)).__name__}; AdapterHub fuses bottleneck "
                "adapters on sub-layers only (ak.Bottleneck(hook='sublayer'): SeqBn, DoubleSeqBn, Compacter)"
            )
        if any(c.parallel for c in subs.values()):
            raise AdapterHubExportError(
                f"fusion {name!r}: member {m!r} is a parallel adapter; AdapterHub's Fuse over parallel adapters adds "
                "the residual twice (adapters 1.3.0), so its outputs would differ: fuse sequential adapters "
                "(placement='pfeiffer' or 'houlsby')"
            )
        arrangement[m] = tuple(str(getattr(bn, f)) for f in _ARRANGEMENT)
        bad = [s for s in subs if s not in role_of or layer_of(s, blocks) is None]
        if bad:
            raise AdapterHubExportError(f"fusion {name!r}: member {m!r} sits on {bad[:3]}, no AdapterHub location")
        kinds[m] = {KINDS[role_of[s]] for s in subs}
    first = members[0]
    for m in members[1:]:
        if kinds[m] != kinds[first] or arrangement[m] != arrangement[first]:
            raise AdapterHubExportError(
                f"fusion {name!r}: members {first!r} and {m!r} differ in their sub-layer kinds ({sorted(kinds[first])} "
                f"vs {sorted(kinds[m])}) or arrangement (fields {', '.join(_ARRANGEMENT)}); AdapterHub requires the "
                "same mh_adapter/output_adapter/cross_adapter for all fused adapters and applies the last one's "
                "residual and LayerNorm steps"
            )
    wanted = sorted(
        s for s, role in role_of.items() if KINDS[role] in kinds[first] and layer_of(s, blocks) is not None
    )
    layers = {s: c for s, c in ctl.components(name).items()}
    other = [f"{type(c).__name__} at {s!r}" for s, c in layers.items() if not isinstance(c, FusionLayer)]
    if other:
        raise AdapterHubExportError(f"fusion {name!r}: {other[:3]} are no fusion layers")
    lacking = [s for s in wanted if s not in layers] + [
        f"{m}@{s}" for m in members for s in wanted if not isinstance(ctl.components(m).get(s), SublayerBottleneck)
    ]
    extra = sorted(set(layers) - set(wanted))
    if lacking or extra:
        raise AdapterHubExportError(
            f"fusion {name!r}: AdapterHub has a fusion layer, and each fused adapter, at every {sorted(kinds[first])} "
            f"location of every layer (leave_out is not followed by its fusion); missing: {lacking[:4]}, extra: "
            f"{extra[:4]}. Fuse adapters that cover every layer"
        )
    joined = ",".join(members)
    # keys with the base-model prefix: ``load_adapter_fusion`` strips it on a bare model but never adds it (unlike
    # ``load_adapter``), so a bare model's unprefixed keys would not load into a ``*AdapterModel``
    base = getattr(ctl.model, "base_model_prefix", "") or ""
    prefix = f"{base}." if base and not hasattr(ctl.model, base) else ""
    tensors: dict[str, torch.Tensor] = {}
    for site in wanted:
        comp: FusionLayer = layers[site]
        layer = layer_of(site, blocks)
        assert layer is not None
        loc = f"{prefix}{location(mtype, KINDS[role_of[site]], site, blocks[layer])}.adapter_fusion_layer.{joined}"
        for leaf, value in comp.state_dict().items():
            if leaf == "value.bias":
                if value.detach().any():
                    raise AdapterHubExportError(
                        f"fusion {name!r}: its value matrix at {site!r} has a non-zero bias, which AdapterHub's "
                        "fusion has not (value_bias); make fusions to export with add_fusion(..., value_bias=False)"
                    )
                continue
            tensors[f"{loc}.{leaf}"] = value.detach().float().contiguous().clone()
    mcfg = ctl.model.config
    config = {
        "adapter_names": members,
        "config": fields,
        "hidden_size": int(mcfg.hidden_size),
        "model_class": type(ctl.model).__name__,
        "model_name": getattr(mcfg, "name_or_path", None) or None,
        "model_type": mcfg.model_type,
        "name": joined,
        "version": VERSION,
    }
    return config, tensors


# --- flex heads --------------------------------------------------------------------------------------------------


def head_files(ctl: Any, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(head_config.json, tensors)`` of adapter ``name``'s flex head, as ``save_head`` writes it from the model
    type's ``*AdapterModel``.

    Raises:
        AdapterHubExportError: a head the library cannot rebuild exactly (module docstring).
    """
    cfg = _flex(ctl.config(name))
    assert cfg is not None
    mtype = model_type(ctl)
    model_class, types = ADAPTER_MODELS[mtype]
    where = f"adapter {name!r}: its flex head"
    if cfg.head_type not in types:
        raise AdapterHubExportError(
            f"{where} is a {cfg.head_type!r} head, which AdapterHub's {model_class} writes differently or has not "
            f"(exported there: {', '.join(types) or 'none'})"
        )
    classifier = cfg.head_type in ("classification", "multilabel_classification")
    token = "last" if mtype in _LAST_TOKEN else "eos" if mtype in _EOS_TOKEN else "first"
    if classifier and not cfg.use_pooler and cfg.cls_token != token:
        raise AdapterHubExportError(
            f"{where} reads the {cfg.cls_token} token (cls_token), but {model_class}'s classifiers read the "
            f"{token} one: use FlexHead(cls_token={token!r})"
        )
    mcfg = ctl.model.config
    text = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
    hidden = int(text.hidden_size)
    if cfg.hidden_size not in (None, hidden):
        raise AdapterHubExportError(f"{where} has hidden_size {cfg.hidden_size}, the model {hidden}")
    eps = float(getattr(text, "layer_norm_eps", 1e-12))
    if cfg.layer_norm and cfg.head_type in LANGUAGE_MODELS and cfg.layer_norm_eps != eps:
        raise AdapterHubExportError(
            f"{where}'s LayerNorms have layer_norm_eps {cfg.layer_norm_eps}; AdapterHub uses the model config's "
            f"layer_norm_eps ({eps}): use FlexHead(layer_norm_eps={eps})"
        )
    [layer] = [c for s, c in ctl.components(name).items() if s == "" and isinstance(c, FlexHeadLayer)] or [None]
    if layer is None:
        raise AdapterHubExportError(f"{where}: no head layer on the model root (a union sharing the root?)")
    state = {k: v.detach().float().contiguous().clone() for k, v in layer.state_dict().items()}
    if not all(k.startswith("net.") for k in state):
        raise AdapterHubExportError(f"{where}: unexpected tensors {sorted(state)[:3]}")
    if cfg.head_type in LANGUAGE_MODELS and getattr(text, "tie_word_embeddings", True):
        last = f"net.{len(layer.net) - 1}.weight"
        emb = ctl.model.get_input_embeddings().weight.detach().float().cpu()
        if state[last].shape != emb.shape or not torch.equal(state[last].cpu(), emb):
            raise AdapterHubExportError(
                f"{where}: its output layer ({last}) differs from the model's input embeddings, which AdapterHub "
                "ties it to (tie_word_embeddings): loading it would change the embeddings too. Export an LM head "
                "whose output layer is the embedding matrix (as AdapterHub files load)"
            )
    embedding = cfg.embedding_size or hidden
    fallback = getattr(text, "classifier_dropout", None)  # PredictionHead._get_dropout_prob
    if fallback is None:
        fallback = getattr(text, "hidden_dropout_prob", 0.0) or 0.0
    dropout = None if float(cfg.dropout) == float(fallback) else float(cfg.dropout)
    vocab = cfg.vocab_size or int(getattr(text, "vocab_size", 0) or 0)
    label2id = {str(k): int(v) for k, v in cfg.label2id.items()} if cfg.label2id is not None else None
    if cfg.head_type in ("classification", "multilabel_classification"):
        head = {"num_labels": cfg.num_labels, "layers": cfg.num_layers, "activation_function": cfg.activation_function,
                "label2id": label2id, "use_pooler": cfg.use_pooler, "bias": cfg.bias, "dropout_prob": dropout}  # fmt: skip
    elif cfg.head_type == "tagging":
        if not cfg.bias:
            raise AdapterHubExportError(f"{where}: AdapterHub's tagging head always has a bias (bias=False)")
        head = {"num_labels": cfg.num_labels, "layers": cfg.num_layers, "activation_function": cfg.activation_function,
                "label2id": label2id, "dropout_prob": dropout}  # fmt: skip
    else:
        head = {"vocab_size": vocab, "layers": cfg.num_layers, "activation_function": cfg.activation_function,
                "layer_norm": cfg.layer_norm, "bias": cfg.bias, "label2id": None}  # fmt: skip
        if cfg.head_type == "causal_lm":
            head.update(embedding_size=embedding, shift_labels=True, dropout_prob=None)
        elif cfg.head_type == "masked_lm":
            head.update(embedding_size=embedding, shift_labels=False)
        else:
            if embedding != hidden:
                raise AdapterHubExportError(f"{where}: AdapterHub's seq2seq LM head has no embedding_size")
            head.update(shift_labels=False)
    config = {
        "config": {"head_type": cfg.head_type, **head},
        "hidden_size": hidden,
        "model_class": model_class,
        "model_name": getattr(mcfg, "name_or_path", None) or None,
        "model_type": mcfg.model_type,
        "name": name,
        "version": VERSION,
    }
    return config, {f"heads.{name}.{k[len('net.') :]}": v for k, v in state.items()}


class _Headless:
    """The controller as the adapter writers see it, with adapter ``name``'s flex head taken away."""

    def __init__(self, ctl: Any, name: str) -> None:
        self._inner, self._name = ctl, name
        cfg = ctl.config(name)
        rest = [c for c in cfg.configs if not isinstance(c, FlexHead)]
        if len(rest) == 1:
            self._cfg = rest[0]
        else:
            self._cfg = Union(*rest, gated=cfg.gated, init_weights=cfg.init_weights, heads=cfg.heads)

    def __getattr__(self, key: str) -> Any:
        return getattr(self._inner, key)

    def config(self, name: str) -> Any:
        return self._cfg if name == self._name else self._inner.config(name)

    def components(self, name: str) -> dict[str, Any]:
        comps = self._inner.components(name)
        return {s: c for s, c in comps.items() if s != ""} if name == self._name else comps

    def sites(self, name: str) -> dict[str, str]:
        kinds = self._inner.sites(name)
        return {s: k for s, k in kinds.items() if s != ""} if name == self._name else kinds


def _save_with_head(ctl: Any, name: str, path: Path, save_adapter: SaveAdapter) -> None:
    _check_name(name, "adapter")
    cfg = ctl.config(name)
    config, tensors = head_files(ctl, name)
    if isinstance(cfg, FlexHead):  # a head alone: save_head's directory
        _write(path, {HEAD_CONFIG: config}, {HEAD_WEIGHTS: tensors})
        return
    if isinstance(ctl.components(name).get(""), FlexHeadLayer) is False:
        raise AdapterHubExportError(
            f"adapter {name!r}: another component shares the model root with its flex head"
        )
    if any(k == "head" for k in ctl.sites(name).values()):
        raise AdapterHubExportError(
            f"adapter {name!r} has head copies (heads=[...]) and a flex head; an AdapterHub directory holds one head"
        )
    headless = _Headless(ctl, name)
    save_adapter(headless, name, path)
    _write(path, {HEAD_CONFIG: config}, {HEAD_WEIGHTS: tensors})


# --- setups ------------------------------------------------------------------------------------------------------


def _to_dict(ctl: Any, item: str | Block, where: str) -> dict[str, Any]:
    """AdapterHub's ``AdapterCompositionBlock.to_dict`` of our block (refusing what the library computes otherwise)."""
    if isinstance(item, str):
        return {"type": "single", "children": [item]}
    kind = type(item)
    if kind not in (Stack, Fuse, Parallel, BatchSplit, Average, Split):
        raise AdapterHubExportError(
            f"{where}: {kind.__name__} blocks are not written (AdapterHub has no such block)"
        )
    if kind is Fuse and not all(
        isinstance(c, str) or (isinstance(c, Stack) and all(isinstance(n, str) for n in c.children))
        for c in item.children
    ):
        raise AdapterHubExportError(
            f"{where}: Fuse over {[repr(c) for c in item.children if not isinstance(c, str)]} is not written (only "
            "adapter names and Stacks of adapter names)"
        )
    why = prepared_twice(ctl, item)
    if why:
        raise AdapterHubExportError(f"{where}: {why} (not written)")
    out: dict[str, Any] = {"type": kind.__name__, "children": [_to_dict(ctl, c, where) for c in item.children]}
    if isinstance(item, BatchSplit):
        out["kwargs"] = {"batch_sizes": list(item.batch_sizes)}
    if isinstance(item, (Average, Split)):
        out["kwargs"] = _average_or_split(ctl, item, where)
    return out


def _average_or_split(ctl: Any, item: Average | Split, where: str) -> dict[str, Any]:
    """The ``kwargs`` of AdapterHub's ``Average`` (``weights``) or ``Split`` (``splits``: each part's length) for our
    block, refused where the library would compute something else."""
    try:
        kind = members_kind(ctl, item)
    except ValueError as e:
        raise AdapterHubExportError(f"{where}: {e} (not written)") from None
    if isinstance(item, Split):
        if item.length is None:
            raise AdapterHubExportError(
                f"{where}: AdapterHub's Split holds each part's length, which must sum to the sequence length; give "
                f"the one length it is for: ak.Split(..., splits={list(item.splits)}, length=L)"
            )
        cuts = [0, *item.splits, item.length]
        return {"splits": [b - a for a, b in zip(cuts[:-1], cuts[1:])]}
    n = len(item.children)
    combine = "outputs" if kind == "sequential" else "changes"
    if item.combine != combine:
        raise AdapterHubExportError(
            f"{where}: AdapterHub's Average of {kind} adapters weighs their {combine} (mean(w_i h_i) of its states): "
            f"ak.Average(..., combine={combine!r}) is written, combine={item.combine!r} is not"
        )
    total = sum(item.weights)
    if abs(total * n - 1.0) > 1e-6:
        raise AdapterHubExportError(
            f"{where}: AdapterHub normalizes Average weights to sum 1 when it loads them and then divides them by the "
            f"number of adapters once more (mean(w_i h_i)), so only weights summing to 1/{n} are written; these sum "
            f"to {total:g} (for AdapterHub's Average(weights=w), give ak.Average(..., weights=[w_i / {n}]))"
        )
    return {"weights": [w * n for w in item.weights]}


def _save_setup(ctl: Any, block: Block, path: Path, save_adapter: SaveAdapter) -> None:
    where = f"setup {block!r}"
    head: str | list[str] | None = None
    setup: str | Block = block
    last = block.children[-1]

    def _is_head(item: str | Block) -> bool:
        return isinstance(item, str) and item in ctl.names and isinstance(ctl.config(item), FlexHead)

    if isinstance(block, Stack) and len(block.children) > 1 and (_is_head(last) or isinstance(last, Branch)):
        if isinstance(last, Branch):  # several heads on the same rows: a head_setup list
            if not all(_is_head(c) for c in last.children) or len(set(last.children)) != len(last.children):
                raise AdapterHubExportError(
                    f"{where}: a Branch is written as AdapterHub's list of heads on the same rows (head_setup), so "
                    f"its children must be distinct flex-head adapters (ak.FlexHead), got {list(last.children)}"
                )
            head = [str(c) for c in last.children]
        else:
            head = str(last)
        rest = block.children[:-1]
        setup = rest[0] if len(rest) == 1 else Stack(*rest)
    if isinstance(setup, str):
        raise AdapterHubExportError(f"{where}: export a single adapter with its name, not a block")
    tree = _to_dict(ctl, setup, where)
    names = block_names(setup)
    fusions = ([setup] if isinstance(setup, Fuse) else []) + [c for c in setup.children if isinstance(c, Fuse)]
    missing = [n for n in names + [f.name for f in fusions] if n not in ctl.names]
    if missing:
        raise AdapterHubExportError(f"{where}: {missing} are not on this model (fusions: adapters.add_fusion)")
    alone = [n for n in names if isinstance(ctl.config(n), FlexHead)]
    if alone:
        raise AdapterHubExportError(
            f"{where}: head adapters {alone} inside the setup; AdapterHub's setup has one head setup, written from "
            "a head adapter stacked last (ak.Stack(<setup>, 'head'))"
        )
    heads = [head] if isinstance(head, str) else head or []
    for n in names + heads:
        _check_name(n, f"{where}: adapter")
    data = {"adapter_setup": tree, "head_setup": head, "version": VERSION}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.setup-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for n in names:
            save(ctl, n, tmp / n, save_adapter) if handles(ctl, n) else save_adapter(ctl, n, tmp / n)
        for f in fusions:
            save(ctl, f.name, tmp / fusion_dir(f), save_adapter)
        for h in heads:
            save(ctl, h, tmp / h, save_adapter)
        (tmp / SETUP).write_text(json.dumps(data, indent=2) + "\n")
        path.mkdir(parents=True, exist_ok=True)
        for entry in sorted(tmp.iterdir()):
            target = path / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- files -------------------------------------------------------------------------------------------------------


def _write(path: Path, configs: dict[str, dict[str, Any]], weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Each file replaced in one rename: the weights first, then the configs (a reader checks the config)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    for fname, tensors in weights.items():
        tmp = path / f".{fname}.tmp"
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / fname)
    for fname, config in configs.items():
        tmp = path / f".{fname}.tmp"
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path / fname)
