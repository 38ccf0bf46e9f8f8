from typing import Any

import pytest

from bench.sim.cache import block_hashes
from bench.sim.events import EventLoop
from bench.sim.server import Job, ServerParams, SimServer


class Recorder:
    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.failed: dict[str, float] = {}

    def on_first_token(self, job: Job, now: float) -> None:
        self.first[job.owner] = now

    def on_complete(self, job: Job, now: float) -> None:
        self.done[job.owner] = now

    def on_fail(self, job: Job, now: float) -> None:
        self.failed[job.owner] = now


def simple(**overrides) -> ServerParams:
    values: dict[str, Any] = {
        "max_batch": 4,
        "prefill_tokens_per_s": 1000.0,
        "prefill_overhead_s": 0.0,
        "decode_base_s": 0.01,
        "decode_per_seq_s": 0.0,
        "decode_share_during_prefill": 1.0,
        "block_tokens": 16,
        "cache_blocks": 100,
    }
    values.update(overrides)
    return ServerParams(**values)


def make(params: ServerParams, **kwargs) -> tuple[EventLoop, Recorder, SimServer]:
    loop = EventLoop()
    rec = Recorder()
    return loop, rec, SimServer("ep", params, loop, rec, **kwargs)


def job(name: str, prompt: int = 100, out: int = 11, key: int = 1) -> Job:
    segments = [(key, prompt)]
    return Job(
        prompt_tokens=prompt,
        output_tokens=out,
        prompt_blocks=block_hashes(segments, 16),
        owner=name,
    )


def test_prefill_is_proportional_to_prompt_and_decode_to_output_tokens():
    loop, rec, server = make(simple(prefill_overhead_s=0.005))
    server.submit(job("a", prompt=100, out=11), 0.0)
    loop.run()
    assert rec.first["a"] == pytest.approx(0.105)
    assert rec.done["a"] == pytest.approx(0.105 + 10 * 0.01)
    assert server.completed == 1 and server.output_tokens == 11


def test_single_output_token_finishes_at_the_first_token():
    loop, rec, server = make(simple())
    server.submit(job("a", out=1), 0.0)
    loop.run()
    assert rec.done["a"] == rec.first["a"] == pytest.approx(0.1)


def test_cached_prefix_skips_its_prefill_but_not_the_last_token():
    loop, rec, server = make(simple())
    server.submit(job("a", prompt=160), 0.0)
    loop.run()
    server.submit(job("b", prompt=160), 1.0)
    loop.run()
    assert rec.first["b"] - 1.0 == pytest.approx(0.001)
    assert server.cached_tokens == 159 and server.prompt_tokens == 320
    # A different prompt hits nothing.
    server.submit(job("c", prompt=160, key=2), 2.0)
    loop.run()
    assert rec.first["c"] - 2.0 == pytest.approx(0.16)


def test_prefills_run_one_at_a_time():
    loop, rec, server = make(simple())
    for name in "abc":
        server.submit(job(name, prompt=100, key=ord(name)), 0.0)
    loop.run()
    assert [rec.first[n] for n in "abc"] == pytest.approx([0.1, 0.2, 0.3])


def test_concurrency_cap_queues_the_rest_until_a_slot_frees():
    loop, rec, server = make(simple(max_batch=2))
    for name in "abc":
        server.submit(job(name, prompt=100, out=101, key=ord(name)), 0.0)
    assert server.running == 2 and server.waiting == 1 and server.in_flight == 3
    loop.run()
    # c starts its prefill only when a finishes.
    assert rec.first["c"] == pytest.approx(rec.done["a"] + 0.1)
    assert server.in_flight == 0


def test_a_bigger_batch_slows_every_request_down():
    params = simple(decode_per_seq_s=0.01)
    loop, rec, alone = make(params)
    alone.submit(job("a", prompt=16, out=101), 0.0)
    loop.run()
    loop2, rec2, shared = make(params)
    shared.submit(job("a", prompt=16, out=101, key=1), 0.0)
    shared.submit(job("b", prompt=16, out=101, key=2), 0.0)
    loop2.run()
    alone_decode = rec.done["a"] - rec.first["a"]
    assert alone_decode == pytest.approx(100 * 0.02)
    assert rec2.done["a"] - rec2.first["a"] > 1.4 * alone_decode


def test_decode_gets_its_share_while_a_prefill_runs():
    loop, rec, server = make(simple(decode_share_during_prefill=0.5))
    server.submit(job("a", prompt=16, out=11, key=1), 0.0)
    # b's 1 s prefill starts right after a's first token; a decodes at half speed meanwhile.
    server.submit(job("b", prompt=1000, out=2, key=2), 0.0)
    loop.run()
    first_a = rec.first["a"]
    assert rec.done["a"] - first_a == pytest.approx(10 * 0.01 * 2)


