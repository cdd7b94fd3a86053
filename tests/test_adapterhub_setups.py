"""AdapterHub adapter setups with ``Average``, ``Split``, ``Parallel`` and ``BatchSplit`` blocks, and the heads those
setups and encoder-decoder models carry (issue 16 item 3), written by the real ``adapters`` 1.3.0
(tests/fixtures/adapterhub/make_fixtures_setups.py, ``setups_cases.json``), load here with the library's outputs and
export back (the slow test runs the library on our exports).

AdapterHub's ``Average`` is ``mean(w_i h_i)`` of the adapters' states with weights normalized to sum 1: for
sequential bottlenecks the states are their outputs (``ak.Average(..., combine="outputs")`` with the weights divided by
the number of children), for ParBn and LoRA their changes (the default ``combine="changes"``, same weights).
``Split``'s lengths become cut positions plus the one ``length`` the library accepts. Heads: BART/T5 classifiers read
the last eos token (``FlexHead(cls_token="eos")``), Parallel/BatchSplit heads give a list of logits (one per row
block, the library's ``MultiHeadOutput``), several heads on the same rows (a ``head_setup`` list) run side by side in
a ``Branch`` after the setup (a list of logits too), a fused adapter's own head becomes the head adapter ``head[b]``.
``Fuse`` over ``Stack`` children uses the fusion of the children's last adapters and fuses their changes, as the
library does (refused for SeqBn with ``original_ln_before``, whose pre-step the library runs twice there).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import adapterkit as ak
from adapterkit.formats import AdapterFileError
from test_adapterhub import FIXTURES, TOL, fresh, run

DATA = json.loads((FIXTURES / "setups_cases.json").read_text())
CASES: dict[str, dict] = DATA["cases"]
ALL_BLOCKS = sorted(c for c, i in CASES.items() if i["kind"] == "block")
# the library computes these otherwise than it would the same blocks of single adapters, and so than we do: refused
REFUSED = {"setup_bert_batch_split_stack": "runs the first adapter's pre-step for the whole block and again"}
BLOCKS = [c for c in ALL_BLOCKS if c not in REFUSED]

# what each setup activates here (the library's saved setup, as our blocks)
ACTIVATED = {
    "setup_bert_average": ak.Average("a", "b", weights=[0.35, 0.15], combine="outputs"),
    "setup_gpt2_average": ak.Average("a", "b", weights=[0.3, 0.2], combine="outputs"),
    "setup_bert_average_par_bn": ak.Average("a", "b", weights=[1 / 3, 1 / 6]),
    "setup_bert_average_lora": ak.Average("a", "b", "c", weights=[1 / 9] * 3),
    "setup_bert_stack_average": ak.Stack("a", ak.Average("b", "c", weights=[0.25, 0.25], combine="outputs")),
    "setup_bert_split": ak.Split("a", "b", splits=[3], length=8),
    "setup_gpt2_split": ak.Split("a", "b", "c", splits=[2, 6], length=8),
    "setup_bert_stack_split": ak.Stack("a", ak.Split("b", "c", splits=[4], length=8)),
    "setup_bert_parallel": ak.Parallel("a", "b"),
    "setup_bert_batch_split": ak.BatchSplit("a", "b", batch_sizes=[1, 1]),
    "setup_gpt2_batch_split_stack": ak.BatchSplit(ak.Stack("a", "b"), "c", batch_sizes=[1, 1]),
    "setup_gpt2_parallel": ak.Parallel("a", "b"),
    "setup_gpt2_split_par_bn": ak.Split("a", "b", splits=[3], length=8),
    "setup_llama_average": ak.Average("a", "b", weights=[0.2, 0.3], combine="outputs"),
    "setup_gpt2_average_stack": ak.Average(ak.Stack("a", "b"), "c", weights=[0.25, 0.25], combine="outputs"),
}


def _expected(case: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / case / "expected.safetensors"))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _same(a: ak.Block, b: ak.Block) -> bool:
    """Blocks equal up to float rounding of the weights."""
    if type(a) is not type(b) or len(a.children) != len(b.children):
        return False
    if isinstance(a, ak.Average) and (a.combine != b.combine or a.weights != pytest.approx(b.weights)):
        return False
    if isinstance(a, ak.Split) and (a.splits, a.length) != (b.splits, b.length):
        return False
    return all(
        x == y if isinstance(x, str) or isinstance(y, str) else _same(x, y) for x, y in zip(a.children, b.children)
    )


def test_the_fixtures_are_listed():
    assert sorted([*ACTIVATED, *REFUSED]) == ALL_BLOCKS
    assert DATA["versions"]["adapters"] == "1.3.0"


@pytest.mark.parametrize("case", BLOCKS)
def test_setup_gives_the_library_outputs(case):
    model = fresh(CASES[case]["family"])
    adapters = ak.attach(model)
    exp = _expected(case)
    adapters.load(FIXTURES / case / "setup")
    assert len(adapters.active) == 1 and _same(adapters.active[0], ACTIVATED[case])
    out, hidden = run(model, exp)
    assert _diff(out, exp["output"]) <= TOL
    assert _diff(hidden, exp["hidden"]) <= TOL


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_setups_the_library_computes_otherwise_are_refused(case, tmp_path):
    """BatchSplit(Stack(a, b), c) of SeqBn adapters on BERT: the library runs a's pre-step (the block's residual and
    LayerNorm) for the BatchSplit and again inside the Stack, so its output is not that of our blocks: refused on
    reading and on writing (the same block of DoubleSeqBn adapters on GPT-2, whose pre-step is the same when run
    twice, loads: setup_gpt2_batch_split_stack)."""
    from adapterkit.formats.adapterhub_export_common import AdapterHubExportError

    model = fresh(CASES[case]["family"])
    adapters = ak.attach(model)
    with pytest.raises(AdapterFileError, match=REFUSED[case]):
        adapters.load(FIXTURES / case / "setup")
    assert adapters.names == []
    for n in ("a", "b", "c"):
        adapters.load(FIXTURES / case / "setup" / n)
    block = ak.BatchSplit(ak.Stack("a", "b"), "c", batch_sizes=[1, 1])
    adapters.activate(block)
    exp = _expected(case)
    assert _diff(run(model, exp)[0], exp["output"]) > 1e-2  # what we compute is not what the library does
    with pytest.raises(AdapterHubExportError, match=REFUSED[case]):
        adapters.export(block, tmp_path / "out", format="adapterhub")


def test_adapterhubs_average_is_not_our_default_average():
    """The library's bottleneck Average scales the base output too (mean(w_i h_i)): our default Average with its
    weights gives another output; AdapterHub's LoRA Average is our default one with the weights divided by n."""
    model = fresh("bert")
    adapters = ak.attach(model)
    exp = _expected("setup_bert_average")
    adapters.load(FIXTURES / "setup_bert_average" / "setup")
    adapters.activate(ak.Average("a", "b", weights=[0.7, 0.3]))
    assert _diff(run(model, exp)[0], exp["output"]) > 1e-2
    adapters.activate(ak.Average("a", "b", weights=[0.35, 0.15]))  # the same weights, combine="changes"
    assert _diff(run(model, exp)[0], exp["output"]) > 1e-2


