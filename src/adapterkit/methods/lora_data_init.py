"""Data-aware LoRA inits: EVA and CorDA, set from activations by ``adapters.calibrate(name, batches)``.

``ak.LoRA(init="eva")`` / ``ak.LoRA(init="corda")`` build :class:`LoRADataInit` components (linear-like modules
only). They start *uncalibrated*: any forward, merge or export before ``adapters.calibrate(name, batches)`` raises,
naming it. Calibration runs the batches through the base model (no adapter active); each component sees its
module's input (``Component.observe``) and then sets its factors (``Component.finish_calibration``).

EVA (Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation")
---------------------------------------------------------------------------------------------------------------
§3.1: ``A`` starts as the top right-singular vectors of each layer's input activations ``X: (tokens, in)``, found by
an incremental SVD (incremental PCA, Ross et al. 2008, as scikit-learn's ``IncrementalPCA``) updated batch by batch
until the components stop moving (cosine similarity of consecutive estimates ``>= tau`` for the components a layer
needs); ``B = 0``. §3.2: ranks are redistributed across layers: each layer computes up to ``round(rho * r)``
components, and the global budget ``sum(r)`` goes to the components with the largest explained-variance ratio, so a
layer may end with rank 0 (no adapter there) up to ``rho * r``. With ``adjust_scaling_factors`` alpha is scaled by
``new_r / r`` (so ``alpha / r`` stays). ``whiten`` divides each component by the square root of its singular value.

Equal to peft 0.21's ``init_lora_weights="eva"`` (``initialize_lora_eva_weights``): same incremental PCA (float32
inputs, float64 statistics, ``torch.svd_lowrank`` with ``q = 2 n``, 4 iterations, seed 42), the first batch used
to find layers with equal inputs (q/k/v: one SVD for the group), the same convergence bookkeeping (a layer stops
updating once the components its current rank needs converged, and resumes if its rank grows), the same rank
allocation (``argsort`` of the stacked explained-variance ratios). Token masks as peft's
``prepare_model_inputs_fn_language_modeling``: positions where ``attention_mask`` is 0 and, with
``use_label_mask``, where ``labels == label_mask_value`` are left out (read from the keyword inputs of each model
call; batches passed positionally use every token). Differences:

* peft cycles its dataloader until every layer converged; ``calibrate`` runs the batches it is given once. Pass
  enough (``itertools.islice(itertools.cycle(batches), n)`` repeats them exactly as peft does; batches after
  convergence are ignored, as peft stops there); if a layer has not converged when they run out, calibration
  raises naming the layers.
* ``whiten=True``: peft divides the shared components in place once per layer of an equal-input group (and the
  stored ``A`` of earlier layers are views of them), so layers sharing inputs get their components divided
  several times; here each layer's ``A`` is divided once, as the paper states.
* ``rho > 1000`` (peft caps it by the model's largest parameter dimension) is refused.
* Modules other than linear / GPT-2 ``Conv1D`` are refused (peft falls back to the default init there).

CorDA (Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models")
-----------------------------------------------------------------------------------------------------
§3.1: the covariance ``C = mean_samples(X^T X)`` of each layer's inputs (each sample divided by its largest value)
orients the SVD of the weight: ``W C = U S V^T``, so ``W = U S (V^T C^-1)``. The IPM (instruction-previewed mode)
adapter takes the ``r`` *largest* components (the task context the calibration data previews), the KPM
(knowledge-preserving mode) the ``r`` *smallest* (calibrated on the knowledge to keep, so the largest stay frozen)
(§3.2). ``A = sqrt(S/s) (V^T C^-1)_r``, ``B = U_r sqrt(S/s)`` and, as PiSSA, the base weight becomes the residual
``W - s B A`` while attached (restored on detach); exports convert to a plain LoRA on the original weight.

Equal to peft 0.21's ``init_lora_weights="corda"`` (``preprocess_corda``): the damped inverse (``C + damp *
mean(diag C) I``, ``damp`` doubled from 0.01 until ``||C' C'^-1 - I|| < 0.05``), ``W C'`` in float32. peft's hook
takes one sample per model call (``input[0].squeeze(0)``: batches of one sequence); here every row of a batch is a
sample (the same for batches of one row). peft's ``use_float16_for_covariance`` and cache files are not offered.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..backends import backend_for
from ..component import Component
from .lora import LoRA, LoRAInit, LoRALinear, register_data_init

__all__ = ["EVA_DEFAULTS", "CORDA_DEFAULTS", "LoRADataInit", "check_options", "IncrementalPCA"]

EVA_DEFAULTS: dict[str, Any] = {
    "rho": 2.0,
    "tau": 0.99,
    "use_label_mask": True,
    "label_mask_value": -100,
    "whiten": False,
    "adjust_scaling_factors": True,
}
CORDA_DEFAULTS: dict[str, Any] = {"corda_method": "ipm"}
DATA_INITS = (LoRAInit.EVA, LoRAInit.CORDA)


def _options(given: Mapping[str, Any], defaults: dict[str, Any], field: str) -> dict[str, Any]:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"LoRA {field}= has unknown options {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


def check_options(cfg: LoRA) -> None:
    """Validate ``cfg.eva`` / ``cfg.corda`` (peft's ``EvaConfig`` / ``CordaConfig`` fields) against ``cfg.init``.

    Raises:
        ValueError: options for an init that is not chosen, unknown keys, out-of-range values, or DoRA.
    """
    if cfg.eva and cfg.init is not LoRAInit.EVA:
        raise ValueError(f"LoRA eva= options need init='eva' (init is {cfg.init.value!r})")
    if cfg.corda and cfg.init is not LoRAInit.CORDA:
        raise ValueError(f"LoRA corda= options need init='corda' (init is {cfg.init.value!r})")
    if cfg.init not in DATA_INITS:
        return
    if cfg.dora:
        raise ValueError(f"LoRA init={cfg.init.value!r} with dora=True is not supported; use dora=False")
    if cfg.target_parameters:
        raise ValueError(f"LoRA init={cfg.init.value!r} acts on modules only; drop target_parameters")
    if cfg.init is LoRAInit.EVA:
        o = _options(cfg.eva, EVA_DEFAULTS, "eva")
        if not isinstance(o["rho"], (int, float)) or not 1.0 <= o["rho"] <= 1000:
            raise ValueError(f"eva rho must be a number in [1, 1000], got {o['rho']!r}")
        if not isinstance(o["tau"], (int, float)) or not 0.0 <= o["tau"] <= 1.0:
            raise ValueError(f"eva tau must be in [0, 1], got {o['tau']!r}")
        for key in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            if not isinstance(o[key], bool):
                raise ValueError(f"eva {key} must be True or False, got {o[key]!r}")
        if not isinstance(o["label_mask_value"], int):
            raise ValueError(f"eva label_mask_value must be an integer, got {o['label_mask_value']!r}")
    else:
        o = _options(cfg.corda, CORDA_DEFAULTS, "corda")
        if o["corda_method"] not in ("ipm", "kpm"):
            raise ValueError(f"corda corda_method must be 'ipm' or 'kpm', got {o['corda_method']!r}")


def uncalibrated(what: str, method: str) -> RuntimeError:
    return RuntimeError(
        f"{what}: this LoRA (init={method!r}) has not been calibrated; its A and B come from activations. Run "
        "adapters.calibrate(name, batches) with a few batches of model inputs first"
    )


# --- incremental PCA (EVA) ----------------------------------------------------------------------------------------
class IncrementalPCA:
    """Incremental PCA over batches ``X: (n, features)``, as scikit-learn's and peft's (float32 data, float64 mean
    and variance, randomized SVD ``torch.svd_lowrank(q=2k, niter=4)`` seeded with 42, signs fixed on ``V``).

    After :meth:`partial_fit`: ``components_: (k, features)``, ``singular_values_: (k,)``,
    ``explained_variance_ratio_: (k,)``.
    """

    def __init__(self, n_components: int, seed: int = 42, niter: int = 4) -> None:
        self.n_components = n_components
        self.q = 2 * n_components
        self.seed, self.niter = seed, niter
        self.components_: torch.Tensor | None = None

    @staticmethod
    def _mean_var(
        X: torch.Tensor, last_mean: torch.Tensor | None, last_var: torch.Tensor | None, last_n: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chan et al.'s pairwise update of the per-feature mean and (biased) variance."""
        new_n = torch.tensor([X.shape[0]], device=X.device)
        total = last_n + new_n
        last_sum = (
            torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
            if last_mean is None
            else last_mean * last_n
        )
        new_sum = X.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / total
        centered = X - new_sum / new_n
        correction = centered.sum(dim=0, dtype=torch.float64).square()
        centered.square_()
        new_unnormalized = centered.sum(dim=0, dtype=torch.float64)
        new_unnormalized -= correction / new_n
        if last_var is None:
            return mean, new_unnormalized / total, total
        ratio = last_n.double() / new_n
        unnormalized = last_var * last_n + new_unnormalized + ratio / total * (last_sum / ratio - new_sum).square()
        return mean, unnormalized / total, total

    @torch.no_grad()
    def partial_fit(self, X: torch.Tensor) -> None:
        X = X.clone()
        n = X.shape[0]
        if n < self.n_components or X.shape[1] < self.n_components:
            raise ValueError(
                f"incremental PCA needs >= {self.n_components} rows and features, got {tuple(X.shape)}"
            )
        first = self.components_ is None
        if first:
            self.mean_, self.var_ = None, None
            self.n_seen_ = torch.tensor([0], device=X.device)
        mean, var, total = self._mean_var(X, self.mean_, self.var_, self.n_seen_)
        if first:
            X -= mean
        else:
            batch_mean = torch.mean(X, dim=0)
            X -= batch_mean
            factor = torch.sqrt((self.n_seen_.double() / total) * n)
            X = torch.vstack(
                (self.singular_values_.view((-1, 1)) * self.components_, X, factor * (self.mean_ - batch_mean))
            )
        with torch.random.fork_rng(devices=[X.device] if X.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            U, S, V = torch.svd_lowrank(X, q=self.q, niter=self.niter)
        Vt = V.mH
        signs = torch.sign(Vt[range(Vt.shape[0]), torch.argmax(torch.abs(Vt), dim=1)])
        Vt = Vt * signs.view(-1, 1)
        k = self.n_components
        self.n_seen_ = total
        self.components_ = Vt[:k]
        self.singular_values_ = S[:k]
        self.mean_, self.var_ = mean, var
        self.explained_variance_ratio_ = (S**2 / torch.sum(var * total))[:k]


class _EvaState:
    """What every EVA component of one adapter shares during calibration: the token mask of the running model call
    (root-module hooks), the first batch's inputs (to find layers with equal inputs), one incremental PCA per
    distinct input, the convergence flags and the rank allocation (peft's ``_get_eva_state_dict`` loop, one model
    call per loop iteration)."""

    def __init__(self, cfg: LoRA, root: nn.Module, members: dict[str, LoRADataInit]) -> None:
        self.opts = _options(cfg.eva, EVA_DEFAULTS, "eva")
        self.root = root
        self.members = members  # site name -> component, module order
        self.ranks = {n: cfg.rank_for(n) for n in members}
        self.max_components = {n: round(r * self.opts["rho"]) for n, r in self.ranks.items()}
        self.budget = sum(self.ranks.values())
        self.handles: list[Any] = []
        self.mask: torch.Tensor | None = None
        self.first: dict[str, torch.Tensor] = {}  # batch 0's prepared inputs
        self.calls = 0  # model calls that reached a member
        self.seen = False  # the running call reached a member
        self.pca: dict[str, IncrementalPCA] = {}  # representative -> its PCA
        self.converged_at: dict[str, torch.Tensor] = {}
        self.hook_of: dict[str, str] = {}  # layer -> representative (peft's layer_hook_map)
        self.equal: dict[str, str] = {}  # layer -> representative, for layers sharing another's input
        self.stopped: dict[str, bool] = {}  # peft's convergence_dict: the layer's hook is removed
        self.rank_dist = dict(self.max_components)
        self.done = False
        self.result: dict[str, tuple[torch.Tensor, int]] | None = None

    # root hooks: the model inputs of the running call (token mask) and the end of each call
    def hook(self) -> None:
        if not self.handles and self.result is None:
            self.handles = [
                self.root.register_forward_pre_hook(self._begin, with_kwargs=True),
                self.root.register_forward_hook(self._end, always_call=True),
            ]

    def unhook(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.seen = False
        mask = None
        ids = kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            mask = kwargs.get("attention_mask")
            mask = torch.ones_like(ids).bool() if mask is None else mask.bool()
            labels = kwargs.get("labels")
            if self.opts["use_label_mask"] and isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
                mask = torch.logical_and(mask, labels != self.opts["label_mask_value"])
        self.mask = mask

    def _end(self, module: nn.Module, args: tuple, out: Any) -> None:
        self.mask = None
        if self.seen:
            self.seen = False
            self._close_call()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of ``x: (..., in)`` that count: ``(tokens, in)``."""
        if self.mask is not None and tuple(x.shape[:-1]) == tuple(self.mask.shape):
            return x[self.mask]
        return x.reshape(-1, x.shape[-1])

    def observe(self, name: str, x: torch.Tensor) -> None:
        if self.done or self.result is not None:
            return
        self.seen = True
        if self.calls == 0:
            self.first[name] = self.prepare(x).detach()
            return
        if name in self.pca and not self.stopped[name]:
            self._fit(name, self.prepare(x))

    def _fit(self, name: str, states: torch.Tensor) -> None:
        """peft's ``SVDHook``: skip batches with fewer rows than components; convergence by cosine similarity."""
        pca = self.pca[name]
        if states.shape[0] < pca.n_components:
            return
        previous = None if pca.components_ is None else pca.components_.clone()
        pca.partial_fit(states.to(torch.float32))
        if previous is not None:
            sim = torch.nn.functional.cosine_similarity(pca.components_, previous)
            self.converged_at[name] = sim >= self.opts["tau"]

    def _setup(self) -> None:
        """After the first call: group layers with equal inputs, one PCA per group (peft's ``HashHook`` pass)."""
        groups: list[list[str]] = []
        for n in self.members:
            if n not in self.first:
                raise RuntimeError(f"EVA calibration: module {n!r} was not called by the first batch")
            for g in groups:
                a, b = self.first[g[0]], self.first[n]
                if a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b):
                    g.append(n)
                    break
            else:
                groups.append([n])
        self.equal = {n: g[0] for g in groups for n in g[1:]}
        for g in groups:
            top = max(self.max_components[n] for n in g)
            for n in g:
                self.max_components[n] = top
        self.rank_dist = dict(self.max_components)
        for n in self.members:
            if n in self.equal:
                continue
            width = self.first[n].shape[-1]
            if self.max_components[n] > width:
                raise ValueError(
                    f"EVA: {n!r} has {width} input features, fewer than round(rho * r) = {self.max_components[n]}; "
                    "lower r or eva rho"
                )
            self.pca[n] = IncrementalPCA(self.max_components[n])
            self.converged_at[n] = torch.zeros(self.max_components[n], dtype=torch.bool)
            self.stopped[n] = False
        self.hook_of = {**{n: n for n in self.pca}, **self.equal}

    def _close_call(self) -> None:
        """End of one loop iteration of peft's EVA (one model call): update the ranks, then the convergence flags
        that decide which layers the next call updates (and whether calibration is complete)."""
        if self.calls == 0:
            self._setup()
            self._toggle()
            for n in self.pca:
                self._fit(n, self.first[n])
            self.first = {}
        self.calls += 1
        if all(p.components_ is not None for p in self.pca.values()):
            self.rank_dist = self._allocate()
        self._toggle()

    def _toggle(self) -> None:
        for n in self.pca:
            converged = bool(torch.all(self.converged_at[n][: self.rank_dist[n]]))
            if not self.stopped[n] and converged:
                self.stopped[n] = True
            elif self.stopped[n] and not converged:
                self.stopped[n] = False
        self.done = all(self.stopped.values())

    def _allocate(self) -> dict[str, int]:
        """peft's ``_get_rank_distribution``: the budget goes to the largest explained-variance ratios."""
        ratios = {n: self.pca[n].explained_variance_ratio_[: self.max_components[n]] for n in self.pca}
        keys, values = zip(*[(k, c) for k, h in self.hook_of.items() for c in ratios[h]])
        order = torch.stack(values).argsort(descending=True)
        counts = Counter([keys[i] for i in order[: self.budget]])
        counts = {k: counts.get(k, 0) for k in self.hook_of}
        for k, k_hook in self.equal.items():
            if counts[k_hook] < counts[k]:
                counts[k_hook], counts[k] = counts[k], counts[k_hook]
        return counts

    def finish(self) -> dict[str, tuple[torch.Tensor, int]]:
        """Each layer's initial ``A: (rank, in)`` and rank, computed once for all members."""
        if self.result is not None:
            return self.result
        if self.calls == 0:
            raise RuntimeError("EVA calibration saw no model call that reached the adapted modules")
        missing = [n for n in self.pca if self.pca[n].components_ is None]
        late = [
            n for n in self.hook_of if not bool(torch.all(self.converged_at[self.hook_of[n]][: self.rank_dist[n]]))
        ]
        if missing or late:
            raise RuntimeError(
                f"EVA calibration did not converge for {(missing or late)[:4]} ({len(missing or late)} layers) after "
                f"{self.calls} batches (tau={self.opts['tau']}): pass more batches, e.g. "
                "itertools.islice(itertools.cycle(batches), 20 * len(batches)) (peft cycles its dataloader until every "
                "layer converged; batches after convergence are ignored), or lower eva tau. Calling adapters.calibrate "
                "again continues where this stopped"
            )
        self.unhook()
        result = {}
        for n, rank in self.rank_dist.items():
            pca = self.pca[self.hook_of[n]]
            u = pca.components_[:rank].clone()
            if self.opts["whiten"]:
                u = u / pca.singular_values_[:rank].sqrt().reshape(-1, 1)
            result[n] = (u, rank)
        self.result = result
        self.pca, self.converged_at = {}, {}
        return result


# --- the component --------------------------------------------------------------------------------------------------
class LoRADataInit(LoRALinear):
    """A linear-like LoRA whose ``A`` and ``B`` (EVA: and rank; CorDA: and the residual base weight) come from
    ``adapters.calibrate``. Shapes as :class:`LoRALinear`; EVA ranks may differ per site after calibration
    (rank 0: the site adds nothing)."""

    def __init__(self, cfg: LoRA, module: nn.Module, name: str) -> None:
        if backend_for(module) is None or backend_for(module).kind != "linear":
            raise TypeError(
                f"LoRA init={cfg.init.value!r} acts on linear layers (nn.Linear, Conv1D) only; {name!r} is a "
                f"{type(module).__name__}: exclude it from targets"
            )
        super().__init__(cfg, module, name)
        self.site = name
        self.method = cfg.init.value
        self.calibrated = False
        self.alpha_eff = float(self.scaling * (math.sqrt(self.r) if cfg.rslora else self.r))
        self._eva: _EvaState | None = None
        self._cov: torch.Tensor | None = None
        self._samples = 0
        if cfg.init is LoRAInit.CORDA:  # the base weight holds W - s * init_B @ init_A while attached (as PiSSA)
            self.register_buffer("init_A", torch.zeros_like(self.lora_A))
            self.register_buffer("init_B", torch.zeros_like(self.lora_B))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", init={self.method}" + ("" if self.calibrated else " (uncalibrated)")

    @torch.no_grad()
    def initialize(self, module: nn.Module) -> None:
        nn.init.zeros_(self.lora_A)
        nn.init.zeros_(self.lora_B)

    def on_attach(self, module: nn.Module) -> None:
        super().on_attach(module)
        if self._eva is not None and not self.calibrated:
            self._eva.hook()

    def on_detach(self, module: nn.Module, keep_merged: bool = False) -> None:
        super().on_detach(module, keep_merged)
        if self._eva is not None:
            self._eva.unhook()

    # --- calibration -------------------------------------------------------------------------------------------
    @property
    def calibration_complete(self) -> bool:
        """True once more batches would change nothing: EVA's components converged (peft stops cycling its
        dataloader there) or the adapter is calibrated. CorDA is never complete before calibration (every batch adds
        to the covariance); callers that feed batches until this is true (``adapterkit train``) stop at their own
        count for it."""
        if self.calibrated:
            return True
        return self._eva is not None and (self._eva.done or self._eva.result is not None)

    def observe(self, x: Any, y: Any) -> None:
        if self.calibrated:
            return
        if self._eva is not None:
            self._eva.observe(self.site, x)
            return
        # CorDA (peft's calib_cov_distribution hook), one sample per row: X / |max X|, summed X^T X
        rows = x.detach().reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() > 2 else x.detach()[None]
        for sample in rows.float():
            sample = sample / torch.max(sample).abs()
            if torch.isnan(sample).any() or torch.isinf(sample).any():
                raise ValueError(f"CorDA calibration: invalid values in the input of {self.site!r}")
            cov = sample.t().matmul(sample)
            self._cov = cov if self._cov is None else self._cov + cov
            self._samples += 1

    @torch.no_grad()
    def finish_calibration(self, module: nn.Module) -> None:
        if self.calibrated:
            raise RuntimeError(
                f"the LoRA at {self.site!r} (init={self.method!r}) is already calibrated; delete the adapter and add "
                "it again to calibrate on other batches"
            )
        if self._eva is not None:
            A, rank = self._eva.finish()[self.site]
            self._set_eva(A, rank)
        else:
            if self._cov is None:
                raise RuntimeError(f"CorDA calibration: {self.site!r} was not called by the batches")
            self._set_corda(module, self._cov / self._samples)
            self._cov, self._samples = None, 0
        self.calibrated = True

    def _set_eva(self, A: torch.Tensor, rank: int) -> None:
        opts = _options(self.cfg.eva, EVA_DEFAULTS, "eva")
        r0 = self.cfg.rank_for(self.site)
        alpha = float(pattern_alpha(self.cfg, self.site))
        if rank != r0 and opts["adjust_scaling_factors"]:
            alpha *= rank / r0
        self._resize(rank, alpha)
        self.lora_A.copy_(A.to(self.lora_A.dtype))
        if not self.cfg.init_weights:  # as LoRALinear: B random too, not an identity (for tests)
            self._init_random()

    def _resize(self, rank: int, alpha: float) -> None:
        """New factors of rank ``rank`` (``A`` zeros, ``B`` zeros) and scaling from ``alpha`` (peft: ``lora_alpha``
        of the site after EVA). Parameters are replaced: build optimizers after calibration."""
        factory = {"device": self.lora_A.device, "dtype": self.lora_A.dtype}
        grad = self.lora_A.requires_grad
        self.lora_A = nn.Parameter(torch.zeros(rank, self.lora_A.shape[1], **factory), requires_grad=grad)
        self.lora_B = nn.Parameter(torch.zeros(self.out_dim, rank, **factory), requires_grad=grad)
        self.r = rank
        self.alpha_eff = alpha
        if rank:
            self.scaling = alpha / math.sqrt(rank) if self.cfg.rslora else alpha / rank
        if rank == 0 and self.bias is not None:
            self.bias = None  # peft removes the LoRA layer entirely (its bias with it)

    def _set_corda(self, module: nn.Module, covariance: torch.Tensor) -> None:
        """peft's ``collect_eigens_for_layer`` + ``crop_corda_eigens`` + ``corda_init``."""
        backend = backend_for(module)
        weight = self._original if self._original is not None else backend.read(module)
        w = weight.float()  # (out, in)
        cov = covariance.float()
        eye = torch.eye(cov.shape[0], device=cov.device)
        damp = 0.01
        while True:
            compensate = torch.diag(
                torch.ones(cov.shape[0], device=cov.device) * torch.mean(torch.diag(cov)) * damp
            )
            fixed = cov + compensate
            cov_inv = torch.linalg.inv(fixed)
            if torch.dist(fixed @ cov_inv, eye).item() < 0.05:
                break
            damp *= 2
            if not math.isfinite(damp) or damp > 1e30:
                raise ValueError(f"CorDA: the input covariance of {self.site!r} cannot be inverted")
        U, S, Vh = torch.linalg.svd(w @ fixed, full_matrices=False)
        V = (Vh @ cov_inv).transpose(0, 1)
        r = self.r
        if _options(self.cfg.corda, CORDA_DEFAULTS, "corda")["corda_method"] == "ipm":
            U, S, V = U[:, :r], S[:r], V[:, :r]
        else:
            U, S, V = U[:, -r:], S[-r:], V[:, -r:]
        for t, what in ((S, "S"), (U, "U"), (V, "V")):
            if torch.isnan(t).any() or torch.isinf(t).any():
                raise ValueError(f"CorDA: invalid values in {what} for {self.site!r}")
        S = S / self.scaling
        A = V.t().mul(S.sqrt().view(-1, 1)).contiguous()  # (r, in)
        B = U.mul(S.sqrt()).contiguous()  # (out, r)
        for p, v in ((self.lora_A, A), (self.lora_B, B), (self.init_A, A), (self.init_B, B)):
            p.copy_(v.to(p.dtype))
        if self._original is not None:  # attached: the base weight becomes the residual W - s B A
            # computed as on_attach does (a loaded adapter gets the same residual bit for bit)
            backend.copy_(module, self._original)
            backend.add_(module, self._delta(self.init_A, self.init_B), alpha=-1.0)

    # --- loading ---------------------------------------------------------------------------------------------
    def import_state(self, state: dict[str, torch.Tensor], module: nn.Module) -> None:
        """Saved factors are calibrated ones; EVA's rank of each site is that of the saved ``lora_A``."""
        if self.cfg.init is LoRAInit.EVA and "lora_A" in state and state["lora_A"].dim() == 2:
            rank = state["lora_A"].shape[0]
            r0 = self.cfg.rank_for(self.site)
            alpha = float(pattern_alpha(self.cfg, self.site))
            if rank != r0 and _options(self.cfg.eva, EVA_DEFAULTS, "eva")["adjust_scaling_factors"]:
                alpha *= rank / r0
            if rank != self.r:
                with torch.no_grad():
                    self._resize(rank, alpha)
        super().import_state(state, module)
        self.calibrated = True

    # --- forward / merge: refused before calibration -------------------------------------------------------------
    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            raise uncalibrated(f"LoRA at {self.site!r}", self.method)
        if self.r == 0:
            return y
        return super().post(x, y)

    @classmethod
    def routed(cls, comps: list[Component | None], plan: Any, x: torch.Tensor, y: torch.Tensor, key: Any) -> Any:
        live = [c for c in comps if c is not None]
        for c in live:
            if not c.calibrated:
                raise uncalibrated(f"LoRA at {c.site!r}", c.method)
        if any(c.r == 0 for c in live):
            return None  # one call per adapter
        return super().routed(comps, plan, x, y, key)

    def check_merge(self, module: nn.Module) -> None:
        if not self.calibrated:
            raise uncalibrated(f"merging the LoRA at {self.site!r}", self.method)

    def merge(self, module: nn.Module) -> None:
        self.check_merge(module)
        super().merge(module)

    def pad_rank_(self, r: int) -> bool:
        if self.cfg.init is LoRAInit.CORDA:
            raise ValueError("CorDA adapters change the base weight; they cannot be padded for hot-swapping")
        return super().pad_rank_(r)


def pattern_alpha(cfg: LoRA, name: str) -> float:
    from .lora import pattern_value

    return float(pattern_value(cfg.alpha_pattern, name, cfg.alpha))


def link(cfg: LoRA, modules: Mapping[str, nn.Module], built: dict[str, Component]) -> None:
    """EVA: give the adapter's components one shared calibration state (the rank budget is global)."""
    if cfg.init is not LoRAInit.EVA:
        return
    members = {n: c for n, c in built.items() if isinstance(c, LoRADataInit)}
    if not members:
        return
    order = {n: i for i, n in enumerate(modules)}
    members = dict(sorted(members.items(), key=lambda kv: order.get(kv[0], len(order))))
    state = _EvaState(cfg, modules[""], members)
    for c in members.values():
        c._eva = state


register_data_init(sys.modules[__name__])
