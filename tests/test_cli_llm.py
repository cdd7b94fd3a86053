"""The LLM fine-tuning workflow of ``adapterkit train`` / ``generate`` (issue 19, items 9-11) on a tiny LLaMA with a
word-level tokenizer and a chat template, saved to a temporary directory (no network):

* chat data: ``messages`` rendered with the chat template, loss on assistant turns only (``--train-on-prompt``:
  all), a list-of-dicts column never trained as its Python repr, one clear error without a chat template;
* truncation that removes every response token warns and drops the example (``--strict``: fails);
* ``--packing``: position ids restart per example, no cross-example attention, the loss equals the unpacked one;
* QLoRA: ``--quantize nf4|int8``, ``--dtype``, ``--gradient-checkpointing``, a checkpoint saved already quantized;
* ``--optim``, ``--group-by-length``, ``--early-stopping``, ``--report-to``, ``--fp16``;
* end to end: NF4 + LoRA on chat data with packing, then generate, merge, export --format peft, and peft /
  transformers loading the export with equal outputs.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import adapterkit as ak
from adapterkit.cli import app
from adapterkit.cli import data as D

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(
    not HAS_BNB, reason="bitsandbytes is not installed (pip install 'adapterkit[quant]')"
)

WORDS = ["the", "film", "movie", "plot", "is", "was", "very", "good", "bad", "great", "awful", "rate", "say", "one",
         "word", "be", "brief", "kind", "hello", "thanks", "what", "do", "you", "think", "a", "it", "and", "so"]  # fmt: skip
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _flag_supported(flag: str) -> bool:
    import typer.main

    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    return any(flag in p.opts for p in command.params)


# the train flags live in cli/__init__.py (the option declarations); the behaviour in cli/train.py
needs_flags = pytest.mark.skipif(
    not _flag_supported("--packing"),
    reason="cli/__init__.py lacks the LLM train flags (--packing, --quantize, ...): apply the llm-cli patch",
)


def _run(*args: object) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def _ok(*args: object) -> str:
    result = _run(*args)
    assert result.exit_code == 0, f"{args[0]} failed:\n{result.output}\n{result.exception!r}"
    return result.output


def _fail(*args: object) -> str:
    result = _run(*args)
    assert result.exit_code != 0, result.output
    return result.output


def _tokenizer(chat_template: str | None) -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=SPECIAL[4:])  # fmt: skip
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def _llama(hidden: int = 64) -> torch.nn.Module:
    """Hidden size 64: bitsandbytes' CPU NF4 needs in_features that are multiples of its block size (64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=2, eos_token_id=3, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _chats(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        w = rng.choice(["good", "great", "bad", "awful"])
        verdict = "good" if w in ("good", "great") else "bad"
        messages = [{"role": "user", "content": f"rate the film the film is {w}"},
                    {"role": "assistant", "content": verdict}]  # fmt: skip
        if i % 3 == 0:
            messages = [{"role": "system", "content": "be brief"}, *messages]
        if i % 4 == 0:
            messages += [{"role": "user", "content": "thanks"}, {"role": "assistant", "content": "so kind"}]
        rows.append({"messages": messages})
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm")
    model = _llama()
    model.save_pretrained(root / "llama")
    _tokenizer(CHAT_TEMPLATE).save_pretrained(root / "llama")
    model.save_pretrained(root / "nochat")
    _tokenizer(None).save_pretrained(root / "nochat")
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in _chats(24)) + "\n")
    (root / "template.jinja").write_text(CHAT_TEMPLATE)
    return {"root": root, "llama": root / "llama", "nochat": root / "nochat", "chat": root / "chat.jsonl",
            "template": root / "template.jinja"}  # fmt: skip


QUICK = ["--task", "causal-lm", "--max-steps", "2", "--batch-size", "4", "--dev-fraction", "0.25", "--no-progress",
         "--threads", "1", "--logging-steps", "1", "--lr", "1e-2"]  # fmt: skip


def _splits(rows: list[dict], columns: list[str] | None = None, chat_template: str | None = None) -> D.Splits:
    spec = D.DataSpec(data="x", task="causal-lm", text_columns=columns, chat_template=chat_template)
    return D.Splits(
        rows, [], "", D.resolve_columns(spec, list(rows[0]), "x", rows[0]), chat_template=chat_template
    )


