# cgpt: `make demo` trains a small Cerebras-GPT on the built-in corpus; `make test` runs the suite.
# Uses the active virtual environment, or creates .venv when none is active.
SHELL := /bin/bash
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := $(CURDIR)/.venv
endif
BIN := $(VENV)/bin
DEMO_DATA := data/prepared/shakespeare

.PHONY: install install-dev deepspeed-ops demo data test test-fast lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first (the CPU wheel) only where no torch is installed: GPU users keep their CUDA build.
# setuptools' banner about editable installs (folders named like the package) is nothing to act on here.
$(VENV)/.cgpt-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.cgpt-dev-installed: pyproject.toml $(VENV)/.cgpt-installed
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.cgpt-installed
install-dev: $(VENV)/.cgpt-dev-installed

$(DEMO_DATA)/meta.json: data/corpus/shakespeare.jsonl.gz | $(VENV)/.cgpt-installed
	$(BIN)/python data/prepare.py --input data/corpus/shakespeare.jsonl.gz --out $(DEMO_DATA) --seq-len 128 --shard-size-mb 1 --max-doc-chars 10000

data: $(DEMO_DATA)/meta.json

demo: install data
	$(BIN)/python train/pretrain.py experiment=demo resume=null

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# DeepSpeed's two CPU ops (shared-memory comm, CPU Adam), compiled once into TORCH_EXTENSIONS_DIR.
deepspeed-ops: install-dev
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder; \
	[b().load(verbose=False) for b in (ShareMemCommBuilder, CPUAdamBuilder)]"

# Two tests at a time, one thread each (pytest-xdist; tests/conftest.py sends whole files to a worker).
# TEST_WORKERS=0 runs them one by one in this process.
TEST_WORKERS ?= 2
test: install-dev lint deepspeed-ops
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -rs -n $(TEST_WORKERS) --durations=15 tests

# The edit-test loop (about a minute on 2 cores): everything not marked slow. Subprocess, multi-process
# and end-to-end tests are marked slow; `make test` (and CI) runs them all.
test-fast: install-dev
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m pytest -q -m "not slow" --durations=5 tests

clean:
	rm -rf outputs multirun $(DEMO_DATA) .pytest_cache
