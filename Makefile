# Two commands on a fresh clone (only Python >= 3.10 and pip needed):
#   make demo   set up .venv, then calibrate the bundled example end to end
#   make test   set up .venv, then lint, type-check and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench-smoke clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/trtcal demo

lint: $(STAMP)
	$(BIN)/ruff check trtcal tests bench
	$(BIN)/mypy --follow-imports=silent trtcal/core

test: lint
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
