# kubetune: `make demo` runs a real TrainingRun locally, `make test` runs every test.
# Everything slow to build (the Python env, the control plane from Go modules, kubectl/helm)
# is cached outside the repo under $(CACHE), keyed by version, so only a fresh machine pays.
SHELL := /bin/bash
PYTHON_BASE ?= python3.11
CACHE ?= $(or $(KUBETUNE_CACHE),$(HOME)/.cache/kubetune)
# Keyed by the pins and the interpreter: editing pyproject.toml reinstalls in place, a new pin makes a new env.
ENV_KEY := $(shell (cat constraints.txt; $(PYTHON_BASE) --version 2>&1) | sha256sum | cut -c1-12)
VENV ?= $(CACHE)/venv-$(ENV_KEY)
PY := $(VENV)/bin/python
# Per checkout: the editable install points at one checkout, so a new clone reinstalls it.
STAMP := $(VENV)/.installed-$(shell pwd | sha256sum | cut -c1-12)
PYTEST := $(PY) -m pytest
DEMO_DIR ?= demo

.PHONY: bench bench-control-plane setup demo test test-tools test-unit test-trainer test-e2e control-plane node node-images cluster cluster-down crds lint clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@mkdir -p $(CACHE)
	@test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -c constraints.txt -e ".[trainer,dev]"
	@rm -f $(VENV)/.installed-* && touch $(STAMP)
	@ln -sfn $(VENV) .venv

# The quick start: a tiny model built locally, then the whole lifecycle as local processes.
demo: setup
	@test -f build/tiny-model/config.json || $(PY) -m kubetune_trainer tiny-model build/tiny-model
	$(VENV)/bin/kubetune run examples/quickstart.yaml --local --workdir $(DEMO_DIR)

control-plane:
	bash tests/cluster/build.sh

# Real nodes (kubelet, containerd, CNI, CoreDNS): the Debian packages, then the Go builds (cached).
node:
	bash tests/cluster/node-deps.sh
	bash tests/cluster/build-node.sh

# A local cluster on real nodes with the project's images loaded; prints `export KUBECONFIG=...`.
cluster: setup control-plane node-images
	@$(PY) -m tests.cluster.kubelet_cluster up

cluster-down: setup
	@$(PY) -m tests.cluster.kubelet_cluster down

# The project's images built and imported for real nodes (cached by content hash; slow when new).
node-images: setup node
	$(PY) -m tests.cluster.kubelet_cluster images

# The e2e tests run on real nodes (the images built and loaded first), unless KUBETUNE_E2E_NODE=agent
# (the node agent) or KUBETUNE_E2E_KUBECONFIG names a cluster of your own.
NODE_PREREQ := $(if $(filter agent,$(KUBETUNE_E2E_NODE))$(KUBETUNE_E2E_KUBECONFIG),,node-images)

# What the tests share, made once before the lanes start, so no two lanes build or install it at once.
test-tools: setup
	@for tool in helm-unittest kubeconform luahealth kueue; do bash tools/go-tool.sh $$tool >/dev/null || exit 1; done
	@bash tools/prometheus.sh promtool >/dev/null
	@$(PY) -c 'from tests.cluster import binaries; binaries.tools_dir()'

# Every test, as three parallel lanes (tests/support/lanes.py); KUBETUNE_TEST_JOBS=1 runs them in turn.
test: setup control-plane test-tools $(NODE_PREREQ)
	$(VENV)/bin/lint-imports --config pyproject.toml
	$(PY) -m kubetune.crdgen --check
	$(PY) -m tests.support.lanes -q -ra --durations=10

test-unit: setup
	$(PYTEST) -q tests/unit

test-trainer: setup
	$(PYTEST) -q tests/trainer

test-e2e: setup control-plane $(NODE_PREREQ)
	$(PYTEST) -q -ra tests/e2e tests/cluster

crds: setup
	$(PY) -m kubetune.crdgen
	$(PY) tools/chart_sync.py  # the chart's copy of the CRD (tests/chart checks it)

# Every benchmark, one after another; each prints its figure last (BENCHMARKS.md records them).
# Helpers are bench/_*.py and bench/*common.py; GPU figures are shell scripts run by hand.
bench: setup
	$(PY) -m pip install -q -r bench/requirements.txt
	@set -e; for script in bench/*.py; do \
	  case $$(basename $$script) in _*|*common.py) continue;; esac; \
	  echo "== $$script"; $(PY) $$script; done

# The control plane at scale (also part of `make bench`): RUNS TrainingRuns at once. The controller
# manager's client at 200 QPS, as large clusters run it: at its default 20 it, not the operator,
# set the pace of Job -> pod (21-42 s per Job at 200 runs).
RUNS ?= 200
bench-control-plane: setup
	$(PY) bench/control_plane.py --runs $(RUNS) --kcm-qps 200

lint: setup
	$(VENV)/bin/lint-imports --config pyproject.toml

clean-demo:
	rm -rf $(DEMO_DIR) build/tiny-model
