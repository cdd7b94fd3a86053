"""LoRA on parameters: MoE expert stacks and routers (peft's ``target_parameters``).

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE (and most MoE models) as fused 3-D parameters of
one module, ``gate_up_proj: (E, 2I, H)`` and ``down_proj: (E, H, I)``, applied with ``F.linear(x, W[e])`` (or a
grouped matmul), and the router as a module holding a 2-D ``weight: (E, H)``. There is no ``nn.Linear`` to hook,
and the expert output is nonlinear in ``W[e]`` (``act(gate) * up`` then ``down``), so no hook on the module's output
can express a weight change. LoRA here is applied to the parameter itself, per expert (Hu et al. 2021, §4.1, for
each expert matrix ``W_e: (out, in)``)::

    W'_e = W_e + s · B_e A_e,      A_e: (r, in), B_e: (out, r),  s = alpha / r  (rsLoRA: alpha / sqrt(r))

and the module runs with ``W'`` in place of ``W`` for that call (``sites.ParameterCall``: the tensors are swapped
in for exactly one call and put back in a ``finally``), which is what peft's ``lora.ParamWrapper`` computes (it
registers a ``torch.nn.utils.parametrize`` parametrization around the call). ``W'`` is formed in the parameter's
dtype with one ``baddbmm`` (peft's ``_LoraFactorsProxy``); gradients reach A and B through it.

Layouts. A parameter ``(E, d1, d2)`` holds ``E`` matrices ``(out, in) = (d1, d2)``, or ``(in, out)`` when the
module says ``is_transposed = True`` (transformers' ``@use_experts_implementation(is_transposed=True)``, e.g.
GPT-OSS), as peft reads it. A 2-D parameter is one matrix ``(out, in)`` (a router's ``weight``).

Our tensors (natively saved as ``lora_A.<parameter>``/``lora_B.<parameter>``):
``lora_A: (E, r, in)``, ``lora_B: (E, out, r)`` (2-D parameters: ``(r, in)``, ``(out, r)``).

peft's (``formats/peft_lora.py`` converts through :func:`peft_tensors` / :func:`from_peft`): ``lora_A.weight:
(E·r, in)`` with expert ``e`` in rows ``e·r … e·r + r − 1``, and ``lora_B.weight: (out, r·E)`` with expert ``e``
in columns ``k·E + e`` (rank-major). Several parameters of one module are nested ``ParamWrapper`` s in peft: the
parameter registered last is outermost, so parameter ``i`` of ``n`` targeted ones (registration order) is stored
under ``<module>.`` + ``base_layer.`` × ``(n − 1 − i)``.

Selection follows peft: an entry of ``target_parameters`` matches the parameter ``<module>.<name>`` when it equals
it or is a dot-separated suffix of it (``"experts.gate_up_proj"``); ``layers`` applies as for modules. A module
target that has no layer type of its own but holds expert stacks (3-D parameters) or a routing matrix (2-D) gets
the same LoRA on those parameters (``targets=["experts", "gate"]``). Not available here (peft refuses them too):
dropout (the input of ``W'`` cannot be dropped per token), DoRA, PiSSA/OLoRA inits, bias deltas, per-row routing
of a mixed batch.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..backends import backend_for
from ..component import Component
from ..sites import request_override
from ..targeting import TargetError, is_expert_stack, layer_index

__all__ = [
    "LoRAParameters",
    "check_config",
    "module_parameters",
    "parameter_targets",
    "build_parameter_sites",
    "peft_tensors",
    "peft_parameter_names",
    "split_peft_state",
    "from_peft",
]


def check_config(cfg: Any) -> None:
    """Validate ``cfg.target_parameters`` (a LoRA config) and refuse the options parameter targets cannot have.

    Raises:
        ValueError: naming the field to change.
    """
    names = cfg.target_parameters
    if isinstance(names, str):
        names = (names,)
    object.__setattr__(cfg, "target_parameters", tuple(names))
    if not all(isinstance(n, str) and n and not n.startswith(".") for n in cfg.target_parameters):
        raise ValueError(
            f"target_parameters must be parameter names or dotted suffixes such as 'experts.gate_up_proj', got "
            f"{list(cfg.target_parameters)!r}"
        )
    what = _refusal(cfg)
    if cfg.target_parameters and what:
        raise ValueError(
            f"LoRA with target_parameters does not support {what} (neither does peft's ParamWrapper); put the "
            "parameters in a separate adapter without it"
        )


def _refusal(cfg: Any) -> str | None:
    """The option of ``cfg`` that LoRA on parameters cannot have, or None."""
    init = getattr(cfg.init, "value", cfg.init)
    if cfg.dropout > 0:
        return "dropout > 0 (the update acts on the weight, so the input cannot be dropped per token)"
    if cfg.dora:
        return "dora=True"
    if init in ("pissa", "olora"):
        return f"init={init!r}"
    return None


def module_parameters(module: nn.Module) -> list[str]:
    """Parameters LoRA adapts when a module without a layer type of its own is a *module* target: its expert
    stacks (:func:`~adapterkit.targeting.is_expert_stack`), else its floating 2-D parameters (a router's ``weight``);
    ``[]`` for modules that have a backend, torch's own layers (a ``Conv1d``'s 3-D weight is no expert stack) and
    anything else."""
    if backend_for(module) is not None or type(module).__module__.startswith("torch."):
        return []
    stacks = [n for n, p in module._parameters.items() if is_expert_stack(p)]
    if stacks:
        return stacks
    return [n for n, p in module._parameters.items() if p is not None and p.is_floating_point() and p.dim() == 2]


def parameter_targets(
    modules: Mapping[str, nn.Module], patterns: Sequence[str], layers: Sequence[int] | None = None
) -> dict[str, list[str]]:
    """Module name -> its parameters matched by ``patterns`` (peft's rule: equal, or a dotted suffix of
    ``<module>.<parameter>``), in model order and each module's registration order; ``layers`` keeps modules
    inside those layer indices.

    Raises:
        TargetError: an entry matches no parameter (naming close parameter names), matches a parameter of the
            model root, or a parameter that is not a floating 2-D or 3-D tensor.
    """
    found: dict[str, list[str]] = {}
    used: set[str] = set()
    for mod_name, module in modules.items():
        for p_name, p in module._parameters.items():
            if p is None:
                continue
            key = f"{mod_name}.{p_name}" if mod_name else p_name
            hits = [t for t in patterns if key == t or key.endswith("." + t)]
            if not hits:
                continue
            used.update(hits)
            if not mod_name:
                raise TargetError(f"target_parameters {hits[0]!r} names {key!r}, a parameter of the model itself")
            if not p.is_floating_point() or p.dim() not in (2, 3):
                raise TargetError(
                    f"target_parameters {hits[0]!r} matches {key!r} of shape {tuple(p.shape)} ({p.dtype}): LoRA on "
                    "parameters needs a floating 2-D matrix or 3-D stack of matrices (experts)"
                )
            found.setdefault(mod_name, []).append(p_name)
    unused = [t for t in patterns if t not in used]
    if unused:
        keys = sorted({f"{m.rpartition('.')[2]}.{n}" for m, mod in modules.items() if m for n in mod._parameters})
        close = difflib.get_close_matches(unused[0].split(".", max(0, unused[0].count(".") - 1))[-1], keys, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        stacks = sorted({k for k in keys if _ndim(modules, k) == 3})
        raise TargetError(
            f"target_parameters {unused[0]!r} matches no parameter of this model{hint} Entries are parameter names "
            f"or dotted suffixes of them ('<module>.<parameter>'); 3-D parameters here: {', '.join(stacks) or 'none'}"
        )
    if layers is not None:
        keep = set(layers)
        found = {m: ps for m, ps in found.items() if layer_index(m) in keep}
    return found


def _ndim(modules: Mapping[str, nn.Module], leaf_key: str) -> int:
    mod_leaf, _, p_name = leaf_key.rpartition(".")
    for m, mod in modules.items():
        if m.rpartition(".")[2] == mod_leaf and mod._parameters.get(p_name) is not None:
            return mod._parameters[p_name].dim()
    return 0


def build_parameter_sites(
    cfg: Any,
    modules: Mapping[str, nn.Module],
    targets: Sequence[str],
    built: dict[str, Component],
    select: Callable[[Sequence[Any]], list[str]] | None = None,
) -> dict[str, Component]:
    """LoRA's ``build_all`` for parameter targets: ``built`` (the module targets' components) plus one
    :class:`LoRAParameters` per module holding targeted parameters (``cfg.target_parameters``, minus modules that
    ``cfg.exclude`` names through ``select``), and per module target that :func:`module_parameters` accepts; keyed
    by module name, in model order.

    Raises:
        TargetError: a module is both a module target (with a layer type) and holds targeted parameters.
    """
    per_module = parameter_targets(modules, cfg.target_parameters, cfg.layers) if cfg.target_parameters else {}
    if per_module and cfg.exclude and select is not None:
        excluded: set[str] = set()
        for sel in cfg.exclude:
            with contextlib.suppress(
                TargetError
            ):  # a selector that names nothing excludes nothing (as for modules)
                excluded.update(select([sel]))
        per_module = {m: ps for m, ps in per_module.items() if m not in excluded}
    both = sorted(set(per_module) & set(built))
    if both:
        raise TargetError(
            f"{both[:3]} are module targets and hold parameters named in target_parameters; adapt either the module "
            "or its parameters (peft refuses both too)"
        )
    for name in targets:
        if name not in built:
            params = per_module.setdefault(name, [])
            params += [p for p in module_parameters(modules[name]) if p not in params]
    out = dict(built)
    for name, params in per_module.items():
        out[name] = LoRAParameters(cfg, modules[name], name, params)
    return {n: out[n] for n in modules if n in out}


class LoRAParameters(Component):
    """LoRA on some parameters of one module (all the targeted ones of that module, for one adapter).

    Shapes per parameter ``p`` (see the module docstring): ``lora_A[p]: (E, r, in)``, ``lora_B[p]: (E, out, r)``
    for a 3-D ``p``; ``(r, in)``, ``(out, r)`` for a 2-D one. ``r`` and the scaling come from the config's
    ``rank_pattern``/``alpha_pattern`` matched against ``<module>.<p>`` (as peft).
    """

    has_pre = True
    has_post = False
    mergeable = True
    additive = False  # the expert output is nonlinear in W: deltas of several adapters do not add up at the output
    overrides_parameters = True

    def __init__(self, cfg: Any, module: nn.Module, name: str, params: Sequence[str]) -> None:
        super().__init__()
        if not params:
            raise TypeError(
                f"LoRA cannot act on {name!r} ({type(module).__name__}): it holds no parameter to adapt"
            )
        what = _refusal(cfg)
        if what:
            raise TypeError(
                f"LoRA on the parameters of {name!r} ({type(module).__name__}: {', '.join(params)}) does not support "
                f"{what}; adapt these modules in a separate adapter without it"
            )
        self.cfg = cfg
        self.names = tuple(params)
        self.transposed = bool(getattr(module, "is_transposed", False))
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        for p in self.names:
            weight = module._parameters[p]
            if weight is None or not weight.is_floating_point() or weight.dim() not in (2, 3):
                shape = None if weight is None else tuple(weight.shape)
                raise TypeError(
                    f"LoRA cannot act on {name}.{p} (shape {shape}): it needs a floating 2-D or 3-D tensor"
                )
            key = f"{name}.{p}"
            r, s = cfg.rank_for(key), cfg.scaling_for(key)
            factory = {"device": weight.device, "dtype": weight.dtype}
            if weight.dim() == 2:
                out_dim, in_dim = weight.shape
                a_shape, b_shape = (r, in_dim), (out_dim, r)
            else:
                experts, d1, d2 = weight.shape
                out_dim, in_dim = (d2, d1) if self.transposed else (d1, d2)
                a_shape, b_shape = (experts, r, in_dim), (experts, out_dim, r)
            self.lora_A[p] = nn.Parameter(torch.empty(a_shape, **factory))
            self.lora_B[p] = nn.Parameter(torch.empty(b_shape, **factory))
            self.r[p], self.scaling[p] = r, s
        object.__setattr__(self, "_module_ref", module)  # outside the module tree on purpose

    def extra_repr(self) -> str:
        return ", ".join(f"{p}: r={self.r[p]}, scaling={self.scaling[p]:g}" for p in self.names)

    # --- init ------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        """A Kaiming-uniform with fan-in ``in`` per expert (peft's ``nn.Linear(in, r·E)``), B = 0; ``gaussian``:
        A ~ N(0, 1/r); ``init_weights=False`` draws B ~ N(0, 0.1²) too (not an identity)."""
        for p in self.names:
            A, B = self.lora_A[p], self.lora_B[p]
            flat = A.view(-1, A.shape[-1])  # (E·r, in): fan-in is `in`, as for one expert
            if getattr(self.cfg.init, "value", self.cfg.init) == "gaussian":
                nn.init.normal_(flat, std=1.0 / self.r[p])
            else:
                nn.init.kaiming_uniform_(flat, a=math.sqrt(5))
            if self.cfg.init_weights:
                nn.init.zeros_(B)
            else:
                nn.init.normal_(B, std=0.1)

    # --- forward ---------------------------------------------------------------------------
    def _updated(self, p: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight + s · B A`` (per expert) in ``weight``'s layout and dtype, with grad through A and B."""
        A = self.lora_A[p].to(weight.dtype)
        B = self.lora_B[p].to(weight.dtype)
        s = self.scaling[p]
        with torch.autocast(device_type=weight.device.type, enabled=False):
            if weight.dim() == 2:
                return torch.addmm(weight, B, A, alpha=s)
            if self.transposed:  # stored (E, in, out): W_e^T + s A_e^T B_e^T
                return torch.baddbmm(weight, A.transpose(1, 2), B.transpose(1, 2), alpha=s)
            return torch.baddbmm(weight, B, A, alpha=s)

    def _update(self, values: dict[str, torch.Tensor]) -> None:
        module = self._base
        for p in self.names:
            current = values.get(p)
            values[p] = self._updated(p, module._parameters[p] if current is None else current)

    def pre_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Ask for ``W + s·BA`` in place of each targeted parameter during this call of the module."""
        request_override(self._base, self._update)
        return args, kwargs

    @classmethod
    def routed_call(cls, comps: list[Component | None], plan: Any, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError(
            "per-row routing is not available for LoRA on parameters (MoE experts, routers): it changes the "
            "module's weights for the whole call, and an expert module sees tokens, not rows; run each adapter's "
            "rows in their own batch"
        )

    @property
    def _base(self) -> nn.Module:
        return self.__dict__["_module_ref"]

    # --- merging ---------------------------------------------------------------------------
    def delta(self, p: str) -> torch.Tensor:
        """``s · B A`` in the parameter's layout (float32 or the adapter's dtype), detached."""
        A, B = self.lora_A[p].detach(), self.lora_B[p].detach()
        d = (B @ A) * self.scaling[p]
        return d.transpose(-1, -2) if self.transposed and d.dim() == 3 else d

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        if self.merged:
            return
        for p in self.names:
            w = module._parameters[p]
            w.data.add_(self.delta(p).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        if not self.merged:
            return
        for p in self.names:
            w = module._parameters[p]
            w.data.sub_(self.delta(p).to(w.dtype))
        self.merged = False


# --- peft's file layout ----------------------------------------------------------------------------------------
def _depth_prefix(comp_names: Sequence[str], all_names: Sequence[str], p: str) -> str:
    """peft's nesting: ``base_layer.`` × (number of targeted parameters registered after ``p``)."""
    order = [n for n in all_names if n in comp_names]
    return "base_layer." * (len(order) - 1 - order.index(p))


