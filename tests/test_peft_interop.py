"""peft <-> adapterkit equivalence for every LoRA option (float32 logits within 1e-5).

Each :class:`Case` describes one LoRA option twice: as peft ``LoraConfig`` keyword arguments and as
``ak.LoRA`` keyword arguments. Both directions are checked on tiny random models:

* peft -> adapterkit: ``get_peft_model(..., init_lora_weights=False)``, perturb every trainable
  tensor (A/B, DoRA magnitudes, biases, ``modules_to_save`` copies), ``save_pretrained``, load with
  ``ak.attach(other).load(dir)`` on an identical model and compare logits.
* adapterkit -> peft: ``ak.LoRA(..., init_weights=False)``, perturb, ``export(format="peft")``,
  ``PeftModel.from_pretrained(fresh, dir)`` and compare logits.

See docs/peft_lora_format.md for the format and the math.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import adapterkit as ak

from conftest import make_inputs, make_model

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model  # noqa: E402

warnings.filterwarnings("ignore", module="peft")
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")

TOL = {"atol": 1e-5, "rtol": 1e-5}


# --- models -------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """A model without a profile: Conv2d (k=3, stride 2, padding 1) -> ReLU -> pool -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(pixel_values))
        return self.fc(nn.functional.adaptive_avg_pool2d(h, 4).flatten(1))


def _gpt2_untied() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The same tiny random model for the same (family, seed)."""
    if family == "convnet":
        torch.manual_seed(seed)
        model = ConvNet()
    elif family == "gpt2-untied":
        torch.manual_seed(seed)
        model = _gpt2_untied()
    else:
        model = make_model(family, seed)
    return model.to(dtype).eval()


def inputs_for(family: str) -> dict[str, torch.Tensor]:
    if family == "convnet":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
    return make_inputs("gpt2" if family == "gpt2-untied" else family)


@torch.no_grad()
def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


@torch.no_grad()
def perturb(params: Any, seed: int = 123, scale: float = 0.05) -> int:
    """Add small noise to each tensor (as if trained); returns how many were changed."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for p in params:
        p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
        n += 1
    return n


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def assert_nontrivial(adapted: torch.Tensor, base: torch.Tensor) -> None:
    assert (adapted - base).abs().max() > 1e-4, "the adapter does not change the output; the test is vacuous"


# --- the options ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    family: str
    peft: dict[str, Any]  # LoraConfig kwargs (init_lora_weights=False is added)
    ak: dict[str, Any]  # ak.LoRA kwargs (init_weights=False is added)
    kinds: frozenset[str] = frozenset({"target"})  # site kinds the peft file must load as


def case(id: str, family: str, targets: Any, ak_targets: Any = None, kinds=("target",), **kw: Any) -> Case:
    """One option; ``kw`` uses peft names and is translated to adapterkit names."""
    names = {"lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora", "use_dora": "dora",
             "modules_to_save": "heads", "fan_in_fan_out": None}  # fmt: skip
    ours: dict[str, Any] = {"targets": targets if ak_targets is None else ak_targets}
    for k, v in kw.items():
        if names.get(k, k) is not None:
            ours[names.get(k, k)] = v
    peft_kw = {"r": 4, "lora_alpha": 8, "target_modules": targets, **kw}
    ours.setdefault("r", 4)
    ours.setdefault("alpha", 8)
    return Case(id, family, peft_kw, ours, frozenset(kinds))


