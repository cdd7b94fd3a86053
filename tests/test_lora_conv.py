"""LoRA/DoRA on Conv1d, Conv3d and grouped/depthwise Conv2d (``methods/lora_conv.py``) against peft's
``lora.ConvNd``: outputs equal after perturbing, files both ways, merges (refused for grouped convolutions, as
peft), errors. Models: a small CNN with every kind, Wav2Vec2's feature encoder, ConvNeXt's depthwise convolutions.
Mamba's depthwise ``conv1d`` is left out: transformers 5 never calls it as a module (``causal_conv1d_fn`` gets
``conv1d.weight``), so no hook-based adapter acts there, and peft refuses it for Mamba models.

``LoRA.accepts``/``LoRA.build`` hand these modules to ``lora_conv``; the ``hooked`` fixture asserts it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.methods import lora_conv
from adapterkit.methods.lora import LoRA

peft = pytest.importorskip("peft")


@pytest.fixture
def hooked():
    assert LoRA(targets=["x"]).accepts(nn.Conv1d(2, 2, 1)), "lora.py must hand convolutions to lora_conv"


class Net(nn.Module):
    """Conv1d (strided) -> depthwise Conv2d -> grouped Conv2d (groups 2, no bias) -> Conv3d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.g2 = nn.Conv2d(8, 6, 3, padding=1, groups=2, bias=False)
        self.c3 = nn.Conv3d(6, 4, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x).unflatten(2, (2, 4))  # (N, 8, 2, 4)
        h = self.g2(torch.relu(self.dw(h)))
        return self.c3(h.unsqueeze(2))


def _net() -> nn.Module:
    return Net()


def _wav2vec2() -> nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    return Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                                        conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                        num_conv_pos_embedding_groups=4, vocab_size=20))  # fmt: skip


def _convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(
        num_channels=3,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_stages=2,
        num_labels=3,
        image_size=32,
        layer_scale_init_value=1.0,  # the default 1e-6 hides the blocks (and any adapter in them) from the output
    )
    return ConvNextForImageClassification(cfg)


def _inputs(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if family == "net":
        return {"x": torch.randn(2, 4, 16, generator=g)}
    if family == "wav2vec2":
        return {"input_values": torch.randn(2, 400, generator=g)}
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}


FACTORIES = {"net": _net, "wav2vec2": _wav2vec2, "convnext": _convnext}

# (id, family, peft LoraConfig kwargs, our config)
CASES = [
    ("net-all", "net", dict(r=8, target_modules=["c1", "dw", "g2", "c3"]), ak.LoRA(r=8, targets=["c1", "dw", "g2", "c3"])),
    ("net-dora", "net", dict(r=4, target_modules=["c1", "c3"], use_dora=True), ak.LoRA(r=4, dora=True, targets=["c1", "c3"])),
    ("net-rslora-bias", "net", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["c1", "dw"], bias="lora_only"),
     ak.LoRA(r=8, alpha=4, rslora=True, targets=["c1", "dw"], bias="lora_only")),
    ("wav2vec2-feature-encoder", "wav2vec2", dict(r=4, target_modules=["conv_layers.0.conv", "conv_layers.1.conv"], use_dora=True),
     ak.LoRA(r=4, dora=True, targets=["conv_layers.0.conv", "conv_layers.1.conv"])),
    ("convnext-depthwise", "convnext", dict(r=16, target_modules=["dwconv"]), ak.LoRA(r=16, targets=["dwconv"])),
]  # fmt: skip


def make(family: str) -> nn.Module:
    torch.manual_seed(0)
    return FACTORIES[family]().eval()


@torch.no_grad()
def run(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**x)
    out = (
        out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out.last_hidden_state)
    )
    return out.detach().clone()


