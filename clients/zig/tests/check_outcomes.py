"""Checks, through RegistryService.ListEndpoints, that a gateway reported every
attempt: no decision left in flight for a and b, and a latency average for each
of them. Exit 0: all reported; 3: not yet (the caller retries); 1: error."""

from __future__ import annotations

import sys

import grpc

from decider.v1 import registry_service_pb2 as pb
from decider.v1 import registry_service_pb2_grpc as rpc


def main() -> int:
    with grpc.insecure_channel(sys.argv[1]) as channel:
        resp = rpc.RegistryServiceStub(channel).ListEndpoints(
            pb.ListEndpointsRequest(model="m"), timeout=5
        )
    for endpoint_id in ("a", "b"):
        st = resp.statuses[endpoint_id]
        if st.in_flight != 0 or st.latency_ewma.ToNanoseconds() <= 0:
            print(f"{endpoint_id}: in_flight={st.in_flight} latency_ewma={st.latency_ewma}")
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
