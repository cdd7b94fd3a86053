"""DyLoRA (issue 18): rank draws per step, nested truncations (frozen: only the drawn rank learns), any rank at
inference equal to a plain LoRA of that rank, merge/save at the chosen rank, the step hook."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak

from conftest import make_inputs, make_model


def _setup(**cfg):
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("d", ak.DyLoRA(targets=["attn.q", "attn.v"], **cfg))
    with torch.no_grad():
        for c in adapters.components("d").values():
            c.lora_B.normal_(std=0.1)
    x = make_inputs("llama")
    return model, adapters, {**x, "labels": x["input_ids"]}


@torch.no_grad()
def _logits(model, x):
    return model(**x).logits


def test_any_rank_equals_a_plain_lora_of_that_rank():
    model, adapters, x = _setup(r_max=6, alpha=12)
    for b in (1, 2, 4, 6):
        adapters.set_rank("d", b)
        assert adapters.config("d").rank == b
        got = _logits(model, x)
        ref = make_model("llama")
        ra = ak.attach(ref)
        ra.add("l", ak.LoRA(r=b, alpha=12, targets=["attn.q", "attn.v"]))
        with torch.no_grad():
            for site, c in ra.components("l").items():
                d = adapters.components("d")[site]
                c.lora_A.copy_(d.lora_A[:b])
                c.lora_B.copy_(d.lora_B[:, :b])
        torch.testing.assert_close(got, _logits(ref, x), atol=1e-6, rtol=1e-5)


def test_merge_and_save_at_the_chosen_rank(tmp_path):
    model, adapters, x = _setup(r_max=4)
    adapters.set_rank("d", 2)
    expected = _logits(model, x)
    adapters.merge("d")
    with adapters.use():
        torch.testing.assert_close(_logits(model, x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unmerge"):
        adapters.set_rank("d", 3)
    adapters.unmerge("d")
    adapters.save("d", tmp_path / "d")
    fresh = make_model("llama")
    fa = ak.attach(fresh)
    fa.load(tmp_path / "d")
    assert fa.config("d").rank == 2
    torch.testing.assert_close(_logits(fresh, x), expected, atol=1e-6, rtol=0)
    fa.set_rank("d", 4)  # the file holds every rank
    adapters.set_rank("d", 4)
    torch.testing.assert_close(_logits(fresh, x), _logits(model, x), atol=1e-6, rtol=0)


def test_bad_ranks_are_refused():
    model, adapters, _ = _setup(r_max=4, r_min=2)
    with pytest.raises(ValueError, match=r"\[r_min=2, r_max=4\]"):
        adapters.set_rank("d", 5)
    with pytest.raises(ValueError, match="r_min"):
        adapters.set_rank("d", 1)
    assert adapters.config("d").rank is None and all(c.rank == 4 for c in adapters.components("d").values())
    with pytest.raises(ValueError, match="r_min"):
        ak.DyLoRA(r_max=2, r_min=3)
    lora = ak.attach(make_model("llama"))
    lora.add("l", ak.LoRA())
    with pytest.raises(TypeError, match="no rank to choose"):
        lora.set_rank("l", 2)


def test_training_draws_one_rank_per_step_and_trains_only_it():
    model, adapters, x = _setup(r_max=8, seed=3)
    adapters.train("d")
    model.train()
    comps = list(adapters.components("d").values())
    draw = comps[0].draw
    assert all(c.draw is draw for c in comps)
    opt = torch.optim.SGD(adapters.parameters("d"), lr=0.1)
    drawn = []
    for step in range(6):
        b = draw.b
        assert b == draw.draw(step)
        drawn.append(b)
        model(**x).loss.backward()
        for c in comps:  # frozen (Algorithm 1): only row/column b-1 has a gradient
            rows = c.lora_B.grad.abs().sum(0) + c.lora_A.grad.abs().sum(1)
            assert rows[b - 1] > 0 and (rows[: b - 1] == 0).all() and (rows[b:] == 0).all()
        opt.step()
        adapters.step()
        opt.zero_grad()
    assert len(set(drawn)) > 1
    model.eval()
    assert all(c.current_rank() == 8 for c in comps)


def test_unfrozen_training_trains_the_whole_truncation():
    model, adapters, x = _setup(r_max=8, frozen=False, seed=1)
    adapters.train("d")
    model.train()
    c = next(iter(adapters.components("d").values()))
    b = c.draw.b
    model(**x).loss.backward()
    rows = c.lora_B.grad.abs().sum(0)
    assert (rows[:b] > 0).all() and (rows[b:] == 0).all()


def test_training_without_step_is_refused():
    model, adapters, x = _setup(r_max=4)
    adapters.train("d")
    model.train()
    opt = torch.optim.AdamW(adapters.parameters("d"), lr=1e-3, fused=True)  # fused: no _version bump
    model(**x).loss.backward()
    opt.step()
    opt.zero_grad()
    with pytest.raises(RuntimeError, match=r"\(dylora\).*adapters\.step\(\)"):
        model(**x)


def test_a_resumed_run_draws_the_ranks_of_the_uninterrupted_one():
    _, adapters, _ = _setup(r_max=8, seed=5)
    adapters.train("d")
    adapters.begin_training(100, step=7)
    draw = next(iter(adapters.components("d").values())).draw
    assert draw.b == draw.draw(7)
    adapters.step()
    assert draw.b == draw.draw(8) and adapters.global_step == 8


def test_routed_rows_use_each_adapters_rank():
    model, adapters, x = _setup(r_max=4)
    adapters.add("e", ak.DyLoRA(r_max=6, rank=5, targets=["attn.q", "attn.v"], init_weights=False))
    adapters.set_rank("d", 2)
    x = make_inputs("llama", batch=3)
    with torch.no_grad(), adapters.route(["d", "e", None]):
        mixed = model(**x).logits
    singles = []
    for i, n in enumerate(["d", "e", None]):
        with torch.no_grad(), adapters.use(n):
            singles.append(model(**{k: v[i : i + 1] for k, v in x.items()}).logits)
    torch.testing.assert_close(mixed, torch.cat(singles), atol=1e-5, rtol=1e-5)
    adapters.set_rank("d", 3)  # the stacked weights are rebuilt for the new rank
    with torch.no_grad(), adapters.route(["d", "e", None]):
        again = model(**x).logits
    with torch.no_grad(), adapters.use("d"):
        torch.testing.assert_close(
            again[:1], model(**{k: v[:1] for k, v in x.items()}).logits, atol=1e-5, rtol=1e-5
        )
