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

NODE_CLIENT := tests/opcua_node_client
MQTT_CLIENT := tests/mqtt_node_client

# Debian 12's own interpreter (3.11.2, allowed by requires-python) behaves differently from later
# 3.11 releases in ways that matter to error reporting: the suite runs the bridge under it too.
DEBIAN_PYTHON := /usr/bin/python3.11
DEBIAN_VENV := .venv-debian
DEBIAN_STAMP := $(if $(wildcard $(DEBIAN_PYTHON)),$(DEBIAN_VENV)/.installed)

$(DEBIAN_VENV)/.installed: pyproject.toml
	$(DEBIAN_PYTHON) -m venv $(DEBIAN_VENV) 2>/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && $(DEBIAN_PYTHON) -m venv $(DEBIAN_VENV); }
	$(DEBIAN_VENV)/bin/python -m pip install -q --upgrade pip
	$(DEBIAN_VENV)/bin/python -m pip install -q -e .
	touch $@

# Independent peers the tests talk to: libmodbus's mbpoll, a headless Chromium and the mosquitto
# broker (Debian; CI runs as root), node-opcua and mqtt.js with the Eclipse Tahu Sparkplug decoder
# (npm), so what we serve and publish is checked by code that shares none of ours.
tools: $(NODE_CLIENT)/node_modules/.installed $(MQTT_CLIENT)/node_modules/.installed
	@command -v mbpoll >/dev/null && command -v chromium >/dev/null && command -v mosquitto >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mbpoll chromium mosquitto >/dev/null; }

$(NODE_CLIENT)/node_modules/.installed: $(NODE_CLIENT)/package-lock.json
	npm ci --prefix $(NODE_CLIENT) --no-audit --no-fund --loglevel=error
	touch $@

$(MQTT_CLIENT)/node_modules/.installed: $(MQTT_CLIENT)/package-lock.json
	npm ci --prefix $(MQTT_CLIENT) --no-audit --no-fund --loglevel=error
	touch $@

demo: $(STAMP)
	$(VENV)/bin/modbus-bridge demo

# Most of the suite waits on real peers (ptys, brokers, servers): three workers on two cores. Each
# test file stays in one worker (--dist loadfile): its module-wide broker or bridge is started once.
test: $(STAMP) tools $(DEBIAN_STAMP)
	$(PY) -m pytest -q -n 3 --dist loadfile

bench: $(STAMP)
	$(PY) bench/modbus_tcp.py

clean:
	rm -rf $(VENV) $(DEBIAN_VENV) build *.egg-info .pytest_cache .hypothesis

# The Sparkplug B payload module, generated from its schema by grpcio-tools' protoc (installed into
# the venv if missing; needed only here: the generated module is checked in).
.PHONY: proto
proto: $(STAMP)
	$(PY) -c 'import grpc_tools.protoc' 2>/dev/null || $(PY) -m pip install -q grpcio-tools
	$(PY) -m grpc_tools.protoc --proto_path=. --python_out=. bridge/core/sparkplug_b.proto
