"""kohya-ss/sd-scripts and LyCORIS single-file adapters (``formats/kohya.py``): files written by hand with random
tensors, loaded onto a tiny diffusers UNet / CLIP text encoder, outputs checked against the base model with its
weights edited by the equations (LoRA, LoHa, LoKr as LyCORIS computes them; Diag-OFT as LyCORIS's
``make_weight``); refusals install nothing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import adapterkit as ak
from adapterkit.formats import kohya
from adapterkit.formats.io import AdapterFileError
from adapterkit.methods.lokr import factorization

diffusers = pytest.importorskip("diffusers")

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
LINEAR = [f"{ATTN}.attn1.to_q", f"{ATTN}.attn2.to_k", f"{ATTN}.attn1.to_out.0", f"{ATTN}.ff.net.2"]
CONV = [
    "down_blocks.0.resnets.0.conv1",  # 3×3, 32 -> 32
    "down_blocks.1.resnets.0.conv2",  # 3×3, 64 -> 64
    "down_blocks.0.attentions.0.proj_in",  # 1×1 conv (use_linear_projection=False)
    "down_blocks.1.resnets.0.conv_shortcut",  # 1×1, 32 -> 64
]
SITES = LINEAR + CONV


@pytest.fixture(scope="module")
def base_unet() -> nn.Module:
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        sample_size=8,
        norm_num_groups=8,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    return unet.eval()


@pytest.fixture
def unet(base_unet: nn.Module) -> nn.Module:
    return copy.deepcopy(base_unet)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 7]), torch.randn(2, 3, 32, generator=g)


@torch.no_grad()
def _run(unet: nn.Module) -> torch.Tensor:
    x, t, enc = _inputs()
    return unet(x, t, encoder_hidden_states=enc).sample


def _key(site: str, tensor: str, prefix: str = "lora_unet_") -> str:
    return f"{prefix}{site.replace('.', '_')}.{tensor}"


def _dims(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels, tuple(module.kernel_size)
    return module.out_features, module.in_features, ()


def _rand(*shape: int, g: torch.Generator, std: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def _reference(model: nn.Module, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """Outputs of a copy of ``model`` whose weights are replaced by ``deltas[site]`` (the new weight)."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for site, weight in deltas.items():
            modules[site].weight.copy_(weight)
    return _run(ref)


def _load(model: nn.Module, tensors: dict[str, torch.Tensor], tmp_path, **kw) -> ak.Adapters:
    path = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    ad = ak.attach(model)
    assert kohya.load(ad, path, name="k", activate=True, **kw) == "k"
    return ad


# --- equations ----------------------------------------------------------------------------------------------------
def _lora_file(model: nn.Module, sites: list[str], prefix: str = "lora_unet_", seed: int = 0, rename=None):
    """kohya LoRA tensors for ``sites`` (keys named by ``rename(site)``, default the path) and the new weights."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    tensors, new = {}, {}
    for i, path in enumerate(sites):
        site = rename(path) if rename else path
        out, in_dim, kernel = _dims(modules[path])
        r = 2 + i % 3
        down = _rand(r, in_dim, *kernel, g=g)
        up = _rand(out, r, *((1, 1) if kernel else ()), g=g)
        tensors[_key(site, "lora_down.weight", prefix)] = down
        tensors[_key(site, "lora_up.weight", prefix)] = up
        if i % 4 == 3:
            alpha = float(r)  # no alpha key: alpha = r, scale 1
        else:
            alpha = [1.0, 4.0, 0.5][i % 3]
            tensors[_key(site, "alpha", prefix)] = torch.tensor(alpha)
        w = modules[path].weight
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (alpha / r)
        new[path] = w + delta
    return tensors, new


def test_lora_unet_linear_and_conv(unet, base_unet, tmp_path):
    tensors, new = _lora_file(unet, SITES)
    want = _reference(unet, new)
    base = _run(unet)
    ad = _load(unet, tensors, tmp_path)
    assert sorted(ad.sites("k")) == sorted(SITES)
    got = _run(unet)
    assert not torch.allclose(got, base, atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    cfg = ad.config("k")
    assert isinstance(cfg, ak.LoRA)
    assert cfg.rank_for(SITES[1]) == 3 and cfg.scaling_for(SITES[1]) == pytest.approx(4.0 / 3)
    with ad.disabled():
        torch.testing.assert_close(_run(unet), base)
    # the recorded config (patterns for the modules outside the largest rank/alpha group) reloads the same adapter
    ad.save("k", tmp_path / "native")
    other = copy.deepcopy(base_unet)
    ak.attach(other).load(tmp_path / "native", activate=True)
    torch.testing.assert_close(_run(other), got)


def test_lora_diffusers_names(unet, tmp_path):
    """diffusers' own single-file names: ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` (+ ``.alpha``)."""
    tensors, new = _lora_file(unet, LINEAR[:2] + CONV[:1])
    renamed = {}
    for key, value in tensors.items():
        stem, _, tensor = key.partition(".")
        site = next(s for s in SITES if "lora_unet_" + s.replace(".", "_") == stem)
        tensor = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(tensor, tensor)
        renamed[f"unet.{site}.{tensor}"] = value
    want = _reference(unet, new)
    _load(unet, renamed, tmp_path)
    torch.testing.assert_close(_run(unet), want, atol=1e-5, rtol=1e-4)


