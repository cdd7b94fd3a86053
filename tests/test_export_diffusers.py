"""``export(..., target="diffusers")`` (issue 19, item 6): a UNet adapter loads with diffusers' own
``unet.load_lora_adapter`` (a peft directory does not: NoMatchingPeftModuleError on ``base_model.model.`` keys),
with outputs equal to ours; a text encoder's loads with ``load_lora_into_text_encoder``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import adapterkit as ak
from adapterkit.formats import diffusers as D

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def base_unet() -> nn.Module:
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=8, norm_num_groups=8,
        attention_head_dim=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    return unet.eval()


@torch.no_grad()
def _run(unet: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, enc = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 32, generator=g)
    return unet(x, torch.tensor([3, 7]), encoder_hidden_states=enc).sample


def _perturb(adapters: ak.Adapters, name: str) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapters.parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize(
    "config",
    [
        ak.LoRA(r=4, alpha=8, targets=ATTN),
        ak.LoRA(r=4, alpha=4, targets=ATTN + ["conv1"], rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3}),
        ak.LoRA(r=4, targets=ATTN, dora=True),
        ak.LoKr(r=4, alpha=4, targets=["to_q", "to_v"]),
    ],
    ids=["lora", "lora-patterns-conv", "dora", "lokr"],
)
def test_unet_adapter_loads_with_diffusers_load_lora_adapter(base_unet, tmp_path, config) -> None:
    ours = copy.deepcopy(base_unet)
    adapters = ak.attach(ours)
    adapters.add("style", config)
    _perturb(adapters, "style")
    expected = _run(ours)
    assert not torch.allclose(expected, _run(base_unet), atol=1e-4)

    # a plain peft directory is what fails in diffusers (keys under base_model.model.)
    written = adapters.export("style", tmp_path / "out", target="diffusers")
    assert written.name == D.WEIGHT_NAME
    with safe_open(str(written), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("unet.") and "base_model" not in k for k in keys)
    assert all(k.startswith("unet.") for k in json.loads(meta[D.METADATA_KEY]))

    theirs = copy.deepcopy(base_unet)
    theirs.load_lora_adapter(str(tmp_path / "out"), prefix="unet", adapter_name="style", use_safetensors=True)
    torch.testing.assert_close(_run(theirs), expected, atol=1e-5, rtol=1e-5)


def test_bare_prefix_and_clear_errors(base_unet, tmp_path) -> None:
    ours = copy.deepcopy(base_unet)
    adapters = ak.attach(ours)
    adapters.add("a", ak.LoRA(r=2, targets=ATTN))
    _perturb(adapters, "a")
    written = adapters.export("a", tmp_path / "bare", target="diffusers", prefix="")
    theirs = copy.deepcopy(base_unet)
    theirs.load_lora_adapter(str(written), prefix=None, adapter_name="a", weight_name=D.WEIGHT_NAME)
    torch.testing.assert_close(_run(theirs), _run(ours), atol=1e-5, rtol=1e-5)

    adapters.add("h", ak.LoHa(r=2, targets=["to_q"]))
    with pytest.raises(ValueError, match="LoRA and LoKr only"):
        adapters.export("h", tmp_path / "h", target="diffusers")
    with pytest.raises(ValueError, match="prefix= only applies to target='diffusers'"):
        adapters.export("a", tmp_path / "p", prefix="unet")
    with pytest.raises(ValueError, match="only applies to target='vllm'"):
        adapters.export("a", tmp_path / "r", target="diffusers", rank=4)
    assert not (tmp_path / "h").exists() or not any((tmp_path / "h").iterdir())


def test_text_encoder_adapter_loads_with_load_lora_into_text_encoder(tmp_path) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16)  # fmt: skip
    base = CLIPTextModel(cfg).eval()
    ours = copy.deepcopy(base)
    adapters = ak.attach(ours)
    adapters.add("te", ak.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    _perturb(adapters, "te")
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        expected = ours(ids).last_hidden_state
    adapters.export("te", tmp_path / "te", target="diffusers")
    state = diffusers.loaders.lora_base._fetch_state_dict(
        str(tmp_path / "te"), weight_name=None, use_safetensors=True, local_files_only=True, cache_dir=None,
        force_download=False, proxies=None, token=None, revision=None, subfolder=None, user_agent={},
        allow_pickle=False, metadata=None,
    )  # fmt: skip
    theirs = copy.deepcopy(base)
    diffusers.StableDiffusionPipeline.load_lora_into_text_encoder(
        state[0], network_alphas=None, text_encoder=theirs, prefix="text_encoder", metadata=state[1]
    )
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).last_hidden_state, expected, atol=1e-5, rtol=1e-5)


def test_cli_export_target_diffusers(tmp_path) -> None:
    """``adapterkit export DIR --target diffusers [--prefix P]``: keys under ``text_encoder.`` for a transformers
    model by default, under ``--prefix``; --prefix only with that target."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from typer.testing import CliRunner

    from adapterkit.cli import app

    from conftest import make_model

    model = make_model("llama")
    model.save_pretrained(tmp_path / "llama")
    vocab = {f"w{i}": i for i in range(100)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w1")),
                                  unk_token="w1", eos_token="w0", pad_token="w0")  # fmt: skip
    tok.save_pretrained(tmp_path / "llama")
    adapters = ak.attach(model)
    adapters.add("x", ak.LoRA(r=2, targets=["q_proj"], init_weights=False))
    adapters.save("x", tmp_path / "x")

    def run(*args: object):
        return CliRunner().invoke(app, ["export", str(tmp_path / "x"), "--model", str(tmp_path / "llama"),
                                        "--task", "causal-lm", *map(str, args)])  # fmt: skip

    for prefix, out in ((None, "out"), ("te2", "out2")):
        result = run("--target", "diffusers", "--out", tmp_path / out, *(("--prefix", prefix) if prefix else ()))
        assert result.exit_code == 0, result.output
        with safe_open(str(tmp_path / out / D.WEIGHT_NAME), "pt") as f:
            keys = f.keys()
        assert {k.split(".")[0] for k in keys} == {prefix or "text_encoder"}
    result = run("--prefix", "te2", "--out", tmp_path / "bad")
    assert result.exit_code != 0 and "--target diffusers" in result.output, result.output
