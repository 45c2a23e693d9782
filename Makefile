# The two quick-start commands: `make run` (service on the demo model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STORE ?= store

.PHONY: install system-deps run test lint bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Tests start their own redis-server; install Debian's package when it is missing (root only).
system-deps:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }

run: install
	$(BIN)/latentsieve demo --store $(STORE)
	$(BIN)/latentsieve serve --store $(STORE) --host 127.0.0.1 --port 8000

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: install system-deps lint
	$(BIN)/pytest -q

bench: install
	$(BIN)/python benchmarks/bench_density.py
