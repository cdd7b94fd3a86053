"""Prompt tuning after the embeddings module (Lester et al. 2021, as AdapterHub's ``adapters`` implements it).

AdapterHub's ``PromptTuningLayer`` (``PromptTuningConfig``, ``combine="prefix"``) prepends the ``P`` prompt vectors
to the *output* of the model's embeddings module, so the real tokens go through the model's own embeddings as
without the adapter (word + position + token-type embeddings, LayerNorm and dropout on BERT, positions
``0 .. L-1``) while the prompt gets none of them; the attention mask gets ``P`` ones in front, and the model's
outputs keep the ``P`` virtual positions (``last_hidden_state: (B, P + L, H)``)::

    input_ids ─► embeddings (+ positions, LayerNorm) ─► [ p_1 … p_P | e_1 … e_L ] ─► encoder ─► (B, P + L, H)

:class:`~adapterkit.methods.prompt.PromptTuning` (peft's semantics) instead prepends the prompt to
``inputs_embeds``, before the position embeddings and the LayerNorm, and strips the virtual positions from
token-level outputs; the two differ on BERT.

Two components: one on the model (``""``) extends the 2-D ``attention_mask`` by ``P`` ones, one on the embeddings
module (``<base>.embeddings``) holds ``prompt: (P, H)`` and prepends it to that module's output. Models: those whose
base model has an ``embeddings`` module whose output feeds the encoder and whose attention mask is built from
that output's length (BERT, RoBERTa, XLM-R, ELECTRA in transformers 5). Encoders only (no KV cache handling); not
with per-row routing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..component import Component
from ..config import AdapterConfig, register
from ..targeting import TargetError
from .prompt import as_kwargs, extend_mask

PUBLIC = ("EmbeddingPrompt",)
__all__ = ["EmbeddingPrompt", "EmbeddingsOutputPrompt", "PromptMask", "embeddings_module"]


@register("embedding_prompt")
@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbeddingPrompt(AdapterConfig):
    """Soft prompt prepended to the embeddings module's output (AdapterHub's prompt tuning; module docstring).

    Args:
        num_virtual_tokens: prompt length ``P`` (AdapterHub's ``prompt_length``).
        init_scale: the prompt starts from ``U(-init_scale, init_scale)`` (AdapterHub's ``random_uniform`` init,
            ``random_uniform_scale`` 0.5), or from ``init_token_ids``.
        init_token_ids: token ids whose input embeddings start the prompt (repeated or cut to ``P``; AdapterHub's
            ``from_string`` init with the tokenized text).
        init_weights: accepted for the common interface (no prompt is an identity).
        targets: leave unset; the method acts on the model and its embeddings module.
    """

    num_virtual_tokens: int = 10
    init_scale: float = 0.5
    init_token_ids: Sequence[int] | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int):
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if not isinstance(self.init_scale, (int, float)) or self.init_scale <= 0:
            raise ValueError(f"init_scale must be a positive number, got {self.init_scale!r}")
        if self.init_token_ids is not None:
            ids = tuple(self.init_token_ids)
            if not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
                raise ValueError(
                    f"init_token_ids must be a non-empty list of token ids, got {self.init_token_ids!r}"
                )
            object.__setattr__(self, "init_token_ids", ids)

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("",)

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        if targets != [""]:
            raise TargetError(
                f"EmbeddingPrompt acts on the whole model, not on {targets!r}: leave `targets` unset (or pass [''])"
            )
        model = modules[""]
        name, embeddings = embeddings_module(model, modules)
        return {"": PromptMask(self, model), name: EmbeddingsOutputPrompt(self, model, embeddings)}


def embeddings_module(model: nn.Module, modules: Mapping[str, nn.Module]) -> tuple[str, nn.Module]:
    """``(name, module)`` of the base model's ``embeddings`` module.

    Raises:
        TargetError: the model has none (decoder-only models embed with ``wte``/``embed_tokens`` and number
            positions after the prompt; use :class:`~adapterkit.methods.prompt.PromptTuning` there).
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, model) if prefix else model
    embeddings = getattr(base, "embeddings", None)
    names = {id(m): n for n, m in modules.items()}
    if not isinstance(embeddings, nn.Module) or id(embeddings) not in names:
        raise TargetError(
            f"EmbeddingPrompt needs a base model with an `embeddings` module (BERT-like encoders); "
            f"{type(model).__name__} has none: use ak.PromptTuning (the prompt in front of inputs_embeds)"
        )
    if getattr(getattr(model, "config", None), "is_decoder", False):
        raise TargetError("EmbeddingPrompt supports encoders only (no KV cache handling); use ak.PromptTuning")
    return names[id(embeddings)], embeddings


