# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install torch (CPU) and rayimg, run `rayimg demo`
#   make test   the same set-up plus the dev extra, then the test suite
#   make bench  the headline benchmarks on a GPU machine (bench/README.md): ONLY=render, BENCH_ARGS="--smoke"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: venv demo test test-gpu bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/rayimg demo

test: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

test-gpu: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra -m gpu $(PYTEST_ARGS)

# No venv: the GPU machine runs its own python with the packages it was given (bench/README.md).
BENCH_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
ONLY ?=
bench:
	$(BENCH_PYTHON) bench/run.py $(if $(ONLY),--only $(ONLY)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
