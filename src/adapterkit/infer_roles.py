"""Roles for architectures without a hand-written profile, derived from the module tree.

``profiles.profile_for`` uses :func:`infer_roles` when no entry of ``profiles.PROFILES`` matches the model's
``config.model_type``. The result is a role map like the hand-written ones (role -> module-name patterns, each
pattern a module path from the model's root, anchored there, with layer indices generalized to ``\\d+``), marked as :class:`InferredRoles` so that
``adapterkit inspect`` can say the roles were inferred.

How the structure is read (no forward pass, works on the ``meta`` device):

1. **Blocks**: entries of a layer stack, i.e. a ``ModuleList``/``Sequential`` whose entries share one class (or
   whose classes all end in ``Layer``/``Block``: hybrid stacks such as Jamba's), holding at least two linear or
   convolution layers. An entry holding such entries is split into them when they hold most of its layers (a
   Swin or ResNet stage holds its blocks; a MobileBERT layer's short FFN list does not); expert lists (a path
   through ``experts``) stay inside their block.
2. **Attention** in a block: the outermost module whose class or name says attention (``Attention``, ``attn``),
   or an attention-free token mixer (``Mixer``: Mamba's SSM, see below). Its linear layers are classified by
   name: ``q``/``query``/``q_proj``/``wq``/``to_q`` -> ``attn.q`` (``k``, ``v`` alike), fused ``qkv``/
   ``query_key_value``/``c_attn``/``Wqkv``/``in_proj`` -> ``attn.qkv``, ``o``/``out_proj``/``o_proj``/
   ``c_proj``/``dense``/``to_out``/``output`` -> ``attn.out``. Self- and cross-attention map to the same roles
   (as the BART and T5 profiles do).
3. **FFN**: the block's other linear layers, by shape against the block width ``d`` (the attention output's
   width, else the narrower of the widths the block maps between): ``d -> I`` is ``ffn.up`` (``ffn.gate`` when
   its name says ``gate``, Llama's ``w1`` beside ``w3``, T5's ``wi_0``), ``I -> d`` is ``ffn.down``; names break
   ties when ``I = d`` (``fc1``/``up``/``wi``/``intermediate`` vs ``fc2``/``down``/``wo``/``output``). MoE
   routers (``gate``/``router`` with as many outputs as experts, ``shared_expert_gate``) are left out; experts
   stored as 3-D parameters are no modules and get no role (LoRA reaches them with ``target_parameters``).
   ``ffn.in`` is ``ffn.up`` plus ``ffn.gate``; ``ffn`` is the module that holds exactly the FFN's layers.
4. **Convolutional blocks** (ResNet, ConvNeXt, ...; MetaFormer's view, Yu et al. 2022, "MetaFormer Is Actually
   What You Need for Vision", where attention is one kind of *token mixer*): in a block without attention or
   linear FFN, ungrouped ``k x k`` convolutions (``k > 1``) are the token mixer and named ``attn.qkv``; the 1x1
   (pointwise) convolutions and linear layers form the channel MLP (``ffn.up``/``ffn.down`` by shape). Likewise
   Mamba's mixer: its input projection is ``attn.qkv`` and its output projection ``attn.out``. So the default
   targets of LoRA-like methods (``attn.q``/``attn.v``, else ``attn.qkv``) name the token mixer everywhere.
5. ``embed``: the model's input embedding (``get_input_embeddings()``, or the first embedding/convolution inside
   it: a ViT's patch projection). ``head``: the output embedding and the top-level modules beside the base model
   (``classifier``, ``score``, ``lm_head``, ...). ``block``, ``attention``: the modules of 1 and 2.

6. **Sub-layer roles** (``attn.sublayer``, ``ffn.residual``, ...: where ``Bottleneck()``'s default
   ``hook="sublayer"`` sits) only where transformers' module names fix the residual wiring: pre-LN blocks of
   exactly the attention, one FFN module and two norms named ``input_layernorm``/``post_attention_layernorm``
   (LLaMA and most decoders), ``layer_norm1``/``layer_norm2`` (CLIP, SigLIP and BLIP encoders) or
   ``layernorm_before``/``layernorm_after`` (ViT and its kin) (not with a parallel-residual config), Gemma 2/3's sandwich norms (``pre_/post_feedforward_layernorm``), and BERT's post-LN
   block (``attention.output.{dropout,LayerNorm}``, ``intermediate``, ``output.{dropout,LayerNorm}``); never for a
   block with parameters of its own (gated residuals). Elsewhere pre- and post-LN are not visible in the module tree
   (Whisper and BART have the same modules in the same order; one is pre-LN, the other post-LN): bottleneck adapters
   on such models need ``hook="projection"`` (or explicit targets).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from torch import nn

from .backends import backend_for

__all__ = ["InferredRoles", "infer_roles"]

_CONTAINER = "ak_adapters"  # targeting.CONTAINER (not imported: targeting imports profiles, which imports us)


_ORDER = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.out", "ffn.in", "ffn.up", "ffn.gate", "ffn.down", "ffn",
          "block", "embed", "attention", "head", "attn.sublayer", "attn.residual", "attn.norm", "ffn.sublayer",
          "ffn.residual", "ffn.norm")  # profiles.ROLES' order (not imported: profiles imports this module)  # fmt: skip


class InferredRoles(dict):
    """A role map derived by :func:`infer_roles` (a ``dict`` role -> patterns; the type marks it as inferred)."""


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        out[prefix] = module
        for child_name, child in module._modules.items():
            if child is not None and child_name != _CONTAINER:
                walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    walk(model, "")
    return out


def _dims(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a linear layer (``nn.Linear``, GPT-2 ``Conv1D``, registered backends), else None."""
    b = backend_for(module)
    if b is None or b.kind != "linear":
        return None
    try:
        return tuple(b.dims(module))  # type: ignore[return-value]
    except Exception:
        return None


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _pattern(name: str, stacks: set[str]) -> str:
    """A module path as a role pattern: escaped, with the index of every layer-stack entry generalized to ``\\d+``
    (``h.0.ffn.2`` -> ``h\\.\\d+\\.ffn\\.2``: the FFN's ``Sequential`` index stays)."""
    parts = name.split(".")
    return r"\.".join(
        r"\d+" if p.isdigit() and ".".join(parts[: i + 1]) in stacks else re.escape(p) for i, p in enumerate(parts)
    )


