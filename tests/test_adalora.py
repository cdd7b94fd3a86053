"""AdaLoRA (issue 18): the same rank allocation as peft's ``AdaLoraModel.update_and_allocate`` step by step on a
fixed-seed toy run, peft's saved directories load with equal logits, ours export to peft, the orthogonality
regularizer through ``aux_loss``, and the errors of a wrong training loop."""

from __future__ import annotations

import warnings

import pytest
import torch

import adapterkit as ak

from conftest import make_inputs, make_model

TARGETS = ["q_proj", "v_proj", "down_proj"]
SCHEDULE = dict(
    init_r=6, target_r=2, tinit=1, tfinal=3, deltaT=2, total_step=9, lora_alpha=16, orth_reg_weight=0.3
)


def _peft(family: str = "llama", targets=TARGETS, **over):
    from peft import AdaLoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = "CAUSAL_LM"  # peft adds its regularizer in AdaLoraModel.forward, which only task wrappers call
        cfg = AdaLoraConfig(target_modules=list(targets), task_type=task, **{**SCHEDULE, **over})
        return get_peft_model(make_model(family), cfg)


def _ours(family: str = "llama", targets=TARGETS, **over):
    s = {**SCHEDULE, **over}
    model = make_model(family)
    adapters = ak.attach(model)
    cfg = ak.AdaLoRA(init_r=s["init_r"], target_r=s["target_r"], tinit=s["tinit"], tfinal=s["tfinal"],
                     delta_t=s["deltaT"], total_step=s["total_step"], alpha=s["lora_alpha"],
                     orth_reg_weight=s["orth_reg_weight"], targets=list(targets))  # fmt: skip
    adapters.add("default", cfg)
    return model, adapters


def _copy_init(pm, adapters) -> None:
    peft_params = dict(pm.named_parameters())
    with torch.no_grad():
        for site, comp in adapters.components("default").items():
            for t in ("lora_A", "lora_E", "lora_B"):
                getattr(comp, t).copy_(peft_params[f"base_model.model.{site}.{t}.default"])


def _batch(step: int) -> dict:
    x = make_inputs("llama", batch=2, seq=6, seed=100 + step)
    return {**x, "labels": x["input_ids"]}


def _peft_masks(pm) -> dict[str, list[bool]] | None:
    pattern = pm.peft_config["default"].rank_pattern
    if pattern is None:
        return None
    return {k.replace(".default", "").removesuffix(".lora_E"): list(v) for k, v in pattern.items()}


@pytest.fixture(scope="module")
def trained_pair():
    """peft and adapterkit trained side by side for 12 steps (warm-up, cubic budget, final phase) with AdamW;
    the masks after every step."""
    torch.manual_seed(0)
    pm = _peft()
    model, adapters = _ours()
    _copy_init(pm, adapters)
    with torch.no_grad():  # a non-zero start, so every factor gets gradients from the first step
        for p in [p for n, p in pm.named_parameters() if "lora_E" in n]:
            p.normal_(std=0.5)
    _copy_init(pm, adapters)
    pm.train()
    model.train()
    adapters.train("default")
    opt_p = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    opt_o = torch.optim.AdamW(list(adapters.parameters("default")), lr=2e-2)
    history = []
    for step in range(12):
        batch = _batch(step)
        pm(**batch).loss.backward()
        opt_p.step()
        pm.base_model.update_and_allocate(step)
        opt_p.zero_grad()
        loss = model(**batch).loss + adapters.aux_loss()
        loss.backward()
        opt_o.step()
        adapters.step()
        opt_o.zero_grad()
        ours = {site: c.rank_mask.tolist() for site, c in adapters.components("default").items()}
        history.append((step, _peft_masks(pm), ours, _max_diff(pm, adapters)))
    return pm, model, adapters, history


def _max_diff(pm, adapters) -> float:
    peft_params = dict(pm.named_parameters())
    worst = 0.0
    for site, comp in adapters.components("default").items():
        for t in ("lora_A", "lora_E", "lora_B"):
            ref = peft_params[f"base_model.model.{site}.{t}.default"]
            worst = max(worst, (getattr(comp, t) - ref).abs().max().item())
    return worst


def test_rank_allocation_equals_peft_step_by_step(trained_pair):
    pm, model, adapters, history = trained_pair
    allocated = 0
    for step, theirs, ours, diff in history:
        assert diff < 1e-4, f"step {step}: parameters differ by {diff}"
        if theirs is not None:
            assert ours == theirs, f"step {step}: masks differ"
            allocated += 1
    # the schedule ran: warm-up without masks, several allocations, then the final budget of target_r per weight
    assert history[0][1] is None and allocated >= 4
    final = history[-1][2]
    assert sum(sum(k) for k in final.values()) == SCHEDULE["target_r"] * len(final)
    assert len({sum(k) for k in final.values()}) > 1  # the budget moved between weights
    for c in adapters.components("default").values():  # masked singular values stay zero in the final phase
        assert (c.lora_E[~c.rank_mask] == 0).all()


