"""Data for the CLI: read local tables, pick columns, split, and tokenize into Trainer-ready datasets.

Files: ``.csv``, ``.tsv`` (GLUE layouts recognised, see :data:`GLUE_HEADERLESS`), ``.json`` (a list of
objects, or an object holding one such list) and ``.jsonl`` (one object per line). ``--data`` may also be
a directory holding ``train.<ext>`` and optionally ``dev``/``dev_matched``/``validation``/``val``.

Columns are chosen by flags (``--text-column``, ``--label-column``, ...) or found by name:

* classify: text ``sentence1``+``sentence2``, ``question1``+``question2``, ``#1 String``+``#2 String``
  (MRPC), ``question``+``sentence`` (QNLI), ``premise``+``hypothesis``, ``sentence``, ``text``; label
  ``label``, ``gold_label``, ``is_duplicate``, ``Quality`` (MRPC), ``score`` (STS-B, regression).
* causal-lm: alpaca-style ``instruction`` / ``input`` / ``output`` rendered with a prompt template
  (loss on the response tokens only unless ``--train-on-prompt``); chat data: a column holding a list of
  ``{"role", "content"}`` messages (``messages``, ``conversations``, ... or any column whose values are such
  lists; ShareGPT's ``{"from", "value"}`` is read too) rendered with the tokenizer's chat template (or
  ``--chat-template FILE``), loss on the assistant turns only unless ``--train-on-prompt``; or one plain ``text``
  column.
* seq2seq: ``source``/``target``, ``input``/``output``, ``question``/``answer``, ``document``/``summary``,
  or alpaca-style rows (the rendered prompt is the source, ``output`` the target).

Multi-task data (:data:`TASK_KEY`): several datasets, ``--data NAME=PATH`` repeated or comma-separated
(:func:`parse_sources`; each dataset read as above with its own columns, its own dev file or held-out part,
``--train-size``/``--dev-size`` per dataset), or one table whose ``--task-column`` names each row's task. Task ids
are the datasets' order, or the sorted task names of a task column. Classification tasks share one label space:
the union of their label names (tasks whose labels are named alike, GLUE's 0/1, share those classes; distinct
names get distinct classes). Every row keeps its task name under :data:`TASK_KEY`; :func:`encode` tokenizes each
task with its own columns and adds ``task_ids`` features when asked.
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

__all__ = [
    "DataError", "DataSpec", "Splits", "TEMPLATES", "load_splits", "read_table", "encode", "Encoded", "pack",
    "PackedCollator", "is_messages", "read_chat_template", "TASK_KEY", "parse_sources", "task_rows",
]  # fmt: skip

SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")
DEV_STEMS = ("dev", "dev_matched", "validation", "valid", "val", "eval")

# the key under which multi-task rows keep their task name (not a column of the data)
TASK_KEY = "__task__"

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
MESSAGES_CANDIDATES = ("messages", "conversations", "conversation", "chat", "dialog")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "bot": "assistant", "model": "assistant", "tool": "tool"}  # fmt: skip

# A ChatML template (``--chat-template chatml``) for tokenizers that have none.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN_CHAT_TEMPLATES = {"chatml": CHATML}

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
    chat_template: str | None = None  # Jinja text given with --chat-template (None: the tokenizer's own)
    sources: dict[str, str] | None = None  # multi-task: task name -> its data (file or directory), task id = order
    dev_sources: dict[str, str] | None = (
        None  # multi-task: task name -> its dev file (others: their own / held out)
    )
    task_column: str | None = None  # multi-task: the column of ``data`` that names each row's task

    def to_dict(self, *, absolute: bool = False) -> dict[str, Any]:
        """The fields; with ``absolute``, ``data`` and ``dev`` (and the per-task sources) as absolute paths
        (run.json: ``adapterkit eval`` may run from another directory)."""
        out = dataclasses.asdict(self)
        if absolute:
            for key in ("data", "dev"):
                if out[key] is not None and not (key == "data" and self.sources):
                    out[key] = str(Path(out[key]).resolve())
            for key in ("sources", "dev_sources"):
                if out[key]:
                    out[key] = {k: str(Path(v).resolve()) for k, v in out[key].items()}
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
    chat_template: str | None = None  # chat data: the template given with --chat-template (None: the tokenizer's)
    tasks: list[str] | None = None  # multi-task: task names, index = task id (rows keep theirs under TASK_KEY)
    task_columns: dict[str, dict[str, Any]] | None = None  # several datasets: each task's own resolved columns


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


def is_messages(value: Any) -> bool:
    """Whether ``value`` is a chat: a non-empty list of ``{"role", "content"}`` (or ShareGPT ``{"from", "value"}``)
    dicts."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and (("role" in m and "content" in m) or ("from" in m and "value" in m))
                for m in value)
    )  # fmt: skip


