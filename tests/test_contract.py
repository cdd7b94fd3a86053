"""The contract matrix: every row ``(id, family, config)`` runs through the same contracts.

Contracts (peft's ``tests/testing_common.py`` style): (a) identity at init, (b) merge == unmerged and
unmerge restores, (c) save/load round trip, (d) only adapter parameters get gradients, (e) detach
restores the base bit-for-bit, (f) several adapters on one model, (g) a mixed batch routed per row equals
per-row runs (components that cannot be routed per row must say so with ``NotImplementedError``; the
contract then skips with that message). A new method adds rows here, not
tests; ``test_every_registered_method_has_rows`` enforces it.

Contracts run in eval mode (``model.eval()`` after ``add``), so dropout rows are deterministic.

Each method family keeps its rows in its own module ``tests/rows_<family>.py``, which defines
``ROWS`` (a list of ``(id, family, config)``) and optionally ``TIED`` (row ids whose merge must be
refused because the weight is tied), ``SECOND`` (method name -> config overrides for the second
adapter of contract (f), e.g. a different rank) and ``SKIP`` (``{(row id, contract): reason}`` for a
contract a method cannot meet by its nature, e.g. prompt tuning is not an identity at init; contracts
are named identity, merge, save, grads, detach, two, route) and ``AFTER_ADD`` (a callable ``(adapters, name, config,
family)`` the harness calls after each ``adapters.add`` of a contract, before the model is used; it acts on the
configs it owns and returns for the others, e.g. ``adapters.calibrate`` for data-aware inits, see
``rows_lora_data_init.py``). Every config must accept ``init_weights=False``
(start from non-identity values). Methods whose components are not mergeable must make ``merge``
raise TypeError and leave the model unchanged; that is what contract (b) checks for them.
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.targeting import CONTAINER

from conftest import make_inputs, make_model, output_of

# (id, family, config)
LORA_ROWS: list[tuple[str, str, ak.AdapterConfig]] = [
    # plain LoRA, default targets
    ("bert-default", "bert", ak.LoRA()),
    ("gpt2-default", "gpt2", ak.LoRA()),  # fused attn.qkv, Conv1D
    ("llama-default", "llama", ak.LoRA()),
    ("t5-default", "t5", ak.LoRA()),
    ("vit-default", "vit", ak.LoRA()),
    # scaling
    ("bert-r4-alpha16", "bert", ak.LoRA(r=4, alpha=16, targets=["attn.q", "attn.v", "attn.out"])),
    ("gpt2-rslora", "gpt2", ak.LoRA(r=4, alpha=8, rslora=True, targets=["attn.qkv", "ffn.up"])),
    ("llama-dropout", "llama", ak.LoRA(dropout=0.1, targets=["attn.q", "attn.v", "ffn.down"])),
    (
        "llama-patterns",
        "llama",
        ak.LoRA(
            r=4,
            alpha=8,
            targets=["attn.q", "attn.v", "ffn.up"],
            rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
            alpha_pattern={"q_proj": 16.0, "up_proj": 3.0},
        ),
    ),
    # DoRA on Linear and Conv1D
    ("llama-dora", "llama", ak.LoRA(dora=True, targets=["attn.q", "attn.v", "ffn.down"])),
    ("gpt2-dora", "gpt2", ak.LoRA(dora=True)),
    # bias training
    ("bert-bias-lora_only", "bert", ak.LoRA(bias="lora_only")),
    ("vit-bias-all", "vit", ak.LoRA(bias="all")),
    ("gpt2-bias-all", "gpt2", ak.LoRA(bias="all", targets=["attn.out"])),
    # inits
    ("t5-gaussian", "t5", ak.LoRA(init="gaussian")),
    ("llama-pissa", "llama", ak.LoRA(init="pissa", r=4, targets=["attn.q", "attn.v", "ffn.down"])),
    ("bert-olora", "bert", ak.LoRA(init="olora", r=4)),
    ("gpt2-pissa", "gpt2", ak.LoRA(init="pissa", r=4)),
    # embeddings (gpt2 and t5 tie input and output embeddings: merging is refused)
    ("bert-embed", "bert", ak.LoRA(targets=["embed"])),
    ("llama-embed", "llama", ak.LoRA(targets=["embed", "attn.q"])),
    ("gpt2-embed", "gpt2", ak.LoRA(targets=["embed"])),
    ("t5-embed", "t5", ak.LoRA(targets=["embed"])),
    # all-linear
    ("t5-all-linear", "t5", ak.LoRA(r=2, targets="all-linear")),
    ("vit-all-linear", "vit", ak.LoRA(r=2, targets=["all-linear"])),
    # classifier heads (peft's modules_to_save)
    ("bert-heads", "bert", ak.LoRA(heads=["head"])),
    ("vit-heads", "vit", ak.LoRA(heads=["head"], targets=["attn.q", "attn.v", "ffn.up"])),
    # Conv2d: ViT's patch projection
    ("vit-conv2d", "vit", ak.LoRA(targets=["embed"])),
    ("vit-conv2d-dora", "vit", ak.LoRA(targets=["embed", "attn.v"], dora=True)),
]

TIED = {"gpt2-embed", "t5-embed"}  # merging into a tied embedding must raise TypeError
SECOND: dict[str, dict] = {"lora": {"r": 2, "rank_pattern": {}}}  # contract (f): the second adapter differs
# (row id, contract) -> why the method cannot meet it by its nature (from the rows modules)
SKIP: dict[tuple[str, str], str] = {}
# rows modules' setup steps after each add (e.g. calibration): (adapters, name, config, family) -> None
AFTER_ADD: list[Callable[[ak.Adapters, str, ak.AdapterConfig, str], None]] = []
_FAMILY: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()  # model -> its family


def _collect() -> list[tuple[str, str, ak.AdapterConfig]]:
    """LoRA rows plus every ``tests/rows_*.py`` module's ``ROWS`` (and its ``TIED``/``SECOND``)."""
    rows = list(LORA_ROWS)
    for path in sorted(Path(__file__).parent.glob("rows_*.py")):
        module = importlib.import_module(path.stem)
        rows += module.ROWS
        TIED.update(getattr(module, "TIED", ()))
        SECOND.update(getattr(module, "SECOND", {}))
        SKIP.update(getattr(module, "SKIP", {}))
        if hasattr(module, "AFTER_ADD"):
            AFTER_ADD.append(module.AFTER_ADD)
    return rows


