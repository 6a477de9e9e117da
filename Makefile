# The two commands of the README: `make demo` and `make test`.
# Both set everything up from scratch on a fresh Debian 12 machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all deps venv demo test lint typecheck unit bench bench-http bench-dicom bench-hl7 bench-smoke clean

all: test

deps:
	bash scripts/install-deps.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/medlb demo

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: venv
	$(BIN)/mypy --strict src/medlb

unit: venv
	$(BIN)/pytest -q

test: deps venv lint typecheck unit

bench: deps venv
	$(BIN)/python bench/tcp_bench.py

bench-http: deps venv
	$(BIN)/python bench/http_bench.py

bench-dicom: deps venv
	$(BIN)/python bench/dicom_bench.py

bench-hl7: deps venv
	$(BIN)/python bench/hl7_bench.py

bench-smoke: deps venv
	$(BIN)/python bench/tcp_bench.py --smoke --out /tmp/medlb-bench-smoke.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
