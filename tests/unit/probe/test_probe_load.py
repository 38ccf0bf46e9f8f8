import pytest

from decider.core.model import LoadReport, MetricsKind
from probe import parse_load

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 4.0
vllm:num_requests_running{engine="1",model_name="llama"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 2.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 5.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.5
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="llama"} 1234.0
"""

VLLM_OLD = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="llama"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="llama"} 0.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="llama"} 0.75
"""

SGLANG = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen"} 12.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="qwen"} 7.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="qwen"} 0.42
"""

LLAMACPP = """\
# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.125
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 1
"""

GENERIC = """\
# TYPE decider_queue_depth gauge
decider_queue_depth 9
# TYPE decider_running_requests gauge
decider_running_requests 3
# TYPE decider_kv_cache_utilization gauge
decider_kv_cache_utilization 0.9
"""


@pytest.mark.parametrize(
    ("kind", "text", "expected"),
    [
        (MetricsKind.VLLM, VLLM, LoadReport(queue_depth=7, running=7, kv_cache_utilization=0.5)),
        (
            MetricsKind.VLLM,
            VLLM_OLD,
            LoadReport(queue_depth=0, running=1, kv_cache_utilization=0.75),
        ),
        (
            MetricsKind.SGLANG,
            SGLANG,
            LoadReport(queue_depth=7, running=12, kv_cache_utilization=0.42),
        ),
        (
            MetricsKind.LLAMACPP,
            LLAMACPP,
            LoadReport(queue_depth=1, running=2, kv_cache_utilization=0.125),
        ),
        (
            MetricsKind.GENERIC,
            GENERIC,
            LoadReport(queue_depth=9, running=3, kv_cache_utilization=0.9),
        ),
        (
            MetricsKind.UNSPECIFIED,
            GENERIC,
            LoadReport(queue_depth=9, running=3, kv_cache_utilization=0.9),
        ),
    ],
)
def test_parse_load_per_kind(kind, text, expected):
    assert parse_load(text, kind) == expected


def test_other_kinds_names_are_not_load():
    assert parse_load(SGLANG, MetricsKind.VLLM) is None
    assert parse_load("", MetricsKind.VLLM) is None


def test_out_of_range_values_are_clamped():
    text = (
        "vllm:kv_cache_usage_perc 1.7\n"
        "vllm:num_requests_waiting NaN\n"
        "vllm:num_requests_running -2\n"
    )
    assert parse_load(text, MetricsKind.VLLM) == LoadReport(
        queue_depth=0, running=0, kv_cache_utilization=1.0
    )


def test_garbage_raises_value_error():
    with pytest.raises(ValueError):
        parse_load("vllm:num_requests_waiting{ 3\n", MetricsKind.VLLM)


def test_lines_about_other_metrics_are_not_parsed():
    # Only the kind's own gauges reach the parser, so a malformed histogram line elsewhere on
    # the page (or the cost of parsing hundreds of them) does not matter.
    text = VLLM + "vllm:e2e_request_latency_seconds_bucket{le= broken\n"
    assert parse_load(text, MetricsKind.VLLM) == LoadReport(
        queue_depth=7, running=7, kv_cache_utilization=0.5
    )
