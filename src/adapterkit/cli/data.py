"""Data for the CLI: read local tables, pick columns, split, and tokenize into Trainer-ready datasets.

Files: ``.csv``, ``.tsv`` (GLUE layouts recognised, see :data:`GLUE_HEADERLESS`), ``.json`` (a list of
objects, or an object holding one such list) and ``.jsonl`` (one object per line). ``--data`` may also be
a directory holding ``train.<ext>`` and optionally ``dev``/``dev_matched``/``validation``/``val``.

Columns are chosen by flags (``--text-column``, ``--label-column``, ...) or found by name:

* classify: text ``sentence1``+``sentence2``, ``question1``+``question2``, ``#1 String``+``#2 String``
  (MRPC), ``question``+``sentence`` (QNLI), ``premise``+``hypothesis``, ``sentence``, ``text``; label
  ``label``, ``gold_label``, ``is_duplicate``, ``Quality`` (MRPC), ``score`` (STS-B, regression).
* causal-lm: alpaca-style ``instruction`` / ``input`` / ``output`` rendered with a prompt template
  (loss on the response tokens only unless ``--train-on-prompt``), or one plain ``text`` column.
* seq2seq: ``source``/``target``, ``input``/``output``, ``question``/``answer``, ``document``/``summary``,
  or alpaca-style rows (the rendered prompt is the source, ``output`` the target).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["DataError", "DataSpec", "Splits", "TEMPLATES", "load_splits", "read_table", "encode", "Encoded"]

SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")
DEV_STEMS = ("dev", "dev_matched", "validation", "valid", "val", "eval")

# GLUE's CoLA files have no header: source, label, original judgement, sentence.
GLUE_HEADERLESS = ("source", "label", "original_label", "sentence")

TEXT_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("#1 String", "#2 String"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("sentence",),
    ("text",),
)
LABEL_CANDIDATES = ("label", "labels", "gold_label", "is_duplicate", "Quality", "score", "target")
SEQ2SEQ_CANDIDATES = (("source", "target"), ("input", "output"), ("question", "answer"), ("document", "summary"))

# Prompt templates for instruction data (alpaca-lora's templates/alpaca.json wording).
TEMPLATES: dict[str, tuple[str, str]] = {
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "plain": ("{instruction}\n{input}\n", "{instruction}\n"),
}


class DataError(ValueError):
    """A data file, column or split problem; the message names what to change."""


@dataclasses.dataclass
class DataSpec:
    """Where the data is and how to read it (saved in ``run.json`` so ``eval`` can rebuild the dev set)."""

    data: str
    task: str
    dev: str | None = None
    text_columns: list[str] | None = None
    label_column: str | None = None
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    template: str = "alpaca"
    dev_fraction: float = 0.1
    train_size: int | None = None
    dev_size: int | None = None
    seed: int = 42

    def to_dict(self, *, absolute: bool = False) -> dict[str, Any]:
        """The fields; with ``absolute``, ``data`` and ``dev`` as absolute paths (run.json: ``adapterkit eval``
        may run from another directory)."""
        out = dataclasses.asdict(self)
        if absolute:
            for key in ("data", "dev"):
                if out[key] is not None:
                    out[key] = str(Path(out[key]).resolve())
        return out


@dataclasses.dataclass
class Splits:
    """Rows of the train and dev sets, plus what was decided about columns and labels."""

    train: list[dict[str, str]]
    dev: list[dict[str, str]]
    dev_source: str  # a file, or "held out from <file>"
    columns: dict[str, Any]  # resolved columns (text/label or instruction/input/output or source/target)
    labels: list[str] | None = None  # classify: index -> label name; None for regression and generation
    regression: bool = False


# --- reading -------------------------------------------------------------------------------------
def read_table(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV/TSV/JSON/JSONL file as dicts of strings (values kept as read for JSON).

    Raises:
        DataError: unknown suffix, unreadable file, empty file, or JSON that is not a list of objects.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"cannot read {str(path)!r}: use a .csv, .tsv, .json or .jsonl file")
    if suffix in (".csv", ".tsv"):
        rows = _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    else:
        rows = _read_json(path, lines=suffix == ".jsonl")
    if not rows:
        raise DataError(f"{str(path)!r} holds no rows")
    return rows


def _read_delimited(path: Path, delimiter: str) -> list[dict[str, str]]:
    # GLUE TSVs contain unbalanced quotes: read them verbatim. utf-8-sig drops MRPC's byte order mark.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, encoding="utf-8-sig", newline="") as f:
        records = list(csv.reader(f, delimiter=delimiter, quoting=quoting))
    records = [r for r in records if r]
    if not records:
        return []
    header = records[0]
    if _headerless_cola(header):
        header, body = list(GLUE_HEADERLESS), records
    else:
        body = records[1:]
    width = len(header)
    rows = []
    for i, rec in enumerate(body, start=2):
        if len(rec) != width:
            raise DataError(
                f"{path}:{i} has {len(rec)} fields but the header has {width} ({', '.join(header)}); "
                "fix the row or the delimiter"
            )
        rows.append(dict(zip(header, rec)))
    return rows


def _headerless_cola(first: Sequence[str]) -> bool:
    """GLUE CoLA layout: 4 fields, no header, label 0/1 in the second."""
    return len(first) == 4 and first[1] in ("0", "1") and first[2] in ("", "*", "?", "??")


def _read_json(path: Path, *, lines: bool) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            if lines:
                data = [json.loads(line) for line in f if line.strip()]
            else:
                data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{str(path)!r} is not valid JSON{' lines' if lines else ''}: {e}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{str(path)!r}: expected a list of objects (or an object holding exactly one list)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{str(path)!r}: expected a list of objects, one per example")
    return data


def _find_in_dir(directory: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for suffix in SUFFIXES:
            p = directory / f"{stem}{suffix}"
            if p.is_file():
                return p
    return None


def resolve_files(data: str | Path, dev: str | Path | None) -> tuple[Path, Path | None]:
    """The train file and the dev file (None: hold out part of train) for ``--data`` / ``--dev``."""
    data = Path(data)
    if data.is_dir():
        train = _find_in_dir(data, ("train",))
        if train is None:
            raise DataError(f"{str(data)!r} has no train.tsv/.csv/.jsonl/.json; pass the training file itself")
        found_dev = _find_in_dir(data, DEV_STEMS)
    elif data.is_file():
        train, found_dev = data, None
    else:
        raise DataError(f"--data {str(data)!r} does not exist")
    if dev is not None:
        found_dev = Path(dev)
        if not found_dev.is_file():
            raise DataError(f"--dev {str(dev)!r} does not exist")
    return train, found_dev


# --- columns -------------------------------------------------------------------------------------
def _pick(columns: Sequence[str], wanted: Sequence[str] | None, candidates: Sequence[Sequence[str]], what: str,
          flag: str, source: str) -> list[str]:  # fmt: skip
    if wanted:
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise DataError(f"{source} has no column {missing[0]!r} ({flag}); its columns: {', '.join(columns)}")
        return list(wanted)
    for cand in candidates:
        if all(c in columns for c in cand):
            return list(cand)
    raise DataError(
        f"cannot tell which column holds the {what} in {source} (columns: {', '.join(columns)}); pass {flag}"
    )


def resolve_columns(spec: DataSpec, columns: Sequence[str], source: str) -> dict[str, Any]:
    """Which columns carry what, for ``spec.task``."""
    if spec.task == "classify":
        text = _pick(columns, spec.text_columns, TEXT_CANDIDATES, "text", "--text-column", source)
        if len(text) > 2:
            raise DataError(f"at most two text columns (a sentence pair), got {text}")
        wanted = [spec.label_column] if spec.label_column else None
        label = _pick(columns, wanted, [(c,) for c in LABEL_CANDIDATES], "label", "--label-column", source)[0]
        return {"text": text, "label": label}
    if spec.task == "causal-lm":
        if spec.instruction_column in columns and spec.output_column in columns:
            return {
                "instruction": spec.instruction_column,
                "input": spec.input_column,
                "output": spec.output_column,
            }
        text = _pick(columns, spec.text_columns, [("text",)], "text", "--text-column", source)
        if len(text) != 1:
            raise DataError(f"causal-lm takes one text column, got {text}")
        return {"text": text[0]}
    # seq2seq
    if spec.text_columns:
        if len(spec.text_columns) != 2:
            raise DataError("seq2seq takes --text-column SOURCE --text-column TARGET (two columns)")
        src_tgt = _pick(columns, spec.text_columns, [], "source/target", "--text-column", source)
        return {"source": src_tgt[0], "target": src_tgt[1]}
    if spec.instruction_column in columns and spec.output_column in columns:
        return {"instruction": spec.instruction_column, "input": spec.input_column, "output": spec.output_column}
    src_tgt = _pick(
        columns, None, SEQ2SEQ_CANDIDATES, "source/target", "--text-column SOURCE --text-column TARGET", source
    )
    return {"source": src_tgt[0], "target": src_tgt[1]}


def _label_names(
    train: list[dict[str, Any]], dev: list[dict[str, Any]], column: str
) -> tuple[list[str] | None, bool]:
    """Label names (index order) and whether the task is regression (float labels, e.g. STS-B)."""
    values = [str(r[column]).strip() for r in train]
    if all(_is_int(v) for v in values):
        top = max(int(v) for v in values)
        if min(int(v) for v in values) < 0:
            raise DataError(f"integer labels in {column!r} must be 0..N-1, found {min(int(v) for v in values)}")
        names = [str(i) for i in range(top + 1)]
    elif all(_is_float(v) for v in values):
        return None, True
    else:
        names = sorted(set(values))
    unseen = sorted({str(r[column]).strip() for r in dev} - set(names))
    if unseen and not all(_is_int(u) for u in unseen):
        raise DataError(f"the dev set has labels the training set lacks: {unseen[:5]}")
    return names, False


def _is_int(v: str) -> bool:
    try:
        int(v)
    except ValueError:
        return False
    return True


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _has_label(row: dict[str, Any], column: str) -> bool:
    value = row.get(column)
    return value is not None and str(value).strip() != ""


def load_splits(spec: DataSpec) -> Splits:
    """Read, shuffle (seeded), split and subsample the data of ``spec``.

    With no dev file, ``dev_fraction`` of the shuffled training rows is held out (at least one row).
    ``train_size`` / ``dev_size`` keep the first rows after shuffling.
    """
    train_path, dev_path = resolve_files(spec.data, spec.dev)
    rows = read_table(train_path)
    rng = random.Random(spec.seed)
    rng.shuffle(rows)
    if dev_path is not None:
        dev, dev_source = read_table(dev_path), str(dev_path)
    else:
        if not 0.0 < spec.dev_fraction < 1.0:
            raise DataError(f"--dev-fraction must be between 0 and 1, got {spec.dev_fraction}")
        n_dev = max(1, round(len(rows) * spec.dev_fraction))
        if n_dev >= len(rows):
            raise DataError(f"{train_path} has {len(rows)} rows: too few to hold out a dev set; pass --dev FILE")
        dev, rows = rows[:n_dev], rows[n_dev:]
        dev_source = f"{spec.dev_fraction:.0%} held out from {train_path}"
    if spec.train_size is not None:
        rows = rows[: spec.train_size]
    if spec.dev_size is not None:
        dev = dev[: spec.dev_size]
    columns = resolve_columns(spec, list(rows[0]), str(train_path))
    labels, regression = None, False
    if spec.task == "classify":
        label = columns["label"]
        labelled = [r for r in rows if _has_label(r, label)]
        if not labelled:
            raise DataError(
                f"every row of {train_path} has an empty label in column {label!r}: fill in the labels, or pass "
                "--label-column with the column that holds them"
            )
        rows = labelled
        dev = [r for r in dev if _has_label(r, label)]  # unlabelled rows (test sets)
        if not dev:
            raise DataError(
                f"the dev set ({dev_source}) has no labelled rows in column {label!r}: pass --dev with a labelled file"
            )
        labels, regression = _label_names(rows, dev, label)
    return Splits(rows, dev, dev_source, columns, labels, regression)


# --- prompts and tokenization ---------------------------------------------------------------------
def render_prompt(template: str, instruction: str, input_text: str = "") -> str:
    """The prompt for an instruction (and optional input) with a named template or a format string.

    A custom template is a string with ``{instruction}`` and optionally ``{input}``.
    """
    with_input, without_input = TEMPLATES.get(template, (template, template))
    chosen = with_input if input_text.strip() else without_input
    try:
        return chosen.format(instruction=instruction, input=input_text)
    except (KeyError, IndexError) as e:
        raise DataError(
            f"prompt template {template!r} uses an unknown field {e}; use {{instruction}} and {{input}}"
        ) from None


def prompt_and_response(row: dict[str, Any], columns: dict[str, Any], template: str) -> tuple[str, str]:
    """(prompt, response) of one generation example."""
    if "instruction" in columns:
        prompt = render_prompt(
            template, str(row[columns["instruction"]]), str(row.get(columns["input"], "") or "")
        )
        return prompt, str(row[columns["output"]])
    if "source" in columns:
        return str(row[columns["source"]]), str(row[columns["target"]])
    return "", str(row[columns["text"]])


class Encoded(torch.utils.data.Dataset):
    """Tokenized examples: a list of feature dicts (lists of ints, ``labels`` an int/float or a list)."""

    def __init__(self, features: list[dict[str, Any]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]


def special_ids(tokenizer: Any) -> tuple[int | None, int]:
    """(eos id, pad id): BERT-style tokenizers have no EOS and use [SEP]; pad falls back to EOS."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an end-of-sequence token")
    return eos, pad


