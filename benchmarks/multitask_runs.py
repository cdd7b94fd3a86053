#!/usr/bin/env python
"""Run a seed study of ``benchmarks/multitask.py``: every (seed, method) run of a list, several at a time, each a
process of its own, resumable.

Each run writes ``OUTDIR/<method>_s<seed>.json``, which ``benchmarks/multitask_seeds.py OUTDIR`` tables. A run writes
into ``OUTDIR/partial/`` (its ``.md``, ``.png`` and log stay there) and its JSON is moved into ``OUTDIR`` only when it
ends with status 0, so a run that is killed or fails leaves no JSON behind, and a later call runs it again; runs whose JSON is already in
``OUTDIR`` are skipped. Runs start seed by seed (both methods of a seed before the next seed), so a study stopped
early holds whole pairs. ``--deadline`` stops starting runs after that many seconds (the running ones finish): a
study can be spread over several sessions, or fit into one call on a borrowed machine.

Every argument after ``--`` goes to each ``multitask.py`` run (the recipe); ``--seed``, ``--methods`` and ``--out``
are set here. Example (the GPU study fixed in DEVELOPERS.md)::

    .venv/bin/python benchmarks/multitask_runs.py benchmarks/results/multitask_seeds_8000_runs --methods lora,mhr \\
        --seeds 52-71 --jobs 16 -- --device cuda --train-size 8000 --dev-size 1100 --epochs 3 --batch-size 32 \\
        --lr-router 0.1 --model .devpack/model --data .devpack/glue
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_seeds(text: str) -> list[int]:
    """``"52-55,60"`` -> ``[52, 53, 54, 55, 60]`` (order kept, duplicates dropped)."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise SystemExit(f"--seeds: {part!r} is not a seed or a range like 52-71") from None
        if b < a:
            raise SystemExit(f"--seeds: the range {part!r} runs backwards; write {b}-{a}")
        seeds += [s for s in range(a, b + 1) if s not in seeds]
    if not seeds:
        raise SystemExit("--seeds is empty: give seeds such as 52-71 or 42,43")
    return seeds


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, recipe = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", type=Path, help="folder of the runs' JSON (created if absent)")
    p.add_argument("--methods", default="lora,mhr", help="comma-separated multitask.py methods (default lora,mhr)")
    p.add_argument("--seeds", required=True, help="seeds: comma-separated, ranges allowed (52-71)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--deadline", type=float, default=None, help="start no run after this many seconds")
    p.add_argument("--python", default=sys.executable, help="interpreter of the runs (default: this one)")
    args = p.parse_args(argv)
    for flag in ("--seed", "--methods", "--out"):
        if any(a == flag or a.startswith(flag + "=") for a in recipe):
            raise SystemExit(
                f"{flag} is set by multitask_runs.py for each run; remove it from the arguments after --"
            )
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    return args, recipe


def plan(outdir: Path, methods: Sequence[str], seeds: Sequence[int]) -> list[tuple[int, str]]:
    """The (seed, method) runs whose JSON is not in ``outdir`` yet, seed by seed."""
    return [(s, m) for s in seeds for m in methods if not (outdir / f"{m}_s{s}.json").exists()]


def command(python: str, seed: int, method: str, out: Path, recipe: Sequence[str]) -> list[str]:
    return [
        python,
        str(HERE / "multitask.py"),
        *recipe,
        "--methods",
        method,
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args, recipe = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    todo = plan(args.outdir, methods, parse_seeds(args.seeds))
    partial = args.outdir / "partial"
    partial.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    running: dict[subprocess.Popen, tuple[int, str, float]] = {}
    done: list[str] = []
    failed: list[str] = []
    print(f"{len(todo)} run(s) to do in {args.outdir}, {args.jobs} at a time", flush=True)
    while todo or running:
        late = args.deadline is not None and time.monotonic() - start > args.deadline
        while todo and len(running) < args.jobs and not late:
            seed, method = todo.pop(0)
            stem = f"{method}_s{seed}"
            log = (partial / f"{stem}.log").open("w")
            cmd = command(args.python, seed, method, partial / f"{stem}.md", recipe)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            running[subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)] = (
                seed,
                method,
                time.time(),
            )
            log.close()
            print(f"started {stem}", flush=True)
        if late and todo:
            print(f"deadline ({args.deadline:g} s) passed: {len(todo)} run(s) not started", flush=True)
            todo = []
        for proc in [p for p in running if p.poll() is not None]:
            seed, method, t0 = running.pop(proc)
            stem = f"{method}_s{seed}"
            if proc.returncode == 0 and (partial / f"{stem}.json").exists():
                shutil.move(partial / f"{stem}.json", args.outdir / f"{stem}.json")  # the run counts from here on
                done.append(stem)
                print(f"finished {stem} in {time.time() - t0:.0f} s", flush=True)
            else:
                failed.append(stem)
                print(f"FAILED {stem} (status {proc.returncode}): see {partial / (stem + '.log')}", flush=True)
        if running:
            time.sleep(1.0)
    print(f"done: {len(done)}, failed: {len(failed)}" + (f" ({', '.join(failed)})" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
