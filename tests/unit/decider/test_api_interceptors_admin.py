"""AdminClientInterceptor's decision on a peer's auth context (the real server tests run it
through mTLS in tests/integration/test_tls.py)."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from decider.api.interceptors import AdminClientInterceptor


def reason(status: grpc.Status) -> str:
    for key, value in status.trailing_metadata:
        if key == "grpc-status-details-bin":
            info = error_details_pb2.ErrorInfo()
            status_pb2.Status.FromString(value).details[0].Unpack(info)
            return info.reason
    raise AssertionError("no details")


def test_a_listed_subject_common_name_or_san_may_call():
    interceptor = AdminClientInterceptor(["ops-admin", "spiffe://prod/sa/registrar"])
    for auth in (
        {"x509_common_name": [b"ops-admin"], "x509_subject": [b"CN=ops-admin"]},
        {
            "x509_common_name": [b"svc"],
            "x509_subject_alternative_name": [b"spiffe://prod/sa/registrar"],
        },
    ):
        assert interceptor.refusal(auth) is None


def test_a_certificate_off_the_list_is_permission_denied_naming_it():
    interceptor = AdminClientInterceptor(["ops-admin"])
    status = interceptor.refusal({"x509_common_name": [b"gw-1"], "x509_subject": [b"CN=gw-1"]})
    assert status is not None
    assert status.code == grpc.StatusCode.PERMISSION_DENIED
    assert "CN=gw-1, gw-1" in status.details
    assert reason(status) == "PERMISSION_DENIED"


def test_no_certificate_identity_is_unauthenticated():
    interceptor = AdminClientInterceptor(["ops-admin"])
    status = interceptor.refusal({"transport_security_type": [b"ssl"]})
    assert status is not None
    assert status.code == grpc.StatusCode.UNAUTHENTICATED
    assert reason(status) == "UNAUTHENTICATED"
