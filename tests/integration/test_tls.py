"""TLS and mTLS through the real server: certificates made at test time, real clients on
127.0.0.1, rotation on disk, the admin client list, /metrics over TLS and the command-line
clients (`decider endpoints`, `decider decide`, `decider-probe`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import make_settings
from decider_support import ErrorInfo, detail, endpoints_doc
from tls_certs import CA, Pair, common_name

from decider.config.tls import TLSSettings
from decider.runtime.server import DeciderServer
from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import decider_service_pb2_grpc as dgrpc
from decider.v1 import registry_service_pb2 as rpb
from decider.v1 import registry_service_pb2_grpc as rgrpc
from probe.standin import StandIn

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
DOC = endpoints_doc("m", 2)


@pytest.fixture
def ca(tmp_path) -> CA:
    return CA(tmp_path / "pki")


@pytest.fixture
def server_pair(ca) -> Pair:
    return ca.server_pair()


def tls_settings(pair: Pair, *, mutual: bool = False, admins: tuple[str, ...] = ()) -> TLSSettings:
    return TLSSettings(
        cert_file=str(pair.cert_file),
        key_file=str(pair.key_file),
        client_ca_file=str(pair.ca_file) if mutual else "",
        admin_client_names=admins,
    )


@contextlib.asynccontextmanager
async def tls_server(tmp_path: Path, tls: TLSSettings, **server) -> AsyncIterator[DeciderServer]:
    settings = make_settings(tmp_path / "data", DOC, tls=tls, **server)
    srv = DeciderServer(settings)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0.5)


def credentials(ca_file: Path, client: Pair | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes(),
        private_key=client.key_file.read_bytes() if client else None,
        certificate_chain=client.cert_file.read_bytes() if client else None,
    )


async def decide(channel: grpc.aio.Channel) -> dpb.DecideResponse:
    stub = dgrpc.DeciderServiceStub(channel)
    return await stub.Decide(dpb.DecideRequest(model="m"), timeout=5)


async def test_a_tls_client_decides_and_a_plaintext_one_fails_cleanly(tmp_path, server_pair):
    async with tls_server(tmp_path, tls_settings(server_pair)) as srv:
        address = f"127.0.0.1:{srv.port}"
        async with grpc.aio.secure_channel(address, credentials(server_pair.ca_file)) as channel:
            reply = await decide(channel)
            assert reply.endpoint.id in {"m-0", "m-1"}
        async with grpc.aio.insecure_channel(address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await decide(plain)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_trusting_another_ca_fails(tmp_path, server_pair):
    stranger = CA(tmp_path / "other", "Other CA")
    async with tls_server(tmp_path, tls_settings(server_pair)) as srv:
        address = f"127.0.0.1:{srv.port}"
        async with grpc.aio.secure_channel(address, credentials(stranger.ca_file)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await decide(channel)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_server_name_override_verifies_another_name(tmp_path, ca):
    # The certificate names only decider.internal; the client dials 127.0.0.1.
    pair = ca.issue("decider.internal", dns=("decider.internal",), stem="named")
    async with tls_server(tmp_path, tls_settings(pair)) as srv:
        address = f"127.0.0.1:{srv.port}"
        async with grpc.aio.secure_channel(address, credentials(pair.ca_file)) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await decide(channel)
        options = [("grpc.ssl_target_name_override", "decider.internal")]
        async with grpc.aio.secure_channel(address, credentials(pair.ca_file), options) as ch:
            assert (await decide(ch)).endpoint.id


async def test_mtls_refuses_a_client_without_a_certificate(tmp_path, ca, server_pair):
    gateway = ca.issue("gateway-1", stem="gw")
    stranger_ca = CA(tmp_path / "other", "Other CA")
    outsider = stranger_ca.issue("outsider", stem="outsider")
    async with tls_server(tmp_path, tls_settings(server_pair, mutual=True)) as srv:
        address = f"127.0.0.1:{srv.port}"
        async with grpc.aio.secure_channel(address, credentials(ca.ca_file, gateway)) as ch:
            assert (await decide(ch)).endpoint.id
        for creds in (credentials(ca.ca_file), credentials(ca.ca_file, outsider)):
            async with grpc.aio.secure_channel(address, creds) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await decide(channel)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_admin_list_admits_named_clients_only(tmp_path, ca, server_pair):
    ops = ca.issue("ops-admin", stem="ops")
    spiffe = ca.issue("svc", uris=("spiffe://prod/ns/ops/sa/registrar",), stem="spiffe")
    gateway = ca.issue("gateway-1", stem="gw")
    tls = tls_settings(
        server_pair, mutual=True, admins=("ops-admin", "spiffe://prod/ns/ops/sa/registrar")
    )
    async with tls_server(tmp_path, tls) as srv:
        address = f"127.0.0.1:{srv.port}"
        for admin in (ops, spiffe):
            async with grpc.aio.secure_channel(address, credentials(ca.ca_file, admin)) as ch:
                registry = rgrpc.RegistryServiceStub(ch)
                listed = await registry.ListEndpoints(rpb.ListEndpointsRequest(), timeout=5)
                assert {e.id for e in listed.endpoints} == {"m-0", "m-1"}
        async with grpc.aio.secure_channel(address, credentials(ca.ca_file, gateway)) as ch:
            registry = rgrpc.RegistryServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await registry.ListEndpoints(rpb.ListEndpointsRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "gateway-1" in (err.value.details() or "")
            assert detail(err.value, ErrorInfo).reason == "PERMISSION_DENIED"
            # The data plane is not an admin call: the gateway still decides.
            assert (await decide(ch)).endpoint.id


async def test_the_admin_list_and_the_token_both_apply(tmp_path, ca, server_pair):
    ops = ca.issue("ops-admin", stem="ops")
    tls = tls_settings(server_pair, mutual=True, admins=("ops-admin",))
    async with tls_server(tmp_path, tls, admin_token="sesame") as srv:
        address = f"127.0.0.1:{srv.port}"
        async with grpc.aio.secure_channel(address, credentials(ca.ca_file, ops)) as ch:
            registry = rgrpc.RegistryServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await registry.ListEndpoints(rpb.ListEndpointsRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            meta = (("authorization", "Bearer sesame"),)
            listed = await registry.ListEndpoints(rpb.ListEndpointsRequest(), metadata=meta)
            assert len(listed.endpoints) == 2


def served_common_name(port: int, ca_file: Path, client: Pair | None = None) -> str:
    """The common name of the certificate a new TLS connection to `port` is served."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(client.cert_file, client.key_file)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return common_name(ssl.DER_cert_to_PEM_cert(der).encode())


