"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens computed by a prompt encoder.

Prompt tuning (``methods/prompt.py``) trains the virtual token embeddings directly. P-tuning trains a small
network that *produces* them from a learned table (§3.2, "Prompt Encoder": the virtual embeddings are
"discrete" and "associated" with each other, so a bidirectional LSTM over the table, followed by a
ReLU-activated MLP, models their dependency and trains faster and more stably)::

    table: (T, dim)  ─►  encoder  ─►  (T, dim)  ─►  first P rows = the prompt  ─►  prepended like prompt tuning

    MLP  (default):  Linear(dim, h) ─ ReLU ─ [Linear(h, h) ─ ReLU] x (encoder_num_layers - 1) ─ Linear(h, dim)
    LSTM:            BiLSTM(dim -> h, encoder_num_layers layers) ─ Linear(2h, 2h) ─ ReLU ─ Linear(2h, dim)

``T = num_virtual_tokens * num_transformer_submodules``; ``h = encoder_hidden_size`` (default ``dim``). The
prompt then goes in front of the input exactly as a prompt-tuning prompt does (same component machinery:
masks, positions, labels, stripped logits, ``generate()`` with a KV cache, encoder-decoder models, per-row
routing; see :mod:`adapterkit.methods.prompt`). The paper interleaves prompt and input through a task template
(§3.1); like peft, the prompt is prepended. The encoder runs on every call (a ``T x dim`` computation) and its
output is the prompt, so no gradient skips it.

peft compatibility (``PromptEncoderConfig``, peft 0.21): the same parameters under the same names
(``embedding``, ``mlp_head``, ``lstm_head``) and the same output for the same weights. Differences, all in
fields peft ignores: peft's MLP always has two hidden layers (it warns and ignores ``encoder_num_layers``) and
no dropout; ours has ``encoder_num_layers`` hidden layers (2 = peft's) and applies ``encoder_dropout`` after each
hidden ReLU. The LSTM's dropout acts between its layers in both (``nn.LSTM``'s own).

Saving: natively, the whole encoder (training can continue through it). peft's files hold only the encoder
*output* (``prompt_embeddings``, ``T x dim``, what ``get_prompt_embedding_to_save`` computes), so an adapter loaded
from them has ``stored_prompt=True``: it holds that tensor as a plain parameter ``prompt_embeddings``, its output
equals peft's, and further training updates the stored prompt directly, as prompt tuning does (the encoder is not
in the file). peft itself, loading with ``is_trainable=True``, puts the stored output through a freshly
initialized encoder.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..component import Component
from ..config import AdapterConfig, register
from ..targeting import TargetError
from .prompt import SoftPrompt, component_key, encoder_prompt_sites, is_causal, whole_model_prompt

PUBLIC = ("PTuning",)
__all__ = ["PTuning", "EncoderType", "PromptEncoder", "PTuningPrompt"]


class EncoderType(str, enum.Enum):
    """The prompt encoder (peft's ``encoder_reparameterization_type``)."""

    MLP = "MLP"
    LSTM = "LSTM"


