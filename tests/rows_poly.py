"""Contract rows for Polytropon / MHR (``ak.Poly``). The contracts call the model without task ids, so the rows set
``default_task`` (the task of rows without ids); test_poly.py and test_tasks.py cover explicit ids. Poly is not
mergeable (its weights differ per row), which contract (b) checks as a refusal. peft's Poly has no Conv1D/Conv2d
layer; ours runs on GPT-2's Conv1D (no export to peft there)."""

from __future__ import annotations

import adapterkit as ak

ROWS = [
    ("bert-poly", "bert", ak.Poly(r=4, n_tasks=3, n_skills=3, default_task=1)),
    ("llama-mhr", "llama", ak.Poly(r=2, n_tasks=2, n_skills=4, n_splits=4, default_task=0)),
    ("gpt2-poly", "gpt2", ak.Poly(r=2, n_tasks=2, n_skills=2, n_splits=2, default_task=1)),  # Conv1D
    ("t5-poly-shared", "t5", ak.Poly(r=2, n_tasks=2, n_skills=3, shared_allocation=True, default_task=0)),
]
SECOND = {"poly": {"n_skills": 2}}