def rotate(source: Pair, target: Pair) -> None:
    """Replaces target's files with source's, each by an atomic rename, key first."""
    for src, dst in ((source.key_file, target.key_file), (source.cert_file, target.cert_file)):
        partial = dst.with_suffix(".partial")
        shutil.copyfile(src, partial)
        os.replace(partial, dst)


async def test_a_certificate_rotated_on_disk_is_served_to_the_next_connection(tmp_path, ca):
    live = ca.server_pair(stem="live", name="first")
    next_ca = CA(tmp_path / "next", "Next CA")
    nxt = next_ca.server_pair(stem="next", name="second")
    async with tls_server(tmp_path, tls_settings(live)) as srv:
        address = f"127.0.0.1:{srv.port}"
        old = grpc.aio.secure_channel(address, credentials(ca.ca_file))
        try:
            assert (await decide(old)).endpoint.id
            assert await asyncio.to_thread(served_common_name, srv.port, ca.ca_file) == "first"
            rotate(nxt, live)
            # The next connection gets the new certificate, from the new CA ...
            assert await asyncio.to_thread(served_common_name, srv.port, next_ca.ca_file) == (
                "second"
            )
            async with grpc.aio.secure_channel(address, credentials(next_ca.ca_file)) as fresh:
                assert (await decide(fresh)).endpoint.id
            # ... while the connection made before keeps working.
            assert (await decide(old)).endpoint.id
        finally:
            await old.close()
        assert srv.tls is not None and srv.tls.reloads == 1


