"""Decider stopped behind a real Envoy: what `failure_mode_allow` makes of it (docs/ENVOY.md,
"When Decider is down")."""

from __future__ import annotations

import pytest
from envoy_support import stack

from decider.config.extproc import ExtProcSettings


def _recovers(gw) -> None:
    gw.start_decider()
    gw.wait_until(
        lambda: gw.post(gw.chat()).headers.get("x-decider-endpoint") is not None,
        what="Envoy to reach Decider again",
    )


def test_fail_closed_answers_500_and_recovers_when_decider_is_back(tmp_path):
    with stack(tmp_path, replacements={"failure_mode_allow": "false"}) as gw:
        assert gw.post(gw.chat()).status_code == 200
        gw.stop_decider()
        response = gw.post(gw.chat())
        assert response.status_code == 500
        assert response.content == b""
        assert sum(s.requests for s in gw.stand_ins) == 1
        _recovers(gw)


def test_fail_open_in_buffered_mode_round_robins_over_the_cluster(tmp_path):
    buffered = {
        "failure_mode_allow": "true",
        "request_body_mode": "BUFFERED",
        "response_body_mode": "STREAMED",
    }
    with stack(tmp_path, replacements=buffered) as gw:
        gw.stop_decider()
        served = set()
        for _ in range(9):
            response = gw.post(gw.chat())
            assert response.status_code == 200
            assert "x-decider-endpoint" not in response.headers
            served.add(response.headers["x-served-by"])
        # Envoy's own round robin, not Decider's: spread, in Envoy's order.
        assert len(served) >= 2, served
        _recovers(gw)


@pytest.mark.parametrize("allow", ["true", "false"])
def test_original_dst_without_decider_has_nowhere_to_go(tmp_path, allow):
    with stack(
        tmp_path,
        example="original_dst.yaml",
        extproc=ExtProcSettings(fallbacks=False),
        replacements={"failure_mode_allow": allow},
    ) as gw:
        gw.stop_decider()
        response = gw.post(gw.chat())
        assert response.status_code == (503 if allow == "true" else 500)
        assert sum(s.requests for s in gw.stand_ins) == 0