def _loha_file(model: nn.Module, sites: list[str], tucker: bool, seed: int = 0, rename=None):
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    tensors, new = {}, {}
    for i, path in enumerate(sites):
        site = rename(path) if rename else path
        out, in_dim, kernel = _dims(modules[path])
        r = 2 + i % 2
        alpha = [2.0, 1.0, 3.0][i % 3]

        def key(t: str, site: str = site) -> str:
            return _key(site, t)

        w = modules[path].weight
        if tucker and kernel not in ((), (1, 1)):
            parts = []
            for j in (1, 2):
                t, wa, wb = _rand(r, r, *kernel, g=g), _rand(r, out, g=g), _rand(r, in_dim, g=g)
                tensors[key(f"hada_t{j}")], tensors[key(f"hada_w{j}_a")], tensors[key(f"hada_w{j}_b")] = t, wa, wb
                parts.append(torch.einsum("ijkl,ip,jr->prkl", t, wa, wb))  # LyCORIS rebuild_tucker
            delta = parts[0] * parts[1]
        else:
            n = in_dim * math.prod(kernel)
            w1a, w1b, w2a, w2b = _rand(out, r, g=g), _rand(r, n, g=g), _rand(out, r, g=g), _rand(r, n, g=g)
            for t, v in zip(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), (w1a, w1b, w2a, w2b)):
                tensors[key(t)] = v
            delta = ((w1a @ w1b) * (w2a @ w2b)).reshape(w.shape)
        tensors[key("alpha")] = torch.tensor(alpha)
        new[path] = w + delta * (alpha / r)
    return tensors, new


@pytest.mark.parametrize("tucker", [False, True], ids=["flat", "tucker"])
def test_loha_unet(unet, tmp_path, tucker):
    tensors, new = _loha_file(unet, SITES, tucker)
    want = _reference(unet, new)
    ad = _load(unet, tensors, tmp_path)
    torch.testing.assert_close(_run(unet), want, atol=1e-5, rtol=1e-4)
    cfg = ad.config("k")
    assert isinstance(cfg, ak.LoHa) and cfg.use_effective_conv2d is tucker


