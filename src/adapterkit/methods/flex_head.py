"""Prediction heads owned by an adapter, on the model's output (AdapterHub's "flex heads": ``heads/base.py`` and
``heads/language_modeling.py`` of ``adapters`` 1.3.0).

AdapterHub's ``*AdapterModel`` classes run a named head on the base model's output; an adapter saved with its
head carries it (``head_config.json`` + ``model_head.safetensors``). Here the head is a component of the adapter at
the model root (module ``""``): after the model's forward it computes ``logits`` from the output's last hidden state
``x: (B, T, H)`` and adds them to the output (``output.logits`` / ``output["logits"]``; a tuple output gets them
appended), so a bare base model (``BertModel``, ``GPT2Model``) returns the head's logits while the adapter is active,
as ``BertAdapterModel`` does, and ``detach()`` gives back the plain model. The model's own outputs stay as they were.

Heads (``head_type``; the layer stack is AdapterHub's, module for module, so its state keys are AdapterHub's
``heads.<name>.<i>.*`` with ``net.<i>.*``):

* ``"classification"`` / ``"multilabel_classification"`` (``num_layers`` L): ``[Dropout, Linear(H, H), act] × (L − 1)``
  then ``[Dropout, Linear(H, num_labels)]`` on the first token ``x[:, 0]`` (``use_pooler``: the output's
  ``pooler_output``; ``cls_token="last"``: AdapterHub's decoder models (GPT-2, GPT-J, LLaMA, Mistral): the token at
  ``count(input_ids != pad_token_id) − 1``, the last one when the model config has no ``pad_token_id`` or the call
  no ``input_ids``; ``cls_token="eos"``: AdapterHub's encoder-decoder models (BART, mBART, PLBart, T5, mT5): the
  output (the decoder's) at the last position where ``input_ids == eos_token_id``, every row holding the same
  number of eos tokens as there): ``logits (B, num_labels)``.
* ``"tagging"``: the same stack on every token: ``logits (B, T, num_labels)``.
* ``"causal_lm"`` / ``"masked_lm"`` / ``"seq2seq_lm"`` (on the decoder's output): ``[Linear(H, E), act?, LayerNorm(E)?]`` then ``[Linear(E, E), act?, LN?]`` ×
  (L − 2) and ``Linear(E, vocab_size)`` on every token: ``logits (B, T, vocab_size)``. AdapterHub ties the last
  layer to the input embeddings; here it is the adapter's own copy (the file holds it).

No loss is computed (the bare model takes no ``labels``): compute it from ``output.logits``. Dropout layers act in
training only. Heads are not mergeable and take part in compositions only as a stacked adapter's part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..component import Component
from ..config import AdapterConfig, register
from ..targeting import TargetError
from .bottleneck import activation

PUBLIC = ("FlexHead",)
__all__ = ["FlexHead", "FlexHeadLayer", "HEAD_TYPES"]

CLASSIFIERS = ("classification", "multilabel_classification", "tagging")
LANGUAGE_MODELS = ("causal_lm", "masked_lm", "seq2seq_lm")
HEAD_TYPES = CLASSIFIERS + LANGUAGE_MODELS


@register("flex_head")
@dataclasses.dataclass(frozen=True, kw_only=True)
class FlexHead(AdapterConfig):
    """A prediction head on the model's output, owned by the adapter (usually a part of a :class:`Union`).

    Args:
        head_type: one of :data:`HEAD_TYPES` (see the module docstring).
        num_labels: classifier outputs (classification heads).
        num_layers: number of linear layers (AdapterHub's ``layers``).
        activation_function: between the layers (``"tanh"``, ``"gelu"``, ...; None: none).
        bias: the last linear layer has a bias.
        use_pooler: classification on the output's ``pooler_output`` instead of the first token.
        cls_token: ``"first"`` (BERT-like models), ``"last"`` (the last non-padding token: decoder models) or
            ``"eos"`` (the last eos token of ``input_ids``: encoder-decoder models).
        layer_norm: language-model heads: a LayerNorm after each hidden layer.
        embedding_size: language-model heads: width of the hidden layers (None: the model's hidden size).
        vocab_size: language-model heads: outputs (None: the model config's ``vocab_size``).
        dropout: classification heads: dropout before each linear layer (training only).
        layer_norm_eps: epsilon of the LayerNorms.
        hidden_size: the model's hidden size (None: read from the model config).
        label2id: label names (kept for the user; not used in the forward).
        init_weights: accepted for the common interface (the head starts as torch's default Linear init).
    """

    standalone: ClassVar[bool] = False
    standalone_note: ClassVar[str] = (
        "a head belongs to an adapter: ak.Union(<adapter config>, ak.FlexHead(...)); AdapterHub files with a head "
        "load as such"
    )

    head_type: str = "classification"
    num_labels: int = 2
    num_layers: int = 2
    activation_function: str | None = "tanh"
    bias: bool = True
    use_pooler: bool = False
    cls_token: str = "first"
    layer_norm: bool = False
    embedding_size: int | None = None
    vocab_size: int | None = None
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    hidden_size: int | None = None
    label2id: Mapping[str, int] | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"head_type {self.head_type!r} is not one of {', '.join(HEAD_TYPES)}")
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"a head needs num_layers >= 1, got {self.num_layers!r}")
        if self.head_type in CLASSIFIERS and (not isinstance(self.num_labels, int) or self.num_labels < 1):
            raise ValueError(f"num_labels must be a positive integer, got {self.num_labels!r}")
        if self.cls_token not in ("first", "last", "eos"):
            raise ValueError(f"cls_token must be 'first', 'last' or 'eos', got {self.cls_token!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation_function is not None:
            activation(self.activation_function)  # unknown names raise here
        if self.label2id is not None:
            object.__setattr__(self, "label2id", dict(self.label2id))

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("",)

    def build(self, module: nn.Module, name: str) -> Component:
        if name != "":
            raise TargetError(f"a flex head sits on the model as a whole, not on {name!r}: leave `targets` unset")
        config = getattr(module, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = self.hidden_size or getattr(text, "hidden_size", None)
        vocab = self.vocab_size or getattr(text, "vocab_size", None)
        if not isinstance(hidden, int):
            raise TargetError(
                f"cannot tell the hidden size of this {type(module).__name__}: pass FlexHead(hidden_size=...)"
            )
        if self.head_type in LANGUAGE_MODELS and not isinstance(vocab, int):
            raise TargetError(f"cannot tell the vocabulary size of this {type(module).__name__}: pass vocab_size=")
        like = next(module.parameters(), None)
        layer = FlexHeadLayer(self, hidden, vocab, like)
        layer.pad_token_id = getattr(text, "pad_token_id", None)
        layer.eos_token_id = getattr(text, "eos_token_id", None)
        return layer


def _classifier(cfg: FlexHead, hidden: int) -> list[nn.Module]:
    """AdapterHub's ``PredictionHead.build``: Dropout, Linear(H, H), act per hidden layer; Dropout, Linear(H, C)."""
    out: list[nn.Module] = []
    for i in range(cfg.num_layers):
        out.append(nn.Dropout(cfg.dropout))
        if i < cfg.num_layers - 1:
            out.append(nn.Linear(hidden, hidden))
            if cfg.activation_function:
                out.append(activation(cfg.activation_function))
        else:
            out.append(nn.Linear(hidden, cfg.num_labels, bias=cfg.bias))
    return out


def _language_model(cfg: FlexHead, hidden: int, vocab: int) -> list[nn.Module]:
    """AdapterHub's ``CausalLMHead.build`` (and the masked-LM head): hidden layers, then Linear(E, vocab)."""
    width = cfg.embedding_size or hidden
    out: list[nn.Module] = []
    for i in range(cfg.num_layers - 1):
        out.append(nn.Linear(hidden if i == 0 else width, width))
        if cfg.activation_function:
            out.append(activation(cfg.activation_function))
        if cfg.layer_norm:
            out.append(nn.LayerNorm(width, eps=cfg.layer_norm_eps))
    out.append(nn.Linear(width if cfg.num_layers > 1 else hidden, vocab, bias=cfg.bias))
    return out


class FlexHeadLayer(Component):
    """The head at the model root: adds ``logits`` to the model's output (module docstring)."""

    def __init__(self, cfg: FlexHead, hidden: int, vocab: int | None, like: torch.Tensor | None) -> None:
        super().__init__()
        layers = (
            _classifier(cfg, hidden) if cfg.head_type in CLASSIFIERS else _language_model(cfg, hidden, vocab or 0)
        )
        self.net = nn.Sequential(*layers)
        if like is not None and like.is_floating_point():
            self.net.to(device=like.device, dtype=like.dtype)
        self.head_type = cfg.head_type
        self.use_pooler = cfg.use_pooler
        self.cls_token = cfg.cls_token
        self.pad_token_id: int | None = None
        self.eos_token_id: int | None = None

    def extra_repr(self) -> str:
        return f"head_type={self.head_type!r}"

    @staticmethod
    def _input_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        return ids

    def _last(self, args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> torch.Tensor | int:
        """Per row, the position AdapterHub's decoder classifiers read: ``count(input_ids != pad) − 1``, else -1."""
        ids = self._input_ids(args, kwargs)
        if self.pad_token_id is None or ids is None:
            return -1
        return (ids != self.pad_token_id).sum(-1).to(hidden.device) - 1

    def _eos(self, args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> torch.Tensor:
        """``(B, H)``: per row, ``hidden`` at the last eos token of ``input_ids``, as AdapterHub's encoder-decoder
        classifiers (``x[eos_mask].view(B, -1, H)[:, -1]``: every row must hold the same number of eos tokens)."""
        ids = self._input_ids(args, kwargs)
        if ids is None or self.eos_token_id is None:
            raise ValueError(
                "this head reads the last eos token of input_ids (cls_token='eos'): call the model with input_ids "
                "(and a model config with eos_token_id)"
            )
        mask = ids.eq(self.eos_token_id).to(hidden.device)
        if mask.shape != hidden.shape[:2]:
            raise ValueError(
                f"this head reads the output at the eos tokens of input_ids {tuple(ids.shape)}, but the output has "
                f"{tuple(hidden.shape[:2])} positions (decoder inputs of another length?)"
            )
        counts = mask.sum(-1)
        if int(counts.min()) != int(counts.max()) or int(counts.min()) == 0:
            raise ValueError(
                f"every row of input_ids must hold the same number (> 0) of eos tokens ({self.eos_token_id}) for "
                f"this head, as in AdapterHub; got {counts.tolist()}"
            )
        return hidden[mask, :].view(hidden.shape[0], -1, hidden.shape[-1])[:, -1, :]

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        """``y``: the model's output (a ``ModelOutput`` or a tuple); returns it with ``logits`` added."""
        hidden = y[0]
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(
                f"a flex head needs the model's last hidden state first in its output, got {type(hidden)}"
            )
        dtype = self.net[-1].weight.dtype
        if self.head_type in ("classification", "multilabel_classification"):
            if self.use_pooler:
                pooled = y.get("pooler_output") if hasattr(y, "get") else None
                if pooled is None:
                    raise ValueError(
                        "this head uses the pooler output (use_pooler), which the model did not return"
                    )
                x = pooled
            elif self.cls_token == "last":
                x = hidden[torch.arange(hidden.shape[0], device=hidden.device), self._last(args, kwargs, hidden)]
            elif self.cls_token == "eos":
                x = self._eos(args, kwargs, hidden)
            else:
                x = hidden[:, 0]
        else:
            x = hidden
        logits = self.net(x.to(dtype))
        if isinstance(y, tuple):
            return (*y, logits)
        y["logits"] = logits
        return y
