#!/usr/bin/env bash
# `make run-envoy`: the demo (Decider and its stand-in model servers) behind a real Envoy.
# Decider serves the ext_proc endpoint picker on 127.0.0.1:50061; Envoy listens on
# 127.0.0.1:10000 with examples/envoy/override_host.yaml. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VENV:-.venv}"

pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT
trap 'exit 130' INT TERM

"$VENV/bin/decider" serve --demo --ext-proc-listen 127.0.0.1:50061 &
pids+=($!)

# Envoy would answer 500 until the picker is up: wait for its health service first.
"$VENV/bin/python" - <<'PY'
import sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

deadline = time.monotonic() + 30
with grpc.insecure_channel("127.0.0.1:50061") as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    while True:
        try:
            request = health_pb2.HealthCheckRequest(
                service="envoy.service.ext_proc.v3.ExternalProcessor"
            )
            if stub.Check(request, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            sys.exit("Decider's ext_proc listener did not come up on 127.0.0.1:50061")
        time.sleep(0.2)
PY

cat <<'HINT'

Envoy on http://127.0.0.1:10000 asks Decider where to send each request. Try, in another shell:
  curl -si 127.0.0.1:10000/v1/chat/completions -H 'content-type: application/json' \
    -d '{"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "Hi"}]}'
  (the x-decider-endpoint and x-decider-reason response headers say what Decider chose and why)
  .venv/bin/decider endpoints          # in-flight counts, latency and breakers per endpoint
Stop with Ctrl-C.

HINT
"$VENV/bin/envoy" -c examples/envoy/override_host.yaml --concurrency 1 --disable-hot-restart \
  --log-level warning &
pids+=($!)
wait "${pids[-1]}"