def _lokr_module(g, module: nn.Module, r: int, decompose_both: bool, tucker: bool, factor: int = -1):
    """LoKr tensors of one module by LyCORIS's LokrModule rules, and its ΔW (before the scale) and whether both
    factors are full."""
    out, in_dim, kernel = _dims(module)
    a, b = factorization(out, factor)
    c, d = factorization(in_dim, factor)
    t: dict[str, torch.Tensor] = {}
    if decompose_both and r < max(a, c) / 2:
        t["lokr_w1_a"], t["lokr_w1_b"] = _rand(a, r, g=g), _rand(r, c, g=g)
        w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
    else:
        t["lokr_w1"] = w1 = _rand(a, c, g=g)
    use_tucker = tucker and kernel not in ((), (1, 1))
    if r >= max(b, d) / 2:
        t["lokr_w2"] = w2 = _rand(b, d, *kernel, g=g)
    elif use_tucker:
        t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"] = (
            _rand(r, r, *kernel, g=g),
            _rand(r, b, g=g),
            _rand(r, d, g=g),
        )
        w2 = torch.einsum("ijkl,ip,jr->prkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        t["lokr_w2_a"], t["lokr_w2_b"] = _rand(b, r, g=g), _rand(r, d * math.prod(kernel), g=g)
        w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(b, d, *kernel)
    for _ in range(w2.dim() - w1.dim()):
        w1 = w1.unsqueeze(-1)
    return t, torch.kron(w1, w2.contiguous()), "lokr_w1" in t and "lokr_w2" in t  # LyCORIS make_kron


@pytest.mark.parametrize(
    "decompose_both,tucker", [(False, False), (True, False), (False, True)], ids=["plain", "both", "tucker"]
)
def test_lokr_unet(unet, tmp_path, decompose_both, tucker):
    g = torch.Generator().manual_seed(2)
    modules = dict(unet.named_modules())
    tensors, new, full = {}, {}, []
    ranks = {s: 2 for s in SITES}
    ranks[CONV[0]] = 8  # 32 -> 32 conv: (4, 8) factors, r >= 4: both factors full (scale 1 whatever alpha says)
    for i, site in enumerate(SITES):
        t, kron, both_full = _lokr_module(g, modules[site], ranks[site], decompose_both, tucker)
        alpha = [4.0, 1.0, 0.0][i % 3]  # 0: alpha = r
        t["alpha"] = torch.tensor(alpha)
        scale = 1.0 if both_full or alpha == 0 else alpha / ranks[site]
        full.append(both_full)
        tensors.update({_key(site, k): v for k, v in t.items()})
        new[site] = modules[site].weight + kron.reshape(modules[site].weight.shape) * scale
    assert any(full) and not all(full)
    assert any(k.endswith("lokr_w1_a") for k in tensors) is decompose_both
    assert any(k.endswith("lokr_t2") for k in tensors) is tucker
    want = _reference(unet, new)
    ad = _load(unet, tensors, tmp_path)
    torch.testing.assert_close(_run(unet), want, atol=1e-5, rtol=1e-4)
    cfg = ad.config("k")
    assert isinstance(cfg, ak.LoKr) and cfg.decompose_both is decompose_both


def test_lokr_decompose_factor(unet, tmp_path):
    """A network saved with LyCORIS's ``factor=4`` (not the √dim default) on linear layers."""
    g = torch.Generator().manual_seed(3)
    modules = dict(unet.named_modules())
    tensors, new = {}, {}
    for site in LINEAR:
        t, kron, _ = _lokr_module(g, modules[site], 1, False, False, factor=4)
        t["alpha"] = torch.tensor(2.0)
        tensors.update({_key(site, k): v for k, v in t.items()})
        new[site] = modules[site].weight + kron * 2.0
    want = _reference(unet, new)
    ad = _load(unet, tensors, tmp_path)
    torch.testing.assert_close(_run(unet), want, atol=1e-5, rtol=1e-4)
    assert ad.config("k").decompose_factor == 4


def _oft_reference(
    w: torch.Tensor, blocks: torch.Tensor, alpha: float, rescale: torch.Tensor | None
) -> torch.Tensor:
    """LyCORIS DiagOFTModule.get_r / make_weight (multiplier 1)."""
    q = blocks - blocks.transpose(1, 2)
    bound = alpha * w.shape[0]
    if bound > 0:
        norm = torch.norm(q) + 1e-8
        if norm > bound:
            q = q * bound / norm
    eye = torch.eye(blocks.shape[1])
    r = (eye + q) @ (eye - q).float().inverse()
    n, b, _ = blocks.shape
    new = torch.einsum("k n m, k n ... -> k m ...", r, w.view(n, b, *w.shape[1:])).reshape(w.shape)
    return new * rescale if rescale is not None else new


@pytest.mark.parametrize("rescaled", [False, True], ids=["plain", "rescaled"])
def test_diag_oft_unet(unet, tmp_path, rescaled):
    g = torch.Generator().manual_seed(4)
    modules = dict(unet.named_modules())
    tensors, new = {}, {}
    for i, site in enumerate(SITES):
        w = modules[site].weight
        b = [4, 8, 16][i % 3]
        blocks = _rand(w.shape[0] // b, b, b, g=g, std=0.2)
        alpha = [0.0, 1e-3, 10.0][i % 3]  # 1e-3 · out: the norm constraint binds
        rescale = (1 + _rand(w.shape[0], *([1] * (w.dim() - 1)), g=g, std=0.1)) if rescaled else None
        tensors[_key(site, "oft_blocks")] = blocks
        tensors[_key(site, "alpha")] = torch.tensor(alpha)
        if rescale is not None:
            tensors[_key(site, "rescale")] = rescale
        new[site] = _oft_reference(w.detach(), blocks, alpha, rescale)
    want = _reference(unet, new)
    base = _run(unet)
    ad = _load(unet, tensors, tmp_path)
    got = _run(unet)
    assert not torch.allclose(got, base, atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # merged: the weights become LyCORIS's W'; unmerged: the base weights are back
    before = {s: modules[s].weight.detach().clone() for s in SITES}
    ad.merge("k")
    for site in SITES:
        torch.testing.assert_close(modules[site].weight, new[site], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_run(unet), want, atol=1e-5, rtol=1e-4)
    ad.unmerge("k")
    for site in SITES:
        torch.testing.assert_close(modules[site].weight, before[site], atol=1e-6, rtol=1e-5)


# --- text encoder ---------------------------------------------------------------------------------------------------
@pytest.fixture
def clip_text():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37 * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.CLIPTextModel(cfg).eval()


# kohya names text-encoder modules by the transformers 4 paths (``text_model.encoder...``); transformers 5's
# CLIPTextModel has no ``text_model`` level, and the reader resolves both
TE_NAMES = [
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.1.self_attn.v_proj",
    "text_model.encoder.layers.1.mlp.fc1",
]


def _te_paths(model: nn.Module) -> tuple[list[str], object]:
    """The model's paths of TE_NAMES, and the path -> kohya name mapping."""
    if hasattr(model, "text_model"):
        return TE_NAMES, None
    return [n.removeprefix("text_model.") for n in TE_NAMES], lambda p: "text_model." + p


@torch.no_grad()
def _run_te(model: nn.Module) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 7, 9, 2], [3, 4, 8, 2, 0]])
    return model(input_ids=ids).last_hidden_state


