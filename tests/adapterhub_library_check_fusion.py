"""Load adapterkit's AdapterHub exports of fusions, flex heads and setups into the real ``adapters`` library and record
its outputs.

Runs in the separate venv with ``adapters`` 1.3.0 and transformers 4.57.6 (never the project's .venv), called by
tests/test_adapterhub_export_fusion.py::test_the_library_loads_our_compositions_with_our_outputs::

    .venv-adapterhub/bin/python tests/adapterhub_library_check_fusion.py MANIFEST.json OUT.safetensors

``MANIFEST.json`` maps a case name to one of

- ``{"kind": "fusion", "family", "adapters": [dir, ...], "fusion": dir, "names": [...]}``: the plain transformers
  model of the family, ``adapters.init``, ``load_adapter`` of each member, ``load_adapter_fusion``, then
  ``set_active_adapters(Fuse(*names))``;
- ``{"kind": "head", "family", "adapter": dir, "name"}``: the family's ``*AdapterModel`` holding the base weights,
  ``load_adapter`` (which adds the saved flex head), ``set_active_adapters(name)`` (the head of that name too);
- ``{"kind": "setup", "family", "setup": dir, "head_model": bool}``: ``load_adapter_setup(dir, set_active=True)`` on
  the plain model (``adapters.init``) or, with a head, on the ``*AdapterModel``.

The base model of a family is ``tests/fixtures/adapterhub/base/<family>`` (the weights our side used), its inputs
that directory's ``expected.safetensors``; a case may name others (``"base": dir``, ``"inputs": file``; T5 with
its decoder, the eos inputs of encoder-decoder classification heads). Encoder-decoder models: ``hidden`` is the
decoder's last hidden state. For each case the script writes ``<case>.output`` (the head's logits,
the model's logits or its last hidden state; with several heads ``<case>.output.<i>`` per head, in order), ``<case>.hidden`` (the last hidden state) and ``<case>.missing`` (the
number of adapter, fusion or head weights the library did not find in our files: it would fill those with fresh
initial values, so it must be 0; fusion layers are counted by comparing the model's fusion parameters with the
file's values, as ``load_adapter_fusion`` reports nothing: it also leaves keys without the base-model prefix
unloaded on a model with one, e.g. a bare ``BertModel``'s fusion on ``BertAdapterModel``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import adapters
import torch
import transformers
from adapters.composition import Fuse
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.utils import logging

BASE = Path(__file__).resolve().parent / "fixtures" / "adapterhub" / "base"
CLASSES = {
    "bert": "BertModel",
    "gpt2": "GPT2LMHeadModel",
    "distilbert": "DistilBertModel",
    "bart": "BartModel",
    "t5": "T5Model",
    "llama": "LlamaForCausalLM",
}
HEAD_CLASSES = {
    "bert": "BertAdapterModel",
    "gpt2": "GPT2AdapterModel",
    "distilbert": "DistilBertAdapterModel",
    "bart": "BartAdapterModel",
    "t5": "T5AdapterModel",
}


def _plain(family: str, base_dir: Path) -> torch.nn.Module:
    kwargs = {"add_pooling_layer": False} if family == "bert" else {}
    model = getattr(transformers, CLASSES[family]).from_pretrained(str(base_dir), **kwargs).eval()
    adapters.init(model)
    return model


def _head_model(family: str, base_dir: Path) -> torch.nn.Module:
    """The family's ``*AdapterModel`` with the base weights (its pooler, unused by the heads here, stays random)."""
    base = getattr(transformers, CLASSES[family]).from_pretrained(str(base_dir)).eval()
    model = getattr(adapters, HEAD_CLASSES[family])(base.config)
    own = base.transformer if family == "gpt2" else base
    missing, unexpected = model.base_model.load_state_dict(own.state_dict(), strict=False)
    if unexpected or not all(k.startswith(("pooler.", "prompt_tuning.")) for k in missing):
        raise SystemExit(
            f"{family}: base weights do not fit {HEAD_CLASSES[family]}: {missing[:4]} {unexpected[:4]}"
        )
    return model.eval()


def _fusion_missing(model: torch.nn.Module, directory: str | Path) -> int:
    """Fusion parameters of the model that do not hold the file's values (not found, or not loaded)."""
    with safe_open(str(Path(directory) / "model_adapter_fusion.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    lacking = []
    for key, value in model.state_dict().items():
        if ".adapter_fusion_layer." not in key:
            continue
        match = [s for s in stored if key == s or key.endswith("." + s) or s.endswith("." + key)]
        if len(match) != 1 or not torch.equal(stored[match[0]], value.cpu()):
            lacking.append(key)
    if lacking:
        print(f"fusion {directory}: not loaded {lacking[:4]}", file=sys.stderr)
    return len(lacking)


def main(manifest: Path, out: Path) -> None:
    logging.set_verbosity_error()
    cases = json.loads(manifest.read_text())
    results: dict[str, torch.Tensor] = {}
    for case, info in cases.items():
        family = info["family"]
        base_dir = Path(info.get("base") or BASE / family)
        missing = 0
        loading: dict = {}
        if info["kind"] == "fusion":
            model = _plain(family, base_dir)
            for directory in info["adapters"]:
                model.load_adapter(directory, use_safetensors=True, loading_info=loading)
            model.load_adapter_fusion(info["fusion"], use_safetensors=True)
            missing += _fusion_missing(model, info["fusion"])
            model.set_active_adapters(Fuse(*info["names"]))
        elif info["kind"] == "head":
            model = _head_model(family, base_dir)
            name = model.load_adapter(info["adapter"], use_safetensors=True, loading_info=loading)
            if name != info["name"] or name not in model.heads:
                raise SystemExit(f"{case}: loaded {name!r}, heads {list(model.heads)}")
            model.set_active_adapters(name)
        else:
            model = _head_model(family, base_dir) if info["head_model"] else _plain(family, base_dir)
            model.load_adapter_setup(info["setup"], set_active=True, use_safetensors=True)
            for fusion in Path(info["setup"]).glob("*/model_adapter_fusion.safetensors"):
                missing += _fusion_missing(model, fusion.parent)
        missing += len(loading.get("missing_keys", []))
        if loading.get("missing_keys"):
            print(f"{case}: missing {loading['missing_keys'][:4]}", file=sys.stderr)
        model.eval()
        exp = load_file(str(info.get("inputs") or BASE / family / "expected.safetensors"))
        inputs = {"input_ids": exp["input_ids"], "attention_mask": exp["attention_mask"]}
        with torch.no_grad():
            o = model(**inputs, output_hidden_states=True)
        if hasattr(o, "head_outputs"):  # several heads (MultiHeadOutput): one output per head, in order
            for i, head_out in enumerate(o.head_outputs):
                results[f"{case}.output.{i}"] = head_out.logits.detach().contiguous().clone()
            o = o.head_outputs[0]
        states = getattr(o, "hidden_states", None)
        if states is None:
            states = getattr(o, "decoder_hidden_states", None)
        hidden = states[-1].detach().contiguous().clone() if states is not None else torch.zeros(0)
        logits = getattr(o, "logits", None)
        results[f"{case}.output"] = (logits if logits is not None else hidden).detach().contiguous().clone()
        results[f"{case}.hidden"] = hidden
        results[f"{case}.missing"] = torch.tensor(missing)
        print(f"{case}: loaded ({adapters.__version__}, transformers {transformers.__version__})", file=sys.stderr)
    save_file(results, str(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
