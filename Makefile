# lightning-mics: `make train` runs the main example, `make test` lint + the whole suite.
# `make train ARGS="strategy.partition_size=4"` passes Hydra overrides (see conf/).
# Both create .venv on a fresh machine.
PYTHON ?= python3
# The torch build to install. PyPI's torch==2.13.0 for Linux x86_64 is a CUDA build
# (several GB); for the CPU-only build point TORCH_INDEX at PyTorch's CPU wheel index,
# e.g. `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu` (after `make clean`).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv train test lint format clean

venv: $(STAMP)

# NOTE: torch is pinned in its own step first: an unpinned torch pulled in by a
# dependency would fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# A small GPT trained with MiCS on 4 CPU processes emulating 2 nodes x 2 ranks, on the
# Python standard library's sources (conf/experiment/laptop_gpt.yaml).
ARGS ?=
train: $(STAMP)
	$(BIN)/python -m recipes.train experiment=laptop_gpt $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