# --- chat data ----------------------------------------------------------------------------------------------------
def test_chat_rows_render_with_the_template_and_train_on_assistant_turns_only():
    tok = _tokenizer(CHAT_TEMPLATE)
    row = _chats(1)[0]  # system, user, assistant, user, assistant
    splits = _splits([row])
    assert splits.columns == {"messages": "messages"}
    (f,) = D.encode([row], splits, tok, task="causal-lm", max_length=256).features
    text = tok.apply_chat_template(row["messages"], tokenize=False)
    assert f["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    kept = [t for t, y in zip(f["input_ids"], f["labels"]) if y != -100]
    assert tok.decode(kept) == f"{row['messages'][2]['content']} <|end|> so kind <|end|>"
    assert all(y in (-100, t) for t, y in zip(f["input_ids"], f["labels"]))
    (g,) = D.encode([row], splits, tok, task="causal-lm", max_length=256, train_on_prompt=True).features
    assert g["labels"] == g["input_ids"] == f["input_ids"]


def test_a_messages_column_is_a_chat_not_its_python_repr():
    rows = _chats(2)
    for columns in (None, ["messages"]):
        assert _splits(rows, columns).columns == {"messages": "messages"}
    sharegpt = [{"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "thanks"}]}]
    splits = _splits(sharegpt)
    assert splits.columns == {"messages": "conversations"}
    (f,) = D.encode(sharegpt, splits, _tokenizer(CHAT_TEMPLATE), task="causal-lm", max_length=64).features
    assert "[" not in _tokenizer(None).decode(f["input_ids"]) and "<unk>" not in _tokenizer(None).decode(
        f["input_ids"]
    )
    with pytest.raises(D.DataError, match="chat data trains causal-lm"):
        D.resolve_columns(D.DataSpec(data="x", task="classify", text_columns=["messages"]), ["messages", "label"],
                          "x", {"messages": rows[0]["messages"], "label": 1})  # fmt: skip


def test_no_chat_template_is_one_message_naming_chat_template():
    rows = _chats(2)
    with pytest.raises(D.DataError, match="--chat-template FILE"):
        D.encode(rows, _splits(rows), _tokenizer(None), task="causal-lm", max_length=64)
    # given as a file it works, the same as the tokenizer's own
    given = D.encode(rows, _splits(rows, chat_template=CHAT_TEMPLATE), _tokenizer(None), task="causal-lm",
                     max_length=64).features  # fmt: skip
    own = D.encode(rows, _splits(rows), _tokenizer(CHAT_TEMPLATE), task="causal-lm", max_length=64).features
    assert given == own


def test_a_template_that_rewrites_earlier_turns_is_refused_with_the_way_out():
    rewriting = "{% for m in messages %}{{ m['content'] if loop.last else 'x' }} {% endfor %}"
    rows = _chats(1)
    with pytest.raises(D.DataError, match="--train-on-prompt"):
        D.encode(rows, _splits(rows, chat_template=rewriting), _tokenizer(None), task="causal-lm", max_length=64)
    D.encode(rows, _splits(rows, chat_template=rewriting), _tokenizer(None), task="causal-lm", max_length=64,
             train_on_prompt=True)  # fmt: skip


def test_truncation_that_removes_every_response_token_is_recorded():
    tok = _tokenizer(CHAT_TEMPLATE)
    rows = _chats(3)  # row 0: a system turn, its first reply starts at token 16; rows 1, 2: at token 12
    enc = D.encode(rows, _splits(rows), tok, task="causal-lm", max_length=13)
    assert enc.cut == [0] and enc.empty == []
    assert all(all(y == -100 for y in enc[i]["labels"]) for i in enc.cut)
    assert len(enc.without(enc.cut)) == len(rows) - len(enc.cut)
    empty = [{"messages": [{"role": "user", "content": "hello"}]}]
    assert D.encode(empty, _splits(empty), tok, task="causal-lm", max_length=64).empty == [0]
    # alpaca rows: the template's ~30-token prompt leaves nothing of the response at --max-length 16 (the issue's case)
    alpaca = [{"instruction": "rate the film", "input": "the film is good", "output": "good"},
              {"instruction": "say one word", "input": "", "output": ""}]  # fmt: skip
    enc = D.encode(alpaca, _splits(alpaca), tok, task="causal-lm", max_length=16)
    assert enc.cut == [0, 1] and enc.empty == []  # an empty output still has its EOS to learn
    assert D.encode(alpaca, _splits(alpaca), tok, task="causal-lm", max_length=256).no_target == []


# --- packing ------------------------------------------------------------------------------------------------------
def test_pack_keeps_every_example_whole_within_max_length():
    feats = D.Encoded([{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in
                       (5, 9, 3, 7, 2, 8, 4)])  # fmt: skip
    packed = D.pack(feats, 12)
    assert all(len(r["input_ids"]) <= 12 for r in packed.features)
    assert sorted(len(r["input_ids"]) for r in packed.features) == sorted([12, 12, 12, 2])  # 38 tokens, 4 rows
    starts = sum(r["position_ids"].count(0) for r in packed.features)
    assert starts == 7
    for r in packed.features:
        for i, p in enumerate(r["position_ids"]):
            if p == 0:
                assert r["labels"][i] == -100


def test_packed_rows_give_the_unpacked_logits_and_loss():
    tok = _tokenizer(CHAT_TEMPLATE)
    rows = _chats(6)
    enc = D.encode(rows, _splits(rows), tok, task="causal-lm", max_length=64)
    packed = D.pack(enc, 64)
    assert len(packed) < len(enc)
    model = _llama()
    model.config.use_cache = False
    batch = D.PackedCollator(0)(packed.features)
    assert "attention_mask" not in batch
    with torch.no_grad():
        out = model(**batch)
        total, count = 0.0, 0
        for f in enc.features:
            ids = torch.tensor([f["input_ids"]])
            labels = torch.tensor([f["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
        # logits of the first example of the first row equal its logits alone
        row = packed.features[0]
        first = row["position_ids"].index(0, 1) if 0 in row["position_ids"][1:] else len(row["position_ids"])
        alone = model(input_ids=torch.tensor([row["input_ids"][:first]])).logits
        second_len = (row["position_ids"] + [0]).index(0, first + 1) - first
        second = model(input_ids=torch.tensor([row["input_ids"][first : first + second_len]])).logits
    torch.testing.assert_close(out.logits[0, :first], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits[0, first : first + second_len], second[0], atol=1e-5, rtol=1e-4)
    assert float(out.loss) == pytest.approx(total / count, rel=1e-4)


def test_the_packing_probe_refuses_a_model_whose_attention_crosses_examples():
    from adapterkit.cli.models import ModelError, check_packing

    check_packing(_llama())  # masks from position ids: fine

    class Leaky(torch.nn.Module):  # a running mean over the whole row: every token sees every earlier example
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(40, 8)

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.emb

        def forward(self, input_ids, position_ids=None, use_cache=None):
            h = self.emb(input_ids).cumsum(1)
            return type("Out", (), {"logits": h})()

    with pytest.raises(ModelError, match="train without --packing"):
        check_packing(Leaky())


# --- generate -----------------------------------------------------------------------------------------------------
def test_generate_prompts_of_a_chat_adapter_use_the_chat_template():
    from adapterkit.cli.chat import chat_prompt

    tok = _tokenizer(CHAT_TEMPLATE)
    run = {"columns": {"messages": "messages"}}
    assert chat_prompt(tok, "hello", run) == "<s><|user|> hello <|end|> <|assistant|> "
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert (
        chat_prompt(tok, json.dumps(messages), {})
        == "<s><|system|> be brief <|end|> <|user|> hello <|end|> <|assistant|> "
    )
    assert (
        chat_prompt(tok, "hello", {"columns": {"instruction": "instruction"}}) is None
    )  # alpaca adapters: unchanged
    assert chat_prompt(tok, "hello", run, raw=True) is None
    with pytest.raises(D.DataError, match="--chat-template"):
        chat_prompt(_tokenizer(None), "hello", run)
    assert chat_prompt(_tokenizer(None), "hello", {**run, "chat_template": CHAT_TEMPLATE}).startswith(
        "<s><|user|>"
    )


# --- through the CLI ----------------------------------------------------------------------------------------------
@needs_flags
def test_train_on_chat_data_records_the_template_and_default_max_length(files, tmp_path):
    out = tmp_path / "chat"
    _ok("train", "--model", files["nochat"], "--data", files["chat"], *QUICK, "--chat-template", files["template"],
        "--out", out)  # fmt: skip
    run = json.loads((out / "run.json").read_text())
    assert run["columns"] == {"messages": "messages"} and run["chat_template"] == CHAT_TEMPLATE
    assert run["max_length"] == 256  # alpaca-lora's cutoff_len
    msg = _fail("train", "--model", files["nochat"], "--data", files["chat"], *QUICK, "--out", tmp_path / "x")
    assert "--chat-template" in msg
    from adapterkit.cli.ops import run_generate

    texts = run_generate(out, ["hello", json.dumps([{"role": "user", "content": "rate the film"}])], model=None,
                         template=None, raw=False, max_new_tokens=3, temperature=0.0, top_p=1.0, seed=0)  # fmt: skip
    assert len(texts) == 2
    _ok("generate", out, "--prompt", "rate the film", "--max-new-tokens", "2")


@needs_flags
def test_truncating_every_response_token_warns_and_strict_fails(files, tmp_path):
    out = _ok("train", "--model", files["llama"], "--data", files["chat"], *QUICK, "--max-length", "13",
              "--out", tmp_path / "w")  # fmt: skip
    assert "lose every response token to --max-length 13" in out and "dropped" in out
    msg = _fail("train", "--model", files["llama"], "--data", files["chat"], *QUICK, "--max-length", "13", "--strict",
                "--out", tmp_path / "s")  # fmt: skip
    assert "--strict" in msg and "--max-length 13" in msg
    msg = _fail("train", "--model", files["llama"], "--data", files["chat"], *QUICK, "--max-length", "3",
                "--out", tmp_path / "n")  # fmt: skip
    assert "no training example is left" in msg


@needs_flags
def test_packing_trains_and_refuses_other_tasks(files, tmp_path):
    out = _ok("train", "--model", files["llama"], "--data", files["chat"], *QUICK, "--packing", "--max-length", "64",
              "--out", tmp_path / "p")  # fmt: skip
    assert "packing: 18 training examples in" in out
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert metrics["train_rows"] < metrics["train_examples"] == 18
    msg = _fail("train", "--model", files["llama"], "--data", files["chat"], *QUICK, "--task", "seq2seq",
                "--packing", "--out", tmp_path / "q")  # fmt: skip
    assert "--packing" in msg
    msg = _fail("train", "--model", files["llama"], "--data", files["chat"], *QUICK, "--method", "prompt_tuning",
                "--packing", "--out", tmp_path / "r")  # fmt: skip
    assert "--packing cannot train prompt_tuning" in msg


def _capture_trainer(monkeypatch) -> list:
    T = importlib.import_module("adapterkit.cli.train")  # not `from adapterkit.cli import train`: the command

    seen = []
    original = T.AdapterTrainer.train

    def train(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(T.AdapterTrainer, "train", train)
    return seen


@needs_flags
def test_optim_group_by_length_and_early_stopping_reach_the_trainer(files, tmp_path, monkeypatch):
    from transformers import EarlyStoppingCallback

    seen = _capture_trainer(monkeypatch)
    _ok("train", "--model", files["llama"], "--data", files["chat"], *QUICK, "--max-steps", "6", "--optim", "adafactor",
        "--group-by-length", "--early-stopping", "1", "--eval-steps", "1", "--lr", "1e-6", "--out", tmp_path / "o")  # fmt: skip
    trainer = seen[-1]
    from transformers.trainer_pt_utils import LengthGroupedSampler

    assert trainer.args.optim == "adafactor"
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    assert (
        type(
            trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        ).__name__
        == "Adafactor"
    )
    assert any(isinstance(c, EarlyStoppingCallback) for c in trainer.callback_handler.callbacks)
    msg = _fail(
        "train",
        "--model",
        files["llama"],
        "--data",
        files["chat"],
        *QUICK,
        "--optim",
        "sgd",
        "--out",
        tmp_path / "x",
    )
    assert "adamw_8bit" in msg


@needs_flags
@needs_bnb
def test_adamw_8bit_uses_bitsandbytes(files, tmp_path, monkeypatch):
    seen = _capture_trainer(monkeypatch)
    _ok("train", "--model", files["llama"], "--data", files["chat"], *QUICK, "--max-steps", "1", "--optim",
        "adamw_8bit", "--out", tmp_path / "o")  # fmt: skip
    opt = seen[-1].optimizer
    assert "bitsandbytes" in type(getattr(opt, "optimizer", opt)).__module__


@needs_flags
def test_report_to_without_the_package_names_the_install(monkeypatch):
    """A missing integration is one error with its install command (the success paths, with the packages of the
    `report` extra installed: tests/test_report_to.py)."""
    import importlib.util

    from adapterkit.cli.train import _reporting

    real = importlib.util.find_spec
    missing = {"tensorboard", "tensorboardX", "wandb"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    for which, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        with pytest.raises(ImportError, match=f"pip install {package}"):
            _reporting({"report_to": which})
    assert _reporting({"report_to": "none"}) == []
    with pytest.raises(ValueError, match="use one of"):
        _reporting({"report_to": "mlflow"})


@needs_flags
def test_fp16_and_bf16_base_weights_train_lora_in_fp32(files, tmp_path, monkeypatch):
    seen = _capture_trainer(monkeypatch)
    _ok("train", "--model", files["llama"], "--data", files["chat"], *QUICK, "--dtype", "bf16", "--fp16",
        "--gradient-checkpointing", "--out", tmp_path / "h")  # fmt: skip
    trainer = seen[-1]
    assert trainer.args.fp16 and trainer.model.dtype == torch.bfloat16
    assert trainer.model.is_gradient_checkpointing
    assert {p.dtype for p in trainer.adapters.parameters("default")} == {torch.float32}
    msg = _fail("train", "--model", files["llama"], "--data", files["chat"], *QUICK, "--dtype", "fp8",
                "--out", tmp_path / "x")  # fmt: skip
    assert "bf16, fp16, fp32" in msg


HAS_AO = importlib.util.find_spec("torchao") is not None


@needs_flags
@pytest.mark.parametrize(
    ("backend", "scheme"),
    [pytest.param("bitsandbytes", "nf4", marks=needs_bnb), pytest.param("bitsandbytes", "int8", marks=needs_bnb),
     pytest.param("torchao", "nf4", marks=pytest.mark.skipif(not HAS_AO, reason="torchao is not installed"))],
)  # fmt: skip
def test_quantize_trains_on_a_quantized_base(files, tmp_path, monkeypatch, backend, scheme):
    import inspect

    from adapterkit.cli.ops import load_adapted, run_eval
    from adapterkit.quant import is_quantized

    seen = _capture_trainer(monkeypatch)
    _ok("train", "--model", files["llama"], "--data", files["chat"], *QUICK, "--quantize", scheme, "--quant-backend",
        backend, "--gradient-checkpointing", "--out", tmp_path / scheme)  # fmt: skip
    trainer = seen[-1]
    quantized = [n for n, m in trainer.model.named_modules() if is_quantized(m)]
    assert len(quantized) == 14  # 7 projections x 2 layers; lm_head stays dense
    assert trainer.model.is_gradient_checkpointing
    run = json.loads((tmp_path / scheme / "run.json").read_text())
    assert run["quantize"] == scheme
    metrics = json.loads((tmp_path / scheme / "metrics.json").read_text())
    assert all(p["loss"] > 0 for p in metrics["history"]["train"])
    if "as_trained" in inspect.signature(load_adapted).parameters:  # eval quantizes the base as training did
        again = run_eval(tmp_path / scheme, model=None, data=None, dev=None, task=None, batch_size=64, max_length=None,
                         num_labels=None)  # fmt: skip
        assert again["loss"] == pytest.approx(metrics["final_eval"]["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def prequantized(files, tmp_path_factory) -> Path:
    """The tiny LLaMA as transformers saves a bitsandbytes NF4 model (``quantization_config`` in config.json)."""
    if not HAS_BNB:
        pytest.skip("bitsandbytes is not installed (pip install 'adapterkit[quant]')")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = AutoModelForCausalLM.from_pretrained(
        files["llama"], quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        device_map="cpu",
    )  # fmt: skip
    path = tmp_path_factory.mktemp("q") / "q"
    q.save_pretrained(path)
    _tokenizer(CHAT_TEMPLATE).save_pretrained(path)
    return path


def test_a_checkpoint_saved_quantized_loads_as_a_base(files, prequantized, tmp_path):
    """transformers' Trainer refuses a quantized model without peft adapters; adapterkit's count."""
    from adapterkit.cli.ops import run_generate

    _ok("train", "--model", prequantized, "--data", files["chat"], *QUICK, "--out", tmp_path / "o")
    assert (tmp_path / "o" / "adapter.safetensors").is_file()
    texts = run_generate(tmp_path / "o", ["hello"], model=None, template=None, raw=False, max_new_tokens=2,
                         temperature=0.0, top_p=1.0, seed=0)  # fmt: skip
    assert len(texts) == 1


@pytest.mark.slow
def test_a_checkpoint_saved_quantized_trains_in_the_quiet_cli(files, prequantized, tmp_path):
    """The CLI hides quantization libraries unless a quantized base is used (in a process of its own, without
    ADAPTERKIT_QUANT_LIBS): a bitsandbytes checkpoint reveals bitsandbytes only."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ADAPTERKIT_QUANT_LIBS"}
    cmd = [sys.executable, "-m", "adapterkit.cli", "train", "--model", prequantized, "--data", files["chat"], *QUICK,
           "--out", tmp_path / "o"]  # fmt: skip
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "o" / "adapter.safetensors").is_file()
    assert "Failed to load" not in proc.stderr  # torchao stays hidden: the checkpoint is bitsandbytes'


@needs_flags
def test_quantize_refuses_a_checkpoint_saved_quantized(files, prequantized, tmp_path):
    msg = _fail("train", "--model", prequantized, "--data", files["chat"], *QUICK, "--quantize", "nf4",
                "--out", tmp_path / "x")  # fmt: skip
    assert "saved already quantized" in msg and "drop --quantize" in msg


def test_text_column_messages_trains_on_the_chat_template(files, tmp_path):
    """Before: ``--text-column messages`` trained on the Python repr of the list."""
    out = tmp_path / "m"
    _ok(
        "train",
        "--model",
        files["llama"],
        "--data",
        files["chat"],
        *QUICK,
        "--text-column",
        "messages",
        "--out",
        out,
    )
    run = json.loads((out / "run.json").read_text())
    assert run["columns"] == {"messages": "messages"}
    assert "accuracy" in _ok("eval", out)  # the dev set is rebuilt with the same template


# --- end to end ---------------------------------------------------------------------------------------------------
@needs_flags
@needs_bnb
def test_qlora_on_chat_data_with_packing_then_generate_merge_export_and_peft_loads_it(files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "qlora"
    _ok("train", "--model", files["llama"], "--data", files["chat"], *QUICK, "--max-steps", "3", "--quantize", "nf4",
        "--packing", "--max-length", "64", "--targets", "all-linear", "--opt", "r=4", "--opt", "alpha=8",
        "--opt", "init_weights=false", "--out", out)  # fmt: skip
    run = json.loads((out / "run.json").read_text())
    assert run["quantize"] == "nf4" and run["packing"] and run["columns"] == {"messages": "messages"}
    assert "<|assistant|>" not in _ok("generate", out, "--prompt", "rate the film the film is good",
                                      "--max-new-tokens", "3")  # fmt: skip
    _ok("merge", out, "--out", tmp_path / "merged")
    _ok("export", out, "--format", "peft", "--out", tmp_path / "peft")

    ids = torch.tensor([[2, 5, 8, 9, 10, 14, 6, 21]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(files["llama"]).eval()
        plain = base(input_ids=ids).logits
        ours = AutoModelForCausalLM.from_pretrained(files["llama"]).eval()
        ak.attach(ours).load(out, activate=True)
        expected = ours(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
        via_peft = peft_model(input_ids=ids).logits
    assert not torch.allclose(expected, plain, atol=1e-4)  # the adapter changes the output
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(via_peft, expected, atol=1e-5, rtol=1e-5)
