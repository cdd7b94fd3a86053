"""``adapterkit train``'s calibration step: adapters initialized from activations (``--opt init=eva|corda``).

Data-aware LoRA inits (EVA, Paischer et al. 2024; CorDA, Yang et al. 2024; ``methods/lora_data_init.py``) refuse to
run until ``adapters.calibrate(name, batches)`` has set their factors. ``train`` calls :func:`calibrate_for_training`
after adding the adapter and before any optimizer is built (EVA replaces ``A``/``B`` by tensors of the rank it
allocates): it runs batches of training examples, collated exactly as the training batches are, through the model:

* batches of :data:`CALIBRATION_BATCH_SIZE` = 4 examples (peft's EVA example, ``svd_batch_size = 4``: "can be
  different from the batch size used in finetuning"), drawn from the training set in a seeded shuffled order, the
  set cycled when it is shorter (peft cycles its dataloader);
* EVA: until every layer's components converged (peft's stopping rule), at most ``--calibration-batches`` batches
  (default :data:`EVA_MAX_BATCHES`); a run that has not converged by then stops with a message naming the flag and
  ``eva`` ``tau``;
* CorDA: exactly ``--calibration-batches`` batches (default :data:`CORDA_BATCHES` = 64, i.e. 256 examples: peft's
  CorDA example ``calib_loader_size = 256``); every example is one covariance sample.

Other adapters have nothing to calibrate: :func:`calibrate_for_training` returns None for them (and refuses an
explicit ``--calibration-batches``, which would be ignored). Every process of a distributed run calibrates on the
same batches (the order depends on ``--seed`` only), so all ranks start from the same factors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

import adapterkit as ak
from adapterkit.component import Component

__all__ = [
    "CALIBRATION_BATCH_SIZE",
    "CORDA_BATCHES",
    "EVA_MAX_BATCHES",
    "CalibrationError",
    "calibrate_for_training",
    "calibrating_components",
    "training_batches",
]

CALIBRATION_BATCH_SIZE = 4  # peft's EVA example (svd_batch_size = 4)
CORDA_BATCHES = 64  # 64 x 4 = 256 examples, peft's CorDA example (calib_loader_size = 256)
EVA_MAX_BATCHES = 1000  # peft cycles until convergence without a limit; a bound so a stuck run ends with a message


class CalibrationError(ValueError):
    """The calibration step cannot run or did not finish (names the flag or option to change)."""


def calibrating_components(adapters: ak.Adapters, name: str) -> list[Component]:
    """The components of adapter ``name`` (union parts included) that calibrate from activations (those that
    implement ``Component.observe``, as ``adapters.calibrate`` counts them) and are not calibrated yet."""
    out: list[Component] = []
    seen: set[int] = set()
    for top in adapters.components(name).values():
        for c in top.modules():
            if not isinstance(c, Component) or id(c) in seen:
                continue
            seen.add(id(c))
            if type(c).observe is not Component.observe and not getattr(c, "calibrated", False):
                out.append(c)
    return out


def training_batches(
    dataset: Sequence[Any], collator: Callable[[list[Any]], Any], *, batch_size: int, seed: int
) -> Iterator[Any]:
    """Collated batches of ``batch_size`` examples of ``dataset`` in a shuffled order drawn from ``seed``, the
    dataset cycled (a new order each pass) without end; a last short batch of a pass is kept."""
    n = len(dataset)
    if n == 0:
        raise CalibrationError("the calibration step needs training examples, and the training set is empty")
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=g).tolist()
        for i in range(0, n, batch_size):
            yield collator([dataset[j] for j in order[i : i + batch_size]])


def _to(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict) or hasattr(batch, "items"):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _device(model: nn.Module) -> torch.device | None:
    p = next(iter(model.parameters()), None)
    return None if p is None else p.device


def calibrate_for_training(
    adapters: ak.Adapters,
    name: str,
    dataset: Sequence[Any],
    collator: Callable[[list[Any]], Any],
    *,
    batches: int | None = None,
    batch_size: int = CALIBRATION_BATCH_SIZE,
    seed: int = 42,
    say: Callable[[str], None] | None = None,
) -> int | None:
    """Calibrate adapter ``name`` on training batches when it needs it (see the module docstring).

    Args:
        adapters: the model's controller; the adapter is added and not yet calibrated.
        dataset: the encoded training examples (indexable; what the Trainer trains on).
        collator: the training data collator (a list of examples -> a batch of model inputs).
        batches: ``--calibration-batches``: EVA's maximum, CorDA's count (None: :data:`EVA_MAX_BATCHES` /
            :data:`CORDA_BATCHES`).
        batch_size: examples per calibration batch.
        seed: seed of the example order (``--seed``).
        say: where to report what ran (None: nothing).

    Returns:
        The number of batches run, or None when the adapter has nothing to calibrate.

    Raises:
        CalibrationError: ``batches`` given for an adapter with nothing to calibrate, a bad count, or EVA not
            converged within ``batches`` (naming ``--calibration-batches`` and ``eva`` ``tau``).
    """
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
        raise CalibrationError(f"--calibration-batches must be a positive integer, got {batches!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise CalibrationError(f"the calibration batch size must be a positive integer, got {batch_size!r}")
    comps = calibrating_components(adapters, name)
    if not comps:
        if batches is not None:
            method = adapters.config(name).method
            raise CalibrationError(
                f"--calibration-batches applies to adapters initialized from activations (--method lora --opt "
                f"init=eva or init=corda); adapter {name!r} ({method}) has nothing to calibrate: drop the flag"
            )
        return None
    # components that know when more batches would change nothing (EVA's convergence); the others take them all
    stoppable = [c for c in comps if hasattr(c, "calibration_complete")]
    early = bool(stoppable) and all(getattr(c, "method", None) == "eva" for c in comps)
    limit = batches if batches is not None else (EVA_MAX_BATCHES if early else CORDA_BATCHES)
    device = _device(adapters.model)
    source = training_batches(dataset, collator, batch_size=batch_size, seed=seed)
    ran = 0

    def feed() -> Iterator[Any]:
        nonlocal ran
        for batch in source:
            if early and all(c.calibration_complete for c in stoppable):
                return
            if ran == limit:
                if early:
                    raise CalibrationError(
                        f"EVA calibration did not converge within {limit} batches of {batch_size} training examples: "
                        f"pass a larger --calibration-batches (now {limit}), or lower the convergence threshold, "
                        """e.g. --opt eva='{"tau": 0.95}' (default 0.99)"""
                    )
                return
            ran += 1
            yield _to(batch, device)

    t0 = time.perf_counter()
    adapters.calibrate(name, feed())
    if say is not None:
        kinds = sorted({str(getattr(c, "method", type(c).__name__)) for c in comps})
        why = " (converged)" if early else ""
        say(
            f"calibration ({', '.join(kinds)}): {ran} batches of {batch_size} training examples{why}, "
            f"{time.perf_counter() - t0:.1f} s"
        )
    return ran
