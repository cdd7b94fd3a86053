"""LoReFT (Wu et al. 2024, §3.1-3.3): the equation, positions from the attention mask, orthonormality of R,
training, generation with a KV cache, and the mask bookkeeping around calls."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.methods.reft import LoReFTBlock, select_positions

from conftest import make_inputs, make_model, output_of


def capture(module: torch.nn.Module, fn) -> torch.Tensor:
    """The hidden states ``module`` returns during ``fn()`` (a hook registered after adapterkit's sees the
    adapted output)."""
    seen: list[torch.Tensor] = []

    def hook(m, i, o):
        seen.append((o if isinstance(o, torch.Tensor) else o[0]).detach().clone())

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            fn()
    finally:
        handle.remove()
    return seen[0]


def padded_batch(side: str, vocab: int = 100, seed: int = 3) -> dict[str, torch.Tensor]:
    """Three rows of 9 positions with 9, 6 and 3 real tokens, padded on ``side``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (3, 9), generator=g)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, n in enumerate((9, 6, 3)):
        if side == "left":
            mask[row, 9 - n :] = 1
        else:
            mask[row, :n] = 1
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def expected_sets(mask: torch.Tensor, prefix: int, suffix: int) -> tuple[set, set]:
    """(row, position) pairs of the first ``prefix`` and the last ``suffix`` real tokens of each row, each
    capped to n // 2 when both are set (written out with Python lists, independently of select_positions)."""
    first, last = set(), set()
    for row in range(mask.shape[0]):
        real = [t for t in range(mask.shape[1]) if mask[row, t]]
        n = len(real)
        p, s = (
            (min(prefix, n // 2), min(suffix, n // 2)) if prefix and suffix else (min(prefix, n), min(suffix, n))
        )
        first |= {(row, t) for t in real[:p]}
        last |= {(row, t) for t in real[n - s :]}
    return first, last


def expected_positions(mask: torch.Tensor, prefix: int, suffix: int) -> set[tuple[int, int]]:
    first, last = expected_sets(mask, prefix, suffix)
    return first | last


def block_component(adapters: ak.Adapters, name: str, site: str) -> LoReFTBlock:
    comp = adapters.components(name)[site]
    assert isinstance(comp, LoReFTBlock)
    return comp


# --- the equation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "site", "config"),
    [
        ("llama", "model.layers.0", ak.LoReFT(r=3, prefix=2, suffix=2, layers=[0], init_weights=False)),
        ("gpt2", "transformer.h.0", ak.LoReFT(r=2, prefix=1, suffix=3, share_weights=True, init_weights=False)),
        ("t5", "encoder.block.0", ak.LoReFT(r=2, prefix=2, suffix=1, init_weights=False)),  # tuple outputs
    ],
)
def test_equation_at_one_site(family, site, config):
    model = make_model(family)
    x = padded_batch("right")
    if family == "t5":
        x["decoder_input_ids"] = torch.ones(3, 2, dtype=torch.long)
    module = model.get_submodule(site)
    h = capture(module, lambda: model(**x))  # the base block output (layer 0: its input is not adapted)
    adapters = ak.attach(model)
    adapters.add("reft", config)
    adapted = capture(module, lambda: model(**x))

    comp = block_component(adapters, "reft", site)
    first, last = expected_sets(x["attention_mask"], config.prefix, config.suffix)
    expected = h.clone()
    with torch.no_grad():
        for row, t in first | last:
            iv = comp.shared if config.share_weights else comp.prefix if (row, t) in first else comp.suffix
            rot, w, b = iv.rotation_matrix(), iv.weight, iv.bias
            v = h[row, t]
            expected[row, t] = v + rot.T @ (w @ v + b - rot @ v)  # Φ(h) = h + Rᵀ(W h + b − R h)
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(adapted, h)


def test_rotation_is_orthonormal_and_plain_tensors_are_saved():
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("reft", ak.LoReFT(r=4, share_weights=True))
    comp = block_component(adapters, "reft", "model.layers.0")
    rot = comp.shared.rotation_matrix()
    torch.testing.assert_close(rot @ rot.T, torch.eye(4), atol=1e-6, rtol=0)
    # init_weights=True: W = R and b = 0 (identity), R is the stored orthonormal tensor itself
    torch.testing.assert_close(comp.shared.weight, rot, atol=0, rtol=0)
    torch.testing.assert_close(rot, comp.shared.rotation, atol=1e-6, rtol=0)
    assert torch.equal(comp.shared.bias, torch.zeros(4))
    assert set(comp.state_dict()) == {"shared.rotation", "shared.weight", "shared.bias"}
    assert not adapters.components("reft")[""].state_dict()  # the recorder holds nothing


# --- positions --------------------------------------------------------------------------------------------
def test_select_positions():
    real = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0]]).bool()
    pre, suf = select_positions(real, 2, 2)
    assert pre.nonzero().tolist() == [[0, 0], [0, 1], [1, 2]]  # 5 real tokens -> 2 each; 3 -> 1 each; 1 -> 0
    assert suf.nonzero().tolist() == [[0, 5], [0, 6], [1, 4]]
    assert not (pre & suf).any()
    pre, suf = select_positions(real, 0, 4)  # a lone suffix is capped by n only
    assert not pre.any()
    assert suf.nonzero().tolist() == [[0, 3], [0, 4], [0, 5], [0, 6], [1, 2], [1, 3], [1, 4], [2, 0]]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    ("family", "site"),
    [("llama", "model.layers.0"), ("gpt2", "transformer.h.0"), ("bert", "bert.encoder.layer.0")],
)
@pytest.mark.parametrize(("prefix", "suffix", "share"), [(2, 2, False), (3, 0, False), (1, 2, True)])
def test_positions_from_attention_mask(family, site, side, prefix, suffix, share):
    model = make_model(family)
    x = padded_batch(side)
    module = model.get_submodule(site)
    base = capture(module, lambda: model(**x))
    adapters = ak.attach(model)
    adapters.add("reft", ak.LoReFT(prefix=prefix, suffix=suffix, share_weights=share, init_weights=False))
    adapted = capture(module, lambda: model(**x))
    changed = (adapted != base).any(-1)
    assert {tuple(p) for p in changed.nonzero().tolist()} == expected_positions(
        x["attention_mask"], prefix, suffix
    )
    assert torch.equal(adapted[~changed], base[~changed])  # every other position untouched, bit for bit


