"""OFT v2 and BOFT: the paper equations, peft equivalence both ways (float32 logits within 1e-5 on the same
weights), merge equivalence with peft, batched per-row routing, and refusals.

* peft -> adapterkit: ``get_peft_model`` with non-identity init, perturb every trainable tensor,
  ``save_pretrained``, ``ak.attach(other).load(dir)`` on an identical model, compare logits.
* adapterkit -> peft: ``init_weights=False``, perturb, ``export(format="peft")``,
  ``PeftModel.from_pretrained(fresh, dir)``, compare logits.
* k×k convolutions: peft 0.21's unmerged OFT forward folds overlapping patches (not an identity at init), so
  there our outputs are compared with peft's *merged* model, which rotates the weight as we do.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.formats import AdapterFileError
from adapterkit.methods.boft import BOFTLayer, butterfly_perm
from adapterkit.methods.oft import OFTLayer, adjust_block, cayley_exact, cayley_neumann, skew

from conftest import make_inputs, make_model, output_of

peft = pytest.importorskip("peft")
from peft import BOFTConfig, OFTConfig, PeftModel, get_peft_model  # noqa: E402

warnings.filterwarnings("ignore", module="peft")
warnings.filterwarnings("ignore", message="OFT .* does not divide")

TOL = {"atol": 1e-5, "rtol": 1e-5}


@torch.no_grad()
def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return (out if isinstance(out, torch.Tensor) else out.logits).detach().float()


@torch.no_grad()
def perturb(params: Any, seed: int = 123, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def nontrivial(a: torch.Tensor, b: torch.Tensor) -> None:
    change = ((a - b).abs().max() / b.abs().max()).item()
    assert change > 1e-3, "the adapter does not change the output; the test is vacuous"


class CNN(nn.Module):
    """A small CNN: a 3×3 convolution (the rotated weight), a 1×1 one (the rotated input), a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(pixel_values))))
        return self.fc(h.mean(dim=(2, 3)))


def model_of(family: str) -> nn.Module:
    if family == "cnn":
        torch.manual_seed(0)
        return CNN().eval()
    return make_model(family)


def inputs_of(family: str, batch: int = 2) -> dict[str, torch.Tensor]:
    if family == "cnn":
        g = torch.Generator().manual_seed(1)
        return {"pixel_values": torch.randn(batch, 4, 6, 6, generator=g)}
    return make_inputs(family, batch=batch)


# (id, family, peft config factory, our equivalent config, peft's unmerged forward is ours (False: k×k convs))
CASES = [
    (
        "llama-neumann",
        "llama",
        lambda: OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False),
        ak.OFT(oft_block_size=8, targets=["attn.q", "attn.v", "ffn.down"]),
        True,
    ),
    (
        "bert-r-exact",
        "bert",
        lambda: OFTConfig(
            r=4,
            oft_block_size=0,
            use_cayley_neumann=False,
            target_modules=["query", "value", "intermediate.dense"],
            init_weights=False,
        ),
        ak.OFT(r=4, oft_block_size=0, use_cayley_neumann=False, targets=["attn.q", "attn.v", "ffn.up"]),
        True,
    ),
    (
        "t5-share-terms",
        "t5",
        lambda: OFTConfig(
            oft_block_size=16,
            block_share=True,
            num_cayley_neumann_terms=7,
            target_modules=["q", "v"],
            init_weights=False,
        ),
        ak.OFT(oft_block_size=16, block_share=True, num_cayley_neumann_terms=7),
        True,
    ),
    (
        "llama-coft",
        "llama",
        lambda: OFTConfig(
            oft_block_size=8,
            coft=True,
            eps=0.8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_weights=False,
        ),
        ak.OFT(oft_block_size=8, coft=True, eps=0.8, targets=["attn.q", "attn.v", "ffn.down"]),
        True,
    ),
    (
        "bert-heads-default",
        "bert",
        lambda: OFTConfig(
            target_modules=["query", "value", "intermediate.dense"],
            modules_to_save=["classifier"],
            init_weights=False,
        ),
        ak.OFT(heads=["head"], targets=["attn.q", "attn.v", "ffn.up"]),
        True,
    ),
    (
        "llama-embed",
        "llama",
        lambda: OFTConfig(oft_block_size=8, target_modules=["embed_tokens", "q_proj"], init_weights=False),
        ak.OFT(oft_block_size=8, targets=["embed", "attn.q"]),
        True,
    ),
    (
        "vit-conv2d",
        "vit",
        lambda: OFTConfig(oft_block_size=8, target_modules=["projection", "v_proj"], init_weights=False),
        ak.OFT(oft_block_size=8, targets=["embed", "attn.v"]),
        False,
    ),
    (
        "cnn-1x1",
        "cnn",
        lambda: OFTConfig(oft_block_size=4, target_modules=["conv2", "fc"], init_weights=False),
        ak.OFT(oft_block_size=4, targets=["conv2", "fc"]),
        True,
    ),
    (
        "cnn-3x3",
        "cnn",
        lambda: OFTConfig(oft_block_size=12, target_modules=["conv1", "conv2"], init_weights=False),
        ak.OFT(oft_block_size=12, targets=["conv1", "conv2"]),
        False,
    ),
]