def test_average_of_outputs_needs_every_child_at_the_same_modules():
    model = fresh("bert")
    adapters = ak.attach(model)
    adapters.load(FIXTURES / "setup_bert_average" / "setup")
    adapters.add("lora", ak.LoRA(r=2, targets=["attn.q"]))
    exp = _expected("setup_bert_average")
    adapters.activate(ak.Average("a", "lora", combine="outputs"))
    with pytest.raises(ValueError, match="same modules"):
        run(model, exp)
    with pytest.raises(ValueError, match="combine"):
        ak.Average("a", "b", combine="mean")


def test_split_with_a_length_refuses_other_lengths():
    model = fresh("bert")
    adapters = ak.attach(model)
    adapters.load(FIXTURES / "setup_bert_split" / "setup")
    exp = _expected("setup_bert_split")
    short = {"input_ids": exp["input_ids"][:, :6], "attention_mask": exp["attention_mask"][:, :6]}
    with pytest.raises(ValueError, match="sequences of 8 positions, got 6"):
        run(model, short)
    with pytest.raises(ValueError, match="inside the length"):
        ak.Split("a", "b", splits=[8], length=8)


def _setup(tmp_path, case, tree):
    """A copy of ``case``'s setup directory with ``adapter_setup`` replaced by ``tree``."""
    import shutil

    target = tmp_path / case
    shutil.copytree(FIXTURES / case / "setup", target)
    data = json.loads((target / "adapter_setup.json").read_text())
    data["adapter_setup"] = tree
    (target / "adapter_setup.json").write_text(json.dumps(data))
    return target