@register("p_tuning")
@dataclasses.dataclass(frozen=True, kw_only=True)
class PTuning(AdapterConfig):
    """P-tuning: ``num_virtual_tokens`` virtual tokens computed by a prompt encoder, prepended to every sequence.

    Args:
        num_virtual_tokens: prompt length ``P``.
        encoder_reparameterization_type: ``"MLP"`` (default, as peft) or ``"LSTM"`` (the paper's §3.2 encoder:
            a bidirectional LSTM, then a two-layer ReLU MLP). Case-insensitive.
        encoder_hidden_size: hidden width ``h`` of the encoder (default: the model's embedding size, as peft
            resolves it).
        encoder_num_layers: hidden layers of the MLP, or stacked layers of the LSTM (default 2, peft's).
        encoder_dropout: dropout between the LSTM's layers; in the MLP after each hidden ReLU (peft's MLP has
            none). Active in training mode only.
        token_dim: the model's embedding size; leave unset (read from the input embeddings) or give the value
            to have it checked.
        num_transformer_submodules: the table holds ``P * num_transformer_submodules`` rows and the prompt is the
            encoder output's first ``P``. 1 by default; peft uses 2 for ``SEQ_2_SEQ_LM`` (it allocates a second
            block it never reads, but an LSTM's output for the first ``P`` rows depends on it), so set 2 to
            reproduce a peft P-tuning setup on T5/BART.
        stored_prompt: hold the encoder's output ``(T, dim)`` as a plain trainable parameter instead of the encoder
            (starting from a fresh encoder's output). Set by loading peft's files, which store only that output;
            training then updates the prompt directly, as prompt tuning.
        init_weights: accepted for the common interface; the table starts ``N(0, 1)`` and the encoder layers
            with torch's default init (peft's), since no prompt is an identity.
        targets: leave unset; the method acts on the model as a whole (module name ``""``).
    """

    num_virtual_tokens: int = 20
    encoder_reparameterization_type: EncoderType = EncoderType.MLP
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    token_dim: int | None = None
    num_transformer_submodules: int = 1
    stored_prompt: bool = False
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = self.encoder_reparameterization_type
        try:
            kind = EncoderType(
                kind.upper() if isinstance(kind, str) and not isinstance(kind, EncoderType) else kind
            )
        except ValueError:
            raise ValueError(
                f"encoder_reparameterization_type must be 'MLP' or 'LSTM', got {self.encoder_reparameterization_type!r}"
            ) from None
        object.__setattr__(self, "encoder_reparameterization_type", kind)
        for field, minimum in (
            ("num_virtual_tokens", 1),
            ("encoder_num_layers", 1),
            ("num_transformer_submodules", 1),
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        for field in ("encoder_hidden_size", "token_dim"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{field} must be a positive integer or None, got {value!r}")
        drop = self.encoder_dropout
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
            raise ValueError(f"encoder_dropout must be a number in [0, 1), got {drop!r}")
        object.__setattr__(self, "encoder_dropout", float(drop))

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        return ("",)

    def build(self, module: nn.Module, name: str) -> Component:
        return whole_model_prompt(self, module, name, "P-tuning", self._prompt)

    def extra_sites(self, modules: Mapping[str, nn.Module], targets: list[str]) -> dict[str, Component]:
        """Encoder-decoder models: the prompt itself sits on the encoder stack (as prompt tuning's)."""
        return encoder_prompt_sites(modules, self._prompt)

    def _prompt(self, module: nn.Module, embeddings: nn.Module, token_level: bool) -> Component:
        return PTuningPrompt(self, module, embeddings, token_level=token_level)


class PromptEncoder(nn.Module):
    """The table and the encoder that maps it to the virtual tokens (peft's ``PromptEncoder`` layout).

    Args:
        cfg: the config.
        dim: the model's embedding size.
        device, dtype: where to build the parameters.

    Parameters: ``embedding: (T, dim)``; MLP: ``mlp_head``; LSTM: ``lstm_head`` (bidirectional, ``h`` per
    direction) and ``mlp_head`` (``2h -> 2h -> dim``).
    """

    def __init__(self, cfg: PTuning, dim: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        f = {"device": device, "dtype": dtype}
        total = cfg.num_virtual_tokens * cfg.num_transformer_submodules
        h, drop = cfg.encoder_hidden_size or dim, cfg.encoder_dropout
        self.kind = cfg.encoder_reparameterization_type
        self.embedding = nn.Embedding(total, dim, **f)
        if self.kind is EncoderType.LSTM:
            self.lstm_head = nn.LSTM(
                dim, h, num_layers=cfg.encoder_num_layers, dropout=drop, bidirectional=True, batch_first=True, **f
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, **f), nn.ReLU(), nn.Linear(2 * h, dim, **f))
        else:
            layers: list[nn.Module] = []
            width = dim
            for _ in range(cfg.encoder_num_layers):
                layers += [nn.Linear(width, h, **f), nn.ReLU()]
                if drop > 0:
                    layers.append(nn.Dropout(drop))
                width = h
            self.mlp_head = nn.Sequential(*layers, nn.Linear(width, dim, **f))

    def forward(self) -> torch.Tensor:
        """The encoder output ``(T, dim)`` for the whole table."""
        x = self.embedding.weight.unsqueeze(0)  # (1, T, dim): the lookup of indices 0..T-1
        if self.kind is EncoderType.LSTM:
            x = self.lstm_head(x)[0]  # (1, T, 2h)
        return self.mlp_head(x).squeeze(0)


class PTuningPrompt(SoftPrompt):
    """A :class:`~adapterkit.methods.prompt.SoftPrompt` whose prompt is the prompt encoder's output.

    ``prompt`` (``(P, dim)``) is computed on each access: the first ``P`` rows of ``encoder()`` (``(T, dim)``),
    or of the parameter ``prompt_embeddings`` (``(T, dim)``) with ``stored_prompt=True`` (loaded from peft's files). Everything
    else (how the prompt enters the call, generation, routing) is prompt tuning's.
    """

    def __init__(self, cfg: PTuning, module: nn.Module, embeddings: nn.Module, token_level: bool) -> None:
        Component.__init__(self)  # SoftPrompt.__init__ would create a `prompt` parameter
        weight = embeddings.weight
        dim = int(weight.shape[-1])
        if cfg.token_dim is not None and cfg.token_dim != dim:
            raise TargetError(
                f"P-tuning was configured for token_dim={cfg.token_dim}, but the input embeddings of "
                f"{type(module).__name__} are {dim} wide; leave token_dim unset to read it from the model"
            )
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.cfg = cfg
        self.num_virtual_tokens = cfg.num_virtual_tokens
        encoder = PromptEncoder(cfg, dim, device=weight.device, dtype=dtype)
        if cfg.stored_prompt:
            with torch.no_grad():
                self.prompt_embeddings = nn.Parameter(encoder.eval()().detach().clone())
        else:
            self.encoder = encoder
            self.register_parameter("prompt_embeddings", None)
        self.token_level = token_level
        self.has_post = token_level
        self.key = component_key()
        self.causal = is_causal(module)
        object.__setattr__(self, "_module_ref", module)
        object.__setattr__(self, "_embed_ref", embeddings)

    @property
    def prompt(self) -> torch.Tensor:  # type: ignore[override]
        """The virtual token embeddings ``(P, dim)``."""
        return self.virtual_tokens()[: self.num_virtual_tokens]

    def virtual_tokens(self) -> torch.Tensor:
        """The whole encoder output ``(T, dim)`` (``T = P * num_transformer_submodules``): what peft saves."""
        stored = self.prompt_embeddings
        return stored if stored is not None else self.encoder()

    def extra_repr(self) -> str:
        kind = (
            "stored output"
            if self.prompt_embeddings is not None
            else self.cfg.encoder_reparameterization_type.value
        )
        return f"num_virtual_tokens={self.num_virtual_tokens}, encoder={kind}"

    def initialize(self, module: nn.Module) -> None:
        """Nothing to do: the table (``N(0, 1)``) and the layers (torch defaults) are initialized when built."""
