"""Weight-space merging: new adapters made from existing ones (``Adapters.combine``).

Two layers:

* **Pure tensor functions** on task vectors ``τ_i`` (lists of same-shape tensors) and LoRA factors, testable
  without a model: :func:`linear`, :func:`task_arithmetic`, :func:`negate`, :func:`magnitude_prune`,
  :func:`ties`, :func:`dare_linear`, :func:`dare_ties`, :func:`svd`, :func:`cat`, :func:`soup`, and
  :func:`metric_weights` (MWA). ``ties``/``dare_*``/``magnitude_prune`` follow peft's ``merge_utils``
  step for step, so the same inputs give the same numbers.
* :func:`combine_adapters` (behind :meth:`Adapters.combine`): reads the components of existing adapters,
  combines their tensors and installs the result as a new adapter, all-or-nothing.

Methods (``method=``); ``w_i`` are the weights, ``s_i`` LoRA scalings, ``Δ_i = s_i B_i A_i``:

=====================  ===========================================================================  =========
method                 LoRA adapters (``ak.LoRA``): the new adapter has scaling 1                  peft name
=====================  ===========================================================================  =========
``linear``             ``A = Σ sgn(w_i s_i) √|w_i s_i| A_i``, ``B = Σ √|w_i s_i| B_i`` (same ranks)  linear
``cat``                ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]``: ``Σ w_i Δ_i``  cat
``task_arithmetic``    exactly ``Σ w_i Δ_i`` (the same factors as ``cat``; Ilharco et al. 2023)       (cat)
``svd``                best rank-``r`` factorization of ``Σ w_i Δ_i`` (truncated SVD)               svd
``ties``/``dare_*``/   the pure function applied to the A's and to the B's separately with the       same
``magnitude_prune``    ``√`` weights of ``linear`` (same ranks)
``<those>_svd``        the pure function applied to the ``Δ_i``, then truncated SVD                  same
``soup``               uniform average of every tensor (AdapterSoup; same config and ranks)          —
=====================  ===========================================================================  =========

Other adapters (any method whose components have same-named, same-shaped tensors at the same sites,
e.g. (IA)^3 vectors, bottleneck weights, prompts) combine parameter-wise. With ``θ_0`` the value a
tensor has at the method's identity initialization (see :func:`_identity_states`; zero where that
initialization is random):

* ``linear``: ``θ = Σ w_i θ_i`` (peft's (IA)^3 ``add_weighted_adapter``); ``soup``: ``θ = mean_i θ_i``;
* ``task_arithmetic``: ``θ = θ_0 + Σ w_i (θ_i - θ_0)``, so weight ``-1`` negates a task vector: for
  (IA)^3 ``l' = 1 - (l - 1)`` (Zhang et al. 2023, "Composing Parameter-Efficient Modules with
  Arithmetic Operations", §3), and ``combine(n, [a, a], [1, -1])`` is the identity;
* ``ties``/``dare_linear``/``dare_ties``/``magnitude_prune``: ``θ = θ_0 + f(τ_1, ..., τ_n)``, ``τ_i = θ_i - θ_0``.

Tensors of a LoRA adapter that are not factors (bias deltas, ``bias="all"`` extras, head copies) take
the parameter-wise rule of the method (``cat``/``svd`` use ``task_arithmetic`` for them; ``*_svd`` its
non-SVD counterpart). See docs/merging.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from .component import Component
from .config import AdapterConfig
from .methods.lora import LoRA, LoRAInit
from .targeting import base_modules

__all__ = [
    "METHODS",
    "LORA_METHODS",
    "PARAMETER_METHODS",
    "check_density",
    "linear",
    "task_arithmetic",
    "negate",
    "negate_lora",
    "trim",
    "random_drop",
    "elect_sign",
    "disjoint_mean",
    "magnitude_prune",
    "ties",
    "dare_linear",
    "dare_ties",
    "lora_delta",
    "svd",
    "svd_factorize",
    "cat",
    "soup",
    "metric_weights",
    "combine_adapters",
]

SignMethod = Literal["total", "frequency"]

_SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # on A and B separately
_DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
LORA_METHODS = ("linear", "cat", "task_arithmetic", "soup", *_FACTOR_METHODS[1:], *_SVD_METHODS)
PARAMETER_METHODS = ("linear", "task_arithmetic", "soup", *_DENSITY_METHODS)
METHODS = LORA_METHODS


# --- validation -----------------------------------------------------------------------------------
def check_density(density: float | None, method: str = "") -> float:
    """``density`` as a float in (0, 1]; raises ValueError naming the method otherwise."""
    for_method = f" for method {method!r}" if method else ""
    if density is None:
        raise ValueError(f"density is required{for_method}: the fraction of values to keep, in (0, 1]")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1] (the fraction of values kept), got {density!r}{for_method}")
    return float(density)


def _weights_tensor(weights: Sequence[float] | torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float32).to(like.device)
    if w.dim() != 1 or w.numel() != n:
        raise ValueError(f"got {w.numel()} weights for {n} tensors; pass one weight per tensor")
    return w


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        raise ValueError("nothing to merge: the list of tensors is empty")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"tensors to merge must have one shape, got {sorted(shapes)}")
    return torch.stack(list(tensors), dim=0)


def _weighted(stacked: torch.Tensor, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``w_i * t_i`` for a stack ``(n, ...)`` and ``n`` weights."""
    w = _weights_tensor(weights, stacked.shape[0], stacked)
    return stacked * w.view(-1, *([1] * (stacked.dim() - 1))).to(stacked.dtype)


