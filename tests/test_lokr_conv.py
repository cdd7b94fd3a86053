"""LoKr on Conv2d applied to the activations (``LoKrLayer._conv_post``): the same outputs and gradients as the
convolution with the dense ΔW (``LycorisBase.post``), for every factor form, stride/padding/dilation, both mixing
orders, unbatched inputs and rank dropout; grouped convolutions keep the dense path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.methods.loha import LycorisBase
from adapterkit.methods.lokr import LoKrLayer

CASES = {
    "full": (dict(r=64), dict()),
    "lowrank": (dict(r=1), dict()),
    "both": (dict(r=1, decompose_both=True), dict()),
    "tucker": (dict(r=2, use_effective_conv2d=True), dict()),
    "stride-pad-dil": (dict(r=1), dict(stride=2, padding=2, dilation=2)),
    "tucker-stride": (dict(r=1, use_effective_conv2d=True), dict(stride=2, padding=1)),
    "1x1": (dict(r=1), dict(kernel_size=1, padding=0)),
    "factor2": (dict(r=1, decompose_factor=2), dict(out=12, inp=32)),  # C (2, 2), D (6, 16)
    "mix-first": (dict(r=1), dict(out=8, inp=36)),  # a = 2 < c = 6: C applied before the convolution
    "same-padding": (dict(r=1), dict(padding="same")),
}


def _layer(cfg_kw: dict, conv_kw: dict) -> tuple[nn.Conv2d, LoKrLayer]:
    conv_kw = dict(conv_kw)
    out, inp = conv_kw.pop("out", 24), conv_kw.pop("inp", 16)
    torch.manual_seed(0)
    conv = nn.Conv2d(inp, out, conv_kw.pop("kernel_size", 3), **{"padding": 1, **conv_kw})
    model = nn.Module()
    model.conv = conv
    ad = ak.attach(model)
    ad.add("a", ak.LoKr(alpha=3.0, init_weights=False, targets=("conv",), **cfg_kw))
    comp = ad.components("a")["conv"]
    assert isinstance(comp, LoKrLayer)
    return conv, comp


@pytest.mark.parametrize("case", list(CASES))
def test_matches_dense(case):
    conv, comp = _layer(*CASES[case])
    x = torch.randn(2, conv.in_channels, 9, 9, requires_grad=True)
    y = torch.randn(2, conv.out_channels, *conv(x).shape[-2:])
    got = comp.post(x, y)
    want = LycorisBase.post(comp, x, y)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    params = [x, *comp.parameters()]
    g_got = torch.autograd.grad(got.square().sum(), params)
    g_want = torch.autograd.grad(want.square().sum(), params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    single = comp.post(x[0].detach(), y[0])  # unbatched (C, H, W) input
    torch.testing.assert_close(single, want[0].detach(), atol=1e-5, rtol=1e-4)


def test_rank_dropout_same_masks():
    conv, comp = _layer(dict(r=1, rank_dropout=0.5, module_dropout=0.2), dict())
    comp.train()
    x = torch.randn(2, 16, 7, 7)
    y = torch.zeros(2, 24, 7, 7)
    for seed in range(4):
        torch.manual_seed(seed)
        got = comp.post(x, y)
        torch.manual_seed(seed)
        torch.testing.assert_close(got, LycorisBase.post(comp, x, y), atol=1e-5, rtol=1e-4)


def test_grouped_conv_keeps_dense():
    torch.manual_seed(0)
    model = nn.Module()
    model.conv = nn.Conv2d(16, 24, 3, padding=1, groups=2)
    ad = ak.attach(model)
    ad.add("a", ak.LoKr(r=1, init_weights=False, targets=("conv",)))
    comp = ad.components("a")["conv"]
    x, y = torch.randn(2, 16, 5, 5), torch.zeros(2, 24, 5, 5)
    torch.testing.assert_close(comp.post(x, y), LycorisBase.post(comp, x, y))