def _inside(name: str, parent: str) -> bool:
    return parent == "" or name == parent or name.startswith(parent + ".")


def _leaf(name: str) -> str:
    """The last name component that is not an index or a generic wrapper's layer (``attn.to_out.0`` -> ``to_out``,
    ``self_attn.q_proj.linear`` -> ``q_proj``), lower-cased."""
    parts = [p for p in name.split(".") if not p.isdigit()]
    while len(parts) > 1 and parts[-1].lower() in ("linear", "layer", "fc"):
        parts.pop()
    return parts[-1].lower() if parts else ""


def _stacks(modules: dict[str, nn.Module]) -> set[str]:
    """Names of the entries of layer stacks (see the module docstring, step 1)."""
    out: set[str] = set()
    for name, m in modules.items():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        entries = [(k, c) for k, c in m._modules.items() if c is not None and k.isdigit()]
        if not entries:
            continue
        classes = {type(c).__name__ for _, c in entries}
        if len(classes) == 1 or all(c.endswith(("Layer", "Block")) for c in classes):
            if isinstance(entries[0][1], (nn.Linear, nn.ModuleList, nn.Sequential)) or _is_conv(entries[0][1]):
                continue  # a list of bare layers, not of blocks
            out.update(f"{name}.{k}" if name else k for k, _ in entries)
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts))]


def _blocks(modules: dict[str, nn.Module], layers: dict[str, object], stacks: set[str]) -> list[str]:
    """The innermost stack entries holding ≥ 2 linear/conv layers, outside expert lists."""
    count: Counter[str] = Counter()
    for x in layers:
        count.update(_ancestors(x))
    cands = {n for n in stacks if ".experts." not in f".{n}." and ".expert." not in f".{n}." and count[n] >= 2}
    # descend from an entry into the entries inside it when they hold most of its layers (a Swin or ResNet stage
    # holds its blocks); a MobileBERT layer, whose FFN list holds a minority, stays the block
    inner: dict[str, set[str]] = {}
    for n in cands:
        for a in _ancestors(n):
            if a in cands:
                inner.setdefault(a, set()).add(n)
    split = set()
    for outer, ins in inner.items():
        direct = {n for n in ins if not any(a in ins for a in _ancestors(n))}
        if 2 * sum(count[n] for n in direct) > count[outer]:
            split.add(outer)
    chosen = [n for n in modules if n in cands and n not in split]
    return [n for n in chosen if not any(a in chosen for a in _ancestors(n))]


