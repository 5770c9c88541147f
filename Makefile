# Two commands after cloning: `make run` and `make test`. Each installs what is missing first
# (Debian packages as root, then the venv), so a fresh Debian 12 machine needs nothing by hand.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := libsystemd-dev pkg-config gcc python3-dev python3-venv tshark tcpflow tcpreplay \
	iproute2 systemd util-linux ethtool
SAMPLE := build/sample.pcap
# `make run` captures live on the interface of the default route (IFACE= to choose);
# `make run PCAP=file` reads a capture instead (PCAP=sample: a small built sample).
IFACE ?= $(shell ip route show default 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($$i == "dev") {print $$(i+1); exit}}')
PCAP ?=
ARGS ?=

.PHONY: run test deps apt venv lint typecheck readme bench clean install uninstall

deps: apt venv

apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections 2>/dev/null || true; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

# The engine modules Cython compiles (COMPILED_MODULES in daemon/engine/compiled.py).
# `pip install -e .`
# builds them once, and an edit to their .py source is not seen until the next install: so the
# venv stamp depends on those sources too, and an edit reinstalls (and recompiles) on the next
# `make test` / `make run`.
BUILD_BACKEND := packaging/backend/streamtap_build.py packaging/backend/engine_modules.py
ENGINE_SOURCES := $(shell python3 packaging/backend/engine_modules.py)

$(VENV)/.installed: pyproject.toml daemon/engine/compiled.py $(BUILD_BACKEND) $(ENGINE_SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: deps
ifeq ($(PCAP),sample)
	$(MAKE) --no-print-directory $(SAMPLE)
	$(VENV)/bin/streamtap -r $(SAMPLE) $(ARGS)
else ifneq ($(PCAP),)
	$(VENV)/bin/streamtap -r $(PCAP) $(ARGS)
else
	@test -n "$(IFACE)" || { echo "make run: no default route; give IFACE=name or PCAP=file" >&2; exit 2; }
	$(VENV)/bin/streamtap -i $(IFACE) --config config/default.yaml $(ARGS)
endif

# the sample is built, not shipped: a handful of scripted connections (tests/sample.py)
$(SAMPLE): tests/sample.py tests/pcapbuild.py
	$(PY) tests/sample.py $@

# CouchDB-compatible server for the CouchDB sink tests (CouchDB is not in Debian's archive)
POUCHDB := build/node/node_modules/.bin/pouchdb-server
$(POUCHDB):
	@command -v npm >/dev/null || { export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends nodejs npm; }
	npm install --silent --no-audit --no-fund --prefix build/node pouchdb-server@4
	@test -x $@ && touch $@

test: deps $(POUCHDB)
	$(VENV)/bin/ruff check .
	$(MAKE) --no-print-directory typecheck
	$(VENV)/bin/python -m pytest -q

# mypy and import-linter (the layers, README "Layout") do not follow package-dir, so they check
# a throwaway non-editable install (DESIGN),
# built without compiling the engine modules (mypy reads their .py)
typecheck: venv
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	STREAMTAP_COMPILE=0 $(PY) -m pip install -q --no-deps --target "$$tmp/site" . >/dev/null && \
	rm -rf build/lib build/lib.* build/bdist.* build/temp.* && \
	cd "$$tmp/site" && $(CURDIR)/$(VENV)/bin/mypy -p streamtap --ignore-missing-imports && \
	PYTHONPATH="$$tmp/site" $(CURDIR)/$(VENV)/bin/lint-imports $(CURDIR)/pyproject.toml

lint: venv
	$(VENV)/bin/ruff check .

# the README's configuration table, from config/schema.py (tests/test_readme.py checks it)
# everything generated from the schema: the README's tables and the shipped default.yaml
readme: venv
	$(PY) tests/readme_config.py --write
	$(PY) -c 'from streamtap import config; from streamtap.sinks.registry import sink_types; \
	    open("config/default.yaml", "w").write(config.dump(config.default(), comments=True, \
	    sink_types=sink_types()))'

# dpkt: the reference reassembler bench/offline.py compares with (the `bench` extra)
bench: deps $(VENV)/.bench
	$(PY) bench/offline.py

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

# the service: a venv in /opt/streamtap, the unit, the user, example configs (idempotent)
install: apt
	packaging/install.sh

uninstall:
	packaging/uninstall.sh

clean:
	rm -rf $(VENV) build *.egg-info
	rm -f $(foreach f,$(ENGINE_SOURCES),$(f:.py=).*.so)
