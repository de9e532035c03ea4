# The README's two commands: `make demo` and `make test`. Each creates .venv when missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# Pin the CPU build of torch (the local version `+cpu`): an unpinned range, or a plain
# `torch==2.13.0` from PyPI, pulls a multi-GB CUDA build. This project's machines have the
# +cpu wheel in their local wheel index; elsewhere add PyTorch's CPU index, e.g.
# `make test PIP_INDEX=--extra-index-url=https://download.pytorch.org/whl/cpu`.
TORCH   := torch==2.13.0+cpu
PIP_INDEX ?=
TRITON  := triton==3.7.1
STAMP   := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_INDEX) $(TORCH) $(TRITON)
	$(BIN)/pip install -q -e '.[executor,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/d2moe demo

test: $(STAMP)
	$(BIN)/ruff check .
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/sim_speed.py

clean:
	rm -rf $(VENV) out