def _params(cases: list) -> list:
    return [pytest.param(*c, id=c[0]) for c in cases]


def peft_reference(pm: nn.Module, x: dict[str, torch.Tensor], unmerged_is_ours: bool) -> torch.Tensor:
    """peft's logits for our semantics: its forward, or (k×k convolutions) its merged model's forward."""
    if unmerged_is_ours:
        return logits(pm, x)
    return logits(copy.deepcopy(pm).merge_and_unload(), x)


@pytest.mark.parametrize(("cid", "family", "make", "ours", "same"), _params(CASES))
def test_oft_peft_to_adapterkit(cid, family, make, ours, same, tmp_path):
    x = inputs_of(family)
    base = logits(model_of(family), x)
    pm = get_peft_model(model_of(family), make()).eval()
    perturb(trainable(pm))
    expected = peft_reference(pm, x, same)
    nontrivial(expected, base)
    pm.save_pretrained(str(tmp_path))
    model = model_of(family)
    adapters = ak.attach(model)
    assert adapters.load(tmp_path) == "default"
    torch.testing.assert_close(logits(model, x), expected, **TOL)
    # the config peft wrote reads back as ours (targets: the module paths in the file)
    assert adapters.config("default").replace(targets=None, heads=()) == ours.replace(targets=None, heads=())
    # merge equivalence: peft's merge_and_unload == our merge_and_detach
    merged_theirs = pm.merge_and_unload()
    merged_ours = adapters.merge_and_detach()
    a, b = merged_ours.state_dict(), merged_theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL, msg=k)


@pytest.mark.parametrize(("cid", "family", "make", "ours", "same"), _params(CASES))
def test_oft_adapterkit_to_peft(cid, family, make, ours, same, tmp_path):
    x = inputs_of(family)
    model = model_of(family)
    base = logits(model, x)
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", ours.replace(init_weights=False))
    perturb(adapters.parameters("a"))
    expected = logits(model, x)
    nontrivial(expected, base)
    adapters.export("a", tmp_path, format="peft")
    pm = PeftModel.from_pretrained(model_of(family), str(tmp_path)).eval()
    torch.testing.assert_close(peft_reference(pm, x, same), expected, **TOL)
    # merged == unmerged, and unmerge restores
    adapters.merge("a")
    torch.testing.assert_close(logits(model, x), expected, **TOL)
    adapters.unmerge("a")
    torch.testing.assert_close(logits(model, x), expected, **TOL)
    with adapters.use():
        torch.testing.assert_close(logits(model, x), base, **TOL)


def test_peft_kxk_conv_forward_is_not_identity_at_init():
    """Why k×k convolutions are compared with peft's merged model: peft 0.21's unmerged OFT forward unfolds the input
    with stride 1 and folds the rotated patches back with ``F.fold``, which sums overlapping patches, so even at init
    (R = I) it changes the output; ours is the identity at init and equals peft's merge (tests above)."""
    x = inputs_of("cnn")
    base = logits(model_of("cnn"), x)
    pm = get_peft_model(model_of("cnn"), OFTConfig(oft_block_size=12, target_modules=["conv1"])).eval()
    theirs = logits(pm, x)
    assert (theirs - base).abs().max().item() > 1e-2, (
        "peft fixed its k×k OFT forward: compare unmerged outputs too"
    )
    adapters = ak.attach(model := model_of("cnn"))
    adapters.add("a", ak.OFT(oft_block_size=12, targets=["conv1"]))
    torch.testing.assert_close(logits(model, x), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(pm.merge_and_unload(), x), base, atol=1e-6, rtol=0)