def test_orthogonality_regularizer_equals_peft(trained_pair):
    pm, model, adapters, _ = trained_pair
    batch = _batch(99)
    pm.eval()
    model.eval()
    with torch.no_grad():
        with_reg = pm(**batch).loss  # peft adds orth_reg_weight * mean ||..||_F to the model's loss
        plain = model(**batch).loss
        torch.testing.assert_close(with_reg, plain + adapters.aux_loss(), atol=1e-5, rtol=1e-5)
    # and it reaches the gradients of P and Q
    adapters.aux_loss().backward()
    comp = next(iter(adapters.components("default").values()))
    assert comp.lora_A.grad.abs().sum() > 0 and comp.lora_B.grad.abs().sum() > 0
    for p in adapters.parameters("default"):
        p.grad = None


def test_peft_saved_directory_loads_with_equal_logits(trained_pair, tmp_path):
    pm, _, _, _ = trained_pair
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    x = _batch(50)
    with torch.no_grad():
        expected = pm(**{k: v for k, v in x.items() if k != "labels"}).logits
    fresh = make_model("llama")
    adapters = ak.attach(fresh)
    adapters.load(tmp_path / "peft")
    assert adapters.config("default").total_step == SCHEDULE["total_step"]
    with torch.no_grad():
        got = fresh(**{k: v for k, v in x.items() if k != "labels"}).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the pattern came back as our mask
    pattern = _peft_masks(pm)
    assert {s: c.rank_mask.tolist() for s, c in adapters.components("default").items()} == pattern


def test_export_loads_in_peft_with_equal_logits(trained_pair, tmp_path):
    from peft import PeftModel

    _, model, adapters, _ = trained_pair
    model.eval()
    adapters.export("default", tmp_path / "ours", format="peft")
    x = {k: v for k, v in _batch(51).items() if k != "labels"}
    with torch.no_grad():
        expected = model(**x).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(make_model("llama"), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(**x).logits, expected, atol=1e-5, rtol=0)
    # and a native save keeps the mask
    adapters.save("default", tmp_path / "native")
    fresh = make_model("llama")
    fa = ak.attach(fresh)
    fa.load(tmp_path / "native")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x).logits, expected, atol=1e-6, rtol=0)
    mine = {s: c.rank_mask.tolist() for s, c in adapters.components("default").items()}
    assert {s: c.rank_mask.tolist() for s, c in fa.components("default").items()} == mine


def test_gpt2_conv1d_round_trips_through_peft(tmp_path):
    from peft import PeftModel

    model = make_model("gpt2")
    adapters = ak.attach(model)
    adapters.add(
        "default", ak.AdaLoRA(init_r=4, target_r=2, total_step=10, targets=["attn.qkv"], init_weights=False)
    )
    comp = next(iter(adapters.components("default").values()))
    with torch.no_grad():
        comp.rank_mask[1] = False
        comp.lora_E[1] = 0
    adapters.export("default", tmp_path / "p", format="peft")
    x = make_inputs("gpt2")
    with torch.no_grad():
        expected = model(**x).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(make_model("gpt2"), tmp_path / "p").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(**x).logits, expected, atol=1e-5, rtol=0)
    fa = ak.attach(make_model("gpt2"))
    fa.load(tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(fa.model(**x).logits, expected, atol=1e-6, rtol=0)


def test_a_wrong_training_loop_gets_clear_errors():
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.AdaLoRA(init_r=4, target_r=2))  # total_step left to the trainer
    adapters.train("a")
    model.train()
    x = _batch(0)
    opt = torch.optim.SGD(adapters.parameters("a"), lr=0.1)
    (model(**x).loss + adapters.aux_loss()).backward()
    opt.step()
    with pytest.raises(ValueError, match=r"total_step.*begin_training"):
        adapters.step()
    adapters.begin_training(10)
    opt.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        adapters.step()
    with pytest.raises(ValueError, match="no budgeting phase"):
        ak.AdaLoRA(init_r=4, target_r=2, tinit=3, total_step=3)
    with pytest.raises(ValueError, match="target_r"):
        ak.AdaLoRA(init_r=4, target_r=5)


def test_trainer_with_the_callback_takes_total_step_and_allocates(tmp_path):
    from transformers import Trainer, TrainingArguments

    from adapterkit.trainer import AdapterCallback

    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.AdaLoRA(init_r=4, target_r=2))  # total_step from the Trainer's max_steps
    adapters.train("a")
    data = [_batch(i) for i in range(4)]
    data = [{k: v[0] for k, v in b.items()} for b in data]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=1, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[AdapterCallback(adapters)]).train()
    comps = list(adapters.components("a").values())
    assert comps[0].allocator.total_step == 4 and adapters.global_step == 4
    assert sum(int(c.rank_mask.sum()) for c in comps) == 2 * len(comps)  # the budget reached target_r per weight