MATRIX = _collect()


# (row id, contract) -> reason; strict xfails, so a fix shows up as XPASS
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def _rows(contract: str) -> list:
    out = []
    for row_id, family, config in MATRIX:
        reason = KNOWN_BUGS.get((row_id, contract))
        marks = pytest.mark.xfail(reason=reason, strict=True) if reason else ()
        if (row_id, contract) in SKIP:
            marks = pytest.mark.skip(reason=SKIP[row_id, contract])
        out.append(pytest.param(row_id, family, config, id=row_id, marks=marks))
    return out


# --- helpers ---------------------------------------------------------------------------------------
def _splits_weight(config: ak.AdapterConfig) -> bool:
    """PiSSA/OLoRA/CorDA move a part of W into the adapter (identity only up to rounding)."""
    return getattr(getattr(config, "init", None), "value", None) in ("pissa", "olora", "corda")


def _plain(adapters: ak.Adapters, name: str) -> bool:
    """Adapters whose effect at each site is purely additive (``Component.additive``: no DoRA rescaling,
    no head swap, no sequential bottleneck)."""
    return all(c.additive for c in adapters.components(name).values())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@torch.no_grad()
def out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return output_of(model, inputs).detach().clone()


def setup(family: str, seed: int = 0):
    model = make_model(family, seed)
    _FAMILY[model] = family
    return model, ak.attach(model), make_inputs(family)


