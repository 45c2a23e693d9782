# The two quick-start commands: `make run` (service on the demo model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STORE ?= store

.PHONY: install install-dev constraints check-lowest system-deps run test lint bench mutation

# Every install takes its versions from constraints.txt (torch==2.13.0 among them): the service
# needs the cpu server extra and the demo extra; the tests also need the dev extra.
PIP_INSTALL := $(BIN)/pip install -q -c constraints.txt
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP_INSTALL) -e '.[cpu,demo]'
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

# After changing a dependency: reinstall from scratch, then pin what was installed.
constraints: install-dev
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable --exclude latentsieve \
	  | grep -v -e '^mutmut=' -e '^libcst=' -e '^textual=' -e '^setproctitle=' \
	     -e '^linkify-it-py=' -e '^mdit-py-plugins=' | sed 's/+cpu$$//'; } > constraints.new
	mv constraints.new constraints.txt

install: $(BIN)/.installed
install-dev: $(BIN)/.installed-dev

# The lower bounds of pyproject.toml, tested: unit and in-process API tests on the lowest
# allowed releases (constraints-lowest.txt). Not part of `make test` (a second environment).
LOWEST ?= .venv-lowest
check-lowest:
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install -q --upgrade pip
	$(LOWEST)/bin/pip install -q -c constraints-lowest.txt -e '.[cpu,demo,report]' \
	  pytest pytest-timeout hypothesis asgi-lifespan pyyaml packaging jsonschema
	# Not here: schemathesis (its own FastAPI floor) and the diffusers adapter (the diffusers
	# extra); the packaging tests read this checkout's pins, not this environment.
	$(LOWEST)/bin/pytest -q -p no:cacheprovider tests/unit tests/api \
	  --ignore tests/api/test_openapi_fuzz.py --ignore tests/unit/test_packaging.py \
	  --deselect tests/unit/test_descriptors.py::test_tiny_autoencoder_kl_adapter

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
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_sd.py
	$(BIN)/python benchmarks/bench_http.py
	$(BIN)/python benchmarks/bench_cache.py
	$(BIN)/python benchmarks/bench_distributed.py
	$(BIN)/python benchmarks/bench_descriptors.py --threads 1

# Mutation testing of the engine, cache and transports ([tool.mutmut] in pyproject.toml), in a
# copy of the checkout where latentsieve/service, /workers and /index are real folders.
MUTATION_DIR ?= build/mutation
mutation: install-dev system-deps
	$(BIN)/pip install -q 'mutmut>=3.3'
	$(BIN)/python tests/mutation/layout.py $(MUTATION_DIR)
	cd $(MUTATION_DIR) && PATH=$(abspath $(BIN)):$$PATH $(abspath $(BIN))/mutmut run; $(abspath $(BIN))/mutmut results