def _single(n):
    return {"type": "single", "children": [n]}


def test_what_the_library_cannot_run_is_refused(tmp_path):
    """Split over LoRA (the library: NotImplementedError in compose_split), Average over Stacks of SeqBn adapters (the
    library runs the first adapter's pre-step again inside them, which changes a SeqBn's state), bad split lengths;
    nothing stays loaded."""
    errors = DATA["library_errors"]
    assert errors["Split over LoRA adapters"]["type"] == "NotImplementedError"
    assert errors["Average over prefix tuning"]["type"] == "NotImplementedError"
    split_lora = _setup(
        tmp_path,
        "setup_bert_average_lora",
        {"type": "Split", "children": [_single("a"), _single("b")], "kwargs": {"splits": [3, 5]}},
    )
    nested = _setup(
        tmp_path,
        "setup_bert_stack_average",
        {
            "type": "Average",
            "children": [{"type": "Stack", "children": [_single("a"), _single("b")]}, _single("c")],
        },
    )
    bad_lengths = _setup(
        tmp_path, "setup_bert_split", {"type": "Split", "children": [_single("a"), _single("b")], "kwargs": {}}
    )
    for path, match in (
        (split_lora, "Split over LoRA adapters: adapters 1.3.0 cannot run it"),
        (nested, "changes the state when run twice"),
        (bad_lengths, "positive length per child"),
    ):
        model = fresh("bert")
        adapters = ak.attach(model)
        with pytest.raises(AdapterFileError, match=match):
            adapters.load(path)
        assert adapters.names == []


def test_average_over_mixed_kinds_is_refused(tmp_path):
    import shutil

    target = _setup(
        tmp_path,
        "setup_bert_average",
        {"type": "Average", "children": [_single("a"), _single("c")], "kwargs": {"weights": [0.5, 0.5]}},
    )
    shutil.copytree(FIXTURES / "setup_bert_average_lora" / "setup" / "c", target / "c")
    adapters = ak.attach(fresh("bert"))
    with pytest.raises(AdapterFileError, match="different kinds"):
        adapters.load(target)
    assert adapters.names == []


# --- export back ---------------------------------------------------------------------------------------------------


