# Decider: `make run` serves decisions on the embedded default; `make test` installs and tests everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := $(CURDIR)/.tools
export PATH := $(TOOLS)/bin:$(TOOLS)/node_modules/.bin:$(PATH)

# Versions pinned so generated code and tool output are reproducible.
BUF_VERSION := 1.75.0
GRPCURL_VERSION := v1.9.4
GHZ_VERSION := v0.121.0
PROTOC_GEN_GO_VERSION := v1.36.11
PROTOC_GEN_GO_GRPC_VERSION := v1.6.0

.PHONY: install tools run test test-python test-go lint proto proto-check bench bench-grpc sim clean

install: $(VENV)/.installed tools

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Go and npm tools land in .tools/ so nothing is installed outside the checkout.
tools: $(TOOLS)/bin/grpcurl $(TOOLS)/node_modules/.bin/buf

$(TOOLS)/bin/grpcurl:
	GOBIN=$(TOOLS)/bin go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

$(TOOLS)/node_modules/.bin/buf:
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) @bufbuild/buf@$(BUF_VERSION)

run: install
	$(VENV)/bin/decider serve --demo

test: install proto-check
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy src
	cd protos && buf lint

proto: install
	PYTHON=$(PY) scripts/gen_proto.sh

# Fails when the committed stubs differ from what the protos produce.
proto-check: install
	cd protos && buf lint
	PYTHON=$(PY) scripts/gen_proto.sh
	git diff --exit-code --stat -- src/decider/v1 || { echo "generated code is stale: run 'make proto' and commit"; exit 1; }

bench: install
	$(PY) bench/bench_core.py

clean:
	rm -rf $(VENV) $(TOOLS)
