"""Selectors -> sites: roles per family, exact names, suffixes, regexes, types, all-linear, exclude,
layers; plan/dry-run; summary()."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.targeting import CONTAINER

from conftest import make_inputs, make_model, output_of

# family -> role -> number of modules on the tiny models (2 layers; t5 has encoder + decoder)
ROLE_COUNTS = {
    "bert": {"attn.q": 2, "attn.v": 2, "attn.out": 2, "ffn.up": 2, "ffn.down": 2, "embed": 1, "head": 1},
    "gpt2": {"attn.qkv": 2, "attn.out": 2, "ffn.up": 2, "ffn.down": 2, "embed": 1, "head": 1},
    "llama": {"attn.q": 2, "attn.v": 2, "attn.out": 2, "ffn.up": 2, "ffn.down": 2, "embed": 1, "head": 1},
    "t5": {"attn.q": 6, "attn.v": 6, "attn.out": 6, "ffn.up": 4, "ffn.down": 4, "embed": 2, "head": 1},
    "vit": {"attn.q": 2, "attn.v": 2, "attn.out": 2, "ffn.up": 2, "ffn.down": 2, "embed": 1, "head": 1},
}
# expected leaf (last name component) per role, checked for every resolved module
ROLE_LEAVES = {
    "bert": {"attn.q": "query", "attn.v": "value", "attn.out": "dense", "embed": "word_embeddings",
             "head": "classifier"},
    "gpt2": {"attn.qkv": "c_attn", "attn.out": "c_proj", "ffn.up": "c_fc", "embed": "wte", "head": "lm_head"},
    "llama": {"attn.q": "q_proj", "attn.v": "v_proj", "attn.out": "o_proj", "ffn.up": "up_proj",
              "ffn.down": "down_proj", "embed": "embed_tokens", "head": "lm_head"},
    "t5": {"attn.q": "q", "attn.v": "v", "attn.out": "o", "ffn.up": "wi", "ffn.down": "wo", "head": "lm_head"},
    "vit": {"attn.q": "q_proj", "attn.v": "v_proj", "attn.out": "o_proj", "ffn.up": "fc1", "ffn.down": "fc2",
            "embed": "projection", "head": "classifier"},
}  # fmt: skip
ALL_LINEAR = {"bert": 13, "gpt2": 8, "llama": 14, "t5": 32, "vit": 12}
HEADS = {"bert": "classifier", "gpt2": "lm_head", "llama": "lm_head", "t5": "lm_head", "vit": "classifier"}

_MODELS: dict[str, nn.Module] = {}


def model_of(family: str) -> nn.Module:
    """One shared tiny model per family for read-only checks (plans never change the model)."""
    if family not in _MODELS:
        _MODELS[family] = make_model(family)
    return _MODELS[family]


def sites(family: str, **cfg) -> list[str]:
    return ak.attach(model_of(family)).plan(ak.LoRA(**cfg)).sites


class Snapshot:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.names = [n for n, _ in model.named_modules()]

    def assert_unchanged(self) -> None:
        state = self.model.state_dict()
        assert state.keys() == self.state.keys()
        assert all(torch.equal(state[k], self.state[k]) for k in state)
        assert [n for n, _ in self.model.named_modules()] == self.names
        assert not any(CONTAINER in n for n in self.names)
        for n, m in self.model.named_modules():
            assert not m._forward_hooks and not m._forward_pre_hooks, n


# --- roles ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "role", "count"),
    [(f, r, c) for f, roles in ROLE_COUNTS.items() for r, c in roles.items()],
)
def test_role_counts(family, role, count):
    found = sites(family, targets=[role])
    assert len(found) == count, found
    leaf = ROLE_LEAVES[family].get(role)
    if leaf is not None:
        assert all(n.split(".")[-1] == leaf for n in found), found


def test_gpt2_has_fused_qkv_and_no_separate_q():
    assert "attn.qkv" in ak.attach(model_of("gpt2")).roles
    with pytest.raises(ak.TargetError, match="attn.qkv"):
        sites("gpt2", targets=["attn.q"])


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("gpt2", ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
        (
            "llama",
            [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "v")],
        ),
    ],
)
def test_default_targets(family, expected):
    assert sites(family) == expected


def test_t5_roles_cover_self_and_cross_attention():
    found = sites("t5", targets=["attn.q"])
    assert sum("EncDecAttention" in n for n in found) == 2
    assert sum("encoder." in n for n in found) == 2


def test_embed_role_resolves_to_modules_that_run():
    model = make_model("t5")
    names = ak.attach(model).plan(ak.LoRA(targets=["embed"])).sites
    assert names == ["encoder.embed_tokens", "decoder.embed_tokens"]
    modules = dict(model.named_modules())
    calls = []
    handles = [modules[n].register_forward_hook(lambda *a, n=n: calls.append(n)) for n in names]
    with torch.no_grad():
        output_of(model, make_inputs("t5"))
    for h in handles:
        h.remove()
    assert set(calls) == set(names)


# --- names, suffixes, regexes, types --------------------------------------------------------------------
def test_exact_name():
    assert sites("llama", targets=["model.layers.0.self_attn.q_proj"]) == ["model.layers.0.self_attn.q_proj"]


def test_suffix():
    assert sites("llama", targets=["q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert sites("llama", targets=["self_attn.q_proj"]) == sites("llama", targets=["q_proj"])
    # a suffix matches whole name components only
    with pytest.raises(ak.TargetError):
        sites("llama", targets=["_proj"])


def test_regex_is_fullmatch():
    assert sites("llama", targets=[r"model\.layers\.\d\.mlp\.(up|down)_proj"]) == [
        f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("up", "down")
    ]
    assert sites("llama", targets=[r".*\.0\.self_attn\.[qv]_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    with pytest.raises(ak.TargetError):  # re.search would match; fullmatch does not
        sites("llama", targets=[r"layers\.0\.self_attn\.q_proj"])


def test_module_type():
    linear = sites("llama", targets=[nn.Linear])
    assert len(linear) == 15 and "lm_head" in linear
    assert sites("llama", targets=[nn.Embedding]) == ["model.embed_tokens"]
    assert sites("vit", targets=[nn.Conv2d]) == ["vit.embeddings.patch_embeddings.projection"]


def test_mixed_selectors_are_deduplicated_in_model_order():
    found = sites("llama", targets=["v_proj", "attn.q", "model.layers.0.self_attn.q_proj"])
    assert found == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "v")]


def test_bad_selector_type():
    with pytest.raises(ak.TargetError, match="42"):
        sites("llama", targets=[42])


# --- all-linear, exclude, layers ------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(ALL_LINEAR))
def test_all_linear_excludes_heads(family):
    found = sites(family, targets="all-linear")
    assert len(found) == ALL_LINEAR[family]
    assert HEADS[family] not in found
    model = model_of(family)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = dict(model.named_modules())
    assert all(modules[n] is not out_emb for n in found)


def test_exclude():
    found = sites("llama", targets="all-linear", exclude=["attn.q", "down_proj"])
    assert len(found) == 14 - 2 - 2
    assert not any(n.endswith(("q_proj", "down_proj")) for n in found)
    assert sites("bert", targets=["attn.q", "attn.v"], exclude=[r".*layer\.1\..*"]) == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.value",
    ]


def test_layers():
    assert sites("llama", targets=["attn.q", "attn.v"], layers=[0]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    t5 = sites("t5", targets=["attn.q"], layers=[1])
    assert len(t5) == 3 and all(".block.1." in n for n in t5)
    with pytest.raises(ak.TargetError, match="leave no module"):
        sites("llama", targets=["attn.q"], layers=[7])


def test_layers_must_be_non_negative_ints():
    with pytest.raises(ValueError, match="layers"):
        ak.LoRA(layers=[-1])


def test_roles_need_a_profile_names_do_not():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    adapters = ak.attach(model)
    assert adapters.family is None
    with pytest.raises(ak.TargetError, match="needs a model profile"):
        adapters.plan(ak.LoRA(targets=["attn.q"]))
    assert adapters.plan(ak.LoRA(targets=["0", "2"])).sites == ["0", "2"]
    assert adapters.plan(ak.LoRA(targets=[nn.Linear])).sites == ["0", "2"]
    with pytest.raises(ak.TargetError, match="needs a model profile"):  # LoRA's default targets are roles
        adapters.plan(ak.LoRA())
    adapters.add("a", ak.LoRA(targets=["0"]))
    with pytest.raises(ak.TargetError, match=r"heads=\['classifier'\] \(CLI: --heads classifier\)"):
        adapters.train("a", heads=["head"])  # the CLI's default for classification


# --- plan / dry run ---------------------------------------------------------------------------------------
def test_plan_and_dry_run_list_sites_and_params_without_changing_the_model():
    model = make_model("llama")
    adapters = ak.attach(model)
    snap = Snapshot(model)

    plan = adapters.plan(ak.LoRA())
    dry = adapters.add("a", ak.LoRA(), dry_run=True)
    assert adapters.names == [] and adapters.active == ()
    snap.assert_unchanged()

    # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 kv heads of 8); A (r, in) + B (out, r), r = 8
    expected = 2 * ((8 * 32 + 32 * 8) + (8 * 32 + 16 * 8))
    for p in (plan, dry):
        assert p.num_params == expected
        assert p.sites == [f"model.layers.{i}.self_attn.{q}_proj" for i in (0, 1) for q in ("q", "v")]
        assert {kind for kind, _ in p.components.values()} == {"target"}
        text = str(p)
        assert text.startswith(f"lora: 4 sites, {expected:,} parameters")
        assert all(s in text for s in p.sites)

    added = adapters.add("a", ak.LoRA())
    assert added.num_params == expected
    assert sum(p.numel() for p in adapters.parameters("a")) == expected


def test_plan_with_patterns_heads_and_bias():
    model = make_model("bert")
    adapters = ak.attach(model)
    snap = Snapshot(model)
    plan = adapters.plan(ak.LoRA(r=4, rank_pattern={"value": 2}, heads=["head"], bias="lora_only"))
    kinds = {n: k for n, (k, _) in plan.components.items()}
    assert kinds["classifier"] == "head"
    assert sum(k == "target" for k in kinds.values()) == 4
    # query: 4*(32+32) + bias 32; value: 2*(32+32) + bias 32; classifier copy: 32*3 + 3
    expected = 2 * (4 * 64 + 32) + 2 * (2 * 64 + 32) + (32 * 3 + 3)
    assert plan.num_params == expected
    assert adapters.plan("lora", targets=["attn.q"], bias="all").components["bert.pooler.dense"][0] == "extra"
    snap.assert_unchanged()


# --- summary -------------------------------------------------------------------------------------------
def test_summary_rows_and_text():
    model = make_model("bert")
    base_total = sum(p.numel() for p in model.parameters())
    adapters = ak.attach(model)
    adapters.add("sst2", ak.LoRA(r=4))
    adapters.add("nli", ak.LoRA(r=2, targets=["attn.q"], heads=["head"]))
    adapters.train("nli")

    s = adapters.summary()
    assert s.base_params == base_total
    rows = {r["adapter"]: r for r in s.rows}
    assert list(rows) == ["sst2", "nli"]
    sst2, nli = rows["sst2"], rows["nli"]
    assert (sst2["method"], sst2["sites"], sst2["params"]) == ("lora", 4, 4 * 4 * 64)
    assert (nli["sites"], nli["params"]) == (3, 2 * 2 * 64 + 32 * 3 + 3)
    assert nli["active"] and not sst2["active"]
    assert nli["trainable"] == nli["params"] and sst2["trainable"] == 0
    assert not sst2["merged"] and not nli["merged"]
    assert s.trainable_params == nli["params"]
    assert s.trainable_percent == pytest.approx(100 * nli["params"] / base_total)

    text = str(s)
    lines = text.splitlines()
    assert "% of model" in lines[0] and "active" in lines[0]
    sst2_line = next(line for line in lines if line.startswith("sst2"))
    nli_line = next(line for line in lines if line.startswith("nli"))
    assert f"{sst2['params']:,}" in sst2_line
    assert f"{100 * sst2['params'] / base_total:.3f}%" in sst2_line
    assert "yes" in nli_line and "yes" not in sst2_line
    assert f"base model: {base_total:,} parameters" in lines[-1]

    adapters.merge("sst2")
    assert {r["adapter"]: r["merged"] for r in adapters.summary().rows} == {"sst2": True, "nli": False}
    adapters.detach()


def test_all_linear_warns_only_where_weights_are_left_out(family):
    """Dense models have nothing all-linear leaves out: no UntargetedParametersWarning (the MoE case is in
    tests/test_moe_experts.py); torch's own layers (Conv2d/Conv1d weights of 3+ dims) are not expert stacks."""
    import warnings

    from adapterkit.targeting import UntargetedParametersWarning, unreached_parameters

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sites(family, targets="all-linear")
    assert not [w for w in caught if issubclass(w.category, UntargetedParametersWarning)]
    conv = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Conv2d(4, 4, 3))
    assert unreached_parameters(dict(conv.named_modules())) == {}
