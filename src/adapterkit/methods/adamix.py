"""AdaMix: a mixture of adaptation modules per site, averaged into one adapter for inference (Wang et al. 2022,
"AdaMix: Mixture-of-Adaptations for Parameter-efficient Model Tuning", §3).

Every adapted site holds ``M = n_experts`` copies ("experts") of each projection of one adapter: bottleneck adapters
(``expert="bottleneck"`` or an :class:`~adapterkit.methods.bottleneck.Bottleneck` config: ``M`` down projections
``(W_down_i, b_down_i)`` and ``M`` up projections ``(W_up_i, b_up_i)``) or LoRA (``expert="lora"`` or a
:class:`~adapterkit.methods.lora.LoRA` config: ``M`` matrices ``A_i`` and ``M`` matrices ``B_i``)::

    training (stochastic routing, §3.1):  i, j ~ U{0..M-1}, drawn independently at every forward pass and site
        bottleneck:  h' = h + s · up_j(act(down_i(h)))          (the adapter's placement, norms and scaling as given)
        LoRA:        y  = W x + s · B_j A_i x
    inference (merging of adaptation modules, §3.3):  every projection's experts averaged,
        W̄ = (1/M) Σ_i W_i,  b̄ = (1/M) Σ_i b_i   (LoRA: Ā = (1/M) Σ_i A_i,  B̄ = (1/M) Σ_i B_i, so ΔW = s · B̄ Ā)

The draw of the down and the up expert are independent, as in the authors' code (``MixtureSoup`` in
``microsoft/AdaMix``: every projection draws its own expert with ``torch.randint`` on every training forward, one
expert for the whole batch). Draws use torch's RNG on the CPU, so activation checkpointing (which restores the RNG
state) recomputes the same routes. In eval mode nothing is random: the adapter is the averaged one, so it serves at
the cost of one adapter; :func:`collapse` turns it into that plain Bottleneck / LoRA adapter (saved, exported and
loaded as such), and a LoRA-expert AdaMix merges into the base weights (``adapters.merge``) as its averaged LoRA.

``share_up`` / ``share_down`` (the authors' "adaptation module sharing", §3.3; their GLUE scripts use
``sharing_up=1``): one up (down) projection for all experts (for LoRA: one ``B`` / one ``A``).

Consistency regularization (§3.2): the training loss adds the symmetric KL divergence between the model outputs of
two forward passes of the same batch, which take different random routes::

    L = CE(y, softmax(z_A)) + ½ (KL(p_B ‖ p_A) + KL(p_A ‖ p_B)),   p_X = softmax(z_X)

:func:`adamix_consistency_loss` computes the second term from the two passes' logits; the training loop runs the
two forwards (it is the *model output* that the term compares, which no component sees, so it cannot be an
``aux_loss()``); :func:`two_pass_loss` does both for one batch (a Trainer's ``compute_loss``). As in the authors' code each KL term treats the other pass's distribution as a constant
(``detach_targets=True``, their ``softmax(q.detach())``); the value is the symmetric KL either way.

Init: the experts are drawn independently (each as the plain adapter would be: the bottleneck's up projections
and LoRA's ``B`` zero, so the adapted model starts as the base model). The authors copy one initial expert ``M``
times (``copy.deepcopy``), and their up projection is not zero.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import backend_for
from ..component import Component
from ..config import AdapterConfig, register
from ..targeting import base_modules
from .bottleneck import Bottleneck, _BottleneckBase
from .lora import LoRA, LoRAInit

PUBLIC = ("AdaMix", "adamix_consistency_loss")
__all__ = [
    "AdaMix",
    "MixtureLinear",
    "AdaMixLoRALinear",
    "adamix_consistency_loss",
    "two_pass_loss",
    "collapse",
    "collapsed_state",
]

# the authors' bottleneck (microsoft/AdaMix, BertOutput): after the FFN's output projection, before the block's
# residual and LayerNorm, GELU, adapter size 48 for hidden size 768
DEFAULT_BOTTLENECK = Bottleneck(placement="pfeiffer", original_ln_before=False, non_linearity="gelu")


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _draw(n: int) -> int:
    """A uniform expert index in ``[0, n)`` from torch's (CPU) RNG; no draw for one expert."""
    return int(torch.randint(n, (1,)).item()) if n > 1 else 0


