# Set-up and checks. Every target creates .venv and installs what it needs from this repo.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test test-slow test-gpu lint bench bench-gpu gpu-check clean

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

# Trains the tiny preset on the built-in corpus (no download) for a few minutes, then samples.
demo: $(VENV)/.stamp-base
	rm -rf runs/demo
	$(BIN)/reformer train --preset tiny --data builtin --seq-len 2048 --batch-size 4 --steps 500 \
		--eval-every 50 --save-every 100 --out runs/demo
	$(BIN)/reformer generate --checkpoint runs/demo --prompt "The " --max-new-tokens 300 --seed 0

# The interop extra (transformers) lets tests/test_convert.py compare with Hugging Face's Reformer.
# The gpu extra (triton) lets tests/test_triton_lsh.py run the fused kernel in Triton's interpreter.
# The compat extra (reformer_pytorch) lets tests/test_compat.py check our API against the live peer.
# The hub extra (huggingface_hub) lets tests/test_hub.py download from a Hub on localhost.
test: $(VENV)/.stamp-test,interop,gpu,compat,hub
	$(BIN)/python -m pytest -q

# On a CUDA machine: every backend against the reference (the @gpu tests).
test-gpu: $(VENV)/.stamp-test,gpu
	$(BIN)/python -m pytest -q -m gpu

# Heavier checks (the 200-step bf16-vs-fp32 run, a stopped torchrun rank; exit code 5 = none selected is fine).
test-slow: $(VENV)/.stamp-test
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]

lint: $(VENV)/.stamp-test
	$(BIN)/ruff check reformer tests benchmarks

bench: $(VENV)/.stamp-bench
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/training.py
	$(BIN)/python benchmarks/generate.py

bench-gpu: $(VENV)/.stamp-gpu
	$(BIN)/python benchmarks/gpu.py

# The prepared GPU run for a bare CUDA machine without a package registry: installs nothing, runs
# from the source tree with the interpreter that has torch (PYTHON=...); results in $$OUT or
# runs/gpu-check. Without CUDA it is a dry run.
gpu-check:
	benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