def add(adapters: ak.Adapters, name: str, config: ak.AdapterConfig, seed: int = 0, **overrides) -> None:
    torch.manual_seed(seed)
    config = config.replace(**overrides) if overrides else config
    adapters.add(name, config)
    for hook in AFTER_ADD:
        hook(adapters, name, config, _FAMILY[adapters.model])
    adapters.model.eval()  # contracts run in eval mode


@torch.no_grad()
def perturb(adapters: ak.Adapters, name: str, seed: int) -> None:
    """Make every adapter tensor non-trivial (bias deltas, heads, DoRA magnitudes, PiSSA factors)."""
    g = torch.Generator().manual_seed(seed)
    for p in adapters.parameters(name):
        p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def add_nonidentity(adapters: ak.Adapters, name: str, config: ak.AdapterConfig, seed: int = 0) -> None:
    add(adapters, name, config, seed=seed, init_weights=False)
    perturb(adapters, name, seed + 100)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_clean(model: nn.Module) -> None:
    for mod_name, module in model.named_modules():
        assert CONTAINER not in mod_name
        assert not module._forward_hooks, mod_name
        assert not module._forward_pre_hooks, mod_name


# --- the registry is covered ------------------------------------------------------------------------
def test_every_registered_method_has_rows():
    in_matrix = {config.method for _, _, config in MATRIX}
    missing = sorted({m for m, cls in ak.registered().items() if cls.standalone} - in_matrix)
    assert not missing, f"registered methods without contract rows: {missing}"


def test_matrix_covers_every_family():
    from conftest import EXTRA_FACTORIES, MODEL_FACTORIES

    assert {family for _, family, _ in MATRIX} == set(MODEL_FACTORIES) | set(EXTRA_FACTORIES)
    assert len({row_id for row_id, _, _ in MATRIX}) == len(MATRIX)


# --- (a) identity at init ---------------------------------------------------------------------------
@pytest.mark.parametrize(("row_id", "family", "config"), _rows("identity"))
def test_identity_at_init(row_id, family, config):
    model, adapters, x = setup(family)
    base = out(model, x)
    add(adapters, "a", config)
    assert adapters.active == ("a",)
    adapted = out(model, x)
    if _splits_weight(config):
        assert rel(adapted, base) < 1e-4
    else:
        assert (adapted - base).abs().max().item() <= 1e-6


# --- (b) merge == unmerged; unmerge restores ------------------------------------------------------
@pytest.mark.parametrize(("row_id", "family", "config"), _rows("merge"))
def test_merge_unmerge(row_id, family, config):
    model, adapters, x = setup(family)
    base = out(model, x)
    add(adapters, "a", config, init_weights=False)
    if not _splits_weight(config):  # PiSSA/OLoRA ignore init_weights: they start from W's factors
        assert rel(out(model, x), base) > 1e-4, "init_weights=False should not be an identity"
    perturb(adapters, "a", 1)
    unmerged = out(model, x)
    assert rel(unmerged, base) > 1e-4
    with adapters.use():  # PiSSA/OLoRA: the residual model; otherwise the base itself
        disabled = out(model, x)
    if not _splits_weight(config):
        assert torch.equal(disabled, base)

    if row_id in TIED or not all(c.mergeable for c in adapters.components("a").values()):
        before = state(model)
        with pytest.raises(TypeError, match="tied" if row_id in TIED else "cannot be merged"):
            adapters.merge("a")
        assert not adapters.is_merged("a")
        after = state(model)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert torch.equal(out(model, x), unmerged)
        return

    adapters.merge("a")
    assert adapters.is_merged("a")
    merged = out(model, x)
    assert rel(merged, unmerged) < 1e-5
    # the merged effect lives in the base weights: it persists with no adapter active
    with adapters.use():
        assert rel(out(model, x), unmerged) < 1e-5
    adapters.unmerge("a")
    assert not adapters.is_merged("a")
    assert rel(out(model, x), unmerged) < 1e-5
    with adapters.use():
        assert rel(out(model, x), disabled) < 1e-5


