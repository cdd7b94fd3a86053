"""Reader of kohya-ss/sd-scripts and LyCORIS single-file adapters (one ``.safetensors`` file, keyed by module);
the writer is :mod:`adapterkit.formats.kohya_write`.

kohya's ``networks/lora.py`` and LyCORIS (``lycoris/kohya.py``) save a Stable Diffusion network as one file whose
keys are ``<prefix><module path with '.' -> '_'>.<tensor>``:

================  ====================================================================================
prefix            component
================  ====================================================================================
``lora_unet_``    the diffusers ``UNet2DConditionModel`` (sd-scripts names modules by their diffusers path:
                  ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``)
``lora_te_``      the (first) CLIP text encoder (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``)
``lora_te1_``     SDXL's first text encoder (same names as ``lora_te_``)
``lora_te2_``     SDXL's second text encoder
================  ====================================================================================

Per module (``n = in · kh · kw``; ``alpha`` a 0-d tensor, missing or 0 meaning ``alpha = r``):

* LoRA / LoCon: ``lora_down.weight: (r, in[, kh, kw])``, ``lora_up.weight: (out, r[, 1, 1])``, ``alpha``.
* LoHa: ``hada_w1_a, hada_w2_a: (out, r)``, ``hada_w1_b, hada_w2_b: (r, n)``, ``alpha``; with Tucker cores (k×k
  convolutions, LyCORIS ``use_tucker``): ``hada_t1, hada_t2: (r, r, kh, kw)``, ``hada_w{1,2}_a: (r, out)``,
  ``hada_w{1,2}_b: (r, in)``.
* LoKr (``out = a · b``, ``in = c · d``): ``lokr_w1: (a, c)`` or ``lokr_w1_a: (a, r)``, ``lokr_w1_b: (r, c)``;
  ``lokr_w2: (b, d[, kh, kw])`` or ``lokr_w2_a: (b, r)``, ``lokr_w2_b: (r, d · kh · kw)``, or with a Tucker core
  ``lokr_t2: (r, r, kh, kw)``, ``lokr_w2_a: (r, b)``, ``lokr_w2_b: (r, d)``; ``alpha``.
* Diag-OFT: ``oft_blocks: (nb, b, b)`` (``nb · b = out``), optional ``rescale: (out, 1[, 1, 1])``, ``alpha`` (the
  norm constraint, not a scale).

The updates, as LyCORIS computes them (``lycoris/modules/{locon,loha,lokr,diag_oft}.py``):

* LoRA: ``ΔW = (alpha / r) · up · down`` (a k×k ``down`` convolution followed by a 1×1 ``up``).
* LoHa: ``ΔW = (alpha / r) · (W1a W1b) ⊙ (W2a W2b)``; with the Tucker cores each pair is ``T ×₁ Wa ×₂ Wb``.
* LoKr: ``ΔW = s · W1 ⊗ W2`` with ``s = alpha / r``, except that ``s = 1`` when both factors are full matrices
  (LyCORIS's rule: such files have no rank).
* Diag-OFT: the *output* channels are rotated block by block, ``W' = rescale ⊙ (blockdiag(R_k)ᵀ W)`` with
  ``R_k = (I + Q_k)(I - Q_k)⁻¹``, ``Q = oft_blocks - oft_blocksᵀ``, and, when ``alpha > 0``, ``Q`` scaled
  down so that ``‖Q‖_F <= alpha · out`` (the norm over all blocks together). The bias is not rotated.
  adapterkit's :class:`~adapterkit.methods.oft.OFT` (peft's OFT v2) rotates the *input* features instead, so the
  two cannot be converted into each other; this module carries the LyCORIS form as :class:`LycorisOFT`.

LoRA, LoHa and LoKr files become adapterkit's ``LoRA``, ``LoHa`` and ``LoKr`` adapters with per-module ranks and
alphas (``rank_pattern``/``alpha_pattern`` keyed by the full module path); Diag-OFT becomes ``LycorisOFT``.
diffusers' own single-file LoRA names (``unet.<module path>.lora_A.weight``/``lora_B.weight``, or the older
``.lora.down.weight``/``.lora.up.weight``, with optional ``.alpha``) are read too.

Loading is all-or-nothing: every key is resolved, every tensor checked against the module it names and every
component filled before anything is installed. Refused: keys naming no module (or a name two modules map to),
a module with tensors of two methods, several methods in one file, forms adapterkit does not implement
(LoCon's Tucker ``lora_mid``, DoRA's ``dora_scale``, ``lokr_t1``, LyCORIS's ``scalar``, BOFT's 4-d
``oft_blocks``) and shapes that do not fit. Keys of the other components (e.g. ``lora_te_`` when loading the
UNet) are skipped.

Text encoders: kohya names them by transformers 4's ``CLIPTextModel`` paths (``text_model.encoder...``); on models
without the ``text_model`` level (transformers 5's ``CLIPTextModel``) those names resolve too.

The original Stable Diffusion (LDM/SGM) layout names that sd-scripts writes for SDXL and some older tools for
SD 1.x (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``lora_unet_middle_block_1_...``,
``lora_unet_output_blocks_...``, ``time_embed_0``, ``label_emb_0_0``, ``out_2``) are mapped onto the diffusers
``UNet2DConditionModel``'s modules (:mod:`adapterkit.formats.kohya_ldm`, derived from the model's block
structure); on other models they are refused.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..component import Component
from ..config import AdapterConfig
from ..methods.loha import LoHa
from ..methods.lokr import LoKr, factorization
from ..methods.lora import LoRA
from ..methods.lycoris_oft import LycorisOFT, LycorisOFTLayer
from ..plan import Plan
from ..targeting import base_modules
from .io import AdapterFileError, _read_safetensors, import_checked, require_float
from .kohya_ldm import is_diffusers_unet, ldm_paths

__all__ = ["load", "is_kohya_file", "kohya_names", "LycorisOFT", "LycorisOFTLayer", "COMPONENTS"]

# component -> kohya key prefixes (the first that the file uses is read)
COMPONENTS: dict[str, tuple[str, ...]] = {
    "unet": ("lora_unet_",),
    "text_encoder": ("lora_te_", "lora_te1_"),
    "text_encoder_2": ("lora_te2_",),
}
_KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")
# diffusers' single-file names: "<component>.<module path>.<tensor>"
_DIFFUSERS_TENSORS = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "alpha": "alpha",
}

_METHODS: dict[str, frozenset[str]] = {
    "lora": frozenset({"lora_down.weight", "lora_up.weight"}),
    "loha": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    "lokr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "oft": frozenset({"oft_blocks", "rescale"}),
}
_UNSUPPORTED = {
    "lora_mid.weight": "LoCon's Tucker core (use_tucker/use_cp convolutions), which adapterkit's LoRA has no form of",
    "dora_scale": "a DoRA magnitude (LyCORIS weight_decompose), not supported for kohya/LyCORIS files",
    "lokr_t1": "a Tucker core on LoKr's first factor, which LyCORIS itself never builds",
    "scalar": "LyCORIS's use_scalar gain, which adapterkit does not implement",
    "oft_diag": "the pre-0.2 LyCORIS OFT layout; re-save the network with a current LyCORIS",
    "diff": "a LyCORIS full-weight difference (algo=full), which is not an adapter method here",
    "diff_b": "a LyCORIS full bias difference (algo=full), which is not an adapter method here",
    "w_norm": "a LyCORIS norm-layer weight (train_norm), which this reader does not load",
    "b_norm": "a LyCORIS norm-layer bias (train_norm), which this reader does not load",
}
_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "oft": "Diag-OFT"}

State = dict[str, torch.Tensor]  # tensor name -> tensor, for one module
# (config, per-module states to import, per-module rank (block size for OFT), per-module alpha)
Built = tuple[AdapterConfig, dict[str, State], dict[str, int], dict[str, float]]


# --- names ----------------------------------------------------------------------------------------------------
def kohya_names(model: nn.Module) -> dict[str, list[str]]:
    """kohya name (module path with '.' -> '_', no prefix) -> the module paths it could stand for (more than one:
    ambiguous). Built from ``model.named_modules()``."""
    table: dict[str, list[str]] = {}
    for path, _ in model.named_modules():
        if path:
            table.setdefault(path.replace(".", "_"), []).append(path)
    return table


def is_kohya_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a single ``.safetensors`` file (what :func:`load` reads; a directory is an adapter
    directory of the other formats)."""
    p = Path(path)
    return p.is_file() and p.suffix == ".safetensors"


