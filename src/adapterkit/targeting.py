"""Selectors -> module names.

A selector is one of (tried in this order for strings):

* a module type (``nn.Linear``): every module that is an instance of it;
* ``"all-linear"``: every linear-like module (``nn.Linear``, GPT-2 ``Conv1D``, registered linear
  backends) except output heads (the model's output embeddings and the profile's ``head`` role). MoE experts
  stored as 3-D parameters (transformers 5: ``experts.gate_up_proj (E, 2I, H)``, ``experts.down_proj``) and the
  routers beside them are no linear modules: ``all-linear`` leaves them out and says so with an
  :class:`UntargetedParametersWarning` naming them (LoRA reaches them with ``target_parameters``);
* a role (``"attn.q"``): the model family's profile patterns (``profiles.py``);
* an exact module name (``"model.layers.0.self_attn.q_proj"``);
* a name suffix (``"q_proj"`` matches ``...self_attn.q_proj``), as peft's list form;
* a regular expression matched with ``re.fullmatch`` against full module names, as peft's string form.

A selector that matches nothing is an error that names close matches and the family's roles.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .backends import backend_for
from .profiles import ROLES

__all__ = [
    "CONTAINER",
    "base_modules",
    "select",
    "layer_index",
    "TargetError",
    "UntargetedParametersWarning",
    "unreached_parameters",
    "is_expert_stack",
]

CONTAINER = "ak_adapters"
"""Attribute name of the ModuleDict that holds components on a target module."""

_LAYER = re.compile(r"\.(\d+)(\.|$)")


class TargetError(ValueError):
    """A selector matched nothing or matched something the method cannot act on."""


class UntargetedParametersWarning(UserWarning):
    """``"all-linear"`` left out weights that are not linear modules (MoE expert stacks, routers)."""


def _layered(module: nn.Module) -> bool:
    """Modules with a layer type of their own (a backend) or from torch itself (a Conv1d's 3-D weight is no stack)."""
    return backend_for(module) is not None or type(module).__module__.startswith("torch.")


def is_expert_stack(t: Any) -> bool:
    """A floating ``(E, out, in)`` tensor with ``E ≥ 2`` experts of ``≥ 2 × 2`` matrices (not a ``(1, L, d)``
    position table or a ``(1, 1, d)`` class token)."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 3 and min(t.shape) >= 2


def unreached_parameters(modules: Mapping[str, nn.Module]) -> dict[str, tuple[int, ...]]:
    """Weights no linear-module selector reaches: ``<module>.<parameter>`` -> shape, in model order.

    These are the 3-D floating parameters of modules without a layer type (MoE expert stacks, ``(E, out, in)``) and
    the 2-D floating parameters of such modules beside them (their routers, ``(E, hidden)``)."""
    stacks = {
        n: [p for p, t in m._parameters.items() if is_expert_stack(t)]
        for n, m in modules.items()
        if n and not _layered(m)
    }
    stacks = {n: ps for n, ps in stacks.items() if ps}
    parents = {n.rpartition(".")[0] for n in stacks}
    out: dict[str, tuple[int, ...]] = {}
    for n, m in modules.items():
        if n in stacks:
            out.update({f"{n}.{p}": tuple(m._parameters[p].shape) for p in stacks[n]})
        elif n and n.rpartition(".")[0] in parents and not _layered(m):
            out.update(
                {
                    f"{n}.{p}": tuple(t.shape)
                    for p, t in m._parameters.items()
                    if t is not None and t.is_floating_point() and t.dim() == 2
                }
            )
    return out


def _warn_unreached(model: nn.Module, modules: dict[str, nn.Module], covered: Sequence[str]) -> None:
    """The :class:`UntargetedParametersWarning` of ``"all-linear"``, when the model has MoE stacks/routers that
    ``covered`` (``target_parameters`` entries: names or dotted suffixes) does not name."""
    unreached = {
        k: v
        for k, v in unreached_parameters(modules).items()
        if not any(k == c or k.endswith("." + c) for c in covered)
    }
    if not unreached:
        return
    total = sum(p.numel() for p in model.parameters())
    count = sum(modules[k.rpartition(".")[0]]._parameters[k.rpartition(".")[2]].numel() for k in unreached)
    suffixes = list(dict.fromkeys(".".join(k.split(".")[-2:]) for k in unreached))
    shown = ", ".join(f"{k} {tuple(s)}" for k, s in list(unreached.items())[:4])
    more = f" and {len(unreached) - 4} more" if len(unreached) > 4 else ""
    warnings.warn(
        f"'all-linear' adapts linear modules only: it leaves out {len(unreached)} MoE expert/router parameters "
        f"({100.0 * count / max(total, 1):.0f}% of the model's parameters) that are not nn.Linear: {shown}{more}. "
        f"LoRA adapts them with target_parameters={suffixes!r} (or targets naming their modules); no other "
        "method reaches them",
        UntargetedParametersWarning,
        stacklevel=4,
    )


def base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's own modules by name, skipping adapterkit containers (and everything inside them)."""
    out: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        out[prefix] = module
        # a snapshot: another thread (a server's engine) may add or drop a site's container meanwhile
        for child_name, child in list(module._modules.items()):
            if child is None or child_name == CONTAINER:
                continue
            walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    walk(model, "")
    return out


def layer_index(name: str) -> int | None:
    """The first integer component of a dotted module path (``encoder.layer.3.output`` -> 3)."""
    m = _LAYER.search("." + name)
    return int(m.group(1)) if m else None


def _role_match(patterns: Iterable[str], name: str) -> bool:
    return any(re.fullmatch(rf"(.*\.)?(?:{p})", name) for p in patterns)


def head_names(model: nn.Module, modules: dict[str, nn.Module], roles: dict[str, list[str]]) -> set[str]:
    heads = {n for n in modules if n and _role_match(roles.get("head", ()), n)}
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        heads |= {n for n, m in modules.items() if m is out_emb}
    # a generic fallback for models without a profile
    heads |= {n for n in modules if n.split(".")[-1] in ("lm_head", "classifier", "score")}
    return heads


def _is_regex(s: str) -> bool:
    return any(c in s for c in "*+?[]()|\\^$")


def _resolve_one(
    sel: Any, model: nn.Module, modules: dict[str, nn.Module], family: str | None, roles: dict[str, list[str]]
) -> list[str]:
    names = [n for n in modules if n]
    if isinstance(sel, type):
        return [n for n in names if isinstance(modules[n], sel)]
    if not isinstance(sel, str):
        raise TargetError(f"target {sel!r} must be a role, a module name/pattern or a module type")
    if sel == "all-linear":
        heads = head_names(model, modules, roles)
        found = []
        for n in names:
            b = backend_for(modules[n])
            if b is not None and b.kind == "linear" and n not in heads:
                found.append(n)
        return found
    if sel in ROLES:
        if family is None:
            hint = (
                "name the output module(s) instead: heads=['classifier'] (CLI: --heads classifier)"
                if sel == "head"
                else "target module names, suffixes, regexes, module types or 'all-linear' instead"
            )
            raise TargetError(f"role {sel!r} needs a model profile, but {type(model).__name__} has none; {hint}")
        if sel not in roles:
            raise TargetError(
                f"role {sel!r} does not exist for {family} models; roles for {family}: {', '.join(roles)}"
            )
        return [n for n in names if _role_match(roles[sel], n)]
    if sel in modules:
        return [sel]
    found = [n for n in names if n.endswith("." + sel)]
    if found:
        return found
    if _is_regex(sel):
        try:
            rx = re.compile(sel)
        except re.error as e:
            raise TargetError(f"target {sel!r} is not a valid regular expression: {e}") from None
        return [n for n in names if rx.fullmatch(n)]
    return []


def _no_match_error(sel: Any, modules: dict[str, nn.Module], family: str | None, roles: dict) -> TargetError:
    if isinstance(sel, type):
        kinds = sorted({type(m).__name__ for n, m in modules.items() if n and not m._modules})
        return TargetError(
            f"the model has no {sel.__name__} module (target {sel.__module__}.{sel.__qualname__}); its layers are "
            f"{', '.join(kinds[:12])}: pick a method for those, or targets naming them"
        )
    leaves = sorted({n.split(".")[-1] for n in modules if n})
    hint = ""
    if isinstance(sel, str):
        close = difflib.get_close_matches(sel.split(".")[-1], leaves, n=3) + difflib.get_close_matches(
            sel, list(roles), n=2
        )
        if close:
            hint = f"; did you mean {', '.join(repr(c) for c in dict.fromkeys(close))}?"
    role_text = f" roles for {family}: {', '.join(roles)}." if family else " (this model has no role profile)."
    return TargetError(
        f"unknown target {sel!r}{hint}{role_text} module names end in e.g.: {', '.join(leaves[:12])}"
        f"{_parameter_hint(sel, modules)}"
    )


def _parameter_hint(sel: Any, modules: dict[str, nn.Module]) -> str:
    """For a selector that names a parameter rather than a module (``"gate_up_proj"``), or on models whose MoE
    experts are 3-D parameters (transformers 4 targets such as ``"w1"`` name nothing there): how to reach them."""
    if not isinstance(sel, str):
        return ""
    for m, module in modules.items():
        for p in module._parameters:
            key = f"{m}.{p}" if m else p
            if key == sel or key.endswith("." + sel):
                leaf = ".".join(key.split(".")[-2:])
                return (
                    f". {sel!r} names the parameter {key!r} of a {type(module).__name__}, not a module: LoRA adapts "
                    f"parameters with target_parameters=[{leaf!r}] (or targets=[{m.rpartition('.')[2]!r}])"
                )
    unreached = unreached_parameters(modules)
    if not unreached:
        return ""
    suffixes = list(dict.fromkeys(".".join(k.split(".")[-2:]) for k in unreached))
    return (
        f". This model's MoE experts are 3-D parameters, not modules (e.g. {next(iter(unreached))}): LoRA adapts "
        f"them with target_parameters={suffixes!r}"
    )


def select(
    model: nn.Module,
    selectors: Sequence[Any],
    *,
    family: str | None,
    roles: dict[str, list[str]],
    exclude: Sequence[Any] = (),
    layers: Sequence[int] | None = None,
    modules: dict[str, nn.Module] | None = None,
    parameters: Sequence[str] = (),
) -> list[str]:
    """Resolve selectors to module names, in model order.

    ``parameters``: the config's ``target_parameters`` (LoRA), left out of ``"all-linear"``'s warning about the
    MoE expert/router weights it does not reach.

    Raises:
        TargetError: a selector matched nothing, or nothing is left after ``exclude``/``layers``.
    """
    modules = base_modules(model) if modules is None else modules
    chosen: set[str] = set()
    for sel in selectors:
        found = _resolve_one(sel, model, modules, family, roles)
        if isinstance(sel, str) and sel == "all-linear":
            _warn_unreached(model, modules, parameters)
        if not found and isinstance(sel, str) and sel in roles:
            raise TargetError(
                f"role {sel!r} matches no module of this {type(model).__name__}; "
                f"roles for {family}: {', '.join(roles)}"
            )
        if not found:
            raise _no_match_error(sel, modules, family, roles)
        chosen.update(found)
    for sel in exclude:
        chosen.difference_update(_resolve_one(sel, model, modules, family, roles))
    if layers is not None:
        keep = set(layers)
        chosen = {n for n in chosen if layer_index(n) in keep}
    if not chosen:
        raise TargetError(
            f"targets {list(selectors)!r} (exclude={list(exclude)!r}, layers={layers!r}) leave no module to adapt"
        )
    return [n for n in modules if n in chosen]