# --- (c) save / load round trip ---------------------------------------------------------------------
@pytest.mark.parametrize(("row_id", "family", "config"), _rows("save"))
def test_save_load_roundtrip(row_id, family, config, tmp_path):
    model, adapters, x = setup(family)
    add_nonidentity(adapters, "a", config)
    expected = out(model, x)

    adapters.save("a", tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter.safetensors", "adapter_config.json"]

    fresh, fresh_adapters, _ = setup(family)
    name = fresh_adapters.load(tmp_path / "a")
    fresh.eval()
    assert name == "a"
    assert fresh_adapters.active == ("a",)
    assert fresh_adapters.sites("a") == adapters.sites("a")
    assert fresh_adapters.config("a").to_dict() == adapters.config("a").to_dict()
    torch.testing.assert_close(out(fresh, x), expected, atol=1e-6, rtol=0)
    for (k1, v1), (k2, v2) in zip(
        sorted(fresh_adapters.components("a").items()), sorted(adapters.components("a").items()), strict=True
    ):
        assert k1 == k2
        s1, s2 = v1.state_dict(), v2.state_dict()
        assert s1.keys() == s2.keys()
        assert all(torch.equal(s1[k], s2[k]) for k in s1)


# --- (d) only adapter parameters train --------------------------------------------------------------
@pytest.mark.parametrize(("row_id", "family", "config"), _rows("grads"))
def test_only_adapter_params_get_grads(row_id, family, config):
    model, adapters, x = setup(family)
    add(adapters, "a", config)
    adapters.train("a")
    assert adapters.active == ("a",)
    own = list(adapters.parameters("a"))
    assert own
    own_ids = {id(p) for p in own}
    assert all(p.requires_grad for p in own)

    output_of(model, x).sum().backward()

    for pname, p in model.named_parameters():
        if id(p) in own_ids:
            continue
        assert not p.requires_grad, pname
        assert p.grad is None, pname
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in own)
    # the summary agrees
    (row,) = adapters.summary().rows
    assert row["trainable"] == row["params"] == sum(p.numel() for p in own)


# --- (e) detach restores the base bit-for-bit ------------------------------------------------------
@pytest.mark.parametrize(("row_id", "family", "config"), _rows("detach"))
def test_detach_restores_state_dict(row_id, family, config):
    model, adapters, x = setup(family)
    before = state(model)
    names_before = {n for n, _ in model.named_modules()}
    base = out(model, x)
    add_nonidentity(adapters, "a", config)
    adapters.train("a")
    output_of(model, x).sum().backward()
    adapters.model.eval()
    out(model, x)

    assert adapters.detach() is model
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]
    assert {n for n, _ in model.named_modules()} == names_before
    assert_clean(model)
    assert torch.equal(out(model, x), base)
    assert ak.attach(model) is not adapters  # a new controller after detach


# --- (f) several adapters on one model ---------------------------------------------------------------
def _first_site_outputs(adapters: ak.Adapters, sites: list[str], fn) -> torch.Tensor:
    """Output of the adapted module that runs first (its input is untouched by any adapter)."""
    modules = dict(adapters.model.named_modules())
    seen: list[torch.Tensor] = []
    handles = [
        modules[s].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()) if not seen else None)
        for s in sites
    ]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return seen[0]


