import pytest

from bench.sim.cache import PrefixCache, block_hashes, token_count
from bench.sim.events import EventLoop


def test_events_run_in_time_order_and_ties_in_scheduling_order():
    loop = EventLoop()
    seen: list[tuple[str, float]] = []

    def note(name: str, now: float) -> None:
        seen.append((name, now))

    loop.at(2.0, note, "late")
    loop.at(1.0, note, "first")
    loop.at(1.0, note, "second")
    loop.run()
    assert seen == [("first", 1.0), ("second", 1.0), ("late", 2.0)]
    assert loop.now == 2.0


def test_event_in_the_past_runs_now_and_run_stops_at_until():
    loop = EventLoop()
    seen: list[float] = []

    def later(now: float) -> None:
        loop.at(now - 5.0, lambda t: seen.append(t))
        loop.at(now + 10.0, lambda t: seen.append(t))

    loop.at(3.0, later)
    loop.run(until_s=5.0)
    assert seen == [3.0]
    assert loop.pending() == 1


def test_block_hashes_cover_full_blocks_only():
    assert block_hashes([(1, 15)], 16) == ()
    assert len(block_hashes([(1, 16)], 16)) == 1
    assert len(block_hashes([(1, 40), (2, 30)], 16)) == 4
    assert token_count([(1, 40), (2, 30)]) == 70


def test_shared_prefix_gives_equal_leading_hashes_and_chains_the_rest():
    a = block_hashes([(7, 64), (100, 40)], 16)
    b = block_hashes([(7, 64), (200, 40)], 16)
    assert a[:4] == b[:4]
    assert a[4:] != b[4:]
    assert len(set(a[4:]) & set(b[4:])) == 0
    # Same content after a different prefix is a different block.
    c = block_hashes([(8, 64), (100, 40)], 16)
    assert set(a).isdisjoint(c)


def test_block_hashes_do_not_depend_on_how_the_prompt_is_split_into_turns():
    turn_1 = [(1, 100), (2, 60)]
    answer = (3, 90)
    turn_2 = [*turn_1, answer, (4, 30)]
    assert block_hashes(turn_2, 16)[: len(block_hashes([*turn_1, answer], 16))] == block_hashes(
        [*turn_1, answer], 16
    )


def test_block_hashes_are_the_same_on_every_machine():
    # Pinned: a change here changes every simulated number.
    assert block_hashes([(1, 32)], 16) == (16779450978075719114, 15210101567498973829)
    assert all(0 <= h < 2**64 for h in block_hashes([(5, 1000)], 16))


def test_match_counts_leading_blocks_only():
    cache = PrefixCache(10)
    cache.insert([1, 2, 3])
    assert cache.match([1, 2, 3, 4]) == 3
    assert cache.match([1, 9, 3]) == 1
    assert cache.match([2, 3]) == 2
    assert cache.match([9, 1]) == 0


def test_capacity_evicts_least_recently_used_and_tails_first():
    cache = PrefixCache(4)
    cache.insert([1, 2, 3])
    cache.insert([10, 11])
    # 5 blocks for 4 places: the oldest chain loses its tail, keeping its prefix usable.
    assert len(cache) == 4
    assert 3 not in cache
    assert cache.match([1, 2, 3]) == 2
    assert cache.evictions == 1
    # Touching 1, 2 makes the other chain the older one.
    cache.insert([1, 2])
    cache.insert([20, 21])
    assert cache.match([1, 2]) == 2
    assert 10 not in cache and 11 not in cache
    assert len(cache) == 4


def test_zero_capacity_caches_nothing_and_negative_is_refused():
    cache = PrefixCache(0)
    cache.insert([1, 2])
    assert cache.match([1]) == 0
    with pytest.raises(ValueError, match="capacity_blocks"):
        PrefixCache(-1)


def test_clear_empties_the_cache():
    cache = PrefixCache(8)
    cache.insert([1, 2])
    cache.clear()
    assert len(cache) == 0


def test_resize_evicts_down_to_the_new_capacity():
    cache = PrefixCache(6)
    cache.insert([1, 2, 3])
    cache.insert([4, 5, 6])
    cache.resize(4)
    assert cache.capacity_blocks == 4 and len(cache) == 4
    assert cache.match([4, 5, 6]) == 3 and cache.match([1, 2, 3]) == 1
    cache.resize(-3)
    assert len(cache) == 0
