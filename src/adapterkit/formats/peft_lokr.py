"""peft interop for LoKr (``peft_type: "LOKR"``); dispatched from ``formats/peft.py`` (the shared LyCORIS
conversion lives in ``formats/peft_loha.py``).

Layout (peft 0.21): ``adapter_config.json`` with the LoHa fields plus ``decompose_both``, ``decompose_factor``
and ``rank_dropout_scale``; ``adapter_model.safetensors`` with, per adapted module (``out = a · b``,
``in = c · d``, see ``methods/lokr.py``), either the full or the low-rank form of each factor:

==============================================================  ======================  ====================
key (``base_model.model.<module path>.`` + )                    shape                   adapterkit tensor
==============================================================  ======================  ====================
``lokr_w1``  or ``lokr_w1_a`` / ``lokr_w1_b``                   ``(a, c)``              ``LoKrLayer.lokr_w1``
                                                                ``(a, r)``/``(r, c)``   (``_a``/``_b``)
``lokr_w2``  or ``lokr_w2_a`` / ``lokr_w2_b``                   ``(b, d[, kh, kw])``    ``LoKrLayer.lokr_w2``
                                                                ``(b, r)``/``(r, d·k²)`` (``_a``/``_b``)
``base_model.model.<head>.<param>``                             head                    ``HeadCopy``
==============================================================  ======================  ====================

Which form a module has follows from ``r``, ``decompose_both`` and the factor sizes, in peft as here; a file
whose tensors do not match the form its config implies is refused. With ``use_effective_conv2d: true`` a
low-rank D of a k×k convolution is ``lokr_t2: (r, r, kh, kw)``, ``lokr_w2_a: (r, b)``, ``lokr_w2_b: (r, d)``.
"""

from __future__ import annotations

import os
from typing import Any

from ..methods.lokr import LoKr
from .peft_loha import load_lycoris, save_lycoris

PEFT_TYPE = "LOKR"
METHOD = "lokr"
TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def save(ctl: Any, name: str, path: str | os.PathLike) -> None:
    cfg = ctl._record(name).config
    assert isinstance(cfg, LoKr)
    extra = {
        "decompose_both": cfg.decompose_both,
        "decompose_factor": cfg.decompose_factor,
        "rank_dropout_scale": cfg.rank_dropout_scale,
    }
    save_lycoris(ctl, name, path, PEFT_TYPE, extra)


def _make(fields: Any, **kw: Any) -> LoKr:
    factor = fields.data.get("decompose_factor", -1)
    if isinstance(factor, bool) or not isinstance(factor, int):
        raise fields.error("decompose_factor", factor, "an integer (-1 or > 0)")
    return LoKr(
        decompose_both=fields.flag("decompose_both", False),
        decompose_factor=factor,
        rank_dropout_scale=fields.flag("rank_dropout_scale", False),
        **kw,
    )


def load(ctl: Any, path: str | os.PathLike, *, name: str | None, allow_pickle: bool, activate: bool) -> str:
    return load_lycoris(
        ctl,
        path,
        name=name,
        allow_pickle=allow_pickle,
        activate=activate,
        what="LoKr",
        tensors=TENSORS,
        make=_make,
    )
