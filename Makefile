# Realtime: `make dev` runs a local cluster, `make test` runs every check CI runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
NODE_STAMP := tests/node_modules/.installed-stamp
# Debian's Chromium, for the browser test (tests/node/browser.mjs drives it with playwright-core).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install dev test test-faults test-image lint unit bench bench-quick clean

$(STAMP): pyproject.toml protocol/pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ./protocol -e ./client -e '.[dev,test,bench]'
	touch $(STAMP)

$(NODE_STAMP): tests/package.json tests/package-lock.json
	cd tests && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

$(CHROMIUM):
	$(SUDO) apt-get install -y -q --no-install-recommends chromium \
	  || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends chromium)

# iproute2 and iptables, for the partition fault's network namespaces (testing/netns.py).
NETNS_TOOLS := /usr/sbin/ip /usr/sbin/iptables
$(NETNS_TOOLS):
	$(SUDO) apt-get install -y -q --no-install-recommends iproute2 iptables \
	  || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends iproute2 iptables)

install: $(STAMP) $(NODE_STAMP) $(CHROMIUM) $(NETNS_TOOLS)

dev: $(STAMP)
	$(BIN)/realtime dev

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install lint
	$(BIN)/pytest

# The fault suite's long versions (issue 14, docs/GUARANTEES.md): every fault repeated under
# a longer storm on a 3-node NATS cluster; up to 30 minutes. `make test` runs the short ones.
# Then the handshake and long-poll fuzzing with new random examples (`make test` uses a
# fixed sequence, so CI stays reproducible).
# The partition fault builds network namespaces: it needs root (CAP_NET_ADMIN).
test-faults: install
	RT_FAULTS_LONG=1 $(BIN)/pytest -p no:cacheprovider tests/faults
	RT_FUZZ_RANDOM=1 $(BIN)/pytest -p no:cacheprovider tests/integration/test_floods.py

# The image, built and run for real: Debian's docker.io (a private dockerd with no bridge and
# no iptables; containers use --network host), the Dockerfile's base image made with
# debootstrap, dependencies from a wheelhouse built here (no index reachable from builds).
IMAGE_STATE := .image-test
IMAGE_DOCKER := DOCKER_HOST=unix://$(CURDIR)/$(IMAGE_STATE)/docker.sock /usr/bin/docker

test-image: install
	$(SUDO) deploy/image-env.sh $(IMAGE_STATE) > /dev/null
	$(BIN)/pip wheel --quiet --wheel-dir deploy/wheelhouse ./protocol . setuptools
	$(IMAGE_DOCKER) build --quiet --network host -f deploy/Dockerfile \
	  --build-arg PIP_NO_INDEX=1 -t realtime:latest .
	DOCKER_HOST=unix://$(CURDIR)/$(IMAGE_STATE)/docker.sock $(BIN)/pytest -p no:cacheprovider deploy/test_image.py

unit: $(STAMP)
	$(BIN)/pytest tests/unit

# Benchmarks (not tests): write BENCHMARKS.md and bench/results/*.png.
bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-quick: $(STAMP)
	$(BIN)/python -m bench.run --quick

clean:
	rm -rf $(VENV) tests/node_modules .realtime .mypy_cache .ruff_cache .pytest_cache