@register("adamix")
@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaMix(AdapterConfig):
    """A mixture of ``n_experts`` bottleneck or LoRA adapters per site: random routes in training, the experts'
    average at inference.

    Args:
        expert: the adapter each expert is: ``"bottleneck"`` (the authors' arrangement: FFN sub-layer output before
            the block's residual, GELU, reduction 16), ``"lora"`` (``ak.LoRA()``'s defaults), or a
            :class:`~adapterkit.methods.bottleneck.Bottleneck` / :class:`~adapterkit.methods.lora.LoRA` config.
            Its placement, sizes, norms, scaling and dropout apply; its ``targets``/``exclude``/``layers``/``heads``
            and ``init_weights`` must stay unset (give them to AdaMix). Not supported: Compacter (``phm_dim``), and
            for LoRA DoRA, bias deltas, PiSSA/OLoRA inits and ``target_parameters``; LoRA experts act on linear
            layers and GPT-2 ``Conv1D`` only.
        n_experts: ``M``, experts per projection (the paper uses 4; 1 is exactly the plain adapter).
        share_up: one up projection (LoRA: one ``B``) shared by the experts.
        share_down: one down projection (LoRA: one ``A``) shared by the experts.
        init_weights: True: the adapted model starts as the base model (zero up projections / ``B``); False: every
            expert random (for tests).
        targets: default: the expert's default targets.
    """

    expert: AdapterConfig = DEFAULT_BOTTLENECK
    n_experts: int = 4
    share_up: bool = False
    share_down: bool = False
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        expert = self.expert
        if isinstance(expert, str):
            key = expert.lower()
            if key not in ("bottleneck", "lora"):
                raise ValueError(
                    f"AdaMix expert={expert!r}: choose 'bottleneck', 'lora', or an ak.Bottleneck / ak.LoRA config"
                )
            expert = DEFAULT_BOTTLENECK if key == "bottleneck" else LoRA()
            object.__setattr__(self, "expert", expert)
        if not isinstance(expert, (Bottleneck, LoRA)):
            raise TypeError(
                f"AdaMix expert must be 'bottleneck', 'lora', an ak.Bottleneck or an ak.LoRA config, got "
                f"{type(expert).__name__}"
            )
        if not _positive_int(self.n_experts):
            raise ValueError(f"AdaMix n_experts must be a positive integer, got {self.n_experts!r}")
        if self.share_up and self.share_down:
            raise ValueError(
                "AdaMix with share_up=True and share_down=True has a single expert; use the plain adapter "
                "(ak.Bottleneck / ak.LoRA) or share only one projection"
            )
        placed = [f for f in ("targets", "exclude", "layers", "heads") if getattr(expert, f) not in (None, ())]
        if placed:
            raise ValueError(
                f"AdaMix: set {', '.join(placed)} on AdaMix, not on its expert config (the expert describes one "
                "adapter; where the mixture acts is AdaMix's)"
            )
        if not expert.init_weights:
            raise ValueError("AdaMix: set init_weights on AdaMix, not on its expert config")
        if isinstance(expert, Bottleneck) and expert.phm_dim is not None:
            raise ValueError("AdaMix does not mix Compacter (PHM) projections; use phm_dim=None in the expert")
        if isinstance(expert, LoRA):
            bad = [
                what
                for what, on in (
                    ("dora=True", expert.dora),
                    (f"bias={expert.bias.value!r}", expert.bias.value != "none"),
                    (f"init={expert.init.value!r}", expert.init in (LoRAInit.PISSA, LoRAInit.OLORA)),
                    ("target_parameters", bool(expert.target_parameters)),
                )
                if on
            ]
            if bad:
                raise ValueError(
                    f"AdaMix LoRA experts do not support {', '.join(bad)}; use a plain LoRA expert "
                    "(r, alpha, dropout, rslora, rank/alpha patterns, init 'default' or 'gaussian')"
                )

    # --- the method interface -------------------------------------------------------------
    @property
    def n_down(self) -> int:
        """Experts of the down projection (LoRA: of ``A``)."""
        return 1 if self.share_down else self.n_experts

    @property
    def n_up(self) -> int:
        """Experts of the up projection (LoRA: of ``B``)."""
        return 1 if self.share_up else self.n_experts

    def default_targets(self, roles: Mapping[str, Any]) -> Sequence[Any]:
        return self.expert.default_targets(roles)

    def accepts(self, module: nn.Module) -> bool:
        if isinstance(self.expert, LoRA):
            backend = backend_for(module)
            return backend is not None and backend.kind == "linear"
        return self.expert.accepts(module)

    def plain_config(self) -> AdapterConfig:
        """The plain adapter the mixture averages into: the expert config at AdaMix's sites."""
        return self.expert.replace(
            targets=self.targets, exclude=self.exclude, layers=self.layers, heads=self.heads, init_weights=True
        )

    def build(self, module: nn.Module, name: str) -> Component:
        if isinstance(self.expert, LoRA):
            if not self.accepts(module):
                raise TypeError(
                    f"AdaMix with LoRA experts cannot act on {name!r} ({type(module).__name__}): it supports "
                    "nn.Linear and Conv1D"
                )
            return AdaMixLoRALinear(self, module, name)
        raise TypeError("AdaMix with bottleneck experts builds all its sites at once (build_all)")

    def build_all(
        self, modules: Mapping[str, nn.Module], targets: list[str], select: Callable[[Sequence[Any]], list[str]]
    ) -> dict[str, Component]:
        """LoRA experts: one :class:`AdaMixLoRALinear` per target. Bottleneck experts: the expert's own components
        (placement, taps, norms, AdapterDrop), with each down/up projection replaced by a :class:`MixtureLinear`."""
        if isinstance(self.expert, LoRA):
            return {n: self.build(modules[n], n) for n in targets}
        comps = self.expert.replace(init_weights=self.init_weights).build_all(modules, targets, select)
        for comp in comps.values():
            if isinstance(comp, _BottleneckBase):
                comp.down = MixtureLinear.like(comp.down, self.n_down)
                comp.up = MixtureLinear.like(comp.up, self.n_up)
        return comps