def _te_reference(model: nn.Module, new: dict[str, torch.Tensor]) -> torch.Tensor:
    ref = copy.deepcopy(model)
    refmods = dict(ref.named_modules())
    with torch.no_grad():
        for site, w in new.items():
            refmods[site].weight.copy_(w)
    return _run_te(ref)


@pytest.mark.parametrize("prefix", ["lora_te_", "lora_te1_"])
def test_clip_text_encoder_lora(clip_text, tmp_path, prefix):
    paths, rename = _te_paths(clip_text)
    tensors, new = _lora_file(clip_text, paths, prefix=prefix, rename=rename)
    unet_part = {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(1, 4, 3, 3)}  # skipped
    assert any("lora_te" in k and "text_model_encoder_layers_0" in k for k in tensors)
    want = _te_reference(clip_text, new)
    base = _run_te(clip_text)
    kw = {"component": "text_encoder"} if prefix == "lora_te_" else {}  # lora_te1_: the component is guessed
    ad = _load(clip_text, {**tensors, **unet_part}, tmp_path, **kw)
    assert sorted(ad.sites("k")) == sorted(paths)
    got = _run_te(clip_text)
    assert not torch.allclose(got, base, atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_clip_text_encoder_loha(clip_text, tmp_path):
    paths, rename = _te_paths(clip_text)
    tensors, new = _loha_file(clip_text, paths, tucker=False, rename=rename)
    tensors = {k.replace("lora_unet_", "lora_te_"): v for k, v in tensors.items()}
    want = _te_reference(clip_text, new)
    _load(clip_text, tensors, tmp_path, component="text_encoder")
    torch.testing.assert_close(_run_te(clip_text), want, atol=1e-5, rtol=1e-4)


# --- refusals: clear errors, nothing installed ------------------------------------------------------------------------
def _refused(model: nn.Module, tensors: dict[str, torch.Tensor], tmp_path, match: str, **kw) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    ad = ak.attach(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=match):
        kohya.load(ad, path, name="k", **kw)
    assert ad.names == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_refuses_unknown_module(unet, tmp_path):
    tensors, _ = _lora_file(unet, LINEAR[:2])
    tensors[_key("down_blocks.0.attentions.0.transformer_blocks.0.attn3.to_q", "lora_down.weight")] = torch.ones(
        2, 32
    )
    _refused(unet, tensors, tmp_path, "attn3_to_q.*does not have")


def test_refuses_mixed_methods_in_one_module(unet, tmp_path):
    tensors, _ = _lora_file(unet, LINEAR[:2])
    loha, _ = _loha_file(unet, LINEAR[1:2], tucker=False)
    _refused(unet, {**tensors, **loha}, tmp_path, "mixes the tensors of LoRA and LoHa")


def test_refuses_mixed_methods_in_one_file(unet, tmp_path):
    tensors, _ = _lora_file(unet, LINEAR[:2])
    loha, _ = _loha_file(unet, CONV[:1], tucker=False)
    _refused(unet, {**tensors, **loha}, tmp_path, "mixes methods")


def test_refuses_bad_shapes(unet, tmp_path):
    tensors, _ = _lora_file(unet, SITES)
    tensors[_key(CONV[0], "lora_down.weight")] = torch.ones(2, 31, 3, 3)  # all-or-nothing: the last module is bad
    _refused(unet, tensors, tmp_path, r"lora_down \(2, 31, 3, 3\).*do not fit")
    tensors, _ = _loha_file(unet, LINEAR[:1], tucker=False)
    tensors[_key(LINEAR[0], "hada_w2_b")] = torch.ones(2, 33)
    _refused(unet, tensors, tmp_path, "hada_w2_b.*builds")
    tensors = {_key(LINEAR[0], "oft_blocks"): torch.ones(3, 5, 5)}
    _refused(unet, tensors, tmp_path, "output size 32")
    tensors = {_key(LINEAR[0], "lokr_w1"): torch.ones(4, 4), _key(LINEAR[0], "lokr_w2"): torch.ones(8, 9)}
    _refused(unet, tensors, tmp_path, "Kronecker factors")


def test_refuses_unsupported_and_foreign(unet, tmp_path):
    tensors, _ = _lora_file(unet, LINEAR[:1])
    _refused(unet, {**tensors, _key(LINEAR[0], "dora_scale"): torch.ones(32, 1)}, tmp_path, "DoRA")
    _refused(unet, {_key(LINEAR[1], "diff"): torch.ones(32, 32)}, tmp_path, "algo=full")
    _refused(unet, {**tensors, _key(LINEAR[0], "foo"): torch.ones(1)}, tmp_path, "to_q.foo .* is not a tensor of")
    _refused(unet, {**tensors, "model.diffusion_model.foo": torch.ones(1)}, tmp_path, "not a kohya/LyCORIS key")
    te = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(1, 32)}
    _refused(unet, te, tmp_path, "no tensors for component='unet'", component="unet")
    _refused(unet, te, tmp_path, "no component of .* fits this UNet2DConditionModel")
    _refused(unet, {_key(LINEAR[0], "oft_blocks"): torch.ones(2, 2, 4, 4)}, tmp_path, "BOFT")


