"""Hot-swapping adapter weights in a ``torch.compile``-d model without recompiling (issue 19, item 7):
``adapters.prepare_hotswap(max_rank)`` before compiling, ``adapters.hotswap(name, path)`` after. A
``CompileCounter`` backend counts compilations; ``error_on_recompile`` turns any recompile into a failure."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import adapterkit as ak

from conftest import make_inputs, make_model, output_of

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _perturb(adapters: ak.Adapters, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _saved(
    base: torch.nn.Module, config: ak.AdapterConfig, path: Path, seed: int, fmt: str = "native"
) -> torch.Tensor:
    """Save an adapter made on a copy of ``base``; return that model's logits with it (the reference)."""
    model = copy.deepcopy(base)
    adapters = ak.attach(model)
    adapters.add("x", config)
    _perturb(adapters, "x", seed)
    if fmt == "native":
        adapters.save("x", path)
    else:
        adapters.export("x", path, format=fmt)
    with torch.no_grad():
        return output_of(model, make_inputs("llama"))


def _compiled(model: torch.nn.Module) -> tuple[torch.nn.Module, CompileCounter]:
    torch._dynamo.reset()
    counter = CompileCounter()
    return torch.compile(model, backend=counter, fullgraph=True), counter


@pytest.mark.parametrize("fmt", ["native", "peft"])
def test_lora_of_other_ranks_and_alphas_swaps_in_without_recompiling(tmp_path, fmt) -> None:
    base = make_model("llama")
    refs = {
        "b": _saved(base, ak.LoRA(r=8, alpha=4, targets=LLAMA_ALL), tmp_path / "b", 1, fmt),
        "c": _saved(base, ak.LoRA(r=2, alpha=16, targets=LLAMA_ALL, rank_pattern={"v_proj": 6}), tmp_path / "c", 2, fmt),
    }  # fmt: skip
    model = copy.deepcopy(base)
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=4, alpha=8, targets=LLAMA_ALL))
    _perturb(adapters, "a", 0)
    inputs = make_inputs("llama")
    with torch.no_grad():
        before = output_of(model, inputs)
        adapters.prepare_hotswap(max_rank=8)
        torch.testing.assert_close(output_of(model, inputs), before, atol=1e-6, rtol=1e-6)  # padding is exact
        compiled, counter = _compiled(model)
        torch.testing.assert_close(output_of(compiled, inputs), before, atol=1e-5, rtol=1e-5)
        frames = counter.frame_count
        with torch._dynamo.config.patch(error_on_recompile=True):
            for name in ("b", "c"):
                adapters.hotswap("a", tmp_path / name)
                torch.testing.assert_close(output_of(compiled, inputs), refs[name], atol=1e-5, rtol=1e-5)
    assert counter.frame_count == frames  # no recompilation
    # the swapped adapter saves and loads as itself (padded rank, its own outputs)
    adapters.save("a", tmp_path / "a-now")
    fresh = copy.deepcopy(base)
    ak.attach(fresh).load(tmp_path / "a-now", name="a")
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, inputs), refs["c"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        ak.IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
        ak.LoHa(r=4, targets=["q_proj", "v_proj"]),
        ak.Bottleneck(reduction_factor=8),
        ak.LoRA(r=4, targets=["q_proj", "v_proj"], dora=True),
    ],
    ids=["ia3", "loha", "bottleneck", "dora"],
)
def test_fixed_shape_methods_swap_in_without_recompiling(tmp_path, config) -> None:
    base = make_model("llama")
    ref = _saved(base, config, tmp_path / "new", 5)
    model = copy.deepcopy(base)
    adapters = ak.attach(model)
    adapters.add("a", config)
    _perturb(adapters, "a", 6)
    inputs = make_inputs("llama")
    compiled, counter = _compiled(model)
    with torch.no_grad():
        output_of(compiled, inputs)
        frames = counter.frame_count
        with torch._dynamo.config.patch(error_on_recompile=True):
            adapters.hotswap("a", tmp_path / "new")
            torch.testing.assert_close(output_of(compiled, inputs), ref, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == frames


def test_refusals_name_what_differs_and_change_nothing(tmp_path) -> None:
    base = make_model("llama")
    _saved(base, ak.LoRA(r=16, targets=["q_proj", "v_proj"]), tmp_path / "r16", 1)
    _saved(base, ak.LoRA(r=4, targets=["q_proj"]), tmp_path / "q-only", 1)
    _saved(base, ak.LoHa(r=4, targets=["q_proj", "v_proj"]), tmp_path / "loha", 1)
    _saved(base, ak.LoRA(r=4, targets=["q_proj", "v_proj"], dora=True), tmp_path / "dora", 1)
    _saved(base, ak.LoHa(r=4, alpha=3, targets=["q_proj", "v_proj"]), tmp_path / "loha-alpha", 1)
    model = copy.deepcopy(base)
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=8, targets=["q_proj", "v_proj"]))
    adapters.add("h", ak.LoHa(r=4, targets=["q_proj", "v_proj"]))
    _perturb(adapters, "a", 0)
    snapshot = [p.clone() for p in adapters.parameters()]
    for name, source, needle in (
        ("a", "r16", r"rank 16 > 8: call adapters.prepare_hotswap\(max_rank=16\)"),
        ("a", "q-only", "adapts other modules"),
        ("a", "loha", "is a loha adapter"),
        ("a", "dora", "differs from 'a' in dora"),
        ("h", "loha-alpha", "differs from 'h' in alpha"),
    ):
        with pytest.raises(ValueError, match=needle):
            adapters.hotswap(name, tmp_path / source)
    assert all(torch.equal(p, q) for p, q in zip(adapters.parameters(), snapshot, strict=True))
    with pytest.raises(ValueError, match="below the largest rank 8"):
        adapters.prepare_hotswap(max_rank=4)
    adapters.merge("a")
    with pytest.raises(ValueError, match="is merged"):
        adapters.hotswap("a", tmp_path / "r16")
