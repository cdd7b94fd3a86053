"""``adapters.freeze_norm_statistics()`` (issue 19, item 8): a train step on a CNN with a frozen base changes its
BatchNorm running statistics (what peft and plain PyTorch do too); with frozen statistics it changes nothing but
the adapter, and ``detach()`` then gives back the original state_dict bit for bit."""

from __future__ import annotations

import copy

import torch
from torch import nn

import adapterkit as ak


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip


def _step(model: nn.Module, adapters: ak.Adapters) -> None:
    model.train()
    opt = torch.optim.SGD(adapters.parameters("a"), lr=0.1)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model(x).sum().backward()
    opt.step()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_train_step_changes_batchnorm_buffers_unless_frozen() -> None:
    model = _cnn()
    before = _state(model)
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=2, targets=["0", "3", "8"], init_weights=False))
    adapters.train("a")
    _step(model, adapters)
    changed = {k for k, v in adapters.detach().state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{i}.{b}" for i in (1, 4) for b in ("running_mean", "running_var", "num_batches_tracked")}

    model = _cnn()
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=2, targets=["0", "3", "8"], init_weights=False))
    adapters.train("a")
    adapters.freeze_norm_statistics()
    lora = [p.clone() for p in adapters.parameters("a")]
    _step(model, adapters)
    assert any(not torch.equal(p, q) for p, q in zip(adapters.parameters("a"), lora, strict=True))  # it trained
    assert model[1].training is False and model[0].training is True
    detached = adapters.detach().state_dict()
    assert detached.keys() == before.keys() and all(torch.equal(detached[k], before[k]) for k in before)
    assert not any(model[i]._forward_pre_hooks for i in (1, 4))  # detach removed the hooks


def test_frozen_statistics_normalize_like_eval_mode_and_can_be_released() -> None:
    model = _cnn()
    reference = copy.deepcopy(model).eval()
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=2, targets=["8"]))  # identity at init
    adapters.freeze_norm_statistics()
    model.train()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    adapters.freeze_norm_statistics(False)
    model.train()
    assert model[1].training
    mean = model[1].running_mean.clone()
    with torch.no_grad():
        model(x)
    assert not torch.equal(model[1].running_mean, mean)