def _tree_equal(ours, theirs) -> bool:
    """adapter_setup trees equal, weights up to float rounding."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        if set(ours) != set(theirs):
            return False
        return all(_tree_equal(ours[k], theirs[k]) for k in ours)
    if isinstance(ours, list) and isinstance(theirs, list):
        return len(ours) == len(theirs) and all(_tree_equal(a, b) for a, b in zip(ours, theirs))
    if isinstance(ours, float) or isinstance(theirs, float):
        return ours == pytest.approx(theirs, abs=1e-12)
    return ours == theirs


@pytest.mark.parametrize("case", BLOCKS)
def test_setup_export_reads_back(case, tmp_path):
    """Our export of the loaded setup is the library's adapter_setup.json (weights up to rounding) and reads back
    with the same outputs."""
    model = fresh(CASES[case]["family"])
    adapters = ak.attach(model)
    exp = _expected(case)
    adapters.load(FIXTURES / case / "setup")
    ours = run(model, exp)
    adapters.export(adapters.active[0], tmp_path / "out", format="adapterhub")
    written = json.loads((tmp_path / "out" / "adapter_setup.json").read_text())
    saved = json.loads((FIXTURES / case / "setup" / "adapter_setup.json").read_text())
    assert _tree_equal(written["adapter_setup"], saved["adapter_setup"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in (FIXTURES / case / "setup").iterdir()
    )
    again = fresh(CASES[case]["family"])
    back = ak.attach(again)
    back.load(tmp_path / "out")
    assert _same(back.active[0], adapters.active[0])
    out, hidden = run(again, exp)
    assert _diff(out, ours[0]) <= 1e-6 and _diff(hidden, ours[1]) <= 1e-6
    assert _diff(out, exp["output"]) <= TOL


def test_averages_and_splits_adapterhub_computes_otherwise_are_not_written(tmp_path):
    from adapterkit.formats.adapterhub_export_common import AdapterHubExportError

    model = fresh("bert")
    adapters = ak.attach(model)
    adapters.load(FIXTURES / "setup_bert_average" / "setup")
    adapters.add("lora", ak.LoRA(r=2, targets=["attn.q", "attn.v"]))
    adapters.add("lora2", ak.LoRA(r=2, targets=["attn.q", "attn.v"]))
    for block, match in [
        (ak.Average("a", "b", weights=[0.25, 0.25]), "combine='outputs'"),  # SeqBn: AdapterHub weighs outputs
        (ak.Average("a", "b", combine="outputs"), "summing to 1/2"),  # [0.5, 0.5]: not AdapterHub's
        (ak.Average("lora", "lora2", weights=[0.25, 0.25], combine="outputs"), "combine='changes'"),
        (ak.Average("a", "lora", weights=[0.25, 0.25], combine="outputs"), "different kinds"),
        (ak.Average(ak.Stack("a", "b"), "a", weights=[0.25, 0.25]), "changes the state when run twice"),
        (ak.Split("a", "b", splits=[3]), "length=L"),
        (ak.Split("lora", "lora2", splits=[3], length=8), "Split over LoRA"),
    ]:
        with pytest.raises(AdapterHubExportError, match=match):
            adapters.export(block, tmp_path / "out", format="adapterhub")
    assert not list(tmp_path.iterdir())
    # written: LoRA Average with weights summing to 1/n
    adapters.export(ak.Average("lora", "lora2", weights=[0.3, 0.2]), tmp_path / "out", format="adapterhub")
    written = json.loads((tmp_path / "out" / "adapter_setup.json").read_text())["adapter_setup"]
    assert written["kwargs"]["weights"] == pytest.approx([0.6, 0.4])


# --- encoder-decoder classification heads (the last eos token) ---------------------------------------------------
EOS_HEADS = sorted(c for c, i in CASES.items() if i["kind"] == "eos_head")


def _encoder_decoder(case: str) -> torch.nn.Module:
    if CASES[case]["family"] == "t5":  # T5 with its decoder (the shared fixtures hold the encoder only)
        import transformers

        return transformers.T5Model.from_pretrained(str(FIXTURES / case / "base")).eval()
    return fresh("bart")


def _call(model: torch.nn.Module, exp: dict[str, torch.Tensor], **extra: torch.Tensor):
    kwargs = {"input_ids": exp["input_ids"], "attention_mask": exp["attention_mask"], **extra}
    if "decoder_input_ids" in exp:  # T5Model needs them: the ones T5AdapterModel made (_shift_right(input_ids))
        kwargs.setdefault("decoder_input_ids", exp["decoder_input_ids"])
    with torch.no_grad():
        return model(**kwargs)


def test_eos_head_fixtures_are_listed():
    assert EOS_HEADS == ["setup_bart_cls_head", "setup_t5_cls_head"]


@pytest.mark.parametrize("case", EOS_HEADS)
def test_encoder_decoder_classifier_reads_the_last_eos_token(case):
    """BartAdapterModel / T5AdapterModel classification heads on a bare BartModel / T5Model: the decoder's output at
    the last eos token of input_ids (row 0 has a token after it, row 1 padding), as the library."""
    model = _encoder_decoder(case)
    adapters = ak.attach(model)
    adapters.load(FIXTURES / case / "adapter", activate=True)
    assert adapters.config("task").configs[-1].cls_token == "eos"
    exp = _expected(case)
    out = _call(model, exp)
    assert _diff(out.logits, exp["output"]) <= TOL
    assert _diff(out.last_hidden_state, exp["hidden"]) <= TOL
    # the last token is not the last eos in row 0: a head on the last token gives other logits there
    layer = adapters.components("task")[""]
    last = layer.net(out.last_hidden_state[:, -1])
    assert _diff(last[0], exp["output"][0]) > 1e-3
    # the library's condition: every row holds the same number of eos tokens
    ids = exp["input_ids"].clone()
    ids[0, 2] = 5
    with pytest.raises(ValueError, match="same number"):
        _call(model, {**exp, "input_ids": ids})


@pytest.mark.parametrize("case", EOS_HEADS)
def test_encoder_decoder_classifier_export_reads_back(case, tmp_path):
    model = _encoder_decoder(case)
    adapters = ak.attach(model)
    adapters.load(FIXTURES / case / "adapter", activate=True)
    exp = _expected(case)
    ours = _call(model, exp).logits
    adapters.export("task", tmp_path / "out", format="adapterhub")
    written = json.loads((tmp_path / "out" / "head_config.json").read_text())
    saved = json.loads((FIXTURES / case / "adapter" / "head_config.json").read_text())
    assert written["config"] == saved["config"] and written["model_class"] == saved["model_class"]
    mine = load_file(str(tmp_path / "out" / "model_head.safetensors"))
    theirs = load_file(str(FIXTURES / case / "adapter" / "model_head.safetensors"))
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    again = _encoder_decoder(case)
    ak.attach(again).load(tmp_path / "out", activate=True)
    assert _diff(_call(again, exp).logits, ours) == 0.0
    # a classifier reading another token is not what the library's BartAdapterModel / T5AdapterModel reads
    from adapterkit.formats.adapterhub_export_common import AdapterHubExportError

    other = _encoder_decoder(case)
    made = ak.attach(other)
    made.add("x", ak.Union(ak.LoRA(r=2, targets=["attn.q"]), ak.FlexHead(num_labels=2)))
    with pytest.raises(AdapterHubExportError, match="cls_token='eos'"):
        made.export("x", tmp_path / "x", format="adapterhub")


# --- several heads, a fused adapter's own head (BertAdapterModel setups onto a bare BertModel) ----------------------
def _bare_bert() -> torch.nn.Module:
    from test_adapterhub_fusion import _bare

    return _bare("bert_cls_head")


def test_a_fused_adapters_own_head_gives_the_library_logits(tmp_path):
    """``save_adapter_setup(dir, Fuse("a", "b"), head_setup="b")`` (b saved with its classification head): b's head
    loads apart from b as the head adapter ``head[b]``, stacked after the fusion."""
    case = "setup_bert_fuse_member_head"
    model = _bare_bert()
    adapters = ak.attach(model)
    exp = _expected(case)
    adapters.load(FIXTURES / case / "setup")
    assert adapters.active == (ak.Stack(ak.Fuse("a", "b"), "head[b]"),)
    assert isinstance(adapters.config("head[b]"), ak.FlexHead) and not isinstance(adapters.config("b"), ak.Union)
    out = _call(model, exp)
    assert _diff(out.logits, exp["output"]) <= TOL
    adapters.export(adapters.active[0], tmp_path / "out", format="adapterhub")
    written = json.loads((tmp_path / "out" / "adapter_setup.json").read_text())
    assert written["head_setup"] == "head[b]"
    again = _bare_bert()
    ak.attach(again).load(tmp_path / "out")
    assert _diff(_call(again, exp).logits, out.logits) == 0.0


def test_the_head_of_an_averaged_adapter_follows_the_average(tmp_path):
    """head_setup naming an adapter inside an Average: the head acts on the model's output after the Average (the
    library's active head), loaded apart as head[b]."""
    target = _setup(
        tmp_path,
        "setup_bert_fuse_member_head",
        {"type": "Average", "children": [_single("a"), _single("b")], "kwargs": {"weights": [0.5, 0.5]}},
    )
    model = _bare_bert()
    adapters = ak.attach(model)
    adapters.load(target)
    assert _same(
        adapters.active[0], ak.Stack(ak.Average("a", "b", weights=[0.25, 0.25], combine="outputs"), "head[b]")
    )
    out = _call(model, _expected("setup_bert_fuse_member_head"))
    head = adapters.components("head[b]")[""]
    torch.testing.assert_close(out.logits, head.net(out.last_hidden_state[:, 0]))


