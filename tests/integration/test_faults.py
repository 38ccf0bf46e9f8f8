"""Faults through the real server: start-up errors a new user hits (data directory, address in
use, a corrupted registry), the data directory failing during RegisterEndpoint, the /metrics
port held open by idle and slow clients, and dead connections reaped by keepalive.

Disk faults use real file systems where this machine allows it (root with mount and loop
devices): a tiny tmpfs that fills up, and an ext4 image that the kernel turns read-only after an
error (`errors=remount-ro` and ext4's `trigger_fs_error`, what a failing disk does). Elsewhere
the full disk falls back to SQLite's own `max_page_count` limit, and the read-only case is
skipped, saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import make_settings
from decider_support import ErrorInfo, RetryInfo, detail, endpoints_doc

from decider.runtime.server import DeciderServer
from decider.state.registry import EndpointStore
from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import decider_service_pb2_grpc as dgrpc
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb
from decider.v1 import registry_service_pb2_grpc as rgrpc

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


def env_with_src() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


async def serve_once(*args: str) -> tuple[int, str]:
    """Runs `decider serve ARGS` expecting it to refuse to start; returns (exit code, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "decider",
        "serve",
        *args,
        env=env_with_src(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("decider serve did not refuse to start") from None
    return proc.returncode or 0, err.decode()


# ------------------------------------------------------------------------ mounts, when allowed


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def _mount_allowed() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(f"/tmp/decider-mount-probe-{os.getpid()}-{threading.get_ident()}")
    probe.mkdir(exist_ok=True)
    try:
        if _run("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)).returncode != 0:
            return False
        _run("umount", str(probe))
        return True
    finally:
        probe.rmdir()


MOUNT = _mount_allowed()


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    assert done.returncode == 0, done.stderr
    try:
        yield path
    finally:
        _run("umount", "-l", str(path))


@contextlib.contextmanager
def ext4_image(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A small ext4 file system on a loop device, mounted errors=remount-ro; yields the mount
    point and the file system's trigger_fs_error control."""
    if not MOUNT or not (shutil.which("losetup") and shutil.which("mkfs.ext4")):
        pytest.skip("needs root with mount, losetup and mkfs.ext4 to make a disk go read-only")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    made = _run("mkfs.ext4", "-q", "-F", str(image))
    assert made.returncode == 0, made.stderr
    attached = _run("losetup", "-f", "--show", str(image))
    if attached.returncode != 0:
        pytest.skip(f"no loop device available: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        done = _run("mount", "-o", "errors=remount-ro", device, str(mount_point))
        if done.returncode != 0:
            pytest.skip(f"cannot mount an ext4 image here: {done.stderr.strip()}")
        trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
        if not trigger.exists():
            _run("umount", str(mount_point))
            pytest.skip(f"{trigger} is missing: this kernel cannot inject an ext4 error")
        try:
            yield mount_point, trigger
        finally:
            _run("umount", "-l", str(mount_point))
    finally:
        _run("losetup", "-d", device)


# ------------------------------------------------------------------------ start-up errors


async def test_a_data_dir_that_is_a_file_is_a_start_error(tmp_path):
    path = tmp_path / "data"
    path.write_text("not a directory\n")
    code, err = await serve_once("--listen", "127.0.0.1:0", "--data-dir", str(path))
    assert code == 2, err
    assert f"decider: server.data_dir: {path}: exists and is not a directory" in err
    assert "Traceback" not in err


async def test_a_data_dir_that_cannot_be_created_is_a_start_error(tmp_path):
    parent = tmp_path / "a-file"
    parent.write_text("")
    path = parent / "data"
    code, err = await serve_once("--listen", "127.0.0.1:0", "--data-dir", str(path))
    assert code == 2, err
    assert f"server.data_dir: {path}: cannot create the directory: Not a directory" in err
    assert "Traceback" not in err


async def test_a_read_only_data_dir_is_a_start_error(tmp_path):
    path = tmp_path / "data"
    if MOUNT:
        context: contextlib.AbstractContextManager[object] = tmpfs(path, "1m")
    elif os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        context = contextlib.nullcontext()
    else:
        pytest.skip("root without mount: no way to make a directory read-only for root")
    with context:
        if MOUNT:
            assert _run("mount", "-o", "remount,ro", str(path)).returncode == 0
        code, err = await serve_once("--listen", "127.0.0.1:0", "--data-dir", str(path))
    assert code == 2, err
    cause = "Read-only file system" if MOUNT else "Permission denied"
    assert (
        f"server.data_dir: {path / 'registry.sqlite3'}: cannot open the registry store: "
        f"the directory is not writable: {cause}"
    ) in err
    assert "Traceback" not in err


@pytest.mark.parametrize("which", ["--listen", "--metrics-listen"])
async def test_an_address_in_use_says_so_first(tmp_path, which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--data-dir", "", "--listen", "127.0.0.1:0"]
        args += [which, f"127.0.0.1:{port}"]
        code, err = await serve_once(*args)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"decider: address already in use: 127.0.0.1:{port}"), last
    assert "Traceback" not in err


def drop_journal(path: Path) -> None:
    for extra in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{extra}")


@pytest.mark.parametrize("damage", ["not a database", "a row that is not an endpoint"])
async def test_a_corrupted_registry_file_is_a_start_error_with_a_recovery(tmp_path, damage):
    data = tmp_path / "data"
    store = EndpointStore(data)
    store.close()
    path = data / EndpointStore.FILENAME
    if damage == "not a database":
        drop_journal(path)
        path.write_bytes(b"this is not sqlite\n" * 200)
    else:
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("INSERT INTO endpoints (id, body) VALUES ('x', '{\"id\": ')")
    code, err = await serve_once("--listen", "127.0.0.1:0", "--data-dir", str(data))
    assert code == 2, err
    assert f"server.data_dir: {path}: the registry store is unreadable or corrupted" in err
    assert "move the file aside" in err
    assert "Traceback" not in err
    # The documented recovery: moved aside, the server starts with the config endpoints.
    path.rename(path.with_suffix(".corrupt"))
    drop_journal(path)
    settings = make_settings(data, endpoints_doc("m", 1))
    server = DeciderServer(settings)
    await server.start()
    await server.stop(0)


# ------------------------------------------------------------------------ disk faults at run time


def big_endpoint(i: int) -> epb.Endpoint:
    # Large labels fill the disk in a few calls.
    labels = {f"label-{k}": "x" * 200 for k in range(20)}
    return epb.Endpoint(id=f"r-{i}", address=f"127.0.0.1:{30000 + i}", model="m", labels=labels)


async def register_until_refused(
    registry: rgrpc.RegistryServiceAsyncStub, limit: int = 2000
) -> tuple[list[str], grpc.aio.AioRpcError]:
    acknowledged: list[str] = []
    for i in range(limit):
        try:
            await registry.RegisterEndpoint(
                rpb.RegisterEndpointRequest(endpoint=big_endpoint(i)), timeout=10
            )
        except grpc.aio.AioRpcError as err:
            return acknowledged, err
        acknowledged.append(f"r-{i}")
    raise AssertionError(f"{limit} registrations and the disk never filled")


async def listed_ids(registry: rgrpc.RegistryServiceAsyncStub) -> set[str]:
    reply = await registry.ListEndpoints(rpb.ListEndpointsRequest(), timeout=10)
    return {e.id for e in reply.endpoints}


async def still_decides(decider: dgrpc.DeciderServiceAsyncStub, times: int = 20) -> None:
    for _ in range(times):
        reply = await decider.Decide(dpb.DecideRequest(model="m"), timeout=10)
        assert reply.endpoint.id


async def test_a_full_disk_refuses_registration_and_loses_nothing(tmp_path, start_server):
    data = tmp_path / "full"
    doc = endpoints_doc("m", 2)
    with tmpfs(data, "256k") if MOUNT else contextlib.nullcontext(data.mkdir()):
        async with start_server(doc, data_dir=str(data)) as srv:
            if not MOUNT:
                # SQLite's own size limit stands in for the disk: the same SQLITE_FULL.
                store = srv.server.registry._store
                assert store is not None
                pages = store._db.execute("PRAGMA page_count").fetchone()[0]
                store._db.execute(f"PRAGMA max_page_count = {pages + 20}")
            acknowledged, err = await register_until_refused(srv.registry)
            assert acknowledged, "not even one registration fit"
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            message = err.details() or ""
            assert str(data / EndpointStore.FILENAME) in message
            assert "database or disk is full" in message
            assert "nothing was changed" in message
            assert detail(err, ErrorInfo).reason == "STORAGE_UNAVAILABLE"
            assert detail(err, RetryInfo).retry_delay.seconds > 0
            refused = f"r-{len(acknowledged)}"
            # Memory holds exactly what was acknowledged, and decisions go on.
            assert await listed_ids(srv.registry) == {"m-0", "m-1", *acknowledged}
            await still_decides(srv.decider)
        # What was acknowledged is on disk: a restart finds every one of them.
        async with start_server(doc, data_dir=str(data)) as again:
            ids = await listed_ids(again.registry)
            assert set(acknowledged) <= ids
            assert refused not in ids


async def test_a_disk_gone_read_only_refuses_registration_and_loses_nothing(tmp_path, start_server):
    with ext4_image(tmp_path) as (mount_point, trigger):
        data = mount_point / "data"
        doc = endpoints_doc("m", 2)
        async with start_server(doc, data_dir=str(data)) as srv:
            for i in range(3):
                await srv.registry.RegisterEndpoint(
                    rpb.RegisterEndpointRequest(endpoint=big_endpoint(i)), timeout=10
                )
            # The kernel remounts the file system read-only after an error, files open or not.
            trigger.write_text("decider fault test\n")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await srv.registry.RegisterEndpoint(
                    rpb.RegisterEndpointRequest(endpoint=big_endpoint(3)), timeout=10
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            message = err.value.details() or ""
            assert str(data / EndpointStore.FILENAME) in message
            assert "Read-only file system" in message
            assert detail(err.value, ErrorInfo).reason == "STORAGE_UNAVAILABLE"
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await srv.registry.DeregisterEndpoint(
                    rpb.DeregisterEndpointRequest(endpoint_id="r-0"), timeout=10
                )
            assert gone.value.code() == grpc.StatusCode.UNAVAILABLE
            assert await listed_ids(srv.registry) == {"m-0", "m-1", "r-0", "r-1", "r-2"}
            await still_decides(srv.decider)
        # The three acknowledged registrations are on the (read-only) disk.
        with contextlib.closing(
            sqlite3.connect(f"file:{data / EndpointStore.FILENAME}?mode=ro", uri=True)
        ) as db:
            rows = {r[0] for r in db.execute("SELECT id FROM endpoints")}
        assert rows == {"r-0", "r-1", "r-2"}


# ------------------------------------------------------------------------ /metrics held open


async def test_metrics_port_held_open_by_idle_and_slow_clients_does_not_stop_decisions(
    start_server,
):
    baseline_threads = threading.active_count()
    async with start_server(endpoints_doc("m", 3), metrics_listen="127.0.0.1:0") as srv:
        assert srv.server.metrics_server is not None
        port = srv.server.metrics_server.port
        held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            for i in range(300):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if i % 3 == 0:
                    # A slow client: half a request line, then nothing.
                    writer.write(b"GET /metr")
                    await writer.drain()
                held.append((reader, writer))
            started = time.monotonic()
            await still_decides(srv.decider, times=300)
            assert time.monotonic() - started < 60  # a bound on the loop, not a timing claim
            # One thread per served connection, at most the server's cap of them.
            from decider.obs.metrics import METRICS_MAX_CONNECTIONS

            assert threading.active_count() <= baseline_threads + METRICS_MAX_CONNECTIONS + 8
        finally:
            for _, writer in held:
                writer.close()
            for _, writer in held:
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
        # Once they let go, scrapes are served again.
        async with httpx.AsyncClient() as http:
            for _ in range(100):
                try:
                    reply = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
                except httpx.HTTPError:
                    await asyncio.sleep(0.1)
                    continue
                if reply.status_code == 200:
                    break
            assert reply.status_code == 200
            assert "decider_decisions_total" in reply.text


# ------------------------------------------------------------------------ keepalive


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
PING = 6


async def test_a_dead_idle_connection_is_pinged_then_closed(start_server):
    """A client that opened HTTP/2 and then stopped answering (a crashed gateway host) is
    found by the server's keepalive ping and its connection closed."""
    async with start_server(keepalive_time_s=1.0, keepalive_timeout_s=1.0) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.server.port)
        writer.write(PREFACE + SETTINGS + SETTINGS_ACK)
        await writer.drain()
        frame_types: list[int] = []
        closed = False
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                try:
                    head = await asyncio.wait_for(reader.readexactly(9), 5)
                except asyncio.IncompleteReadError:
                    closed = True
                    break
                except TimeoutError:
                    continue
                length = int.from_bytes(head[:3], "big")
                frame_types.append(head[3])
                await reader.readexactly(length)
                # Never answer a PING: this peer is dead.
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert PING in frame_types, frame_types
        assert closed, f"the server kept a connection that never answered its ping: {frame_types}"


async def test_keepalive_and_connection_age_reach_the_server_options(tmp_path):
    from decider.runtime.server import grpc_options

    settings = make_settings(
        tmp_path, {}, max_connection_age_s=600.0, max_connection_idle_s=0.0
    ).server
    options = dict(grpc_options(settings))
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.keepalive_timeout_ms"] == 20_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert options["grpc.max_connection_age_ms"] == 600_000
    assert options["grpc.max_connection_age_grace_ms"] == 30_000
    assert "grpc.max_connection_idle_ms" not in options


async def test_a_gateway_pinging_at_the_allowed_interval_keeps_its_connection(start_server):
    """A client keepalive at the allowed interval is not punished with too_many_pings."""
    async with start_server(keepalive_min_client_interval_s=1.0) as srv:
        options = [
            ("grpc.keepalive_time_ms", 2000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        async with grpc.aio.insecure_channel(srv.address, options=options) as channel:
            stub = dgrpc.DeciderServiceStub(channel)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Decide(dpb.DecideRequest(model="nope"), timeout=5)
            await asyncio.sleep(7)  # a few pings, idle
            state = channel.get_state()
            assert state == grpc.ChannelConnectivity.READY, state
