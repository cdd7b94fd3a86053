"""LLaMA-Adapter (Zhang et al. 2024, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
Attention", ICLR 2024): learnable adaption prompts in the top ``L`` attention layers, gated from zero.

In each of the top ``adapter_layers`` layers ``l`` a prompt ``P_l: (K, d)`` (``K = adapter_len`` tokens in the
layer's input space) is projected by the layer's *own* key/value projections, and the layer's queries attend to it
separately from the real tokens (§3.2, "zero-init attention"); the result is scaled by a gate that starts at zero,
so the adapted model equals the base model at initialization::

    Q = rope(norm_q(W_q h))                       (B, H, L, hd)   the query the layer itself uses
    K_p = norm_k(W_k P_l),  V_p = W_v P_l         (H_kv, K, hd)   no position (the prompt has none)
    S_p = softmax(Q K_pᵀ · scale)                 (B, H, L, K)    over the prompt only
    out = attention(h) + W_o_nobias(g_l · S_p V_p)

This is peft's ``adaption_prompt`` (``AdaptedAttention``) and the authors' v1 code: the prompt's keys get no
rotary embedding, the query is the rotated one, the softmax is computed in float32, the gate multiplies the
softmax scores and grouped-query attention repeats each key/value head for its ``H / H_kv`` query heads.

Where it acts: every module with the role ``attention`` whose projections have the roles ``attn.q``, ``attn.k``,
``attn.v`` (or one fused ``attn.qkv``, split ``[q | k | v]``) and ``attn.out``, read from the model's profile
(``profiles.py``) or inferred (``infer_roles.py``); no model-name branches. Decisions for what peft (LLaMA,
Mistral and GPT-2 only) leaves open, all "as the layer computes its own attention":

* the query is recomputed from the attention call's ``hidden_states`` through the layer's query projection (with
  any adapter on it), its ``q_norm`` where the attention module has one (Qwen3, Gemma 3: per head or over the
  whole width, by the norm's size), and the rotary embedding the model passes as ``position_embeddings``
  (``(cos, sin)``; partial rotary such as Phi-3's rotates the first ``cos.shape[-1]`` dimensions, as
  transformers does). Models without ``position_embeddings`` (GPT-2, BERT) use the projected query.
* the prompt's keys go through the module's ``k_norm`` where there is one (keys of such layers are always
  normalized); no rotary embedding (peft, the paper).
* the score scale is the module's ``scaling`` (``head_dim ** -0.5`` on LLaMA, which is peft's
  ``1 / sqrt(head_dim)``; Gemma 2's ``query_pre_attn_scalar``, GPT-2's per-layer scaling), and
  ``attn_logit_softcapping`` is applied where the module has it.
* the output projection: when ``attn.out`` lies inside the attention module (LLaMA, GPT-2), the gated result
  is projected through it *without its bias* (peft calls ``o_proj`` with its bias, which is the same on every
  model peft supports: none has an ``o_proj`` bias; with a bias peft's adapter is no identity at init). When the
  attention module returns the heads before the projection (BERT's ``attention.self``), the result is added
  there and the model's own projection follows. Either way ``W_o`` sees ``attention + adapter``, as in the paper.
  peft's GPT-2 path adds the result *without* ``c_proj`` (after the attention output); ``project_output=False``
  does the same (peft's GPT-2 files load as such, and only such GPT-2 adapters export to peft).

Gates (``gate``): ``"layer"`` is one scalar per layer (peft's ``adaption_gate: (1,)``, the authors' v1 code);
``"head"`` is one per query head (the per-head gating of the authors' later code; not exportable to peft).
``init_weights=False`` draws the gate from ``N(0, 1)`` (a non-identity start, for tests).

Generation: nothing enters the KV cache. The prompt's keys and values depend only on parameters and are
recomputed at every call (``K`` tokens), and each step's queries come with their own rotary embedding, so
``generate()`` with and without a cache agree, and the ``past_key_values``/``cache`` renaming of transformers
5.24 does not concern this method. Not mergeable (attention over extra keys is no weight change). Per-row
routing: each row attends to its own adapter's prompt (padded to the longest ``adapter_len`` and masked), base
rows add nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..backends import backend_for
from ..component import Component, first_input
from ..config import AdapterConfig, register
from ..targeting import CONTAINER, TargetError
from .prompt import as_kwargs, takes

PUBLIC = ("LlamaAdapter",)
__all__ = ["LlamaAdapter", "AdaptionPrompt", "AttentionLayout", "attention_layout"]

_GATES = ("layer", "head")
_ALTERNATIVES = (
    "use prefix tuning (ak.PrefixTuning(), which extends every layer's keys/values through the KV cache) or LoRA "
    "(ak.LoRA())"
)


# --- config -------------------------------------------------------------------------------------------
@register("llama_adapter")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaAdapter(AdapterConfig):
    """LLaMA-Adapter: gated adaption prompts in the top attention layers (zero-init attention).

    Args:
        adapter_len: prompt tokens ``K`` per layer (peft's ``adapter_len``; the paper uses 10).
        adapter_layers: how many attention layers, counted from the top, get a prompt (peft's ``adapter_layers``;
            the paper uses 30 of LLaMA-7B's 32). None: every targeted attention layer.
        gate: ``"layer"`` (one zero-initialized scalar per layer, peft) or ``"head"`` (one per query head).
        init_weights: True: gates start at zero (the adapted model equals the base); False: gates from
            ``N(0, 1)``. Prompts are drawn from ``N(0, 1)`` either way (peft, the authors' ``nn.Embedding``).
        project_output: True: the gated result goes through the attention's output projection (the paper; peft on
            LLaMA/Mistral). False: it is added to the attention output unprojected (peft's GPT-2 path).
        targets: default ``["attention"]`` (the attention modules of the model's profile); ``layers`` keeps
            some layer indices, of which the top ``adapter_layers`` are used.
    """

    adapter_len: int = 10
    adapter_layers: int | None = None
    gate: str = "layer"
    init_weights: bool = True
    project_output: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.adapter_len, bool) or not isinstance(self.adapter_len, int) or self.adapter_len <= 0:
            raise ValueError(f"adapter_len must be a positive integer, got {self.adapter_len!r}")
        if self.adapter_layers is not None and (
            isinstance(self.adapter_layers, bool)
            or not isinstance(self.adapter_layers, int)
            or self.adapter_layers <= 0
        ):
            raise ValueError(
                f"adapter_layers must be a positive integer (layers from the top) or None (all), got "
                f"{self.adapter_layers!r}"
            )
        if self.gate not in _GATES:
            raise ValueError(f"gate must be one of {', '.join(map(repr, _GATES))}, got {self.gate!r}")
        if not isinstance(self.project_output, bool):
            raise ValueError(f"project_output must be True or False, got {self.project_output!r}")

    def default_targets(self, roles: Mapping[str, Any]) -> tuple[str, ...]:
        if "attention" not in roles:
            raise TargetError(
                "LLaMA-Adapter acts on attention layers (role 'attention' with their q/k/v/out projections), and "
                "this model has no attention roles (no profile for its model type, or no attention module found); "
                f"pass targets=[<attention module names>] for a transformers-style attention, or {_ALTERNATIVES}, "
                "or a bottleneck adapter (ak.Bottleneck())"
            )
        return ("attention",)

    def build(self, module: nn.Module, name: str) -> Component:
        raise TypeError("LLaMA-Adapter components are built together (top layers, roles): use build_all")

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        """One :class:`AdaptionPrompt` on each of the top ``adapter_layers`` attention modules of ``targets``."""
        root = modules[""]
        config = getattr(root, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            raise TargetError(
                f"LLaMA-Adapter acts on decoder-only (and encoder-only) models; {type(root).__name__} is an "
                f"encoder-decoder model: {_ALTERNATIVES}"
            )
        if "" in targets:
            raise TargetError(
                "LLaMA-Adapter acts on attention modules, not on the model itself: target 'attention'"
            )
        if self.adapter_layers is not None:
            if self.adapter_layers > len(targets):
                raise ValueError(
                    f"adapter_layers={self.adapter_layers}, but {type(root).__name__} has {len(targets)} targeted "
                    f"attention layer{'s' if len(targets) != 1 else ''}; use adapter_layers <= {len(targets)} (or "
                    "None for all of them)"
                )
            targets = targets[-self.adapter_layers :]
        roles = {
            role: _try_select(select, role) for role in ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.out")
        }
        out: dict[str, Component] = {}
        for name in targets:
            layout = attention_layout(modules, name, roles, config)
            out[name] = AdaptionPrompt(self, layout, modules[name])
        return out


def _try_select(select: Callable[[Sequence[Any]], list[str]], role: str) -> list[str]:
    try:
        return select([role])
    except TargetError:  # the role does not exist or matches nothing on this model
        return []


# --- where the projections are ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    """The projections and sizes of one attention module (all modules are the model's own, not copies).

    Attributes:
        name: the attention module's name.
        q, k, v: the query/key/value projections; ``qkv`` instead when they are fused (``[q | k | v]``).
        out: the output projection when it lies inside the attention module, else None (add before it).
        heads, kv_heads, head_dim: query heads, key/value heads (grouped-query attention: fewer), head size.
        scaling: the score scale the module uses (``head_dim ** -0.5`` when it names none).
        softcap: ``attn_logit_softcapping`` of the module, or None.
        q_norm, k_norm: the module's query/key norms (Qwen3, Gemma 3, OLMo 2), or None.
        hidden: the width of the attention's input (the prompt's width).
    """

    name: str
    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    qkv: nn.Module | None
    out: nn.Module | None
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    softcap: float | None
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    hidden: int


def _dims(module: nn.Module, what: str, attention: str) -> tuple[int, int]:
    backend = backend_for(module)
    if backend is None or backend.kind != "linear":
        raise TargetError(
            f"LLaMA-Adapter needs linear projections; the {what} projection of {attention!r} is a "
            f"{type(module).__name__}: {_ALTERNATIVES}"
        )
    d_in, d_out = backend.dims(module)
    return int(d_in), int(d_out)


def _inside(names: list[str], attention: str) -> list[str]:
    return [n for n in names if n.startswith(attention + ".")]


def _first_int(obj: Any, names: tuple[str, ...]) -> int | None:
    for n in names:
        value = getattr(obj, n, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def attention_layout(
    modules: Mapping[str, nn.Module], name: str, roles: Mapping[str, list[str]], config: Any
) -> AttentionLayout:
    """The projections (by role) and head sizes of attention module ``name``.

    Raises:
        TargetError: the module is no attention with q/k/v (or fused qkv) projections, or its sizes cannot be read.
    """
    attn = modules[name]
    found = {role: _inside(names, name) for role, names in roles.items()}
    separate = all(len(found[r]) == 1 for r in ("attn.q", "attn.k", "attn.v"))
    fused = len(found["attn.qkv"]) == 1
    if not separate and not fused:
        seen = ", ".join(f"{r}: {found[r]}" for r in ("attn.q", "attn.k", "attn.v", "attn.qkv")) or "none"
        raise TargetError(
            f"LLaMA-Adapter needs the query, key and value projections of {name!r} (one each of the roles attn.q, "
            f"attn.k, attn.v, or one fused attn.qkv); found {seen}. Target attention modules (role 'attention'), "
            f"or {_ALTERNATIVES}"
        )
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    head_dim = _first_int(attn, ("head_dim", "attention_head_size", "head_size"))
    heads = _first_int(attn, ("num_heads", "num_attention_heads", "n_heads")) or _first_int(
        text, ("num_attention_heads", "n_head", "num_heads")
    )
    if head_dim is None and heads is not None:
        hidden = _first_int(text, ("hidden_size", "n_embd", "d_model"))
        head_dim = hidden // heads if hidden else None
    if head_dim is None:
        raise TargetError(
            f"LLaMA-Adapter cannot read the head size of {name!r} ({type(attn).__name__}; attention-free token "
            f"mixers such as Mamba's have none): {_ALTERNATIVES}"
        )
    if separate:
        q, k, v = (modules[found[r][0]] for r in ("attn.q", "attn.k", "attn.v"))
        hidden, q_out = _dims(q, "query", name)
        k_out, v_out = _dims(k, "key", name)[1], _dims(v, "value", name)[1]
        qkv = None
    else:
        q = k = v = None
        qkv = modules[found["attn.qkv"][0]]
        hidden, total = _dims(qkv, "fused qkv", name)
        if heads is None:
            raise TargetError(
                f"LLaMA-Adapter cannot read the number of heads of {name!r} ({type(attn).__name__}): {_ALTERNATIVES}"
            )
        q_out = heads * head_dim
        k_out = v_out = (total - q_out) // 2
        if k_out <= 0 or q_out + 2 * k_out != total:
            raise TargetError(
                f"the fused projection of {name!r} has {total} outputs, which is no [q | k | v] split of {heads} "
                f"heads x {head_dim} plus two equal key/value parts"
            )
    if q_out % head_dim or k_out % head_dim or k_out != v_out:
        raise TargetError(
            f"the projections of {name!r} ({q_out} query, {k_out} key, {v_out} value outputs) do not split into "
            f"heads of {head_dim}"
        )
    heads, kv_heads = q_out // head_dim, k_out // head_dim
    if heads % kv_heads:
        raise TargetError(f"{name!r} has {heads} query heads, not a multiple of its {kv_heads} key/value heads")
    outs = found["attn.out"]
    out = modules[outs[0]] if len(outs) == 1 else None
    if out is not None:
        o_in, o_out = _dims(out, "output", name)
        if o_in != q_out:
            raise TargetError(
                f"the output projection of {name!r} takes {o_in} inputs, not the {q_out} of its heads"
            )
    scaling = getattr(attn, "scaling", None)
    scaling = (
        float(scaling) if isinstance(scaling, (int, float)) and not isinstance(scaling, bool) else head_dim**-0.5
    )
    softcap = getattr(attn, "attn_logit_softcapping", None)
    norms = {}
    for key, width in (("q_norm", q_out), ("k_norm", k_out)):
        norm = getattr(attn, key, None)
        if isinstance(norm, nn.Module):
            size = getattr(norm, "weight", None)
            size = size.numel() if isinstance(size, torch.Tensor) else None
            if size not in (head_dim, width):
                raise TargetError(
                    f"{name}.{key} normalizes {size} values, neither one head ({head_dim}) nor all heads ({width})"
                )
            norms[key] = norm
    return AttentionLayout(
        name=name,
        q=q,
        k=k,
        v=v,
        qkv=qkv,
        out=out,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        scaling=scaling,
        softcap=float(softcap) if isinstance(softcap, (int, float)) and not isinstance(softcap, bool) else None,
        q_norm=norms.get("q_norm"),
        k_norm=norms.get("k_norm"),
        hidden=hidden,
    )


# --- the component ------------------------------------------------------------------------------------
def _norm(norm: nn.Module | None, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``x: (B, T, heads, head_dim)`` through a per-head or whole-width norm."""
    if norm is None:
        return x
    if norm.weight.numel() == head_dim:
        return norm(x)
    return norm(x.flatten(2)).view(x.shape)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(q: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
    """Rotary embedding of ``q: (B, H, L, hd)`` with the model's ``(cos, sin)``, each ``(B, L, rot)``: the first
    ``rot`` dimensions rotate (half-split pairs, transformers' ``rotate_half``), the rest pass."""
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
    rot = cos.shape[-1]
    if rot == q.shape[-1]:
        return q * cos + _rotate_half(q) * sin
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    return torch.cat([q_rot * cos + _rotate_half(q_rot) * sin, q_pass], dim=-1)


class AdaptionPrompt(Component):
    """The gated adaption prompt of one attention layer.

    Parameters: ``adaption_prompt: (1, K, hidden)`` (peft's layout) and ``adaption_gate: (1,)`` (``gate="layer"``)
    or ``(heads,)`` (``gate="head"``).
    """

    has_post = True

    def __init__(self, cfg: LlamaAdapter, layout: AttentionLayout, attention: nn.Module) -> None:
        super().__init__()
        ref = next((p for p in attention.parameters() if p.is_floating_point()), None)
        factory = {
            "device": ref.device if ref is not None else None,
            "dtype": ref.dtype if ref is not None else None,
        }
        self.adapter_len = cfg.adapter_len
        self.init_weights = cfg.init_weights
        self.adaption_prompt = nn.Parameter(torch.empty(1, cfg.adapter_len, layout.hidden, **factory))
        self.adaption_gate = nn.Parameter(torch.zeros(1 if cfg.gate == "layer" else layout.heads, **factory))
        self.per_head = cfg.gate == "head"
        self.project_output = cfg.project_output
        object.__setattr__(self, "layout", layout)  # the model's own modules: not registered as children
        object.__setattr__(self, "_module_ref", attention)
        self._rope_taken = takes(type(attention), "position_embeddings")

    def extra_repr(self) -> str:
        lay = self.layout
        return (
            f"adapter_len={self.adapter_len}, heads={lay.heads}, kv_heads={lay.kv_heads}, head_dim={lay.head_dim}, "
            f"gate={'head' if self.per_head else 'layer'}"
        )

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        nn.init.normal_(self.adaption_prompt)
        if self.init_weights:
            nn.init.zeros_(self.adaption_gate)
        else:
            nn.init.normal_(self.adaption_gate)

    # --- pieces ---------------------------------------------------------------------------------------
    def query(self, hidden: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
        """``hidden: (B, L, d) -> (B, H, L, hd)``: the query the layer computes (projection, norm, rotary)."""
        lay = self.layout
        q = lay.q(hidden) if lay.q is not None else lay.qkv(hidden)[..., : lay.heads * lay.head_dim]
        q = _norm(lay.q_norm, q.view(*q.shape[:-1], lay.heads, lay.head_dim), lay.head_dim).transpose(1, 2)
        if position_embeddings is not None:
            q = _rope(q, position_embeddings)
        return q

    def prompt_kv(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompt: (B', K, d) -> (keys, values)``, each ``(B', H, K, hd)`` (key/value heads repeated for
        grouped-query attention)."""
        lay = self.layout
        if lay.qkv is not None:
            kv = lay.qkv(prompt)[..., lay.heads * lay.head_dim :]
            k, v = kv.split(lay.kv_heads * lay.head_dim, dim=-1)
        else:
            k, v = lay.k(prompt), lay.v(prompt)
        shape = (*prompt.shape[:2], lay.kv_heads, lay.head_dim)
        k = _norm(lay.k_norm, k.reshape(shape), lay.head_dim).transpose(1, 2)
        v = v.reshape(shape).transpose(1, 2)
        groups = lay.heads // lay.kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return k, v

    def scores(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax over the prompt, in float32 (peft, the paper's code), back in ``q``'s dtype: ``(B, H, L, K)``."""
        s = torch.matmul(q, k.transpose(2, 3).to(q.dtype)) * self.layout.scaling
        if self.layout.softcap is not None:
            s = torch.tanh(s / self.layout.softcap) * self.layout.softcap
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)

    def gate_of(self, dtype: torch.dtype) -> torch.Tensor:
        """The gate broadcastable to ``(B, H, L, K)``."""
        g = self.adaption_gate.to(dtype)
        return g.view(1, -1, 1, 1) if self.per_head else g

    def project(self, heads_out: torch.Tensor, through_out: bool | None = None) -> torch.Tensor:
        """``(B, H, L, hd) -> (B, L, width)``: through the output projection (without its bias) when it is inside
        the attention module and ``through_out`` (default: ``project_output``) is on, else the concatenated heads."""
        b, _, length, _ = heads_out.shape
        x = heads_out.transpose(1, 2).reshape(b, length, -1)
        out = self.layout.out
        if out is None or not (self.project_output if through_out is None else through_out):
            return x
        y = out(x)
        bias = getattr(out, "bias", None)
        return y - bias.to(y.dtype) if isinstance(bias, torch.Tensor) else y

    def _prompt_rows(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The prompt as ``(B', K, d)``: one row, or one per row of the batch when adapters of other methods sit
        on the key/value projections (their routing and row checks see the whole batch)."""
        p = self.adaption_prompt.to(dtype)
        lay = self.layout
        if any(m is not None and CONTAINER in m._modules for m in (lay.k, lay.v, lay.qkv)):
            p = p.expand(batch, -1, -1)
        return p

    # --- forward --------------------------------------------------------------------------------------
    def _inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """``(hidden_states, position_embeddings or None)`` of the attention call (given by keyword or position)."""
        kw = as_kwargs(self.__dict__["_module_ref"], args, kwargs) if args else kwargs
        hidden = kw["hidden_states"] if "hidden_states" in kw else first_input(args, kwargs)
        pos = kw.get("position_embeddings")
        if pos is None and self._rope_taken:
            raise ValueError(
                f"{self.layout.name!r} takes rotary position_embeddings but was called without them; LLaMA-Adapter "
                "needs the rotated query of the layer (call the model, not the attention module alone)"
            )
        return hidden, pos

    def post_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any) -> Any:
        hidden, pos = self._inputs(args, kwargs)
        out = y[0] if isinstance(y, tuple) else y
        q = self.query(hidden, pos)
        k, v = self.prompt_kv(self._prompt_rows(hidden.shape[0], q.dtype))
        s = self.gate_of(q.dtype) * self.scores(q, k)
        delta = self.project(torch.matmul(s, v.to(q.dtype)))
        new = out + delta.to(out.dtype)
        return (new, *y[1:]) if isinstance(y, tuple) else new

    @classmethod
    def routed_output(
        cls, comps: list[Component | None], plan: Any, args: tuple[Any, ...], kwargs: dict[str, Any], y: Any
    ) -> Any:
        """Each row attends to its own adapter's prompt: prompts padded to the longest (masked out), gates of
        base rows (and of adapters without a prompt in this layer) zero."""
        head = next(c for c in comps if c is not None)
        hidden, pos = head._inputs(args, kwargs)
        out = y[0] if isinstance(y, tuple) else y
        batch, lay = hidden.shape[0], head.layout
        q = head.query(hidden, pos)
        width = max(c.adapter_len for c in comps if c is not None)
        prompts = q.new_zeros(batch, width, lay.hidden)
        mask = torch.zeros(batch, width, dtype=torch.bool, device=q.device)
        mask[:, 0] = True  # rows without a prompt: one zero slot (their gate is zero), so the softmax stays finite
        gates = q.new_zeros(batch, lay.heads)
        for (_, rows), c in zip(plan.groups, comps):
            if c is None:
                continue
            n = c.adapter_len
            prompts[rows, :n] = c.adaption_prompt[0].to(q.dtype)
            mask[rows, :n] = True
            gates[rows] = c.adaption_gate.to(q.dtype).expand(lay.heads)
        k, v = head.prompt_kv(prompts)
        s = gates[:, :, None, None] * head.scores(q, k, mask[:, None, None, :])
        heads_out = torch.matmul(s, v.to(q.dtype))
        kinds = {c.project_output for c in comps if c is not None}
        if len(kinds) == 1:
            delta = head.project(heads_out)
        else:  # some adapters add the result through the output projection, others unprojected
            projected = torch.zeros(batch, dtype=torch.bool, device=q.device)
            for (_, rows), c in zip(plan.groups, comps):
                if c is not None and c.project_output:
                    projected[rows] = True
            delta = torch.where(
                projected[:, None, None], head.project(heads_out, True), head.project(heads_out, False)
            )
        new = out + delta.to(out.dtype)
        return (new, *y[1:]) if isinstance(y, tuple) else new