def test_fusing_adapters_that_carry_heads_says_what_to_do():
    """Members loaded with their own heads, then fused: the heads cannot be fused (the setup loader splits them off
    as head[b]); the error says so instead of a missing-fusion or tensor-type error."""
    d = FIXTURES / "setup_bert_fuse_member_head" / "setup"
    model = _bare_bert()
    adapters = ak.attach(model)
    for n in ("a", "b", "a,b"):
        adapters.load(d / n)
    adapters.activate(ak.Fuse("a", "b"))
    with pytest.raises(TypeError, match="stack a head after the fusion"):
        _call(model, _expected("setup_bert_fuse_member_head"))


@pytest.mark.parametrize("case", ["setup_bert_parallel_heads", "setup_bert_batch_split_heads"])
def test_one_head_per_row_block_gives_the_library_logits(case, tmp_path):
    """Parallel / BatchSplit of adapters with their heads (head_setup the same block, or none: the library activates
    those heads either way): ``output.logits`` is a list, one entry per child on its rows, as the library's
    ``MultiHeadOutput.head_outputs``."""
    exp = _expected(case)
    for drop in (False, True):
        target = _setup(tmp_path / str(drop), case, CASES[case]["setup"])
        if drop:
            data = json.loads((target / "adapter_setup.json").read_text())
            data["head_setup"] = None
            (target / "adapter_setup.json").write_text(json.dumps(data))
        model = _bare_bert()
        adapters = ak.attach(model)
        adapters.load(target)
        logits = _call(model, exp).logits
        assert isinstance(logits, list) and len(logits) == 2
        assert [tuple(x.shape) for x in logits] == [tuple(exp["output.0"].shape), tuple(exp["output.1"].shape)]
        assert _diff(logits[0], exp["output.0"]) <= TOL and _diff(logits[1], exp["output.1"]) <= TOL
    adapters.export(adapters.active[0], tmp_path / "out", format="adapterhub")
    again = _bare_bert()
    ak.attach(again).load(tmp_path / "out")
    back = _call(again, exp).logits
    assert all(_diff(x, y) == 0.0 for x, y in zip(back, logits))


