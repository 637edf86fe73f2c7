# One command each, from a clean clone (README, "Quick start").
#   make demo   set up, train the tiny model on the CPU, sample it, score it
#   make test   set up, lint, run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/tiny

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

# CPU torch 2.13.0 first (from the machine's local disk), or pip may fetch a multi-GB
# CUDA build; then the project with its test, JAX, MAUVE, plot and tracker extras.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,jax,mauve,plot,tensorboard,wandb,serve,serve-test]"
	touch $@

demo: setup
	$(BIN)/elfctl train --preset tiny --run-dir $(RUN)
	$(BIN)/elfctl sample --repo $(RUN) --num-samples 256 --out $(RUN)/demo-samples --force
	$(BIN)/python bench/tiny_quality.py --samples $(RUN)/demo-samples

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
