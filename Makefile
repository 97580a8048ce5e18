# `make run`: set up .venv (first time) and train + evaluate the default MNIST experiment.
# `make test`: set up .venv (first time) and run the test suite (minutes).
# `make acceptance`: the long acceptance runs (MNIST >= 99 %, an8Flower >= 95 %); CI runs both.
# `make gpu-check`: the pipeline on a CUDA GPU against the CPU (skips without CUDA).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup run test acceptance lint clean gpu-check

$(STAMP): pyproject.toml requirements/peers-no-deps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps -r requirements/peers-no-deps.txt
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) train.py experiment=mnist
	$(PY) evaluate.py experiment=mnist

test: $(STAMP)
	$(PY) -m pytest

acceptance: $(STAMP)
	$(PY) -m pytest -m slow

gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