def test_several_heads_on_the_same_rows_give_the_library_logits(tmp_path):
    """head_setup ["a", "b"] over Stack(a, b): the library runs both heads on the whole output of the stack
    (``MultiHeadOutput``); here both heads load apart from their adapters and run side by side after the stack,
    ``ak.Stack("a", "b", Branch("head[a]", "head[b]"))``: ``output.logits`` is a list in head_setup order."""
    from adapterkit.compose import Branch

    case = "setup_bert_list_heads"
    exp = _expected(case)
    model = _bare_bert()
    adapters = ak.attach(model)
    adapters.load(FIXTURES / case / "setup")
    assert adapters.active == (ak.Stack("a", "b", Branch("head[a]", "head[b]")),)
    assert not isinstance(adapters.config("a"), ak.Union) and isinstance(adapters.config("head[a]"), ak.FlexHead)
    logits = _call(model, exp).logits
    assert isinstance(logits, list) and [tuple(x.shape) for x in logits] == [(2, 3), (2, 2)]
    assert _diff(logits[0], exp["output.0"]) <= TOL and _diff(logits[1], exp["output.1"]) <= TOL
    adapters.export(adapters.active[0], tmp_path / "out", format="adapterhub")
    written = json.loads((tmp_path / "out" / "adapter_setup.json").read_text())
    assert written["head_setup"] == ["head[a]", "head[b]"]
    assert written["adapter_setup"] == CASES[case]["setup"]
    again = _bare_bert()
    ak.attach(again).load(tmp_path / "out")
    back = _call(again, exp).logits
    assert all(_diff(x, y) == 0.0 for x, y in zip(back, logits))
    # the heads in the other order: the list follows head_setup
    target = _setup(tmp_path / "swapped", case, CASES[case]["setup"])
    data = json.loads((target / "adapter_setup.json").read_text())
    data["head_setup"] = ["b", "a"]
    (target / "adapter_setup.json").write_text(json.dumps(data))
    swapped = _bare_bert()
    ak.attach(swapped).load(target)
    assert [_diff(x, y) for x, y in zip(_call(swapped, exp).logits, [logits[1], logits[0]])] == [0.0, 0.0]


def test_heads_that_do_not_match_the_row_blocks_are_refused(tmp_path):
    """A Parallel head setup in another order than the adapters' is refused (the library would pair head i with row
    block i), and so is a head named twice; nothing loads."""
    adapters = ak.attach(_bare_bert())
    target = _setup(tmp_path, "setup_bert_parallel_heads", CASES["setup_bert_parallel_heads"]["setup"])
    data = json.loads((target / "adapter_setup.json").read_text())
    data["head_setup"]["children"].reverse()
    (target / "adapter_setup.json").write_text(json.dumps(data))
    with pytest.raises(AdapterFileError, match="do not match"):
        adapters.load(target)
    assert adapters.names == []
    twice = _setup(tmp_path / "twice", "setup_bert_list_heads", CASES["setup_bert_list_heads"]["setup"])
    data = json.loads((twice / "adapter_setup.json").read_text())
    data["head_setup"] = ["a", "a"]
    (twice / "adapter_setup.json").write_text(json.dumps(data))
    with pytest.raises(AdapterFileError, match="a head named twice"):
        adapters.load(twice)
    assert adapters.names == []


