"""Conv-Adapter, residual adapters and the AdaptFormer preset (issue 19, item 4) against their papers' equations;
the contract rows are in ``tests/rows_conv_adapter.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.config import get_config
from adapterkit.methods.bottleneck import Bottleneck

from conftest import make_inputs, make_model


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, stride=2)
    )


def test_conv_adapter_is_the_depthwise_bottleneck_with_channel_scale() -> None:
    model = _net()
    x = torch.randn(2, 4, 6, 6)
    conv = model[0]
    adapters = ak.attach(model)
    adapters.add("a", ak.ConvAdapter(targets=["0"], reduction_factor=2, non_linearity="gelu", init_weights=False))
    comp = adapters.components("a")["0"]
    assert comp.down.groups == 2 and comp.down.out_channels == 2 and comp.down.kernel_size == (3, 3)
    with torch.no_grad():
        h = F.conv2d(x, comp.down.weight, comp.down.bias, padding=1, groups=2)
        delta = F.conv2d(F.gelu(h), comp.up.weight, comp.up.bias) * comp.alpha.view(1, -1, 1, 1)
        expected = F.conv2d(x, conv.weight, conv.bias, padding=1) + delta
        torch.testing.assert_close(model[0](x), expected)


def test_default_targets_are_the_kxk_convolutions() -> None:
    for config in (ak.ConvAdapter(), ak.ResidualAdapter(mode="series")):
        adapters = ak.attach(_net())
        assert adapters.plan(config).sites == ["0", "3"]  # not the 1×1 convolution


def test_residual_adapters_follow_rebuffi_and_merge_exactly() -> None:
    x = torch.randn(2, 4, 6, 6)
    for mode in ("parallel", "series"):
        model = _net()
        with torch.no_grad():
            base = model[0](x)
        adapters = ak.attach(model)
        adapters.add("a", ak.ResidualAdapter(targets=["0"], mode=mode, init_weights=False))
        W = adapters.components("a")["0"].weight
        with torch.no_grad():
            src = x if mode == "parallel" else base
            expected = base + F.conv2d(src, W)
            torch.testing.assert_close(model[0](x), expected)
            adapters.merge("a")
            torch.testing.assert_close(model[0].base_layer(x) if hasattr(model[0], "base_layer") else model[0](x),
                                       expected, atol=1e-5, rtol=1e-5)  # fmt: skip
            adapters.unmerge("a")
            torch.testing.assert_close(model[0](x), expected)


def test_refusals_name_what_to_change() -> None:
    adapters = ak.attach(_net())
    with pytest.raises(TypeError, match="use mode='series' there"):
        adapters.add("p", ak.ResidualAdapter(targets=["3"]))  # 3×3 without padding: outputs do not align
    with pytest.raises(ValueError, match="mode must be"):
        ak.ResidualAdapter(mode="sideways")
    with pytest.raises(ValueError, match="non_linearity"):
        ak.ConvAdapter(non_linearity="softmax")
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2))
    adapters = ak.attach(model)
    adapters.add("s", ak.ResidualAdapter(mode="series", targets=["0"], init_weights=False))
    model(torch.randn(1, 4, 5, 5))  # runs on grouped convolutions
    with pytest.raises(TypeError, match="groups=1"):
        adapters.merge("s")


def test_adaptformer_preset_on_vit() -> None:
    cfg = get_config("adaptformer")
    assert isinstance(cfg, Bottleneck)
    assert (cfg.placement.value, cfg.bottleneck_size, cfg.non_linearity, cfg.scaling) == (
        "parallel",
        64,
        "relu",
        0.1,
    )
    model = make_model("vit")
    adapters = ak.attach(model)
    adapters.add("af", get_config("adaptformer", bottleneck_size=8, init_weights=False))
    assert all("mlp" in site or "layernorm" in site for site in adapters.sites("af"))
    model(**make_inputs("vit"))
