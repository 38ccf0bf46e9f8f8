#!/usr/bin/env bash
# Regenerates the Go stubs in clients/go/gen/ from protos/ with the pinned
# protoc-gen-go and protoc-gen-go-grpc (make proto-go installs them into .tools/bin).
# protoc itself comes from grpcio-tools in the venv, the same one the Python stubs use.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
TOOLS_BIN=${TOOLS_BIN:-.tools/bin}
out=clients/go/gen
rm -rf "$out/decider"
mkdir -p "$out"
"$PY" -m grpc_tools.protoc -I protos \
  --plugin=protoc-gen-go="$TOOLS_BIN/protoc-gen-go" \
  --plugin=protoc-gen-go-grpc="$TOOLS_BIN/protoc-gen-go-grpc" \
  --go_out=clients/go --go_opt=module=github.com/decider-dev/decider/clients/go \
  --go-grpc_out=clients/go --go-grpc_opt=module=github.com/decider-dev/decider/clients/go \
  protos/decider/v1/*.proto
