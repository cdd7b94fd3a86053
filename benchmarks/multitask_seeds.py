#!/usr/bin/env python
"""Seed table of ``benchmarks/multitask.py`` runs: per-method means over seeds and paired differences to LoRA.

One multi-task run at one seed cannot separate methods on this benchmark (a task score moves by several points from
seed to seed at a few hundred training rows per task), so issue 20's target is judged on several seeds of one
recipe. This script reads the ``.json`` files that ``multitask.py --out`` writes (any number, any methods; one seed
each), keeps the rows of one recipe (every argument but ``--seed``, ``--methods`` and ``--out`` equal; runs of
another recipe are refused with the differing arguments named), and writes:

* per method: the seeds it ran, each task's mean score, the mean and standard deviation (over seeds) of the
  four-task average, parameters per task;
* per method against the baseline (``--baseline``, default ``lora``), on the seeds both ran: the mean paired
  difference of the average, its standard error, the paired t statistic and the number of seeds ahead.

``--pool-devices`` pools runs of different ``--device`` (the device leaves the recipe; each seed's pair must have run
on one device, else it is refused, and the table names the seeds of each device): the third study of issue 20 runs
each pair on the CPU here or on a lent GPU. ``--planned N`` marks a table with fewer than N pairs as incomplete (it
decides nothing).

Run::

    .venv/bin/python benchmarks/multitask_seeds.py RUN1.json RUN2.json ... --out benchmarks/results/multitask_seeds.md
    .venv/bin/python benchmarks/multitask_seeds.py benchmarks/results/multitask_seeds_runs --methods lora,mhr,adamix \\
        --out benchmarks/results/multitask_seeds.md         # the committed table, from the committed runs
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import multitask  # beside this script: its argument parser reads a run's command

# arguments that may differ between the runs of one recipe
FREE = {"seed", "methods", "out", "note", "update", "merge", "threads", "data"}
# multitask.py's defaults: what a run made before an option existed used
DEFAULTS = vars(multitask.parse_args([]))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="multitask.py output JSON files, or folders of them")
    p.add_argument("--baseline", default="lora", help="method the others are compared with (default lora)")
    p.add_argument("--out", type=Path, default=None, help="markdown file, and a chart beside it (.png)")
    p.add_argument(
        "--methods", default=None, help="comma-separated methods to table (default: every method found)"
    )
    p.add_argument("--note", default=None, help="a paragraph appended to the markdown")
    p.add_argument(
        "--pool-devices",
        action="store_true",
        help="pool runs of different --device (each seed's pair on one device; the table names the devices)",
    )
    p.add_argument("--planned", type=int, default=None, help="pairs the study plans: fewer are marked incomplete")
    return p.parse_args(argv)


def recipe_key(args: dict[str, Any], free: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The arguments that define a recipe (everything a seed run must share, but ``free``); an argument a run's JSON
    lacks (it predates the option) takes multitask.py's default, as that run did."""
    full = {**DEFAULTS, **args}
    return {k: v for k, v in sorted(full.items()) if k not in FREE | free and v is not None}


