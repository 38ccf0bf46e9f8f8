"""Response -> outcome fields (decider.api.extproc.response)."""

from __future__ import annotations

import json

import pytest

from decider.api.extproc.response import ResponseMeter, result_for_status
from decider.core.model import Result


@pytest.mark.parametrize(
    ("status", "result"),
    [
        (200, Result.SUCCESS),
        (400, Result.SUCCESS),
        (404, Result.SUCCESS),
        (429, Result.RATE_LIMITED),
        (500, Result.ERROR),
        (503, Result.ERROR),
        (504, Result.TIMEOUT),
        (0, Result.ERROR),
    ],
)
def test_http_status_to_result(status, result):
    assert result_for_status(status) is result


def test_a_json_answer_gives_latency_and_usage_but_no_ttft():
    meter = ResponseMeter(started=10.0)
    meter.headers(200, "application/json; charset=utf-8", end=False, now=10.5)
    body = json.dumps({"usage": {"prompt_tokens": 12, "completion_tokens": 30}}).encode()
    meter.body(body[:10], end=False, now=10.6)
    meter.body(body[10:], end=True, now=11.0)
    assert meter.ended and meter.result is Result.SUCCESS
    assert (meter.latency_s, meter.ttft_s) == (1.0, 0.0)
    assert (meter.input_tokens, meter.output_tokens) == (12, 30)


def test_an_sse_stream_gives_ttft_and_the_final_usage_even_split_across_chunks():
    events = [
        {"choices": [{"delta": {"content": "Hi"}}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
    ]
    stream = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"
    meter = ResponseMeter(started=0.0)
    meter.headers(200, "text/event-stream", end=False, now=0.1)
    cut = stream.index(b'"usage"') + 3
    meter.body(stream[:7], end=False, now=0.25)
    meter.body(stream[7:cut], end=False, now=0.5)
    meter.body(stream[cut:], end=True, now=2.0)
    assert meter.ttft_s == 0.25
    assert meter.latency_s == 2.0
    assert (meter.input_tokens, meter.output_tokens) == (5, 2)


def test_the_responses_api_final_event_carries_usage_under_response():
    final = {
        "type": "response.completed",
        "response": {"usage": {"input_tokens": 9, "output_tokens": 4}},
    }
    meter = ResponseMeter(started=0.0)
    meter.headers(200, "text/event-stream", end=False, now=0.0)
    meter.body(
        f"event: response.completed\ndata: {json.dumps(final)}\n\n".encode(), end=True, now=1.0
    )
    assert (meter.input_tokens, meter.output_tokens) == (9, 4)


def test_garbage_or_oversized_bodies_leave_usage_at_zero():
    meter = ResponseMeter(started=0.0)
    meter.headers(200, "application/json", end=False, now=0.0)
    meter.body(b"{not json", end=True, now=1.0)
    assert (meter.input_tokens, meter.output_tokens) == (0, 0)
    big = ResponseMeter(started=0.0)
    big.headers(200, "application/json", end=False, now=0.0)
    big.body(b" " * (2 << 20), end=False, now=0.5)
    big.body(b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}}', end=True, now=1.0)
    assert (big.input_tokens, big.output_tokens) == (0, 0)
    assert big.ended
