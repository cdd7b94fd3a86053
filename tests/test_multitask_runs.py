"""``benchmarks/multitask_runs.py``: seeds parsing, the order and skipping of runs, parallel runs, failures leaving
no JSON, the deadline, and refusals (a fake interpreter stands in for ``multitask.py``)."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import multitask_runs as mr  # noqa: E402

FAKE = """#!{python}
import json, sys, time
argv = sys.argv[2:]  # argv[1] is multitask.py
out = argv[argv.index("--out") + 1]
seed = int(argv[argv.index("--seed") + 1])
method = argv[argv.index("--methods") + 1]
time.sleep(float({sleep!r}))
if seed == 99:
    sys.exit(3)
json.dump({{"args": {{"seed": seed, "methods": method, "recipe": argv}}}}, open(out[:-3] + ".json", "w"))
"""


def fake(tmp_path: Path, sleep: float = 0.0) -> str:
    path = tmp_path / "fake_python"
    path.write_text(FAKE.format(python=sys.executable, sleep=sleep))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_parse_seeds() -> None:
    assert mr.parse_seeds("52-55, 60,53") == [52, 53, 54, 55, 60]
    for bad, msg in (("5x", "not a seed"), ("9-3", "backwards"), (" , ", "empty")):
        with pytest.raises(SystemExit, match=msg):
            mr.parse_seeds(bad)


def test_runs_in_parallel_skip_done_and_keep_failures_out(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    out.mkdir()
    (out / "lora_s1.json").write_text("{}")  # done already: skipped
    assert mr.plan(out, ["lora", "mhr"], [1, 2]) == [(1, "mhr"), (2, "lora"), (2, "mhr")]
    argv = [str(out), "--methods", "lora,mhr", "--seeds", "1,2,99", "--jobs", "3", "--python", fake(tmp_path),
            "--", "--train-size", "8"]  # fmt: skip
    assert mr.main(argv) == 1  # seed 99 fails
    names = sorted(p.name for p in out.glob("*.json"))
    assert names == ["lora_s1.json", "lora_s2.json", "mhr_s1.json", "mhr_s2.json"]
    run = json.loads((out / "mhr_s2.json").read_text())["args"]
    assert run["seed"] == 2 and run["methods"] == "mhr" and run["recipe"][:2] == ["--train-size", "8"]
    assert (out / "partial" / "lora_s99.log").exists() and not (out / "lora_s99.json").exists()
    assert mr.main(argv[:4] + ["1,2"] + argv[5:]) == 0  # everything done: nothing runs


def test_deadline_stops_starting_runs(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    argv = [str(out), "--methods", "lora", "--seeds", "1-4", "--deadline", "0.2", "--python", fake(tmp_path, 0.5)]
    assert mr.main(argv) == 0
    assert [p.name for p in out.glob("*.json")] == ["lora_s1.json"]  # the first ran to its end, no other started


@pytest.mark.parametrize("flag", ["--seed", "--out=x.md", "--methods"])
def test_refuses_what_it_sets(flag: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="set by multitask_runs.py"):
        mr.parse_args([str(tmp_path), "--seeds", "1", "--", flag, "3"])