def _messages_column(columns: Sequence[str], row: dict[str, Any] | None) -> str | None:
    """The column of ``row`` holding a chat (a known name first, then any column), or None."""
    if row is None:
        return None
    for name in [*[c for c in MESSAGES_CANDIDATES if c in columns], *columns]:
        if is_messages(row.get(name)):
            return name
    return None


def _refuse_chat(task: str, chosen: Sequence[str], row: dict[str, Any] | None, flag: str) -> None:
    for c in chosen:
        if row is not None and isinstance(row.get(c), list):
            raise DataError(
                f"column {c!r} ({flag}) holds lists (chat messages?), not text: chat data trains causal-lm models "
                f"(--task causal-lm); {task} needs text columns"
            )


def resolve_columns(spec: DataSpec, columns: Sequence[str], source: str,
                    row: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Which columns carry what, for ``spec.task`` (``row``: the first row, to recognise chat columns)."""
    if spec.task == "classify":
        text = _pick(columns, spec.text_columns, TEXT_CANDIDATES, "text", "--text-column", source)
        if len(text) > 2:
            raise DataError(f"at most two text columns (a sentence pair), got {text}")
        _refuse_chat("classify", text, row, "--text-column")
        wanted = [spec.label_column] if spec.label_column else None
        label = _pick(columns, wanted, [(c,) for c in LABEL_CANDIDATES], "label", "--label-column", source)[0]
        return {"text": text, "label": label}
    if spec.task == "causal-lm":
        if spec.text_columns:
            text = _pick(columns, spec.text_columns, [], "text", "--text-column", source)
            if len(text) != 1:
                raise DataError(f"causal-lm takes one text column, got {text}")
            if row is not None and is_messages(row.get(text[0])):
                return {"messages": text[0]}
            if row is not None and isinstance(row.get(text[0]), (list, dict)):
                raise DataError(
                    f"column {text[0]!r} of {source} holds {type(row[text[0]]).__name__}s, not text nor chat "
                    'messages (a list of {"role": ..., "content": ...}): pass another --text-column'
                )
            return {"text": text[0]}
        if spec.instruction_column in columns and spec.output_column in columns:
            return {
                "instruction": spec.instruction_column,
                "input": spec.input_column,
                "output": spec.output_column,
            }
        chat = _messages_column(columns, row)
        if chat is not None:
            return {"messages": chat}
        text = _pick(columns, None, [("text",)], "text", "--text-column", source)
        return {"text": text[0]}
    # seq2seq
    if spec.text_columns:
        if len(spec.text_columns) != 2:
            raise DataError("seq2seq takes --text-column SOURCE --text-column TARGET (two columns)")
        src_tgt = _pick(columns, spec.text_columns, [], "source/target", "--text-column", source)
        _refuse_chat("seq2seq", src_tgt, row, "--text-column")
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


# --- multi-task ------------------------------------------------------------------------------------
def parse_sources(value: Any, flag: str = "--data") -> dict[str, str] | None:
    """Several datasets named by task: ``NAME=PATH`` items (a list of them, or one string of comma-separated ones)
    -> ``{name: path}`` in the order given (the task ids). None when ``value`` is one plain path (an existing file or
    directory is always a plain path, even with ``=`` in its name).

    Raises:
        DataError: a mix of ``NAME=PATH`` items and plain paths, an empty name or path, or a name given twice.
    """
    if value is None:
        return None
    items = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    if len(items) == 1 and (Path(items[0]).exists() or "=" not in items[0]):
        return None
    parts = [p.strip() for item in items for p in item.split(",") if p.strip()]
    out: dict[str, str] = {}
    for part in parts:
        name, sep, path = part.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise DataError(
                f"{flag} {part!r}: with several datasets give each as NAME=PATH (e.g. {flag} sst2=glue/SST-2 "
                f"{flag} rte=glue/RTE, or comma-separated)"
            )
        if name in out:
            raise DataError(f"{flag}: task {name!r} is given twice; give each task one dataset")
        out[name] = path
    return out


def task_rows(rows: Sequence[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """The rows of one task of multi-task data."""
    return [r for r in rows if r.get(TASK_KEY) == task]


def _union_labels(lists: Sequence[list[str]]) -> list[str]:
    """One label space for several classification tasks: ``0..N-1`` when every task's labels are integers, else the
    label names in order of first appearance (task by task)."""
    if all(all(_is_int(n) for n in names) for names in lists):
        return [str(i) for i in range(max(len(names) for names in lists))]
    out: list[str] = []
    for names in lists:
        out += [n for n in names if n not in out]
    return out


def _load_sources(spec: DataSpec) -> Splits:
    """Several datasets, one per task (``spec.sources``), as one multi-task :class:`Splits`."""
    assert spec.sources
    devs = spec.dev_sources or {}
    unknown = sorted(set(devs) - set(spec.sources))
    if unknown:
        raise DataError(
            f"--dev names tasks {unknown} that --data does not give (tasks: {', '.join(spec.sources)}); "
            "use the same NAME in --dev NAME=FILE as in --data NAME=PATH"
        )
    per: dict[str, Splits] = {}
    for name, path in spec.sources.items():
        sub = dataclasses.replace(spec, data=path, dev=devs.get(name), sources=None, dev_sources=None)
        try:
            per[name] = load_splits(sub)
        except DataError as e:
            raise DataError(f"task {name!r} ({path}): {e}") from None
    labels, regression = None, False
    if spec.task == "classify":
        kinds = {name: s.regression for name, s in per.items()}
        if len(set(kinds.values())) > 1:
            raise DataError(
                f"tasks mix regression and classification labels ({', '.join(n for n, r in kinds.items() if r)} "
                "regression): train them in separate runs"
            )
        regression = next(iter(kinds.values()))
        if not regression:
            labels = _union_labels([s.labels or [] for s in per.values()])
    train = [{**r, TASK_KEY: name} for name, s in per.items() for r in s.train]
    random.Random(spec.seed).shuffle(train)  # the tasks interleaved
    dev = [{**r, TASK_KEY: name} for name, s in per.items() for r in s.dev]
    columns = {name: s.columns for name, s in per.items()}
    dev_source = "; ".join(f"{name}: {s.dev_source}" for name, s in per.items())
    return Splits(train, dev, dev_source, columns, labels, regression, chat_template=spec.chat_template,
                  tasks=list(per), task_columns=columns)  # fmt: skip


def _with_task_column(splits: Splits, spec: DataSpec) -> Splits:
    """``splits`` of one table whose ``spec.task_column`` names each row's task (task ids: the sorted names)."""
    col = spec.task_column
    assert col is not None
    columns = list(splits.train[0])
    if col not in columns:
        raise DataError(f"the data has no column {col!r} (--task-column); its columns: {', '.join(columns)}")
    used = {c for v in splits.columns.values() for c in ([v] if isinstance(v, str) else v)}
    if col in used:
        raise DataError(
            f"--task-column {col!r} is also a text or label column: pick the column that names the task"
        )

    def tagged(rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
        out = []
        for i, r in enumerate(rows):
            name = str(r.get(col, "")).strip()
            if not name:
                raise DataError(f"{where} row {i + 1} has an empty task in column {col!r} (--task-column)")
            out.append({**r, TASK_KEY: name})
        return out

    train = tagged(splits.train, "training")
    tasks = sorted({r[TASK_KEY] for r in train})
    dev = tagged(splits.dev, "dev")
    unseen = sorted({r[TASK_KEY] for r in dev} - set(tasks))
    if unseen:
        raise DataError(f"the dev set has tasks the training set lacks in column {col!r}: {unseen[:5]}")
    return dataclasses.replace(splits, train=train, dev=dev, tasks=tasks)


def load_splits(spec: DataSpec) -> Splits:
    """Read, shuffle (seeded), split and subsample the data of ``spec``.

    With no dev file, ``dev_fraction`` of the shuffled training rows is held out (at least one row).
    ``train_size`` / ``dev_size`` keep the first rows after shuffling (per dataset with several).
    Multi-task data (``spec.sources`` or ``spec.task_column``) gives :attr:`Splits.tasks`.
    """
    if spec.sources and spec.task_column:
        raise DataError("give several datasets (--data NAME=PATH ...) or one table with a --task-column, not both")
    if spec.sources:
        return _load_sources(spec)
    if spec.dev_sources:
        raise DataError("--dev NAME=FILE names the dev file of one task of --data NAME=PATH; give --data that way")
    splits = _load_one(spec)
    return _with_task_column(splits, spec) if spec.task_column else splits


def _load_one(spec: DataSpec) -> Splits:
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
    columns = resolve_columns(spec, list(rows[0]), str(train_path), rows[0])
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
    return Splits(rows, dev, dev_source, columns, labels, regression, chat_template=spec.chat_template)


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
    """Tokenized examples: a list of feature dicts (lists of ints, ``labels`` an int/float or a list).

    ``no_target``: indices of generation examples without a single loss token (``labels`` all -100): ``cut`` the
    ones whose response tokens truncation to ``max_length`` removed, ``empty`` those that had none to begin with
    (an empty output, a chat without an assistant turn). Such examples teach nothing.
    """

    def __init__(
        self, features: list[dict[str, Any]], *, cut: Sequence[int] = (), empty: Sequence[int] = ()
    ) -> None:
        self.features = features
        self.cut = list(cut)
        self.empty = list(empty)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]

    @property
    def no_target(self) -> list[int]:
        return sorted(set(self.cut) | set(self.empty))

    def without(self, drop: Sequence[int]) -> Encoded:
        """A copy without the examples at ``drop``."""
        gone = set(drop)
        return Encoded([f for i, f in enumerate(self.features) if i not in gone])


def special_ids(tokenizer: Any) -> tuple[int | None, int]:
    """(eos id, pad id): BERT-style tokenizers have no EOS and use [SEP]; pad falls back to EOS."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an end-of-sequence token")
    return eos, pad


def encode(rows: list[dict[str, Any]], splits: Splits, tokenizer: Any, *, task: str, max_length: int,
           template: str = "alpaca", train_on_prompt: bool = False, task_ids: bool = False) -> Encoded:  # fmt: skip
    """Tokenize rows for ``task`` (truncated to ``max_length``; padding happens in the collator).

    Generation examples left without a loss token are kept and listed in ``Encoded.cut`` / ``Encoded.empty``
    (the caller decides: ``adapterkit train`` warns, drops them, and fails with ``--strict``).

    Multi-task splits: each task's rows are tokenized with that task's columns; ``task_ids`` adds each row's task
    id (an int feature, ``model(**batch, task_ids=...)`` reads it) to its features."""
    if splits.tasks is not None:
        return _encode_tasks(rows, splits, tokenizer, task=task, max_length=max_length, template=template,
                             train_on_prompt=train_on_prompt, task_ids=task_ids)  # fmt: skip
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
        if "messages" in cols:
            chat = ChatRenderer(tokenizer, splits.chat_template)
            pairs = [
                chat.features(r[cols["messages"]], max_length, train_on_prompt, i) for i, r in enumerate(rows)
            ]
        else:
            pairs = [_causal_features(r, cols, tokenizer, max_length, template, train_on_prompt) for r in rows]
    else:
        pairs = [_seq2seq_features(r, cols, tokenizer, max_length, template) for r in rows]
    feats = [f for f, _ in pairs]
    cut = [i for i, (f, n) in enumerate(pairs) if n > 0 and all(x == -100 for x in f["labels"])]
    empty = [i for i, (_, n) in enumerate(pairs) if n == 0]
    return Encoded(feats, cut=cut, empty=empty)


def _encode_tasks(rows: list[dict[str, Any]], splits: Splits, tokenizer: Any, *, task_ids: bool,
                  **kwargs: Any) -> Encoded:  # fmt: skip
    """:func:`encode` of multi-task rows: task by task with the task's columns, back in the rows' order."""
    assert splits.tasks is not None
    feats: list[dict[str, Any] | None] = [None] * len(rows)
    cut: list[int] = []
    empty: list[int] = []
    for tid, name in enumerate(splits.tasks):
        where = [i for i, r in enumerate(rows) if r.get(TASK_KEY) == name]
        if not where:
            continue
        cols = splits.task_columns[name] if splits.task_columns else splits.columns
        view = dataclasses.replace(splits, tasks=None, task_columns=None, columns=cols)
        enc = encode([rows[i] for i in where], view, tokenizer, **kwargs)
        for i, f in zip(where, enc.features):
            feats[i] = {**f, "task_ids": tid} if task_ids else f
        cut += [where[j] for j in enc.cut]
        empty += [where[j] for j in enc.empty]
    missing = [i for i, f in enumerate(feats) if f is None]
    if missing:
        raise DataError(f"row {missing[0] + 1} has no known task (tasks: {', '.join(splits.tasks)})")
    return Encoded(feats, cut=sorted(cut), empty=sorted(empty))  # type: ignore[arg-type]


def _label_index(raw: str, names: list[str] | None) -> int:
    assert names is not None
    if raw in names:
        return names.index(raw)
    if _is_int(raw) and 0 <= int(raw) < len(names):
        return int(raw)
    raise DataError(f"label {raw!r} is not one of the training labels {names[:10]}")


def _causal_features(row: dict[str, Any], cols: dict[str, Any], tokenizer: Any, max_length: int, template: str,
                     train_on_prompt: bool) -> tuple[dict[str, Any], int]:  # fmt: skip
    """(features, number of target tokens before truncation)."""
    eos, _ = special_ids(tokenizer)
    prompt, response = prompt_and_response(row, cols, template)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if not prompt_ids and tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id]
    tail = [eos] if eos is not None else []
    full = prompt_ids + response_ids + tail
    ids = full[:max_length]
    labels = list(ids)
    if not train_on_prompt:
        n = min(len(prompt_ids), len(ids))
        labels[:n] = [-100] * n
    targets = len(full) - (0 if train_on_prompt else len(prompt_ids))
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, targets


# --- chat data ----------------------------------------------------------------------------------------------------
def read_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a Jinja file's text, or a built-in name (``chatml``); None stays None."""
    if value is None:
        return None
    if value in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[value]
    path = Path(value)
    if not path.is_file():
        raise DataError(
            f"--chat-template {value!r} is neither a file nor a built-in template ({', '.join(BUILTIN_CHAT_TEMPLATES)})"
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":  # a tokenizer_config.json, or {"chat_template": "..."}
        try:
            text = json.loads(text)["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f'{value!r}: a .json chat template must hold a "chat_template" string') from None
    if not isinstance(text, str) or "{" not in text:
        raise DataError(f"{value!r} does not look like a Jinja chat template (no {{ or {{% in it)")
    return text


def normalize_messages(value: Any, where: str) -> list[dict[str, str]]:
    """``[{"role", "content"}, ...]`` from a chat value (ShareGPT ``from``/``value`` mapped: human -> user,
    gpt -> assistant)."""
    if not is_messages(value):
        raise DataError(
            f'{where} is not a chat: expected a non-empty list of {{"role": ..., "content": ...}} messages, got '
            f"{str(value)[:80]!r}"
        )
    out = []
    for m in value:
        if "role" in m:
            role, content = m["role"], m["content"]
        else:
            role, content = SHAREGPT_ROLES.get(str(m["from"]).lower(), str(m["from"])), m["value"]
        if not isinstance(role, str) or not isinstance(content, str):
            raise DataError(f"{where}: message roles and contents must be strings, got {m!r}"[:200])
        out.append({"role": role, "content": content})
    return out


class ChatRenderer:
    """Renders chats with a tokenizer's chat template and finds the assistant turns' tokens.

    The assistant span of turn ``i`` is the text between the rendering of ``messages[:i]`` with the generation
    prompt and the rendering of ``messages[:i + 1]``: the reply and whatever the template closes it with (an
    end-of-turn token, so the model learns to stop). It needs a template that renders the start of a chat as the
    start of its rendering (prefix-stable); templates that rewrite earlier turns (e.g. ones that drop the
    reasoning of past turns) are refused with ``--train-on-prompt`` as the way out. Token positions come from
    the fast tokenizer's character offsets (slow tokenizers: each span tokenized on its own).
    """

    def __init__(self, tokenizer: Any, template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = template or getattr(tokenizer, "chat_template", None)
        if not self.template:
            name = getattr(tokenizer, "name_or_path", "") or "the model"
            raise DataError(
                f"chat data needs a chat template, and the tokenizer of {name!r} has none: pass --chat-template "
                "FILE (a Jinja template as in a tokenizer_config.json's chat_template, or a chat_template.jinja) "
                "or --chat-template chatml"
            )

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # jinja2's TemplateError, and templates that raise_exception() on a role order
            raise DataError(f"the chat template cannot render {str(messages)[:120]}...: {e}") from None

    def spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """(rendered chat, character spans of the assistant turns)."""
        full = self.render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], True) if i else self._empty_prompt()
            upto = self.render(messages[: i + 1], False)
            if not (full.startswith(upto) and upto.startswith(before)):
                raise DataError(
                    "the chat template renders the start of a chat differently from the whole chat (it rewrites "
                    "earlier turns), so the assistant turns cannot be located: pass --train-on-prompt (loss on every "
                    "token) or --chat-template FILE with a template that does not"
                )
            spans.append((len(before), len(upto)))
        return full, spans

    def _empty_prompt(self) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                [], chat_template=self.template, tokenize=False, add_generation_prompt=True
            )
        except Exception:  # noqa: BLE001 - templates that index messages[0]
            return ""

    def features(self, value: Any, max_length: int, train_on_prompt: bool,
                 index: int = 0) -> tuple[dict[str, Any], int]:  # fmt: skip
        """(features, number of target tokens before truncation) of one chat."""
        messages = normalize_messages(value, f"row {index + 1}")
        full, spans = self.spans(messages) if not train_on_prompt else (self.render(messages, False), [])
        ids, mask = self._tokenize(full, spans)
        targets = len(ids) if train_on_prompt else sum(mask)
        ids = ids[:max_length]
        labels = list(ids) if train_on_prompt else [t if m else -100 for t, m in zip(ids, mask)]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, targets

    def _tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        tok = self.tokenizer
        if getattr(tok, "is_fast", False):
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            inside = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
            return list(enc["input_ids"]), inside
        ids: list[int] = []
        mask: list[bool] = []
        pos = 0
        for a, b in [*spans, (len(text), len(text))]:
            for piece, flag in ((text[pos:a], False), (text[a:b], True)):
                if piece:
                    part = tok(piece, add_special_tokens=False)["input_ids"]
                    ids += part
                    mask += [flag] * len(part)
            pos = b
        return ids, mask

    def generation_text(self, messages: list[dict[str, str]]) -> str:
        """The prompt for a reply to ``messages`` (the template's generation prompt appended)."""
        return self.render(messages, True)


def _seq2seq_features(row: dict[str, Any], cols: dict[str, Any], tokenizer: Any, max_length: int,
                      template: str) -> tuple[dict[str, Any], int]:  # fmt: skip
    source, target = prompt_and_response(row, cols, template)
    enc = tokenizer(source, truncation=True, max_length=max_length)
    labels = tokenizer(text_target=target, truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}, len(labels)


def collator(tokenizer: Any, task: str) -> Any:
    """Dynamic padding: labels padded with -100 for generation tasks."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task == "classify":
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


# --- packing ---------------------------------------------------------------------------------------------------------
def pack(features: Encoded, max_length: int) -> Encoded:
    """Pack causal-LM examples into rows of at most ``max_length`` tokens (``--packing``).

    Examples are placed by best-fit decreasing (longest first, each into the fullest row it fits), which leaves
    little padding and keeps every example whole. A packed row holds ``input_ids``, ``labels`` and
    ``position_ids`` restarting at 0 for each example, and no ``attention_mask``: transformers then builds a
    block-diagonal causal mask from the position ids (``masking_utils.find_packed_sequence_indices``; flash
    attention reads the same boundaries as variable-length sequences), so no token attends to another
    example. The first label of each example is -100, so no example is trained to predict the next one's first
    token: the loss is the unpacked loss exactly (``tests/test_cli_llm.py`` checks logits and loss).
    """
    import bisect

    items = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in items:
        n = len(features[i]["input_ids"])
        if n > max_length:
            raise DataError(f"example {i} has {n} tokens, more than --max-length {max_length}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, row = free.pop(k)
            rows[row].append(i)
            bisect.insort(free, (space - n, row))
        else:
            rows.append([i])
            bisect.insort(free, (max_length - n, len(rows) - 1))
    packed = []
    for members in rows:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            f = features[i]
            ids += f["input_ids"]
            labels += [-100, *f["labels"][1:]]
            positions += list(range(len(f["input_ids"])))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return Encoded(packed)


class PackedCollator:
    """Pads packed rows to the longest of the batch: ``input_ids`` with the pad id, ``labels`` with -100 and
    ``position_ids`` with ``0, 1, 2, ...`` (the padding becomes one more block of its own, which no real token
    attends to). No ``attention_mask``: the mask comes from the position ids (see :func:`pack`). Batches of
    unpacked examples (the dev set) go to ``fallback``."""

    def __init__(self, pad_id: int, fallback: Any = None) -> None:
        self.pad_id = pad_id
        self.fallback = fallback

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.fallback is not None and "position_ids" not in batch[0]:
            return self.fallback(batch)
        width = max(len(f["input_ids"]) for f in batch)
        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for f in batch:
            gap = width - len(f["input_ids"])
            out["input_ids"].append(f["input_ids"] + [self.pad_id] * gap)
            out["labels"].append(f["labels"] + [-100] * gap)
            out["position_ids"].append(f["position_ids"] + list(range(gap)))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
