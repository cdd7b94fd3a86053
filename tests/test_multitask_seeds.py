"""``benchmarks/multitask_seeds.py``: the seed table that judges issue 20's multi-task target (on synthetic runs)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import multitask_seeds as ms  # noqa: E402

TASKS = ["SST-2", "RTE", "MRPC", "CoLA"]
ARGS = {"train_size": 1000, "dev_size": 1100, "epochs": 3, "lr": None, "methods": "", "out": "x.md", "seed": 0}


def _run(tmp: Path, seed: int, scores: dict[str, list[float]], **override: object) -> Path:
    rows = [
        {
            "method": m,
            "average": sum(s) / len(s),
            "params_per_task": 100,
            "tasks": {t: {"score": x} for t, x in zip(TASKS, s)},
            "command": f"python benchmarks/multitask.py --methods {m} --seed {seed}",
        }
        for m, s in scores.items()
    ]
    path = tmp / f"run_{seed}_{'_'.join(scores)}.json"
    args = {**ARGS, "seed": seed, "methods": ",".join(scores), **override}
    path.write_text(json.dumps({"args": args, "meta": {"tasks": TASKS}, "rows": rows}))
    return path


def test_paired_statistics() -> None:
    p = ms.paired([3.0, 5.0, 4.0], [2.0, 2.0, 2.0])
    assert p["n"] == 3 and p["ahead"] == 3
    assert p["mean"] == pytest.approx(2.0)
    assert p["se"] == pytest.approx(1.0 / math.sqrt(3))
    assert p["t"] == pytest.approx(2.0 * math.sqrt(3))
    assert math.isnan(ms.paired([1.0], [0.0])["se"])


def test_table_pairs_seeds_across_files(tmp_path: Path) -> None:
    runs = [
        _run(tmp_path, 1, {"lora": [80, 50, 70, 10], "mhr": [80, 52, 72, 12]}),
        _run(tmp_path, 2, {"lora": [82, 50, 70, 10]}),
        _run(tmp_path, 2, {"mhr": [82, 50, 70, 14]}),
        _run(tmp_path, 3, {"mhr": [0, 0, 0, 0]}),  # no LoRA at this seed: counted in its mean, not in the pairs
    ]
    out = tmp_path / "seeds.md"
    assert ms.main([str(p) for p in runs] + ["--out", str(out)]) == 0
    text = out.read_text()
    mhr = next(line for line in text.splitlines() if line.startswith("| mhr "))
    cells = [c.strip() for c in mhr.strip("|").split("|")]
    assert cells[2] == "1, 2, 3"
    assert cells[-3:] == ["+1.25 (0.25)", "+5.00", "2/2"]  # paired diffs of the averages: 1.5 and 1.0
    assert "| lora | 100 | 1, 2 |" in text


def test_mixed_recipes_and_duplicates_are_refused(tmp_path: Path) -> None:
    a = _run(tmp_path, 1, {"lora": [80, 50, 70, 10]})
    b = _run(tmp_path, 2, {"lora": [80, 50, 70, 10]}, lr=5e-3)
    with pytest.raises(ValueError, match="another recipe.*'lr'"):
        ms.collect([a, b])
    with pytest.raises(ValueError, match="lora at seed 1 appears twice"):
        ms.collect([a, a])


def test_a_folder_stands_for_its_json_files(tmp_path: Path) -> None:
    _run(tmp_path, 1, {"lora": [80, 50, 70, 10]})
    _run(tmp_path, 2, {"lora": [82, 50, 70, 10], "mhr": [80, 50, 70, 10]})
    _, tasks, rows = ms.collect([tmp_path])
    assert tasks == TASKS and sorted(rows["lora"]) == [1, 2] and sorted(rows["mhr"]) == [2]


@pytest.mark.parametrize(
    ("option", "default", "other"), [("targets", "attn.q,attn.v", "all-linear"), ("device", "cpu", "cuda")]
)
def test_an_option_a_run_predates_takes_its_default(tmp_path: Path, option: str, default: str, other: str) -> None:
    """A run written before the option existed ran at its default (``--device``: on the CPU); another value is
    another recipe."""
    old = _run(tmp_path, 1, {"lora": [80, 50, 70, 10]})  # no ``option`` in its args
    new = _run(tmp_path, 2, {"lora": [82, 50, 70, 10]}, **{option: default})
    recipe, _, rows = ms.collect([old, new])
    assert recipe[option] == default and sorted(rows["lora"]) == [1, 2]
    changed = _run(tmp_path, 3, {"lora": [82, 50, 70, 10]}, **{option: other})
    with pytest.raises(ValueError, match=f"another recipe.*'{option}'"):
        ms.collect([old, changed])


def test_the_model_is_part_of_the_recipe(tmp_path: Path) -> None:
    """``--model`` (e.g. the float16 copy carried to a GPU machine) is another recipe than the package's model, which
    runs without the option used."""
    old = _run(tmp_path, 1, {"lora": [80, 50, 70, 10]})
    same = _run(tmp_path, 2, {"lora": [82, 50, 70, 10]}, model=None)
    assert sorted(ms.collect([old, same])[2]["lora"]) == [1, 2]
    packed = _run(tmp_path, 3, {"lora": [82, 50, 70, 10]}, model=".devpack/model")
    with pytest.raises(ValueError, match="another recipe.*'model'"):
        ms.collect([old, packed])


def test_pooled_devices_keep_each_pair_on_one_device(tmp_path: Path) -> None:
    """``--pool-devices``: CPU and GPU pairs pool into one table that names each seed's device; a seed whose two runs
    differ in device is refused, and without the option the device still separates recipes."""
    cpu = _run(tmp_path, 52, {"lora": [80, 50, 70, 10], "mhr": [81, 50, 70, 11]}, device="cpu")
    gpu = _run(tmp_path, 53, {"lora": [82, 50, 70, 10], "mhr": [82, 52, 70, 12]}, device="cuda")
    with pytest.raises(ValueError, match="another recipe.*'device'"):
        ms.collect([cpu, gpu])
    recipe, _, rows = ms.collect([cpu, gpu], pool_devices=True)
    assert "device" not in recipe and rows["mhr"][53]["device"] == "cuda"
    out = tmp_path / "pooled.md"
    assert ms.main([str(cpu), str(gpu), "--pool-devices", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Devices (each pair on one): cpu: seeds 52; cuda: seeds 53." in text
    assert "| +0.75 (0.25) | +3.00 | 2/2 |" in text  # diffs +0.5 (cpu) and +1.0 (cuda)
    mixed = _run(tmp_path, 54, {"lora": [80, 50, 70, 10]}, device="cpu")
    mixed_gpu = _run(tmp_path, 54, {"mhr": [80, 50, 70, 10]}, device="cuda")
    with pytest.raises(SystemExit, match="seed 54: mhr ran on cuda, lora on cpu; a pair must run on one device"):
        ms.main([str(cpu), str(mixed), str(mixed_gpu), "--pool-devices"])


def test_planned_pairs_mark_an_incomplete_table(tmp_path: Path) -> None:
    runs = [str(_run(tmp_path, s, {"lora": [80, 50, 70, 10], "mhr": [81, 50, 70, 10 + s]})) for s in (1, 2)]
    out = tmp_path / "t.md"
    assert ms.main([*runs, "--planned", "20", "--out", str(out)]) == 0
    assert "**Incomplete** (mhr 2 of the 20 planned pairs): this table decides nothing yet." in out.read_text()
    assert ms.main([*runs, "--planned", "2", "--out", str(out)]) == 0
    assert "**Complete**: all 2 planned pairs have run." in out.read_text()
    with pytest.raises(SystemExit, match="--planned 0"):
        ms.main([*runs, "--planned", "0"])
