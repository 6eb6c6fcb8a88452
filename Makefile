# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install torch (CPU) and rayimg, run `rayimg demo`
#   make test   the same set-up plus the dev extra, then the test suite
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: venv demo test test-gpu clean

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

clean:
	rm -rf $(VENV) outputs .pytest_cache