def encode(rows: list[dict[str, Any]], splits: Splits, tokenizer: Any, *, task: str, max_length: int,
           template: str = "alpaca", train_on_prompt: bool = False) -> Encoded:  # fmt: skip
    """Tokenize rows for ``task`` (truncated to ``max_length``; padding happens in the collator)."""
    cols = splits.columns
    if task == "classify":
        first = [str(r[cols["text"][0]]).strip() for r in rows]
        second = [str(r[cols["text"][1]]).strip() for r in rows] if len(cols["text"]) == 2 else None
        enc = tokenizer(first, second, truncation=True, max_length=max_length)
        feats = [{k: enc[k][i] for k in enc} for i in range(len(rows))]
        for f, r in zip(feats, rows):
            raw = str(r[cols["label"]]).strip()
            f["labels"] = float(raw) if splits.regression else _label_index(raw, splits.labels)
        return Encoded(feats)
    if task == "causal-lm":
        return Encoded([_causal_features(r, cols, tokenizer, max_length, template, train_on_prompt) for r in rows])
    return Encoded([_seq2seq_features(r, cols, tokenizer, max_length, template) for r in rows])


def _label_index(raw: str, names: list[str] | None) -> int:
    assert names is not None
    if raw in names:
        return names.index(raw)
    if _is_int(raw) and 0 <= int(raw) < len(names):
        return int(raw)
    raise DataError(f"label {raw!r} is not one of the training labels {names[:10]}")


def _causal_features(row: dict[str, Any], cols: dict[str, Any], tokenizer: Any, max_length: int, template: str,
                     train_on_prompt: bool) -> dict[str, Any]:  # fmt: skip
    eos, _ = special_ids(tokenizer)
    prompt, response = prompt_and_response(row, cols, template)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if not prompt_ids and tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id]
    tail = [eos] if eos is not None else []
    ids = (prompt_ids + response_ids + tail)[:max_length]
    labels = list(ids)
    if not train_on_prompt:
        n = min(len(prompt_ids), len(ids))
        labels[:n] = [-100] * n
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _seq2seq_features(row: dict[str, Any], cols: dict[str, Any], tokenizer: Any, max_length: int,
                      template: str) -> dict[str, Any]:  # fmt: skip
    source, target = prompt_and_response(row, cols, template)
    enc = tokenizer(source, truncation=True, max_length=max_length)
    labels = tokenizer(text_target=target, truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def collator(tokenizer: Any, task: str) -> Any:
    """Dynamic padding: labels padded with -100 for generation tasks."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task == "classify":
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