def _split(
    raw: dict[str, torch.Tensor], model: nn.Module, component: str, where: str
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """``(per_site, file_names)``: per module path, tensor name -> tensor, and module path -> the file's name of
    it (for messages). Keys of other components are skipped.

    Raises:
        AdapterFileError: unknown keys or module names, ambiguous names, no keys for ``component``.
    """
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; choose one of: {', '.join(COMPONENTS)}")
    modules = dict(model.named_modules())
    table = kohya_names(model)
    # kohya names text-encoder modules by transformers 4's CLIPTextModel paths ("text_model.encoder..."); models
    # without that level (transformers 5's CLIPTextModel) also answer to those names
    legacy = component.startswith("text_encoder") and "text_model" not in modules
    if legacy:
        for short, paths in list(table.items()):
            table.setdefault("text_model_" + short, []).extend(
                p for p in paths if p not in table.get("text_model_" + short, [])
            )
    if component == "unet":  # the original (LDM/SGM) names of a diffusers UNet's modules: formats/kohya_ldm.py
        for path, ldm in ldm_paths(model).items():
            alias = ldm.replace(".", "_")
            if path not in table.get(alias, []):
                table.setdefault(alias, []).append(path)
    used = [p for p in COMPONENTS[component] if any(k.startswith(p) for k in raw)]
    if len(used) > 1:
        raise AdapterFileError(
            f"{where} has keys under both {used[0]!r} and {used[1]!r}; load one of them (rename the other's keys)"
        )
    dotted = component + "."
    per_site: dict[str, dict[str, torch.Tensor]] = {}
    names: dict[str, str] = {}
    for key, value in raw.items():
        if used and key.startswith(used[0]):
            stem, dot, tensor = key.partition(".")
            if not dot:
                raise AdapterFileError(f"key {key!r} in {where} has no tensor name ('<module>.<tensor>')")
            short = stem[len(used[0]) :]
            paths = table.get(short, [])
            if not paths and short.startswith(("input_blocks_", "middle_block_", "output_blocks_")):
                raise AdapterFileError(
                    f"key {key!r} in {where} uses the original Stable Diffusion (LDM/SGM) module names (SDXL kohya "
                    "files do), which this reader maps onto a diffusers UNet2DConditionModel only; "
                    + (
                        f"this {type(model).__name__} has no module of that name (a UNet of another shape?)"
                        if is_diffusers_unet(model)
                        else f"this {type(model).__name__} is not one"
                    )
                )
            if not paths:
                raise AdapterFileError(
                    f"key {key!r} in {where} names module {short!r}, which this {type(model).__name__} does not have "
                    f"(kohya names are module paths with '.' replaced by '_'): wrong base model or component="
                    f"{component!r}?"
                )
            if len(paths) > 1:
                raise AdapterFileError(
                    f"key {key!r} in {where} is ambiguous on this {type(model).__name__}: {short!r} stands for "
                    f"{paths}; rename those modules or use diffusers-style keys ('{dotted}<module path>.<tensor>')"
                )
            site, file_name = paths[0], stem
        elif key.startswith(dotted):
            rest = key[len(dotted) :]
            for suffix, ours in _DIFFUSERS_TENSORS.items():
                if rest.endswith("." + suffix):
                    site, tensor = rest[: -len(suffix) - 1], ours
                    break
            else:
                raise AdapterFileError(
                    f"key {key!r} in {where} is not a LoRA tensor (diffusers names end in "
                    f"{', '.join(repr(s) for s in _DIFFUSERS_TENSORS)})"
                )
            if legacy and site not in modules and site.startswith("text_model."):
                site = site[len("text_model.") :]
            if site not in modules or not site:
                raise AdapterFileError(
                    f"key {key!r} in {where} names module {site!r}, which this {type(model).__name__} does not have"
                )
            file_name = dotted + site
        elif key.startswith(_KOHYA_PREFIXES) or key.startswith(tuple(c + "." for c in COMPONENTS)):
            continue  # another component's tensors
        else:
            raise AdapterFileError(
                f"key {key!r} in {where} is not a kohya/LyCORIS key (they start with "
                f"{', '.join(repr(p) for p in _KOHYA_PREFIXES)}) nor a diffusers one ('unet.', 'text_encoder.')"
            )
        state = per_site.setdefault(site, {})
        if tensor in state:
            raise AdapterFileError(f"{where} holds {tensor!r} of module {site!r} twice (under two names)")
        state[tensor] = value
        names[site] = file_name
    if not per_site:
        prefixes = " or ".join(repr(p) for p in COMPONENTS[component])
        raise AdapterFileError(
            f"{where} holds no tensors for component={component!r} (keys starting with {prefixes} or "
            f"'{dotted}'); pick the component the file adapts"
        )
    return per_site, names


def _guess(
    raw: dict[str, torch.Tensor], model: nn.Module, where: str
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """:func:`_split` for the one component of the file whose names all resolve on ``model``."""
    present = [
        c
        for c, prefixes in COMPONENTS.items()
        if any(k.startswith(prefixes) or k.startswith(c + ".") for k in raw)
    ]
    if not present:
        return _split(raw, model, "unet", where)  # raises: no kohya keys
    fits, why = [], []
    for c in present:
        try:
            fits.append((c, _split(raw, model, c, where)))
        except AdapterFileError as e:
            why.append(f"component={c!r}: {e}")
    if len(fits) == 1:
        return fits[0][1]
    if not fits:
        raise AdapterFileError(f"no component of {where} fits this {type(model).__name__}: {'; '.join(why)}")
    raise AdapterFileError(
        f"{where} holds tensors for {', '.join(repr(c) for c, _ in fits)}, and the module names of each exist on this "
        f"{type(model).__name__}: pass component= to say which one it is"
    )


def _method(site: str, state: dict[str, torch.Tensor], label: str, where: str) -> str:
    """The one method whose tensors module ``site`` has."""
    tensors = set(state) - {"alpha"}
    for tensor in sorted(tensors):
        if tensor in _UNSUPPORTED:
            raise AdapterFileError(f"{label}.{tensor} in {where} is {_UNSUPPORTED[tensor]}")
    found = [m for m, names in _METHODS.items() if tensors & names]
    unknown = sorted(tensors - set().union(*_METHODS.values()))
    if unknown:
        raise AdapterFileError(
            f"{label}.{unknown[0]} in {where} is not a tensor of LoRA, LoHa, LoKr or Diag-OFT (which this reader "
            "supports)"
        )
    if not found:
        raise AdapterFileError(f"{label} in {where} has an 'alpha' but no adapter tensors")
    if len(found) > 1:
        raise AdapterFileError(
            f"{label} in {where} mixes the tensors of {' and '.join(_NAMES[m] for m in found)}; a module carries one "
            "method"
        )
    if "alpha" in state and state["alpha"].numel() != 1:
        raise AdapterFileError(
            f"{label}.alpha in {where} must be a single number, got shape {tuple(state['alpha'].shape)}"
        )
    return found[0]


def _alpha(state: dict[str, torch.Tensor], r: int) -> float:
    """The module's alpha; missing or 0 means ``r`` (scale 1), as in kohya and LyCORIS."""
    a = state.get("alpha")
    value = float(a.reshape(()).item()) if a is not None else 0.0
    if not math.isfinite(value):
        raise ValueError(f"alpha is {value}")
    return value if value != 0 else float(r)


def _require(cond: bool, label: str, where: str, what: str) -> None:
    if not cond:
        raise AdapterFileError(f"{label} in {where}: {what}")


def _dims(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """``(out, in per group, kernel)``; ``kernel = ()`` for linear layers."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size)
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, ()
    raise TypeError(f"{type(module).__name__} (kohya/LyCORIS adapt nn.Linear and nn.Conv2d)")


def _patterns(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(default, pattern)``: the most common value and an exact per-module pattern, longest paths first (a
    pattern key also matches names ending in ``'.' + key``, so a longer path must be tried before its suffixes)."""
    default = Counter(values.values()).most_common(1)[0][0]
    return default, {k: values[k] for k in sorted(values, key=len, reverse=True)}


# --- per-method configs -------------------------------------------------------------------------------------------
def _lora(per_site: dict[str, State], modules: dict[str, nn.Module], labels: dict[str, str], where: str) -> Built:
    ranks, alphas = {}, {}
    for site, state in per_site.items():
        label = labels[site]
        _require({"lora_down.weight", "lora_up.weight"} <= set(state), label, where, "needs lora_down and lora_up")
        out, in_dim, kernel = _dims(modules[site])
        down, up = state["lora_down.weight"], state["lora_up.weight"]
        if kernel == (1, 1) and down.dim() == 2 and up.dim() == 2:  # a Linear LoRA saved for a 1×1 convolution
            down, up = down[:, :, None, None], up[:, :, None, None]
        if (
            not kernel
            and down.dim() == 4
            and up.dim() == 4
            and down.shape[2:] == (1, 1)
            and up.shape[2:] == (1, 1)
        ):
            down, up = down.flatten(1), up.flatten(1)
        r = down.shape[0] if down.dim() else 0
        want_down, want_up = (r, in_dim, *kernel), (out, r, *((1, 1) if kernel else ()))
        _require(
            r > 0 and tuple(down.shape) == want_down and tuple(up.shape) == want_up,
            label,
            where,
            f"lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} do not fit a module of out={out}, in={in_dim}"
            f"{f', kernel={kernel}' if kernel else ''} (expected {want_down} / {want_up})",
        )
        state["lora_A"], state["lora_B"] = down, up
        ranks[site], alphas[site] = r, _alpha(state, r)
    r, rank_pattern = _patterns(ranks)
    alpha, alpha_pattern = _patterns(alphas)
    cfg = LoRA(r=r, alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, targets=tuple(per_site))
    return cfg, {s: {"lora_A": st["lora_A"], "lora_B": st["lora_B"]} for s, st in per_site.items()}, ranks, alphas


def _loha(per_site: dict[str, State], modules: dict[str, nn.Module], labels: dict[str, str], where: str) -> Built:
    ranks, alphas, cp = {}, {}, {}
    for site, state in per_site.items():
        label = labels[site]
        need = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
        _require(need <= set(state), label, where, f"LoHa needs {sorted(need)}, has {sorted(state)}")
        tucker = {"hada_t1", "hada_t2"} & set(state)
        _require(len(tucker) in (0, 2), label, where, "has one of hada_t1/hada_t2 without the other")
        cp[site] = bool(tucker)
        if tucker:
            r, r2 = state["hada_t1"].shape[0], state["hada_t2"].shape[0]
        else:
            r, r2 = state["hada_w1_b"].shape[0], state["hada_w2_b"].shape[0]
        _require(
            r == r2,
            label,
            where,
            f"the two LoHa pairs have ranks {r} and {r2}; LyCORIS files have one rank (per-pair ranks: ABBA, native "
            "format only)",
        )
        ranks[site], alphas[site] = int(r), _alpha(state, r)
    use_cp = any(cp.values())
    flat_kxk = [s for s, c in cp.items() if not c and use_cp and _dims(modules[s])[2] not in ((), (1, 1))]
    if flat_kxk:
        raise AdapterFileError(
            f"{where} has Tucker (hada_t1/hada_t2) k×k convolutions and flat ones ({labels[flat_kxk[0]]}); adapterkit's "
            "LoHa uses one form for all k×k convolutions of an adapter"
        )
    r, rank_pattern = _patterns(ranks)
    alpha, alpha_pattern = _patterns(alphas)
    cfg = LoHa(
        r=r,
        alpha=alpha,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_effective_conv2d=use_cp,
        targets=tuple(per_site),
    )
    states = {s: {k: v for k, v in st.items() if k != "alpha"} for s, st in per_site.items()}
    return cfg, states, ranks, alphas


def _lokr_shape(state: dict[str, torch.Tensor], kernel: tuple[int, ...]) -> tuple[int, int, int, int, int | None]:
    """``(a, b, c, d, r)`` from the factors (``r`` None when both are full)."""
    r: int | None = None
    if "lokr_w1" in state:
        a, c = state["lokr_w1"].shape[:2]
    else:
        a, r = state["lokr_w1_a"].shape[:2]
        c = state["lokr_w1_b"].shape[1]
    if "lokr_w2" in state:
        b, d = state["lokr_w2"].shape[:2]
        return a, b, c, d, r
    if "lokr_t2" in state:
        r2, b = state["lokr_w2_a"].shape[:2]
        d = state["lokr_w2_b"].shape[1]
    else:
        b, r2 = state["lokr_w2_a"].shape[:2]
        n = state["lokr_w2_b"].shape[1]
        d = n // max(1, math.prod(kernel))
    if r is not None and r != r2:
        raise ValueError(f"the low-rank factors have ranks {r} (lokr_w1_a) and {r2} (lokr_w2_a)")
    return a, b, c, d, r2


def _lokr(per_site: dict[str, State], modules: dict[str, nn.Module], labels: dict[str, str], where: str) -> Built:
    ranks, alphas, shapes = {}, {}, {}
    both, tucker = False, False
    for site, state in per_site.items():
        label = labels[site]
        keys = set(state) - {"alpha"}
        ok = (("lokr_w1" in keys) != ({"lokr_w1_a", "lokr_w1_b"} <= keys)) and (
            ("lokr_w2" in keys) != ({"lokr_w2_a", "lokr_w2_b"} <= keys)
        )
        _require(
            ok,
            label,
            where,
            f"LoKr needs lokr_w1 or lokr_w1_a/_b, and lokr_w2 or lokr_w2_a/_b; has {sorted(keys)}",
        )
        _require("lokr_t2" not in keys or "lokr_w2" not in keys, label, where, "lokr_t2 goes with lokr_w2_a/_b")
        out, in_dim, kernel = _dims(modules[site])
        try:
            a, b, c, d, r = _lokr_shape(state, kernel)
        except (ValueError, IndexError) as e:
            raise AdapterFileError(f"{label} in {where}: {e}") from None
        _require(
            a * b == out and c * d == in_dim,
            label,
            where,
            f"the Kronecker factors give a ({a}·{b}, {c}·{d}) weight; the module is ({out}, {in_dim})",
        )
        both = both or "lokr_w1_a" in keys
        tucker = tucker or "lokr_t2" in keys
        shapes[site] = (out, in_dim, a, b, c, d)
        if r is None:  # both full: LyCORIS's scale is 1 whatever the alpha; any r >= max(a, b, c, d) / 2 builds it
            r = max(a, b, c, d)
            ranks[site], alphas[site] = r, float(r)
        else:
            ranks[site], alphas[site] = int(r), _alpha(state, r)
    # one decompose_factor reproducing every module's factor sizes (LyCORIS uses one factor per network)
    candidates = [-1] + sorted({v for (_, _, a, b, c, d) in shapes.values() for v in (a, b, c, d)})
    factor = next(
        (
            f
            for f in candidates
            if all(
                factorization(o, f) == (a, b) and factorization(i, f) == (c, d)
                for (o, i, a, b, c, d) in shapes.values()
            )
        ),
        None,
    )
    if factor is None:
        site = next(iter(shapes))
        raise AdapterFileError(
            f"{where}: no single factorization factor gives the file's Kronecker factor sizes (e.g. {labels[site]}: "
            f"{shapes[site][2:]}) on every module (files of LyCORIS's unbalanced_factorization or mixed factors are "
            "not supported)"
        )
    r, rank_pattern = _patterns(ranks)
    alpha, alpha_pattern = _patterns(alphas)
    cfg = LoKr(
        r=r,
        alpha=alpha,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        decompose_both=both,
        decompose_factor=factor,
        use_effective_conv2d=tucker,
        targets=tuple(per_site),
    )
    states = {s: {k: v for k, v in st.items() if k != "alpha"} for s, st in per_site.items()}
    return cfg, states, ranks, alphas


def _oft(per_site: dict[str, State], modules: dict[str, nn.Module], labels: dict[str, str], where: str) -> Built:
    sizes, alphas, rescaled = {}, {}, {}
    for site, state in per_site.items():
        label = labels[site]
        _require("oft_blocks" in state, label, where, "Diag-OFT needs oft_blocks")
        blocks = state["oft_blocks"]
        _require(
            blocks.dim() != 4,
            label,
            where,
            "oft_blocks is 4-d: that is LyCORIS's BOFT (butterfly), which this reader does not convert",
        )
        out, _, kernel = _dims(modules[site])
        _require(
            blocks.dim() == 3 and blocks.shape[1] == blocks.shape[2] and blocks.shape[0] * blocks.shape[1] == out,
            label,
            where,
            f"oft_blocks {tuple(blocks.shape)} must be (blocks, b, b) with blocks · b = the module's output size {out}",
        )
        if "rescale" in state:
            want = (out, *([1] * (len(kernel) + 1)))
            _require(
                state["rescale"].numel() == out,
                label,
                where,
                f"rescale {tuple(state['rescale'].shape)} must hold one number per output channel {want}",
            )
            state["rescale"] = state["rescale"].reshape(want)
        a = state.get("alpha")
        value = float(a.reshape(()).item()) if a is not None else 0.0
        _require(math.isfinite(value) and value >= 0, label, where, f"alpha (the norm constraint) is {value}")
        sizes[site], alphas[site], rescaled[site] = int(blocks.shape[1]), value, "rescale" in state
    if len(set(rescaled.values())) > 1:
        site = next(s for s, v in rescaled.items() if not v)
        raise AdapterFileError(
            f"{where}: some modules have 'rescale' and others ({labels[site]}) do not; LyCORIS's rescaled is one "
            "setting per network"
        )
    block_size, block_sizes = _patterns(sizes)
    alpha, alpha_map = _patterns(alphas)
    cfg = LycorisOFT(
        block_size=block_size,
        alpha=alpha,
        rescaled=next(iter(rescaled.values())),
        block_sizes=block_sizes,
        alphas=alpha_map,
        targets=tuple(per_site),
    )
    states = {s: {k: v for k, v in st.items() if k != "alpha"} for s, st in per_site.items()}
    return cfg, states, sizes, alphas


# each builder: the config and the states to import, after checking every module's tensors (AdapterFileError)
_BUILDERS = {"lora": _lora, "loha": _loha, "lokr": _lokr, "oft": _oft}


# --- the reader ---------------------------------------------------------------------------------------------------
def load(
    ctl: Any,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    allow_pickle: bool = False,
    activate: bool = False,
    component: str | None = None,
) -> str:
    """Load a kohya-ss/sd-scripts or LyCORIS single ``.safetensors`` file onto ``ctl``'s model as adapter ``name``
    (default ``"default"``); returns the name.

    Args:
        ctl: the model's :class:`~adapterkit.controller.Adapters` (``ak.attach(unet)``).
        path: the ``.safetensors`` file.
        name: the adapter's name.
        allow_pickle: unused (kohya files are safetensors); kept for the reader interface of ``formats``.
        activate: make it the active adapter.
        component: which part of a Stable Diffusion network the model is: ``"unet"`` (``lora_unet_`` keys),
            ``"text_encoder"`` (``lora_te_`` or SDXL's ``lora_te1_``) or ``"text_encoder_2"`` (``lora_te2_``).
            Keys of the other components are skipped. None (default): the one component of the file whose module
            names all exist on this model (refused when several do, e.g. SDXL's two text encoders: pass it then).

    Raises:
        AdapterFileError: an unreadable file, keys naming no module (or an ambiguous name), a module with the
            tensors of two methods, several methods in one file, unsupported forms, or shapes that do not fit.
            Nothing is installed then.
    """
    del allow_pickle
    file = Path(path)
    where = str(file)
    if not file.is_file():
        raise AdapterFileError(f"{where!r} is not a file (kohya/LyCORIS adapters are one .safetensors file)")
    if file.suffix != ".safetensors":
        raise AdapterFileError(f"{where!r} is not a .safetensors file (kohya/LyCORIS adapters are safetensors)")
    raw, _meta = _read_safetensors(file)
    name = name or "default"
    ctl._check_new_name(name)
    model = ctl.model
    modules = base_modules(model)
    per_site, labels = _split(raw, model, component, where) if component else _guess(raw, model, where)
    # alpha may be an integer (LyCORIS saves torch.tensor(int) for integral constraints); it must be real
    require_float(
        {f"{labels[s]}.{k}": v for s, st in per_site.items() for k, v in st.items() if k != "alpha"}, where
    )
    for site, state in per_site.items():
        a = state.get("alpha")
        if a is not None and (a.is_complex() or a.dtype == torch.bool):
            raise AdapterFileError(f"{labels[site]}.alpha in {where} is {a.dtype}; it must be a real number")
    methods: dict[str, list[str]] = {}
    for site, state in per_site.items():
        _require(site in modules, labels[site], where, f"{type(modules.get(site)).__name__} is not adaptable here")
        try:
            _dims(modules[site])
        except TypeError as e:
            raise AdapterFileError(f"{labels[site]} in {where} names a {e}") from None
        methods.setdefault(_method(site, state, labels[site], where), []).append(site)
    if len(methods) > 1:
        parts = ", ".join(f"{_NAMES[m]} on {len(s)} modules (e.g. {labels[s[0]]})" for m, s in methods.items())
        raise AdapterFileError(
            f"{where} mixes methods ({parts}); adapterkit loads one method per adapter: split the file by method"
        )
    method = next(iter(methods))
    try:
        cfg, states, ranks, alphas = _BUILDERS[method](per_site, modules, labels, where)
    except (TypeError, ValueError) as e:
        if isinstance(e, AdapterFileError):
            raise
        raise AdapterFileError(f"{where} does not fit this model: {e}") from None
    try:
        cfg, planned = _plan_grouped(ctl, cfg, method, list(per_site), ranks, alphas)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{where} does not fit this model: {e}") from None
    if set(planned) != set(per_site):
        extra = sorted(set(planned) ^ set(per_site))
        raise AdapterFileError(
            f"{where}: the module paths did not select exactly the file's modules ({extra[:3]})"
        )
    comps: dict[str, tuple[str, Component]] = {}
    for site, (kind, comp) in planned.items():
        label = labels[site]
        if method in ("lora", "loha", "lokr"):
            scale = alphas[site] / ranks[site]
            if comp.r != ranks[site] or abs(comp.scaling - scale) > 1e-6 * max(1.0, abs(scale)):
                raise AdapterFileError(f"{label} in {where}: internal rank/alpha resolution failed (r={comp.r})")
        own = {k: tuple(v.shape) for k, v in comp.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in states[site].items()}
        if own != have:
            raise AdapterFileError(
                f"{label} in {where} has {_fmt(have)}; adapterkit's {_NAMES[method]} for this module "
                f"({type(modules[site]).__name__}) builds {_fmt(own)}, so this form cannot be loaded"
            )
        try:
            import_checked(comp, states[site], modules[site])
        except ValueError as e:
            raise AdapterFileError(f"{label} in {where}: {e}") from None
        comps[site] = (kind, comp)
    ctl.install(name, Plan(cfg, comps), activate=activate)
    return name


def _plan_grouped(
    ctl: Any, cfg: AdapterConfig, method: str, sites: list[str], ranks: dict[str, int], alphas: dict[str, float]
) -> tuple[AdapterConfig, dict[str, tuple[str, Component]]]:
    """Plan ``cfg`` one (rank, alpha) group at a time, without patterns (a pattern per module would be matched
    against every module name by ``re.fullmatch``: quadratic, and beyond ``re``'s cache of 512 patterns a
    1000-module network would take minutes). Returns the config to record, whose ``rank_pattern`` /
    ``alpha_pattern`` name only the modules outside the largest group (so a native save reloads the same
    components), and the components by module path.

    Raises:
        TypeError, ValueError: from planning (a module the method cannot act on, a bad value).
    """
    if method == "oft":  # LycorisOFT looks its per-module values up by exact path
        return cfg, {s: kc for s, kc in ctl.plan(cfg).components.items()}
    groups: dict[tuple[int, float], list[str]] = {}
    for site in sites:
        groups.setdefault((ranks[site], alphas[site]), []).append(site)
    main = max(groups, key=lambda k: len(groups[k]))
    comps: dict[str, tuple[str, Component]] = {}
    for (r, alpha), members in groups.items():
        part = dataclasses.replace(
            cfg, r=r, alpha=alpha, rank_pattern={}, alpha_pattern={}, targets=tuple(members)
        )
        comps.update(ctl.plan(part).components)
    others = sorted((s for s in sites if (ranks[s], alphas[s]) != main), key=len, reverse=True)

    def record(key: Any) -> AdapterConfig:
        return dataclasses.replace(
            cfg,
            r=main[0],
            alpha=main[1],
            rank_pattern={key(s): ranks[s] for s in others},
            alpha_pattern={key(s): alphas[s] for s in others},
            targets=tuple(sites),
        )

    recorded = record(lambda s: s)
    if len(others) > 256 or any(
        recorded.rank_for(s) != ranks[s] or recorded.scaling_for(s) != comps[s][1].scaling for s in sites
    ):
        # a path that is also the '.'-suffix of another, or matches it with '.' read as a regex wildcard: anchored,
        # escaped keys match their own path only ("(.*\.)?" cannot precede "^")
        recorded = record(lambda s: "^" + re.escape(s))
    return recorded, {s: comps[s] for s in sites}


def _fmt(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(shapes.items()))
