"""bench.grpc's report from made-up runs: the doc section keeps its structure and only it is
replaced in BENCHMARKS.md; a run that was not all grpc-status 0 is a failure."""

from __future__ import annotations

import argparse

from bench.grpc.loadgen import Run
from bench.grpc.report import BEGIN, END, markdown, summary, update_doc
from bench.grpc.rounds import Results, check_runs

ARGS = argparse.Namespace(arch="uvloop", arch_calls=4000, arch_rounds=3)


def run(call: str, rps: float, p50_ms: float, *, cpu_us: float = 100.0, ok: bool = True) -> Run:
    return Run(
        call=call,
        concurrency=32,
        connections=4,
        count=100,
        rps=rps,
        p50_ms=p50_ms,
        p99_ms=p50_ms * 3,
        percentiles_ms={50: p50_ms, 99: p50_ms * 3},
        status={"OK": 100} if ok else {"OK": 90, "Unavailable": 10},
        errors={},
        server_cpu_us=cpu_us,
    )


def results(*, decide_ok: bool = True) -> Results:
    res = Results(machine={"cpus": 2, "cpu": "test CPU", "python": "Python 3", "grpcio": "1"})
    for check_rps, decide_rps in ((1000, 700), (1100, 800), (900, 600)):
        res.rounds.append(
            {
                "check": run("Check", check_rps, 1.0, cpu_us=200),
                "decide": run("Decide", decide_rps, 1.5, cpu_us=300, ok=decide_ok),
                "check_serial": run("Check", 500, 0.4),
                "decide_serial": run("Decide", 400, 0.5),
            }
        )
    res.report_outcome = run("ReportOutcome", 1500, 1.2)
    res.many_connections = run("Decide", 600, 20.0)
    res.architectures = {"aio": res.rounds[0]}
    return res


def test_summary_takes_medians_over_rounds():
    s = summary(results())
    assert (s["check_rps"], s["decide_rps"]) == (1000, 700)
    assert s["throughput_ratio"] == 0.7 and s["serial_p50_ratio"] == 1.25


def test_the_section_keeps_its_structure_and_only_it_is_replaced(tmp_path):
    section = markdown(results(), ARGS)
    assert section.startswith(f"{BEGIN}\n## gRPC load\n") and section.endswith(END)
    for heading in ("| requests/s under load | 1000 | 700 | 0.70", "### Server architectures"):
        assert heading in section
    assert "make bench-grpc   # = .venv/bin/python -m bench.grpc" in section

    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# Benchmarks\n\nintro\n\n{BEGIN}\nold numbers\n{END}\n\n## Other\nkept\n")
    update_doc(section, doc)
    assert doc.read_text() == f"# Benchmarks\n\nintro\n\n{section}\n\n## Other\nkept\n"
    update_doc(section, doc)  # idempotent
    assert doc.read_text().count(BEGIN) == 1


def test_a_run_with_errors_is_reported_as_a_failure():
    res = results(decide_ok=False)
    check_runs(res)
    assert res.failures and all(f.startswith("Decide c=32") for f in res.failures)
    assert "Failures:" in markdown(res, ARGS)