class PromptMask(Component):
    """On the model: ``P`` ones in front of a 2-D ``attention_mask`` (none given: the model attends everywhere)."""

    has_pre = True
    has_post = False

    def __init__(self, cfg: EmbeddingPrompt, model: nn.Module) -> None:
        super().__init__()
        self.num_virtual_tokens = cfg.num_virtual_tokens
        object.__setattr__(self, "_module_ref", model)

    def pre_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kw = as_kwargs(self.__dict__["_module_ref"], args, kwargs)
        if isinstance(kw.get("attention_mask"), torch.Tensor):
            kw["attention_mask"] = extend_mask(kw["attention_mask"], self.num_virtual_tokens, None)
        return (), kw


class EmbeddingsOutputPrompt(Component):
    """On the embeddings module: ``[prompt ; output]``, ``output: (B, L, H) -> (B, P + L, H)``.
    Parameter: ``prompt: (P, H)``."""

    def __init__(self, cfg: EmbeddingPrompt, model: nn.Module, embeddings: nn.Module) -> None:
        super().__init__()
        get = getattr(model, "get_input_embeddings", None)
        words = get() if callable(get) else None
        weight = getattr(words, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            # no token embedding table (vision encoders: ViT's patch projection): the prompt has the hidden size
            hidden = getattr(getattr(model, "config", None), "hidden_size", None)
            ref = next(embeddings.parameters(), None)
            if not isinstance(hidden, int) or ref is None:
                raise TargetError(f"EmbeddingPrompt needs the input token embeddings of {type(model).__name__}")
            if cfg.init_token_ids is not None:
                raise TargetError(
                    f"EmbeddingPrompt(init_token_ids=...) copies token embeddings, which {type(model).__name__} does "
                    "not have: drop init_token_ids"
                )
            weight = ref.new_empty(0, hidden)
            words = None
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.prompt = nn.Parameter(
            torch.empty(cfg.num_virtual_tokens, weight.shape[1], device=weight.device, dtype=dtype)
        )
        self.init_scale = float(cfg.init_scale)
        self.init_token_ids = cfg.init_token_ids
        object.__setattr__(self, "_words_ref", words)

    def extra_repr(self) -> str:
        return f"P={self.prompt.shape[0]}, dim={self.prompt.shape[1]}"

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        if self.init_token_ids is None:
            nn.init.uniform_(self.prompt, -self.init_scale, self.init_scale)
            return
        n = self.prompt.shape[0]
        ids = (list(self.init_token_ids) * (n // len(self.init_token_ids) + 1))[:n]
        words = self.__dict__["_words_ref"]
        self.prompt.copy_(words.weight[torch.tensor(ids, device=words.weight.device)].to(self.prompt.dtype))

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        if not isinstance(y, torch.Tensor) or y.dim() != 3:
            raise TypeError(
                f"EmbeddingPrompt expects the embeddings module to return (B, L, H), got {type(y).__name__}"
            )
        prompt = self.prompt.to(y.dtype).unsqueeze(0).expand(y.shape[0], -1, -1)
        return torch.cat([prompt, y], dim=1)
