"""Contract rows for HyperFormer++ / MAD-G (``ak.HyperFormer``): generated bottleneck adapters on the block's
sub-layers and on projections, with generated or per-site LayerNorms, from learned task embeddings or given vectors.
The contracts call the model without task ids, so multi-task rows set ``default_task``; test_hyperformer.py covers
explicit ids. The hypernetwork is kept small (``task_dim=8``). Not mergeable (weights per row), which contract (b)
checks as a refusal."""

from __future__ import annotations

import adapterkit as ak

_SMALL = {"task_dim": 8, "hidden_dim": 16, "projected_dim": 8}

ROWS = [
    (
        "bert-hyperformer",
        "bert",
        ak.HyperFormer(
            n_tasks=3,
            default_task=1,
            adapter=ak.Bottleneck(placement="houlsby", reduction_factor=8, ln_after=True),
            **_SMALL,
        ),
    ),
    (
        "t5-hyperformer",
        "t5",
        ak.HyperFormer(
            n_tasks=2,
            default_task=0,
            **_SMALL,
            adapter=ak.Bottleneck(
                placement="houlsby",
                reduction_factor=8,
                ln_before=True,
                ln_after=True,
                non_linearity="gelu_new",
                cross_adapter=True,
            ),
        ),
    ),
    (
        "gpt2-hyperformer-parallel",
        "gpt2",
        ak.HyperFormer(
            n_tasks=2,
            default_task=1,
            generate_layernorm=False,
            **_SMALL,
            adapter=ak.Bottleneck(placement="parallel", hook="projection", ln_before=True, reduction_factor=8),
        ),
    ),
    (
        "llama-madg",
        "llama",
        ak.HyperFormer(
            n_tasks=2,
            default_task=0,
            source="vector",
            vector_dim=5,
            **_SMALL,
            adapter=ak.Bottleneck(placement="pfeiffer", reduction_factor=8, ln_after=True),
        ),
    ),
    (
        "vit-hyperformer-projection",
        "vit",
        ak.HyperFormer(
            generate_layernorm=False,
            **_SMALL,
            adapter=ak.Bottleneck(placement="houlsby", hook="projection", reduction_factor=8, scaling="learned"),
        ),
    ),
]
SECOND = {"hyperformer": {"task_dim": 4}}
