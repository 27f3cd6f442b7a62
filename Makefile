# Tandem: `make serve` sets up .venv and serves the model kit; `make test` sets up and tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 50051
METRICS_PORT ?= 9400
# The set-up is redone when the dependency list changes.
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: setup prepare serve test bench proto lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The pin selects PyTorch's CPU build; a looser one pulls several GB of CUDA packages.
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

prepare: setup
	$(BIN)/tandem prepare

serve: prepare
	$(BIN)/tandem serve --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/bench_decode.py

proto: setup
	$(BIN)/python -m server.gen_proto

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV)