@pytest.mark.parametrize(("row_id", "family", "config"), _rows("two"))
def test_two_adapters(row_id, family, config):
    model, adapters, x = setup(family)
    before, original = state(model), out(model, x)
    add_nonidentity(adapters, "a", config, seed=0)
    # one PiSSA/OLoRA adapter per module (a second is refused, see test_second_split_weight_adapter_is_refused)
    second = dict(SECOND.get(config.method, {}))
    if _splits_weight(config):
        second["init"] = "default"
    add_nonidentity(adapters, "b", config.replace(**second), seed=1)
    assert adapters.names == ["a", "b"]
    assert adapters.active == ("a",)  # the first adapter added becomes active

    def run(*names):
        adapters.activate(*names)
        return out(model, x)

    base, out_a, out_b, out_ab = run(), run("a"), run("b"), run("a", "b")
    assert rel(out_a, out_b) > 1e-4
    assert rel(out_ab, out_a) > 1e-4 and rel(out_ab, out_b) > 1e-4

    if _plain(adapters, "a"):  # deltas add up at a site (checked where the input is not yet adapted)
        sites = list(adapters.sites("a"))
        s = {
            names: _first_site_outputs(adapters, sites, lambda n=names: run(*n)) for names in [(), ("a",), ("b",)]
        }
        s_ab = _first_site_outputs(adapters, sites, lambda: run("a", "b"))
        lhs, rhs = s_ab - s[()], (s[("a",)] - s[()]) + (s[("b",)] - s[()])
        assert rel(lhs, rhs) < 1e-5

    # use() is scoped and restores the previous active set
    adapters.activate("a")
    with adapters.use("b"):
        assert adapters.active == ("b",)
        assert torch.equal(out(model, x), out_b)
        with adapters.use():
            assert adapters.active == ()
            assert torch.equal(out(model, x), base)
        assert adapters.active == ("b",)
    assert adapters.active == ("a",)
    with pytest.raises(RuntimeError), adapters.use("a", "b"):
        assert adapters.active == ("a", "b")
        raise RuntimeError("boom")
    assert adapters.active == ("a",)

    # deleting one leaves the other working
    adapters.delete("a")
    assert adapters.names == ["b"]
    assert "a" not in adapters.active
    adapters.activate("b")
    if not _splits_weight(config):  # deleting a PiSSA/OLoRA adapter gives b the original (not residual) base
        assert rel(out(model, x), out_b) < 1e-5
    with adapters.use():
        assert rel(out(model, x), original if _splits_weight(config) else base) < 1e-5
    adapters.detach()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert_clean(model)


# --- (g) mixed batch == per-row runs -----------------------------------------------------------------
@pytest.mark.parametrize(("row_id", "family", "config"), _rows("route"))
def test_mixed_batch_equals_per_row_runs(row_id, family, config):
    model, adapters, _ = setup(family)
    add_nonidentity(adapters, "a", config, seed=0)
    second = dict(SECOND.get(config.method, {}))
    if _splits_weight(config):
        second["init"] = "default"
    add_nonidentity(adapters, "b", config.replace(**second), seed=1)
    rows = ["a", None, "b", "a"]
    x = make_inputs(family, batch=len(rows))
    try:
        with adapters.route(rows):
            mixed = out(model, x)
    except NotImplementedError as e:
        pytest.skip(str(e))
    singles = []
    for i, name in enumerate(rows):
        with adapters.use(name):
            singles.append(out(model, {k: v[i : i + 1] for k, v in x.items()}))
    torch.testing.assert_close(mixed, torch.cat(singles), atol=1e-5, rtol=1e-5)


# --- found outside the matrix ------------------------------------------------------------------------
def test_adapter_added_to_eval_model_runs_in_eval_mode():
    model, adapters, x = setup("llama")
    assert not model.training
    adapters.add("a", ak.LoRA(dropout=0.5, init_weights=False))
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(out(model, x), out(model, x), atol=0, rtol=0)


def test_second_split_weight_adapter_is_refused():
    model, adapters, x = setup("llama")
    adapters.add("a", ak.LoRA(init="pissa", r=4))
    before, base = state(model), out(model, x)
    with pytest.raises(ValueError, match="PiSSA/OLoRA"):
        adapters.add("b", ak.LoRA(init="olora", r=2))
    assert adapters.names == ["a"]
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(out(model, x), base, atol=0, rtol=0)