def test_refuses_ambiguous_names(tmp_path):
    model = nn.Module()
    model.a = nn.Module()
    model.a.b_c = nn.Linear(4, 4)
    model.a_b = nn.Module()
    model.a_b.c = nn.Linear(4, 4)
    tensors = {
        "lora_unet_a_b_c.lora_down.weight": torch.ones(1, 4),
        "lora_unet_a_b_c.lora_up.weight": torch.ones(4, 1),
    }
    _refused(model, tensors, tmp_path, r"ambiguous.*\['a.b_c', 'a_b.c'\]")


def test_refuses_ldm_names(unet, tmp_path):
    """LDM/SGM names that the UNet does not have, and LDM names on a model that is not a diffusers UNet."""
    tensors = {"lora_unet_input_blocks_9_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.ones(1, 32)}
    _refused(unet, tensors, tmp_path, "original Stable Diffusion.*no module of that name")
    tensors = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.ones(1, 32)}
    _refused(_Net(), tensors, tmp_path, "original Stable Diffusion.*_Net is not one")


# --- the original Stable Diffusion (LDM/SGM) layout -----------------------------------------------------------------
# LDM name -> diffusers path on the tiny SD 1.x-shaped UNet (down: CrossAttnDown, Down; up: Up, CrossAttnUp; one
# layer per block), written out by hand from the CompVis UNet's layout
LDM_SD1 = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
    "input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q": f"{ATTN}.attn1.to_q",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0": f"{ATTN}.attn2.to_out.0",
    "input_blocks.2.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.3.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks.3.0.emb_layers.1": "down_blocks.1.resnets.0.time_emb_proj",
    "middle_block.0.out_layers.3": "mid_block.resnets.0.conv2",
    "middle_block.1.transformer_blocks.0.ff.net.0.proj": "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "middle_block.2.in_layers.2": "mid_block.resnets.1.conv1",
    "output_blocks.0.0.skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
    "output_blocks.1.1.conv": "up_blocks.0.upsamplers.0.conv",  # a block without attention: the sampler is .1
    "output_blocks.2.0.in_layers.2": "up_blocks.1.resnets.0.conv1",
    "output_blocks.3.1.transformer_blocks.0.ff.net.2": "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
    "out.2": "conv_out",
}


