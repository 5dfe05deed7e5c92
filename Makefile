# Set-up and checks. Every target creates .venv and installs what it needs from this repo.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test test-slow lint bench clean

# One stamp per set of extras; reinstalls when pyproject.toml changes.
$(VENV)/.stamp-%: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[$*]"
	touch $@

$(VENV)/.stamp-base: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e .
	touch $@

demo: $(VENV)/.stamp-base
	$(BIN)/python examples/demo.py

test: $(VENV)/.stamp-test
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.stamp-test
	$(BIN)/python -m pytest -q -m slow

lint: $(VENV)/.stamp-test
	$(BIN)/ruff check reformer tests benchmarks examples

bench: $(VENV)/.stamp-bench
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/memory.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
