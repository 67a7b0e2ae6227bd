# `make demo` and `make test` set up .venv on first use (CPU build of torch where no NVIDIA GPU is present).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# On CPU-only machines pin the CPU build of torch; a GPU machine keeps whatever torch>=2.5 it resolves.
TORCH_CONSTRAINT := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints/cpu.txt)

.PHONY: setup demo test lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_CONSTRAINT) -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/hybridnas demo

test: setup
	$(PY) -m pytest -q --durations=25 tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) benchmarks/models_cpu.py

clean:
	rm -rf $(VENV) .pytest_cache
