"""Contract rows for convolutional adapters (``ak.ConvAdapter``, ``ak.ResidualAdapter``) on a tiny ResNet and a
ViT's patch embedding, and for vision bottlenecks: the AdaptFormer preset on ViT and CLIP's vision tower, and
VL-Adapter-style (Houlsby) bottlenecks on CLIP."""

from __future__ import annotations

import adapterkit as ak
from adapterkit.config import get_config

ROWS = [
    ("resnet-conv-adapter", "resnet", ak.ConvAdapter(reduction_factor=2)),
    (
        "vit-conv-adapter-patch",
        "vit",
        ak.ConvAdapter(targets=["patch_embeddings.projection"], non_linearity="gelu"),
    ),
    ("resnet-residual-parallel", "resnet", ak.ResidualAdapter()),
    ("resnet-residual-series", "resnet", ak.ResidualAdapter(mode="series")),
    (
        "vit-residual-series-patch",
        "vit",
        ak.ResidualAdapter(mode="series", targets=["patch_embeddings.projection"]),
    ),
    ("vit-adaptformer", "vit", get_config("adaptformer", bottleneck_size=8)),
    ("clip-adaptformer", "clip", get_config("adaptformer", bottleneck_size=8)),
    ("clip-vl-adapter-houlsby", "clip", ak.Bottleneck(placement="houlsby", reduction_factor=4)),
]
