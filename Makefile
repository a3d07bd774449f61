# The two commands a newcomer needs: `make demo` and `make test`.
# Everything they need is installed from here: Debian packages via apt (when root; otherwise
# the apt-get line is printed) and the Python packages into .venv.

PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
APT_PACKAGES := postgresql mosquitto mosquitto-clients prometheus mbpoll kcat iproute2
# Binaries whose presence means the packages above are there (checked before calling apt).
APT_BINARIES := /usr/lib/postgresql /usr/sbin/mosquitto /usr/bin/mosquitto_pub \
                /usr/bin/prometheus /usr/bin/mbpoll /usr/bin/kcat /usr/sbin/ip
TYPECHECK   := build/typecheck/edgefleet
# component folder -> subpackage name, for the type-checking symlink tree
COMPONENTS  := protocols:protocols edge-agent:edge_agent fog-gateway:fog_gateway \
               cloud:cloud firmware-sim:firmware_sim deploy:deploy

.PHONY: help deps venv lint typecheck test test-unit test-integration demo bench clean

help:
	@echo "make demo   run the main job on embedded defaults"
	@echo "make test   install everything, then ruff, mypy and pytest"

deps:
	@missing=""; for path in $(APT_BINARIES); do [ -e $$path ] || missing="$$missing $$path"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian packages (missing:$$missing)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $(APT_PACKAGES) >/dev/null || exit 1; \
	else \
	  echo "missing:$$missing"; \
	  echo "run: sudo apt-get install --no-install-recommends $(APT_PACKAGES)"; exit 1; \
	fi

$(STAMP): pyproject.toml
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	@# An independent Sparkplug B peer for the tests. It pins paho-mqtt<2, which we do not
	@# use through it (only its payload code), so it is installed without its dependencies.
	$(BIN)/python -m pip install -q --no-deps 'pysparkplug==0.6.1'
	@touch $@

venv: $(STAMP)

$(TYPECHECK):
	@mkdir -p $@
	@for pair in $(COMPONENTS); do ln -sfn ../../../$${pair%%:*} $@/$${pair#*:}; done

lint: venv
	$(BIN)/ruff check .

typecheck: venv $(TYPECHECK)
	$(BIN)/mypy -p edgefleet

test-unit: venv
	$(BIN)/pytest tests/unit -q

test-integration: deps venv
	$(BIN)/pytest tests/integration -q

test: deps venv lint typecheck
	$(BIN)/pytest tests -q

demo: deps venv
	$(BIN)/edgefleet demo

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
