"""Writer of kohya-ss/sd-scripts and LyCORIS single-file adapters (one ``.safetensors`` file keyed by module): the
write direction of :mod:`adapterkit.formats.kohya`.

``save(adapters, name, "net.safetensors")`` (the ``format="kohya"`` writer of ``adapters.export``) writes one
adapter of one model (a UNet or a text encoder); :func:`save_network` writes the adapters of several components
(UNet and text encoders of one pipeline) into one file, as sd-scripts and LyCORIS save a network.

Keys are ``<prefix><module path with '.' -> '_'>.<tensor>`` with the prefixes of :data:`kohya.COMPONENTS`
(``lora_unet_``, ``lora_te_``; ``lora_te1_``/``lora_te2_`` when a file holds both SDXL text encoders).
Text-encoder modules are named by transformers 4's ``CLIPTextModel`` paths (``text_model.encoder...``, which
kohya uses) also on models without the ``text_model`` level (transformers 5). ``layout="ldm"`` names UNet modules
by the original Stable Diffusion layout (``input_blocks_4_1_...``: what sd-scripts' SDXL networks use; see
:mod:`adapterkit.formats.kohya_ldm`).

Per method, what is written (LyCORIS's tensors and conventions; ``alpha`` is always written, a 0-d float32):

* ``LoRA`` on ``nn.Linear``/``nn.Conv2d``: ``lora_down.weight = A``, ``lora_up.weight = B`` and
  ``alpha = scaling · r`` (so that kohya's ``alpha / r`` is our scaling, also for ``rslora`` and per-module
  ``rank_pattern``/``alpha_pattern``).
* ``LoHa``: ``hada_w{1,2}_{a,b}`` (+ ``hada_t1/_t2`` Tucker cores), ``alpha = scaling · r``. ABBA's unequal pair
  ranks (``r2``) are zero-padded to the larger rank (the Hadamard product is unchanged; LyCORIS has one rank).
* ``LoKr``: ``lokr_w1`` or ``lokr_w1_a/_b``, ``lokr_w2`` or ``lokr_w2_a/_b`` (+ ``lokr_t2``), ``alpha = scaling · r``.
  When both factors are full matrices LyCORIS ignores alpha (scale 1), so the scaling is folded into
  ``lokr_w1`` and ``alpha = 1``; a low-rank ``W1`` with a full ``W2`` (``decompose_both`` with a small ``W1``
  rank but a large ``W2`` one), a form LyCORIS's loader cannot rebuild, is written with ``lokr_w1 = W1a W1b`` (then
  both are full, as above).
* ``LycorisOFT`` (Diag-OFT): ``oft_blocks``, ``rescale`` when rescaled, ``alpha`` = the norm constraint.

Refused with the reason, nothing written: other methods (peft's ``OFT`` rotates input features, Diag-OFT output
channels: no conversion), DoRA magnitudes, LoRA bias deltas, PiSSA/OLoRA offsets of the base weight, modules other
than ``nn.Linear``/``nn.Conv2d`` (GPT-2 ``Conv1D``, embeddings, grouped or non-2-d convolutions), ``modules_to_save``
heads and extra sites, and names two module paths map to.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..component import Component
from ..methods.lora import LoRAConv2d, LoRALinear
from ..targeting import base_modules
from .kohya_ldm import ldm_paths

__all__ = ["save", "save_network", "network_tensors", "module_tensors", "KohyaWriteError"]

LAYOUTS = ("diffusers", "ldm")
_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
_ALGO = {"lora": "locon", "loha": "loha", "lokr": "lokr", "lycoris_oft": "diag-oft"}


class KohyaWriteError(ValueError):
    """The adapter cannot be written as a kohya/LyCORIS file; the message names every module and the reason."""


# --- per module ---------------------------------------------------------------------------------------------------
def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def _plain_module(module: nn.Module) -> str | None:
    """Why kohya/LyCORIS cannot hold an adapter on ``module`` (None: it can)."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"a grouped convolution (groups={module.groups}), which kohya/LyCORIS modules do not support"
        return None
    return f"a {type(module).__name__}; kohya/LyCORIS files adapt nn.Linear and nn.Conv2d"


