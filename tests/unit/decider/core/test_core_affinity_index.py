"""Session table and prefix index: expiry, bounds, matching depth."""

from __future__ import annotations

import sys

from decider.core.affinity import PrefixIndex, SessionTable


def test_sessions_expire_after_their_ttl_and_renew_on_use():
    table = SessionTable(ttl_s=300, max_sessions=10)
    table.bind("s1", "a", 0.0)
    table.bind("s2", "b", 100.0)
    table.bind("s1", "a", 200.0)  # renewed
    assert table.get("s1", 450.0) == "a"
    assert table.get("s2", 450.0) is None
    assert table.expire(450.0) == 1
    assert len(table) == 1
    assert table.expire(600.0) == 1
    assert len(table) == 0


def test_sessions_are_bounded_least_recently_used_first():
    table = SessionTable(ttl_s=300, max_sessions=2)
    table.bind("s1", "a", 0.0)
    table.bind("s2", "a", 1.0)
    table.bind("s1", "a", 2.0)
    table.bind("s3", "a", 3.0)
    assert table.get("s2", 4.0) is None
    assert table.get("s1", 4.0) == "a"


def test_matches_finds_the_depth_of_each_holder():
    index = PrefixIndex(blocks_per_endpoint=1000, max_blocks_per_request=1000)
    prompt = list(range(100, 200))
    index.record("a", prompt[:85])
    index.record("b", prompt[:62])
    index.record("c", prompt[:91])
    index.record("d", [7, 8, 9])
    assert index.matches(prompt) == {"a": 85, "b": 62, "c": 91}
    assert index.matches(prompt[:10]) == {"a": 10, "b": 10, "c": 10}
    assert index.matches([7, 8, 9, 10]) == {"d": 3}
    assert index.matches([1, 2]) == {}
    assert index.matched("c", prompt) == 91


def test_matches_looks_at_a_bounded_number_of_holders():
    index = PrefixIndex(blocks_per_endpoint=1000, max_blocks_per_request=1000, max_matches=3)
    for i in range(10):
        index.record(f"e{i}", [1, 2, 3, 4])
    index.record("deep", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    found = index.matches([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert len(found) == 3
    assert found["deep"] == 9


def test_blocks_per_endpoint_bounds_the_index():
    index = PrefixIndex(blocks_per_endpoint=100, max_blocks_per_request=1000)
    for start in range(0, 10_000, 10):
        index.record("a", list(range(start, start + 10)))
    assert index.block_count <= 100
    # The most recent prompt is still there, an old one is gone.
    assert index.matches(list(range(9990, 10_000))) == {"a": 10}
    assert index.matches(list(range(0, 10))) == {}


def test_removing_an_endpoint_drops_its_blocks():
    index = PrefixIndex(blocks_per_endpoint=100, max_blocks_per_request=1000)
    index.record("a", [1, 2, 3])
    index.record("b", [1, 2, 3])
    index.remove_endpoint("a")
    assert index.matches([1, 2, 3]) == {"b": 3}
    assert index.block_count == 3


def index() -> PrefixIndex:
    return PrefixIndex(blocks_per_endpoint=100, max_blocks_per_request=1000)


def test_pending_blocks_match_at_once_and_a_confirm_keeps_them():
    idx = index()
    idx.add_pending("a", [1, 2, 3])
    assert idx.matches([1, 2, 3, 4]) == {"a": 3}
    idx.confirm("a", [1, 2, 3])
    assert idx.matches([1, 2, 3, 4]) == {"a": 3}
    assert idx.block_count == 3


def test_a_drop_forgets_blocks_only_that_decision_gave():
    idx = index()
    idx.record("a", [1, 2])
    idx.add_pending("a", [1, 2, 3, 4])
    idx.add_pending("a", [1, 2, 3])
    idx.drop("a", [1, 2, 3, 4])
    # Block 3 is still pending for the second decision; 1 and 2 were served before.
    assert idx.matches([1, 2, 3, 4]) == {"a": 3}
    idx.drop("a", [1, 2, 3])
    assert idx.matches([1, 2, 3, 4]) == {"a": 2}
    assert idx.block_count == 2
    # Settling what is not pending changes nothing.
    idx.drop("a", [1, 2])
    idx.drop("b", [1, 2])
    assert idx.matches([1, 2]) == {"a": 2}


def test_settling_every_pending_block_gives_the_pending_table_back():
    # A dict keeps its table after deletions; with 10,000 endpoints each holding the empty
    # table of its last prompt, that was 44 MB of nothing (make bench's RSS scenario).
    empty = sys.getsizeof({})
    idx = index()
    idx.add_pending("a", list(range(100)))
    idx.confirm("a", list(range(100)))
    idx.add_pending("b", list(range(100, 200)))
    idx.drop("b", list(range(100, 200)))
    for endpoint_id in ("a", "b"):
        assert sys.getsizeof(idx._blocks[endpoint_id].pending) == empty
    assert idx.block_count == 100


def test_pending_blocks_outlive_rotation_until_settled():
    idx = PrefixIndex(blocks_per_endpoint=10, max_blocks_per_request=1000)
    idx.add_pending("a", [1, 2, 3])
    for start in range(100, 200, 5):
        idx.record("a", list(range(start, start + 5)))
    assert idx.matches([1, 2, 3]) == {"a": 3}
    assert idx.matches(list(range(100, 105))) == {}
    idx.drop("a", [1, 2, 3])
    assert idx.matches([1, 2, 3]) == {}


def test_a_served_block_rotates_out_even_with_a_decision_open_for_it():
    # Held blocks are not counted as pending (the common case costs one lookup per block): the
    # index forgets one when its generation goes, and the decision's success records it again.
    idx = PrefixIndex(blocks_per_endpoint=10, max_blocks_per_request=1000)
    idx.record("a", [1, 2])
    idx.add_pending("a", [1, 2])
    for start in range(100, 200, 5):
        idx.record("a", list(range(start, start + 5)))
    assert idx.matches([1, 2]) == {}
    idx.drop("a", [1, 2])
    idx.confirm("a", [1, 2])
    assert idx.matches([1, 2]) == {"a": 2}


def test_a_served_pending_block_needs_no_settling():
    idx = index()
    idx.add_pending("a", [1, 2, 3])
    idx.add_pending("a", [1, 2, 3])
    idx.confirm("a", [1, 2, 3])
    # The other decision fails: the blocks were served, so they stay.
    idx.drop("a", [1, 2, 3])
    assert idx.matches([1, 2, 3]) == {"a": 3}
    # A success elsewhere serves the blocks there too.
    idx.add_pending("b", [1, 2])
    idx.record("b", [1, 2])
    idx.drop("b", [1, 2])
    assert idx.matches([1, 2]) == {"a": 2, "b": 2}


def test_removing_an_endpoint_drops_its_pending_blocks():
    idx = index()
    idx.add_pending("a", [1, 2, 3])
    idx.remove_endpoint("a")
    assert idx.matches([1, 2, 3]) == {}
    idx.confirm("a", [1, 2, 3])
    assert idx.matches([1, 2, 3]) == {"a": 3}