def test_slow_factor_multiplies_every_time():
    loop, rec, server = make(simple(), slow_factor=3.0)
    server.submit(job("a", prompt=100, out=11), 0.0)
    loop.run()
    assert rec.first["a"] == pytest.approx(0.3)
    assert rec.done["a"] == pytest.approx(0.3 + 10 * 0.03)


def test_slowing_down_mid_decode_keeps_the_tokens_already_made():
    loop, rec, server = make(simple())
    server.submit(job("a", prompt=100, out=21), 0.0)
    loop.at(0.2, server.set_slow_factor, 2.0)
    loop.run()
    # 10 tokens at 0.01 s before the change, 10 at 0.02 s after.
    assert rec.done["a"] == pytest.approx(0.2 + 10 * 0.02)


def test_crash_fails_everything_clears_the_cache_and_ignores_old_events():
    loop, rec, server = make(simple(max_batch=1))
    server.submit(job("a", prompt=160, out=50), 0.0)
    server.submit(job("b", prompt=160, out=50, key=2), 0.0)
    loop.at(0.3, server.crash)
    loop.run()
    assert rec.failed == {"a": 0.3, "b": 0.3}
    assert rec.done == {}
    assert not server.alive and len(server.cache) == 0 and server.in_flight == 0
    with pytest.raises(RuntimeError, match="down"):
        server.submit(job("c"), 0.4)
    server.recover(1.0)
    server.submit(job("c", prompt=160), 1.0)
    loop.run()
    assert rec.first["c"] == pytest.approx(1.16)  # cold cache


def test_kv_cache_utilization_counts_running_requests_blocks():
    loop, _, server = make(simple(cache_blocks=10))
    server.submit(job("a", prompt=64, out=16), 0.0)
    assert server.kv_cache_utilization() == pytest.approx(5 / 10)
    loop.run()
    assert server.kv_cache_utilization() == 0.0


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_batch", 0), ("decode_share_during_prefill", 0.0), ("block_tokens", 0)],
)
def test_bad_params_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        simple(**{field: value})


def test_admission_waits_for_kv_blocks():
    # Each job holds (100 + 11) / 16 -> 7 blocks; 10 blocks fit one job at a time.
    loop, rec, server = make(simple(cache_blocks=10))
    server.submit(job("a", key=1), 0.0)
    server.submit(job("b", key=2), 0.0)
    assert server.running == 1 and server.waiting == 1
    loop.run()
    assert rec.first["b"] == pytest.approx(rec.done["a"] + 0.1)


def test_a_job_larger_than_the_cache_still_runs_alone():
    loop, rec, server = make(simple(cache_blocks=2))
    server.submit(job("a", prompt=100), 0.0)
    loop.run()
    assert "a" in rec.done


def test_running_requests_take_blocks_from_the_prefix_cache():
    loop, _, server = make(simple(cache_blocks=20))
    server.submit(job("a", prompt=160, out=1, key=1), 0.0)
    loop.run()
    assert server.cache.match(job("x", prompt=160, key=1).prompt_blocks) == 10
    # b holds 11 blocks while it runs: only 9 are left for cached prefixes.
    server.submit(job("b", prompt=160, out=16, key=2), 1.0)
    assert server.cache.capacity_blocks == 9
    loop.run()
    assert server.cache.capacity_blocks == 20
    assert server.cache.match(job("x", prompt=160, key=1).prompt_blocks) < 10


def test_predicted_ttft_of_an_idle_server_is_its_prefill():
    server = SimServer("ep", simple(prefill_overhead_s=0.01), EventLoop(), Recorder())
    assert server.predict_ttft(320, block_hashes([(1, 320)], 16), 0.0) == pytest.approx((0, 0.33))


def test_predicted_ttft_counts_the_prefills_ahead_and_the_blocks_they_will_cache():
    loop = EventLoop()
    server = SimServer("ep", simple(), loop, Recorder())
    shared = [(1, 320)]
    server.submit(Job(prompt_tokens=320, output_tokens=5, owner="a"), 0.0)
    server.submit(
        Job(prompt_tokens=320, output_tokens=5, prompt_blocks=block_hashes(shared, 16), owner="b"),
        0.0,
    )
    # "a" is prefilling (0.32 s), "b" waits for it (0.32 s, nothing cached yet), then a prompt
    # sharing b's 320 tokens computes only its 160 new ones.
    prompt = block_hashes([*shared, (2, 160)], 16)
    assert server.predict_ttft(480, prompt, 0.1) == pytest.approx((0.54, 0.16))
    # A prompt sharing nothing waits as long and computes all of itself.
    other = block_hashes([(3, 480)], 16)
    assert server.predict_ttft(480, other, 0.1) == pytest.approx((0.54, 0.48))
    # The prediction changes nothing: the jobs still finish when they would have.
    loop.run()
    assert server.completed == 2
