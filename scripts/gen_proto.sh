#!/usr/bin/env bash
# Regenerates the Python stubs from protos/ into src/decider/v1/.
# protoc derives Python import paths from proto paths, so the proto package
# decider.v1 becomes the Python package decider.v1 with no import rewriting.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=src/decider/v1
find "$out" -name '*_pb2*.py*' -delete 2>/dev/null || true
mkdir -p "$out"
"$PY" -m grpc_tools.protoc -I protos \
  --python_out=src --grpc_python_out=src \
  --plugin=protoc-gen-mypy="$(dirname "$PY")/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$PY")/protoc-gen-mypy_grpc" \
  --mypy_out=src --mypy_grpc_out=src \
  protos/decider/v1/*.proto
