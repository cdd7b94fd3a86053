"""Per-row routing of the model-level methods (prompt tuning, prefix tuning) with ``generate()``.

Rows may hold adapters with different numbers of virtual tokens, or none (base rows); every row of a routed
``generate()`` must produce what that row produces alone with its adapter active (tokens exactly, scores to
1e-5 in float32), with and without left padding, through the KV cache.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import adapterkit as ak

from conftest import make_inputs, make_model

TOL = {"atol": 1e-5, "rtol": 1e-5}
FAMILIES = ["gpt2", "llama", "t5"]
KINDS = {"prompt": ak.PromptTuning, "prefix": ak.PrefixTuning}
ROWS = ["a", None, "b", "a"]


@torch.no_grad()
def _perturb(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(0.3 * torch.randn(p.shape, generator=g))


def _setup(family: str, kind: str) -> tuple[torch.nn.Module, Any]:
    model = make_model(family)
    model.generation_config.eos_token_id = None  # always run all steps
    model.generation_config.pad_token_id = 0
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", KINDS[kind](num_virtual_tokens=2))
    adapters.add("b", KINDS[kind](num_virtual_tokens=3))
    _perturb(adapters.parameters("a"), 1)
    _perturb(adapters.parameters("b"), 2)
    return model, adapters


def _inputs(family: str, padded: bool) -> dict[str, torch.Tensor]:
    x = make_inputs(family, batch=len(ROWS))
    x.pop("decoder_input_ids", None)
    if padded:
        x["attention_mask"][1, :2] = 0
        x["attention_mask"][2, :3] = 0
    return x


GEN = {"max_new_tokens": 5, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("family", FAMILIES)
def test_routed_generate_equals_per_row_generate(family, kind, padded):
    model, adapters = _setup(family, kind)
    x = _inputs(family, padded)
    with adapters.route(ROWS):
        out = model.generate(**x, **GEN)
    scores = torch.stack(out.scores, 1)  # (B, steps, vocab)
    for i, name in enumerate(ROWS):
        adapters.activate([] if name is None else [name])
        row = {k: v[i : i + 1] for k, v in x.items()}
        alone = model.generate(**row, **GEN)
        assert out.sequences[i].tolist() == alone.sequences[0].tolist(), f"row {i} ({name})"
        torch.testing.assert_close(scores[i], torch.stack(alone.scores, 1)[0], **TOL)
    adapters.activate([])
    base = torch.stack(model.generate(**{k: v[:1] for k, v in x.items()}, **GEN).scores, 1)[0]
    assert not torch.allclose(scores[0], base, atol=1e-3), "the adapters must change the output"


@pytest.mark.parametrize("kind", list(KINDS))
def test_routed_forward_with_cache_continues_like_one_call(kind):
    """Prefill then one decode step through the returned cache == one forward over all tokens."""
    model, adapters = _setup("llama", kind)
    x = _inputs("llama", padded=True)
    ids, mask = x["input_ids"], x["attention_mask"]
    with torch.no_grad(), adapters.route(ROWS):
        full = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        first = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=first.past_key_values)
    torch.testing.assert_close(step.logits[:, -1], full, **TOL)


def test_prefix_cache_of_another_routing_is_refused():
    model, adapters = _setup("llama", "prefix")
    x = _inputs("llama", padded=False)
    with torch.no_grad():
        with adapters.route(ROWS):
            cache = model(**x, use_cache=True).past_key_values
        nxt = {"input_ids": x["input_ids"][:, -1:], "past_key_values": cache}
        with pytest.raises(ValueError, match="different routing"), adapters.route(["b", None, "b", "a"]):
            model(**nxt)
        adapters.activate("a")
        with pytest.raises(ValueError):
            model(**nxt)
