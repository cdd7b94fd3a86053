"""Per-row routing: a mixed batch equals running each row alone with its adapter."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak

from conftest import make_inputs, make_model, output_of

CONFIGS = {
    "a": ak.LoRA(r=4, targets="all-linear", init_weights=False),
    "b": ak.LoRA(r=2, alpha=3, targets="all-linear", init_weights=False, dora=True),
    "c": ak.LoRA(r=8, targets="all-linear", init_weights=False, bias="lora_only", rslora=True),
}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
def test_mixed_batch_equals_per_row_runs(family: str) -> None:
    model = make_model(family)
    adapters = ak.attach(model)
    for name, cfg in CONFIGS.items():
        adapters.add(name, cfg)
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rows = ["a", None, "b", "c", "a"]
    inputs = make_inputs(family, batch=len(rows))
    with torch.no_grad(), adapters.route(rows):
        mixed = output_of(model, inputs)
    with torch.no_grad():
        singles = []
        for i, name in enumerate(rows):
            with adapters.use(name):
                singles.append(output_of(model, {k: v[i : i + 1] for k, v in inputs.items()}))
    torch.testing.assert_close(mixed, torch.cat(singles), atol=1e-5, rtol=1e-5)


def test_route_restores_active_and_rejects_unknown() -> None:
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", CONFIGS["a"])
    with pytest.raises(KeyError, match="nope"), adapters.route(["a", "nope"]):
        pass
    assert adapters.state.routes is None
    assert adapters.active == ("a",)


def test_route_trains_each_row_own_adapter() -> None:
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", CONFIGS["a"])
    adapters.add("b", ak.LoRA(r=4, targets="all-linear", init_weights=False))
    inputs = make_inputs("llama", batch=2)
    with adapters.route(["a", None]):
        output_of(model, inputs).sum().backward()
    assert all(p.grad is not None for p in adapters.parameters("a"))
    assert all(p.grad is None for p in adapters.parameters("b"))


def _per_row(model, adapters, rows, inputs):
    out = []
    for i, name in enumerate(rows):
        with adapters.use(name):
            out.append(output_of(model, {k: v[i : i + 1] for k, v in inputs.items()}))
    return torch.cat(out)


@pytest.mark.parametrize("length", [1, 12])
def test_rank_buckets_with_uneven_rows_equal_per_row_runs(length: int) -> None:
    """Serving's no-grad path: rows bucketed by rank, popular adapters split over several slots, padded slots
    (decode-shaped length 1 and prefill-shaped length 12)."""
    model = make_model("llama")
    adapters = ak.attach(model)
    for i in range(7):
        adapters.add(f"a{i}", ak.LoRA(r=[2, 4, 8][i % 3], alpha=[3, 4, 16][i % 3], targets="all-linear"))
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(0, 0.1)
    rows = ["a0", "a1", "a0", None, "a0", "a3", "a2", "a0", "a6", "a1", "a0", "a5"]
    inputs = make_inputs("llama", batch=len(rows), seq=length)
    with torch.inference_mode(), adapters.route(rows):
        mixed = output_of(model, inputs)
    with torch.inference_mode():
        torch.testing.assert_close(mixed, _per_row(model, adapters, rows, inputs), atol=1e-5, rtol=1e-5)


def test_stacked_weights_kept_across_plans_follow_weight_changes_and_reloads() -> None:
    """Stacked factors carried from plan to plan (continuous batching) never serve stale weights: an in-place
    change, a deleted and re-added adapter of the same name, a new set of rows."""
    model = make_model("llama")
    adapters = ak.attach(model)
    for name in ("a", "b"):
        adapters.add(name, ak.LoRA(r=4, targets="all-linear", init_weights=False))
    rows = ["a", "b", "a", None]
    inputs = make_inputs("llama", batch=len(rows), seq=1)

    def check() -> None:
        with torch.no_grad():
            with adapters.route(rows):
                mixed = output_of(model, inputs)
            torch.testing.assert_close(mixed, _per_row(model, adapters, rows, inputs), atol=1e-5, rtol=1e-5)

    check()
    with torch.no_grad():
        for p in adapters.parameters("a"):
            p.mul_(2.0)  # in place: new versions
    check()
    adapters.delete("b")
    adapters.add("b", ak.LoRA(r=4, targets="all-linear", init_weights=False))
    with torch.no_grad():
        for p in adapters.parameters("b"):
            p.normal_(0, 0.2)
    check()
    rows[3] = "b"
    check()


@pytest.mark.parametrize("method", ["lora", "oft"])
def test_cached_weights_follow_a_fused_optimizer_step(method) -> None:
    """Fused optimizers (AdamW(fused=True), the Trainer's adamw_torch_fused) update parameters in place without
    bumping ``_version``: routed forwards after a training step must not reuse weights stacked before it."""
    model = make_model("llama")
    adapters = ak.attach(model)
    config = ak.LoRA(init_weights=False) if method == "lora" else ak.OFT(oft_block_size=4, init_weights=False)
    adapters.add("a", config)
    adapters.add("b", config)
    x = make_inputs("llama", batch=2, seq=1)
    rows = ["a", "b"]
    with torch.no_grad(), adapters.route(rows):
        before = output_of(model, x)
    adapters.train("a")
    opt = torch.optim.AdamW(list(adapters.parameters("a")), lr=0.5, fused=True)
    output_of(model, x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad(), adapters.route(rows):
        after = output_of(model, x)
    assert not torch.allclose(after[0], before[0], atol=1e-4)  # the step changed adapter a
    torch.testing.assert_close(after, _per_row(model, adapters, rows, x), atol=1e-5, rtol=1e-5)
