"""Load adapterkit's AdapterHub exports into the real ``adapters`` library and record its outputs.

Runs in the separate venv with ``adapters`` 1.3.0 and transformers 4.57.6 (never the project's .venv), called by
tests/test_adapterhub_export.py::test_the_library_loads_our_exports_with_our_outputs::

    .venv-adapterhub/bin/python tests/adapterhub_library_check.py MANIFEST.json OUT.safetensors

``MANIFEST.json`` maps a case name to ``{"family", "adapter" (an exported directory), "name"}`` (optionally
``"attn_implementation"``, passed to ``from_pretrained``, and ``"padded": true``, which also records
``<case>.padded``: the output with row 1 of the batch right-padded by 3: every query then sees some key, where a
fully masked query of left padding is defined differently by transformers 4.57 and 5 even without adapters, which
gates averaging over all positions would carry into the real tokens); the base model of a family is ``tests/fixtures/adapterhub/base/<family>`` (the weights our side used too), its inputs that directory's
``expected.safetensors``. For each case the script builds the plain transformers model, ``adapters.init``s it,
``load_adapter(dir, use_safetensors=True)``, activates the adapter and writes ``<case>.output`` (logits or last
hidden state) and ``<case>.hidden`` (last hidden state; encoder-decoder models: the decoder's, and
``<case>.encoder`` the encoder's), plus ``<case>.missing`` (the number of adapter weights the
library reported missing: it fills those with fresh initial values, so it must be 0).

Prefix and prompt tuning (and MAM, UniPELT) are checked with ``attn_implementation="eager"``: that is what the
fixtures were recorded with (models built from their configs), and under ``sdpa`` (``from_pretrained``'s default in
transformers 4.57) the library computes other outputs: its own prefix fixtures give other logits (max 0.26 on
gpt2_prefix_tuning, 0.29 on llama_prefix_tuning), and a BERT prompt another padded row (0.015), so an sdpa check
would compare against neither.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import adapters
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.utils import logging

BASE = Path(__file__).resolve().parent / "fixtures" / "adapterhub" / "base"
CLASSES = {
    "bert": "BertModel",
    "bertcls": "BertForSequenceClassification",
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "distilbert": "DistilBertModel",
    "t5": "T5EncoderModel",
    "t5ed": "T5Model",  # the full encoder-decoder T5 (tests/test_adapterhub_prefix_encdec.py)
    "bart": "BartModel",
    "vit": "ViTModel",
}


def main(manifest: Path, out: Path) -> None:
    logging.set_verbosity_error()
    cases = json.loads(manifest.read_text())
    results: dict[str, torch.Tensor] = {}
    for case, info in cases.items():
        family = info["family"]
        kwargs = {"add_pooling_layer": False} if family in ("bert", "vit") else {}
        if info.get("attn_implementation"):  # prefix tuning: "eager" (see the module docstring)
            kwargs["attn_implementation"] = info["attn_implementation"]
        model = getattr(transformers, CLASSES[family]).from_pretrained(str(BASE / family), **kwargs).eval()
        adapters.init(model)
        loading: dict = {}
        name = model.load_adapter(info["adapter"], use_safetensors=True, loading_info=loading)
        if name != info["name"]:
            raise SystemExit(f"{case}: loaded as {name!r}, expected {info['name']!r}")
        model.set_active_adapters(name)
        model.eval()
        exp = load_file(str(BASE / family / "expected.safetensors"))
        inputs = (
            {"pixel_values": exp["pixel_values"]}
            if "pixel_values" in exp
            else {"input_ids": exp["input_ids"], "attention_mask": exp["attention_mask"]}
        )
        if "decoder_input_ids" in exp:  # T5Model builds no decoder inputs of its own
            inputs["decoder_input_ids"] = exp["decoder_input_ids"]
        with torch.no_grad():
            o = model(**inputs, output_hidden_states=True)
        if getattr(o, "encoder_last_hidden_state", None) is not None:
            results[f"{case}.encoder"] = o.encoder_last_hidden_state.detach().contiguous().clone()
        states = o.hidden_states if getattr(o, "hidden_states", None) is not None else o.decoder_hidden_states
        hidden = states[-1].detach().contiguous().clone()
        results[f"{case}.output"] = (o.logits if hasattr(o, "logits") else hidden).detach().contiguous().clone()
        results[f"{case}.hidden"] = hidden
        if info.get("padded"):  # the same batch with row 1 right-padded by 3 (the mask only)
            mask = inputs["attention_mask"].clone()
            mask[1, -3:] = 0
            with torch.no_grad():
                p = model(**{**inputs, "attention_mask": mask}, output_hidden_states=True)
            p_states = (
                p.hidden_states if getattr(p, "hidden_states", None) is not None else p.decoder_hidden_states
            )
            results[f"{case}.padded"] = (
                (p.logits if hasattr(p, "logits") else p_states[-1]).detach().contiguous().clone()
            )
        missing = [k for k in loading.get("missing_keys", [])]
        results[f"{case}.missing"] = torch.tensor(len(missing))
        if missing:
            print(f"{case}: missing {missing[:4]}", file=sys.stderr)
        print(f"{case}: loaded ({adapters.__version__}, transformers {transformers.__version__})", file=sys.stderr)
    save_file(results, str(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
