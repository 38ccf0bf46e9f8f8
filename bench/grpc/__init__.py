"""gRPC load benchmark: Decider as a gateway sees it, loaded by ghz (compiled Go), not Python.

    make bench-grpc        # or: .venv/bin/python -m bench.grpc --ghz .tools/bin/ghz

On one server, alternating round by round: grpc.health.v1.Health/Check (the transport floor of
the same stack) and Decide (100 endpoints, composite strategy, sessions and prefix hashes so
session and cache affinity are exercised), each under concurrent load and serially, from ghz
and, when it is installed, from h2load (a lighter client); in the same rounds, the same ghz runs
against a second server whose Decide replays one answer (Decide's message sizes with no Python
work). Then a streaming Decide cost probe,
ReportOutcome throughput, 1000 concurrent HTTP/2 connections doing Decide with the server's RSS
and connections sampled, and the same calls on each server architecture (launch.py).
Before the load, 20 requests go through the gateway flow with decider_client (Decide, a failing
attempt, a fallback, ReportOutcome) on the same server. Every ghz run uses a fixed request
count (not a duration, which cuts calls off mid-flight) and must come back all grpc-status 0.

Writes bench/results/grpc_load.json, docs/img/grpc_latency.png and the "gRPC load" section of
docs/BENCHMARKS.md (between its markers; the other sections are left alone).

The modules: workload (what is sent), servers (Decider processes, /proc readings), loadgen
(ghz and h2load), rounds (the phases), report (summary, plot, doc section, JSON), run (the
command line); launch.py builds each server architecture and runs as its own process.
"""