# --- the equations ----------------------------------------------------------------------------------------------
def _one(cfg: ak.AdapterConfig, module: nn.Module | None = None):
    torch.manual_seed(0)
    model = nn.Sequential(module if module is not None else nn.Linear(24, 20))
    adapters = ak.attach(model)
    adapters.add("a", cfg.replace(targets=["0"], init_weights=False))
    return model, adapters, adapters.components("a")["0"]


def _block_diag(comp: OFTLayer) -> torch.Tensor:
    blocks = comp.rotation_blocks()
    if comp.block_share:
        blocks = blocks.expand(comp.blocks, -1, -1)
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("neumann", [True, False], ids=["neumann", "exact"])
@pytest.mark.parametrize("share", [False, True], ids=["blocks", "shared"])
def test_oft_linear_equation(neumann, share):
    """``y = W (R x) + b`` with ``R`` block-diagonal: as row vectors ``x ↦ x blockdiag(R_j)``, then the layer;
    merged: ``W ← W Rᵀ`` (peft's ``W = (R Wᵀ)ᵀ``)."""
    model, adapters, comp = _one(ak.OFT(oft_block_size=6, use_cayley_neumann=neumann, block_share=share))
    lin = model[0]
    assert tuple(comp.oft_R.shape) == ((1 if share else 4), 15)
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        R = _block_diag(comp)
        expected = (x @ R) @ lin.weight.T + lin.bias
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        W = lin.weight.clone()
        adapters.merge("a")
        torch.testing.assert_close(lin.weight, W @ R.T, atol=1e-6, rtol=1e-5)
        adapters.unmerge("a")
        torch.testing.assert_close(lin.weight, W, atol=1e-6, rtol=1e-6)


