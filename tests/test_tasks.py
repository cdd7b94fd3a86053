"""Per-example conditioning (issue 20 core): ``task_ids`` reach components from the model call (stripped before the
base model sees them), from ``adapters.tasks(ids)`` scopes (per thread and per asyncio task), in training (gradient
checkpointing included) and in ``generate``; the model-level hooks exist only while an adapter needs task ids."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import adapterkit as ak
from adapterkit.context import as_task_ids, task_ids

from conftest import make_inputs, make_model

BATCH = 3


def setup(family: str = "llama"):
    model = make_model(family)
    adapters = ak.attach(model)
    adapters.add("p", ak.Poly(r=4, n_tasks=3, n_skills=3, n_splits=2, init_weights=False))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in adapters.parameters("p"):
            p.add_(torch.randn(p.shape, generator=g) * (2.0 if p.dim() == 2 else 0.3))  # tasks far apart
    model.eval()
    return model, adapters, make_inputs(family, batch=BATCH)


@torch.no_grad()
def run(model, x, **kw) -> torch.Tensor:
    return model(**x, **kw).logits


def hooks(model) -> int:
    return len(model._forward_pre_hooks) + len(model._forward_hooks)


def test_call_keyword_equals_scope_and_is_stripped():
    model, adapters, x = setup()
    seen = []
    spy = model.register_forward_pre_hook(lambda m, a, kw: seen.append(sorted(kw)), with_kwargs=True)
    ids = [2, 0, 1]
    by_kw = run(model, x, task_ids=ids)
    spy.remove()
    assert seen and all("task_ids" not in keys for keys in seen)
    with adapters.tasks(ids):
        assert torch.equal(task_ids(), torch.tensor(ids))
        by_scope = run(model, x)
    assert task_ids() is None
    assert torch.equal(by_kw, by_scope)
    assert torch.equal(run(model, x, task_ids=torch.tensor(ids)), by_kw)
    other = run(model, x, task_ids=[1, 1, 1])
    assert (other - by_kw).abs().max() > 1e-3  # tasks differ
    # the call's ids win over an enclosing scope, and end with the call
    with adapters.tasks([1, 1, 1]):
        assert torch.equal(run(model, x, task_ids=ids), by_kw)
        assert torch.equal(task_ids(), torch.tensor([1, 1, 1]))


def test_hooks_exist_only_while_an_adapter_needs_task_ids():
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("l", ak.LoRA())
    assert hooks(model) == 0 and "generate" not in model.__dict__
    adapters.add("p", ak.Poly(n_tasks=2))
    assert hooks(model) == 2 and "generate" in model.__dict__
    adapters.delete("p")
    assert hooks(model) == 0 and "generate" not in model.__dict__
    adapters.add("p", ak.Poly(n_tasks=2))
    adapters.detach()
    assert hooks(model) == 0 and "generate" not in model.__dict__


def test_hook_leaves_no_scope_behind_after_an_error():
    model, adapters, x = setup()
    with pytest.raises(ValueError, match="out of range"):
        run(model, x, task_ids=[0, 1, 7])
    assert task_ids() is None
    with pytest.raises(ValueError, match="3 task ids for a batch of 2 rows"):
        run(model, {k: v[:2] for k, v in x.items()}, task_ids=[0, 1, 2])
    assert task_ids() is None


def test_bad_ids_are_refused():
    with pytest.raises(TypeError, match="integers"):
        as_task_ids([0.5, 1])
    with pytest.raises(TypeError, match="integers"):
        as_task_ids(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="non-negative"):
        as_task_ids([0, -1])
    with pytest.raises(ValueError, match="1-D"):
        as_task_ids(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="one integer per row"):
        as_task_ids(3)


def test_threads_see_their_own_task_ids():
    model, adapters, x = setup()
    refs = {t: run(model, x, task_ids=[t] * BATCH) for t in range(3)}
    wrong: list[str] = []
    barrier = threading.Barrier(3)

    def work(t: int) -> None:
        with adapters.tasks([t] * BATCH):
            barrier.wait()
            for _ in range(3):
                if not torch.equal(run(model, x), refs[t]):
                    wrong.append(str(t))

    pool = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert not wrong


def test_asyncio_tasks_see_their_own_task_ids():
    model, adapters, x = setup()
    refs = {t: run(model, x, task_ids=[t] * BATCH) for t in range(2)}
    got: dict[int, list[bool]] = {0: [], 1: []}

    async def task(t: int) -> None:
        with adapters.tasks([t] * BATCH):
            for _ in range(3):
                await asyncio.sleep(0)
                got[t].append(torch.equal(run(model, x), refs[t]))

    async def main() -> None:
        await asyncio.gather(task(0), task(1))

    asyncio.run(main())
    assert got == {0: [True] * 3, 1: [True] * 3}


def test_training_with_task_ids_and_gradient_checkpointing():
    model, adapters, x = setup()
    adapters.train("p")
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        if checkpointing:
            model.gradient_checkpointing_enable()
        try:
            torch.manual_seed(3)  # the relaxed-Bernoulli samples
            model(**x, task_ids=[2, 0, 1]).logits.pow(2).sum().backward()
        finally:
            model.gradient_checkpointing_disable()
        return [p.grad.clone() for p in adapters.parameters("p")]

    plain = grads(False)
    assert all(g.abs().sum() > 0 for g in plain)
    # checkpointing re-runs forwards in backward (another draw of the samples): compare in eval mode instead
    model.eval()
    for p in adapters.parameters("p"):
        p.requires_grad_(True)

    def eval_grads(checkpointing: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.train()
        for comp in adapters.components("p").values():
            comp.eval()  # deterministic allocation, but the model trains (checkpointing only runs in training)
        if checkpointing:
            model.gradient_checkpointing_enable()
        try:
            with adapters.tasks([2, 0, 1]):
                model(**x).logits.pow(2).sum().backward()
        finally:
            model.gradient_checkpointing_disable()
            model.eval()
        return [p.grad.clone() for p in adapters.parameters("p")]

    for a, b in zip(eval_grads(False), eval_grads(True), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_generate_with_task_ids_and_beams():
    model, adapters, x = setup()
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    ids = [2, 0, 1]
    out = model.generate(x["input_ids"], attention_mask=x["attention_mask"], task_ids=ids, **gen)
    with adapters.tasks(ids):
        scoped = model.generate(x["input_ids"], attention_mask=x["attention_mask"], **gen)
    assert torch.equal(out, scoped)
    beams = model.generate(
        x["input_ids"],
        attention_mask=x["attention_mask"],
        task_ids=ids,
        num_beams=2,
        num_return_sequences=2,
        **gen,
    )
    assert beams.shape[0] == 2 * BATCH
    with adapters.tasks(ids), pytest.raises(ValueError, match="pass generate"):
        model.generate(x["input_ids"], attention_mask=x["attention_mask"], num_beams=2, **gen)
    assert task_ids() is None


def test_encoder_decoder_generate_expands_for_the_decoder():
    model, adapters, x = setup("t5")
    gen = dict(max_new_tokens=3, do_sample=False)
    enc = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]}
    out = model.generate(**enc, task_ids=[2, 0, 1], num_beams=2, **gen)
    assert out.shape[0] == BATCH


def test_trainer_passes_a_task_ids_column(tmp_path):
    """transformers.Trainer calls model(**batch): a ``task_ids`` column reaches the components (keep it with
    ``remove_unused_columns=False``: the Trainer drops columns the forward signature does not name)."""
    from transformers import Trainer, TrainingArguments

    from adapterkit.trainer import AdapterCallback

    model, adapters, _ = setup()
    x = make_inputs("llama", batch=8)
    data = [{"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i], "labels": x["input_ids"][i],
             "task_ids": torch.tensor(i % 3)} for i in range(8)]  # fmt: skip
    seen: list[list[int]] = []
    comp = next(iter(adapters.components("p").values()))
    original = comp.factors
    comp.factors = lambda ids: (seen.append(ids.tolist()), original(ids))[1]
    before = [p.detach().clone() for p in adapters.parameters("p")]
    adapters.train("p")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, remove_unused_columns=False)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[AdapterCallback(adapters)]).train()
    assert seen and all(len(ids) == 4 for ids in seen)
    assert sorted({i for ids in seen for i in ids}) == [0, 1, 2]
    assert any(not torch.equal(a, b) for a, b in zip(before, adapters.parameters("p")))


@pytest.mark.slow
def test_compiled_model_reads_task_ids():
    torch._dynamo.reset()
    model, adapters, x = setup()
    refs = {t: run(model, x, task_ids=[t] * BATCH) for t in range(3)}
    compiled = torch.compile(model, backend="eager")
    for t in (0, 1, 2, 0):
        with adapters.tasks([t] * BATCH), torch.no_grad():
            torch.testing.assert_close(compiled(**x).logits, refs[t], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**x, task_ids=[2] * BATCH).logits, refs[2], atol=1e-6, rtol=0)
