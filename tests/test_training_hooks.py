"""Training-time hooks (issue 18, core): ``on_step``/``adapters.step()``, ``aux_loss``/``adapters.aux_loss()``, the
missing-step error, the Trainer callback, adapter-level banks saved once, and the calibration pass. Toy components
here; the methods built on them (DyLoRA, AdaLoRA) have their own files."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.backends import backend_for
from adapterkit.component import Bank, Component

from conftest import make_inputs, make_model


# --- toy methods ----------------------------------------------------------------------------------------------
class ToyScheduled(Component):
    """``y + shift``; records the steps it was told about; aux loss ``weight * ||shift||²``."""

    scheduled = True
    additive = True

    def __init__(self, out_dim: int, weight: float) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(out_dim))
        self.weight = weight
        self.steps: list[int] = []
        self.totals: list[int | None] = []

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.shift

    def on_train_begin(self, total_steps: int | None, step: int = 0) -> None:
        self.totals.append(total_steps)

    def on_step(self, step: int) -> None:
        self.steps.append(step)

    def aux_loss(self) -> torch.Tensor | None:
        return self.weight * (self.shift**2).sum() if self.weight else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Toy(ak.AdapterConfig):
    weight: float = 0.0

    def build(self, module: nn.Module, name: str) -> Component:
        return ToyScheduled(backend_for(module).dims(module)[1], self.weight)


class ToyBank(Bank):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(n))


class ToyBanked(Component):
    additive = True

    def __init__(self, bank: ToyBank, out_dim: int) -> None:
        super().__init__()
        self.share(bank)
        self.scale = nn.Parameter(torch.zeros(out_dim))

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.scale * self.bank.table[: y.shape[-1]]


@ak.register("toy_bank_hooks18")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyBankConfig(ak.AdapterConfig):
    standalone = False  # a test fixture, not a method (kept out of the contract matrix and the CLI)

    def build_all(self, modules, targets, select):
        bank = ToyBank(64)
        return {n: ToyBanked(bank, backend_for(modules[n]).dims(modules[n])[1]) for n in targets}


class ToyCalibrated(Component):
    """Learns nothing; calibration sets ``mean`` to the mean of the module's inputs over every token seen."""

    additive = True

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self._sum = torch.zeros(in_dim, dtype=torch.float64)
        self._count = 0

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).double()
        self._sum += flat.sum(0)
        self._count += flat.shape[0]

    def finish_calibration(self, module: nn.Module) -> None:
        self.mean.copy_((self._sum / self._count).to(self.mean.dtype))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyCalibration(ak.AdapterConfig):
    def build(self, module: nn.Module, name: str) -> Component:
        return ToyCalibrated(backend_for(module).dims(module)[0])


def _llama(config: ak.AdapterConfig) -> tuple[nn.Module, ak.Adapters, dict]:
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", config)
    adapters.train("a")
    model.train()
    x = make_inputs("llama")
    return model, adapters, {**x, "labels": x["input_ids"]}


def _toys(adapters: ak.Adapters, name: str = "a") -> list[ToyScheduled]:
    return list(adapters.components(name).values())


# --- hand-written loop ----------------------------------------------------------------------------------------
def test_hand_written_loop_calls_on_step_and_adds_aux_loss():
    model, adapters, batch = _llama(Toy(weight=0.5, targets=["attn.q", "attn.v"]))
    opt = torch.optim.SGD(adapters.parameters("a"), lr=0.1)
    for _ in range(3):
        loss = model(**batch).loss + adapters.aux_loss()
        loss.backward()
        opt.step()
        assert adapters.step() == adapters.global_step - 1
        opt.zero_grad()
    assert adapters.global_step == 3
    assert all(t.steps == [0, 1, 2] for t in _toys(adapters))


def test_aux_loss_reaches_gradients():
    model, adapters, _ = _llama(Toy(weight=0.5, targets=["attn.q"]))
    with torch.no_grad():
        for t in _toys(adapters):
            t.shift.normal_()
    adapters.aux_loss().backward()
    for t in _toys(adapters):
        torch.testing.assert_close(t.shift.grad, 2 * 0.5 * t.shift.detach())
    # nothing to add: a zero tensor, so `loss + adapters.aux_loss()` works for every method
    assert adapters.aux_loss(names=[]).item() == 0.0


def test_only_trained_adapters_are_stepped():
    model, adapters, _ = _llama(Toy(targets=["attn.q"]))
    adapters.add("b", Toy(targets=["attn.v"]))
    adapters.train("a")  # b frozen
    assert adapters.trained() == ["a"]
    adapters.step()
    assert all(t.steps == [0] for t in _toys(adapters, "a")) and all(not t.steps for t in _toys(adapters, "b"))


# --- the missing-step error -----------------------------------------------------------------------------------
def test_an_optimizer_step_without_adapters_step_raises_at_the_next_forward():
    model, adapters, batch = _llama(Toy(targets=["attn.q"]))
    opt = torch.optim.AdamW(adapters.parameters("a"), lr=1e-2)
    model(**batch).loss.backward()  # accumulating gradients changes nothing
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():  # evaluation is not training
        model(**batch)
    with pytest.raises(RuntimeError, match=r"without calling adapters\.step\(\).*AdapterCallback"):
        model(**batch)
    adapters.step()
    model(**batch).loss.backward()  # fine again
    # a change made by hand is accepted with sync_steps()
    with torch.no_grad():
        _toys(adapters)[0].shift.add_(1.0)
    with pytest.raises(RuntimeError, match="sync_steps"):
        model(**batch)
    adapters.sync_steps()
    model(**batch)