async def test_a_half_written_rotation_keeps_serving_the_old_certificate(tmp_path, ca):
    live = ca.server_pair(stem="live", name="first")
    nxt = ca.server_pair(stem="next", name="second")
    async with tls_server(tmp_path, tls_settings(live)) as srv:
        shutil.copyfile(nxt.cert_file, live.cert_file)  # the key is not there yet
        assert await asyncio.to_thread(served_common_name, srv.port, ca.ca_file) == "first"
        async with grpc.aio.secure_channel(f"127.0.0.1:{srv.port}", credentials(ca.ca_file)) as c:
            assert (await decide(c)).endpoint.id
        shutil.copyfile(nxt.key_file, live.key_file)
        assert await asyncio.to_thread(served_common_name, srv.port, ca.ca_file) == "second"


async def test_metrics_are_served_over_tls_with_the_same_files(tmp_path, ca):
    live = ca.server_pair(stem="live", name="first")
    client = ca.issue("prometheus", stem="prom")
    tls = tls_settings(live, mutual=True)
    settings = make_settings(tmp_path / "data", DOC, tls=tls, metrics_listen="127.0.0.1:0")
    srv = DeciderServer(settings)
    await srv.start()
    try:
        assert srv.metrics_server is not None
        port = srv.metrics_server.port
        url = f"https://127.0.0.1:{port}/metrics"
        context = ssl.create_default_context(cafile=str(ca.ca_file))
        context.load_cert_chain(client.cert_file, client.key_file)
        async with httpx.AsyncClient(verify=context) as http:
            reply = await http.get(url, timeout=30)
            assert reply.status_code == 200
            assert "decider_build_info" in reply.text
        # No client certificate, or plain HTTP: no metrics. (The refusal is a TLS alert; it
        # reaches the caller as httpx's error or as the ssl module's, depending on timing.)
        async with httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=str(ca.ca_file))
        ) as h:
            with pytest.raises((httpx.HTTPError, ssl.SSLError)):
                await h.get(url, timeout=30)
        async with httpx.AsyncClient() as plain:
            with pytest.raises((httpx.HTTPError, ssl.SSLError)):
                await plain.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        # Rotation reaches the metrics listener too.
        rotate(ca.server_pair(stem="next", name="second"), live)
        assert await asyncio.to_thread(served_common_name, port, ca.ca_file, client) == "second"
    finally:
        await srv.stop(0.5)


# --------------------------------------------------------------- the process and its clients


def env_with_src() -> dict[str, str]:
    path = f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "decider",
        *args,
        env=env or env_with_src(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("missing cert", "server.tls.cert_file: {cert}: cannot read: No such file or directory"),
        ("key is a directory", "server.tls.key_file: {key}: cannot read: Is a directory"),
        ("mismatched key", "server.tls.key_file: {other}: the key does not match the certificate"),
        ("cert is not PEM", "server.tls.cert_file: {cert}: not a PEM certificate"),
    ],
)
async def test_bad_tls_files_stop_the_start_with_exit_2_naming_the_file(
    tmp_path, ca, breakage, expected
):
    pair = ca.server_pair()
    other = ca.issue("other", stem="other")
    key = pair.key_file
    if breakage == "missing cert":
        pair.cert_file.unlink()
    elif breakage == "key is a directory":
        key.unlink()
        key.mkdir()
    elif breakage == "mismatched key":
        key = other.key_file
    else:
        pair.cert_file.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    common = ["--tls-cert-file", str(pair.cert_file), "--tls-key-file", str(key)]
    for command in (
        ["serve", "--listen", "127.0.0.1:0", "--data-dir", "", *common],
        ["check-config", str(write_config(tmp_path, pair.cert_file, key))],
    ):
        code, _, err = await run_cli(*command)
        assert code == 2, err
        assert expected.format(cert=pair.cert_file, key=key, other=other.key_file) in err
        assert "Traceback" not in err


