"""``adapterkit train``'s calibration step (``cli/calibration.py``) for LoRA initialized from activations
(``--opt init=eva|corda``): the batches it runs (collated training examples, seeded order, cycled), EVA until
convergence, CorDA a fixed count, the same factors as ``adapters.calibrate`` on those batches, and its errors; and
the CLI end to end (needs the ``train.py`` / ``cli/__init__.py`` patch that calls it)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import adapterkit as ak
from adapterkit.cli import calibration as C

from conftest import make_model

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _dataset(n: int = 10, seed: int = 0) -> list[dict[str, list[int]]]:
    """Encoded causal-LM examples of 3-8 tokens (what ``cli.data.encode`` gives the Trainer)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(3, 9, (1,), generator=g))
        ids = torch.randint(2, 100, (k,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * k, "labels": ids})
    return out


def collate(examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right padding (ids 0, mask 0, labels -100), as transformers' DataCollatorForSeq2Seq."""
    width = max(len(e["input_ids"]) for e in examples)
    pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {k: torch.tensor([e[k] + [v] * (width - len(e[k])) for e in examples]) for k, v in pad.items()}


def _llama(cfg: ak.LoRA) -> ak.Adapters:
    adapters = ak.attach(make_model("llama"))
    adapters.add("a", cfg)
    return adapters


def _factors(adapters: ak.Adapters) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {s: (c.lora_A.detach().clone(), c.lora_B.detach().clone()) for s, c in adapters.components("a").items()}


def test_training_batches_are_seeded_shuffled_and_cycled():
    data = [{"i": i} for i in range(5)]
    batches = list(itertools.islice(C.training_batches(data, list, batch_size=2, seed=3), 6))
    assert [len(b) for b in batches] == [2, 2, 1, 2, 2, 1]  # a pass ends with its short batch
    first, second = [sorted(x["i"] for b in batches[k : k + 3] for x in b) for k in (0, 3)]
    assert first == second == list(range(5))  # each pass covers the set once
    again = list(itertools.islice(C.training_batches(data, list, batch_size=2, seed=3), 6))
    assert again == batches
    assert list(itertools.islice(C.training_batches(data, list, batch_size=2, seed=4), 6)) != batches
    with pytest.raises(C.CalibrationError, match="training set is empty"):
        next(C.training_batches([], list, batch_size=2, seed=0))


def test_eva_runs_until_converged_and_equals_calibrate_on_those_batches():
    cfg = ak.LoRA(init="eva", r=4, eva={"tau": 0.9}, targets=TARGETS)
    data = _dataset()
    adapters = _llama(cfg)
    said: list[str] = []
    ran = C.calibrate_for_training(adapters, "a", data, collate, seed=7, say=said.append)
    assert 1 < ran < C.EVA_MAX_BATCHES  # stopped at convergence
    assert all(c.calibrated for c in adapters.components("a").values())
    assert said and said[0].startswith(f"calibration (eva): {ran} batches of 4 training examples (converged)")
    # the same factors (and EVA ranks) as adapters.calibrate on the first `ran` batches of that order
    direct = _llama(cfg)
    direct.calibrate("a", itertools.islice(C.training_batches(data, collate, batch_size=4, seed=7), ran))
    ours, theirs = _factors(adapters), _factors(direct)
    assert ours.keys() == theirs.keys()
    for site in ours:
        assert torch.equal(ours[site][0], theirs[site][0]) and torch.equal(ours[site][1], theirs[site][1]), site
    # an adapter already calibrated has nothing left to calibrate
    assert C.calibrate_for_training(adapters, "a", data, collate) is None


def test_corda_runs_exactly_the_given_count():
    cfg = ak.LoRA(init="corda", r=2, targets=TARGETS)
    data = _dataset(6)
    adapters = _llama(cfg)
    assert C.calibrate_for_training(adapters, "a", data, collate, batches=5, seed=1) == 5  # cycles 6 examples
    direct = _llama(cfg)
    direct.calibrate("a", list(itertools.islice(C.training_batches(data, collate, batch_size=4, seed=1), 5)))
    for site, (A, B) in _factors(adapters).items():
        A2, B2 = _factors(direct)[site]
        torch.testing.assert_close(A, A2, atol=0, rtol=0)
        torch.testing.assert_close(B, B2, atol=0, rtol=0)
    model = adapters.model
    with torch.no_grad():  # the model runs now (an uncalibrated one refuses)
        model(**collate(data[:2]))


def test_corda_default_is_64_batches_of_4():
    adapters = _llama(ak.LoRA(init="corda", r=2, targets=["o_proj"]))
    assert C.calibrate_for_training(adapters, "a", _dataset(8), collate) == C.CORDA_BATCHES == 64
    assert C.CALIBRATION_BATCH_SIZE == 4


def test_errors_name_what_to_change():
    data = _dataset()
    stuck = _llama(ak.LoRA(init="eva", r=4, eva={"tau": 0.999999}, targets=TARGETS))
    with pytest.raises(C.CalibrationError, match=r"within 3 batches.*--calibration-batches.*tau"):
        C.calibrate_for_training(stuck, "a", data, collate, batches=3)
    plain = _llama(ak.LoRA(targets=TARGETS))
    assert C.calibrate_for_training(plain, "a", data, collate) is None  # nothing to calibrate: nothing runs
    with pytest.raises(C.CalibrationError, match=r"--calibration-batches applies to .*init=eva.*drop the flag"):
        C.calibrate_for_training(plain, "a", data, collate, batches=4)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(C.CalibrationError, match="positive integer"):
            C.calibrate_for_training(plain, "a", data, collate, batches=bad)


# --- the CLI end to end ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from test_cli import files as make_files

    return make_files.__wrapped__(tmp_path_factory)


@pytest.mark.parametrize(
    ("model", "data", "opts"),
    [
        ("llama", "alpaca", ["--task", "causal-lm", "--opt", "init=eva", "--opt", 'eva={"tau": 0.9}']),
        ("bert", "sst", ["--task", "classify", "--opt", "init=corda", "--calibration-batches", "3"]),
    ],
    ids=["eva-causal-lm", "corda-classify"],
)
def test_train_calibrates_then_trains(files, tmp_path, model, data, opts):
    from test_cli import _ok

    out = tmp_path / "run"
    text = _ok("train", "--model", files[model], "--data", files[data], "--method", "lora", "--opt", "r=2",
               "--targets", "attn.q,attn.v", *opts, "--max-steps", "2", "--batch-size", "4", "--no-progress",
               "--threads", "1", "--out", out)  # fmt: skip
    assert "calibration (" in text
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2
    loaded = ak.attach(make_files_model(files, model))
    loaded.load(out)
    lora = [c for c in loaded.components(loaded.names[0]).values() if hasattr(c, "calibrated")]  # not the head
    assert lora and all(c.calibrated for c in lora)


def make_files_model(files, model: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if model == "llama" else AutoModelForSequenceClassification
    return auto.from_pretrained(files[model])


def test_calibration_batches_on_a_plain_lora_is_refused(files, tmp_path):
    from test_cli import _run

    result = _run("train", "--model", files["bert"], "--data", files["sst"], "--task", "classify", "--method", "lora",
                  "--calibration-batches", "4", "--max-steps", "1", "--no-progress", "--out", tmp_path / "o")  # fmt: skip
    assert result.exit_code == 1
    assert "--calibration-batches applies to" in result.output and "drop the flag" in result.output