_ATTN_CLASS = re.compile(
    r"attention|attn|selfattn|mla$|mixer|mamba|retention|timemix|recurrentblock|shortconv", re.I
)
_ATTN_STRICT = re.compile(r"attention|attn|mla$", re.I)
_ATTN_NAME = re.compile(
    r"(^|_)(attn|attention|self_attn|crossattention|encdecattention|mixer|selfattention)$", re.I
)
_NOT_ATTN = re.compile(r"(Output|Norm|Embeddings?|MLP|FeedForward|Intermediate|Layer|Block)$")


def _attention_modules(block: str, modules: dict[str, nn.Module], layers: dict[str, object]) -> list[str]:
    """The outermost attention (or token-mixer) modules inside ``block`` that hold linear layers; the block itself
    when it is one (XLM's ``attentions.0``)."""
    found: list[str] = []
    for n, m in modules.items():
        if any(_inside(n, f) for f in found):
            continue
        leaf = n.rsplit(".", 1)[-1]
        cls = type(m).__name__
        if n == block:
            if not _ATTN_STRICT.search(cls) or _NOT_ATTN.search(cls):
                continue
        elif _NOT_ATTN.search(cls) and not _ATTN_CLASS.search(cls):
            continue
        if (_ATTN_CLASS.search(cls) or _ATTN_NAME.search(leaf)) and any(
            _inside(x, n) and x != n and _dims(modules[x]) is not None for x in layers
        ):
            found.append(n)
    return found


_Q = {"q", "query", "wq", "to_q", "q_lin", "q_proj", "query_proj", "queries", "receptance"}  # RWKV: r ~ query
_K = {"k", "key", "wk", "to_k", "k_lin", "k_proj", "key_proj", "keys"}
_V = {"v", "value", "wv", "to_v", "v_lin", "v_proj", "value_proj", "values"}
_QKV = {"qkv", "wqkv", "c_attn", "query_key_value", "in_proj", "qkv_proj", "to_qkv", "att_proj", "in_proj_qkv"}
_OUT = {"o", "o_proj", "out_proj", "c_proj", "dense", "wo", "out_lin", "to_out", "out", "output", "proj",
        "output_proj", "out_dense", "o_lin", "dense_out"}  # fmt: skip
_UP = {"fc1", "up_proj", "up", "wi", "wi_1", "c_fc", "lin1", "dense_h_to_4h", "w1", "w3", "fc_in", "linear1",
       "intermediate_dense", "pwconv1", "fc_1", "in_proj", "w_in", "wi_0", "gate_proj", "gate_up_proj", "ff_in",
       "dense1"}  # fmt: skip
_DOWN = {"fc2", "down_proj", "down", "wo", "c_proj", "lin2", "dense_4h_to_h", "w2", "fc_out", "linear2",
         "output_dense", "pwconv2", "fc_2", "out_proj", "w_out", "ff_out", "dense2"}  # fmt: skip


def _classify_attention(names: list[str], modules: dict[str, nn.Module]) -> dict[str, list[str]]:
    roles: dict[str, list[str]] = {}
    for n in names:
        leaf = _leaf(n)
        tokens = leaf.split("_")
        if "pos" in leaf or "rel" in tokens or "gate" in leaf or "lora" in leaf or "indexer" in n:
            continue
        if leaf in _QKV or "qkv" in leaf:
            roles.setdefault("attn.qkv", []).append(n)
        elif leaf in _Q or tokens[0] == "q":  # MLA (DeepSeek-V2, Liu et al. 2024): q_a_proj, q_b_proj
            roles.setdefault("attn.q", []).append(n)
        elif leaf in _K or tokens[0] == "k":
            roles.setdefault("attn.k", []).append(n)
        elif leaf in _V or tokens[0] == "v":
            roles.setdefault("attn.v", []).append(n)
        elif tokens[0] == "kv" or leaf in ("keys_values", "key_value"):  # joint key/value (MLA, LeViT)
            roles.setdefault("attn.k", []).append(n)
            roles.setdefault("attn.v", []).append(n)
        elif leaf in _OUT or tokens[0] == "o":
            roles.setdefault("attn.out", []).append(n)
    return roles