@torch.no_grad()
def perturb(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize(("case", "family", "peft_kwargs", "config"), CASES, ids=[c[0] for c in CASES])
def test_equal_to_peft_both_ways(hooked, case, family, peft_kwargs, config, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    x = _inputs(family)
    base = run(make(family), x)
    reference = get_peft_model(make(family), LoraConfig(init_lora_weights=False, **peft_kwargs)).eval()
    bias = peft_kwargs.get("bias", "none") != "none"  # peft trains the base bias itself
    trained = [
        p for n, p in reference.named_parameters() if "lora_" in n or (bias and n.endswith("base_layer.bias"))
    ]
    perturb(trained, 7)
    expected = run(reference, x)
    assert (expected - base).abs().max() > 1e-3
    reference.save_pretrained(tmp_path / "p")

    model = make(family)
    adapters = ak.attach(model)
    adapters.load(tmp_path / "p", "p")
    assert all(isinstance(c, lora_conv.LoRAConv) for c in adapters.components("p").values())
    torch.testing.assert_close(run(model, x), expected, atol=1e-5, rtol=1e-5)

    adapters.export("p", tmp_path / "ours")
    loaded = PeftModel.from_pretrained(make(family), tmp_path / "ours").eval()
    torch.testing.assert_close(run(loaded, x), expected, atol=1e-5, rtol=1e-5)

    # ours from scratch has peft's tensor names and shapes
    fresh = make(family)
    ak.attach(fresh).add("a", config)
    ak.attach(fresh).export("a", tmp_path / "fresh")
    from safetensors.torch import load_file

    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "fresh" / "adapter_model.safetensors").items()}
    assert shapes == {
        k: tuple(v.shape) for k, v in load_file(tmp_path / "p" / "adapter_model.safetensors").items()
    }


def test_merge_ungrouped_refuse_grouped(hooked):
    x = _inputs("net")
    model = make("net")
    adapters = ak.attach(model)
    adapters.add("plain", ak.LoRA(r=4, targets=["c1", "c3"], init_weights=False))
    adapters.add("dora", ak.LoRA(r=4, dora=True, targets=["c1", "c3"], init_weights=False))
    adapters.add("grouped", ak.LoRA(r=8, targets=["dw", "g2"], init_weights=False))
    for name in adapters.names:
        perturb(adapters.parameters(name), 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("plain", "dora"):
        with adapters.use(name):
            unmerged = run(model, x)
            adapters.merge(name)
            torch.testing.assert_close(run(model, x), unmerged, atol=1e-5, rtol=1e-5)
        with adapters.use():
            torch.testing.assert_close(run(model, x), unmerged, atol=1e-5, rtol=1e-5)
        adapters.unmerge(name)
    with pytest.raises(TypeError, match="cannot be merged"):
        adapters.merge("grouped")
    after = model.state_dict()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    adapters.detach()  # merge -> unmerge is exact to rounding, not bit-exact (DEVELOPERS.md)
    assert all(torch.allclose(before[k], v, atol=1e-6) for k, v in model.state_dict().items())


def test_train_step_then_detach_is_bit_exact(hooked, tmp_path):
    x = _inputs("net")
    model = make("net")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=8, targets=["c1", "dw", "g2", "c3"], bias="lora_only"))
    adapters.train("a")
    model(**x).square().mean().backward()
    own = {id(p) for p in adapters.parameters("a")}
    assert all(p.grad is None for p in model.parameters() if id(p) not in own)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters("a"))
    perturb(adapters.parameters("a"), 5)
    expected = run(model, x)
    adapters.save("a", tmp_path / "a")
    fresh = make("net")
    ak.attach(fresh).load(tmp_path / "a")
    torch.testing.assert_close(run(fresh, x), expected, atol=1e-6, rtol=0)
    adapters.detach()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_errors_name_what_to_change(hooked):
    model = make("net")
    adapters = ak.attach(model)
    with pytest.raises(TypeError, match=r"multiple of the groups.*rank_pattern=\{'dw': 8\}"):
        adapters.add("a", ak.LoRA(r=6, targets=["dw"]))
    with pytest.raises(TypeError, match="DoRA on the grouped convolution 'g2'"):
        adapters.add("a", ak.LoRA(r=4, dora=True, targets=["g2"]))
    with pytest.raises(TypeError, match="linear-like modules only"):
        adapters.add("a", ak.LoRA(r=4, init="pissa", targets=["c1"]))
    assert adapters.names == []