def test_ldm_names_sd1(unet, base_unet, tmp_path):
    """A LoRA file in the LDM layout gives the outputs of the same weights under diffusers names."""
    sites = list(LDM_SD1.values())
    to_ldm = {v: k for k, v in LDM_SD1.items()}
    ldm, new = _lora_file(unet, sites, rename=to_ldm.__getitem__)
    plain, _ = _lora_file(unet, sites)
    assert all(torch.equal(a, b) for a, b in zip(ldm.values(), plain.values()))
    assert any(k.startswith("lora_unet_output_blocks_1_1_conv.") for k in ldm)
    want = _reference(unet, new)
    ad = _load(unet, ldm, tmp_path)
    assert sorted(ad.sites("k")) == sorted(sites)
    got = _run(unet)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    other = copy.deepcopy(base_unet)
    _load(other, plain, tmp_path)
    torch.testing.assert_close(_run(other), got, atol=1e-6, rtol=1e-5)


def test_ldm_names_sdxl_shape(tmp_path):
    """On an SDXL-shaped UNet (down: Down, CrossAttnDown; up: CrossAttnUp, Up; two layers per block, two
    transformer layers, linear projections, text-time embedding): every LDM name of a Linear/Conv2d converts, with
    diffusers' own ``_maybe_map_sgm_blocks_to_diffusers`` + ``_convert_unet_lora_key``, to the module we map it
    to; and a LoRA file in the LDM layout gives the outputs of the same weights under diffusers names."""
    conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    from adapterkit.formats.kohya_ldm import ldm_paths

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=32,
        sample_size=8,
        norm_num_groups=8,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
        use_linear_projection=True,
    )
    modules = dict(unet.named_modules())
    paths = {p: q for p, q in ldm_paths(unet).items() if isinstance(modules[p], (nn.Linear, nn.Conv2d))}
    assert "input_blocks.4.1.transformer_blocks.1.attn2.to_k" in paths.values()
    assert paths["add_embedding.linear_2"] == "label_emb.0.2"
    assert paths["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    keys = {f"lora_unet_{q.replace('.', '_')}.lora_down.weight": p for p, q in paths.items()}
    mapped = conv._maybe_map_sgm_blocks_to_diffusers(dict.fromkeys(keys, 0), unet.config)
    assert len(mapped) == len(keys)
    theirs = set()
    for key in mapped:
        name = conv._convert_unet_lora_key(key).replace(".processor", "")  # attn1.processor.to_q_lora.down.weight
        name = name.removesuffix(".lora.down.weight").removesuffix("_lora.down.weight")
        theirs.add(name + ".0" if name.endswith(".to_out") else name)
    assert theirs == set(keys.values())

    # outputs: the LDM-named file and the diffusers-named file of the same weights
    unet.eval()
    sites = [
        "conv_in",
        "add_embedding.linear_1",
        "time_embedding.linear_2",
        "down_blocks.0.resnets.1.conv2",
        "down_blocks.0.downsamplers.0.conv",
        "down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_v",
        "down_blocks.1.attentions.0.proj_out",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_q",
        "up_blocks.0.resnets.2.conv_shortcut",
        "up_blocks.0.upsamplers.0.conv",
        "up_blocks.1.resnets.0.time_emb_proj",
        "conv_out",
    ]
    ldm, new = _lora_file(unet, sites, rename=paths.__getitem__)
    plain, _ = _lora_file(unet, sites)
    g = torch.Generator().manual_seed(1)
    x, enc = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 32, generator=g)
    cond = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}

    @torch.no_grad()
    def run(model: nn.Module) -> torch.Tensor:
        return model(x, torch.tensor([3, 7]), encoder_hidden_states=enc, added_cond_kwargs=cond).sample

    outs = []
    for tensors in (ldm, plain):
        model = copy.deepcopy(unet)
        ad = _load(model, tensors, tmp_path)
        assert sorted(ad.sites("k")) == sorted(sites)
        outs.append(run(model))
    ref = copy.deepcopy(unet)
    with torch.no_grad():
        for site, weight in new.items():
            dict(ref.named_modules())[site].weight.copy_(weight)
    torch.testing.assert_close(outs[0], run(ref), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(outs[0], run(unet), atol=1e-3)


# --- LycorisOFT beyond loading -----------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(32, 48), nn.Conv2d(16, 32, 3, padding=1)])


def test_diag_oft_native_round_trip_and_no_peft(tmp_path):
    """A loaded Diag-OFT saves natively and loads back bit-identically; peft's format cannot hold it."""
    g = torch.Generator().manual_seed(5)
    tensors = {
        "lora_unet_blocks_0.oft_blocks": _rand(12, 4, 4, g=g),
        "lora_unet_blocks_0.alpha": torch.tensor(0),  # LyCORIS saves an integer constraint as int64
        "lora_unet_blocks_0.rescale": 1 + _rand(48, 1, g=g, std=0.1),
        "lora_unet_blocks_1.oft_blocks": _rand(4, 8, 8, g=g),
        "lora_unet_blocks_1.alpha": torch.tensor(1e-3),
        "lora_unet_blocks_1.rescale": 1 + _rand(32, 1, 1, 1, g=g, std=0.1),
    }
    a, b = _Net(), _Net()
    ad = _load(a, tensors, tmp_path)
    assert isinstance(ad.config("k"), kohya.LycorisOFT)
    ad.save("k", tmp_path / "native")
    bd = ak.attach(b)
    bd.load(tmp_path / "native", activate=True)
    x, xc = torch.randn(3, 32), torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        assert torch.equal(a.blocks[0](x), b.blocks[0](x)) and torch.equal(a.blocks[1](xc), b.blocks[1](xc))
        assert not torch.allclose(a.blocks[0](x), _Net().blocks[0](x), atol=1e-3)
    with pytest.raises(ValueError, match="lycoris_oft"):
        ad.export("k", tmp_path / "peft")


def test_component_guess_ambiguous(tmp_path):
    """Names of two components that both exist on the model (SDXL's two text encoders): component= is needed."""
    tensors = {
        f"{p}blocks_0.{t}": v
        for p in ("lora_te1_", "lora_te2_")
        for t, v in (("lora_down.weight", torch.ones(1, 32)), ("lora_up.weight", torch.ones(48, 1)))
    }
    _refused(_Net(), tensors, tmp_path, "pass component=")
    ad = _load(_Net(), tensors, tmp_path, component="text_encoder_2")
    assert list(ad.sites("k")) == ["blocks.0"]


def test_adapters_load_and_read_take_a_single_file(tmp_path):
    """``adapters.load(file)`` / ``adapters.read(file)``: ``formats.detect`` returns this reader for a single
    .safetensors file."""
    g = torch.Generator().manual_seed(6)
    path = tmp_path / "net.safetensors"
    save_file({"lora_unet_blocks_0.oft_blocks": _rand(12, 4, 4, g=g)}, str(path))
    assert kohya.is_kohya_file(path) and not kohya.is_kohya_file(tmp_path)
    model = _Net()
    ad = ak.attach(model)
    read = ad.read(path, "r")  # read: nothing attached yet
    assert ad.names == [] and read.name == "r"
    assert ad.load(path, "k", activate=True) == "k" and ad.names == ["k"]
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert not torch.allclose(model.blocks[0](x), _Net().blocks[0](x), atol=1e-3)


def test_half_precision_file(tmp_path):
    """kohya saves float16 tensors (and a float16 alpha): they load into the float32 model's components."""
    g = torch.Generator().manual_seed(7)
    down, up, alpha = _rand(3, 16, 3, 3, g=g).half(), _rand(32, 3, 1, 1, g=g).half(), torch.tensor(1.5).half()
    tensors = {
        "lora_unet_blocks_1.lora_down.weight": down,
        "lora_unet_blocks_1.lora_up.weight": up,
        "lora_unet_blocks_1.alpha": alpha,
    }
    model, ref = _Net(), _Net()
    with torch.no_grad():
        delta = (up.float().flatten(1) @ down.float().flatten(1)).reshape(ref.blocks[1].weight.shape)
        ref.blocks[1].weight += delta * (1.5 / 3)
    _load(model, tensors, tmp_path)
    xc = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[1](xc), ref.blocks[1](xc), atol=1e-5, rtol=1e-4)