def test_cayley_exact_is_orthogonal_and_neumann_converges():
    """Exact Cayley: ``RᵀR = I`` for any skew Q (OFT §3.2). Cayley–Neumann (OFT v2 §4.2): ``I + 2Q + ... + Q^(k-1)``
    approaches ``(I + Q)(I - Q)⁻¹`` — peft's exact form for ``-Q`` — as ``k`` grows, and is orthogonal up to
    ``O(‖Q‖^k)``."""
    g = torch.Generator().manual_seed(0)
    q = skew(torch.randn(3, 28, generator=g, dtype=torch.float64) * 0.05, 8)
    torch.testing.assert_close(q, -q.transpose(-2, -1))
    eye = torch.eye(8, dtype=torch.float64).expand(3, 8, 8)
    exact = cayley_exact(q)
    torch.testing.assert_close(exact.transpose(-2, -1) @ exact, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(exact, (eye - q) @ torch.linalg.inv(eye + q))
    target = cayley_exact(-q)
    errors = [(cayley_neumann(q, k) - target).abs().max().item() for k in (2, 4, 5, 7, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-3 * errors[0]
    r5 = cayley_neumann(q, 5)
    assert (r5.transpose(-2, -1) @ r5 - eye).abs().max().item() < 1e-2
    # the same additions as peft (1 + 2Q + 2Q² + 2Q³ + Q⁴ for k = 5)
    torch.testing.assert_close(r5, eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q)


def test_exact_rotation_is_orthogonal_in_the_layer():
    _, _, comp = _one(ak.OFT(oft_block_size=8, use_cayley_neumann=False))
    with torch.no_grad():
        perturb([comp.oft_R], scale=0.5)
        R = _block_diag(comp)
    torch.testing.assert_close(R.T @ R, torch.eye(24), atol=1e-5, rtol=0)


def test_coft_keeps_blocks_within_the_bound():
    """COFT (OFT §3.3): after a forward, every skew block has ``‖Q_j‖_F ≤ ε / √nb``; blocks inside stay as they are."""
    eps = 0.2
    model, _, comp = _one(ak.OFT(oft_block_size=6, coft=True, eps=eps))
    with torch.no_grad():
        comp.oft_R[0].mul_(1e-4)  # one block well inside the ball
        inside = comp.oft_R[0].clone()
        model(torch.randn(2, 24))
    norms = skew(comp.oft_R.detach(), 6).flatten(1).norm(dim=1)
    bound = eps / math.sqrt(4)
    assert (norms <= bound * (1 + 1e-5)).all(), norms
    assert torch.isclose(norms[1:], torch.full((3,), bound), rtol=1e-5).all()
    assert torch.equal(comp.oft_R[0].detach(), inside)
    R = _block_diag(comp).detach()
    assert (R - torch.eye(24)).abs().max().item() < 3 * bound  # the rotation stays near the identity


def test_oft_conv_equations():
    """k×k: ``conv(x, W Rᵀ)`` on the flattened ``(in · kh · kw)`` patch; 1×1: the input channels rotated."""
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)
    model, _, comp = _one(ak.OFT(oft_block_size=12), conv)
    assert comp.fused and not comp.has_pre and comp.in_dim == 36
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        R = _block_diag(comp)
        w = (conv.weight.reshape(6, 36) @ R.T).reshape(6, 4, 3, 3)
        torch.testing.assert_close(model(x), F.conv2d(x, w, conv.bias, stride=2, padding=1), atol=1e-5, rtol=1e-5)
    one = nn.Conv2d(8, 6, 1)
    model, _, comp = _one(ak.OFT(oft_block_size=4), one)
    assert comp.has_pre and not comp.fused
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        R = _block_diag(comp)
        rotated = torch.einsum("bchw,cd->bdhw", x, R)
        torch.testing.assert_close(model(x), F.conv2d(rotated, one.weight, one.bias), atol=1e-5, rtol=1e-5)


def test_block_size_adjusts_like_peft():
    from peft.tuners.oft.layer import OFTLayer as PeftOFTLayer

    for dim in (24, 32, 36, 48, 64, 96, 768, 1000, 4096, 11008):
        for value in (1, 3, 5, 7, 16, 32, 33, 100, 5000):
            assert adjust_block(dim, value) == PeftOFTLayer.adjust_oft_parameters(None, dim, value), (dim, value)
    with pytest.warns(UserWarning, match="using 24"):
        _one(ak.OFT(oft_block_size=32), nn.Linear(48, 8))


# --- routing, training, dtypes ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "first", "second"),
    [
        (
            "llama",
            ak.OFT(oft_block_size=8, targets=["attn.q", "ffn.down"]),
            ak.OFT(oft_block_size=4, block_share=True),
        ),
        ("bert", ak.OFT(oft_block_size=16, use_cayley_neumann=False), ak.OFT(r=8, oft_block_size=0)),
        (
            "cnn",
            ak.OFT(oft_block_size=12, targets=["conv1", "conv2"]),
            ak.OFT(oft_block_size=4, targets=["conv1"]),
        ),
    ],
    ids=["llama", "bert", "cnn"],
)
def test_oft_routing_is_batched(family, first, second, monkeypatch):
    model = model_of(family)
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", first.replace(init_weights=False))
    adapters.add("b", second.replace(init_weights=False))
    rows = ["a", None, "b", "a", "b"]
    x = inputs_of(family, batch=len(rows))
    singles = []
    for i, name in enumerate(rows):
        with adapters.use(name):
            singles.append(logits(model, {k: v[i : i + 1] for k, v in x.items()}))

    def no_fallback(self, *args):
        raise AssertionError("per-adapter fallback used")

    monkeypatch.setattr(OFTLayer, "pre", no_fallback)
    monkeypatch.setattr(OFTLayer, "post", no_fallback)
    with adapters.route(rows):
        mixed = logits(model, x)
    torch.testing.assert_close(mixed, torch.cat(singles), **TOL)


def test_module_dropout_acts_in_training_only():
    model = make_model("bert")
    adapters = ak.attach(model)
    adapters.add("a", ak.OFT(oft_block_size=4, module_dropout=0.5, init_weights=False))
    x = make_inputs("bert")
    model.train()
    outs = set()
    for seed in range(4):
        torch.manual_seed(seed)
        outs.add(round(output_of(model, x).sum().item(), 5))
    assert len(outs) > 1
    model.eval()
    assert torch.equal(logits(model, x), logits(model, x))


def test_training_step_equals_peft():
    """One SGD step from the same weights gives the same adapter tensors as peft (gradients agree)."""
    x = make_inputs("llama")
    pm = get_peft_model(make_model("llama"), OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj"]))
    perturb(trainable(pm))
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", ak.OFT(oft_block_size=8))
    ours = adapters.components("a")
    with torch.no_grad():
        for site, comp in ours.items():
            comp.oft_R.copy_(pm.get_submodule(f"base_model.model.{site}").oft_R["default"].weight)
    adapters.train("a")
    for m, params in ((pm, trainable(pm)), (model, list(adapters.parameters("a")))):
        m.train()
        loss = m(**x, labels=x["input_ids"]).loss
        loss.backward()
        with torch.no_grad():
            for p in params:
                p.sub_(0.5 * p.grad)
    for site, comp in ours.items():
        theirs = pm.get_submodule(f"base_model.model.{site}").oft_R["default"].weight
        torch.testing.assert_close(comp.oft_R.detach(), theirs.detach(), **TOL)


def test_oft_embedding_equation():
    """On an embedding the looked-up vectors are rotated, ``e ↦ e blockdiag(R_j)``; merged ``W ← W blockdiag(R_j)``."""
    emb = nn.Embedding(10, 12)
    model, adapters, comp = _one(ak.OFT(oft_block_size=4), emb)
    assert comp.embedding and comp.has_post and not comp.has_pre
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        R = _block_diag(comp)
        W = emb.weight.clone()
        torch.testing.assert_close(model(ids), W[ids] @ R, atol=1e-6, rtol=1e-5)
        adapters.merge("a")
        torch.testing.assert_close(emb.weight, W @ R, atol=1e-6, rtol=1e-5)
        adapters.unmerge("a")
        torch.testing.assert_close(emb.weight, W, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cfg", [ak.OFT(oft_block_size=8, coft=True, eps=0.5), ak.BOFT(boft_n_butterfly_factor=2)])
def test_rotation_is_rebuilt_only_when_needed_without_grad(cfg, monkeypatch):
    """Without grad (decode steps) the blocks are built once while the parameters are unchanged; a parameter
    update, or any forward that records a gradient, rebuilds them; outputs equal the uncached ones."""
    model = make_model("llama")
    adapters = ak.attach(model)
    adapters.add("a", cfg.replace(init_weights=False))
    x = make_inputs("llama")
    cls = type(next(iter(adapters.components("a").values())))
    calls = []
    original = cls._stages
    monkeypatch.setattr(cls, "_stages", lambda self, dropout=True: calls.append(1) or original(self, dropout))
    sites = len(adapters.components("a"))
    with torch.inference_mode():
        first = output_of(model, x)
        assert torch.equal(output_of(model, x), first)
    assert len(calls) == sites
    out = output_of(model, x)  # with grad: rebuilt, and backward works after an inference-mode forward
    out.sum().backward()
    assert len(calls) == 2 * sites
    torch.testing.assert_close(out.detach(), first, atol=1e-6, rtol=0)
    perturb(adapters.parameters("a"))
    with torch.no_grad():
        changed = output_of(model, x)
    assert len(calls) == 3 * sites and not torch.allclose(changed, first)
    calls.clear()
    monkeypatch.setattr(cls, "_stages", original)
    with torch.enable_grad():
        torch.testing.assert_close(output_of(model, x).detach(), changed, atol=1e-6, rtol=0)


def test_bfloat16_base():
    model = make_model("llama").to(torch.bfloat16)
    adapters = ak.attach(model)
    adapters.add("a", ak.OFT(oft_block_size=8, init_weights=False))
    assert all(p.dtype == torch.float32 for p in adapters.parameters("a"))
    x = make_inputs("llama")
    out = output_of(model, x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with torch.no_grad():
        adapters.merge("a")
        merged = output_of(model, x)
    torch.testing.assert_close(merged.float(), out.float(), atol=0.1, rtol=0.05)


# --- refusals ---------------------------------------------------------------------------------------------------
def test_bad_oft_configs():
    for bad in (
        lambda: ak.OFT(r=4),  # both r and oft_block_size
        lambda: ak.OFT(oft_block_size=0),
        lambda: ak.OFT(oft_block_size=-8),
        lambda: ak.OFT(num_cayley_neumann_terms=0),
        lambda: ak.OFT(eps=0.0),
        lambda: ak.OFT(module_dropout=1.0),
        lambda: ak.OFT(coft="yes"),
    ):
        with pytest.raises(ValueError):
            bad()


def test_grouped_convolution_is_refused():
    with pytest.raises(ValueError, match="groups=2"):
        _one(ak.OFT(oft_block_size=4), nn.Conv2d(4, 4, 3, groups=2))


def test_oft_conv1d_export_to_peft_is_refused(tmp_path):
    adapters = ak.attach(make_model("gpt2"))
    adapters.add("a", ak.OFT(oft_block_size=8))
    with pytest.raises(ValueError, match="Conv1D"):
        adapters.export("a", tmp_path, format="peft")


@pytest.mark.parametrize(
    ("change", "match"),
    [({"bias": "all"}, "bias"), ({"oft_block_size": None}, "peft < 0.14")],
    ids=["bias", "old-format"],
)
def test_oft_peft_files_refused(change, match, tmp_path):
    pm = get_peft_model(make_model("llama"), OFTConfig(oft_block_size=8, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path))
    path = Path(tmp_path) / "adapter_config.json"
    data = json.loads(path.read_text())
    for k, v in change.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    path.write_text(json.dumps(data))
    with pytest.raises(AdapterFileError, match=match):
        ak.attach(make_model("llama")).load(tmp_path)


# === BOFT ========================================================================================================


class _FakeFBD:
    """peft's CUDA block-diagonal kernel (``fbd_cuda``) in plain torch: without it, peft forces one butterfly factor.
    ``forward((N, D, H, H)) -> [(N, D·H, D·H)]``, ``backward`` returns the diagonal blocks of the gradient."""

    @staticmethod
    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*blocks) for blocks in x])]

    @staticmethod
    def backward(grad: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
        N, D, H, _ = x.shape
        return [
            torch.stack(
                [
                    torch.stack([grad[n, d * H : (d + 1) * H, d * H : (d + 1) * H] for d in range(D)])
                    for n in range(N)
                ]
            )
        ]


@pytest.fixture
def butterfly(monkeypatch):
    """Let peft run several butterfly factors on CPU (its CUDA kernel replaced by :class:`_FakeFBD`)."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _FakeFBD())


# (id, family, peft config factory, ours, needs peft's butterfly kernel)
BOFT_CASES = [
    (
        "llama-butterfly",
        "llama",
        lambda: BOFTConfig(
            boft_block_size=4,
            boft_n_butterfly_factor=2,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_weights=False,
        ),
        ak.BOFT(boft_block_size=4, boft_n_butterfly_factor=2, targets=["attn.q", "attn.v", "ffn.down"]),
        True,
    ),
    (
        "bert-blocknum",
        "bert",
        lambda: BOFTConfig(
            boft_block_num=4,
            boft_block_size=0,
            target_modules=["query", "value", "intermediate.dense"],
            init_weights=False,
        ),
        ak.BOFT(boft_block_num=4, boft_block_size=0, targets=["attn.q", "attn.v", "ffn.up"]),
        False,
    ),
    (
        "t5-three-factors",
        "t5",
        lambda: BOFTConfig(
            boft_block_size=4, boft_n_butterfly_factor=3, target_modules=["q", "v"], init_weights=False
        ),
        ak.BOFT(boft_block_size=4, boft_n_butterfly_factor=3),
        True,
    ),
    (
        "vit-conv2d",
        "vit",
        lambda: BOFTConfig(
            boft_block_size=4,
            boft_n_butterfly_factor=2,
            target_modules=["projection", "v_proj"],
            init_weights=False,
        ),
        ak.BOFT(boft_block_size=4, boft_n_butterfly_factor=2, targets=["embed", "attn.v"]),
        True,
    ),
    (
        "cnn",
        "cnn",
        lambda: BOFTConfig(boft_block_size=4, target_modules=["conv1", "conv2", "fc"], init_weights=False),
        ak.BOFT(boft_block_size=4, targets=["conv1", "conv2", "fc"]),
        False,
    ),
    (
        "bert-heads",
        "bert",
        lambda: BOFTConfig(target_modules=["query", "value"], modules_to_save=["classifier"], init_weights=False),
        ak.BOFT(heads=["head"]),
        False,
    ),
]


@pytest.mark.parametrize(("cid", "family", "make", "ours", "kernel"), _params(BOFT_CASES))
def test_boft_peft_to_adapterkit(cid, family, make, ours, kernel, tmp_path, request):
    if kernel:
        request.getfixturevalue("butterfly")
    x = inputs_of(family)
    base = logits(model_of(family), x)
    pm = get_peft_model(model_of(family), make()).eval()
    perturb(trainable(pm))
    expected = logits(pm, x)
    nontrivial(expected, base)
    pm.save_pretrained(str(tmp_path))
    model = model_of(family)
    adapters = ak.attach(model)
    assert adapters.load(tmp_path) == "default"
    torch.testing.assert_close(logits(model, x), expected, **TOL)
    assert adapters.config("default").replace(targets=None, heads=()) == ours.replace(targets=None, heads=())
    merged_theirs = pm.merge_and_unload()
    merged_ours = adapters.merge_and_detach()
    a, b = merged_ours.state_dict(), merged_theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL, msg=k)


@pytest.mark.parametrize(("cid", "family", "make", "ours", "kernel"), _params(BOFT_CASES))
def test_boft_adapterkit_to_peft(cid, family, make, ours, kernel, tmp_path, request):
    if kernel:
        request.getfixturevalue("butterfly")
    x = inputs_of(family)
    model = model_of(family)
    base = logits(model, x)
    adapters = ak.attach(model)
    torch.manual_seed(0)
    adapters.add("a", ours.replace(init_weights=False))
    perturb(adapters.parameters("a"))
    expected = logits(model, x)
    nontrivial(expected, base)
    adapters.export("a", tmp_path, format="peft")
    pm = PeftModel.from_pretrained(model_of(family), str(tmp_path)).eval()
    torch.testing.assert_close(logits(pm, x), expected, **TOL)
    adapters.merge("a")
    torch.testing.assert_close(logits(model, x), expected, **TOL)
    adapters.unmerge("a")
    torch.testing.assert_close(logits(model, x), expected, **TOL)


def test_cpu_peft_one_factor_file_loads_as_one_factor(tmp_path):
    """peft without its CUDA kernel trains one factor whatever the config says; we load what it computed."""
    x = make_inputs("llama")
    pm = get_peft_model(
        make_model("llama"),
        BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj"], init_weights=False),
    ).eval()
    expected = logits(pm, x)
    pm.save_pretrained(str(tmp_path))
    adapters = ak.attach(model := make_model("llama"))
    with pytest.warns(UserWarning, match="holds 1 factor"):
        adapters.load(tmp_path)
    assert adapters.config("default").boft_n_butterfly_factor == 1
    torch.testing.assert_close(logits(model, x), expected, **TOL)


def _perm_matrix(perm: list[int]) -> torch.Tensor:
    p = torch.zeros(len(perm), len(perm))
    p[torch.arange(len(perm)), torch.tensor(perm)] = 1.0
    return p


def test_boft_equation():
    """BOFT §4: ``B = M_{m-1} ··· M_0`` with ``M_i = P_i blockdiag(R_i) P_iᵀ``, ``R = (I - S)(I + S)⁻¹`` for the skew
    part ``S``; ``y = s ⊙ ((x B) Wᵀ) + b`` for row vectors, ``B`` orthogonal; merged ``W ← s ⊙ (W Bᵀ)``."""
    model, adapters, comp = _one(ak.BOFT(boft_block_size=2, boft_n_butterfly_factor=3), nn.Linear(24, 20))
    lin = model[0]
    assert isinstance(comp, BOFTLayer) and tuple(comp.boft_R.shape) == (3, 12, 2, 2)
    with torch.no_grad():
        perturb([comp.boft_R], scale=0.5)
        eye = torch.eye(2)
        factors = []
        for i in range(3):
            a = comp.boft_R[i]
            s = 0.5 * (a - a.transpose(-2, -1))
            blocks = (eye - s) @ torch.linalg.inv(eye + s)
            P = _perm_matrix(butterfly_perm(24, 12 // 2**i, 1, 2))
            factors.append(P @ torch.block_diag(*blocks) @ P.T)
        B = factors[2] @ factors[1] @ factors[0]
        torch.testing.assert_close(B.T @ B, torch.eye(24), atol=1e-5, rtol=0)
        assert (B.abs() > 1e-6).sum() > 3 * 24  # the butterfly mixes more than one block's features
        x = torch.randn(3, 24)
        s = comp.boft_s.reshape(-1)
        torch.testing.assert_close(model(x), (x @ B @ lin.weight.T) * s + lin.bias, atol=1e-5, rtol=1e-5)
        W = lin.weight.clone()
        adapters.merge("a")
        torch.testing.assert_close(lin.weight, (W @ B.T) * s[:, None], atol=1e-5, rtol=1e-5)
        adapters.unmerge("a")
        torch.testing.assert_close(lin.weight, W, atol=1e-6, rtol=1e-5)


def test_butterfly_perm_is_peft_s():
    from peft.tuners.boft.layer import BOFTLayer as PeftBOFTLayer

    for n, blocks, r, extra in [
        (24, 12, 1, 2),
        (24, 6, 1, 2),
        (32, 8, 2, 1),
        (32, 4, 2, 1),
        (64, 4, 4, 2),
        (48, 6, 2, 1),
    ]:
        assert (
            butterfly_perm(n, blocks, r, extra)
            == PeftBOFTLayer.block_butterfly_perm(None, n, blocks, r, extra).tolist()
        )


def test_boft_routing_is_batched(monkeypatch):
    model = make_model("llama")
    adapters = ak.attach(model)
    cfg = ak.BOFT(boft_block_size=4, boft_n_butterfly_factor=2, targets=["attn.q", "ffn.down"], init_weights=False)
    torch.manual_seed(0)
    adapters.add("a", cfg)
    adapters.add("b", cfg.replace(targets=["attn.q"]))
    rows = ["a", None, "b", "a", "b"]
    x = make_inputs("llama", batch=len(rows))
    singles = []
    for i, name in enumerate(rows):
        with adapters.use(name):
            singles.append(logits(model, {k: v[i : i + 1] for k, v in x.items()}))

    def no_fallback(self, *args):
        raise AssertionError("per-adapter fallback used")

    monkeypatch.setattr(BOFTLayer, "pre", no_fallback)
    monkeypatch.setattr(BOFTLayer, "post", no_fallback)
    with adapters.route(rows):
        mixed = logits(model, x)
    torch.testing.assert_close(mixed, torch.cat(singles), **TOL)


def test_boft_training_dropout_equals_peft_s(tmp_path):
    """Same seed, same blocks dropped (peft's draws: ``randint`` for the factor, then ``randperm``)."""

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Linear(24, 36)
            self.down = nn.Linear(36, 24)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    torch.manual_seed(0)
    pm = get_peft_model(
        MLP(), BOFTConfig(boft_block_size=4, boft_dropout=0.5, target_modules=["up", "down"], init_weights=False)
    )
    perturb(trainable(pm), scale=0.3)
    pm.save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    model = MLP()
    adapters = ak.attach(model)
    adapters.load(tmp_path, name="a")
    pm.train()
    model.train()
    x = torch.randn(5, 24)
    outs = set()
    for step in range(6):
        torch.manual_seed(step)
        expected = pm(x)
        torch.manual_seed(step)
        got = model(x)
        torch.testing.assert_close(got, expected, **TOL)
        outs.add(round(got.sum().item(), 4))
    assert len(outs) > 1


def test_bad_boft_configs_and_sizes():
    for bad in (
        lambda: ak.BOFT(boft_block_num=4),  # both
        lambda: ak.BOFT(boft_block_size=0),
        lambda: ak.BOFT(boft_n_butterfly_factor=0),
        lambda: ak.BOFT(boft_dropout=1.0),
    ):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="not divisible by boft_block_size=5"):
        _one(ak.BOFT(boft_block_size=5), nn.Linear(24, 8))
    with pytest.raises(ValueError, match="multiple of boft_block_size"):
        _one(ak.BOFT(boft_block_size=4, boft_n_butterfly_factor=4), nn.Linear(24, 8))
    with pytest.raises(ValueError, match="groups=2"):
        _one(ak.BOFT(), nn.Conv2d(4, 4, 3, groups=2))
