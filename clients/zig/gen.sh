#!/usr/bin/env bash
# Regenerates the protobuf-c message stubs in clients/zig/gen/ from protos/ (and the
# two google.rpc error details the client reads, clients/zig/proto/). protoc is
# grpcio-tools' from the venv, driving Debian's protoc-gen-c (protobuf-c-compiler).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
PROTOC_GEN_C=${PROTOC_GEN_C:-$(command -v protoc-gen-c || true)}
if [ -z "$PROTOC_GEN_C" ]; then
  echo "gen.sh: protoc-gen-c not found; install Debian's protobuf-c-compiler" >&2
  exit 1
fi
wkt="$("$PY" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"
out=clients/zig/gen
rm -rf "$out"
mkdir -p "$out"
"$PY" -m grpc_tools.protoc -I protos -I clients/zig/proto -I "$wkt" \
  --plugin=protoc-gen-c="$PROTOC_GEN_C" --c_out="$out" \
  protos/decider/v1/*.proto clients/zig/proto/decider/zig/rpc_details.proto \
  "$wkt/google/protobuf/any.proto" "$wkt/google/protobuf/duration.proto"