def test_per_module_ranks_with_suffix_paths(tmp_path):
    """Module paths that are '.'-suffixes of others (``a.b`` and ``x.a.b``) with different ranks: the recorded
    patterns are anchored, so a native save reloads each module's own rank."""

    def make() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Module()
        model.a = nn.Module()
        model.a.b = nn.Linear(8, 8)
        model.x = nn.Module()
        model.x.a = nn.Module()
        model.x.a.b = nn.Linear(8, 8)
        model.y = nn.Linear(8, 8)
        return model

    model = make()
    g = torch.Generator().manual_seed(8)
    tensors = {}
    for path, r in (("a.b", 3), ("x.a.b", 2), ("y", 2)):
        tensors[_key(path, "lora_down.weight")] = _rand(r, 8, g=g)
        tensors[_key(path, "lora_up.weight")] = _rand(8, r, g=g)
    ad = _load(model, tensors, tmp_path)
    cfg = ad.config("k")
    assert {p: cfg.rank_for(p) for p in ("a.b", "x.a.b", "y")} == {"a.b": 3, "x.a.b": 2, "y": 2}
    ad.save("k", tmp_path / "native")
    again = ak.attach(make())
    again.load(tmp_path / "native", "k")
    assert {p: c.r for p, c in again.components("k").items()} == {"a.b": 3, "x.a.b": 2, "y": 2}