# --- Fuse over Stack children ----------------------------------------------------------------------------------------
FUSE_STACKS = sorted(c for c, i in CASES.items() if i["kind"] == "fuse_stack" and c != "setup_bert_fuse_stack")


@pytest.mark.parametrize("case", FUSE_STACKS)
def test_fuse_over_stack_gives_the_library_outputs(case, tmp_path):
    """``Fuse(Stack("a", "b"), "c")`` (and ``Fuse("c", Stack("a", "b"))``) of DoubleSeqBn adapters: the library names
    the fusion by the children's last adapters (``b,c``) and fuses the last adapter's change; ``ak.Fuse`` with a Stack
    child does the same. The same fusion over the last adapters alone gives the library's ``Fuse("b", "c")``; the
    export writes the library's setup and reads back bit-equal."""
    info = CASES[case]
    family = info["family"]
    exp = _expected(case)
    model = fresh(family)
    adapters = ak.attach(model)
    adapters.load(FIXTURES / case / "setup")
    setup = adapters.active[0]
    assert isinstance(setup, ak.Fuse) and setup.name == "fusion[" + info["fusion_name"] + "]"
    assert sorted(adapters.names) == sorted(["a", "b", "c", setup.name])
    out, hidden = run(model, exp)
    assert _diff(out, exp["output"]) <= TOL and _diff(hidden, exp["hidden"]) <= TOL
    adapters.activate(ak.Fuse(*info["fusion_name"].split(",")))
    assert _diff(run(model, exp)[0], exp["fuse.output"]) <= TOL
    adapters.export(setup, tmp_path / "out", format="adapterhub")
    written = json.loads((tmp_path / "out" / "adapter_setup.json").read_text())
    assert written["adapter_setup"] == info["setup"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in (FIXTURES / case / "setup").iterdir()
    )
    again = fresh(family)
    ak.attach(again).load(tmp_path / "out")
    assert _diff(run(again, exp)[0], out) == 0.0


def test_fuse_over_a_stack_of_seq_bn_is_refused(tmp_path):
    """SeqBn on BERT (original_ln_before): the library runs the last adapter's pre-step (the block's residual and
    LayerNorm) for the Fuse and again inside the Stack (1.0 off if read as ak.Fuse computes it); refused on reading
    and writing, naming why."""
    from adapterkit.formats.adapterhub_export_common import AdapterHubExportError

    case = "setup_bert_fuse_stack"
    model = fresh("bert")
    adapters = ak.attach(model)
    with pytest.raises(AdapterFileError, match="last adapter's pre-step for the whole block and again"):
        adapters.load(FIXTURES / case / "setup")
    assert adapters.names == []
    d = FIXTURES / case / "setup"
    for n in ("a", "b", "c", "b,c"):
        adapters.load(d / n)
    with pytest.raises(AdapterHubExportError, match="again inside each nested block"):
        adapters.export(ak.Fuse(ak.Stack("a", "b"), "c"), tmp_path / "out", format="adapterhub")
    assert not (tmp_path / "out").exists()


