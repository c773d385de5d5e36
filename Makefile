# Two set-up commands (see README): `make demo` and `make test`. Each builds its own
# virtual environment in .venv and installs what it needs. TORCH pins the default torch
# (a local file on the project's machines); users may override it: make test TORCH=torch.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= dev,vision,faiss,text,serve,qdrant
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-all lint bench gpu-check data clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

# Fashion-MNIST from Debian where we are root; otherwise mrl downloads it when online.
data:
	@if [ ! -d $(FMNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
		echo "could not install dataset-fashion-mnist; mrl will try to download Fashion-MNIST"; \
	fi

demo: $(BIN)/.installed data
	$(BIN)/mrl demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

test-all: $(BIN)/.installed data
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks examples

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_heads.py
	$(BIN)/python benchmarks/bench_scores.py
	$(BIN)/python benchmarks/bench_train_step.py

# On a CUDA machine (no venv needed: the scripts put src/ on the path); data from
# `python benchmarks/prepare_gpu_carry.py --what text` in .gpu/text. Summary table last.
gpu-check:
	python3 benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