def collect(
    paths: Sequence[Path], pool_devices: bool = False
) -> tuple[dict[str, Any], list[str], dict[str, dict[int, dict[str, Any]]]]:
    """``(recipe, tasks, rows[method][seed])`` from the runs, each row with its run's ``"device"``; raises
    ``ValueError`` on mixed recipes (``pool_devices``: the device may differ) or a method run twice at one seed."""
    recipe: dict[str, Any] | None = None
    first = ""
    tasks: list[str] = []
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    files = [f for p in paths for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    for path in files:
        data = json.loads(path.read_text())
        full = {**DEFAULTS, **data["args"]}
        key = recipe_key(full, frozenset({"device"} if pool_devices else ()))
        device = str(full["device"])
        if recipe is None:
            recipe, first, tasks = key, str(path), list(data["meta"]["tasks"])
        elif key != recipe:
            diff = {k: (recipe.get(k), key.get(k)) for k in set(recipe) | set(key) if recipe.get(k) != key.get(k)}
            raise ValueError(f"{path} is another recipe than {first}: {diff}; pass runs of one recipe")
        for row in data["rows"]:
            # a row's own seed is in its command (rows merged from other runs keep theirs), read as multitask.py's
            # ``recipe`` reads it
            cmd = row.get("command")
            row_seed = multitask.parse_args(shlex.split(cmd)[2:]).seed if cmd else int(data["args"]["seed"])
            if row_seed in rows.get(row["method"], {}):
                raise ValueError(f"{row['method']} at seed {row_seed} appears twice (second in {path})")
            rows.setdefault(row["method"], {})[row_seed] = {**row, "device": device}
    assert recipe is not None
    return recipe, tasks, rows


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """``diffs`` (``a - b``), their mean, its standard error, the paired t statistic (nan below two pairs), pairs
    ``a > b``."""
    d = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(d)
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    t = mean / se if se and not math.isnan(se) else math.nan
    return {"diffs": d, "n": len(d), "mean": mean, "se": se, "t": t, "ahead": sum(x > 0 for x in d)}


def versus(rows: dict[str, dict[int, dict[str, Any]]], method: str, baseline: str) -> dict[str, Any] | None:
    """``paired`` of ``method``'s four-task average against ``baseline``'s on the seeds both ran (None: no such
    seed, or ``method`` is the baseline)."""
    base = rows.get(baseline, {})
    common = [s for s in sorted(rows[method]) if s in base]
    if method == baseline or not common:
        return None
    return paired([rows[method][s]["average"] for s in common], [base[s]["average"] for s in common])


def check_devices(rows: dict[str, dict[int, dict[str, Any]]], baseline: str) -> None:
    """Raise ``ValueError`` when a method and the baseline ran one seed on different devices (a pair must not mix
    them: the two kernels round differently, so the difference would carry the device's noise as well)."""
    base = rows.get(baseline, {})
    for m, by_seed in rows.items():
        for s in sorted(by_seed.keys() & base.keys() if m != baseline else ()):
            if by_seed[s]["device"] != base[s]["device"]:
                raise ValueError(
                    f"seed {s}: {m} ran on {by_seed[s]['device']}, {baseline} on {base[s]['device']}; "
                    "a pair must run on one device (rerun one of them)"
                )


def devices_line(rows: dict[str, dict[int, dict[str, Any]]]) -> str:
    """``"Devices (each pair on one): cpu: seeds 52, 53; cuda: seeds 54."`` (every seed any method ran, by
    device)."""
    by: dict[str, set[int]] = {}
    for by_seed in rows.values():
        for s, row in by_seed.items():
            by.setdefault(row["device"], set()).add(s)
    return (
        "Devices (each pair on one): "
        + "; ".join(f"{d}: seeds {', '.join(map(str, sorted(ss)))}" for d, ss in sorted(by.items()))
        + "."
    )


def completeness_line(rows: dict[str, dict[int, dict[str, Any]]], baseline: str, planned: int) -> str:
    """Whether every method has ``planned`` pairs with the baseline (a table of fewer decides nothing)."""
    counts = {m: (p["n"] if (p := versus(rows, m, baseline)) else 0) for m in sorted(rows) if m != baseline}
    short = {m: n for m, n in counts.items() if n < planned}
    if not short:
        return f"**Complete**: all {planned} planned pairs have run."
    have = ", ".join(f"{m} {n}" for m, n in short.items())
    return f"**Incomplete** ({have} of the {planned} planned pairs): this table decides nothing yet."


def render(recipe: dict[str, Any], tasks: list[str], rows: dict[str, dict[int, dict[str, Any]]], baseline: str,
           argv: Sequence[str], note: str | None, pooled: bool = False,
           planned: int | None = None) -> str:  # fmt: skip
    out = [
        f"Command: `python benchmarks/multitask_seeds.py {shlex.join(argv)}`",
        "",
        "Recipe (the `multitask.py` arguments every run shares): "
        + ", ".join(f"`--{k.replace('_', '-')} {v}`" for k, v in recipe.items() if v not in (None, [], False))
        + ".",
        "",
        "| method | params / task | seeds | "
        + " | ".join(f"{t} (mean)" for t in tasks)
        + " | average: mean (sd) | vs "
        + baseline
        + ": mean diff (se) | t | seeds ahead |",
        "|---|---:|---|" + "---:|" * len(tasks) + "---:|---:|---:|---:|",
    ]
    if planned is not None:
        out[2:2] = [completeness_line(rows, baseline, planned), ""]
    order = [baseline] + sorted(m for m in rows if m != baseline)
    for m in order:
        if m not in rows:
            continue
        seeds = sorted(rows[m])
        avgs = [rows[m][s]["average"] for s in seeds]
        means = [statistics.fmean(rows[m][s]["tasks"][t]["score"] for s in seeds) for t in tasks]
        sd = f"{statistics.stdev(avgs):.2f}" if len(avgs) > 1 else "-"
        p = versus(rows, m, baseline)
        if p is None:
            cmp = "| | |"
        else:
            se, t = ("-", "-") if p["n"] < 2 else (f"{p['se']:.2f}", f"{p['t']:+.2f}")
            cmp = f"{p['mean']:+.2f} ({se}) | {t} | {p['ahead']}/{p['n']} |"
        out.append(
            f"| {m} | {rows[m][seeds[0]]['params_per_task']:,} | {', '.join(map(str, seeds))} | "
            + " | ".join(f"{x:.1f}" for x in means)
            + f" | {statistics.fmean(avgs):.2f} ({sd}) | {cmp}"
        )
    out += [
        "",
        "Task scores ×100 as in multitask.md (accuracy; MRPC mean of F1 and accuracy; CoLA Matthews correlation); "
        "average = mean of the four task scores at one seed; sd over seeds; vs "
        f"{baseline}: the paired difference of the average on the seeds both ran, its standard error (sd/√n), "
        "t = mean/se, and the number of those seeds on which the method's average is higher.",
    ]
    if pooled:
        out += ["", devices_line(rows)]
    if note:
        out += ["", note]
    return "\n".join(out) + "\n"


def plot(rows: dict[str, dict[int, dict[str, Any]]], baseline: str, path: Path) -> bool:
    """Each method's four-task average minus the baseline's, one dot per seed both ran, and the mean with ±se.
    False when matplotlib is missing or no method shares a seed with the baseline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    pairs = {m: p for m in sorted(rows) if (p := versus(rows, m, baseline)) is not None}
    if not pairs:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(pairs)), 3.8))
    for i, p in enumerate(pairs.values()):
        ax.scatter([i] * p["n"], p["diffs"], color="gray", s=14, zorder=2)
        ax.errorbar([i], [p["mean"]], yerr=[0.0 if math.isnan(p["se"]) else p["se"]], fmt="o", color="C0",
                    capsize=6, zorder=3)  # fmt: skip
    ax.axhline(0.0, color="black", linewidth=1)
    ax.set_xticks(range(len(pairs)), list(pairs))
    ax.set_ylabel(f"four-task average − {baseline}'s (points)")
    ax.set_title("MiniLM-L6 multi-task GLUE: per-seed differences (mean ± se)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.planned is not None and args.planned < 1:
        sys.exit(f"--planned {args.planned}: give the number of pairs the study plans (1 or more)")
    try:
        recipe, tasks, rows = collect(args.runs, args.pool_devices)
        if args.methods:
            keep = {m.strip() for m in args.methods.split(",")}
            rows = {m: r for m, r in rows.items() if m in keep}
        check_devices(rows, args.baseline)
    except ValueError as exc:
        sys.exit(str(exc))
    shown = [a if not a.startswith("/") else Path(a).name for a in argv]
    if "--note" in shown:  # the note is printed below the table, not in the command
        i = shown.index("--note")
        shown[i + 1] = "..."
    text = render(recipe, tasks, rows, args.baseline, shown, args.note, args.pool_devices, args.planned)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        plot(rows, args.baseline, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
