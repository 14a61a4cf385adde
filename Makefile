# `make demo` and `make test` each do their own set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Debian peers the tests talk to (an independent Modbus client). CI runs as root.
tools:
	@command -v mbpoll >/dev/null || { apt-get update -qq && apt-get install -y -qq mbpoll >/dev/null; }

demo: $(STAMP)
	$(VENV)/bin/modbus-bridge demo

test: $(STAMP) tools
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/modbus_tcp.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