# --- the real library ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_library_loads_our_setups_with_our_outputs(tmp_path):
    """``adapters`` 1.3.0 loads our exports of the Average / Split / Parallel / BatchSplit setups
    (``load_adapter_setup(dir, set_active=True)`` under ``adapters.init``) and of the BART / T5 classification heads
    (``load_adapter`` on ``BartAdapterModel`` / ``T5AdapterModel``) and gives our outputs (<= 1e-4)."""
    from adapterhub_library import HUB_PYTHON, run_library

    if not HUB_PYTHON.is_file():
        pytest.skip(f"{HUB_PYTHON} is missing (make it as tests/fixtures/adapterhub/make_fixtures.py says)")
    manifest: dict[str, dict] = {}
    ours: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    multi: dict[str, torch.Tensor] = {}
    for case in BLOCKS:
        family = CASES[case]["family"]
        model = fresh(family)
        adapters = ak.attach(model)
        adapters.load(FIXTURES / case / "setup")
        ours[case] = run(model, _expected(case))
        adapters.export(adapters.active[0], tmp_path / case, format="adapterhub")
        manifest[case] = {"kind": "setup", "family": family, "head_model": False, "setup": str(tmp_path / case)}
    made = fresh("bert")  # made here: a LoRA Average with weights summing to 1/n
    adapters = ak.attach(made)
    for n in ("x", "y"):
        adapters.add(n, ak.LoRA(r=4, alpha=8, targets=["attn.q", "attn.v"], init_weights=False))
    adapters.activate(ak.Average("x", "y", weights=[0.3, 0.2]))
    ours["bert_lora_average_made_here"] = run(made, _expected("setup_bert_average_lora"))
    adapters.export(adapters.active[0], tmp_path / "made", format="adapterhub")
    manifest["bert_lora_average_made_here"] = {
        "kind": "setup", "family": "bert", "head_model": False, "setup": str(tmp_path / "made")
    }  # fmt: skip
    model = _bare_bert()  # a fused adapter's own head, exported as the head adapter head[b]
    adapters = ak.attach(model)
    adapters.load(FIXTURES / "setup_bert_fuse_member_head" / "setup")
    o = _call(model, _expected("setup_bert_fuse_member_head"))
    ours["setup_bert_fuse_member_head"] = (o.logits, o.last_hidden_state)
    adapters.export(adapters.active[0], tmp_path / "fuse_member_head", format="adapterhub")
    manifest["setup_bert_fuse_member_head"] = {"kind": "setup", "family": "bert", "head_model": True,
                                               "setup": str(tmp_path / "fuse_member_head")}  # fmt: skip
    # one head per row block; several heads on the same rows
    for case in ("setup_bert_parallel_heads", "setup_bert_batch_split_heads", "setup_bert_list_heads"):
        model = _bare_bert()
        adapters = ak.attach(model)
        adapters.load(FIXTURES / case / "setup")
        o = _call(model, _expected(case))
        for i, logits in enumerate(o.logits):
            multi[f"{case}.output.{i}"] = logits
        adapters.export(adapters.active[0], tmp_path / case, format="adapterhub")
        manifest[case] = {"kind": "setup", "family": "bert", "head_model": True, "setup": str(tmp_path / case)}
    for case in FUSE_STACKS:  # Fuse over Stack children
        family = CASES[case]["family"]
        model = fresh(family)
        adapters = ak.attach(model)
        adapters.load(FIXTURES / case / "setup")
        ours[case] = run(model, _expected(case))
        adapters.export(adapters.active[0], tmp_path / case, format="adapterhub")
        manifest[case] = {"kind": "setup", "family": family, "head_model": False, "setup": str(tmp_path / case)}
    for case in EOS_HEADS:
        model = _encoder_decoder(case)
        adapters = ak.attach(model)
        adapters.load(FIXTURES / case / "adapter", activate=True)
        o = _call(model, _expected(case))
        ours[case] = (o.logits, o.last_hidden_state)
        adapters.export("task", tmp_path / case, format="adapterhub")
        manifest[case] = {"kind": "head", "family": CASES[case]["family"], "adapter": str(tmp_path / case),
                          "name": "task", "inputs": str(FIXTURES / case / "expected.safetensors")}  # fmt: skip
        if CASES[case]["family"] == "t5":
            manifest[case]["base"] = str(FIXTURES / case / "base")
    theirs = run_library("adapterhub_library_check_fusion.py", manifest, tmp_path)
    worst = {}
    for key, (out, hidden) in ours.items():
        assert theirs[f"{key}.missing"].item() == 0, key
        worst[key] = (_diff(theirs[f"{key}.output"], out), _diff(theirs[f"{key}.hidden"], hidden))
    print("\ncase: max|library - ours| output, hidden")
    for key, (d_out, d_hid) in worst.items():
        print(f"  {key:30s} {d_out:.1e} {d_hid:.1e}")
    for key, logits in multi.items():
        worst[key] = (_diff(theirs[key], logits), 0.0)
        print(f"  {key:30s} {worst[key][0]:.1e}")
    bad = {k: v for k, v in worst.items() if v[0] > TOL or v[1] > TOL}
    assert not bad, bad
