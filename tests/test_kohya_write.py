"""Writing kohya-ss / LyCORIS single files (``formats/kohya_write.py``): our adapter -> kohya file -> the reader
(``formats/kohya.py``) -> the same outputs, for each method; the keys are kohya's names; refusals write nothing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import adapterkit as ak
from adapterkit.formats import kohya, kohya_write
from adapterkit.formats.kohya_write import KohyaWriteError
from adapterkit.methods.lycoris_oft import LycorisOFT

SITES = ("blocks.0", "blocks.1", "blocks.2", "blocks.3")


class Net(nn.Module):
    """Linear 32->48, 3×3 Conv2d 16->32, 1×1 Conv2d 32->16, Linear 64->32 without bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            [
                nn.Linear(32, 48),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.Conv2d(32, 16, 1),
                nn.Linear(64, 32, bias=False),
            ]
        )

    def forward(self, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
        lin = self.blocks[0](x[0])
        conv = self.blocks[2](self.blocks[1](x[1]))
        return torch.cat([lin.flatten(), conv.flatten(), self.blocks[3](x[2]).flatten()])


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 32, generator=g), torch.randn(2, 16, 6, 6, generator=g), torch.randn(3, 64, generator=g)


@torch.no_grad()
def _randomize(ad: ak.Adapters, name: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for comp in ad.components(name).values():
        for pname, p in comp.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if pname == "rescale" else 0.0))


def _round_trip(cfg, tmp_path, *, seed: int = 0, **save_kw):
    """Add ``cfg`` on Net (random values), write it, read it back onto a fresh Net: both outputs, the keys, the
    reloaded Adapters."""
    model = Net().eval()
    ad = ak.attach(model)
    ad.add("a", cfg)
    _randomize(ad, "a", seed)
    ad.activate("a")
    path = tmp_path / "net.safetensors"
    kohya_write.save(ad, "a", path, **save_kw)
    other = Net().eval()
    bd = ak.attach(other)
    kohya.load(bd, path, name="k", activate=True)
    with torch.no_grad():
        want, got, base = model(_inputs()), other(_inputs()), Net()(_inputs())
    assert not torch.allclose(want, base, atol=1e-3)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    return want, got, keys, bd


