# fleetcmd developer tasks. Needs only python3 (3.11+) with venv/pip reaching PyPI.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv run test lint clean

venv: $(STAMP)

# Re-installs when pyproject.toml changes; a no-op otherwise.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

run: venv
	$(BIN)/fleetcmd serve

# Two workers: most tests wait on real sockets, processes and commits, not on the CPU.
test: venv
	$(BIN)/pytest -n 2

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