def peft_tensors(comp: LoRAParameters, module: nn.Module) -> dict[str, torch.Tensor]:
    """Suffix (after ``<module>.``) -> tensor in peft's layout, for every parameter ``comp`` adapts."""
    out: dict[str, torch.Tensor] = {}
    for p in comp.names:
        A, B = comp.lora_A[p].detach(), comp.lora_B[p].detach()
        if A.dim() == 3:
            experts, r, in_dim = A.shape
            A = A.reshape(experts * r, in_dim)
            B = B.permute(1, 2, 0).reshape(B.shape[1], r * experts)  # column k·E + e
        prefix = _depth_prefix(comp.names, list(module._parameters), p)
        out[f"{prefix}lora_A.weight"] = A.contiguous()
        out[f"{prefix}lora_B.weight"] = B.contiguous()
    return out


def peft_parameter_names(site: str, comp: LoRAParameters) -> list[str]:
    """The full ``target_parameters`` entries of ``comp`` (exact names, so peft wraps exactly these)."""
    return [f"{site}.{p}" for p in comp.names]


def split_peft_state(
    raw: dict[str, torch.Tensor], modules: Mapping[str, nn.Module], patterns: Sequence[str], prefix: str
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Take the tensors of parameter targets out of a peft state dict.

    Returns ``(per_module, rest)``: module name -> ``{"lora_A.<p>"/"lora_B.<p>": tensor in peft's layout}`` for the
    modules holding parameters matched by ``patterns``, and the other keys untouched.

    Raises:
        ValueError: a module's keys nest deeper than it has targeted parameters.
    """
    owners = parameter_targets(modules, patterns) if patterns else {}
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        site = None
        for suffix in ("lora_A.weight", "lora_B.weight"):
            if key.startswith(prefix) and key.endswith("." + suffix):
                path = key[len(prefix) : -len(suffix) - 1]
                depth = 0
                while path.endswith(".base_layer"):
                    path, depth = path[: -len(".base_layer")], depth + 1
                if path in owners:
                    site, which = path, suffix.split(".")[0]
                break
        if site is None:
            rest[key] = value
            continue
        params = owners[site]
        if depth >= len(params):
            raise ValueError(
                f"{key!r} is nested {depth} deep, but {site!r} has {len(params)} targeted parameters ({params})"
            )
        per_module.setdefault(site, {})[f"{which}.{params[len(params) - 1 - depth]}"] = value
    return per_module, rest


def from_peft(comp: LoRAParameters, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft-layout tensors (from :func:`split_peft_state`) -> ``comp``'s state dict (shapes checked on import)."""
    out: dict[str, torch.Tensor] = {}
    for p in comp.names:
        A, B = state.get(f"lora_A.{p}"), state.get(f"lora_B.{p}")
        if A is None or B is None:
            raise ValueError(f"the file lacks lora_A or lora_B of parameter {p!r}")
        ours_A, ours_B = comp.lora_A[p], comp.lora_B[p]
        if ours_A.dim() == 3:
            experts, r, in_dim = ours_A.shape
            out_dim = ours_B.shape[1]
            if tuple(A.shape) != (experts * r, in_dim) or tuple(B.shape) != (out_dim, r * experts):
                raise ValueError(
                    f"parameter {p!r}: the file has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, expected "
                    f"{(experts * r, in_dim)} and {(out_dim, r * experts)} ({experts} experts, rank {r})"
                )
            A = A.reshape(experts, r, in_dim)
            B = B.reshape(out_dim, r, experts).permute(2, 0, 1)
        out[f"lora_A.{p}"], out[f"lora_B.{p}"] = A.contiguous(), B.contiguous()
    return out