def test_no_mask_means_every_position_is_real():
    model = make_model("vit")
    x = make_inputs("vit")
    module = model.get_submodule("vit.layers.0")
    base = capture(module, lambda: model(**x))
    ak.attach(model).add("reft", ak.LoReFT(prefix=1, suffix=2, init_weights=False))
    adapted = capture(module, lambda: model(**x))
    length = base.shape[1]  # 16 patches + CLS
    changed = {tuple(p) for p in (adapted != base).any(-1).nonzero().tolist()}
    assert changed == {(row, t) for row in range(2) for t in (0, length - 2, length - 1)}


def test_prompt_from_labels_counts_positions_in_the_prompt():
    model = make_model("llama")
    x = padded_batch("left")
    labels = x["input_ids"].clone()
    labels[:, :7] = -100  # rows: prompt = real tokens before position 7; the third row has only 2 prompt tokens
    module = model.get_submodule("model.layers.0")
    base = capture(module, lambda: model(**x, labels=labels))
    ak.attach(model).add("reft", ak.LoReFT(prefix=0, suffix=2, prompt_from_labels=True, init_weights=False))
    adapted = capture(module, lambda: model(**x, labels=labels))
    changed = {tuple(p) for p in (adapted != base).any(-1).nonzero().tolist()}
    assert changed == {(0, 5), (0, 6), (1, 5), (1, 6), (2, 6)}
    # without labels the whole sequence is the prompt
    with ak.attach(model).use():
        base = capture(module, lambda: model(**x))
    adapted = capture(module, lambda: model(**x))
    changed = {tuple(p) for p in (adapted != base).any(-1).nonzero().tolist()}
    assert changed == expected_positions(x["attention_mask"], 0, 2)


