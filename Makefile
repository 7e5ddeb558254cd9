# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pets-installed
CSRC := $(shell find pets_compiler/custom_ops/csrc -type f 2>/dev/null)

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(CSRC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU wheel on disk; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q "setuptools>=68" wheel ninja
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

demo: install
	$(BIN)/pets demo

test: install
	$(BIN)/python -m pytest -q
	$(MAKE) lint

lint: install
	$(BIN)/ruff check pets_compiler tests bench scripts setup.py
	$(BIN)/ruff format --check pets_compiler tests bench scripts setup.py
	$(BIN)/mypy

clean:
	rm -rf build *.egg-info pets_compiler/_C*.so