def _lora(comp: Component) -> dict[str, torch.Tensor] | str:
    if not isinstance(comp, (LoRALinear, LoRAConv2d)):
        return f"its LoRA component is a {type(comp).__name__}; kohya LoRA holds linear and 2-d convolution ones"
    if getattr(comp, "magnitude", None) is not None:
        return "it is DoRA (a magnitude vector), which this writer does not write"
    if getattr(comp, "bias", None) is not None:
        return "it learns a bias delta (bias='lora_only'/'all'), which kohya files cannot hold"
    if getattr(comp, "init_A", None) is not None:
        return (
            "it is a PiSSA/OLoRA adapter, whose base weight is offset while attached; export it to peft "
            "(which converts it) or merge it"
        )
    A, B = comp.lora_A.detach(), comp.lora_B.detach()
    return {"lora_down.weight": A, "lora_up.weight": B, "alpha": _scalar(comp.scaling * comp.r)}


def _pad_rows(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """``t`` zero-padded along ``dim`` to size ``n``."""
    if t.shape[dim] == n:
        return t
    shape = list(t.shape)
    shape[dim] = n - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _loha(comp: Component) -> dict[str, torch.Tensor] | str:
    r1, r2 = int(comp.r), int(comp.r2)
    R = max(r1, r2)
    sd = {k: v.detach() for k, v in comp.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for j in (1, 2):
        a, b = sd[f"hada_w{j}_a"], sd[f"hada_w{j}_b"]
        if f"hada_t{j}" in sd:  # Tucker: t (r, r, kh, kw), a (r, out), b (r, in)
            t = _pad_rows(_pad_rows(sd[f"hada_t{j}"], R, 0), R, 1)
            out[f"hada_t{j}"], out[f"hada_w{j}_a"], out[f"hada_w{j}_b"] = t, _pad_rows(a, R, 0), _pad_rows(b, R, 0)
        else:  # a (out, r), b (r, n)
            out[f"hada_w{j}_a"], out[f"hada_w{j}_b"] = _pad_rows(a, R, 1), _pad_rows(b, R, 0)
    out["alpha"] = _scalar(comp.scaling * R)
    return out


def _lokr(comp: Component) -> dict[str, torch.Tensor] | str:
    sd = {k: v.detach() for k, v in comp.state_dict().items()}
    s = float(comp.scaling)
    out: dict[str, torch.Tensor] = {}
    w2_full = "lokr_w2" in sd
    if "lokr_w1" in sd:
        w1 = sd["lokr_w1"]
    elif w2_full:  # LyCORIS rebuilds decompose_both only when both factors are low-rank: write W1 in full
        w1 = sd["lokr_w1_a"] @ sd["lokr_w1_b"]
    else:
        w1 = None
        out["lokr_w1_a"], out["lokr_w1_b"] = sd["lokr_w1_a"], sd["lokr_w1_b"]
    if w2_full and w1 is not None:  # both full: LyCORIS's scale is 1, ours goes into W1
        out["lokr_w1"], out["lokr_w2"], out["alpha"] = w1 * s, sd["lokr_w2"], _scalar(1.0)
        return out
    if w1 is not None:
        out["lokr_w1"] = w1
    for k in ("lokr_w2_a", "lokr_w2_b", "lokr_t2"):
        if k in sd:
            out[k] = sd[k]
    out["alpha"] = _scalar(s * comp.r)
    return out


def _oft(comp: Component) -> dict[str, torch.Tensor] | str:
    out = {"oft_blocks": comp.oft_blocks.detach(), "alpha": _scalar(comp.alpha)}
    if comp.rescaled:
        out["rescale"] = comp.rescale.detach()
    return out


_WRITERS = {"lora": _lora, "loha": _loha, "lokr": _lokr, "lycoris_oft": _oft}


def module_tensors(method: str, comp: Component, module: nn.Module) -> dict[str, torch.Tensor] | str:
    """The kohya/LyCORIS tensors (tensor name -> tensor, without the module prefix) of component ``comp`` of a
    ``method`` adapter on ``module``, or the reason it cannot be written."""
    if method not in _WRITERS:
        why = (
            "peft's OFT rotates the input features, kohya/LyCORIS's Diag-OFT the output channels: they do not convert"
            if method == "oft"
            else "kohya/LyCORIS files hold LoRA, LoHa, LoKr and LyCORIS Diag-OFT"
        )
        return f"the method is {method!r}; {why}"
    problem = _plain_module(module)
    if problem:
        return f"the module is {problem}"
    return _WRITERS[method](comp)


# --- names --------------------------------------------------------------------------------------------------------
def _component_of(model: nn.Module) -> str:
    """The component a model most likely is: CLIP text models are text encoders (the projection variant is SDXL's
    second), everything else a UNet (``lora_unet_``, the names the reader resolves on any model)."""
    cls = type(model).__name__
    if cls == "CLIPTextModelWithProjection":
        return "text_encoder_2"
    if cls.startswith("CLIPTextModel"):
        return "text_encoder"
    return "unet"


def _namer(model: nn.Module, component: str, layout: str) -> Any:
    """module path -> kohya name (no prefix)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    ldm: dict[str, str] = {}
    if layout == "ldm":
        if component != "unet":
            raise ValueError(f"layout='ldm' names UNet modules; component {component!r} has no LDM layout")
        ldm = ldm_paths(model)
        if not ldm:
            raise ValueError(
                f"layout='ldm' needs a diffusers UNet2DConditionModel; this is a {type(model).__name__}"
            )
    legacy = component.startswith("text_encoder") and not any(p == "text_model" for p, _ in model.named_modules())

    def name(path: str) -> str:
        if layout == "ldm":
            if path not in ldm:
                raise KeyError(path)
            path = ldm[path]
        elif legacy:
            path = "text_model." + path
        return path.replace(".", "_")

    return name


def network_tensors(
    ctl: Any,
    name: str,
    *,
    component: str | None = None,
    layout: str = "diffusers",
    prefix: str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The kohya/LyCORIS keys and tensors of adapter ``name`` of ``ctl``'s model.

    Args:
        ctl: the model's :class:`~adapterkit.Adapters`.
        name: the adapter (LoRA, LoHa, LoKr or LycorisOFT).
        component: ``"unet"``, ``"text_encoder"`` or ``"text_encoder_2"`` (None: from the model's class, see
            :func:`save`).
        layout: ``"diffusers"`` (module paths) or ``"ldm"`` (the original Stable Diffusion UNet names).
        prefix: the key prefix (default: the component's, ``lora_unet_``/``lora_te_``/``lora_te2_``).
        dtype: cast the tensors to this floating dtype (``alpha`` stays float32); None keeps the adapter's.

    Raises:
        KohyaWriteError: a module or method the format cannot hold (every such module named), or two modules
            with the same kohya name.
        ValueError: an unknown component or layout, ``layout="ldm"`` on a model that is not a diffusers UNet.
    """
    component = component or _component_of(ctl.model)
    if component not in _PREFIX:
        raise ValueError(f"unknown component {component!r}; choose one of: {', '.join(_PREFIX)}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    prefix = prefix or _PREFIX[component]
    method = str(ctl.config(name).method)
    kinds = ctl.sites(name)
    comps = ctl.components(name)
    modules = base_modules(ctl.model)
    naming = _namer(ctl.model, component, layout)
    problems: dict[str, str] = {}
    owners: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for site, comp in comps.items():
        if kinds[site] != "target":
            problems[site] = (
                f"it is a {kinds[site]!r} site (modules_to_save heads, bias deltas), not an adapted module"
            )
            continue
        got = module_tensors(method, comp, modules[site])
        if isinstance(got, str):
            problems[site] = got
            continue
        try:
            short = naming(site)
        except KeyError:
            problems[site] = "it has no name in the LDM layout (outside the UNet's blocks); use layout='diffusers'"
            continue
        if short in owners:
            problems[site] = f"its kohya name {short!r} is also that of {owners[short]!r}"
            continue
        owners[short] = site
        for tensor, value in got.items():
            value = value.detach().to("cpu")
            if dtype is not None and tensor != "alpha":
                value = value.to(dtype)
            tensors[f"{prefix}{short}.{tensor}"] = value.contiguous()
    if not comps:
        problems["<adapter>"] = "it has no modules"
    if problems:
        listed = "; ".join(f"{site}: {why}" for site, why in sorted(problems.items()))
        raise KohyaWriteError(f"adapter {name!r} ({method}) cannot be written as a kohya/LyCORIS file: {listed}")
    return tensors


def _metadata(parts: list[tuple[Any, str]], tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """kohya's ``ss_network_*`` fields (as sd-scripts/LyCORIS write them), for tools that display them."""
    methods = sorted({str(ctl.config(name).method) for ctl, name in parts})
    method = methods[0]
    ranks, alphas = [], []
    for key, value in tensors.items():
        if key.endswith((".lora_down.weight", ".hada_w1_b", ".lokr_w1_b", ".lokr_w2_b")):
            ranks.append(int(value.shape[0]))
        elif key.endswith(".alpha"):
            alphas.append(float(value))
    meta = {
        "ss_network_module": "networks.lora" if methods == ["lora"] else "lycoris.kohya",
        "ss_network_dim": str(max(ranks) if ranks else 1),
        "ss_network_alpha": f"{max(alphas) if alphas else 1.0:g}",
        "ss_network_args": json.dumps({"algo": _ALGO.get(method, method)} if methods != ["lora"] else {}),
        "adapterkit_methods": ",".join(methods),
    }
    return meta


def _write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    target = Path(path)
    if target.suffix != ".safetensors":
        raise ValueError(
            f"{str(target)!r}: a kohya/LyCORIS adapter is one .safetensors file; give a path ending in .safetensors"
        )
    if target.is_dir():
        raise ValueError(f"{str(target)!r} is a directory; give the path of the .safetensors file to write")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, target)  # readers never see a half-written file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- writers ------------------------------------------------------------------------------------------------------
def save(
    ctl: Any,
    name: str,
    path: str | os.PathLike,
    *,
    component: str | None = None,
    layout: str = "diffusers",
    dtype: torch.dtype | None = None,
) -> None:
    """Write adapter ``name`` of ``ctl``'s model as a kohya/LyCORIS ``.safetensors`` file (the ``format="kohya"``
    writer of ``adapters.export``).

    Args:
        ctl: the model's :class:`~adapterkit.Adapters`.
        name: the adapter: LoRA, LoHa, LoKr or LycorisOFT (read from such a file) on ``nn.Linear``/``nn.Conv2d``.
        path: the file to write (must end in ``.safetensors``; replaced atomically).
        component: which part of a Stable Diffusion network the model is, for the key prefix: ``"unet"``
            (``lora_unet_``), ``"text_encoder"`` (``lora_te_``) or ``"text_encoder_2"`` (``lora_te2_``). None:
            CLIP text models are text encoders (``CLIPTextModelWithProjection``: ``text_encoder_2``), other models
            ``"unet"``.
        layout: ``"diffusers"`` (module paths, as sd-scripts names SD 1.x/2.x networks) or ``"ldm"`` (the original
            Stable Diffusion UNet names, as sd-scripts names SDXL networks).
        dtype: e.g. ``torch.float16`` (kohya's usual ``save_precision``); None keeps the adapter's dtype.

    Raises:
        KohyaWriteError: modules or a method the format cannot hold (every one named); nothing is written.
        ValueError: a path not ending in ``.safetensors``, an unknown component/layout.
    """
    tensors = network_tensors(ctl, name, component=component, layout=layout, dtype=dtype)
    _write(path, tensors, _metadata([(ctl, name)], tensors))


def save_network(
    path: str | os.PathLike,
    parts: Mapping[str, tuple[Any, str]],
    *,
    layout: str = "diffusers",
    dtype: torch.dtype | None = None,
) -> None:
    """Write the adapters of several components of one pipeline into one kohya/LyCORIS file (as sd-scripts and
    LyCORIS save a network)::

        save_network("style.safetensors", {"unet": (ak.attach(pipe.unet), "style"),
                                           "text_encoder": (ak.attach(pipe.text_encoder), "style")})

    Args:
        path: the ``.safetensors`` file.
        parts: component (``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``) -> (its Adapters, adapter name).
            With both text encoders (SDXL) the first is written as ``lora_te1_``.
        layout: the UNet's names (``"diffusers"`` or ``"ldm"``); text encoders always use module paths.
        dtype: as in :func:`save`.

    Raises:
        KohyaWriteError, ValueError: as :func:`save`; also adapters of different methods (the reader loads one
            method per file).
    """
    if not parts:
        raise ValueError("save_network needs at least one component")
    unknown = sorted(set(parts) - set(_PREFIX))
    if unknown:
        raise ValueError(f"unknown component {unknown[0]!r}; choose among: {', '.join(_PREFIX)}")
    methods = {c: str(ctl.config(n).method) for c, (ctl, n) in parts.items()}
    if len(set(methods.values())) > 1:
        raise KohyaWriteError(
            f"the components' adapters are of different methods ({methods}); a kohya file read by adapterkit holds "
            "one method: write one file per method"
        )
    tensors: dict[str, torch.Tensor] = {}
    for component, (ctl, name) in parts.items():
        prefix = "lora_te1_" if component == "text_encoder" and "text_encoder_2" in parts else None
        tensors.update(
            network_tensors(
                ctl,
                name,
                component=component,
                layout=layout if component == "unet" else "diffusers",
                prefix=prefix,
                dtype=dtype,
            )
        )
    _write(path, tensors, _metadata(list(parts.values()), tensors))
