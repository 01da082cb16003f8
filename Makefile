# Flowscope: `make demo` and `make test` work on a fresh machine (they run `make setup` first).
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/flowscope demo

test: setup
	@bash scripts/run-tests.sh $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) var/*.db* .pytest_cache