def test_methods_without_a_schedule_need_no_step():
    model, adapters, batch = _llama(ak.LoRA(targets=["attn.q"]))
    opt = torch.optim.SGD(adapters.parameters("a"), lr=0.1)
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    assert adapters._step_hook is None


def test_the_check_hook_goes_with_the_last_scheduled_adapter():
    model, adapters, _ = _llama(Toy(targets=["attn.q"]))
    assert adapters._step_hook is not None
    adapters.delete("a")
    assert adapters._step_hook is None and not model._forward_pre_hooks


# --- Trainer --------------------------------------------------------------------------------------------------
def _trainer(model, tmp_path, callbacks, steps=3):
    from transformers import Trainer, TrainingArguments

    x = make_inputs("llama", batch=8)
    data = [{"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i], "labels": x["input_ids"][i]}
            for i in range(8)]  # fmt: skip
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, remove_unused_columns=False)  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def test_trainer_with_the_callback_steps_and_adds_the_aux_loss(tmp_path):
    from adapterkit.trainer import AdapterCallback

    model, adapters, _ = _llama(Toy(weight=1.0, targets=["attn.q", "attn.v"]))
    seen: list[tuple[float, float]] = []
    real = adapters.aux_loss

    def spy(names=None):
        value = real(names)
        seen.append(value.item())
        return value

    adapters.aux_loss = spy
    _trainer(model, tmp_path, [AdapterCallback(adapters)]).train()
    assert all(t.steps == [0, 1, 2] and t.totals == [3] for t in _toys(adapters))
    assert len(seen) == 3 and seen[0] == 0.0 and seen[-1] > 0  # shift moves away from 0 after the first step
    assert not model._forward_hooks  # the loss hook is gone after training


def test_trainer_without_the_callback_is_refused(tmp_path):
    model, adapters, _ = _llama(Toy(targets=["attn.q"]))
    with pytest.raises(RuntimeError, match=r"adapters\.step\(\)"):
        _trainer(model, tmp_path, []).train()


def test_a_resumed_trainer_continues_the_step_count(tmp_path):
    from adapterkit.trainer import AdapterCallback

    model, adapters, _ = _llama(Toy(targets=["attn.q"]))
    callback = AdapterCallback(adapters)

    class State:
        max_steps, global_step = 10, 4

    callback.on_train_begin(None, State(), None)
    callback.on_optimizer_step(None, State(), None)
    assert all(t.steps == [4] and t.totals == [10] for t in _toys(adapters))
    callback.on_train_end(None, State(), None)


# --- banks ----------------------------------------------------------------------------------------------------
def test_a_bank_is_shared_counted_once_and_saved_once(tmp_path):
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", ToyBankConfig(targets=["attn.q", "attn.v"]))
    comps = list(adapters.components("a").values())
    bank = comps[0].bank
    assert all(c.bank is bank for c in comps) and bank.owner is comps[0]
    params = list(adapters.parameters("a"))
    assert sum(p is bank.table for p in params) == 1
    (row,) = adapters.summary().rows
    assert row["params"] == 64 + sum(c.scale.numel() for c in comps)
    with torch.no_grad():
        for c in comps:
            c.scale.normal_()
    x = make_inputs("llama")
    with torch.no_grad():
        expected = model(**x).logits
    adapters.save("a", tmp_path / "a")
    from safetensors.torch import load_file

    keys = sorted(load_file(tmp_path / "a" / "adapter.safetensors"))
    assert [k for k in keys if k.endswith("bank.table")] == [f"{list(adapters.components('a'))[0]}.bank.table"]
    fresh = make_model("llama")
    fa = ak.attach(fresh)
    fa.load(tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x).logits, expected)
    loaded = list(fa.components("a").values())
    assert all(c.bank is loaded[0].bank for c in loaded)
    torch.testing.assert_close(loaded[0].bank.table, bank.table)


# --- calibration ----------------------------------------------------------------------------------------------
def test_calibration_sees_the_base_inputs_of_every_site():
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("lora", ak.LoRA(targets=["attn.q"], init_weights=False))  # active: calibration runs the base
    adapters.add("c", ToyCalibration(targets=["attn.q", "ffn.down"]))
    batches = [make_inputs("llama", seed=s) for s in range(3)]
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in adapters.components("c")}
    hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].detach()))
             for n in seen]  # fmt: skip
    with adapters.use(), torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    assert adapters.calibrate("c", iter(batches)) == 3
    for n, comp in adapters.components("c").items():
        expected = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[n]]).double().mean(0).float()
        torch.testing.assert_close(comp.mean, expected)
    assert adapters.active == ("lora",)  # calibration changed nothing else
    with pytest.raises(TypeError, match="nothing to calibrate"):
        adapters.calibrate("lora", batches)
    with pytest.raises(ValueError, match="no batches"):
        adapters.calibrate("c", [])


def test_calibration_runs_in_eval_mode_without_grad_and_restores_every_mode():
    """No dropout noise in the statistics (peft calibrates EVA/CorDA in eval mode too); modes come back as they were."""
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("c", ToyCalibration(targets=["attn.q"]))
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back exactly
    before = {n: m.training for n, m in model.named_modules()}
    during = []
    hook = model.register_forward_pre_hook(lambda m, a: during.append((m.training, torch.is_grad_enabled())))
    adapters.calibrate("c", [make_inputs("llama")])
    hook.remove()
    assert during == [(False, False)]
    assert {n: m.training for n, m in model.named_modules()} == before