# --- task arithmetic ------------------------------------------------------------------------------
def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Weighted sum ``Σ_i w_i t_i`` of same-shape tensors."""
    return _weighted(_stack(tensors), weights).sum(dim=0)


def task_arithmetic(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic", §2):
    ``θ_0 + Σ_i w_i (θ_i - θ_0)``. ``reference`` is ``θ_0`` (None: zero, then this is :func:`linear`).
    Negative weights subtract a task vector ("forgetting via negation", §3)."""
    if reference is None:
        return linear(tensors, weights)
    return reference + linear([t - reference for t in tensors], weights)


def negate(tensor: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """The negated task vector applied to ``θ_0``: ``θ_0 - (θ - θ_0)``. With ``θ_0 = 1`` this is (IA)^3
    negation ``1 - (l - 1)`` (Zhang et al. 2023, §3); with ``θ_0 = 0`` plain ``-θ``."""
    return -tensor if reference is None else 2 * reference - tensor


def negate_lora(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA negation (Zhang et al. 2023, §3): negate B only, so ``ΔW = B A`` becomes ``-ΔW``."""
    return A, -B


def soup(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """AdapterSoup (Chronopoulou et al. 2023, §2.2): the uniform average ``(1/n) Σ_i θ_i``."""
    return _stack(tensors).mean(dim=0)


# --- trimming, dropping, sign election ---------------------------------------------------------------
def trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest (TIES §3 "Trim").
    ``density >= 1`` keeps everything."""
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    mask = torch.zeros_like(tensor).reshape(-1)
    mask[torch.topk(tensor.abs().reshape(-1), k=k, largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def random_drop(
    tensor: torch.Tensor, density: float, *, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE's drop (Yu et al. 2023, §3): keep each entry with probability ``density`` (drop with ``p = 1 -
    density``) and divide the kept ones by ``density`` (``1 / (1 - p)``), so the expectation is unchanged.
    Deterministic for a seeded ``generator`` (None: torch's global generator). ``density >= 1`` keeps
    everything and draws nothing."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    kept = tensor * mask
    return kept / density if rescale else kept


def elect_sign(stacked: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """TIES §3 "Elect": the mask of entries whose sign agrees with the elected sign, for a stack ``(n, ...)``.
    ``"total"`` elects the sign of ``Σ_i τ_i`` (the paper's total mass), ``"frequency"`` the sign held by
    most tasks; ties (a zero sum) elect ``+``. Zero entries never agree."""
    sign = stacked.sign()
    if method == "total":
        mass = stacked.sum(dim=0)
    elif method == "frequency":
        mass = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    return sign == torch.where(mass >= 0, 1, -1)


def disjoint_mean(stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TIES §3 "Disjoint merge": per entry, the mean over the tasks in ``mask`` (0 where none is)."""
    return (stacked * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1.0)


def magnitude_prune(
    tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor, density: float
) -> torch.Tensor:
    """Trim each task vector to its top-``density`` magnitudes (:func:`trim`), then ``Σ_i w_i τ_i``."""
    density = check_density(density, "magnitude_prune")
    return linear([trim(t, density) for t in tensors], weights)


def ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    density: float,
    majority_sign_method: SignMethod = "total",
) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, §3): trim each ``τ_i`` to density ``k`` by magnitude, elect the sign
    per entry from the trimmed (unweighted) vectors, then average the weighted entries ``w_i τ_i`` that
    agree with it (disjoint mean). As in peft, weights enter before the disjoint mean (the paper applies
    one λ after it; for equal weights these agree)."""
    density = check_density(density, "ties")
    stacked = _stack([trim(t, density) for t in tensors])
    mask = elect_sign(stacked, majority_sign_method)
    return disjoint_mean(_weighted(stacked, weights), mask)


def dare_linear(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    density: float,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE (Yu et al. 2023, §3) then task arithmetic: ``Σ_i w_i drop(τ_i)`` (:func:`random_drop`)."""
    density = check_density(density, "dare_linear")
    return linear([random_drop(t, density, generator=generator) for t in tensors], weights)


def dare_ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    density: float,
    majority_sign_method: SignMethod = "total",
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE's random drop and rescale instead of TIES' trim, then TIES' sign election and disjoint mean."""
    density = check_density(density, "dare_ties")
    stacked = _stack([random_drop(t, density, generator=generator) for t in tensors])
    mask = elect_sign(stacked, majority_sign_method)
    return disjoint_mean(_weighted(stacked, weights), mask)


# --- LoRA factors ---------------------------------------------------------------------------------
def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """``s · B A`` in factor layout: ``A: (r, *in)`` (``in`` = features, embeddings, or ``in×kh×kw`` for a conv),
    ``B: (out, r, 1, ...)``; returns ``(out, prod(in))``."""
    r = A.shape[0]
    return (B.reshape(B.shape[0], r) @ A.reshape(r, -1)) * scaling


def svd_factorize(
    delta: torch.Tensor,
    r: int,
    *,
    clamp: float | None = None,
    full_matrices: bool = True,
    driver: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``r`` factors of ``delta: (out, in)`` from its truncated SVD: ``A = V_r^T: (r, in)``,
    ``B = U_r diag(S_r): (out, r)``, so ``B A`` is the best rank-``r`` approximation (Eckart-Young) and
    exact when ``r >= rank(delta)``. ``clamp`` (a quantile in (0, 1]) clips the entries of ``A`` and ``B`` to
    ``±quantile(|entries|)`` as peft's ``svd_clamp`` does (kohya-ss' svd_merge_lora). Rows beyond
    ``min(out, in)`` are zero. ``full_matrices``/``driver`` are passed to ``torch.linalg.svd``."""
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"the SVD rank r must be a positive integer, got {r!r}")
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(r, S.shape[0])
    B = U[:, :k] @ torch.diag(S[:k])
    A = Vh[:k, :]
    if clamp is not None:
        if not 0.0 < clamp <= 1.0:
            raise ValueError(f"svd_clamp is a quantile in (0, 1], got {clamp!r}")
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    if k < r:
        A = torch.cat([A, A.new_zeros(r - k, A.shape[1])], dim=0)
        B = torch.cat([B, B.new_zeros(B.shape[0], r - k)], dim=1)
    return A, B


def svd(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    r: int,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the dense deltas (``Σ_i w_i Δ_i``, each ``(out, in)``) and re-factorize to rank ``r``
    (:func:`svd_factorize`; ``options``: ``clamp``, ``full_matrices``, ``driver``)."""
    return svd_factorize(linear(deltas, weights), r, **options)


def cat(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    weights: Sequence[float] | torch.Tensor,
    scalings: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate LoRA factors: ``A = [w_1 s_1 A_1; ...]`` (rank dim 0), ``B = [B_1, ...]`` (rank dim 1), so
    ``B A = Σ_i w_i s_i B_i A_i`` exactly and the rank is ``Σ_i r_i`` (peft's ``cat``)."""
    scalings = [1.0] * len(factors) if scalings is None else list(scalings)
    ws = [float(w) for w in weights]
    if not (len(ws) == len(scalings) == len(factors)):
        raise ValueError(f"got {len(factors)} factor pairs, {len(ws)} weights and {len(scalings)} scalings")
    A = torch.cat([a * (w * s) for (a, _), w, s in zip(factors, ws, scalings)], dim=0)
    B = torch.cat([b for _, b in factors], dim=1)
    return A, B


# --- metrics-weighted averaging --------------------------------------------------------------------
def metric_weights(
    values: Sequence[float], penalty: float = 1.0, kind: Literal["loss", "step"] = "loss"
) -> list[float]:
    """Metrics-Weighted Averaging weights ("Parameter-Efficient Checkpoint Merging via Metrics-Weighted
    Averaging", arXiv:2504.18580, 2025): ``w_i = m_i^p / Σ_j m_j^p`` with penalty factor ``p >= 0``
    and ``m_i = 1 / loss_i`` (``kind="loss"``: lower loss, more weight) or ``m_i = step_i`` (``kind="step"``:
    later checkpoints, more weight). ``p = 0`` is the uniform average (AdapterSoup); larger ``p`` concentrates
    the weight on the best checkpoint. Pass the result as ``weights`` with ``method="linear"`` (or ``"soup"``
    semantics with non-uniform weights)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("metric_weights needs at least one value")
    if kind not in ("loss", "step"):
        raise ValueError(f"kind must be 'loss' or 'step', got {kind!r}")
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise ValueError(f"{kind} values must be positive and finite, got {vals}")
    if not (math.isfinite(penalty) and penalty >= 0):
        raise ValueError(f"penalty must be a finite number >= 0, got {penalty!r}")
    metrics = [1.0 / v if kind == "loss" else v for v in vals]
    # normalize in log space so that large p does not overflow
    logs = [penalty * math.log(m) for m in metrics]
    top = max(logs)
    raw = [math.exp(x - top) for x in logs]
    total = sum(raw)
    return [x / total for x in raw]


# --- adapters ---------------------------------------------------------------------------------------
class _Randomness:
    """One generator per device, seeded lazily (``seed=None``: torch's global generator)."""

    def __init__(self, seed: int | torch.Generator | None) -> None:
        self.seed = seed
        self._gens: dict[torch.device, torch.Generator] = {}

    def on(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if isinstance(self.seed, torch.Generator):
            return self.seed
        if device not in self._gens:
            self._gens[device] = torch.Generator(device=device).manual_seed(int(self.seed))
        return self._gens[device]


@dataclasses.dataclass
class _Options:
    method: str
    weights: list[float]
    density: float | None
    majority_sign_method: SignMethod
    rand: _Randomness
    svd: dict[str, Any]


def _merge(method: str, tensors: list[torch.Tensor], weights: list[float], opt: _Options) -> torch.Tensor:
    """Apply a task-vector method (linear/task_arithmetic/ties/dare/magnitude_prune) to float tensors."""
    if method in ("linear", "task_arithmetic"):
        return linear(tensors, weights)
    if method == "magnitude_prune":
        return magnitude_prune(tensors, weights, opt.density)
    if method == "ties":
        return ties(tensors, weights, opt.density, opt.majority_sign_method)
    gen = opt.rand.on(tensors[0].device)
    if method == "dare_linear":
        return dare_linear(tensors, weights, opt.density, generator=gen)
    if method == "dare_ties":
        return dare_ties(tensors, weights, opt.density, opt.majority_sign_method, generator=gen)
    raise AssertionError(method)


def _parameter_method(method: str) -> str:
    """The parameter-wise rule used for tensors that are not LoRA factors."""
    if method in ("svd", "cat"):
        return "task_arithmetic"
    return method.removesuffix("_svd")


def _combine_parameter(
    tensors: list[torch.Tensor], reference: torch.Tensor | None, method: str, opt: _Options, what: str
) -> torch.Tensor:
    """One tensor of the new adapter from the same tensor of each adapter (module docstring rules)."""
    first = tensors[0]
    if not first.is_floating_point():
        if any(not torch.equal(t, first) for t in tensors[1:]):
            raise ValueError(
                f"{what} is a non-float tensor that differs between the adapters; it cannot be merged"
            )
        return first.clone()
    fs = [t.detach().float() for t in tensors]
    if method == "soup":
        out = soup(fs)
    elif method == "linear":
        out = linear(fs, opt.weights)
    else:
        ref = torch.zeros_like(fs[0]) if reference is None else reference.detach().float()
        out = ref + _merge(method, [t - ref for t in fs], opt.weights, opt)
    return out.to(first.dtype)


def _identity_config(cfg: AdapterConfig) -> AdapterConfig:
    """``cfg`` with ``init_weights=True``, recursively through member configs (unions)."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    changes: dict[str, Any] = {}
    if "init_weights" in fields:
        changes["init_weights"] = True
    if "configs" in fields:
        changes["configs"] = tuple(_identity_config(c) for c in cfg.configs)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _identity_states(ctl: Any, cfg: AdapterConfig, sites: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``θ_0`` per site and tensor: the values of a fresh identity-initialized adapter. The config is planned
    and initialized twice under different seeds (the global RNG is restored afterwards): tensors that come
    out equal are deterministic (ones for (IA)^3, zeros, copies or functions of base weights) and are the
    reference; tensors that differ are random draws with no canonical origin and get ``θ_0 = 0``."""
    cfg0 = _identity_config(cfg)
    modules = base_modules(ctl.model)
    cuda = sorted({p.device.index or 0 for p in ctl.model.parameters() if p.device.type == "cuda"})
    runs = []
    for seed in (0, 1):
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            plan = ctl.plan(cfg0)
            states = {}
            for site in sites:
                comp = plan.components[site][1]
                comp.initialize(modules[site])
                states[site] = comp.export_state()
        runs.append(states)
    return {
        s: {k: v if torch.equal(v, runs[1][s][k]) else torch.zeros_like(v) for k, v in runs[0][s].items()}
        for s in sites
    }


def _check_inputs(
    ctl: Any,
    new_name: str,
    names: Sequence[str],
    weights: Sequence[float] | None,
    method: str,
    density: float | None,
    r: int | None,
) -> list[float]:
    ctl._check_new_name(new_name)
    if isinstance(names, str) or not names:
        raise ValueError(f"names must be a non-empty list of adapter names, got {names!r}")
    for n in names:
        ctl._record(n)
    if method not in LORA_METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of: {', '.join(LORA_METHODS)}")
    if method == "soup":
        if weights is not None:
            raise ValueError("method 'soup' averages uniformly; drop `weights` or use method='linear' with them")
        weights = [1.0 / len(names)] * len(names)
    elif weights is None:
        weights = [1.0] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"got {len(weights)} weights for {len(names)} adapters; pass one weight per adapter")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights!r}")
    base = method.removesuffix("_svd")
    if base in _DENSITY_METHODS:
        check_density(density, method)
    elif density is not None:
        raise ValueError(f"density applies to the ties/dare/magnitude_prune methods, not to {method!r}")
    if r is not None and method not in _SVD_METHODS:
        raise ValueError(
            f"r (the SVD rank) applies to the *svd methods ({', '.join(_SVD_METHODS)}), not {method!r}"
        )
    if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r <= 0):
        raise ValueError(f"r must be a positive integer, got {r!r}")
    return [float(w) for w in weights]


def combine_adapters(
    ctl: Any,
    new_name: str,
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    method: str = "linear",
    *,
    density: float | None = None,
    r: int | None = None,
    seed: int | torch.Generator | None = None,
    majority_sign_method: SignMethod = "total",
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
) -> None:
    """Create adapter ``new_name`` from adapters ``names`` (see :meth:`Adapters.combine`)."""
    weights = _check_inputs(ctl, new_name, names, weights, method, density, r)
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    opt = _Options(
        method,
        weights,
        density,
        majority_sign_method,
        _Randomness(seed),
        {"clamp": svd_clamp, "full_matrices": svd_full_matrices, "driver": svd_driver},
    )
    configs = [ctl.config(n) for n in names]
    if method != "soup" and all(isinstance(c, LoRA) for c in configs):
        plan = _combine_lora(ctl, list(names), configs, opt, r)
    else:
        if method not in PARAMETER_METHODS:
            kinds = sorted({type(c).__name__ for c in configs if not isinstance(c, LoRA)})
            raise ValueError(
                f"method {method!r} re-factorizes LoRA matrices, but {kinds} adapters have none; use one of "
                f"{', '.join(PARAMETER_METHODS)}"
            )
        plan = _combine_parameters(ctl, list(names), configs, opt)
    ctl.install(new_name, plan)


def _fill(plan: Any, states: dict[str, dict[str, torch.Tensor]], modules: dict[str, nn.Module]) -> None:
    for site, (_, comp) in plan.components.items():
        comp.import_state(states[site], modules[site])


# --- parameter-wise (any method) -------------------------------------------------------------------
_TRAINING_ONLY_FIELDS = ("init_weights", "dropout")


def _config_difference(a: AdapterConfig, b: AdapterConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [k for k in da if k not in _TRAINING_ONLY_FIELDS and da.get(k) != db.get(k)]


def _combine_parameters(ctl: Any, names: list[str], configs: list[AdapterConfig], opt: _Options) -> Any:
    first = configs[0]
    for n, c in zip(names[1:], configs[1:]):
        if type(c) is not type(first):
            raise ValueError(
                f"cannot merge {type(first).__name__} adapter {names[0]!r} with {type(c).__name__} adapter {n!r}: "
                "parameter-wise merging needs adapters of one method and configuration"
            )
        diff = _config_difference(first, c)
        if diff:
            raise ValueError(
                f"adapters {names[0]!r} and {n!r} differ in {diff}; parameter-wise merging ({opt.method!r}) needs "
                "one configuration (same sites and shapes)"
            )
        if ctl.sites(n) != ctl.sites(names[0]):
            raise ValueError(f"adapters {names[0]!r} and {n!r} act on different modules; they cannot be merged")
    plan = ctl.plan(first)
    if {m: k for m, (k, _) in plan.components.items()} != ctl.sites(names[0]):
        raise ValueError(f"the config of {names[0]!r} resolves to other sites now than when it was added")
    comps = [ctl.components(n) for n in names]
    refs = _identity_states(ctl, first, list(plan.components)) if opt.method not in ("linear", "soup") else {}
    states = {}
    for site in plan.components:
        per = [c[site].export_state() for c in comps]
        states[site] = _combine_state(per, refs.get(site), opt.method, opt, f"{site!r} of {names}")
    _fill(plan, states, base_modules(ctl.model))
    return plan


def _combine_state(
    per: list[dict[str, torch.Tensor]],
    refs: dict[str, torch.Tensor] | None,
    method: str,
    opt: _Options,
    what: str,
) -> dict[str, torch.Tensor]:
    keys = list(per[0])
    for st in per[1:]:
        if list(st) != keys or any(st[k].shape != per[0][k].shape for k in keys):
            raise ValueError(f"the adapters' tensors at {what} differ in names or shapes; they cannot be merged")
    return {
        k: _combine_parameter(
            [st[k] for st in per], None if refs is None else refs.get(k), method, opt, f"{k} at {what}"
        )
        for k in keys
    }


# --- LoRA ---------------------------------------------------------------------------------------------
_FACTORS = ("lora_A", "lora_B")


def _lora_rank(cfg: LoRA) -> int:
    """peft's rank of an adapter config: ``r``, or the largest rank in ``rank_pattern``."""
    return max(cfg.r, *cfg.rank_pattern.values()) if cfg.rank_pattern else cfg.r


def _check_lora(names: list[str], configs: list[LoRA]) -> None:
    for n, c in zip(names, configs):
        if c.dora:
            raise ValueError(
                f"adapter {n!r} is DoRA: its magnitude vectors have no weight-space sum; merge DoRA adapters into "
                "the base (adapters.merge) or combine plain LoRA adapters"
            )
        if c.init not in (LoRAInit.DEFAULT, LoRAInit.GAUSSIAN):
            raise ValueError(
                f"adapter {n!r} uses init={c.init.value!r}, which moved part of the base weight into it; export it "
                "with format='peft' and load it back (a plain LoRA on the original weights), then combine that"
            )
        if c.bias is not configs[0].bias:
            raise ValueError(
                f"adapters {names[0]!r} and {n!r} have bias={configs[0].bias.value!r} and {c.bias.value!r}; "
                "combine adapters with one bias setting"
            )


def _combine_lora(ctl: Any, names: list[str], configs: list[LoRA], opt: _Options, r: int | None) -> Any:
    """Reproduces peft's ``LoraModel.add_weighted_adapter`` (0.21): the new adapter has ``alpha = r``
    (scaling 1), targets the union of the adapters' targets, and at each site combines the adapters
    present there (peft skips the others)."""
    _check_lora(names, configs)
    method = opt.method
    ranks = [_lora_rank(c) for c in configs]
    if method in _FACTOR_METHODS:
        if len(set(ranks)) != 1:
            raise ValueError(
                f"method {method!r} combines A and B matrices entry by entry, so every adapter needs one rank; got "
                f"{dict(zip(names, ranks))}: use 'cat', 'task_arithmetic' or 'svd'"
            )
        new_rank = ranks[0]
    elif method in ("cat", "task_arithmetic"):
        new_rank = sum(ranks)
    else:
        new_rank = r or max(ranks)

    kinds = [ctl.sites(n) for n in names]
    modules = base_modules(ctl.model)
    targets = [m for m in modules if any(k.get(m) == "target" for k in kinds)]
    cfg = configs[0].replace(
        r=new_rank,
        alpha=float(new_rank),
        rslora=False,
        rank_pattern={},
        alpha_pattern={},
        targets=tuple(targets),
        exclude=(),
        layers=None,
        init_weights=True,
    )
    plan = ctl.plan(cfg)
    planned = [m for m, (k, _) in plan.components.items() if k == "target"]
    if planned != targets:
        raise ValueError(f"the combined targets resolve to {planned[:3]}... instead of {targets[:3]}...")
    comps = [ctl.components(n) for n in names]
    refs: dict[str, dict[str, torch.Tensor]] | None = None
    states: dict[str, dict[str, torch.Tensor]] = {}
    for site, (kind, new) in plan.components.items():
        if kind == "target":
            states[site] = _combine_lora_site(site, new, names, kinds, comps, opt)
            continue
        missing = [n for n, k in zip(names, kinds) if k.get(site) != kind]
        if missing:
            raise ValueError(
                f"the combined adapter has a {kind} at {site!r} but {missing} have none there; combine adapters "
                "with the same heads and bias settings"
            )
        pmethod = _parameter_method(method)
        if refs is None and pmethod not in ("linear", "soup"):
            refs = _identity_states(ctl, cfg, [s for s, (k, _) in plan.components.items() if k != "target"])
        per = [c[site].export_state() for c in comps]
        states[site] = _combine_state(per, None if refs is None else refs[site], pmethod, opt, repr(site))
    _fill(plan, states, modules)
    return plan


def _combine_lora_site(
    site: str,
    new: Component,
    names: list[str],
    kinds: list[dict[str, str]],
    comps: list[dict[str, Component]],
    opt: _Options,
) -> dict[str, torch.Tensor]:
    """``lora_A``/``lora_B`` (and a bias delta) of the new component at one site, zero-padded to its rank."""
    idx = [i for i, k in enumerate(kinds) if k.get(site) == "target"]
    present = [comps[i][site] for i in idx]
    weights = [opt.weights[i] for i in idx]
    for n, c in zip([names[i] for i in idx], present):
        extra = sorted(set(c.export_state()) - {*_FACTORS, "bias"})
        if extra:
            raise ValueError(f"adapter {n!r} holds {extra} at {site!r}; only plain LoRA factors can be combined")
    As = [c.lora_A.detach().float() for c in present]
    Bs = [c.lora_B.detach().float() for c in present]
    scalings = [float(c.scaling) for c in present]
    method = opt.method
    if method in ("cat", "task_arithmetic"):
        A, B = cat(list(zip(As, Bs)), weights, scalings)
    elif method in _SVD_METHODS:
        deltas = [lora_delta(a, b, s) for a, b, s in zip(As, Bs, scalings)]
        if method == "svd":
            delta = linear(deltas, weights)
        else:
            delta = _merge(method.removesuffix("_svd"), deltas, weights, opt)
        A2, B2 = svd_factorize(delta, new.lora_A.shape[0], **opt.svd)
        A = A2.reshape(A2.shape[0], *As[0].shape[1:])
        B = B2.reshape(B2.shape[0], B2.shape[1], *Bs[0].shape[2:])
    else:
        if len({a.shape for a in As}) != 1 or len({b.shape for b in Bs}) != 1:
            ranks = [a.shape[0] for a in As]
            raise ValueError(f"method {method!r} needs one rank per site; at {site!r} the ranks are {ranks}")
        ws = [w * s for w, s in zip(weights, scalings)]
        wA = [math.copysign(math.sqrt(abs(w)), w) if w != 0 else 0.0 for w in ws]
        wB = [math.sqrt(abs(w)) for w in ws]
        A = _merge(method, As, wA, opt)
        B = _merge(method, Bs, wB, opt)
    state = {"lora_A": _pad_rank(A, new.lora_A, 0), "lora_B": _pad_rank(B, new.lora_B, 1)}
    if new.bias is not None:
        biases = [c.bias for c in present]
        state["bias"] = _combine_parameter(
            biases, None, _parameter_method(method), _bias_options(opt, idx), repr(site)
        )
    return state


def _bias_options(opt: _Options, idx: list[int]) -> _Options:
    return dataclasses.replace(opt, weights=[opt.weights[i] for i in idx])


def _pad_rank(value: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """``value`` zero-padded along the rank dimension ``dim`` to ``like``'s shape, in ``like``'s dtype."""
    missing = like.shape[dim] - value.shape[dim]
    if missing < 0:
        raise AssertionError(f"rank {value.shape[dim]} exceeds the planned rank {like.shape[dim]}")
    if missing:
        pad = list(value.shape)
        pad[dim] = missing
        value = torch.cat([value, value.new_zeros(pad)], dim=dim)
    return value.to(like.dtype)
