"""The ``adapterkit`` CLI end to end on tiny random models saved to a temporary directory (no network):
help and errors, train (config file, metrics.json, PNG, adapter-only checkpoints, dev accuracy above chance),
every registered method and preset through train / best checkpoint / resume, resume after a stop, eval,
export to peft, merge, inspect, generate, and 2-process DDP / FSDP2 runs equal to one process."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import adapterkit as ak
from adapterkit.cli import app

WORDS = [
    "good",
    "bad",
    "great",
    "awful",
    "fine",
    "nice",
    "poor",
    "dull",
    "movie",
    "film",
    "plot",
    "actor",
    "the",
    "a",
    "is",
    "was",
    "very",
    "not",
]
POS, NEG = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "dull"]


def _run(*args: str) -> object:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def _ok(*args: str) -> str:
    result = _run(*args)
    assert result.exit_code == 0, f"{args[0]} failed:\n{result.output}\n{result.exception!r}"
    return result.output


def _word_tokenizer(vocab: list[str]) -> object:
    """A BERT-style word tokenizer over ``vocab`` built with ``tokenizers`` (transformers 5 ignores
    ``BertTokenizerFast(vocab_file=...)``, which left every word ``[UNK]``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )  # fmt: skip
    return tok


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Tiny BERT classifier and LLaMA causal LM (save_pretrained, no dropout) with a BertTokenizerFast that maps
    each word of the vocabulary to its id; a GLUE-style SST-2 directory; alpaca-style instruction data."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertTokenizerFast,
        LlamaConfig,
        LlamaForCausalLM,
    )

    root = tmp_path_factory.mktemp("cli")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = BertTokenizerFast(tokenizer_object=_word_tokenizer(vocab), unk_token="[UNK]", pad_token="[PAD]",
                            cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")  # fmt: skip
    words = ["the", "film", "is", "good"]
    assert tok(" ".join(words))["input_ids"] == [2, *map(vocab.index, words), 3]  # no [UNK]
    torch.manual_seed(0)
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )  # fmt: skip
    )
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        )  # fmt: skip
    )
    llama.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")

    rng = random.Random(0)
    rows = []
    for i in range(96):
        y = i % 2
        rows.append(
            f"the {rng.choice(['movie', 'film', 'plot'])} is {rng.choice(['very ', ''])}{rng.choice(POS if y else NEG)} \t{y}"
        )
    sst = root / "SST-2"
    sst.mkdir()
    (sst / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:80]) + "\n")
    (sst / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[80:]) + "\n")
    alpaca = [{"instruction": "rate the film", "input": f"the film is {w}", "output": "good" if w in POS else "bad"}
              for w in (POS + NEG) * 3]  # fmt: skip
    (root / "alpaca.json").write_text(json.dumps(alpaca))
    return {
        "root": root,
        "bert": root / "bert",
        "llama": root / "llama",
        "sst": sst,
        "alpaca": root / "alpaca.json",
    }


