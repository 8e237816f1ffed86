# Two commands set up everything on a fresh machine:
#   make test   - create .venv, install chemfit with its test extras, run the whole suite
#   make demo   - same set-up, then fit a Lennard-Jones dimer in the terminal
#   make lab    - (until the notebooks land) the same as make demo
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo lab lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	.ci/install-system-packages
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip uv
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(BIN)/uv pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python examples/lj_dimer_fit.py

lab: demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