PATTERNS = {
    "rank_pattern": {"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6},
    "alpha_pattern": {"v_proj": 3},
}
QV = ["q_proj", "v_proj"]

CASES = [
    case("linear-llama", "llama", QV),
    case("linear-bert", "bert", ["query", "value"]),
    case("linear-regex-llama", "llama", r".*\.(q|v)_proj"),
    case("conv1d-gpt2", "gpt2", ["c_attn", "c_fc"], fan_in_fan_out=True),
    case("embedding-llama", "llama", ["embed_tokens", "q_proj"]),
    case("embedding-gpt2-untied", "gpt2-untied", ["wte", "c_attn"], fan_in_fan_out=True),
    case("conv2d-vit-embed", "vit", ["projection"], ak_targets=["embed"]),
    case("conv2d-custom", "convnet", ["conv"]),
    case("conv2d-custom-bias-all", "convnet", ["conv"], bias="all", kinds=("target", "extra")),
    case("dora-linear-llama", "llama", QV, use_dora=True),
    case("dora-conv1d-gpt2", "gpt2", ["c_attn"], use_dora=True, fan_in_fan_out=True),
    case("dora-embedding-llama", "llama", ["embed_tokens"], use_dora=True),
    case("dora-conv2d-custom", "convnet", ["conv"], use_dora=True),
    case("dora-conv2d-vit", "vit", ["projection"], ak_targets=["embed"], use_dora=True),
    case("rslora-llama", "llama", QV, lora_alpha=5, use_rslora=True),
    case("patterns-llama", "llama", QV, **PATTERNS),
    case("patterns-rslora-llama", "llama", QV, use_rslora=True, **PATTERNS),
    case("bias-lora_only-bert", "bert", ["query", "value"], bias="lora_only"),
    case("bias-all-bert", "bert", ["query", "value"], bias="all", kinds=("target", "extra")),
    case("heads-bert", "bert", ["query", "value"], modules_to_save=["classifier"], kinds=("target", "head")),
    case(
        "dora-bias-heads-bert",
        "bert",
        ["query", "value"],
        use_dora=True,
        bias="lora_only",
        modules_to_save=["classifier"],
        kinds=("target", "head"),
    ),
    case(
        "bias-all-heads-bert",
        "bert",
        ["query", "value"],
        bias="all",
        modules_to_save=["classifier"],
        kinds=("target", "extra", "head"),
    ),
    case("all-linear-llama", "llama", "all-linear"),
    case("all-linear-gpt2", "gpt2", "all-linear", fan_in_fan_out=True),
    case("dropout-eval-llama", "llama", QV, lora_dropout=0.1),
    case("dropout-dora-eval-conv2d", "convnet", ["conv", "fc"], lora_dropout=0.2, use_dora=True),
]


PEFT_LOAD_BUGS: dict[str, Any] = {}


def params(cases: list[Case], bugs: dict[str, Any] | None = None) -> list[Any]:
    bugs = bugs or {}
    return [pytest.param(c, id=c.id, marks=[bugs[c.id]] if c.id in bugs else []) for c in cases]


def peft_adapter(c: Case, directory: Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, str]:
    """A perturbed peft model saved to ``directory``; returns (peft model in eval mode, family)."""
    pm = get_peft_model(build(c.family), LoraConfig(**c.peft, init_lora_weights=False))
    assert perturb(trainable(pm)) > 0
    pm.save_pretrained(directory)
    return pm.to(dtype).eval(), c.family


# --- peft -> adapterkit ---------------------------------------------------------------------------
@pytest.mark.parametrize("c", params(CASES, PEFT_LOAD_BUGS))
def test_peft_to_adapterkit(c: Case, tmp_path: Path) -> None:
    pm, family = peft_adapter(c, tmp_path)
    inputs = inputs_for(family)
    expected = logits(pm, inputs)

    model = build(family)
    adapters = ak.attach(model)
    name = adapters.load(tmp_path)
    model.eval()  # components are created in training mode (see test_dropout_respects_eval_mode)
    assert set(adapters.sites(name).values()) == c.kinds
    torch.testing.assert_close(logits(model, inputs), expected, **TOL)
    with adapters.disabled():
        assert_nontrivial(expected, logits(model, inputs))


# --- adapterkit -> peft ---------------------------------------------------------------------------
@pytest.mark.parametrize("c", params(CASES))
def test_adapterkit_to_peft(c: Case, tmp_path: Path) -> None:
    model = build(c.family)
    inputs = inputs_for(c.family)
    base = logits(model, inputs)
    adapters = ak.attach(model)
    adapters.add("mine", ak.LoRA(**c.ak, init_weights=False))
    assert set(adapters.sites("mine").values()) == c.kinds
    perturb(adapters.parameters("mine"))
    model.eval()
    ours = logits(model, inputs)
    assert_nontrivial(ours, base)

    adapters.export("mine", tmp_path, format="peft")
    cfg = PeftConfig.from_pretrained(str(tmp_path))
    assert cfg.peft_type == "LORA" and cfg.r == c.ak["r"] and cfg.use_dora == c.ak.get("dora", False)
    pm = PeftModel.from_pretrained(build(c.family), str(tmp_path))
    torch.testing.assert_close(logits(pm, inputs), ours, **TOL)


# --- native round trip of a peft-loaded adapter ---------------------------------------------------
ROUND_TRIP_IDS = {"linear-llama", "conv1d-gpt2", "embedding-llama", "conv2d-custom-bias-all", "dora-conv2d-vit",
                  "dora-embedding-llama", "patterns-rslora-llama", "bias-all-bert", "dora-bias-heads-bert",
                  "bias-all-heads-bert"}  # fmt: skip


@pytest.mark.parametrize("c", params([c for c in CASES if c.id in ROUND_TRIP_IDS], PEFT_LOAD_BUGS))
def test_peft_loaded_adapter_native_round_trip(c: Case, tmp_path: Path) -> None:
    pm, family = peft_adapter(c, tmp_path / "peft")
    inputs = inputs_for(family)
    model = build(family)
    adapters = ak.attach(model)
    name = adapters.load(tmp_path / "peft")
    model.eval()
    first = logits(model, inputs)
    adapters.save(name, tmp_path / "native")

    again = build(family)
    again_adapters = ak.attach(again)
    assert again_adapters.load(tmp_path / "native") == name
    again.eval()
    assert again_adapters.sites(name) == adapters.sites(name)
    torch.testing.assert_close(logits(again, inputs), first, **TOL)
    torch.testing.assert_close(logits(again, inputs), logits(pm, inputs), **TOL)


# --- bf16 ----------------------------------------------------------------------------------------
BF16_IDS = {"linear-llama", "conv1d-gpt2", "embedding-llama", "dora-linear-llama", "conv2d-custom", "heads-bert"}


@pytest.mark.parametrize("c", params([c for c in CASES if c.id in BF16_IDS]))
def test_peft_adapter_on_bf16_model(c: Case, tmp_path: Path) -> None:
    """An fp32 peft file loaded onto a bf16 model gives about the logits of peft's bf16 model."""
    pm, family = peft_adapter(c, tmp_path, dtype=torch.bfloat16)
    inputs = inputs_for(family)
    if "pixel_values" in inputs:
        inputs = {"pixel_values": inputs["pixel_values"].bfloat16()}
    model = build(family, dtype=torch.bfloat16)
    adapters = ak.attach(model)
    name = adapters.load(tmp_path)
    model.eval()
    heads = {
        id(p)
        for m, c in adapters.components(name).items()
        if adapters.sites(name)[m] == "head"
        for p in c.parameters()
    }
    for p in adapters.parameters(name):  # peft's autocast_adapter_dtype: float32 adapters, head copies in bf16
        assert p.dtype == (torch.bfloat16 if id(p) in heads else torch.float32)
    torch.testing.assert_close(logits(model, inputs), logits(pm, inputs), atol=5e-2, rtol=2e-2)


# --- PiSSA / OLoRA ---------------------------------------------------------------------------------
PISSA_VARIANTS = [
    pytest.param("llama", {"targets": QV}, id="llama"),
    pytest.param("llama", {"targets": QV, "rslora": True, "alpha": 5}, id="llama-rslora"),
    pytest.param("llama", {"targets": QV, **PATTERNS}, id="llama-patterns"),
    pytest.param("llama", {"targets": QV, "dora": True}, id="llama-dora"),
    pytest.param("gpt2", {"targets": ["c_attn", "c_fc"]}, id="gpt2-conv1d"),
]


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize(("family", "kw"), PISSA_VARIANTS)
def test_pissa_olora_export_applies_to_original_model(init: str, family: str, kw: dict, tmp_path: Path) -> None:
    model = build(family)
    inputs = inputs_for(family)
    base = logits(model, inputs)
    adapters = ak.attach(model)
    adapters.add("p", ak.LoRA(**{"r": 4, "alpha": 8, **kw}, init=init))
    model.eval()
    torch.testing.assert_close(logits(model, inputs), base, atol=1e-4, rtol=1e-4)  # identity at init
    perturb([t for comp in adapters.components("p").values() for t in (comp.lora_A, comp.lora_B)])
    ours = logits(model, inputs)
    assert_nontrivial(ours, base)

    adapters.export("p", tmp_path, format="peft")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 2 * kw.get("r", 4) and cfg["init_lora_weights"] is True
    pm = PeftModel.from_pretrained(build(family), str(tmp_path))  # the original, unmodified base
    torch.testing.assert_close(logits(pm, inputs), ours, **TOL)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_unconverted_peft_pissa_olora_is_refused(init: str, tmp_path: Path) -> None:
    pm = get_peft_model(build("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights=init))
    pm.save_pretrained(tmp_path)
    model = build("llama")
    adapters = ak.attach(model)
    with pytest.raises(ak.AdapterFileError):
        adapters.load(tmp_path)
    assert adapters.names == []


def test_converted_peft_pissa_loads_on_original_model(tmp_path: Path) -> None:
    """peft's own PiSSA conversion (``path_initial_model_for_weight_conversion``) is a plain LoRA."""
    pm = get_peft_model(
        build("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights="pissa")
    )
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(tmp_path / "init")
    pm.peft_config["default"].init_lora_weights = "pissa"
    perturb(trainable(pm))
    pm.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    inputs = inputs_for("llama")
    expected = logits(pm.eval(), inputs)

    model = build("llama")
    ak.attach(model).load(tmp_path / "out")
    torch.testing.assert_close(logits(model, inputs), expected, **TOL)


# --- bugs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["load", "add"])
def test_dropout_respects_eval_mode(how: str, tmp_path: Path) -> None:
    inputs = inputs_for("llama")
    model = build("llama")  # already in eval mode; no further .eval() call below
    adapters = ak.attach(model)
    if how == "load":
        pm = get_peft_model(
            build("llama"),
            LoraConfig(r=4, lora_alpha=8, target_modules=QV, lora_dropout=0.5, init_lora_weights=False),
        )
        pm.save_pretrained(tmp_path)
        expected = logits(pm.eval(), inputs)
        adapters.load(tmp_path)
    else:
        adapters.add("d", ak.LoRA(r=4, alpha=8, targets=QV, dropout=0.5, init_weights=False))
        expected = None
    first = logits(model, inputs)
    torch.testing.assert_close(logits(model, inputs), first, atol=0, rtol=0)
    if expected is not None:
        torch.testing.assert_close(first, expected, **TOL)
