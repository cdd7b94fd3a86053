"""The shared SST-2 files the demo reads: present, intact, and parsed the way the demo parses them."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sst2(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "glue" / "SST-2"
    if not path.is_dir():
        pytest.skip(f"SST-2 is missing from {path}")
    return path


def _demo():
    spec = importlib.util.spec_from_file_location("lora_sst2_demo_data", ROOT / "examples" / "lora_sst2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("split", ["train.tsv", "dev.tsv"])
def test_sst2_checksums(sst2, split):
    sums = {}
    for line in (sst2.parent / "SHA256SUMS").read_text().splitlines():
        digest, _, name = line.partition("  ")
        sums[name.removeprefix("./")] = digest
    assert hashlib.sha256((sst2 / split).read_bytes()).hexdigest() == sums[f"SST-2/{split}"]


def test_demo_reads_every_row(sst2):
    demo = _demo()
    train, dev = demo.read_tsv(sst2 / "train.tsv"), demo.read_tsv(sst2 / "dev.tsv")
    assert (len(train), len(dev)) == (67_349, 872)  # ../shared/data/README.md
    for rows in (train, dev):
        assert {y for _, y in rows} == {0, 1}
        assert all(s and "\t" not in s for s, _ in rows)
    # both classes are well represented, so 50% is the chance baseline the demo must beat
    assert 0.4 < sum(y for _, y in dev) / len(dev) < 0.6


def test_demo_batches_cover_the_data_each_epoch():
    demo = _demo()
    rows = [(str(i), i % 2) for i in range(10)]
    got = list(demo.batches(rows, batch_size=4, steps=5, seed=0))
    assert [len(b) for b in got] == [4] * 5
    flat = [s for b in got for s, _ in b]
    assert sorted(flat[:10]) == sorted(s for s, _ in rows)  # first epoch: every row once
    assert list(demo.batches(rows, 4, 5, seed=0)) == got  # deterministic for a seed