CASES = {
    "lora": ak.LoRA(r=4, alpha=2.0, targets=SITES, init_weights=False),
    "lora-rslora-patterns": ak.LoRA(
        r=4, alpha=3.0, rslora=True, rank_pattern={"blocks.1": 2}, alpha_pattern={"blocks.3": 7.0}, targets=SITES
    ),
    "loha": ak.LoHa(r=3, alpha=2.0, targets=SITES),
    "loha-tucker": ak.LoHa(r=2, alpha=1.0, use_effective_conv2d=True, targets=SITES),
    "loha-abba-r2": ak.LoHa(r=2, r2=3, alpha=2.0, targets=SITES),
    "lokr": ak.LoKr(r=2, alpha=4.0, targets=SITES),
    "lokr-both": ak.LoKr(r=1, alpha=2.0, decompose_both=True, targets=SITES),
    "lokr-tucker": ak.LoKr(r=1, alpha=1.0, use_effective_conv2d=True, targets=SITES),
    "lokr-full": ak.LoKr(r=64, alpha=3.0, targets=SITES),  # both factors full: scale folded into lokr_w1
    "lokr-factor4": ak.LoKr(r=1, alpha=1.0, decompose_factor=4, targets=SITES),
    # W1 low-rank with W2 full (a factor above √dim, peft's rule: (16, dim / 16)): written with a full lokr_w1
    "lokr-both-w2-full": ak.LoKr(r=3, alpha=2.0, decompose_both=True, decompose_factor=16, targets=SITES),
    "diag-oft": LycorisOFT(block_size=4, alpha=0.0, targets=SITES),
    "diag-oft-rescaled": LycorisOFT(block_size=8, alpha=1e-3, rescaled=True, targets=SITES),
}
TENSORS = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"},
    "diag": {"oft_blocks", "rescale", "alpha"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(tmp_path, case):
    want, got, keys, bd = _round_trip(CASES[case], tmp_path)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    stems = {k.split(".", 1)[0] for k in keys}
    assert stems == {f"lora_unet_blocks_{i}" for i in range(4)}
    tensors = {k.split(".", 1)[1] for k in keys}
    allowed = TENSORS[case.split("-")[0]] | ({"hada_t1", "hada_t2"} if case == "loha-tucker" else set())
    assert tensors <= allowed and "alpha" in tensors
    assert all(f"lora_unet_blocks_{i}.alpha" in keys for i in range(4))  # LyCORIS's loaders need alpha
    if case == "loha-tucker":
        assert {"hada_t1", "hada_t2"} <= tensors
    if case == "lokr-tucker":
        assert "lokr_t2" in tensors
    for i in range(4):  # LyCORIS rebuilds no low-rank W1 next to a full W2: such W1 are written in full
        assert not {f"lora_unet_blocks_{i}.lokr_w2", f"lora_unet_blocks_{i}.lokr_w1_a"} <= keys
    if case == "lokr-both-w2-full":
        comps = ak.attach(Net()).plan(CASES[case]).components
        assert any(not c.use_w1 and c.use_w2 for _, c in comps.values())


def test_ranks_and_alphas_survive(tmp_path):
    """Per-module ranks and rslora scaling: the reloaded LoRA has each module's rank and scaling."""
    cfg = CASES["lora-rslora-patterns"]
    _, _, _, bd = _round_trip(cfg, tmp_path)
    comps = bd.components("k")
    assert {s: c.r for s, c in comps.items()} == {s: cfg.rank_for(s) for s in SITES}
    for s in SITES:
        assert comps[s].scaling == pytest.approx(cfg.scaling_for(s), rel=1e-6)


def test_half_precision_and_metadata(tmp_path):
    want, got, keys, _ = _round_trip(CASES["loha"], tmp_path, dtype=torch.float16)
    torch.testing.assert_close(got, want, atol=5e-3, rtol=5e-3)
    with safe_open(str(tmp_path / "net.safetensors"), "pt") as f:
        assert f.get_tensor("lora_unet_blocks_0.hada_w1_a").dtype == torch.float16
        assert f.get_tensor("lora_unet_blocks_0.alpha").dtype == torch.float32
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"]) == {"algo": "loha"}
    assert meta["ss_network_dim"] == "3"


def test_export_format_kohya(tmp_path):
    """``adapters.export(name, file, format="kohya")``: the controller's ``writer(format)`` gives this module."""
    from adapterkit import formats

    assert formats.writer("kohya") is kohya_write
    model = Net()
    ad = ak.attach(model)
    ad.add("a", CASES["lokr"])
    _randomize(ad, "a")
    ad.export("a", tmp_path / "x.safetensors", format="kohya")
    bd = ak.attach(Net())
    bd.load(tmp_path / "x.safetensors", "k")
    for site, comp in bd.components("k").items():
        torch.testing.assert_close(comp.delta_weight(None), ad.components("a")[site].delta_weight(None))


# --- refusals ---------------------------------------------------------------------------------------------------------
def _refused(ad: ak.Adapters, tmp_path, match: str, **kw) -> None:
    path = tmp_path / "bad.safetensors"
    with pytest.raises((KohyaWriteError, ValueError), match=match):
        kohya_write.save(ad, "a", path, **kw)
    assert not path.exists() and not list(tmp_path.glob(".bad*"))


def test_refusals(tmp_path):
    ad = ak.attach(Net())
    ad.add("a", ak.OFT(r=0, oft_block_size=4, targets=("blocks.0",)))
    _refused(ad, tmp_path, "peft's OFT rotates the input features")
    ad.delete("a")
    ad.add("a", ak.LoRA(r=2, dora=True, targets=("blocks.0",)))
    _refused(ad, tmp_path, "DoRA")
    ad.delete("a")
    ad.add("a", ak.LoRA(r=2, bias="lora_only", targets=("blocks.0",)))
    _refused(ad, tmp_path, "bias delta")
    ad.delete("a")
    ad.add("a", ak.IA3(targets=("blocks.0",), feedforward=()))
    _refused(ad, tmp_path, "kohya/LyCORIS files hold LoRA, LoHa, LoKr")
    ad.delete("a")
    ad.add("a", ak.LoRA(r=2, targets=("blocks.0",)))
    with pytest.raises(ValueError, match="ending in .safetensors"):
        kohya_write.save(ad, "a", tmp_path / "dir")
    with pytest.raises(ValueError, match="layout='ldm' needs a diffusers UNet2DConditionModel"):
        kohya_write.save(ad, "a", tmp_path / "x.safetensors", layout="ldm")
    with pytest.raises(ValueError, match="unknown component"):
        kohya_write.save(ad, "a", tmp_path / "x.safetensors", component="vae")


def test_refuses_grouped_conv_and_conv1d(tmp_path):
    model = nn.Module()
    model.g = nn.Conv2d(8, 8, 3, groups=2)
    model.c = nn.Conv1d(8, 8, 3)
    ad = ak.attach(model)
    ad.add("a", ak.LoRA(r=2, targets=("g", "c")))
    _refused(ad, tmp_path, r"c: the module is a Conv1d.*g: the module is a grouped convolution")


# --- diffusers UNet / CLIP text encoder -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_unet() -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        sample_size=8,
        norm_num_groups=8,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


@torch.no_grad()
def _run_unet(unet: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, enc = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 32, generator=g)
    return unet(x, torch.tensor([3, 7]), encoder_hidden_states=enc).sample


UNET_TARGETS = (
    "to_q",
    "to_k",
    "to_out.0",
    "ff.net.2",
    "proj_in",
    "conv1",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


@pytest.mark.parametrize("layout", ["diffusers", "ldm"])
def test_unet_round_trip_layouts(tiny_unet, tmp_path, layout):
    """A LoKr on a tiny UNet's attention, resnet and sampler modules, written with diffusers' paths or the
    original (LDM/SGM) names, reads back to the same outputs."""
    unet = copy.deepcopy(tiny_unet)
    ad = ak.attach(unet)
    ad.add("a", ak.LoKr(r=2, alpha=2.0, targets=UNET_TARGETS))
    _randomize(ad, "a")
    ad.activate("a")
    want = _run_unet(unet)
    path = tmp_path / "unet.safetensors"
    kohya_write.save(ad, "a", path, layout=layout)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    if layout == "ldm":
        assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lokr_w1" in keys
        assert (
            "lora_unet_output_blocks_1_1_conv.alpha" in keys
            and "lora_unet_middle_block_0_in_layers_2.alpha" in keys
        )
        assert not any(
            k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block")) for k in keys
        )
    else:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w1" in keys
    other = copy.deepcopy(tiny_unet)
    bd = ak.attach(other)
    bd.load(path, "k", activate=True)
    assert sorted(bd.sites("k")) == sorted(ad.sites("a"))
    torch.testing.assert_close(_run_unet(other), want, atol=1e-5, rtol=1e-4)


@pytest.fixture
def clip_text() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.CLIPTextModel(cfg).eval()


@torch.no_grad()
def _run_te(model: nn.Module) -> torch.Tensor:
    return model(input_ids=torch.tensor([[1, 5, 7, 9, 2], [3, 4, 8, 2, 0]])).last_hidden_state


def test_network_with_unet_and_text_encoder(tiny_unet, clip_text, tmp_path):
    """``save_network``: one file with ``lora_unet_`` and ``lora_te_`` keys (kohya's text-encoder names,
    ``text_model_encoder_layers_...``), each component read back by the reader."""
    unet, te = copy.deepcopy(tiny_unet), clip_text
    ua, ta = ak.attach(unet), ak.attach(te)
    ua.add("s", ak.LoRA(r=2, alpha=1.0, targets=("to_q", "conv1"), init_weights=False))
    ta.add("s", ak.LoRA(r=3, alpha=6.0, targets=("q_proj", "fc1"), init_weights=False))
    want_u, want_t = _run_unet(unet), _run_te(te)
    path = tmp_path / "net.safetensors"
    kohya_write.save_network(path, {"unet": (ua, "s"), "text_encoder": (ta, "s")})
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in keys)
    u2 = copy.deepcopy(tiny_unet)
    kohya.load(ak.attach(u2), path, name="k", activate=True, component="unet")
    torch.testing.assert_close(_run_unet(u2), want_u, atol=1e-5, rtol=1e-4)
    kohya_write.save(ta, "s", tmp_path / "te.safetensors")  # component guessed from the CLIP model class
    with safe_open(str(tmp_path / "te.safetensors"), "pt") as f:
        assert set(f.keys()) == {k for k in keys if k.startswith("lora_te_")}
    ta.delete("s")
    kohya.load(ta, path, name="k", activate=True, component="text_encoder")
    torch.testing.assert_close(_run_te(te), want_t, atol=1e-5, rtol=1e-4)
    with pytest.raises(KohyaWriteError, match="different methods"):
        ua.add("h", ak.LoHa(r=2, targets=("to_q",)))
        kohya_write.save_network(tmp_path / "y.safetensors", {"unet": (ua, "h"), "text_encoder": (ta, "k")})
