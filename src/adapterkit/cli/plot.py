"""The training curve PNG: training and dev loss against steps, and the dev metric (accuracy) beside them."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["plot_curve"]


def plot_curve(hist: dict[str, list[dict[str, Any]]], path: str | os.PathLike, *, metric: str, title: str) -> None:
    """Write ``path`` (PNG) from :func:`adapterkit.cli.train.history` output.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'adapterkit[cli]'``).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    train, evals = hist["train"], hist["eval"]
    if train:
        ax_loss.plot([p["step"] for p in train], [p["loss"] for p in train], label="train loss", lw=1.2)
    with_loss = [p for p in evals if p.get("loss") is not None]
    if with_loss:
        ax_loss.plot([p["step"] for p in with_loss], [p["loss"] for p in with_loss], "o-", label="dev loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()

    shown = metric if metric != "loss" else "accuracy"
    points = [p for p in evals if p.get(shown) is not None]
    if points:
        ax_metric.plot([p["step"] for p in points], [p[shown] for p in points], "o-", color="tab:green")
        best = max(points, key=lambda p: p[shown])
        ax_metric.annotate(f"{best[shown]:.4f}", (best["step"], best[shown]), textcoords="offset points",
                           xytext=(0, 6), ha="center")  # fmt: skip
    ax_metric.set_xlabel("step")
    ax_metric.set_ylabel(f"dev {shown}")
    ax_metric.grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
