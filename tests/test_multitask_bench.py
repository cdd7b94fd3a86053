"""``benchmarks/multitask.py``'s option plumbing (``--targets``, ``--lr-router``) on a tiny random BERT."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

import adapterkit as ak

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import multitask as mt  # noqa: E402


def _bert() -> BertModel:
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=50
    )
    return BertModel(cfg)


def test_targets_option() -> None:
    assert mt.parse_targets("attn.q, attn.v") == ["attn.q", "attn.v"]
    assert mt.parse_targets("all-linear") == "all-linear"
    with pytest.raises(SystemExit, match="--targets is empty"):
        mt.parse_targets(" , ")
    adapters = ak.attach(_bert())
    adapters.add("a", mt.make_config("lora", 4, mt.parse_targets("all-linear")))
    assert len(adapters.sites("a")) == 2 * 6 + 1  # q, k, v, attention output, FFN up and down per layer; pooler
    roles = "attn.q,attn.k,attn.v,attn.out,ffn.up,ffn.down"
    adapters.add("r", mt.make_config("mhr", 4, mt.parse_targets(roles)))
    assert len(adapters.sites("r")) == 2 * 6 and not any("pooler" in s for s in adapters.sites("r"))


@pytest.mark.parametrize("method", ["mhr", "molora"])
def test_router_rate_splits_the_routing_parameters(method: str) -> None:
    adapters = ak.attach(_bert())
    adapters.add(method, mt.make_config(method, 4, ["attn.q", "attn.v"]))
    params = {id(p) for p in adapters.parameters(method)}
    (one,) = mt.adapter_groups(adapters, method, 2e-3, None)
    assert {id(p) for p in one["params"]} == params and len(one["params"]) == len(params)
    rest, routing = mt.adapter_groups(adapters, method, 2e-3, 0.1)
    assert (rest["lr"], routing["lr"]) == (2e-3, 0.1)
    assert {id(p) for p in rest["params"]} | {id(p) for p in routing["params"]} == params
    assert not {id(p) for p in rest["params"]} & {id(p) for p in routing["params"]}
    names = {n for c in adapters.components(method).values() for n, p in c.named_parameters()
             if any(p is q for q in routing["params"])}  # fmt: skip
    assert names == ({"poly_router.module_logits"} if method == "mhr" else {"router.weight"})


def test_collate_puts_the_batch_on_the_device() -> None:
    batch = mt.collate([([1, 2, 3], [0, 0, 0], 1), ([4, 5], [0, 1], 0)], pad=0, device="meta")
    assert {v.device.type for v in batch.values()} == {"meta"}
    assert batch["input_ids"].shape == (2, 3) and batch["labels"].shape == (2,)


def test_device_option_names_what_to_change() -> None:
    mt.check_device("cpu")
    with pytest.raises(SystemExit, match="not a torch device"):
        mt.check_device("gpu0")
    with pytest.raises(SystemExit, match="cpu or cuda"):
        mt.check_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device.*--device cpu"):
            mt.check_device("cuda")
    else:
        with pytest.raises(SystemExit, match="lower index"):
            mt.check_device(f"cuda:{torch.cuda.device_count()}")


def _tiny_data(n_tasks: int, rows: int) -> dict:
    gen = torch.Generator().manual_seed(0)

    def example() -> tuple[list[int], list[int], int]:
        n = int(torch.randint(3, 9, (1,), generator=gen))
        ids = torch.randint(1, 50, (n,), generator=gen).tolist()
        return ids, [0] * n, int(ids[1] % 2)

    split = {t: [example() for _ in range(rows)] for t in range(n_tasks)}
    return {"tasks": list(mt.TASKS[:n_tasks]), "train": split, "dev": split, "positive": dict.fromkeys(split, 1),
            "pad": 0}  # fmt: skip


ROWS = {"lt_sft": {"lt_sft", "full", "lt_sft_composed"}}


@pytest.mark.parametrize("method", list(mt.METHODS))
def test_run_method_end_to_end_on_a_tiny_model(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every method's training and scoring path (per-task, routed, two-pass, sparse recipes), on a tiny random BERT
    (the real model and GLUE are what the benchmark itself reads)."""

    def load(n_tasks: int, seed: int, pooling: str = "mean", device: str = "cpu", path=None) -> mt.MultiTaskModel:
        assert path is None  # no --model: the package's encoder, here the tiny BERT
        torch.manual_seed(seed)
        return mt.MultiTaskModel(_bert(), n_tasks, pooling).to(device)

    monkeypatch.setattr(mt, "load_model", load)
    args = mt.parse_args(["--epochs", "1", "--batch-size", "4", "--device", "cpu"])
    rows = mt.run_method(method, args, _tiny_data(2, 8))
    assert {r["method"] for r in rows} == ROWS.get(method, {method})
    for row in rows:
        assert set(row["tasks"]) == {"SST-2", "RTE"} and row["params_per_task"] > 0 and row["train_rows"] >= 16
        assert all(0 <= s["score"] <= 100 for s in row["tasks"].values())
