"""Running the real AdapterHub library (``.venv-adapterhub``: adapters 1.3.0, transformers 4.57.6) on our exports,
for the slow tests of tests/test_adapterhub_export*.py: write the manifest, run one of the check scripts beside
this file in that venv, read what it measured."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
HUB_PYTHON = HERE.parent / ".venv-adapterhub" / "bin" / "python"


def run_library(script: str, manifest: dict[str, Any], tmp_path: Path) -> dict[str, torch.Tensor]:
    """Run ``tests/<script>`` in the library's venv on ``manifest`` (written to ``tmp_path/manifest.json``); its
    result tensors (``<case>.output``, ``<case>.hidden``, ``<case>.missing``, ...)."""
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    result = tmp_path / "library.safetensors"
    proc = subprocess.run(
        [str(HUB_PYTHON), str(HERE / script), str(tmp_path / "manifest.json"), str(result)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return load_file(str(result))
