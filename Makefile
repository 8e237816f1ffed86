# Two commands set up everything on a fresh machine:
#   make test   - create .venv, install chemfit with its test extras (and Debian's chromium for
#                 the browser test), run the whole suite
#   make demo   - same set-up, then fit a Lennard-Jones dimer in the terminal
#   make lab    - same set-up, then JupyterLab on notebooks/ (http://127.0.0.1:8888, token printed)
#   make docs   - build the documentation into docs/_build/html (warnings are errors)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# make lab LAB_PORT=9000 LAB_IP=0.0.0.0 LAB_OPTS=--no-browser LAB_TOKEN=... (default: a new token)
LAB_IP ?= 127.0.0.1
LAB_PORT ?= 8888
LAB_OPTS ?=
LAB_TOKEN ?=

.PHONY: setup browser test test-pythons demo lab docs lint format bench bench-upstream clean

setup: $(STAMP)

# Bytecode is compiled at install time; otherwise the first loky workers, MPI ranks and engines
# to start compile numpy, scipy and ase, several at once, on their first imports.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip uv
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(BIN)/uv pip install -q --compile-bytecode -e '.[dev]'
	touch $(STAMP)

# Only the test suite needs a system package: Debian's chromium, for the browser test.
browser:
	.ci/install-system-packages

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# The core tests on the oldest and the newest declared Python (CI runs it after `make test`).
test-pythons: $(STAMP)
	.ci/test-pythons

demo: $(STAMP)
	$(BIN)/python examples/lj_dimer_fit.py

# The venv's bin goes first on PATH, so that kernels and terminals find its python and mpiexec.
# --allow-root only when running as root (JupyterLab refuses to start as root without it).
lab: $(STAMP)
	@token="$(LAB_TOKEN)"; \
	if [ -z "$$token" ]; then token=$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(24))'); fi; \
	root=$$(if [ "$$(id -u)" = 0 ]; then echo --allow-root; fi); \
	echo "JupyterLab on notebooks/: http://$(LAB_IP):$(LAB_PORT)/lab?token=$$token"; \
	export PATH="$(CURDIR)/$(BIN):$$PATH"; \
	exec $(BIN)/jupyter lab --ip=$(LAB_IP) --port=$(LAB_PORT) \
		--ServerApp.port_retries=0 --ServerApp.root_dir="$(CURDIR)/notebooks" \
		--IdentityProvider.token="$$token" $$root $(LAB_OPTS)

docs: $(STAMP)
	$(BIN)/python -m sphinx -W --keep-going -b html -d docs/_build/doctrees docs docs/_build/html

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Each script prints JSON (min and median over repeats; ratios measured side by side in one run).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_map_with_context.py
	$(BIN)/python benchmarks/bench_cob_wrappers.py
	$(BIN)/python benchmarks/bench_mpi_wrapper_cob.py
	$(BIN)/python benchmarks/bench_fitter.py
	$(BIN)/python benchmarks/bench_live_plot.py
	$(BIN)/python benchmarks/bench_diagnostics.py

# Side by side with upstream chemfit 3.1.1 (PyPI) in its own venv, .venv-upstream; a Markdown
# table (see benchmarks/README.md). BENCH_UPSTREAM_OPTS="--rounds 5 --cases mpi_cheap" etc.
BENCH_UPSTREAM_OPTS ?=
bench-upstream: $(STAMP)
	benchmarks/upstream_env.sh
	$(BIN)/python benchmarks/compare_upstream.py $(BENCH_UPSTREAM_OPTS)

clean:
	rm -rf $(VENV) .venv-upstream build *.egg-info .pytest_cache docs/_build docs/notebooks