def _ffn_roles(names: list[str], modules: dict[str, nn.Module], width: int | None) -> dict[str, list[str]]:
    """``ffn.up``/``ffn.gate``/``ffn.down`` among the block's non-attention linear layers (step 3)."""
    dims = {n: _dims(modules[n]) for n in names}
    leaves = {n: _leaf(n) for n in names}
    routers = {
        n
        for n in names
        if leaves[n] in ("gate", "router", "wg", "classifier", "shared_expert_gate")
        or "router" in n.lower()
        or dims[n][1] == 1
    }
    names = [n for n in names if n not in routers]
    if not names:
        return {}
    if width is None:
        ins = Counter(d[0] for n, d in dims.items() if n in names)
        outs = Counter(d[1] for n, d in dims.items() if n in names)
        both = sorted(set(ins) & set(outs))
        width = both[0] if both else min(ins)
    siblings = set(leaves.values())
    roles: dict[str, list[str]] = {}
    for n in names:
        i, o = dims[n]
        leaf = leaves[n]
        by_name = (
            "up" if leaf in _UP or "intermediate" in n.split(".")[-2:][0] else "down" if leaf in _DOWN else None
        )
        if leaf == "dense" and ".output." in f".{n}":
            by_name = "down"
        elif leaf == "dense" and ".intermediate." in f".{n}":
            by_name = "up"
        if i == width and o != width:
            kind = "up"
        elif o == width and i != width:
            kind = "down"
        elif i == width and o == width and by_name:
            kind = by_name
        else:
            continue
        if kind == "up":
            gate = "gate" in leaf and "up" not in leaf or leaf == "wi_0" or (leaf == "w1" and "w3" in siblings)
            roles.setdefault("ffn.gate" if gate else "ffn.up", []).append(n)
            roles.setdefault("ffn.in", []).append(n)
        else:
            roles.setdefault("ffn.down", []).append(n)
    return roles


_NORM = re.compile(r"norm", re.I)


# pre-LN blocks by their norms' names: LLaMA and most decoders; CLIP/SigLIP/BLIP encoders; ViT (transformers 5)
_PRE_LN = (
    ("input_layernorm", "post_attention_layernorm"),
    ("layer_norm1", "layer_norm2"),
    ("layernorm_before", "layernorm_after"),
)