class MixtureLinear(nn.Module):
    """``n_experts`` linear layers ``in -> out``: in training each call uses one expert drawn uniformly at random, in
    eval the experts' average (weights and biases averaged, then one ``F.linear``).

    Parameters (shaped so that ``nn.init`` treats them as one linear layer's, fan-in ``in``):
    ``weight: (n_experts·out, in)`` (expert ``i`` is rows ``i·out .. (i+1)·out``), ``bias: (n_experts·out,)``.
    ``x: (..., in)`` -> ``(..., out)``. ``last_expert``: the expert of the latest training call (None in eval).
    """

    def __init__(self, in_features: int, out_features: int, n_experts: int, factory: dict[str, Any]) -> None:
        super().__init__()
        self.in_features, self.out_features, self.n_experts = in_features, out_features, n_experts
        self.weight = nn.Parameter(torch.empty(n_experts * out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(n_experts * out_features, **factory))
        self.last_expert: int | None = None

    @classmethod
    def like(cls, linear: nn.Linear, n_experts: int) -> MixtureLinear:
        """A mixture with ``linear``'s sizes, device and dtype (values set by the component's ``initialize``)."""
        w = linear.weight
        return cls(linear.in_features, linear.out_features, n_experts, {"device": w.device, "dtype": w.dtype})

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, n_experts={self.n_experts}"

    def experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights ``(n_experts, out, in)`` and biases ``(n_experts, out)`` (views)."""
        n = self.n_experts
        return self.weight.view(n, self.out_features, self.in_features), self.bias.view(n, self.out_features)

    def averaged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged projection (AdaMix §3.3): ``(out, in)`` and ``(out,)``, the experts' means."""
        w, b = self.experts()
        return w.mean(dim=0), b.mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            i = _draw(self.n_experts)
            self.last_expert = i
            w, b = self.experts()
            return F.linear(x, w[i], b[i])
        self.last_expert = None
        return F.linear(x, *self.averaged())


class AdaMixLoRALinear(Component):
    """LoRA experts on a linear-like module: ``y + s · B_j A_i x`` in training (``i``, ``j`` random), ``y + s · B̄ Ā x``
    in eval.

    Shapes: ``x: (..., in)``, ``y: (..., out)``, ``lora_A: (n_down, r, in)``, ``lora_B: (n_up, out, r)``.
    ``last_route``: ``(i, j)`` of the latest training forward (None in eval). Mergeable (the averaged LoRA).
    """

    mergeable = True
    additive = True

    def __init__(self, cfg: AdaMix, module: nn.Module, name: str) -> None:
        super().__init__()
        expert: LoRA = cfg.expert  # type: ignore[assignment]
        in_dim, out_dim = backend_for(module).dims(module)
        weight = module.weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        self.r = expert.rank_for(name)
        self.scaling = expert.scaling_for(name)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.lora_A = nn.Parameter(torch.empty(cfg.n_down, self.r, in_dim, **factory))
        self.lora_B = nn.Parameter(torch.zeros(cfg.n_up, out_dim, self.r, **factory))
        self.dropout = nn.Dropout(expert.dropout) if expert.dropout > 0 else None
        self._gaussian = expert.init is LoRAInit.GAUSSIAN
        self._random = not cfg.init_weights
        self.last_route: tuple[int, int] | None = None

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, experts A={self.lora_A.shape[0]}, B={self.lora_B.shape[0]}"

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        """Each ``A_i`` as LoRA's ``A`` (Kaiming-uniform, or N(0, 1/r²) with ``init="gaussian"``), ``B = 0``
        (``init_weights=False``: ``B ~ N(0, 0.1²)``)."""
        for i in range(self.lora_A.shape[0]):
            if self._gaussian:
                nn.init.normal_(self.lora_A[i], std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A[i], a=math.sqrt(5))
        if self._random:
            nn.init.normal_(self.lora_B, std=0.1)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` for this forward: random experts in training (recorded in ``last_route``), else the means."""
        if self.training:
            i, j = _draw(self.lora_A.shape[0]), _draw(self.lora_B.shape[0])
            self.last_route = (i, j)
            return self.lora_A[i], self.lora_B[j]
        self.last_route = None
        return self.averaged()

    def averaged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``Ā: (r, in)``, ``B̄: (out, r)``: the merged LoRA."""
        return self.lora_A.mean(dim=0), self.lora_B.mean(dim=0)

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        A, B = self.factors()
        xd = x if self.dropout is None else self.dropout(x)
        xd = xd if xd.dtype == A.dtype else xd.to(A.dtype)
        return y + (F.linear(F.linear(xd, A), B) * self.scaling).to(y.dtype)

    def delta_weight(self, module: nn.Module) -> torch.Tensor:
        A, B = self.averaged()
        return (B.detach() @ A.detach()) * self.scaling


# --- training: the consistency loss ----------------------------------------------------------------------------
def adamix_consistency_loss(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    detach_targets: bool = True,
) -> torch.Tensor:
    """AdaMix's consistency regularizer (§3.2): ``½ (KL(p_B ‖ p_A) + KL(p_A ‖ p_B))`` with ``p = softmax(logits)``
    over the last dimension, averaged over positions (rows of a classifier, tokens of a language model), in float32.

    Run the same batch through the model twice in training mode (each pass draws its own routes) and add this to
    the task loss of the first pass::

        out_a, out_b = model(**batch), model(**batch)
        loss = out_a.loss + ak.adamix_consistency_loss(out_a.logits, out_b.logits, batch.get("attention_mask"))

    Args:
        logits_a, logits_b: ``(..., classes)`` outputs of the two passes (same shape).
        mask: optional ``(...)`` (the logits' shape without the last dimension); positions where it is 0/False do
            not count (e.g. padding tokens).
        detach_targets: each KL term treats the other pass's distribution as a constant (the authors' code); False
            differentiates through both.

    Returns:
        A 0-dim float32 tensor (0 when no position counts).
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(
            f"the two passes' logits must have one shape, got {tuple(logits_a.shape)} and {tuple(logits_b.shape)}"
        )
    if logits_a.dim() == 0:
        raise ValueError("logits need a class dimension (the last one)")
    classes = logits_a.shape[-1]
    a = logits_a.float().reshape(-1, classes)
    b = logits_b.float().reshape(-1, classes)
    if mask is not None:
        if tuple(mask.shape) != tuple(logits_a.shape[:-1]):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} must be the logits' shape without the class dimension, "
                f"{tuple(logits_a.shape[:-1])}"
            )
        keep = mask.reshape(-1).to(device=a.device) != 0
        a, b = a[keep], b[keep]
    if a.shape[0] == 0:
        return a.sum() * 0.0
    log_a, log_b = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
    target_a, target_b = (log_a.detach(), log_b.detach()) if detach_targets else (log_a, log_b)
    kl_b_a = (target_b.exp() * (target_b - log_a)).sum(dim=-1)  # KL(p_B ‖ p_A)
    kl_a_b = (target_a.exp() * (target_a - log_b)).sum(dim=-1)  # KL(p_A ‖ p_B)
    return 0.5 * (kl_b_a + kl_a_b).mean()


def two_pass_loss(
    model: nn.Module, inputs: Mapping[str, Any], *, mask: torch.Tensor | None = None, weight: float = 1.0
) -> tuple[torch.Tensor, Any]:
    """AdaMix's training loss for one batch (§3.2): two forwards of ``inputs`` (the model in training mode, so
    each draws its own routes), the first pass's task loss plus ``weight`` times :func:`adamix_consistency_loss` of
    the two passes' ``logits``. ``inputs`` must make the model return a loss (e.g. carry ``labels``).

    For the transformers ``Trainer``::

        class AdaMixTrainer(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
                loss, out = two_pass_loss(model, inputs)
                return (loss, out) if return_outputs else loss

    Returns:
        ``(loss, outputs of the first pass)``.
    """
    out_a = model(**inputs)
    out_b = model(**inputs)
    if getattr(out_a, "loss", None) is None:
        raise ValueError(
            "the model returned no loss: give it labels (two_pass_loss adds the consistency term to it)"
        )
    return out_a.loss + weight * adamix_consistency_loss(out_a.logits, out_b.logits, mask), out_a


# --- inference: one adapter ------------------------------------------------------------------------------------
@torch.no_grad()
def collapsed_state(component: Component) -> dict[str, torch.Tensor]:
    """The tensors of the plain adapter's component at one site: every mixture replaced by its experts' mean
    (AdaMix LoRA: ``lora_A: (r, in)``, ``lora_B: (out, r)``; bottleneck: ``down``/``up`` weights and biases; other
    tensors, such as norms, learned scaling and heads, as they are)."""
    if isinstance(component, AdaMixLoRALinear):
        A, B = component.averaged()
        return {"lora_A": A.clone(), "lora_B": B.clone()}
    state = {k: v.clone() for k, v in component.export_state().items()}
    for prefix, mod in component.named_modules():
        if isinstance(mod, MixtureLinear):
            w, b = mod.averaged()
            key = f"{prefix}." if prefix else ""
            state[f"{key}weight"], state[f"{key}bias"] = w.clone(), b.clone()
    return state


def collapse(adapters: Any, name: str, into: str | None = None) -> str:
    """Replace AdaMix adapter ``name`` by the plain adapter it computes in eval mode (AdaMix §3.3, "merging of
    adaptation modules"): a :class:`~adapterkit.methods.bottleneck.Bottleneck` or
    :class:`~adapterkit.methods.lora.LoRA` adapter (the expert config at the same sites) whose weights are the
    experts' means. It saves, exports and loads as that method.

    Args:
        adapters: the model's controller (``ak.attach(model)``).
        name: an AdaMix adapter.
        into: the new adapter's name; None: ``name`` itself (the AdaMix adapter is removed, and the plain one
            takes its place in the active set).

    Returns:
        The name of the plain adapter.

    Raises:
        TypeError: ``name`` is not an AdaMix adapter. ValueError: it is merged (unmerge it first) or ``into`` is taken.
    """
    cfg = adapters.config(name)
    if not isinstance(cfg, AdaMix):
        raise TypeError(
            f"adapter {name!r} is {type(cfg).__name__}, not AdaMix; collapse() averages AdaMix experts"
        )
    if adapters.is_merged(name):
        raise ValueError(f"adapter {name!r} is merged; unmerge it before collapsing it")
    target = name if into is None else into
    if target != name and target in adapters:
        raise ValueError(f"an adapter named {target!r} already exists; pick another name for into=")
    comps = adapters.components(name)
    states = {site: collapsed_state(comp) for site, comp in comps.items()}
    plan = adapters.plan(cfg.plain_config())
    if set(plan.components) != set(comps):
        raise RuntimeError(
            f"the plain adapter of {name!r} would sit at other modules than the mixture "
            f"({sorted(set(plan.components) ^ set(comps))[:5]}); report this"
        )
    modules = base_modules(adapters.model)
    for site, (_, comp) in plan.components.items():  # everything checked before the model changes
        comp.initialize(modules[site])
        comp.import_state(states[site], modules[site])
    active = adapters.active
    if target == name:
        adapters.delete(name)
    adapters.install(target, plan)
    if target == name and name in active:
        adapters.activate(*active)
    return target
