"""decider_client over TLS and mutual TLS to a grpc.aio server on 127.0.0.1 with certificates
made for the test (a CA, a server certificate for "decider.test", a client certificate)."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import decider_service_pb2_grpc as dgrpc
from decider.v1 import endpoint_pb2 as epb
from decider_client import (
    ClientOptions,
    DeciderClient,
    DeciderUnreachable,
    Outcome,
    TlsOptions,
)

SERVER_NAME = "decider.test"


@dataclass
class Pki:
    """PEM files of one CA and the certificates it signed."""

    dir: Path
    ca: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate

    def issue(self, name: str, *, dns: str | None = None) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _builder(name, key.public_key(), issuer=self.ca_cert.subject)
        if dns is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False
            )
        cert = builder.sign(self.ca_key, hashes.SHA256())
        return _write(self.dir / f"{name}.pem", cert), _write_key(self.dir / f"{name}.key", key)


def _builder(name: str, public_key: Any, *, issuer: x509.Name) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )


def _write(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def make_pki(directory: Path, name: str) -> Pki:
    directory.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, key.public_key(), issuer=subject)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Pki(dir=directory, ca=_write(directory / "ca.pem", cert), ca_key=key, ca_cert=cert)


@dataclass
class Answering(dgrpc.DeciderServiceServicer):
    """Decides one endpoint per model and records the client certificate's name per call."""

    peers: list[str] = field(default_factory=list)

    def _peer(self, context: Any) -> None:
        names = context.auth_context().get("x509_common_name", [b""])
        self.peers.append(names[0].decode())

    async def Decide(self, request: Any, context: Any) -> dpb.DecideResponse:
        self._peer(context)
        ep = epb.Endpoint(id=f"{request.model}-0", address="127.0.0.1:9", model=request.model)
        return dpb.DecideResponse(decision_id="d-1", endpoint=ep, strategy="tls")

    async def ReportOutcome(self, request: Any, context: Any) -> dpb.ReportOutcomeResponse:
        self._peer(context)
        return dpb.ReportOutcomeResponse(decision_found=request.decision_id == "d-1")


@contextlib.asynccontextmanager
async def tls_server(
    pki: Pki, *, require_client_auth: bool
) -> AsyncIterator[tuple[str, Answering]]:
    cert, key = pki.issue("server", dns=SERVER_NAME)
    credentials = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(),
        require_client_auth=require_client_auth,
    )
    server = grpc.aio.server()
    servicer = Answering()
    dgrpc.add_DeciderServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(0)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", "decider test CA")


async def test_tls_verifies_the_server_by_the_given_name(pki):
    async with tls_server(pki, require_client_auth=False) as (address, servicer):
        tls = TlsOptions(ca_file=pki.ca, server_name=SERVER_NAME)
        async with DeciderClient(address, ClientOptions(decide_timeout_s=10, tls=tls)) as client:
            decision = await client.decide(dpb.DecideRequest(model="m"))
            assert (decision.endpoint.id, decision.strategy) == ("m-0", "tls")
            found = await client.report_outcome(
                Outcome(
                    decision_id=decision.decision_id,
                    endpoint_id="m-0",
                    result=dpb.RESULT_SUCCESS,
                    latency_s=0.1,
                )
            )
            assert found
        assert servicer.peers == ["", ""]  # no client certificate asked for


async def test_mutual_tls_presents_the_client_certificate(pki):
    cert, key = pki.issue("gateway-1")
    async with tls_server(pki, require_client_auth=True) as (address, servicer):
        tls = TlsOptions(ca_file=pki.ca, cert_file=cert, key_file=key, server_name=SERVER_NAME)
        async with DeciderClient(address, ClientOptions(decide_timeout_s=10, tls=tls)) as client:
            assert (await client.decide(dpb.DecideRequest(model="m"))).endpoint.id == "m-0"
        assert servicer.peers == ["gateway-1"]


@pytest.mark.parametrize(
    "case", ["no client certificate", "server from another CA", "server name not overridden"]
)
async def test_a_failed_handshake_is_unreachable_and_fails_open(pki, tmp_path, case):
    other = make_pki(tmp_path / "other", "another CA")
    cert, key = pki.issue("gateway-1")
    tls = {
        "no client certificate": TlsOptions(ca_file=pki.ca, server_name=SERVER_NAME),
        "server from another CA": TlsOptions(
            ca_file=other.ca, cert_file=cert, key_file=key, server_name=SERVER_NAME
        ),
        # The certificate names decider.test, not 127.0.0.1.
        "server name not overridden": TlsOptions(ca_file=pki.ca, cert_file=cert, key_file=key),
    }[case]
    seed = [epb.Endpoint(id="seed-0", address="127.0.0.1:9", model="m")]
    async with tls_server(pki, require_client_auth=True) as (address, servicer):
        closed = DeciderClient(address, ClientOptions(decide_timeout_s=1, tls=tls))
        opened = DeciderClient(
            address, ClientOptions(decide_timeout_s=1, tls=tls, fail_open=True, seed_endpoints=seed)
        )
        try:
            with pytest.raises(DeciderUnreachable):
                await closed.decide(dpb.DecideRequest(model="m"))
            decision = await opened.decide(dpb.DecideRequest(model="m"))
            assert decision.fail_open and decision.endpoint.id == "seed-0"
        finally:
            await closed.close()
            await opened.close()
        assert servicer.peers == []