# --- R under training, training itself ----------------------------------------------------------------------
def lm_batch() -> dict[str, torch.Tensor]:
    x = padded_batch("right")
    return {**x, "labels": x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)}


def test_rotation_stays_orthonormal_and_training_reduces_the_loss():
    torch.manual_seed(0)
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("reft", ak.LoReFT(r=4, prefix=4, suffix=4))
    adapters.train("reft")
    model.train()
    comp = block_component(adapters, "reft", "model.layers.1")
    rot0 = comp.prefix.rotation_matrix().detach().clone()
    opt = torch.optim.AdamW(adapters.parameters("reft"), lr=5e-2)
    batch = lm_batch()
    losses = []
    for _ in range(25):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.92 * losses[0], losses  # a few edited positions of a random tiny model
    for iv in comp.interventions():
        rot = iv.rotation_matrix().detach()
        torch.testing.assert_close(rot @ rot.T, torch.eye(4), atol=1e-5, rtol=0)
    assert (comp.prefix.rotation_matrix().detach() - rot0).abs().max() > 1e-3  # R itself moved
    assert all(p.grad is None for n, p in model.named_parameters() if "ak_adapters" not in n)


class Checkpointed(torch.nn.Module):
    """Runs ``inner`` (hooks included) under non-reentrant activation checkpointing: the backward pass calls
    it again, after the model's forward has returned."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


@pytest.mark.parametrize("how", ["transformers", "hooks-inside"])
def test_gradient_checkpointing_recomputes_the_same_interventions(how):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = make_model("llama")
        if checkpointing and how == "transformers":
            model.gradient_checkpointing_enable()  # checkpoints `forward`: hooks stay outside
        elif checkpointing:
            for i, layer in enumerate(model.model.layers):
                model.model.layers[i] = Checkpointed(layer)
        adapters = ak.attach(model)
        sites = [n for n, m in model.named_modules() if type(m).__name__ == "LlamaDecoderLayer"]
        adapters.add("reft", ak.LoReFT(r=2, prefix=2, suffix=2, targets=sites, init_weights=False))
        adapters.train("reft")
        model.train()
        model(**lm_batch(), use_cache=False).loss.backward()  # a replayed layer would write a cache twice
        grads.append([p.grad.clone() for p in adapters.parameters("reft")])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# --- generation ----------------------------------------------------------------------------------------------
def reference_generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding without a cache, intervening on the prompt's positions only (labels mark generated
    tokens, so ``prompt_from_labels`` keeps the positions on the prompt)."""
    prompt = ids.shape[1]
    for _ in range(steps):
        labels = torch.full_like(ids, -100)
        labels[:, prompt:] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_cache_intervenes_on_the_prompt(family):
    model = make_model(family)
    x = padded_batch("left")
    adapters = ak.attach(model)
    adapters.add("reft", ak.LoReFT(r=2, prefix=2, suffix=2, prompt_from_labels=True, init_weights=False))
    with torch.no_grad():
        for p in adapters.parameters("reft"):
            p.mul_(8.0)  # a strong edit, so generation visibly depends on it
    model.generation_config.pad_token_id = 0
    out = model.generate(**x, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, reference_generate(model, x["input_ids"], x["attention_mask"], 6))
    with adapters.use():
        base = model.generate(**x, max_new_tokens=6, do_sample=False)
    assert not torch.equal(out, base)


def test_t5_generate_cache_and_no_cache_agree():
    model = make_model("t5")
    x = padded_batch("right")
    adapters = ak.attach(model)
    adapters.add("reft", ak.LoReFT(prefix=2, suffix=2, init_weights=False))
    kw = {**x, "max_new_tokens": 5, "do_sample": False}
    out = model.generate(**kw)
    assert torch.equal(out, model.generate(**kw, use_cache=False))  # the encoder runs once either way