def write_config(tmp_path: Path, cert: Path, key: Path) -> Path:
    path = tmp_path / "tls.toml"
    path.write_text(f'[server.tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n')
    return path


@contextlib.asynccontextmanager
async def serve_process(tmp_path: Path, *args: str) -> AsyncIterator[tuple[int, list[str], int]]:
    """`decider serve` as its own process; yields its port, its stderr lines (growing) and
    its pid."""
    port_file = tmp_path / "port"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "decider",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--port-file",
        str(port_file),
        "--data-dir",
        "",
        "--grace-period-s",
        "0.5",
        *args,
        env=env_with_src(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    lines: list[str] = []

    async def pump() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            lines.append(line.decode())

    reader = asyncio.create_task(pump())
    try:
        for _ in range(600):
            if port_file.exists() or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert port_file.exists(), "".join(lines)
        yield int(port_file.read_text()), lines, proc.pid
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
        await asyncio.wait_for(reader, 5)


async def test_sighup_reloads_the_files(tmp_path, ca):
    live = ca.server_pair(stem="live", name="first")
    nxt = ca.server_pair(stem="next", name="second")
    config = write_config(tmp_path, live.cert_file, live.key_file)
    async with serve_process(tmp_path, "--config", str(config)) as (port, lines, pid):
        assert await asyncio.to_thread(served_common_name, port, ca.ca_file) == "first"
        rotate(nxt, live)
        # No connection is made until the reload is logged: the signal did it.
        os.kill(pid, signal.SIGHUP)
        for _ in range(400):
            if any("TLS certificate reloaded" in line for line in lines):
                break
            await asyncio.sleep(0.05)
        assert any("TLS certificate reloaded" in line for line in lines), "".join(lines)
        assert await asyncio.to_thread(served_common_name, port, ca.ca_file) == "second"


async def test_admin_token_from_a_file_never_shows(tmp_path, server_pair):
    token_file = tmp_path / "admin-token"
    token_file.write_text("s3cr3t-t0ken-value\n")
    async with (
        serve_process(tmp_path, "--admin-token-file", str(token_file), "--log-level", "debug") as (
            port,
            lines,
            _,
        ),
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        registry = rgrpc.RegistryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await registry.ListEndpoints(
                rpb.ListEndpointsRequest(), metadata=(("authorization", "Bearer wrong"),)
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "s3cr3t" not in (err.value.details() or "")
        good = (("authorization", "Bearer s3cr3t-t0ken-value"),)
        await registry.ListEndpoints(rpb.ListEndpointsRequest(), metadata=good, timeout=5)
    assert lines and not any("s3cr3t" in line for line in lines)


async def test_an_unreadable_token_file_is_a_start_error(tmp_path):
    missing = tmp_path / "no-token"
    code, _, err = await run_cli(
        "serve", "--listen", "127.0.0.1:0", "--admin-token-file", str(missing)
    )
    assert code == 2
    assert f"server.admin_token_file: {missing}: cannot read: No such file or directory" in err


async def test_the_command_line_tools_speak_mtls(tmp_path, ca, server_pair):
    ops = ca.issue("ops-admin", stem="ops")
    tls = tls_settings(server_pair, mutual=True, admins=("ops-admin",))
    async with tls_server(tmp_path, tls) as srv:
        target = f"127.0.0.1:{srv.port}"
        flags = [
            "--target",
            target,
            "--tls-ca-file",
            str(ca.ca_file),
            "--tls-cert-file",
            str(ops.cert_file),
            "--tls-key-file",
            str(ops.key_file),
        ]
        code, out, err = await run_cli("endpoints", *flags)
        assert code == 0, err
        assert "m-0" in out and "m-1" in out
        code, out, err = await run_cli("decide", "--model", "m", *flags)
        assert code == 0, err
        assert out.startswith("endpoint   m-")
        # Through variables, with a server name override.
        env = {
            **env_with_src(),
            "DECIDER_CLIENT_TLS_CA_FILE": str(ca.ca_file),
            "DECIDER_CLIENT_TLS_CERT_FILE": str(ops.cert_file),
            "DECIDER_CLIENT_TLS_KEY_FILE": str(ops.key_file),
            "DECIDER_CLIENT_TLS_SERVER_NAME": "decider.test",
        }
        code, out, err = await run_cli("decide", "--model", "m", "--target", target, env=env)
        assert code == 0, err
        code, _, err = await run_cli(
            "decide", "--model", "m", "--target", target, "--timeout-s", "2"
        )
        assert code == 1
        assert "decider decide: UNAVAILABLE" in err
        code, _, err = await run_cli(
            "decide", "--model", "m", "--target", target, "--tls-ca-file", str(tmp_path / "none")
        )
        assert code == 2
        assert f"--tls-ca-file: {tmp_path / 'none'}: cannot read" in err


async def test_decider_probe_reports_over_mtls(tmp_path, ca, server_pair):
    backend = await StandIn().start()
    prober = ca.issue("prober-1", stem="prober")
    doc = {
        "endpoints": [
            {"id": "p", "address": "127.0.0.1:1", "model": "m", "health_url": backend.url}
        ],
        "probe": {"embedded": False},
    }
    settings = make_settings(tmp_path / "data", doc, tls=tls_settings(server_pair, mutual=True))
    srv = DeciderServer(settings)
    await srv.start()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "decider.cli.probe",
        "--decider",
        f"127.0.0.1:{srv.port}",
        "--prober-id",
        "tls-probe",
        "--tls-ca-file",
        str(ca.ca_file),
        "--tls-cert-file",
        str(prober.cert_file),
        "--tls-key-file",
        str(prober.key_file),
        env=env_with_src(),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        channel = grpc.aio.secure_channel(f"127.0.0.1:{srv.port}", credentials(ca.ca_file, prober))
        registry = rgrpc.RegistryServiceStub(channel)
        reason = ""
        for _ in range(300):
            listed = await registry.ListEndpoints(rpb.ListEndpointsRequest(), timeout=5)
            reason = listed.statuses["p"].health_reason
            if reason.startswith("tls-probe: "):
                break
            await asyncio.sleep(0.1)
        assert reason.startswith("tls-probe: "), reason
        await channel.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 15)
        await srv.stop(0.5)
        await backend.kill()
    assert proc.returncode == 0, stderr.decode()


def test_settings_repr_hides_the_admin_token(tmp_path):
    settings = make_settings(tmp_path, {}, admin_token="s3cr3t")
    assert "s3cr3t" not in repr(settings)
    assert "s3cr3t" not in repr(replace(settings.server))


async def test_the_operations_guide_tls_config_checks_with_real_files(tmp_path, ca):
    """docs/OPERATIONS.md's [server.tls] example, with its paths pointed at real files."""
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    begin = text.index("<!-- operations-tls begin")
    block = text[begin:].split("```toml\n", 1)[1].split("```", 1)[0]
    pair = ca.server_pair()
    token = tmp_path / "admin-token"
    token.write_text("t0ken\n")
    for doc_path, real in (
        ("/etc/decider/tls/tls.crt", pair.cert_file),
        ("/etc/decider/tls/tls.key", pair.key_file),
        ("/etc/decider/tls/ca.crt", pair.ca_file),
        ("/etc/decider/admin-token", token),
    ):
        assert doc_path in block
        block = block.replace(doc_path, str(real))
    config = tmp_path / "operations.toml"
    config.write_text(block)
    code, out, err = await run_cli("check-config", str(config))
    assert code == 0, err
    assert "ok" in out
