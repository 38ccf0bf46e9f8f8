# Decider: `make run` serves decisions on the embedded default; `make test` installs and tests everything.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := $(CURDIR)/.tools
export PATH := $(TOOLS)/bin:$(TOOLS)/node_modules/.bin:$(PATH)
PYTEST_ARGS ?=

# Versions pinned so generated code and tool output are reproducible.
BUF_VERSION := 1.75.0
GRPCURL_VERSION := v1.9.4
GHZ_VERSION := v0.121.0
PROTOC_GEN_GO_VERSION := v1.36.11
PROTOC_GEN_GO_GRPC_VERSION := v1.6.0

.PHONY: help install tools redis-server run test test-python test-go lint lint-imports proto proto-check proto-go proto-go-check bench bench-decide-path bench-grpc bench-tracing bench-idle-connections bench-scale sim clean

help:
	@echo "make run    serve the demo: Decider on 127.0.0.1:50051 with local stand-in model servers"
	@echo "make test   install everything (venv, grpcurl, buf), check generated code, run pytest then go test"
	@echo "make lint   ruff, mypy --strict on src, buf lint"
	@echo "make proto  regenerate src/decider/v1 from protos/"

install: $(VENV)/.installed tools

# Reinstalls when pyproject.toml changes; the marker keeps repeated runs fast.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
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

test: install redis-server proto-check lint-imports test-python test-go

# The shared-state tests start their own redis-server (Debian's package) on a free loopback port.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
redis-server:
	@command -v redis-server >/dev/null || { \
	  $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends redis-server; }

# pytest exits 5 when it collected nothing; that is a failure here, never a pass.
test-python: install redis-server
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The Go client's tests start the real decider from $(VENV) (skipped, saying so, only without it).
test-go: install
	cd clients/go && go vet ./... && go test -count=1 ./...

# Go stubs for clients/go with the pinned plugins; protoc is grpcio-tools' from the venv.
GO_PLUGINS := $(TOOLS)/bin/protoc-gen-go $(TOOLS)/bin/protoc-gen-go-grpc

$(TOOLS)/bin/protoc-gen-go:
	GOBIN=$(TOOLS)/bin go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)

$(TOOLS)/bin/protoc-gen-go-grpc:
	GOBIN=$(TOOLS)/bin go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)

$(TOOLS)/bin/ghz:
	GOBIN=$(TOOLS)/bin go install github.com/bojand/ghz/cmd/ghz@$(GHZ_VERSION)

proto-go: install $(GO_PLUGINS)
	PYTHON=$(PY) TOOLS_BIN=$(TOOLS)/bin clients/go/gen.sh

proto-go-check: proto-go
	@if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  echo "proto-go-check: not a git checkout, freshness not checked"; exit 0; fi; \
	changed="$$(git status --porcelain --untracked-files=all -- clients/go/gen)"; \
	if [ -n "$$changed" ]; then \
	  echo "$$changed"; \
	  echo "Go stubs are stale: run 'make proto-go' and commit clients/go/gen"; exit 1; fi; \
	echo "proto-go-check: Go stubs are fresh"

# The import contracts in pyproject.toml: layers point one way, the core stays pure, the prober
# depends on the core and the public API only. Part of `make test`, so CI enforces them.
lint-imports: install
	$(VENV)/bin/lint-imports

lint: install lint-imports
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy src
	cd protos && buf lint

proto: install
	PYTHON=$(PY) scripts/gen_proto.sh

# Fails when the committed stubs differ from what the protos produce, including generated
# files that exist but were never committed.
proto-check: install proto-go-check
	cd protos && buf lint
	PYTHON=$(PY) scripts/gen_proto.sh
	@if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  echo "proto-check: not a git checkout, freshness not checked"; exit 0; fi; \
	changed="$$(git status --porcelain --untracked-files=all -- src/decider/v1)"; \
	if [ -n "$$changed" ]; then \
	  echo "$$changed"; git --no-pager diff --stat -- src/decider/v1; \
	  echo "generated code is stale: run 'make proto' and commit src/decider/v1"; exit 1; fi; \
	echo "proto-check: generated code is fresh"

bench: install
	$(PY) bench/bench_core.py

# The unary Decide path in-process, stage by stage (parse, convert, engine, observer, encode,
# the whole handler) against Health/Check through the same interceptor (seconds).
bench-decide-path: install
	$(PY) -m bench.bench_decide_path

# gRPC load from ghz against the real server (a few minutes): writes docs/BENCHMARKS.md's
# "gRPC load" numbers to bench/results/ and the plot to docs/img/. Never part of `make test`.
bench-grpc: install $(TOOLS)/bin/ghz
	$(PY) -m bench.grpc --ghz $(TOOLS)/bin/ghz

# Tracing overhead end to end: Decide throughput with tracing off, a 1% sampler and always_on,
# alternating in one run, spans exported over OTLP (about a minute). Never part of `make test`.
bench-tracing: install $(TOOLS)/bin/ghz
	$(PY) -m bench.bench_tracing_grpc --ghz $(TOOLS)/bin/ghz

# Server memory, threads and Decide latency with thousands of idle HTTP/2 connections open
# (about a minute): writes docs/BENCHMARKS.md's "Idle gateway connections". Never part of `make test`.
bench-idle-connections: install
	$(PY) bench/bench_idle_connections.py

# Scale-out: Decide throughput with the memory and Redis backends and with 2 workers (ghz),
# registry sync delay and probing-lease takeover between replicas (a few minutes). Writes
# bench/results/scale.json and the bench-scale tables of docs/BENCHMARKS.md and docs/SCALING.md.
bench-scale: install redis-server $(TOOLS)/bin/ghz
	$(PY) -m bench.scale.bench_scale --ghz $(TOOLS)/bin/ghz

# Cluster simulation driving the real engine: writes docs/SIMULATION.md and docs/img/sim_*.png.
sim: install
	$(PY) -m bench.sim

clean:
	rm -rf $(VENV) $(TOOLS)