# --- mask bookkeeping ------------------------------------------------------------------------------------------
def test_no_stale_mask_and_no_call_outside_the_model():
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("reft", ak.LoReFT(prefix=2, suffix=2, init_weights=False))
    x = padded_batch("right")
    ids = x["input_ids"]
    with torch.no_grad():
        fresh = output_of(model, {"input_ids": ids})  # no mask: every position is real
        output_of(model, x)  # a padded call in between
        again = output_of(model, {"input_ids": ids})
    assert torch.equal(fresh, again)
    layer = model.model.layers[0]
    hidden = torch.randn(1, 4, 32)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(4)[None])
    with pytest.raises(RuntimeError, match="outside a call"):
        layer(hidden, position_embeddings=position_embeddings)


@pytest.mark.parametrize("other", [ak.PromptTuning(num_virtual_tokens=3), ak.PrefixTuning(num_virtual_tokens=3)])
def test_stacked_with_model_level_adapters_in_either_order(other):
    """Soft-prompt positions count as real tokens in front; prefix-tuning keys are no positions of the sequence."""
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("p", other)
    adapters.add("r", ak.LoReFT(prefix=2, suffix=2, init_weights=False))
    x = padded_batch("left")
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        adapters.activate("p", "r")
        a, gen_a = output_of(model, x), model.generate(**x, max_new_tokens=4, do_sample=False)
        adapters.activate("r", "p")
        b, gen_b = output_of(model, x), model.generate(**x, max_new_tokens=4, do_sample=False)
        adapters.activate("p")
        alone = output_of(model, x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.equal(gen_a, gen_b)
    assert not torch.equal(a, alone)


def test_bfloat16_model():
    model = make_model("llama").to(torch.bfloat16)
    x = make_inputs("llama")
    base = output_of(model, x)
    adapters = ak.attach(model)
    adapters.add("reft", ak.LoReFT())
    assert torch.equal(output_of(model, x), base)
    assert all(p.dtype == torch.float32 for p in adapters.parameters("reft"))  # autocast_adapter_dtype
    adapters.add("bf16", ak.LoReFT(), autocast_adapter_dtype=False)
    assert all(p.dtype == torch.bfloat16 for p in adapters.parameters("bf16"))
    with adapters.use("bf16"):
        assert torch.equal(output_of(model, x), base)


# --- errors -------------------------------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(ValueError, match="prefix > 0"):
        ak.LoReFT(prefix=0, suffix=0)
    with pytest.raises(ValueError, match="r must be"):
        ak.LoReFT(r=0)
    with pytest.raises(ValueError, match="dropout"):
        ak.LoReFT(dropout=1.0)
    model = make_model("llama")
    adapters = ak.attach(model)
    with pytest.raises(ValueError, match="exceeds the hidden size"):
        adapters.add("reft", ak.LoReFT(r=64))
    with pytest.raises(ak.TargetError, match="block outputs"):
        adapters.add("reft", ak.LoReFT(targets=[""]))
    adapters.add("reft", ak.LoReFT(targets=["self_attn.k_proj"]))  # outputs (B, L, 16) with 2 kv heads
    with pytest.raises(ValueError, match=r"\(batch, seq, 32\)"):
        output_of(model, make_inputs("llama"))
    adapters.delete("reft")
    adapters.add("reft", "loreft")
    with pytest.raises(TypeError, match="cannot be merged"):
        adapters.merge("reft")


def test_from_positions():
    cfg = ak.LoReFT.from_positions("f7+l7", r=2)
    assert (cfg.prefix, cfg.suffix, cfg.r) == (7, 7, 2)
    assert (ak.LoReFT.from_positions("l3").prefix, ak.LoReFT.from_positions("l3").suffix) == (0, 3)
    with pytest.raises(ValueError, match="f7\\+l7"):
        ak.LoReFT.from_positions("first7")
