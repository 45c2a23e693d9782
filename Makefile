# The two quick-start commands: `make run` (service on the demo model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STORE ?= store

.PHONY: install install-dev system-deps run test lint bench mutation

# The service needs the package; the tests also need the dev extra (test tools, diffusers).
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed
install-dev: $(BIN)/.installed-dev

# Tests start their own redis-server and prometheus: Debian packages, installed when missing.
system-deps:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	@command -v prometheus >/dev/null || { apt-get update -qq && apt-get install -y -qq prometheus; }

run: install
	$(BIN)/latentsieve demo --store $(STORE)
	$(BIN)/latentsieve serve --store $(STORE) --host 127.0.0.1 --port 8000

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/mypy

test: install-dev system-deps lint
	$(BIN)/pytest -q

bench: install-dev
	$(BIN)/python benchmarks/bench_density.py
	$(BIN)/python benchmarks/bench_http.py
	$(BIN)/python benchmarks/bench_distributed.py
	$(BIN)/python benchmarks/bench_descriptors.py --threads 1

# Mutation testing of the engine, cache and transports ([tool.mutmut] in pyproject.toml), in a
# copy of the checkout where latentsieve/service, /workers and /index are real folders.
MUTATION_DIR ?= build/mutation
mutation: install-dev system-deps
	$(BIN)/pip install -q 'mutmut>=3.3'
	$(BIN)/python tests/mutation/layout.py $(MUTATION_DIR)
	cd $(MUTATION_DIR) && $(abspath $(BIN))/mutmut run; $(abspath $(BIN))/mutmut results