# 80 rows, batch 8: 10 steps per epoch; a constant schedule so that a stop at any step changes nothing after it.
# The random tiny BERT needs ~40 steps at this rate before the sentiment word reaches [CLS]; 80 learn the task.
RECIPE = ["--task", "classify", "--epochs", "8", "--batch-size", "8", "--lr", "2e-2", "--scheduler", "constant",
          "--logging-steps", "2", "--no-progress", "--threads", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(files) -> Path:
    """One training run driven by a YAML config file, with flags on top."""
    out = files["root"] / "run"
    cfg = files["root"] / "run.yaml"
    cfg.write_text(
        f"model: {files['bert']}\ndata: {files['sst']}\nmethod: lora\ntargets: [attn.q, attn.v]\nopt: {{r: 4, alpha: 8}}\nname: sst\n"
    )
    _ok("train", "--config", cfg, *RECIPE, "--out", out)
    return out


def _logits(model: torch.nn.Module, tokenizer_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    enc = tok(["the film is very good", "the plot is dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def _adapted(files, out: Path) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(files["bert"], num_labels=2).eval()
    ak.attach(model).load(out, activate=True)
    return model


# --- help and errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "eval", "merge", "export", "inspect", "generate"])
def test_help_for_each_command(command):
    out = _ok(command, "--help")
    assert "Usage:" in out and "--config" in out


def test_top_level_help_lists_commands():
    out = _ok("--help")
    for command in ("train", "eval", "merge", "export", "inspect", "generate"):
        assert command in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--model", "m", "--data", "d", "--out", "o", "--bogus"], "No such option: --bogus"),
        (["train", "--model", "m", "--data", "d", "--out", "o", "--opt", "r"], "expected KEY=VALUE"),
        (["train", "--model", "m", "--data", "d", "--out", "o", "--task", "regress"], "regress"),
        (["train", "--data", "d", "--out", "o"], "Missing option '--model'"),
        (["train", "--model", "m", "--data", "d", "--out", "o", "--method", "lorra"], "did you mean 'lora'"),
        (["train", "--model", "m", "--data", "d", "--out", "o", "--opt", "rank=4"], "rank"),
        (
            ["train", "--model", "m", "--data", "d", "--out", "o", "--opt", 'rank_pattern={"q": 4'],
            "not valid JSON",
        ),
        (["train", "--model", "m", "--data", "d", "--out", "o", "--opt", "targets=[attn.q]"], "not valid JSON"),
    ],
)
def test_bad_flags_give_one_clear_message(args, message):
    result = _run(*args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_data_and_unknown_config_key(files, tmp_path):
    result = _run(
        "train",
        "--model",
        files["bert"],
        "--data",
        tmp_path / "nope.tsv",
        "--out",
        tmp_path / "o",
        "--task",
        "classify",
    )
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output
    cfg = tmp_path / "c.yaml"
    cfg.write_text("modle: x\n")
    result = _run("train", "--config", cfg)
    assert result.exit_code == 2 and "unknown option 'modle'" in result.output


def test_fixture_tokenizer_knows_every_word(files):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(files["bert"])
    ids = tok(" ".join(WORDS))["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == len(WORDS) + 2


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--epochs", "-1"), ("--epochs", "nan"), ("--max-length", "0"), ("--grad-accum", "0"), ("--batch-size", "0"),
     ("--lr", "0"), ("--max-steps", "0"), ("--eval-steps", "0"), ("--warmup", "-1"), ("--loraplus-ratio", "0")],
)  # fmt: skip
def test_out_of_range_numbers_are_refused(files, tmp_path, flag, value):
    out = tmp_path / "o"
    result = _run("train", "--model", files["bert"], "--data", files["sst"], "--task", "classify", flag, value,
                  "--out", out)  # fmt: skip
    assert result.exit_code == 2 and f"Invalid value for {flag}" in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize(
    ("opt", "message"),
    [("alpha=inf", "alpha must be a finite number"), ("alpha=NaN", "alpha must be a finite number"),
     ('alpha="8"', "alpha must be a finite number"), ("r=true", "rank r must be a positive integer"),
     ('alpha_pattern={"query": "2"}', "alpha_pattern")],
)  # fmt: skip
def test_lora_options_of_the_wrong_kind_are_refused(files, tmp_path, opt, message):
    out = tmp_path / "o"
    result = _run("train", "--model", files["bert"], "--data", files["sst"], "--task", "classify", "--opt", opt,
                  "--out", out)  # fmt: skip
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


# --- train -------------------------------------------------------------------------------------------------
def test_train_writes_adapter_metrics_and_curve(trained):
    assert json.loads((trained / "adapter_config.json").read_text())["name"] == "sst"
    tensors = load_file(trained / "adapter.safetensors")
    assert any(k.startswith("classifier.") for k in tensors)  # the head copy travels with the adapter
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["global_step"] == 80 and metrics["metric"] == "accuracy"
    assert [p["step"] for p in metrics["history"]["eval"]] == list(range(10, 81, 10))
    # the toy task is separable by one word: the adapter learns it (chance: 0.5 on the balanced dev set)
    assert metrics["final_eval"]["accuracy"] >= 0.875, metrics["history"]["eval"]
    assert (trained / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((trained / "run.json").read_text())
    assert run["task"] == "classify" and run["labels"] == ["0", "1"]
    for ckpt in (trained / "checkpoints").glob("checkpoint-*"):  # adapter-only checkpoints
        assert (ckpt / "adapter.safetensors").is_file() and not (ckpt / "model.safetensors").exists()


def test_existing_checkpoints_need_resume_or_overwrite(files, trained):
    result = _run("train", "--model", files["bert"], "--data", files["sst"], *RECIPE, "--out", trained)
    assert result.exit_code == 1 and "--resume" in result.output


def test_resume_after_a_stop_equals_an_uninterrupted_run(files, trained):
    out = files["root"] / "resumed"
    base = ["--model", files["bert"], "--data", files["sst"], "--targets", "attn.q,attn.v", "--opt", "r=4",
            "--opt", "alpha=8", "--name", "sst", *RECIPE, "--out", out]  # fmt: skip
    _ok("train", *base, "--max-steps", "5")  # the "kill": training ends after step 5 with its checkpoint
    assert (out / "checkpoints" / "checkpoint-5").is_dir()
    _ok("train", *base, "--resume")
    a = load_file(trained / "checkpoints" / "checkpoint-80" / "adapter.safetensors")
    b = load_file(out / "checkpoints" / "checkpoint-80" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


# --- every registered method and preset ----------------------------------------------------------------------
# options that fit the tiny model (hidden size 32) or that the method needs
METHOD_OPTS = {
    "union": ["--opt", 'configs=["lora", "seq_bn"]'],
    "compacter": ["--opt", "reduction_factor=8"],  # phm_dim 4 must divide the bottleneck (32 / 8)
    "compacter++": ["--opt", "reduction_factor=8"],
    "road": ["--opt", "group_size=8"],  # peft's default 64 does not divide the tiny model's 32 outputs
    "vblora": ["--opt", "vector_length=8"],  # the default 256 does not divide the tiny model's 32 features
}
# methods for convolutions: on the tiny BERT the run stops at once with the reason
CONV_ONLY = {"conv_adapter", "residual_adapter"}


def _methods_and_presets() -> list[str]:
    from adapterkit.config import _PRESETS

    return sorted(set(ak.registered()) | set(_PRESETS))


def _quick(files, out: Path, method: str) -> list:
    """Arguments of a tiny classification run: 8 rows, batch 4, an evaluation and a checkpoint every step."""
    return ["--model", files["bert"], "--data", files["sst"], "--task", "classify", "--method", method,
            *METHOD_OPTS.get(method, []), "--train-size", "8", "--dev-size", "4", "--batch-size", "4",
            "--eval-steps", "1", "--logging-steps", "1", "--no-progress", "--threads", "1", "--out", out]  # fmt: skip


def test_loraplus_ratio_builds_loraplus_groups(files, tmp_path, monkeypatch):
    """--loraplus-ratio hands the Trainer LoRA+'s optimizer: B matrices at ratio x --lr, A at --lr."""
    import adapterkit as ak

    built = []
    original = ak.loraplus_optimizer

    def record(*args, **kwargs):
        opt = original(*args, **kwargs)
        built.append(opt)
        return opt

    monkeypatch.setattr(ak, "loraplus_optimizer", record)
    _ok(
        "train",
        *_quick(files, tmp_path / "o", "lora"),
        "--lr",
        "1e-3",
        "--loraplus-ratio",
        "16",
        "--max-steps",
        "1",
    )
    assert len(built) == 1
    lrs = sorted({g["initial_lr"] if "initial_lr" in g else g["lr"] for g in built[0].param_groups if g["params"]})
    assert lrs == [pytest.approx(1e-3), pytest.approx(16e-3)], lrs


def test_the_method_list_covers_the_unipelt_and_mam_presets():
    assert {"lora", "prefix_tuning", "mam", "unipelt", "union"} <= set(_methods_and_presets())


@pytest.mark.parametrize("method", _methods_and_presets())
def test_every_method_and_preset_trains_keeps_its_best_checkpoint_and_resumes(
    files, tmp_path, monkeypatch, method
):
    """Train one step (its checkpoint is reloaded as the best at the end), resume from it for a second step, load
    the saved adapter onto a fresh model. Methods that are not trained on their own (fusion) are refused."""
    monkeypatch.setattr("adapterkit.cli.plot.plot_curve", lambda *a, **k: None)  # the PNG is tested elsewhere
    out = tmp_path / "out"
    args = _quick(files, out, method)
    if method in CONV_ONLY:
        result = _run("train", *args, "--max-steps", "1")
        assert result.exit_code == 1 and "has no Conv2d module" in result.output, result.output
        assert "Traceback" not in result.output and not out.exists()
        return
    if not getattr(ak.registered().get(method), "standalone", True):  # presets are instances of standalone configs
        result = _run("train", *args, "--max-steps", "1")
        assert result.exit_code == 1 and "is not trained on its own" in result.output
        assert "Traceback" not in result.output and not out.exists()
        return
    _ok("train", *args, "--max-steps", "1")
    first = json.loads((out / "metrics.json").read_text())
    assert first["global_step"] == 1 and first["best"]["checkpoint"].endswith("checkpoint-1")
    _ok("train", *args, "--max-steps", "2", "--resume")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and [p["step"] for p in metrics["history"]["eval"]] == [1, 2]
    assert Path(metrics["best"]["checkpoint"]).is_dir()
    model = _adapted(files, out)
    logits = _logits(model, files["bert"])
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_resume_restores_the_prefix_mlp_exactly(files, tmp_path):
    """Prefix tuning with prefix_projection saves the computed prefix; its checkpoints also hold the MLP as trained
    (training_state.safetensors), which resuming restores: a stop and resume equals an uninterrupted run."""
    opts = ["--opt", "prefix_projection=true", "--opt", "num_virtual_tokens=4", "--opt", "encoder_hidden_size=16",
            "--lr", "1e-2", "--scheduler", "constant"]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _ok("train", *_quick(files, whole, "prefix_tuning"), *opts, "--max-steps", "3")
    _ok("train", *_quick(files, parts, "prefix_tuning"), *opts, "--max-steps", "1")
    _ok("train", *_quick(files, parts, "prefix_tuning"), *opts, "--max-steps", "3", "--resume")
    for name in ("training_state.safetensors", "adapter.safetensors"):
        a = load_file(whole / "checkpoints" / "checkpoint-3" / name)
        b = load_file(parts / "checkpoints" / "checkpoint-3" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    raw = load_file(whole / "checkpoints" / "checkpoint-3" / "training_state.safetensors")
    assert any(k.endswith("embedding") for k in raw) and any(".transform." in k for k in raw)
    saved = [k for k in load_file(whole / "adapter.safetensors") if not k.startswith("classifier.")]
    assert len(saved) == 1 and saved[0].endswith(".prefix")  # the final adapter holds the folded prefix only


def test_resume_skips_a_checkpoint_whose_trainer_state_is_truncated(files, tmp_path):
    out = tmp_path / "out"
    args = _quick(files, out, "lora")
    _ok("train", *args, "--max-steps", "2")
    state = out / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # killed while writing the newest checkpoint
    from adapterkit.cli.train import last_checkpoint

    assert last_checkpoint(out / "checkpoints") == out / "checkpoints" / "checkpoint-1"
    output = _ok("train", *args, "--max-steps", "2", "--resume")
    assert "resuming from" in output and "checkpoint-1" in output
    assert json.loads(state.read_text())["global_step"] == 2  # step 2 trained and saved again


def test_training_from_a_classifier_with_another_number_of_labels(files, tmp_path):
    """The tiny BERT was saved with a 2-label head; 3-label data trains a new 3-output head."""
    data = tmp_path / "three.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"the film is {w}\t{i % 3}\n" for i, w in enumerate(WORDS * 2)))
    out = tmp_path / "out"
    _ok("train", "--model", files["bert"], "--data", data, "--task", "classify", "--max-steps", "1",
        "--no-progress", "--out", out)  # fmt: skip
    assert json.loads((out / "run.json").read_text())["labels"] == ["0", "1", "2"]
    assert load_file(out / "adapter.safetensors")["classifier.head.weight"].shape[0] == 3
    # resuming that run on 2-label data: one message naming what differs, the run left as it was
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    result = _run("train", "--model", files["bert"], "--data", files["sst"], "--task", "classify", "--max-steps",
                  "2", "--no-progress", "--out", out, "--resume")  # fmt: skip
    assert result.exit_code == 1 and "cannot resume" in result.output and "number of labels" in result.output
    assert "Traceback" not in result.output and sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_data_errors_are_one_message(files, tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n" + "the film is good\t\n" * 10)
    result = _run(
        "train", "--model", files["bert"], "--data", empty, "--task", "classify", "--out", tmp_path / "o"
    )
    assert result.exit_code == 1 and "empty label" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_absurd_rank_is_refused_before_allocating(files, trained, tmp_path):
    result = _run("train", "--model", files["bert"], "--data", files["sst"], "--task", "classify", "--opt",
                  "r=1000000000000", "--out", tmp_path / "o")  # fmt: skip
    assert result.exit_code == 1 and "r=1000000000000 is far too large" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()
    # an adapter directory whose config declares such a rank (tensors without the config digest, as older
    # adapterkit versions wrote them)
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((trained / "adapter_config.json").read_text())
    cfg["config"]["r"] = 10**12
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(load_file(trained / "adapter.safetensors"), bad / "adapter.safetensors")
    (bad / "run.json").write_text((trained / "run.json").read_text())
    for command in (
        ["eval", bad],
        ["merge", bad, "--out", tmp_path / "m"],
        ["export", bad, "--out", tmp_path / "e"],
    ):
        result = _run(*command)
        assert result.exit_code == 1 and "far too large" in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "m").exists() and not (tmp_path / "e").exists()


# --- eval / export / merge -------------------------------------------------------------------------------------
def test_eval_prints_accuracy(trained):
    out = _ok("eval", trained)
    expected = json.loads((trained / "metrics.json").read_text())["final_eval"]["accuracy"]
    assert f"accuracy: {expected:.2%}" in out
    assert "curve.png" in out


def test_eval_with_labels_the_head_lacks_is_one_message(files, trained, tmp_path):
    data = tmp_path / "three.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"the film is good\t{i % 3}\n" for i in range(9)))
    result = _run("eval", trained, "--data", data)
    assert result.exit_code == 1 and "labels the adapter's head does not have: ['2']" in result.output
    bare = tmp_path / "bare"  # no run.json: the labels come from --num-labels
    bare.mkdir()
    for name in ("adapter_config.json", "adapter.safetensors"):
        (bare / name).write_bytes((trained / name).read_bytes())
    result = _run("eval", bare, "--model", files["bert"], "--data", data, "--num-labels", "3")
    assert result.exit_code == 1 and "has 2 outputs" in result.output and "--num-labels 2" in result.output
    result = _run("eval", bare, "--model", files["bert"], "--data", data)
    assert result.exit_code == 1 and "--num-labels N" in result.output
    assert "Traceback" not in result.output


def test_eval_from_another_directory_finds_the_data(files, tmp_path, monkeypatch):
    """run.json stores the data path absolute: `eval` works wherever it runs."""
    monkeypatch.chdir(files["root"])
    out = tmp_path / "rel"
    _ok("train", "--model", files["bert"], "--data", "SST-2", "--task", "classify", "--max-steps", "1",
        "--no-progress", "--out", out)  # fmt: skip
    data = json.loads((out / "run.json").read_text())["data"]
    assert data["data"] == str(files["sst"].resolve())
    monkeypatch.chdir(tmp_path)
    assert "accuracy:" in _ok("eval", out)


def test_merge_and_export_refuse_an_existing_file_as_out(files, trained, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    for command in ("merge", "export"):
        result = _run(command, trained, "--out", target)
        assert result.exit_code == 1 and "existing file" in result.output and "wrote" not in result.output
        assert "Traceback" not in result.output
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_export_peft_loads_in_peft(files, trained):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    dest = files["root"] / "peft"
    _ok("export", trained, "--format", "peft", "--out", dest)
    base = AutoModelForSequenceClassification.from_pretrained(files["bert"], num_labels=2).eval()
    peft_model = PeftModel.from_pretrained(base, dest).eval()
    expected = _logits(_adapted(files, trained), files["bert"])
    torch.testing.assert_close(_logits(peft_model, files["bert"]), expected, rtol=1e-5, atol=1e-5)


def test_export_adapterhub_writes_the_adapter_and_its_head(files, trained):
    from adapterkit.formats import adapterhub, detect

    dest = files["root"] / "adapterhub"
    _ok("export", trained, "--format", "adapterhub", "--out", dest)
    assert detect(dest) is adapterhub
    assert (dest / "adapter.safetensors").is_file() and (dest / "head_config.json").is_file()


def test_merge_writes_a_plain_model_with_the_same_logits(files, trained):
    from transformers import AutoModelForSequenceClassification

    dest = files["root"] / "merged"
    _ok("merge", trained, "--out", dest)
    merged = AutoModelForSequenceClassification.from_pretrained(dest).eval()
    assert not any("ak_adapters" in k for k in merged.state_dict())
    expected = _logits(_adapted(files, trained), files["bert"])
    torch.testing.assert_close(_logits(merged, dest), expected, rtol=1e-5, atol=1e-5)


# --- inspect / generate ------------------------------------------------------------------------------------------
def test_inspect_prints_roles_sites_params_and_memory(files):
    out = _ok(
        "inspect", "--model", files["bert"], "--method", "lora", "--targets", "attn.q,attn.v", "--opt", "r=4"
    )
    assert "[attn.q]" in out and "[ffn.down]" in out and "[head]" in out
    assert "query (Linear, 1,056)  [attn.q]  <- lora target (+256)" in out
    assert "1..1 (1 more like 0; lora at 2 sites in them)" in out
    assert "lora: 5 sites (4 target, 1 head), 1,090 trainable parameters" in out
    assert "estimated training memory" in out and "total" in out


def test_generate_with_a_causal_lm_adapter(files):
    out = files["root"] / "gen"
    _ok("train", "--model", files["llama"], "--data", files["alpaca"], "--task", "causal-lm", "--max-steps", "2",
        "--batch-size", "4", "--dev-fraction", "0.25", "--no-progress", "--threads", "1", "--out", out)  # fmt: skip
    run = json.loads((out / "run.json").read_text())
    assert run["task"] == "causal-lm" and run["columns"]["instruction"] == "instruction"
    from adapterkit.cli.ops import run_generate

    texts = run_generate(out, ["rate the film", "the film is good"], model=None, template=None, raw=False,
                         max_new_tokens=4, temperature=0.0, top_p=0.9, seed=0)  # fmt: skip
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    _ok("generate", out, "--prompt", "rate the film", "--max-new-tokens", "3")


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_generate_with_a_model_level_adapter(files, method):
    """Prefix/prompt adapters generate through the CLI (the KV cache the model is handed holds the virtual tokens
    once: transformers >= 5.24 passes it as ``cache``)."""
    out = files["root"] / f"gen-{method}"
    _ok("train", "--model", files["llama"], "--data", files["alpaca"], "--task", "causal-lm", "--max-steps", "2",
        "--method", method, "--opt", "num_virtual_tokens=4", "--batch-size", "4", "--dev-fraction", "0.25",
        "--no-progress", "--threads", "1", "--out", out)  # fmt: skip
    from adapterkit.cli.ops import run_generate

    kw = {
        "model": None,
        "template": None,
        "raw": True,
        "max_new_tokens": 4,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,
    }
    texts = run_generate(out, ["the film is good", "rate the film"], **kw)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    _ok("generate", out, "--prompt", "rate the film", "--max-new-tokens", "3")


# --- distributed ---------------------------------------------------------------------------------------------------
def _torchrun(args: list[str], tmp: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "adapterkit.cli", "train", *map(str, args)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _distributed_equals_single(files, tmp_path: Path, extra: list[str]) -> None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    common = ["--model", files["bert"], "--data", files["sst"], "--task", "classify", "--epochs", "1", "--lr", "5e-3",
              "--opt", "r=4", "--no-progress", "--logging-steps", "5", "--scheduler", "constant"]  # fmt: skip
    _ok("train", *common, "--batch-size", "8", "--out", tmp_path / "single", "--threads", "1")
    _torchrun([*common, "--batch-size", "4", "--out", tmp_path / "multi", *extra], tmp_path)  # same global batch
    metrics = json.loads((tmp_path / "multi" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 10
    a = load_file(tmp_path / "single" / "checkpoints" / "checkpoint-10" / "adapter.safetensors")
    b = load_file(tmp_path / "multi" / "checkpoints" / "checkpoint-10" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_ddp_backend_is_gloo_on_cpu_and_nccl_on_cuda():
    """The NCCL branch cannot run here (no GPU in CI); its choice is checked directly."""
    from adapterkit.cli.train import ddp_backend

    assert ddp_backend(use_cpu=True, world=2) == "gloo"
    assert ddp_backend(use_cpu=False, world=2) == "nccl"
    assert ddp_backend(use_cpu=False, world=1) is None


def test_ddp_two_cpu_processes_equal_one_process(files, tmp_path):
    _distributed_equals_single(files, tmp_path, [])


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_equal_one_process(files, tmp_path):
    _distributed_equals_single(files, tmp_path, ["--fsdp"])