def _sublayer_roles(
    block: str, modules: dict[str, nn.Module], attns: list[str], model: nn.Module
) -> dict[str, list[str]]:
    """Sub-layer roles where the block follows one of transformers' layouts whose residual wiring the names fix
    (step 6 of the module docstring); empty otherwise."""
    kids = {k: c for k, c in modules[block]._modules.items() if c is not None and k != _CONTAINER}
    full = {k: f"{block}.{k}" for k in kids}
    config = getattr(model, "config", None)
    if any(getattr(config, a, False) for a in ("use_parallel_residual", "parallel_attn", "parallel_block")):
        return {}
    if any(True for _ in modules[block].parameters(recurse=False)):
        return {}  # gated residuals (IDEFICS' tanh-gated cross-attention layers): not h = x + f
    own = [a for a in attns if a.rpartition(".")[0] == block]
    norms = {k for k, c in kids.items() if _NORM.search(k) or _NORM.search(type(c).__name__)}
    rest = [
        k for k, c in kids.items() if k not in norms and full[k] not in own and any(True for _ in c.parameters())
    ]
    if len(own) == 1 and len(rest) == 1:
        attn, ffn = own[0], full[rest[0]]
        for before, after in _PRE_LN:  # pre-LN: h = x + f(norm(x))
            if norms == {before, after}:
                return {
                    "attn.sublayer": [attn],
                    "attn.residual": [full[before]],
                    "ffn.sublayer": [ffn],
                    "ffn.residual": [full[after]],
                }
        sandwich = {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm"}  # fmt: skip
        weighted = all(any(True for _ in kids[k].parameters()) for k in sandwich if k in kids)
        if norms == sandwich and weighted:  # Gemma 2/3: h = x + post_norm(f(pre_norm(x)))
            return {
                "attn.sublayer": [full["post_attention_layernorm"]],
                "attn.residual": [full["input_layernorm"]],
                "ffn.sublayer": [full["post_feedforward_layernorm"]],
                "ffn.residual": [full["pre_feedforward_layernorm"]],
            }
    # post-LN BERT layout: attention.output and output are BertSelfOutput-like, LayerNorm(dropout(dense(h)) + r)
    need = ("attention.self", "attention.output.dropout", "attention.output.LayerNorm", "intermediate",
            "output.dropout", "output.LayerNorm")  # fmt: skip
    if all(f"{block}.{n}" in modules for n in need):
        return {
            "attn.sublayer": [f"{block}.attention.output.dropout"],
            "attn.residual": [f"{block}.attention.self"],
            "attn.norm": [f"{block}.attention.output.LayerNorm"],
            "ffn.sublayer": [f"{block}.output.dropout"],
            "ffn.residual": [f"{block}.intermediate"],
            "ffn.norm": [f"{block}.output.LayerNorm"],
        }
    return {}


def _is_attention(attns: list[str], modules: dict[str, nn.Module]) -> bool:
    """Whether some module of ``attns`` is attention proper (not an attention-free token mixer)."""
    return any(re.search(r"attention|attn", type(modules[a]).__name__ + "." + a, re.I) for a in attns)


def _common_parent(names: Iterable[str], block: str) -> str | None:
    """The deepest module inside ``block`` (not the block) whose subtree holds all ``names``."""
    names = list(names)
    if not names:
        return None
    parts = [n.split(".") for n in names]
    prefix: list[str] = []
    for tokens in zip(*parts):
        if len(set(tokens)) != 1:
            break
        prefix.append(tokens[0])
    parent = ".".join(prefix)
    if parent in names:
        parent = parent.rpartition(".")[0]
    return parent if parent != block and _inside(parent, block) else None


def _conv_roles(block: str, modules: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Token-mixer and channel-MLP convolutions of a convolutional block (step 4)."""
    roles: dict[str, list[str]] = {}
    for n, m in modules.items():  # the modules inside ``block``
        if not isinstance(m, nn.Conv2d) or "shortcut" in n or "downsampl" in n:
            continue
        if "residual" in _leaf(n) or "projection" in n.split(".")[-2:][0]:
            continue
        if max(m.kernel_size) > 1 and m.groups == 1:
            roles.setdefault("attn.qkv", []).append(n)
    return roles


def infer_roles(model: nn.Module) -> InferredRoles:
    """Role map of ``model`` derived from its module tree; empty when no block with attention/FFN is found.

    Returns:
        :class:`InferredRoles`: role -> patterns (module paths with layer indices as ``\\d+``), the same shape
        as an entry of ``profiles.PROFILES``.
    """
    modules = _modules(model)
    linears = {n: _dims(m) for n, m in modules.items() if n and _dims(m) is not None}
    convs = {n: m for n, m in modules.items() if n and _is_conv(m)}
    layers: dict[str, object] = {**linears, **convs}
    found: dict[str, list[str]] = {}

    def add(role: str, names: Iterable[str]) -> None:
        found.setdefault(role, []).extend(names)

    stacks = _stacks(modules)
    blocks = _blocks(modules, layers, stacks)
    inside: dict[str, list[str]] = {b: [] for b in blocks}
    for n in modules:
        for a in _ancestors(n):
            if a in inside:
                inside[a].append(n)
    for block in blocks:
        sub = {n: modules[n] for n in inside[block]}
        sub_layers = {n: layers[n] for n in inside[block] if n in layers}
        attns = _attention_modules(block, {block: modules[block], **sub}, sub_layers)
        in_attn = [n for n in sub_layers if n in linears and any(_inside(n, a) and n != a for a in attns)]
        roles = _classify_attention(in_attn, modules) if in_attn else {}
        if attns and not any(r in roles for r in ("attn.q", "attn.k", "attn.v", "attn.qkv")):
            # an attention-free mixer (Mamba): its first linear layer is the input projection, its last the output
            # an attention-free token mixer (Mamba, Griffin's recurrent block, LFM's short convolution): its last
            # linear layer is the output projection, those reading the block's width d (its output) the inputs
            ordered = [n for n in in_attn if _dims(modules[n]) is not None]
            roles = {}
            if len(ordered) >= 2:
                d = linears[ordered[-1]][1]
                ins = [n for n in ordered[:-1] if linears[n][0] == d]
                roles = {"attn.qkv": ins, "attn.out": [ordered[-1]]} if ins else {}
        width = None
        if roles.get("attn.out"):
            width = linears[roles["attn.out"][0]][1]
        rest = [n for n in sub_layers if n in linears and n not in in_attn and ".experts." not in f".{n}."]
        ffn = _ffn_roles(rest, modules, width)
        if not ffn and "attn.qkv" in roles and "attn.out" in roles and not _is_attention(attns, modules):
            # Mamba's block is H3's token mixer merged with a gated MLP (Gu & Dao 2023, §3.4 and Fig. 3): its
            # input projection (d -> 2·E·d, the SSM input and the gate) and output projection (E·d -> d) are
            # the MLP's up and down projections too
            ffn = {"ffn.up": roles["attn.qkv"], "ffn.in": roles["attn.qkv"], "ffn.down": roles["attn.out"]}
        if not roles:
            roles = _conv_roles(block, sub)
        if not roles and not ffn:
            continue
        for role, names in {**roles, **ffn}.items():
            add(role, names)
        add("block", [block])
        if roles:
            add("attention", [a for a in attns if any(_inside(n, a) for v in roles.values() for n in v)])
        for role, names in _sublayer_roles(block, modules, attns, model).items():
            add(role, names)
        ffn_names = [n for v in ffn.values() for n in v]
        parent = _common_parent(ffn_names, block)
        if parent is not None and not any(_inside(a, parent) for a in attns):
            in_parent = [n for n in rest if _inside(n, parent) and n not in ffn_names]
            if not [n for n in in_parent if n not in ffn_names and linears[n][1] != 1]:
                add("ffn", [parent])

    if not found:
        return InferredRoles()
    embed = _input_embedding(model, modules)
    if embed:
        add("embed", [embed])
    heads = _heads(model, modules)
    if heads:
        add("head", heads)
    if "attn.qkv" in found and ("attn.q" in found) != ("attn.v" in found):
        # a lone q (or v) beside fused projections (LeViT's subsampling queries): the defaults' q+v pair would
        # fail, the fused projections serve them
        found.pop("attn.q", None), found.pop("attn.v", None), found.pop("attn.k", None)
    out = InferredRoles()
    for role, names in sorted(found.items(), key=lambda kv: _ORDER.index(kv[0]) if kv[0] in _ORDER else 99):
        # anchored at the model's root ("(?<!.)": nothing before it), since they are full paths: a head pattern
        # `classifier` must not also match a router's `mlp.router.classifier`
        pats = list(dict.fromkeys("(?<!.)" + _pattern(n, stacks) for n in names if n))
        if pats:
            out[role] = pats
    return out


def _input_embedding(model: nn.Module, modules: dict[str, nn.Module]) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except Exception:
        emb = None
    if not isinstance(emb, nn.Module):  # None, or a Parameter (Perceiver's latents)
        return None
    names = {id(m): n for n, m in modules.items()}
    if isinstance(emb, (nn.Embedding, nn.Linear)) or _is_conv(emb):
        return names.get(id(emb))
    for sub in emb.modules():
        if isinstance(sub, (nn.Embedding, nn.Linear)) or _is_conv(sub):
            return names.get(id(sub))
    return None


def _heads(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    """The output embedding and the top-level children beside the base model that hold parameters."""
    out: list[str] = []
    get = getattr(model, "get_output_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except Exception:
        emb = None
    if emb is not None:
        out += [n for n, m in modules.items() if m is emb and n]
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module) and base is not model:
        for child_name, child in model._modules.items():
            if child is None or child is base or child_name == _CONTAINER:
                continue
            if isinstance(child, nn.LayerNorm):
                continue
            # a head container (a pooler, RoBERTa's classification head): its layers with weights of their own
            out += [
                f"{child_name}.{n}" if n else child_name
                for n, m in child.named_modules()
                if any(True for _ in m.parameters(recurse=False))
            ]
    return list(dict.fromkeys(out))
